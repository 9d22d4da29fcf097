"""The MLflow record: where the store is, one run per job, and what goes into it.

Only this module talks to MLflow. It uses ``MlflowClient`` with explicit run ids
and never the fluent ``mlflow.start_run`` API, so no "active run" can leak from
one job of a multirun into the next (case C02), and MLflow's exit hook cannot
mark a crashed run FINISHED (case C06).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import names, signals

__all__ = ["Store", "resolve_store", "open_store", "open_store_here", "use_store_process",
           "log_batch", "get_or_create_experiment", "start_run",
           "resume_run", "find_resumable", "metric_histories", "download_checkpoints",
           "MlflowTracker", "Terminated", "raise_terminated", "TrackingError",
           "StoreURIError", "check_store_uri", "check_experiment_name", "artifact_folder",
           "flatten_config", "environment_tags",
           "ui_command", "run_url", "run_op"]

PARAMS_PER_BATCH = 100     # MLflow's limit of params in one log_batch call
PARAM_VALUE_LIMIT = 6000   # characters MLflow keeps of a param value (MAX_PARAM_VAL_LENGTH)
TAG_VALUE_LIMIT = 8000     # ... of a tag value (MAX_TAG_VAL_LENGTH)
CUT_TAG = "params.cut"     # names the params whose stored value was cut (case C23)
METRICS_PER_BATCH = 1000   # MLflow's limit of metrics in one log_batch call
MAX_PENDING_BATCHES = 4    # per run: a loop that logs faster than the store writes waits here,
                           # so the backlog (and the wait at the end, or after Ctrl-C) stays small


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def raise_terminated(signum, frame):
    """SIGTERM handler: remember the stop (``signals.mark_stopping``) and raise
    ``Terminated`` in the main thread, so runs end KILLED and the CLI exits 143; held
    back inside ``signals.blocked()`` and ignored while a stop's clean-up runs."""
    if not signals.first_stop(signum):
        return
    raise Terminated(f"received signal {signal.Signals(signum).name}")


class TrackingError(RuntimeError):
    """The tracking store cannot be opened or written; the message names the URI."""


class StoreFault(TrackingError):
    """The store stopped taking writes while a run was open (disk full, read-only,
    locked past ``busy_wait_s``). The message says what happened, what was kept and
    where, and whether the run could be closed; points the store refused are in a
    spill file that the next job on the store loads (``load_spills``)."""


# A store locked by another process (a sqlite3 shell or a backup holding a write
# transaction) is retried with back-off this long before the job gives up, beyond the
# 20 s that MLflow has SQLite wait in each call (PRAGMA busy_timeout);
# TRAINER_STORE_BUSY_WAIT_S changes it.
STORE_BUSY_WAIT_S = 120.0
SPILL_ENV = "TRAINER_SPILL_DIR"  # where refused points go (default ~/.cache/trainer/spill)

_FAULTS = (  # (kind, what SQLite / the OS says), first match wins
    ("locked", ("database is locked", "database table is locked")),
    ("read-only", ("readonly database", "read-only file system", "read only file system")),
    ("full", ("database or disk is full", "no space left", "file too large",
              "disk quota exceeded")),
    ("half-migrated", ("duplicate column name",)),
    # SQLite says these when it cannot open or write its file or journal: a folder made
    # read-only mid-write, a full disk, a failing disk. fault_message looks at the file
    # to tell which (CI of stop 23: a chmod mid-write read as "disk I/O error", then
    # "unable to open database file" at close, and the job printed a traceback).
    ("unavailable", ("disk i/o error", "unable to open database file")),
)


def store_fault(err: BaseException) -> str | None:
    """What a store error means: ``"locked"``, ``"read-only"``, ``"full"``,
    ``"half-migrated"``, ``"unavailable"`` (SQLite cannot open or write its file; which
    cause, ``fault_message`` finds out), or None for any other error (a bug, a bad
    argument)."""
    text = " ".join(str(err).lower().split())
    for kind, needles in _FAULTS:
        if any(n in text for n in needles):
            return kind
    return None


def busy_wait_s() -> float:
    """Seconds a call waits for a locked store (``STORE_BUSY_WAIT_S``, or the variable)."""
    try:
        return float(os.environ.get("TRAINER_STORE_BUSY_WAIT_S", STORE_BUSY_WAIT_S))
    except ValueError:
        return STORE_BUSY_WAIT_S


def retry_busy(call, *args, **kwargs):
    """``call(*args, **kwargs)``, retried with back-off (0.5 s doubling to 8 s) while the
    store is locked by another process, for up to ``busy_wait_s()`` seconds; then the
    last error is raised. A write that failed on the lock was rolled back, so a retry
    writes it once."""
    deadline = time.monotonic() + busy_wait_s()
    delay = 0.5
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as err:
            left = deadline - time.monotonic()
            if store_fault(err) != "locked" or left <= 0:
                raise
            time.sleep(min(delay, left))
            delay = min(2 * delay, 8.0)


# Below this many free bytes a SQLite store's disk counts as full: SQLite needs room for
# its journal and a page or more, and a near-full disk reports "disk I/O error".
FULL_BELOW_BYTES = 1 << 20


