"""The Optuna study of a search: where it lives, opening it, seeding its sampler per
batch, and the trials of processes that died (see ``trainer.search``)."""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from ..config import ConfigError

__all__ = ["study_storage", "open_study", "reseed", "fail_dead_trials", "retry", "counted",
           "lock", "trial_state", "best_trial", "worker_identity", "MAX_RETRIES"]

MAX_RETRIES = 3        # asks of one point whose processes died, before it is left FAIL


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
    it asked before; asks are serialised by ``lock(storage, "ask")`` for a journal file.
    With an RDB storage (workers on several hosts, no shared lock) the worker's host and
    pid are mixed in, so workers never draw alike."""
    if search.sampler.name == "qmc":  # its sequence goes on from the study's trials already
        return
    seed = search.sampler.seed
    if seed is not None:
        seed += len(study.get_trials(deepcopy=False))
        if "://" in storage:
            import zlib

            seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
        seed %= 2**32
    study.sampler = _sampler(search.sampler, seed=seed)


def _sampler(s, *, seed: int | None):
    import optuna

    with warnings.catch_warnings():  # TPE's constant_liar and QMC are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=s.constant_liar,
                                              n_startup_trials=s.n_startup_trials)
        if s.name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def worker_identity() -> dict[str, Any]:
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
        retry(study, t.number)
        failed.append(t.number)
    return failed


def retry(study, number: int) -> None:
    import optuna

    with warnings.catch_warnings():  # the callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(
            study, study.get_trials(deepcopy=False)[number])


def counted(study) -> int:
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


def lock(storage: str, what: str):
    """A file lock beside a journal file (parallel workers on one file system): ``parent``
    (find or open the parent run), ``ask`` (reseed and ask a batch); none for an RDB
    storage, whose workers may be on several hosts."""
    if "://" in storage:
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{storage}.{what}.lock", timeout=120)


def trial_state(study, number: int):
    return study.get_trials(deepcopy=False)[number].state


def best_trial(study):
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if done else None
