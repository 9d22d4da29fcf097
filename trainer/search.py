"""Hyperparameter search: Optuna asks a batch of trials, populations train them, Optuna
is told each one's validation value.

``python -m trainer +experiment=diabetes +search=lr_wd`` runs the search that
``conf/search/lr_wd.yaml`` describes (``config.SearchConfig``). Optuna (ask-and-tell
interface, https://optuna.readthedocs.io/en/stable/tutorial/20_recipes/009_ask_and_tell.html)
proposes ``search.trials_per_batch`` trials at once; the trials whose points differ only in
``config.VMAPPABLE_KEYS`` train as ONE population (one compiled program,
``sweep.run_population_job``), and a structural key in the space (``model.hidden``)
splits a batch into one population per value asked. Each trial is a child run of the
search's parent run, with the value told to Optuna as its metric ``search/value``.

How the batch interacts with the sampler: the trials of a batch are asked before any of
them is told, so the sampler sees the batch's earlier trials as RUNNING. TPE with
``constant_liar`` (the default here) counts them as poor results, which spreads the
batch out; without it a batch's trials crowd around the same point. TPE's first
``n_startup_trials`` are random either way, so a batch of 8 with 8 start-up trials spends
its whole first batch exploring.

The study persists in Optuna's storage: by default a journal file (``JournalStorage``
with ``JournalFileBackend``, which Optuna advises for several processes on one file
system) at ``<store folder>/optuna/<study>.journal`` beside the MLflow database, or the
RDB URL in ``search.storage`` (PostgreSQL for workers on several hosts). Relaunching the
same command continues the study; several processes launched with it share it. A trial
left RUNNING by a process that died (its host and process id, recorded with the trial,
name no live process; or, for another host, ``search.stale_after_s`` passed) is marked
FAIL and asked again with the same point (``RetryHeartbeatStaleTrialCallback``, at most
``MAX_RETRIES`` times); its MLflow run is ended KILLED.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import VMAPPABLE_KEYS, ConfigError, member_configs, to_config

__all__ = ["Space", "make_space", "check_search", "study_storage", "open_study",
           "fail_dead_trials", "run_search", "SearchOutcome", "METRICS", "SAMPLERS"]

METRICS = ("val_loss", "min_val_loss")
SAMPLERS = ("tpe", "random", "qmc")
PARAM_TYPES = ("float", "int", "categorical")
IMPORTANCE_MIN_TRIALS = 10  # Optuna's default evaluator (PED-ANOVA in 5.1) compares the best
                            # 10% with the rest: fewer trials give equal importances
MAX_RETRIES = 3        # asks of one point whose processes died, before it is left FAIL
TRIAL_TAG = "search.trial"
STUDY_TAG = "search.study"
VALUE_METRIC = "search/value"
BEST_METRIC = "search/best_value"


# --- the space ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Space:
    """The searched keys and their Optuna distributions.

    Attributes:
      distributions: ``{dotted config key: optuna distribution}``, in the space's order.
      encoded: keys of categorical choices that are not scalars (``model.hidden: [[8],
        [16]]``): Optuna stores only scalars, so these choices go to it as JSON text.
    """

    distributions: dict
    encoded: frozenset[str]

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's Optuna params as config values, in the space's order."""
        return {k: json.loads(params[k]) if k in self.encoded else params[k]
                for k in self.distributions}