def diagnose_sqlite(db: Path) -> str:
    """Why SQLite cannot open or write ``db``, found by trying what it tries: open the
    file for writing and create a file beside it (its journal). Returns ``"read-only"``
    (permission or a read-only filesystem), ``"full"`` (no space, or less than
    ``FULL_BELOW_BYTES`` free), or ``"unavailable"`` (neither: a disk or filesystem
    error, a file that is gone)."""
    import errno
    import shutil
    import tempfile

    read_only = {errno.EACCES, errno.EPERM, errno.EROFS}
    try:
        if db.exists():  # a store being created is not there yet: its folder tells
            os.close(os.open(db, os.O_WRONLY))  # opening for writing changes nothing
        with tempfile.TemporaryFile(dir=db.parent):
            pass
    except OSError as err:
        if err.errno in read_only:
            return "read-only"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return "full"
        return "unavailable"
    try:
        if shutil.disk_usage(db.parent).free < FULL_BELOW_BYTES:
            return "full"
    except OSError:
        pass
    return "unavailable"


def fault_message(store_uri: str, kind: str | None, err: BaseException) -> str:
    """One line naming the store, what is wrong with it and what to do. For an
    ``"unavailable"`` SQLite store the file is examined (``diagnose_sqlite``) to name
    the cause."""
    where = store_uri
    if store_uri.startswith("sqlite:///"):
        where = str(Path(store_uri[len("sqlite:///"):]))
        if kind == "unavailable":
            kind = diagnose_sqlite(Path(where))
    fix = {"locked": f"it stayed locked by another process for more than {busy_wait_s():.0f} s "
                     "(a sqlite3 shell, a backup or another program holding a write "
                     "transaction); end that program, or raise TRAINER_STORE_BUSY_WAIT_S",
           "read-only": "it became read-only (its file or folder lost write permission, or "
                        "its filesystem was remounted read-only); make it writable again",
           "full": f"its disk is full (or a file size limit was reached); free space "
                   f"(df -h {Path(where).parent})",
           "half-migrated": "its schema is half-migrated (a migration stopped partway, e.g. "
                            "on a full disk)",
           "unavailable": "SQLite cannot open or write its file (a disk or filesystem "
                          "error, or the file was moved); check the disk and that the "
                          "file is there"}.get(kind or "", "")
    detail = " ".join(str(err).split("[SQL:")[0].split())
    found = re.search(r"\((sqlite3\.\w+|psycopg\w*\.\w+)\) (.*)", detail)
    detail = (f"{found[1]}: {found[2]}" if found else detail)[:300]
    return f"the tracking store {where} cannot be written: {fix or detail} ({detail})"


@dataclass(frozen=True)
class Store:
    """Where runs go.

    Attributes:
      tracking_uri: the MLflow tracking URI, always absolute for local stores.
      artifact_root: URI under which new experiments keep artifacts, or None to let
        the tracking server decide.
      lock_path: file lock serialising creation and migration of a local SQLite
        store (case C05), or None for remote stores.
      checkpoint_root: local folder of the runs' checkpoints, one subfolder per run
        id (never by date: a resumed or requeued job finds its own, case C21):
        ``checkpoints/`` beside a SQLite database, ``<launch dir>/mlruns/checkpoints``
        for a remote store.
    """

    tracking_uri: str
    artifact_root: str | None
    lock_path: Path | None
    checkpoint_root: Path | None = None

    @property
    def remote(self) -> bool:
        return self.lock_path is None


