"""Population jobs and sweeps in MLflow: one parent run, one child run per member.

A population job (``population.members`` set; a multirun makes one per group of
points that differ only in vmappable keys) trains its members as one program
(``loop.train_population``) and records each member as a child run holding what a
lone run of that point holds: its params, curves, test metrics beside the linear
baseline, tags, artifacts. The parent run is the sweep's (opened by the sweeper,
``open_sweep``) or, for a job launched on its own, the job's. The parent
summarises its children (``summarize_parent``): the best member by validation
loss, min / median / max of the final metrics, the final validation loss against
each swept key, the members' curves as a median with a band (cases C16, C17).

Points that already have a FINISHED run with the same resolved config in the
experiment (tag ``config_hash``) are skipped unless ``population.rerun=true``;
failed ones run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import names, record, report
from .checkpoint import CheckpointPlan, periodic_steps, upload_checkpoints
from .resume import CHECKPOINT_TAG
from .tracking import (PARENT_TAG, MlflowTracker, Store, child_runs, config_hash,
                       environment_tags, finished_runs, flatten_config, get_or_create_experiment,
                       log_batch, metric_histories, metric_history, open_store, resolve_store,
                       resume_run, run_op, start_run)

__all__ = ["new_sweep_id", "run_population_job", "resume_population", "summarize_parent",
           "open_sweep",
           "SweepHandle", "member_run_name"]

CURVES = ("train_loss", "val_loss")  # the members' curves the parent reads (names.CURVES)


def new_sweep_id() -> str:
    """A sweep id that no two launches share: time, host and a random part."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def member_run_name(experiment: str, values: dict, index: int) -> str:
    """``lr0.003-seed1-<experiment>-7f3a``: what differs first (``record.run_name``)."""
    return record.run_name(experiment, values=values or {"member": index})


def _identity() -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def run_population_job(client, store: Store, experiment_id: str, experiment: str, cfg: DictConfig,
                       members: list, datasets: list, *, tags: dict[str, str], console,
                       err_console, member_tags: list[dict[str, str]] | None = None) -> list:
    """Train one population job and record it; returns the results of the members trained.

    Args:
      cfg: the job's composed config (with ``population``).
      members: ``config.member_configs(cfg)``: ``[(values, member_cfg)]``.
      datasets: each member's split.
      tags: the job's tags (environment, overrides, output folder), given to every run.
      member_tags: more tags for each member's run, in the order of ``members`` (a
        search's trial number).

    Raises:
      what ``loop.train_population`` raises, after every run of the job is closed
      FAILED (or KILLED on Ctrl-C / SIGTERM) with the error.
    """
    from .config import logged_config, to_config

    population = cfg.population
    sweep_id = population.sweep_id or new_sweep_id()
    resolved = [OmegaConf.to_container(m, resolve=True) for _, m in members]
    hashes = [config_hash(r) for r in resolved]
    done = {} if population.rerun else finished_runs(client, experiment_id, hashes)
    todo = [i for i, h in enumerate(hashes) if h not in done]
    skipped = {h: done[h] for h in hashes if h in done}
    if skipped:
        console.print(f"skipped {len(skipped)} of {len(members)} points that already have a "
                      "FINISHED run with the same config in this experiment "
                      "(population.rerun=true runs them again)")
    job_tags = {**tags, "sweep_id": sweep_id, "population.members": str(len(members))}
    with contextlib.ExitStack() as stack:
        parent_id = population.parent_run_id
        if parent_id is None:
            parent = stack.enter_context(start_run(
                client, experiment_id, run_name=f"sweep-{len(members)}-points-{experiment}-{sweep_id[-4:]}",
                tags={**job_tags, "command": " ".join(["python -m trainer", *sys.argv[1:]]),
                      "population.role": "parent"}))
            parent_id = parent.run_id
            parent.log_params({k: v for k, v in flatten_config(logged_config(
                OmegaConf.to_container(cfg, resolve=True))).items()
                if not k.startswith("population.")})
            console.print(f"parent run {parent_id} in experiment {experiment!r}")
        if skipped:
            MlflowTracker(client, parent_id).set_tags(
                {f"skipped.{h}": run_id for h, run_id in skipped.items()})
        # the member runs end (FINISHED or FAILED) before the parent summarises them
        with contextlib.ExitStack() as children:
            if not todo:
                results = []
            else:
                trackers = []
                for i in todo:
                    values, _ = members[i]
                    name = member_run_name(experiment, values, i)
                    tracker = children.enter_context(start_run(
                        client, experiment_id, run_name=name,
                        tags={**job_tags, PARENT_TAG: parent_id, "config_hash": hashes[i],
                              "population.member": str(i), "population.role": "member",
                              "population.values": json.dumps(values),
                              **(member_tags[i] if member_tags else {})}))
                    tracker.log_params(flatten_config(logged_config(resolved[i])))
                    tracker.log_text(OmegaConf.to_yaml(resolved[i]), "config.yaml")
                    trackers.append(tracker)
                console.print(f"{len(todo)} member runs under parent {parent_id}")
                configs = [to_config(members[i][1]) for i in todo]
                plan = None
                if configs[0].trainer.checkpoints:
                    # one folder per population job, under its parent's: a sweep has a job per group
                    folder = store.checkpoint_root / parent_id
                    plan = _job_plan(configs[0].trainer, folder / trackers[0].run_id, {
                        "kind": "population", "config": OmegaConf.to_container(cfg, resolve=True),
                        "todo": todo, "run_ids": [t.run_id for t in trackers],
                        "parent_run_id": parent_id, "experiment": experiment,
                        "launch_dir": tags.get("launch_dir", os.getcwd())})
                    MlflowTracker(client, parent_id).set_tags({CHECKPOINT_TAG: str(folder)})
                    for tracker in trackers:
                        tracker.set_tags({CHECKPOINT_TAG: str(plan.directory)})
                try:
                    results = _train_members(configs, [datasets[i] for i in todo], trackers,
                                             checkpoint=plan, console=console,
                                             err_console=err_console)
                except KeyboardInterrupt as err:  # the caller's message names the resume
                    if plan is not None:
                        err.parent_run_id = parent_id
                    raise
                finally:
                    _upload(client, store, parent_id, plan)
        if population.parent_run_id is None:
            summarize_parent(client, experiment_id, parent_id, num_groups=1)
    return results