def make_space(space: dict, cfg: DictConfig | None = None) -> Space:
    """Read ``search.space`` (nested as the config, each leaf a ``SearchParamConfig``).

    Args:
      space: e.g. ``{"optim": {"learning_rate": {"type": "float", "low": 1e-4,
        "high": 0.3, "log": True}}}``.
      cfg: the composed config the search runs: each key must be one of its keys.

    Raises:
      ConfigError: an unknown key, a config group, a bad range, naming the fix.
    """
    import optuna.distributions as od

    from .config import _resolve_key  # the schema's own lookup, with its suggestions

    leaves: dict[str, dict] = {}
    _leaves(space, "", leaves)
    if not leaves:
        raise ConfigError("search.space is empty: give at least one key to search, e.g. "
                          "search.space={optim:{learning_rate:{type:float,low:1e-4,high:0.3,"
                          "log:true}}}")
    distributions, encoded = {}, set()
    for key, p in leaves.items():
        where = f"search.space.{key}"
        if "." not in key:
            raise ConfigError(f"{where}: {key} is a config group; a search varies keys "
                              f"(e.g. {key}.<key>); run one search per {key} option")
        _resolve_key(key)
        if cfg is not None and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            group = key.split(".")[0]
            raise ConfigError(f"{where}: this run's config has no {key} "
                              f"({group}={OmegaConf.select(cfg, group + '.kind', default=None) or OmegaConf.select(cfg, group + '.name', default='?')} "
                              "has no such key); choose the option that has it")
        unknown = set(p) - {"type", "low", "high", "log", "step", "choices"}
        if unknown or p.get("type") not in PARAM_TYPES:
            raise ConfigError(f"{where}: give type (one of {', '.join(PARAM_TYPES)}) and "
                              f"low/high/log/step or choices, got {p}")
        if p["type"] == "categorical":
            choices = p.get("choices")
            if not choices:
                raise ConfigError(f"{where}: a categorical key needs choices: [...]")
            if any(isinstance(c, (list, dict)) for c in choices):
                encoded.add(key)
                choices = [json.dumps(c) for c in choices]
            distributions[key] = od.CategoricalDistribution(choices)
            continue
        low, high, log, step = p.get("low"), p.get("high"), bool(p.get("log")), p.get("step")
        if low is None or high is None or not low <= high:
            raise ConfigError(f"{where}: give low <= high, got low={low} high={high}")
        if log and (low <= 0 or step is not None):
            raise ConfigError(f"{where}: log=true needs low > 0 and no step")
        if p["type"] == "int":
            if low != int(low) or high != int(high):
                raise ConfigError(f"{where}: an int key needs whole low and high")
            distributions[key] = od.IntDistribution(int(low), int(high), log=log,
                                                    step=int(step or 1))
        else:
            distributions[key] = od.FloatDistribution(float(low), float(high), log=log,
                                                      step=step)
    return Space(distributions, frozenset(encoded))


_ABSENT = object()


def _leaves(node: Any, prefix: str, out: dict) -> None:
    if isinstance(node, dict) and "type" in node:
        out[prefix.rstrip(".")] = node
    elif isinstance(node, dict):
        for k, v in node.items():
            _leaves(v, f"{prefix}{k}.", out)
    else:
        raise ConfigError(f"search.space.{prefix.rstrip('.')}={node!r}: each searched key "
                          "is a mapping with type: float, int or categorical")


def check_search(cfg: DictConfig) -> Space:
    """Check ``cfg.search`` against the composed config; returns its ``Space``.

    Raises:
      ConfigError: naming the key and the fix.
    """
    c = to_config(cfg)
    s = c.search
    if c.population.members:
        raise ConfigError("+search asks its own points; drop population.members")
    if c.resume is not None:
        raise ConfigError("a search resumes by running the same command again; drop resume=")
    if c.mode != "train":
        raise ConfigError("+search needs mode=train")
    if s.metric not in METRICS:
        why = (": a search optimises a validation value; the test split is held out for "
               "the report" if s.metric.startswith("test") else "")
        raise ConfigError(f"search.metric={s.metric!r}{why} (choose one of "
                          f"{', '.join(METRICS)})")
    if s.direction not in ("minimize", "maximize"):
        raise ConfigError(f"search.direction={s.direction!r}: minimize or maximize")
    if s.direction == "maximize":  # every metric offered is a loss
        raise ConfigError(f"search.direction=maximize: search.metric={s.metric} is a loss; "
                          "minimize it (the default)")
    if s.sampler.name not in SAMPLERS:
        raise ConfigError(f"search.sampler.name={s.sampler.name!r}: choose one of "
                          f"{', '.join(SAMPLERS)}")
    for key in ("num_trials", "trials_per_batch"):
        if not getattr(s, key) > 0:
            raise ConfigError(f"search.{key}={getattr(s, key)}: must be greater than 0")
    if s.sampler.n_startup_trials < 0:
        raise ConfigError("search.sampler.n_startup_trials must be >= 0")
    return make_space(OmegaConf.to_container(cfg.search.space, resolve=True), cfg)