def resolve_store(uri: str | None, launch_dir: Path) -> Store:
    """Decide the store from ``tracking.uri``, ``$MLFLOW_TRACKING_URI`` or the default.

    The default is ``sqlite:///<launch_dir>/mlruns/mlflow.db`` with artifacts in
    ``<launch_dir>/mlruns/artifacts`` (cases C01, C04): absolute, so Hydra's
    working-directory changes never move it. A relative ``sqlite:///`` path is
    taken relative to ``launch_dir``.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    check_store_uri(uri, launch_dir)
    if uri is None:
        root = (launch_dir / "mlruns").resolve()
        return Store(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri(),
                     root / ".mlflow.db.lock", root / "checkpoints")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_absolute():
            db = (launch_dir / db).resolve()
        return Store(f"sqlite:///{db}", (db.parent / "artifacts").as_uri(),
                     db.parent / f".{db.name}.lock", db.parent / "checkpoints")
    return Store(uri, None, None, (launch_dir / "mlruns" / "checkpoints").resolve())


class StoreURIError(TrackingError):
    """A tracking URI or experiment name the store cannot take; found before any run."""


# SQLite URIs whose database lives in the process's memory: the job's runs vanish with it.
_IN_MEMORY = ("sqlite://", "sqlite:///:memory:", "sqlite:///")
EXAMPLE_URI = "sqlite:///mlruns/mlflow.db"
# The schemes MLflow's tracking and registry stores take (its own error lists them); a
# database scheme may name its driver, postgresql+psycopg://.
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file",
                 "databricks", "databricks-uc", "uc")
# mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH (tests check they agree), copied so that
# the pre-check does not import MLflow in the job's process (it loads in the store process)
MAX_EXPERIMENT_NAME_LENGTH = 500


def check_store_uri(uri: str | None, launch_dir: Path) -> None:
    """Refuse a tracking URI that cannot keep runs, before anything is opened.

    ``sqlite://`` and ``sqlite:///:memory:`` are in-memory databases (the runs vanish
    when the job ends); ``sqlite:///`` names no file; a ``sqlite:///`` path that is a
    folder, or whose folder cannot be created, makes SQLAlchemy retry for minutes and
    end with dozens of lines. Other schemes are the server's business (``open_store``).

    Raises:
      StoreURIError: naming the URI, the cause and a working example.
    """
    if uri is None:
        return
    scheme = uri.partition(":")[0].partition("+")[0].lower() if ":" in uri else ""
    if scheme not in STORE_SCHEMES:
        raise StoreURIError(f"tracking.uri={uri}: MLflow has no store for {scheme or 'a plain path'!r}"
                            f" (it takes {', '.join(s + '://' for s in STORE_SCHEMES)}); "
                            f"e.g. {EXAMPLE_URI} or http://HOST:PORT of a tracking server")
    if scheme != "sqlite":
        return
    if uri.split("?")[0] in _IN_MEMORY or uri.startswith("sqlite:///:memory:"):
        raise StoreURIError(f"tracking.uri={uri}: an in-memory (or unnamed) SQLite database "
                            f"keeps no run after the job; give a file, e.g. {EXAMPLE_URI}")
    if not uri.startswith("sqlite:///"):
        raise StoreURIError(f"tracking.uri={uri}: a SQLite URI is sqlite:///RELATIVE/PATH.db "
                            f"or sqlite:////ABSOLUTE/PATH.db, e.g. {EXAMPLE_URI}")
    db = Path(uri[len("sqlite:///"):].split("?")[0])
    db = db if db.is_absolute() else launch_dir / db
    if db.is_dir():
        raise StoreURIError(f"tracking.uri={uri}: {db} is a folder; name the database file "
                            f"in it, e.g. sqlite:///{db / 'mlflow.db'}")
    parent = db.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not _can_create_in(parent):
        raise StoreURIError(f"tracking.uri={uri}: cannot create the database's folder "
                            f"{db.parent} ({parent} is not a writable folder); give a "
                            f"writable place, e.g. {EXAMPLE_URI}")


def _can_create_in(folder: Path) -> bool:
    """Whether this process can make a folder in ``folder``: tried, not read off the
    permission bits (root passes ``os.access`` in /proc, where nothing can be made)."""
    import tempfile

    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".trainer-probe-").cleanup()
    except OSError:
        return False
    return True


def check_experiment_name(name: str) -> None:
    """MLflow's limits on an experiment name (``mlflow.utils.validation``), checked
    before any run: at most 500 characters, not empty.

    Raises:
      StoreURIError: naming the limit.
    """
    if not name.strip():
        raise StoreURIError("tracking.experiment_name is empty: give a name, or null for the "
                            "+experiment name")
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise StoreURIError(f"tracking.experiment_name has {len(name)} characters; MLflow "
                            f"takes at most {MAX_EXPERIMENT_NAME_LENGTH}: give a shorter name")


def artifact_folder(name: str) -> str:
    """The folder (one path segment) of experiment ``name``'s artifacts under the store's
    artifact root. A name is a label, not a path: ``../x`` or ``a#b`` must not move the
    artifacts out of the root or cut the URI, so a name that is not plainly safe
    (letters, digits, ``._-``; not starting with a dot) is written with the others
    replaced by ``_`` and a short hash of the name added, which keeps names apart that
    differ only in such characters."""
    import hashlib
    import re

    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}", name):
        return name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100] or "experiment"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


_STORE_PROCESS = None


def use_store_process(process) -> None:
    """Send this process's MLflow calls to ``process`` (a ``store_process.StoreProcess``,
    started by the CLI before it imports JAX), or back in-process with None.

    Explicit, not automatic: the CLI's jobs and the Hydra sweeper (which opens a
    sweep's parent run in the same process) use it; library use and tests keep a
    plain ``MlflowClient``.
    """
    global _STORE_PROCESS
    _STORE_PROCESS = process


def open_store(store: Store):
    """The client of ``store``, opened (``open_store_here``) in the store process when
    one is in use (``use_store_process``), else in this process.

    Returns:
      a ``store_process.RemoteClient`` or an ``mlflow.MlflowClient``.

    Raises:
      TrackingError: the store cannot be opened.
    """
    if _STORE_PROCESS is not None and not _STORE_PROCESS.broken:
        from .store_process import RemoteClient

        client = RemoteClient(_STORE_PROCESS, store)
        client.open()
        return client
    return open_store_here(store)


def open_store_here(store: Store, *, owner_pid: int | None = None):
    """Create, migrate and check the store once, under a file lock for local SQLite.

    Processes that start together on a store that does not exist yet would
    otherwise each run MLflow's schema migrations and crash (case C05). Inside
    the same lock, runs left RUNNING on this host by processes that no longer
    exist (SIGKILL, out of memory) are marked KILLED.

    Args:
      owner_pid: the job's process, whose runs are never marked (default: this one;
        the store process passes its parent's).

    Returns:
      an ``mlflow.MlflowClient`` bound to ``store.tracking_uri``.

    Raises:
      TrackingError: the store cannot be opened.
    """
    from mlflow import MlflowClient

    if store.tracking_uri.startswith(("http://", "https://")):
        _check_reachable(store.tracking_uri)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)  # one-off chatter
    # its migration chatter, and its log of every failed query with the SQL and traceback:
    # the error is raised to us as well, and the job reports it once (issue 13 item 10)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    db = Path(store.tracking_uri[len("sqlite:///"):]) if store.lock_path is not None else None
    try:
        with _store_lock(store):
            if db is not None:
                _create_sqlite_store(db)
            # MLflow's client reads the store's tables as it is made: a locked store
            # fails there first, so it waits like every call after it
            client = retry_busy(MlflowClient, tracking_uri=store.tracking_uri)
            # builds and migrates the store; waits for one locked by another process
            retry_busy(client.search_experiments, max_results=1)
            retry_busy(load_spills, client, store.tracking_uri, owner_pid or os.getpid())
            retry_busy(_mark_dead_runs_killed, client, owner_pid or os.getpid())
    except TrackingError:
        raise
    except Exception as err:  # MLflow raises several types; all mean the same to the user
        kind = store_fault(err)
        if kind == "unavailable" and db is not None:
            # before any run, a file SQLite cannot open is most often a wrong path (a
            # folder, say): the generic message below names tracking.uri
            kind = diagnose_sqlite(db)
        if kind not in (None, "unavailable"):
            raise TrackingError(fault_message(store.tracking_uri, kind, err)
                                + _half_migrated_hint(store, kind)) from None
        raise TrackingError(f"cannot open the tracking store {store.tracking_uri}: "
                            f"{' '.join(str(err).split())[:500]} (set tracking.uri or "
                            "MLFLOW_TRACKING_URI to a working store, e.g. sqlite:///mlruns/mlflow.db)"
                            ) from err
    return client


def _create_sqlite_store(db: Path) -> None:
    """Create a new SQLite store all at once: built and migrated in a temporary file
    beside it, then moved into place, so a full disk or a kill part way leaves no
    half-made store behind (issue 14 item 6: every later job failed on it). An
    existing file of 0 bytes is refused: a store that held runs was truncated, and
    MLflow would silently make a new empty one in its place (issue 14 item 5).

    Raises:
      TrackingError: the file is empty, or the new store cannot be written.
    """
    from mlflow import MlflowClient

    if db.exists():
        if db.stat().st_size == 0:
            raise TrackingError(
                f"the tracking store {db} is an empty file (0 bytes): a store is never "
                "empty, so it was truncated and the runs it held are gone; restore it from a "
                "backup, or delete the file to start a new store there")
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    client = None
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)
        os.replace(tmp, db)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        kind = store_fault(err) if isinstance(err, Exception) else None
        if kind is None:
            raise
        raise TrackingError(f"cannot create the tracking store {db}: "
                            + fault_message(f"sqlite:///{db}", kind, err).split(": ", 1)[1]
                            + "; nothing was left behind") from None
    finally:
        with contextlib.suppress(Exception):  # the temporary file's connections
            client._tracking_client.store.engine.dispose()


def _half_migrated_hint(store: Store, kind: str) -> str:
    """For a half-migrated SQLite store: how many runs it holds, and what to do."""
    if kind != "half-migrated" or store.lock_path is None:
        return ""
    import sqlite3

    db = store.tracking_uri[len("sqlite:///"):]
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            runs = con.execute("select count(*) from runs").fetchone()[0]
    except sqlite3.Error:
        runs = None
    held = "no run" if runs == 0 else f"{runs} runs" if runs else "an unknown number of runs"
    return (f"; it holds {held}: " + ("delete it to start a new store" if runs == 0 else
            "restore it from a backup, or move it aside to start a new store"))


def _store_lock(store: Store) -> contextlib.AbstractContextManager:
    """The inter-process lock of a local SQLite store (creating its folder); none for servers."""
    if store.lock_path is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    store.lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:  # filelock retries a lock file it cannot create until its timeout, silently
        os.close(os.open(store.lock_path, os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError as err:
        raise OSError(f"cannot create the store's lock file {store.lock_path} "
                      f"({err.strerror or err})") from None
    return FileLock(str(store.lock_path), timeout=300)


def _check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when no server answers."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as err:
        raise TrackingError(f"cannot reach the tracking server {uri} ({type(err).__name__}); "
                            "start it, or set tracking.uri / MLFLOW_TRACKING_URI to a working "
                            "store, e.g. sqlite:///mlruns/mlflow.db") from None


def get_or_create_experiment(client, store: Store, name: str, *,
                             description: str | None = None) -> str:
    """The id of experiment ``name``, created with the store's artifact root if new.

    A new experiment (or one without them) gets the tag that opens MLflow's UI in its
    model-training view and, when given, ``description`` (MLflow's description field);
    a description someone wrote in the UI is kept.
    """
    from .record import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, NOTE_TAG

    wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    if description:
        wanted[NOTE_TAG] = description
    with _store_lock(store):
        found = client.get_experiment_by_name(name)
        if found is None:
            location = (f"{store.artifact_root}/{artifact_folder(name)}"
                        if store.artifact_root else None)
            return client.create_experiment(name, artifact_location=location,
                                            tags=wanted)
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        for key, value in wanted.items():
            if key not in found.tags:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def _mark_dead_runs_killed(client, owner_pid: int) -> None:
    """Mark KILLED the RUNNING runs of this host whose process is gone; ``owner_pid`` is
    the job's process (the store process works for it)."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments(max_results=50_000)]
    if not experiments:
        return
    runs = client.search_runs(
        experiments, filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'",
        max_results=50_000)
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get("pid", ""))
        except ValueError:
            continue
        if pid == owner_pid or _alive(pid, tags.get("pid_start")):
            continue
        client.set_tag(run.info.run_id, "killed_reason",
                       f"process {pid} on {host} ended without closing the run "
                       f"(found by process {owner_pid})")
        client.set_terminated(run.info.run_id, "KILLED")