def _job_plan(trainer, directory: Path, document: dict, *,
              resume: bool = False) -> CheckpointPlan:
    """A population job's checkpoints, as its (shared) ``trainer`` config asks."""
    return CheckpointPlan(
        directory=directory, keep=trainer.checkpoint_keep, document=document, resume=resume,
        every_steps=periodic_steps(trainer.checkpoint_every_steps, trainer.num_steps),
        min_interval_s=trainer.checkpoint_min_interval_s)


def _upload(client, store: Store, parent_id: str, plan) -> None:
    """For a remote store: the job's latest and best checkpoints as the parent's artifacts
    ``checkpoints/<job>/<step>`` (a requeued job may resume on another machine)."""
    from . import signals

    if plan is not None and store.remote and plan.directory.is_dir():
        with signals.blocked():
            upload_checkpoints(MlflowTracker(client, parent_id), plan.directory,
                               f"checkpoints/{plan.directory.name}")


def _train_members(configs: list, datasets: list, trackers: list, *, checkpoint, console,
                   err_console, histories: list | None = None) -> list:
    """``loop.train_population``, then each diverged member's run marked to end FAILED."""
    from .loop import train_population

    results = train_population(configs, datasets, trackers, console=console,
                               checkpoint=checkpoint, histories=histories)
    for tracker, result in zip(trackers, results):
        tracker.set_tags({record.NOTE_TAG: record.describe(result)})
        if result.error is not None:
            tracker.set_tags({"error": str(result.error)})
            tracker.end_status = "FAILED"
    failed = sum(r.error is not None for r in results)
    if failed:
        others = "the others trained on" if failed < len(results) else "none finished"
        err_console.print(f"[bold red]diverged:[/] {failed} of {len(results)} members "
                          f"reached a NaN, infinite or diverging loss (trainer.divergence_factor"
                          f") or dropped most updates (trainer.max_skipped_fraction); their runs "
                          f"ended FAILED, {others} (try a smaller optim.learning_rate or set "
                          "optim.clip_norm)")
    return results


