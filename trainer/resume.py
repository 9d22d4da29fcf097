"""Resume: continue a stopped or finished run from its latest checkpoint, in the same
MLflow run (case C21).

``resume=RUN_ID`` (or ``resume=latest``: the newest resumable run of the
experiment) finds the run in the store, its checkpoint folder (tag
``checkpoint.dir``, keyed by run id under the store's folder, never by date) and
the document saved with the latest checkpoint: the resolved config the run was
started with and the run ids of its record. ``config.resume_config`` decides the
config (only ``trainer.num_steps`` may grow); ``tracking.resume_run`` reopens the
run; ``loop.train_population`` restores the state and continues, logging no point
the run already holds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

__all__ = ["Job", "Resumable", "find_resumable_run", "CHECKPOINT_TAG", "HOST_DEVICES_TAG"]

CHECKPOINT_TAG = "checkpoint.dir"


@dataclass
class Job:
    """One training's checkpoints: a lone run's, or one population job's.

    Attributes:
      directory: its checkpoint folder. step: its latest checkpoint's step.
      document: what was saved with it: ``kind`` ("run" or "population"), ``config``
        (the resolved config of the run, or of the population job with its
        ``population.members``), ``run_ids`` (the member runs, in member order),
        ``launch_dir``, ``experiment``; a population job's also ``todo`` (which of
        ``population.members`` it trained) and ``parent_run_id``.
    """

    directory: Path
    step: int
    document: dict


@dataclass
class Resumable:
    """A run that can be continued.

    Attributes:
      run_id: the lone run, or a population's parent run; experiment_id: its experiment.
      status: its MLflow status now (FINISHED, KILLED, FAILED).
      population: whether it is a population's parent.
      jobs: the lone run's checkpoints, or one entry per population job (a sweep has
        one per group of points) that saved any.
    """

    run_id: str
    experiment_id: str
    status: str
    population: bool
    jobs: list[Job]

    @property
    def step(self) -> int:
        """The latest checkpoint's step (of the first job)."""
        return self.jobs[0].step

    @property
    def document(self) -> dict:
        return self.jobs[0].document


def _job(directory: Path) -> Job | None:
    from .checkpoint import Checkpoints

    with Checkpoints(directory) as checkpoints:
        step = checkpoints.latest_step()
        return None if step is None else Job(directory, step, checkpoints.document(step))


HOST_DEVICES_TAG = "population.host_devices"


def _set_host_devices(client, tags: dict, job_folders: list[Path]) -> None:
    """The host devices the run had, set before Orbax starts JAX's backend: a population
    padded for 2 devices has other shapes than one for 1 (``population.pad_members``).
    A sweep's parent, opened by the sweeper, has no tag: its jobs' member runs have it
    (each job folder is named after its first member run)."""
    from .population import set_host_devices

    value = tags.get(HOST_DEVICES_TAG)
    for folder in job_folders:
        if value is not None:
            break
        with contextlib.suppress(Exception):
            value = client.get_run(folder.name).data.tags.get(HOST_DEVICES_TAG)
    set_host_devices(int(value) if value else None)


def find_resumable_run(client, experiment: str, key: str) -> Resumable:
    """The run ``key`` names (a run id, or "latest": the newest resumable run of the
    experiment named ``experiment``) and its latest checkpoints.

    Raises:
      ConfigError: no such run, a population member (its parent resumes it), no
        checkpoint, or a run still RUNNING in a live process.
    """
    from .tracking import download_checkpoints, find_resumable

    if key == "latest":
        found = client.get_experiment_by_name(experiment)
        run_id = find_resumable(client, found.experiment_id) if found else None
        if run_id is None:
            raise ConfigError(f"resume=latest: no run of experiment {experiment!r} has "
                              "checkpoints; name the experiment (+experiment=NAME) or the "
                              "run (resume=RUN_ID)")
    else:
        run_id = key
    try:
        run = client.get_run(run_id)
    except Exception:  # MLflow raises its own error types for a missing or malformed id
        raise ConfigError(f"resume={key}: no run with this id in the store; the run id is "
                          "on the run's page in the MLflow UI, or use resume=latest") from None
    tags = run.data.tags
    if tags.get("population.role") == "member":
        parent = tags.get("mlflow.parentRunId", "?")
        raise ConfigError(f"resume={key}: this run is a member of a population; resume the "
                          f"population as a whole: resume={parent}")
    if run.info.status == "RUNNING":
        raise ConfigError(f"resume={key}: the run is still RUNNING (process {tags.get('pid')} "
                          f"on {tags.get('host')}); stop it first")
    folder = tags.get(CHECKPOINT_TAG)
    if folder is None:
        raise ConfigError(f"resume={key}: the run has no checkpoints (it ran with "
                          "trainer.checkpoints=false, or before checkpoints existed)")
    directory = Path(folder)
    if not directory.is_dir() and not download_checkpoints(client, run.info.run_id, directory):
        raise ConfigError(f"resume={key}: its checkpoint folder {directory} is gone (and the "
                          "run has no checkpoint artifacts); the run cannot be continued")
    population = tags.get("population.role") == "parent"
    folders = sorted(p for p in directory.iterdir() if p.is_dir()) if population else [directory]
    _set_host_devices(client, tags, folders if population else [])
    jobs = [job for job in map(_job, folders) if job is not None]
    if not jobs:
        raise ConfigError(f"resume={key}: no checkpoint in {directory} (the run stopped "
                          "before its first chunk ended)")
    return Resumable(run_id=run.info.run_id, experiment_id=run.info.experiment_id,
                     status=run.info.status, population=population, jobs=jobs)