class MlflowTracker:
    """Writes one run. Every value is a plain Python number or string (case C08).

    Metric points are buffered and sent in batches of up to ``METRICS_PER_BATCH``
    at most every ``send_every_s`` seconds, by one writer thread per process
    (``_writer``: plain synchronous ``log_batch`` calls, in order) while training
    goes on (case C09). Each write to a SQLite store costs milliseconds whatever
    its size, so batching by time keeps that cost off the device's critical path.
    ``flush`` sends the rest and waits for all of it. At most
    ``MAX_PENDING_BATCHES`` batches wait for the writer: a loop that logs faster
    than the store can write is held back to the store's pace (its ``log_s`` says
    so) instead of building a backlog that the end of the run would wait for.
    Not MLflow's own
    ``synchronous=False`` queue: its thread polls with a 1 s timeout, and ending a
    run waits for that poll (``set_terminated`` stops the queue), a second lost at
    the end of every run.

    Attributes:
      run_id: the run's id.
      log_s: seconds the calling thread spent in MLflow calls through this tracker
        (queueing, synchronous calls and waiting in ``flush``).
    """

    def __init__(self, client, run_id: str, *, send_every_s: float = 1.0):
        self.client = client
        self.run_id = run_id
        self.send_every_s = send_every_s
        self.log_s = 0.0
        self._buffer: list = []
        self._last_send = time.perf_counter()
        self._pending: list = []
        self.end_status: str | None = None  # set "FAILED" to end the run so without raising
        # what the store took and refused (the writer thread and the caller share these)
        self.points_written = 0
        self.points_spilled = 0
        self.fault: BaseException | None = None  # the first store fault, once seen
        self._fault_raised = False
        self._spill: Spill | None = None
        self._spill_lock = threading.Lock()

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.log_s += time.perf_counter() - t0

    def log_params(self, params: dict[str, str]) -> None:
        """Log params; a value longer than MLflow keeps is cut with a visible mark and its key
        listed in the tag ``params.cut`` (case C23: MLflow would cut it silently; the
        run's ``config.yaml`` artifact has every value whole)."""
        items, cut = [], []
        for key, value in params.items():
            value, was_cut = mark_cut(str(value), PARAM_VALUE_LIMIT)
            items.append((key, value))
            if was_cut:
                cut.append(key)
        with self._timed():
            for i in range(0, len(items), PARAMS_PER_BATCH):
                log_batch(self.client, self.run_id, params=items[i:i + PARAMS_PER_BATCH])
        if cut:
            self.set_tags({CUT_TAG: ", ".join(cut)})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags; an over-long value is cut with a visible mark (``mark_cut``)."""
        with self._timed():
            log_batch(self.client, self.run_id,
                      tags=[(k, mark_cut(str(v), TAG_VALUE_LIMIT)[0]) for k, v in tags.items()])

    def log_metrics(self, points: Iterable[tuple[str, float, int]]) -> int:
        """Log ``(name, value, step)`` points in batches; drop non-finite values (case C07).

        MLflow would store +inf as 1.797e308, which charts show as a huge finite
        loss, so such points are left out; the caller records the divergence.

        Returns:
          the number of points dropped for being NaN or infinite.
        """
        now = int(time.time() * 1000)
        dropped = 0
        for name, value, step in points:
            value = float(value)
            if not math.isfinite(value):
                dropped += 1
                continue
            self._buffer.append((name, value, now, int(step)))
        if (len(self._buffer) >= METRICS_PER_BATCH
                or time.perf_counter() - self._last_send >= self.send_every_s):
            self._send()
        return dropped

    def _send(self, *, raise_fault: bool = True) -> None:
        with self._timed():
            buffer, self._buffer = self._buffer, []
            for i in range(0, len(buffer), METRICS_PER_BATCH):
                self._pending.append(_writer().submit(
                    self._write_points, buffer[i:i + METRICS_PER_BATCH]))
            self._last_send = time.perf_counter()
            # Back-pressure: when the writer falls behind, wait for the oldest batches.
            while len(self._pending) > MAX_PENDING_BATCHES:
                self._pending.pop(0).result()
            # Settle finished batches now (raising a failed write's error) so the list
            # stays short on long runs.
            still = []
            for future in self._pending:
                if future.done():
                    future.result()
                else:
                    still.append(future)
            self._pending = still
        if raise_fault:
            self._raise_fault()

    def _write_points(self, points: list) -> None:
        """Write one batch (in the writer thread). Points the store refuses (a store
        fault, ``store_fault``) go to the run's spill file instead, and every later
        batch with them: never dropped (issue 14 item 1)."""
        if self.fault is None:
            try:
                log_batch(self.client, self.run_id, metrics=points)
                self.points_written += len(points)
                return
            except Exception as err:
                if store_fault(err) is None:
                    raise
                self.fault = err
        self.spill(points)

    def spill(self, points: list = (), **end) -> None:
        """Append points (and, with ``end=``/``error=``, how the run should end) to the
        run's spill file; counted in ``points_spilled``."""
        with self._spill_lock:
            if self._spill is None:
                self._spill = Spill(self.client_uri(), self.run_id)
            self._spill.write(list(points), **end)
            self.points_spilled += len(points)

    def client_uri(self) -> str:
        """The tracking URI of the tracker's client (a ``RemoteClient`` or ``MlflowClient``)."""
        if hasattr(self.client, "log_batch_plain"):
            return self.client._store.tracking_uri
        return self.client._tracking_client.tracking_uri

    def _raise_fault(self) -> None:
        """Raise the first store fault once, in the caller's thread (the loop stops;
        ``_closing`` writes what it can and says what was kept)."""
        if self.fault is not None and not self._fault_raised:
            self._fault_raised = True
            raise StoreFault(str(self.fault)) from self.fault

    def fault_report(self, store_uri: str, *, closed: str | None) -> str:
        """The one message for the user after a store fault: the cause and fix, the
        points kept in the store and in the spill file, and how the run ended (``closed``:
        its status, or None when the store took no status: the next job closes it)."""
        err = self.fault
        text = fault_message(store_uri, store_fault(err), err)
        kept = f"{self.points_written} metric points of run {self.run_id} were written and stay"
        if self.points_spilled:
            where = self._spill.path if self._spill and self._spill.path else "nowhere"
            kept += (f"; {self.points_spilled} later points were saved to {where}, which the "
                     "next job on this store loads into the run")
        end = (f"the run ended {closed}" if closed else
               "the run stays RUNNING in the store for now: the next job on this store "
               "(once it can be written) ends it FAILED")
        return f"{text}. {kept}; {end}"

    def flush(self) -> None:
        """Send buffered points and wait until every batch is written; raise the first
        failure (a store fault once: ``StoreFault``, the points then spilled)."""
        self._send(raise_fault=False)
        with self._timed():
            pending, self._pending = self._pending, []
            first = None
            for future in pending:  # every batch settles, so none is lost behind a failure
                try:
                    future.result()
                except Exception as err:
                    first = first or err
            if first is not None:
                raise first
        self._raise_fault()

    def log_model(self, bundle: Path, *, registered_model_name: str | None = None) -> None:
        """Log the run's MLflow model from a ``mlflow_model.write_bundle`` file, in the
        writer thread while the caller goes on; ``flush`` waits for it (the file must
        exist until then) and raises its error. The run gets the tag ``model_uri``."""
        with self._timed():
            self._pending.append(_writer().submit(
                run_op, self.client, "log_model", self.run_id, str(bundle),
                registered_model_name=registered_model_name))

    def log_datasets(self, inputs: dict) -> None:
        """Record the splits as the run's MLflow dataset inputs (``mlflow_model.dataset_inputs``),
        in the writer thread."""
        with self._timed():
            self._pending.append(_writer().submit(run_op, self.client, "log_datasets",
                                                  self.run_id, inputs))

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        with self._timed():
            if Path(local_path).is_dir():
                self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._timed():
            self.client.log_text(self.run_id, text, artifact_file)