# --- the study ---------------------------------------------------------------------------

def study_storage(search, *, study_name: str, store) -> str:
    """Where the study lives: ``search.storage`` (an RDB URL or a journal file path), or
    ``<store folder>/optuna/<study_name>.journal`` (``store.checkpoint_root``'s folder:
    beside a SQLite database, ``<launch dir>/mlruns`` for a remote store)."""
    if search.storage:
        return search.storage
    return str(Path(store.checkpoint_root).parent / "optuna" / f"{study_name}.journal")


def open_study(search, *, study_name: str, storage: str, config_hash: str | None = None):
    """Create the study, or load it when it exists (a relaunch, a parallel worker).

    Args:
      config_hash: the training config the trials start from (``tracking.config_hash`` of
        the config without ``search`` and ``population``), kept with a new study and
        compared on a relaunch: a study's values are comparable only under one metric and
        one training config. The space may change (a range widened, a key added).

    Raises:
      ConfigError: the study exists with another direction, metric or training config.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" in storage:
        backend = optuna.storages.RDBStorage(storage)
    else:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage))
    study = optuna.create_study(study_name=study_name, storage=backend,
                                sampler=_sampler(search.sampler, seed=search.sampler.seed),
                                direction=search.direction,
                                load_if_exists=True)
    if study.direction.name.lower() != search.direction:
        raise ConfigError(f"study {study_name!r} in {storage} was created to "
                          f"{study.direction.name.lower()}; search.direction="
                          f"{search.direction} needs another search.study_name")
    made = study.user_attrs
    if not made:  # a new study: what its values mean
        study.set_user_attr("metric", search.metric)
        study.set_user_attr("config_hash", config_hash)
    elif made.get("metric") != search.metric or made.get("config_hash") != config_hash:
        what = (f"search.metric={made.get('metric')}" if made.get("metric") != search.metric
                else "another training config (a key outside search.* changed)")
        raise ConfigError(f"study {study_name!r} in {storage} holds values of {what}; its "
                          "trials would not compare with these: give a new search.study_name "
                          "(or restore the study's settings to continue it)")
    return study


def reseed(study, search, *, storage: str) -> None:
    """Give the study a sampler seeded for its next batch: ``sampler.seed`` plus the
    number of trials already asked. Optuna keeps no sampler state in the storage, so a
    sampler seeded once per process would ask a relaunch, or a second worker, the points
    it asked before; asks are serialised by ``_ask_lock`` for a journal file. With an RDB
    storage (workers on several hosts, no shared lock) the worker's host and pid are
    mixed in, so workers never draw alike."""
    seed = search.sampler.seed
    if search.sampler.name == "qmc":  # its sequence goes on from the study's trials already
        return
    if seed is not None:
        seed += len(study.get_trials(deepcopy=False))
        if "://" in storage:
            import zlib

            seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
        seed %= 2**32
    study.sampler = _sampler(search.sampler, seed=seed)


def _sampler(s, *, seed: int | None):
    import optuna

    if s.name == "tpe":
        with warnings.catch_warnings():  # constant_liar is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=s.constant_liar,
                                              n_startup_trials=s.n_startup_trials)
    if s.name == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _worker() -> dict[str, Any]:
    """This process, as a trial records its owner: host, pid and the pid's start time
    (a pid reused by a later process is not this one)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def fail_dead_trials(study, *, stale_after_s: float | None) -> list[int]:
    """Mark FAIL the RUNNING trials whose process died, and queue each point again.

    A trial of this host is dead when no process has its recorded pid and start time;
    one of another host when ``stale_after_s`` seconds passed since it started (None:
    never judged from here). Each is asked again with the same point (Optuna's
    ``RetryHeartbeatStaleTrialCallback``, at most ``MAX_RETRIES`` times).

    Returns:
      the numbers of the trials marked FAIL.
    """
    import datetime

    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    now = datetime.datetime.now()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        if w.get("host") == host:
            dead = _start_time(int(w["pid"])) != w.get("started")
        else:
            dead = (stale_after_s is not None and t.datetime_start is not None
                    and (now - t.datetime_start).total_seconds() > stale_after_s)
        if not dead:
            continue
        optuna.trial.Trial(study, t._trial_id).set_user_attr(
            "failure", f"process {w.get('pid')} on {w.get('host')} stopped before the trial "
                       "was told")
        study.tell(t.number, state=TrialState.FAIL)
        _retry(study, t.number)
        failed.append(t.number)
    return failed