def resume_population(client, store: Store, resumed, overrides: list[str], composed, *,
                      tags: dict[str, str], console, err_console) -> list:
    """Continue a population from its checkpoints: its parent and, in each of its jobs
    (one per group of a sweep) that had not trained to its end, every member run, each
    reopened (``tracking.resume_run``) and continued from the job's latest checkpoint
    with no point logged twice. The parent is summarised again and closed.

    Args:
      resumed: ``resume.Resumable`` of the parent, with one entry per job in ``jobs``.
      overrides, composed: the command's, checked per job by ``config.resume_config``.

    Returns:
      the results of the members trained.

    Raises:
      ConfigError: a changed key, or nothing left to train.
    """
    from .config import ConfigError, member_configs, resume_config, to_config
    from .data import load_member_datasets

    plans = []
    for job in resumed.jobs:
        doc = job.document
        cfg = resume_config(doc["config"], overrides, composed, experiment=doc["experiment"])
        ids = doc["run_ids"]
        statuses = [client.get_run(run_id).info.status for run_id in ids]
        longer = cfg.trainer.num_steps > doc["config"]["trainer"]["num_steps"]
        if not longer and all(s in ("FINISHED", "FAILED") for s in statuses):
            continue  # this job trained to its end (or all stopped) and closed its runs
        plans.append((job, cfg, ids))
    if not plans:
        raise ConfigError(f"resume={resumed.run_id}: every job of this population trained to "
                          "its end; to train further give a larger trainer.num_steps")
    results = []
    with contextlib.ExitStack() as stack:
        parent = stack.enter_context(resume_run(client, resumed.run_id, tags=tags))
        for job, cfg, ids in plans:  # each job's member runs end before the summary
            with contextlib.ExitStack() as children:
                doc = job.document
                launch_dir = Path(doc["launch_dir"])
                pairs = member_configs(cfg)
                configs = [to_config(pairs[i][1]) for i in doc["todo"]]
                datasets = load_member_datasets(configs, launch_dir)
                trackers = [children.enter_context(resume_run(client, run_id, tags=tags))
                            for run_id in ids]
                for tracker, c in zip(trackers, configs):
                    tracker.log_text(OmegaConf.to_yaml(dataclasses.asdict(c)), "config.yaml")
                console.print(f"population job {job.directory.name}: {len(ids)} member runs "
                              f"resumed from step {job.step} of {cfg.trainer.num_steps}")
                plan = _job_plan(configs[0].trainer, job.directory, {
                    **doc, "config": OmegaConf.to_container(cfg, resolve=True)}, resume=True)
                try:
                    results += _train_members(
                        configs, datasets, trackers, checkpoint=plan, console=console,
                        err_console=err_console,
                        histories=[metric_histories(client, i) for i in ids])
                finally:
                    _upload(client, store, parent.run_id, plan)
        summarize_parent(client, resumed.experiment_id, parent.run_id,
                         num_groups=int(client.get_run(parent.run_id).data.metrics.get(
                             "groups", 1)))
    return results