def spill_dirs() -> list[Path]:
    """Where spill files go, in order of preference: ``$TRAINER_SPILL_DIR`` (else
    ``$XDG_CACHE_HOME/trainer/spill``, ``~/.cache/trainer/spill``), then the system's
    temporary folder (when the first cannot be written, e.g. the same full disk)."""
    import tempfile

    first = os.environ.get(SPILL_ENV)
    if not first:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        first = Path(cache) / "trainer" / "spill"
    return [Path(first), Path(tempfile.gettempdir()) / "trainer-spill"]


class Spill:
    """A run's metric points that its store refused, as JSON lines: a header naming the
    store, the run and the process, then ``{"points": [[key, value, timestamp_ms,
    step], ...]}`` lines and an optional ``{"end": status, "error": message}``.

    Attributes:
      path: the file, or None when no spill folder could be written (the points are
        then lost, and the user is told).
    """

    def __init__(self, tracking_uri: str, run_id: str):
        import json

        self.path: Path | None = None
        header = json.dumps({"tracking_uri": tracking_uri, "run_id": run_id, **_identity()})
        for folder in spill_dirs():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{run_id}-{os.getpid()}.jsonl"
                with open(path, "a") as f:
                    f.write(header + "\n")
                self.path = path
                return
            except OSError:
                continue

    def write(self, points: list, **end) -> None:
        import json

        if self.path is None:
            return
        with open(self.path, "a") as f:
            if points:
                f.write(json.dumps({"points": [list(p) for p in points]}) + "\n")
            if end:
                f.write(json.dumps(end) + "\n")
            f.flush()
            os.fsync(f.fileno())


