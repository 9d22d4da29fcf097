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

from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

__all__ = ["Resumable", "find_resumable_run", "CHECKPOINT_TAG"]

CHECKPOINT_TAG = "checkpoint.dir"


@dataclass
class Resumable:
    """A run that can be continued.

    Attributes:
      run_id: the lone run, or a population job's parent run.
      status: its MLflow status now (FINISHED, KILLED, FAILED, RUNNING if its process
        died without a trace on another host).
      directory: its checkpoint folder.
      step: the step of its latest checkpoint.
      document: what was saved with it: ``kind`` ("run" or "population"), ``config``
        (the resolved config), ``run_ids`` (the member runs, in member order),
        ``launch_dir``, ``experiment``.
    """

    run_id: str
    status: str
    directory: Path
    step: int
    document: dict


def find_resumable_run(client, experiment_id: str, key: str) -> Resumable:
    """The run ``key`` names (a run id, or "latest" in the experiment) and its latest
    checkpoint.

    Raises:
      ConfigError: no such run, a population member (its parent resumes it), no
        checkpoint, or a run still RUNNING in a live process.
    """
    from .checkpoint import Checkpoints
    from .tracking import find_resumable

    if key == "latest":
        run_id = find_resumable(client, experiment_id)
        if run_id is None:
            raise ConfigError("resume=latest: no run of this experiment has checkpoints; "
                              "give the experiment (+experiment=NAME) or a run id (resume=ID)")
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
    if not directory.is_dir():
        raise ConfigError(f"resume={key}: its checkpoint folder {directory} is gone; the run "
                          "cannot be continued")
    with Checkpoints(directory) as checkpoints:
        step = checkpoints.latest_step()
        if step is None:
            raise ConfigError(f"resume={key}: no checkpoint in {directory} (the run stopped "
                              "before its first chunk ended, or the folder was removed)")
        document = checkpoints.document(step)
    return Resumable(run_id=run.info.run_id, status=run.info.status, directory=directory,
                     step=step, document=document)