def _retry(study, number: int) -> None:
    import optuna

    with warnings.catch_warnings():  # the callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(
            study, study.get_trials(deepcopy=False)[number])


def _counted(study) -> int:
    """Trials that count towards ``num_trials``: COMPLETE, those that failed for their
    point (diverged, or an error), and those still RUNNING (here or in another worker)."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            n += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get("counts", False):
            n += 1
    return n


# --- one batch ---------------------------------------------------------------------------

def group_trials(points: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """Split a batch's points into populations: ``[(structural values, [indices])]``, in
    the order their first point appears; points with equal structural values (keys
    outside ``VMAPPABLE_KEYS``) share one program."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for i, point in enumerate(points):
        structural = {k: v for k, v in point.items() if k not in VMAPPABLE_KEYS}
        groups.setdefault(json.dumps(structural, sort_keys=True), (structural, []))[1].append(i)
    return list(groups.values())


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


# --- the search --------------------------------------------------------------------------

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

    from .config import validate
    from .data import load_member_datasets
    from .sweep import run_population_job, summarize_parent
    from .tracking import resume_run, start_run

    s = to_config(cfg).search
    study_name = s.study_name or f"{experiment_name}-{search_option}"
    storage = study_storage(s, study_name=study_name, store=store)
    from .tracking import config_hash

    training = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                if k not in ("search", "population", "tracking", "resume")}
    study = open_study(s, study_name=study_name, storage=storage,
                       config_hash=config_hash(training))
    dead = fail_dead_trials(study, stale_after_s=s.stale_after_s)
    if dead:
        console.print(f"trials {', '.join(map(str, dead))} of study {study_name!r} were left "
                      "RUNNING by a process that stopped: marked FAIL, asked again")
    search_tags = {STUDY_TAG: study_name, "search.storage": storage}
    # workers started together on one journal open one parent: the first creates it
    with _lock(storage, "parent"):
        parent = _find_parent(client, experiment_id, study_name)
        if parent is None:
            opened = start_run(client, experiment_id,
                               run_name=f"search-{study_name}-{time.strftime('%m%d-%H%M')}",
                               tags={**tags, **search_tags, "population.role": "parent",
                                     "sweep_id": study_name})
        else:
            opened = resume_run(client, parent,
                                tags={"resumed.overrides": tags.get("overrides", "")})
        tracker = opened.__enter__()
    told = failed = 0
    with contextlib.ExitStack() as stack:
        stack.push(opened)  # its __exit__ ends the parent as the with-block would
        parent_id = tracker.run_id
        if parent is None:
            from .config import logged_config
            from .tracking import flatten_config

            resolved = logged_config(OmegaConf.to_container(cfg, resolve=True))
            resolved.pop("population", None)
            resolved["search"]["space"] = json.dumps(resolved["search"]["space"])
            tracker.log_params(flatten_config(resolved))
            tracker.log_text(OmegaConf.to_yaml(cfg), "config.yaml")
        _close_dead_runs(client, experiment_id, parent_id, dead)
        console.print(f"search {study_name!r}: parent run {parent_id}; study in {storage}")
        base = cfg.copy()
        with _writable(base):
            base.search = None
            base.population.parent_run_id = parent_id
            base.population.sweep_id = study_name
            base.population.rerun = True  # each trial is its own run, even at a seen point
        while _counted(study) < s.num_trials:
            trials = []
            with _lock(storage, "ask"):
                reseed(study, s, storage=storage)
                # counted again before each ask: a worker beside this one may have asked
                while len(trials) < s.trials_per_batch and (
                        not trials or _counted(study) < s.num_trials):
                    trials.append(study.ask(space.distributions))
                worker = _worker()
                for t in trials:
                    t.set_user_attr("worker", worker)
            points = [space.decode(t.params) for t in trials]
            first, last = trials[0].number, trials[-1].number
            console.print(f"trials {first}-{last}: {len(group_trials(points))} population(s)")
            try:
                for structural, idx in group_trials(points):
                    job = base.copy()
                    with _writable(job):
                        for key, value in structural.items():
                            OmegaConf.update(job, key, value, merge=False)
                        job.population.members = [
                            {k: v for k, v in points[i].items() if k in VMAPPABLE_KEYS}
                            for i in idx]
                    validate(job)
                    members = member_configs(job)
                    datasets = load_member_datasets([to_config(m) for _, m in members],
                                                    launch_dir)
                    results = run_population_job(
                        client, store, experiment_id, experiment_name, job, members, datasets,
                        tags=tags, console=console, err_console=err_console,
                        member_tags=[{TRIAL_TAG: str(trials[i].number), STUDY_TAG: study_name}
                                     for i in idx])
                    runs = _trial_runs(client, experiment_id, parent_id)
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
                    runs = _trial_runs(client, experiment_id, parent_id)
                for t in trials:
                    if _state(study, t.number) == TrialState.RUNNING:
                        t.set_user_attr("mlflow_run_id", runs.get(t.number))
                        t.set_user_attr("failure", "stopped (Ctrl-C or SIGTERM)")
                        study.tell(t, state=TrialState.FAIL)
                        _retry(study, t.number)
                with contextlib.suppress(Exception):
                    summarize(client, experiment_id, parent_id, study, metric=s.metric)
                raise
            except BaseException:
                for t in trials:
                    if _state(study, t.number) == TrialState.RUNNING:
                        t.set_user_attr("failure", "error")
                        t.set_user_attr("counts", True)
                        study.tell(t, state=TrialState.FAIL)
                raise
            best = _best(study)
            if best is not None:  # the parent's curve of the best value as trials complete
                complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
                client.log_metric(parent_id, BEST_METRIC, best.value, step=complete)
                console.print(f"  best so far: {best.value:.6g} (trial {best.number})")
        summarize_parent(client, experiment_id, parent_id, num_groups=1)
        summary = summarize(client, experiment_id, parent_id, study, metric=s.metric)
    best = _best(study)
    return SearchOutcome(
        study_name=study_name, storage=storage, parent_run_id=parent_id, told=told,
        failed=failed, best_value=best.value if best else None,
        best_params=space.decode(best.params) if best else {},
        best_run_id=summary.get("search.best_run_id"), num_trials=len(study.trials),
        num_complete=len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))