def load_spills(client, tracking_uri: str, owner_pid: int) -> int:
    """Load the spill files of this store whose process has ended (``Spill``) into their
    runs, end a run still RUNNING with the status the spill names (FAILED by default)
    and delete the file. Called when a job opens the store (``open_store_here``).

    Returns:
      the number of points loaded.
    """
    import json

    loaded = 0
    for folder in spill_dirs():
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            lines = []
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line cut by a crash
                    lines.append(json.loads(line))
            if not lines or lines[0].get("tracking_uri") != tracking_uri:
                continue
            header = lines[0]
            pid = int(header.get("pid", "0"))
            # only this host's: whether another host's process still runs cannot be told
            if header.get("host") != socket.gethostname() or pid == owner_pid or _alive(
                    pid, header.get("pid_start")):
                continue
            run_id = header["run_id"]
            points = [tuple(p) for line in lines for p in line.get("points", [])]
            for i in range(0, len(points), METRICS_PER_BATCH):
                log_batch(client, run_id, metrics=points[i:i + METRICS_PER_BATCH])
            ends = [line for line in lines if "end" in line]
            end = ends[-1] if ends else {}
            tags = [("spill.loaded", f"{len(points)} points from {path} by process {owner_pid}")]
            if end.get("error"):
                tags.append(("error", str(end["error"])[:4000]))
            log_batch(client, run_id, tags=tags)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, end.get("end") or "FAILED")
            path.unlink()
            loaded += len(points)
    return loaded


