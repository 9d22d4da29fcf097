"""The search loop: ask a batch, train it as populations, tell each trial its value."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ..config import VMAPPABLE_KEYS, member_configs, to_config
from .record import (BEST_METRIC, STUDY_TAG, TRIAL_TAG, VALUE_METRIC, close_dead_runs,
                     find_parent, summarize, trial_runs)
from .space import Space, group_trials
from .study import (best_trial, counted, fail_dead_trials, lock, open_study, reseed, retry,
                    study_storage, trial_state, worker_identity)

__all__ = ["run_search", "SearchOutcome", "objective_value"]


def objective_value(result, metric: str) -> float | None:
    """The value told to Optuna for a trained member, or None when it diverged.

    ``val_loss``: the last validation loss (with early stopping, that of the model kept,
    ``best_val_loss``); ``min_val_loss``: the lowest on the validation curve."""
    if result.failed_step is not None:
        return None
    steps, values = result.history.get("val_loss", ([], []))
    if metric == "min_val_loss":
        finite = [v for v in values if math.isfinite(v)]
        value = min(finite) if finite else None
    else:
        value = result.best_val_loss if result.best_val_loss is not None else (
            values[-1] if values else None)
    return value if value is not None and math.isfinite(value) else None


@dataclass
class SearchOutcome:
    """What a search process did: its study, the parent run, the trials it told."""

    study_name: str
    storage: str
    parent_run_id: str
    told: int
    failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_run_id: str | None
    num_trials: int
    num_complete: int


def run_search(client, store, experiment_id: str, experiment_name: str, cfg: DictConfig, *,
               space: Space, search_option: str, tags: dict[str, str], launch_dir: Path,
               console, err_console) -> SearchOutcome:
    """Run (or continue) the search of ``cfg.search`` until ``num_trials`` are counted.

    Each batch: ask ``trials_per_batch`` trials (fewer for the last), train them as one
    population per structural group (``sweep.run_population_job``, children of the
    search's parent run), tell each its value (``objective_value``), or FAIL for a member
    that diverged. The parent then summarises the study (``summarize``).

    Raises:
      KeyboardInterrupt: Ctrl-C or SIGTERM; the trials in flight are told FAIL and asked
        again by the next launch; the parent ends KILLED.
      what ``sweep.run_population_job`` raises, after the batch's trials are told FAIL.
    """
    from optuna.trial import TrialState

    from ..config import validate
    from ..data import load_member_datasets
    from ..sweep import run_population_job, summarize_parent
    from ..tracking import config_hash, resume_run, start_run

    s = to_config(cfg).search
    study_name = s.study_name or f"{experiment_name}-{search_option}"
    storage = study_storage(s, study_name=study_name, store=store)
    training = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                if k not in ("search", "population", "tracking", "resume")}
    study = open_study(s, study_name=study_name, storage=storage,
                       config_hash=config_hash(training))
    dead = fail_dead_trials(study, stale_after_s=s.stale_after_s)
    if dead:
        console.print(f"trials {', '.join(map(str, dead))} of study {study_name!r} were left "
                      "RUNNING by a process that stopped: marked FAIL, asked again")
    search_tags = {STUDY_TAG: study_name, "search.storage": storage}
    told = failed = 0
    splits: dict[str, Any] = {}  # _data_key -> data.Dataset
    with contextlib.ExitStack() as stack:
        # workers started together on one journal open one parent: the first creates it
        with lock(storage, "parent"):
            parent = find_parent(client, experiment_id, study_name)
            tracker = stack.enter_context(start_run(
                client, experiment_id,
                run_name=f"search-{study_name}-{time.strftime('%m%d-%H%M')}",
                tags={**tags, **search_tags, "population.role": "parent",
                      "sweep_id": study_name}) if parent is None else resume_run(
                client, parent, tags={"resumed.overrides": tags.get("overrides", "")}))
        parent_id = tracker.run_id
        if parent is None:
            from ..config import logged_config
            from ..tracking import flatten_config

            resolved = logged_config(OmegaConf.to_container(cfg, resolve=True))
            resolved.pop("population", None)
            resolved["search"]["space"] = json.dumps(resolved["search"]["space"])
            tracker.log_params(flatten_config(resolved))
            tracker.log_text(OmegaConf.to_yaml(cfg), "config.yaml")
        close_dead_runs(client, experiment_id, parent_id, dead)
        console.print(f"search {study_name!r}: parent run {parent_id}; study in {storage}")
        base = cfg.copy()
        with open_dict(base):
            base.search = None
            base.population.parent_run_id = parent_id
            base.population.sweep_id = study_name
            base.population.rerun = True  # each trial is its own run, even at a seen point
        while counted(study) < s.num_trials:
            trials = []
            with lock(storage, "ask"):
                reseed(study, s, storage=storage)
                # counted again before each ask: a worker beside this one may have asked
                while len(trials) < s.trials_per_batch and (
                        not trials or counted(study) < s.num_trials):
                    trials.append(study.ask(space.distributions))
                worker = worker_identity()
                for t in trials:
                    t.set_user_attr("worker", worker)
            points = [space.decode(t.params) for t in trials]
            groups = group_trials(points)
            first, last = trials[0].number, trials[-1].number
            console.print(f"trials {first}-{last}: {len(groups)} population(s)")
            try:
                for structural, idx in groups:
                    job = base.copy()
                    with open_dict(job):
                        for key, value in structural.items():
                            OmegaConf.update(job, key, value, merge=False)
                        job.population.members = [
                            {k: v for k, v in points[i].items() if k in VMAPPABLE_KEYS}
                            for i in idx]
                    validate(job)
                    members = member_configs(job)
                    configs = [to_config(m) for _, m in members]
                    # a split depends on the data config and the seed only: load each once
                    # per search, not once per batch
                    keys = [_data_key(c) for c in configs]
                    new = {k: c for k, c in zip(keys, configs) if k not in splits}
                    splits.update(zip(new, load_member_datasets(list(new.values()),
                                                                launch_dir)))
                    datasets = [splits[k] for k in keys]
                    results = run_population_job(
                        client, store, experiment_id, experiment_name, job, members, datasets,
                        tags=tags, console=console, err_console=err_console,
                        member_tags=[{TRIAL_TAG: str(trials[i].number), STUDY_TAG: study_name}
                                     for i in idx])
                    runs = trial_runs(client, experiment_id, parent_id)
                    for i, result in zip(idx, results):
                        trial = trials[i]
                        value = objective_value(result, s.metric)
                        run_id = runs.get(trial.number)
                        trial.set_user_attr("mlflow_run_id", run_id)
                        if trial.user_attrs.get("failure"):  # copied from the trial it retries
                            trial.set_user_attr("retried_after", trial.user_attrs["failure"])
                            trial.set_user_attr("failure", None)
                        if value is None:
                            trial.set_user_attr("failure", "diverged")
                            trial.set_user_attr("counts", True)
                            study.tell(trial, state=TrialState.FAIL)
                            failed += 1
                        else:
                            study.tell(trial, value)
                            if run_id is not None:
                                client.log_metric(run_id, VALUE_METRIC, value, step=0)
                        told += 1
            except KeyboardInterrupt:  # stopped: the points were not judged, ask them again
                runs = {}
                with contextlib.suppress(Exception):  # the KILLED runs, linked from the study
                    runs = trial_runs(client, experiment_id, parent_id)
                for t in trials:
                    if trial_state(study, t.number) == TrialState.RUNNING:
                        t.set_user_attr("mlflow_run_id", runs.get(t.number))
                        t.set_user_attr("failure", "stopped (Ctrl-C or SIGTERM)")
                        study.tell(t, state=TrialState.FAIL)
                        retry(study, t.number)
                with contextlib.suppress(Exception):
                    summarize(client, experiment_id, parent_id, study, metric=s.metric)
                raise
            except BaseException:
                for t in trials:
                    if trial_state(study, t.number) == TrialState.RUNNING:
                        t.set_user_attr("failure", "error")
                        t.set_user_attr("counts", True)
                        study.tell(t, state=TrialState.FAIL)
                raise
            best = best_trial(study)
            if best is not None:  # the parent's curve of the best value, once per batch
                complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
                client.log_metric(parent_id, BEST_METRIC, best.value, step=complete)
                console.print(f"  best so far: {best.value:.6g} (trial {best.number})")
        summarize_parent(client, experiment_id, parent_id, num_groups=1)
        summary = summarize(client, experiment_id, parent_id, study, metric=s.metric)
    best = best_trial(study)
    return SearchOutcome(
        study_name=study_name, storage=storage, parent_run_id=parent_id, told=told,
        failed=failed, best_value=best.value if best else None,
        best_params=space.decode(best.params) if best else {},
        best_run_id=summary.get("search.best_run_id"), num_trials=len(study.trials),
        num_complete=len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))


def _data_key(c) -> str:
    """What a member's split depends on: its data config and its seed."""
    import dataclasses

    return json.dumps([dataclasses.asdict(c.data), c.seed], sort_keys=True, default=str)