def _lock(storage: str, what: str):
    """A file lock beside a journal file (parallel workers on one file system): ``parent``
    (find or open the parent run), ``ask`` (reseed and ask a batch); none for an RDB
    storage, whose workers may be on several hosts."""
    if "://" in storage:
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{storage}.{what}.lock", timeout=120)


def _writable(cfg: DictConfig):
    from omegaconf import open_dict

    return open_dict(cfg)


def _state(study, number: int):
    return study.get_trials(deepcopy=False)[number].state


def _best(study):
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if done else None


def _find_parent(client, experiment_id: str, study_name: str) -> str | None:
    """The parent run of the study in this experiment (the newest), or None."""
    runs = client.search_runs([experiment_id], max_results=1, order_by=["start_time DESC"],
                              filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and "
                                            "tags.`population.role` = 'parent'")
    return runs[0].info.run_id if runs else None


def _trial_runs(client, experiment_id: str, parent_id: str) -> dict[int, str]:
    """``{trial number: run id}`` of the parent's children (the newest run of a number)."""
    from .tracking import child_runs

    return {int(r.data.tags[TRIAL_TAG]): r.info.run_id
            for r in child_runs(client, experiment_id, parent_id) if TRIAL_TAG in r.data.tags}


def _close_dead_runs(client, experiment_id: str, parent_id: str, numbers: list[int]) -> None:
    """End KILLED the runs of trials whose process died (MLflow left them RUNNING)."""
    if not numbers:
        return
    from .tracking import MlflowTracker, child_runs

    for run in child_runs(client, experiment_id, parent_id):
        if run.info.status == "RUNNING" and run.data.tags.get(TRIAL_TAG) in map(str, numbers):
            MlflowTracker(client, run.info.run_id).set_tags(
                {"killed_reason": "its process stopped before the end (the search asked "
                                  "its trial again)"})
            client.set_terminated(run.info.run_id, "KILLED")