def mark_cut(value: str, limit: int) -> tuple[str, bool]:
    """``(value, False)`` when it fits in ``limit`` characters, else its start ending in a
    mark that says it was cut and where the whole value is, and True (case C23)."""
    if len(value) <= limit:
        return value, False
    mark = f" ...[cut: {len(value)} characters; the whole value is in config.yaml]"
    return value[:limit - len(mark)] + mark, True


def log_batch(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """``client.log_batch`` from plain tuples: metrics ``(key, value, timestamp_ms, step)``,
    params and tags ``(key, value)`` (a ``RemoteClient`` sends them as they are, so the
    CLI's process needs no MLflow classes)."""
    if hasattr(client, "log_batch_plain"):
        client.log_batch_plain(run_id, metrics=metrics, params=params, tags=tags)
        return
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(run_id, metrics=[Metric(*m) for m in metrics],
                     params=[Param(*p) for p in params], tags=[RunTag(*t) for t in tags])


def run_op(client, name: str, *args, **kwargs):
    """``store_process.OPS[name]`` with the store's client: in the store process for a
    ``RemoteClient``, else here."""
    if hasattr(client, "run_op"):
        return client.run_op(name, *args, **kwargs)
    from .store_process import run_op as run_here

    return run_here(name, client, *args, **kwargs)


def _identity() -> dict[str, str]:
    """Which process has a run open: the host, the pid and its start time (a reused pid
    is told apart), read by ``_mark_dead_runs_killed``."""
    identity = {"host": socket.gethostname(), "pid": str(os.getpid())}
    start = _process_start(os.getpid())
    if start is not None:
        identity["pid_start"] = start
    return identity


@contextlib.contextmanager
def start_run(client, experiment_id: str, *, run_name: str,
              tags: dict[str, str]) -> Iterator[MlflowTracker]:
    """Open a run and always close it with a status that tells the truth (case C06).

    Normal exit: FINISHED. An exception: FAILED, with its message as the tag
    ``error`` and the traceback as the artifact ``error.txt``. Ctrl-C or SIGTERM
    (a handler is installed for the run's duration; MLflow installs none):
    KILLED. The end time is set in every case and the exception re-raised, so the
    process exits non-zero; what was logged before stays. A tracker whose
    ``end_status`` was set (a population member that diverged) ends with it.
    """
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **_identity()})
    with _closing(client, run.info.run_id) as tracker:
        yield tracker


@contextlib.contextmanager
def resume_run(client, run_id: str, *, tags: dict[str, str]) -> Iterator[MlflowTracker]:
    """Reopen an ended run to continue it (case C21), closed as ``start_run`` closes.

    The run goes back to RUNNING with this process's identity, its tag
    ``resume_count`` counts the resumes, and the tags of how it ended before
    (``error``, ``killed_reason``) move to ``previous_end.<n>`` (the status and the
    reason), so a resumed run that finishes does not read as failed.
    """
    run = client.get_run(run_id)
    old = run.data.tags
    count = int(old.get("resume_count", "0")) + 1
    reason = old.get("error") or old.get("killed_reason") or ""
    tracker = MlflowTracker(client, run_id)
    tracker.set_tags({**tags, **_identity(), "resume_count": str(count),
                      f"previous_end.{count}": f"{run.info.status} {reason}".strip()[:4000]})
    for key in ("error", "killed_reason"):
        if key in old:
            client.delete_tag(run_id, key)
    client.update_run(run_id, status="RUNNING")
    with _closing(client, run_id) as tracker:
        yield tracker


@contextlib.contextmanager
def _closing(client, run_id: str) -> Iterator[MlflowTracker]:
    tracker = MlflowTracker(client, run_id)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    status, error = "FAILED", None
    try:
        yield tracker
        status = tracker.end_status or "FINISHED"
    except KeyboardInterrupt as err:
        status, error = "KILLED", str(err) or "interrupted (Ctrl-C)"
        _record_error(tracker, error, err)
        raise
    except BaseException as err:
        if tracker.fault is None and isinstance(err, Exception) and store_fault(err):
            tracker.fault = err  # a synchronous call (tags, params, artifacts) refused
        error = f"{type(err).__name__}: {err}"
        if tracker.fault is not None:
            error = fault_message(tracker.client_uri(), store_fault(tracker.fault), tracker.fault)
        _record_error(tracker, error, err)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        # A second signal while closing must not leave the run RUNNING (signals.blocked
        # holds it whichever thread receives it).
        with signals.blocked():
            _close(client, tracker, status, error)


def _close(client, tracker: MlflowTracker, status: str, error: str | None) -> None:
    """Write the rest of the run's points and its status. After a store fault, the points
    the store refuses are spilled (``Spill``) and ``StoreFault`` says what was kept;
    a status the store refuses is left for the next job (``load_spills``)."""
    failure = None
    try:
        tracker.flush()  # what was logged before a fault stays
    except StoreFault:
        pass  # the fault is reported below, with what was kept
    except Exception as err:
        if store_fault(err) is not None:
            tracker.fault = tracker.fault or err
        elif error is None:  # the run's last write failed: it did not finish
            failure, status = err, "FAILED"
            _record_error(tracker, f"{type(err).__name__}: {err}", err)
        # else: stopped or failed already (a model whose file a stop removed): that
        # error is the one reported, and the status stays
    closed = None
    try:
        retry_busy(client.set_terminated, tracker.run_id, status)
        closed = status
    except Exception as err:
        if store_fault(err) is None:
            raise
        tracker.fault = tracker.fault or err
        tracker.spill(end=status if status != "FINISHED" else "FAILED",
                      error=error or fault_message(tracker.client_uri(), store_fault(err), err))
    if tracker.fault is not None:
        raise StoreFault(tracker.fault_report(tracker.client_uri(), closed=closed)) \
            from tracker.fault
    if failure is not None:
        raise failure