def summarize_parent(client, experiment_id: str, parent_run_id: str, *,
                     num_groups: int) -> dict | None:
    """Summarise a parent's children (and the earlier runs of points it skipped).

    Logs to the parent: metrics ``members``, ``failed_members``, ``skipped_members``,
    ``groups``; ``best/val_loss``, ``best/train_loss`` and ``best/test_*`` of the best member
    (the member's ``curves/*`` and ``test/*``, ``/`` written ``_``; lowest final
    validation loss among FINISHED runs; with early stopping a member's final model is
    that of its best step, so its ``train/best_val_loss`` stands for its ``val_loss``) with
    its run id and name as tags and its values as params ``best.<key>``;
    ``final/<metric>/min|median|max`` over FINISHED members; the tag ``best.model_uri``
    (the best member's MLflow model), registered under ``tracking.register_model`` when
    the members were given one; artifacts ``members.csv``
    (one row per member), ``sweep_val_loss.png`` (final validation loss against each
    swept key) and ``sweep_curves.png`` (train and validation loss: median and min-max
    band over members).

    Returns:
      the best member's summary row, or None when no member finished.
    """
    parent = client.get_run(parent_run_id)
    runs = child_runs(client, experiment_id, parent_run_id)
    skipped_ids = [v for k, v in parent.data.tags.items() if k.startswith("skipped.")]
    skipped = [client.get_run(run_id) for run_id in skipped_ids]
    rows = []
    for run in runs + skipped:
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name,
               "status": run.info.status,
               "values": json.loads(run.data.tags.get("population.values", "{}")),
               "metrics": {_summary_name(k): v for k, v in run.data.metrics.items()
                           if k in {names.CURVES[c] for c in CURVES}
                           or k.startswith("test/")},
               "skipped": run in skipped, "model_uri": run.data.tags.get("model_uri"),
               "register_model": run.data.params.get("tracking.register_model", "None")}
        best_val = names.train_metric("best_val_loss")
        if best_val in run.data.metrics:  # early stopping: the model kept is the best
            row["metrics"]["val_loss"] = run.data.metrics[best_val]
        rows.append(row)
    finished = [r for r in rows if r["status"] == "FINISHED" and "val_loss" in r["metrics"]]
    now = int(time.time() * 1000)
    metrics = [("members", len(rows), now, 0),
               ("failed_members", sum(r["status"] == "FAILED" for r in rows), now, 0),
               ("skipped_members", len(skipped), now, 0), ("groups", num_groups, now, 0)]
    tags, params, best = {}, [], None
    if finished:
        best = min(finished, key=lambda r: r["metrics"]["val_loss"])
        tags = {"best.run_id": best["run_id"], "best.run_name": best["run_name"],
                record.NOTE_TAG: _headline(best, rows)}
        if best["model_uri"]:  # the model people use: the best member's
            tags["best.model_uri"] = best["model_uri"]
            # what this sweep's command asked (a skipped point's run may have asked otherwise)
            name = next((r["register_model"] for r in rows if not r["skipped"]), "None")
            if name not in ("None", "null", "") and \
                    parent.data.tags.get("best.registered") != best["model_uri"]:
                version = run_op(client, "register_model", best["model_uri"], name)
                tags["best.registered"] = best["model_uri"]
                tags["best.registered_version"] = f"{name} version {version}"
        existing = parent.data.params
        params = [(f"best.{k}", str(v)) for k, v in best["values"].items()
                  if f"best.{k}" not in existing]
        metrics += [(f"best/{k}", v, now, 0) for k, v in best["metrics"].items()]
        summarised = sorted({k for r in finished for k in r["metrics"]})
        for name in summarised:
            values = [r["metrics"][name] for r in finished if name in r["metrics"]]
            for stat, value in (("min", min(values)), ("median", statistics.median(values)),
                                ("max", max(values))):
                metrics.append((f"final/{name}/{stat}", value, now, 0))
    log_batch(client, parent_run_id, metrics=metrics, params=params, tags=list(tags.items()))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trainer-sweep-") as tmp:
        folder = Path(tmp)
        client.log_artifact(parent_run_id, str(report.write_members_csv(
            rows, folder / "members.csv")))
        if finished:
            curves = {r["run_id"]: {k: metric_history(client, r["run_id"], names.CURVES[k])
                                    for k in CURVES} for r in finished}
            client.log_artifact(parent_run_id, str(report.plot_sweep(
                finished, folder / "sweep_val_loss.png", best_run_id=best["run_id"])))
            client.log_artifact(parent_run_id, str(report.plot_member_curves(
                curves, folder / "sweep_curves.png", best_run_id=best["run_id"])))
    return best


def _summary_name(record_name: str) -> str:
    """A member's metric as the parent names it: ``curves/val_loss`` -> ``val_loss``,
    ``test/rmse`` -> ``test_rmse``, ``test/baseline_rmse`` -> ``test_baseline_rmse``."""
    return record_name.removeprefix("curves/").replace("/", "_")