def summarize(client, experiment_id: str, parent_id: str, study, *,
              metric: str = "val_loss") -> dict[str, str]:
    """Write the study's state on its parent run; returns the tags set.

    Tags ``search.best_trial``, ``search.best_run_id``, ``search.best.<key>`` (its
    params), ``search.trials`` (counts by state); metric ``search/best_value`` at step
    = completed trials (a curve of the best value as the study went on); artifacts
    ``optuna/optimization_history.png`` and, with 2+ searched keys and
    ``IMPORTANCE_MIN_TRIALS`` completed trials, ``optuna/param_importances.png`` (Optuna's
    own matplotlib plots; its default importance evaluator).
    """
    import collections

    import optuna
    from optuna.trial import TrialState

    from .tracking import MlflowTracker

    trials = study.get_trials(deepcopy=False)
    counts = collections.Counter(t.state.name for t in trials)
    tags = {"search.trials": ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))}
    best = _best(study)
    complete = counts.get("COMPLETE", 0)
    if best is not None:
        tags.update({"search.best_trial": str(best.number),
                     "search.best_run_id": str(best.user_attrs.get("mlflow_run_id")),
                     **{f"search.best.{k}": str(v) for k, v in best.params.items()}})
        client.log_metric(parent_id, BEST_METRIC, best.value, step=complete)
    MlflowTracker(client, parent_id).set_tags(tags)
    if complete == 0:
        return tags
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory(prefix="trainer-search-") as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        folder = Path(tmp)
        plots = [("optimization_history.png",
                  optuna.visualization.matplotlib.plot_optimization_history)]
        if complete >= IMPORTANCE_MIN_TRIALS and len(best.params) >= 2:
            plots.append(("param_importances.png",
                          optuna.visualization.matplotlib.plot_param_importances))
        for name, plot in plots:
            ax = plot(study)
            if name == "optimization_history.png":  # "Objective Value" says nothing
                ax.set_ylabel(f"{metric} (told to Optuna)")
            ax.figure.set_size_inches(7, 4.5)
            # Optuna draws the legend outside the axes: keep it in the file
            ax.figure.savefig(folder / name, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            client.log_artifact(parent_id, str(folder / name), "optuna")
    return tags