_WRITER = None


def _writer():
    """The process's one metric-writer thread, created on first use; one thread keeps
    each run's batches in the order they were sent."""
    global _WRITER
    if _WRITER is None:
        from concurrent.futures import ThreadPoolExecutor

        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-mlflow-writer")
    return _WRITER


def _record_error(tracker: MlflowTracker, message: str, err: BaseException) -> None:
    with contextlib.suppress(Exception):
        tracker.set_tags({"error": message[:4000]})
        tracker.log_text("".join(traceback.format_exception(err)), "error.txt")


def flatten_config(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"model.width": "64", ...}``: one entry per leaf (case C03).

    Lists stay one value (``"[64, 64]"``); ``None`` becomes ``"null"``.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = "null" if value is None else str(value)
    return flat


def environment_tags() -> dict[str, str]:
    """Git commit and dirty flag of the source tree, the versions of the stack, and
    MLflow's own fields that its UI shows (Source, User, the commit beside the source)."""
    import getpass
    from importlib import metadata

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "python -m trainer"}
    with contextlib.suppress(Exception):  # no user name in some containers
        tags["mlflow.user"] = getpass.getuser()
    for dist in ("jax", "jaxlib", "flax", "optax", "mlflow", "hydra-core", "scikit-learn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{dist}"] = metadata.version(dist)
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        tags["git.commit"] = tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        tags["git.commit"] = "unknown (not a git checkout)"
    return tags


def ui_command(store: Store) -> str:
    """The command that opens this store in the MLflow UI on 127.0.0.1."""
    if store.lock_path is None:
        return f"open {store.tracking_uri}"
    return ("MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "
            "mlflow server --backend-store-uri "
            f"{store.tracking_uri} --host 127.0.0.1 --port 5000 --workers 1")


def run_url(store: Store, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (``ui_command``'s server for a local store), in
    the UI's model-training view: MLflow 3.17 opens the GenAI view unless the URL (or
    the browser's last choice) asks for ``workflowType=machine_learning``."""
    base = (store.tracking_uri.rstrip("/") if store.lock_path is None
            else "http://127.0.0.1:5000")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


# --- populations: parent and child runs ----------------------------------------------------

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a child under its parent


def config_hash(resolved: dict) -> str:
    """A short hash of a resolved config without ``tracking`` and ``population`` (where
    runs are recorded, not what they train): equal for the same point however launched."""
    import hashlib
    import json

    tree = {k: v for k, v in resolved.items() if k not in ("tracking", "population", "resume")}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_runs(client, experiment_id: str, hashes: Iterable[str]) -> dict[str, str]:
    """``{config_hash: run_id}`` of FINISHED runs in the experiment with those hashes."""
    wanted = set(hashes)
    found: dict[str, str] = {}
    # MLflow's filter has no IN for tags: one query for the experiment's hashed runs
    runs = client.search_runs([experiment_id], max_results=50_000,
                              filter_string="attributes.status = 'FINISHED' and "
                                            "tags.config_hash LIKE '%'")
    for run in runs:
        digest = run.data.tags.get("config_hash")
        if digest in wanted:
            found.setdefault(digest, run.info.run_id)
    return found


def child_runs(client, experiment_id: str, parent_run_id: str) -> list:
    """The runs whose ``mlflow.parentRunId`` is ``parent_run_id``, oldest first."""
    runs = client.search_runs([experiment_id], max_results=50_000,
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_name or ""))


def metric_history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric of one run, in step order."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


CURVE_METRICS = tuple(names.CURVES)  # the loop's names of the curves a resumed run reads


def metric_histories(client, run_id: str,
                     keys: Iterable[str] = CURVE_METRICS) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` of a run's curves, for a resumed run, by the loop's names
    (``train_loss``; the record's ``curves/train_loss``, see ``names``; a run recorded
    before the curves had their prefix holds them under the bare name). Keys it lacks are
    left out."""
    out = {}
    for key in keys:
        for stored in (names.CURVES[key], key):
            steps, values = metric_history(client, run_id, stored)
            if steps:
                out[key] = (steps, values)
                break
    return out


def find_resumable(client, experiment_id: str) -> str | None:
    """The newest run of the experiment that can be resumed: a lone run or a population's
    parent with a checkpoint folder (tag ``checkpoint.dir``); None if there is none."""
    runs = client.search_runs([experiment_id], max_results=50,
                              filter_string="tags.`checkpoint.dir` LIKE '%'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.data.tags.get("population.role") != "member":
            return run.info.run_id
    return None


def download_checkpoints(client, run_id: str, directory: Path) -> bool:
    """Fetch a run's ``checkpoints/`` artifacts (``checkpoint.upload_checkpoints``) into
    ``directory``, for a run of a remote store resumed on a machine without its local
    folder. Returns False when the run has none."""
    import shutil
    import tempfile

    if not client.list_artifacts(run_id, "checkpoints"):
        return False
    with tempfile.TemporaryDirectory(prefix="trainer-checkpoints-") as tmp:
        local = client.download_artifacts(run_id, "checkpoints", tmp)
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(local, directory)
    return True