def _headline(best: dict, rows: list[dict]) -> str:
    """The parent's description: its best member and how it did, e.g. ``best of 4 members:
    lr0.001-diabetes-4d61, validation loss 0.5611, test RMSE 60.78 vs linear 61.5``."""
    m = best["metrics"]
    text = f"best of {len(rows)} members: {best['run_name']}, validation loss {m['val_loss']:.4g}"
    for name, label in (("test_rmse", "RMSE"), ("test_accuracy", "accuracy")):
        if name in m:
            text += f", test {label} {m[name]:.4g}"
            base = m.get(name.replace("test_", "test_baseline_"))
            text += f" vs linear {base:.4g}" if base is not None else ""
            break
    failed = sum(r["status"] == "FAILED" for r in rows)
    return text + (f" ({failed} FAILED)" if failed else "")


@dataclass
class SweepHandle:
    """The parent run of a multirun, opened by the sweeper before it launches the jobs.

    Attributes:
      sweep_id: tags every run of the sweep.
      parent_run_id: the parent run, or None when the store could not be opened (the
        jobs then report the store's error themselves).
    """

    sweep_id: str
    parent_run_id: str | None
    num_groups: int = 1
    _client: object = None
    _experiment_id: str | None = None

    def close(self, returns: list) -> None:
        """Summarise the children and end the parent: FINISHED, or FAILED when a job failed.

        Args:
          returns: the launcher's ``JobReturn`` list (``return_value`` is the job's exit
            code, or the job raised).
        """
        if self.parent_run_id is None:
            return
        failed = 0
        for ret in returns:
            try:
                failed += bool(ret.return_value)
            except Exception:  # the job raised: JobReturn re-raises it on access
                failed += 1
        try:
            if failed:  # a FAILED run says why (the children hold each member's error)
                MlflowTracker(self._client, self.parent_run_id).set_tags(
                    {"error": f"{failed} of {len(returns)} jobs of the sweep failed; each "
                              "failed member's run has its error"})
            summarize_parent(self._client, self._experiment_id, self.parent_run_id,
                             num_groups=self.num_groups)
        finally:
            self._client.set_terminated(self.parent_run_id, "FAILED" if failed else "FINISHED")


    def abort(self, err: BaseException) -> None:
        """End the parent KILLED (Ctrl-C, SIGTERM) or FAILED (any other error), with the
        error as its tag, summarising what the children recorded so far."""
        if self.parent_run_id is None:
            return
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            MlflowTracker(self._client, self.parent_run_id).set_tags(
                {"error": (str(err) or type(err).__name__)[:4000]})
            summarize_parent(self._client, self._experiment_id, self.parent_run_id,
                             num_groups=self.num_groups)
        except Exception:  # closing must not hide the error that stopped the sweep
            pass
        finally:
            self._client.set_terminated(self.parent_run_id, status)


def open_sweep(job_config: DictConfig, *, arguments: list[str], num_points: int,
               num_groups: int) -> SweepHandle:
    """Open the parent run of a multirun in the store of ``job_config`` (a composed job
    config with its ``hydra`` node), tagged with the command and the counts."""
    sweep_id = new_sweep_id()
    tracking = job_config.tracking
    launch_dir = Path(OmegaConf.select(job_config, "hydra.runtime.cwd") or os.getcwd())
    experiment = (tracking.experiment_name
                  or OmegaConf.select(job_config, "hydra.runtime.choices.experiment")
                  or "default")
    try:
        store = resolve_store(tracking.uri, launch_dir)
        client = open_store(store)
        experiment_id = get_or_create_experiment(
            client, store, experiment, description=record.experiment_description(
                OmegaConf.select(job_config, "hydra.runtime.choices.experiment") or experiment))
    except Exception:  # each job reports the store's error with its own message
        return SweepHandle(sweep_id, None)
    tags = {**environment_tags(), **_identity(), "sweep_id": sweep_id,
            "command": " ".join(["python -m trainer", *arguments]),
            "population.role": "parent", "tracking_uri": store.tracking_uri,
            "launch_dir": str(launch_dir), "sweep.points": str(num_points),
            "sweep.groups": str(num_groups)}
    run = client.create_run(experiment_id,
                            run_name=f"sweep-{num_points}-points-{experiment}-{sweep_id[-4:]}",
                            tags=tags)
    return SweepHandle(sweep_id, run.info.run_id, num_groups, client, experiment_id)
