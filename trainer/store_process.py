"""The MLflow store in a process of its own, started before the CLI imports JAX.

``import mlflow`` and opening a SQLite store take about 4 s on a 2-core machine
(pandas, SQLAlchemy, Alembic's migration check), and a thread cannot overlap
that with ``import jax``: both are Python bytecode under one GIL (measured: no
gain). A second process can. ``__main__.main`` calls ``start`` first thing; the
child imports MLflow on the other core while the parent imports Hydra and JAX,
composes the config and loads the data, so the store is open by the time the
first run is created. The parent never imports MLflow.

The parent talks to the child through ``RemoteClient``, a stand-in for
``mlflow.MlflowClient``: each method call is sent over a socket pair
(``multiprocessing.connection``), run by the child's real client and answered
synchronously, in order. Answers come back as plain values: MLflow entities
(``Run``, ``RunInfo``, ``Metric`` ...) become ``types.SimpleNamespace`` with the
same attribute names, paged lists become lists. Errors come back as
``tracking.TrackingError`` (kept as raised) or ``StoreError`` naming the original
type. The child runs in a session of its own (a terminal's Ctrl-C does not reach it)
and ignores SIGINT and SIGTERM (the parent closes its runs through it when stopped);
it exits when the parent's end of the socket closes, or when a watcher thread sees
the parent gone (at once when idle, else after the request in
hand or ``PARENT_GONE_GRACE_S``). If the child is gone, or after a stop has not
answered for ``GIVE_UP_S``, the parent kills it, says so and opens the store itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

__all__ = ["StoreError", "StoreProcess", "RemoteClient", "start"]

# Calls that need MLflow's modules beyond its client (models, datasets): run where MLflow
# is imported, with the store's client as first argument (``run_op``).
OPS = {"log_model": "trainer.mlflow_model:log_model",
       "log_datasets": "trainer.mlflow_model:log_datasets",
       "register_model": "trainer.mlflow_model:register_model"}

GIVE_UP_S = 5.0  # a stopped job waits this long for a child that does not answer
PARENT_GONE_GRACE_S = 30.0  # a child whose parent died finishes a request this long


class StoreError(RuntimeError):
    """An MLflow call failed in the store process; the message starts with its type."""


class StoreProcess:
    """The running child and the parent's end of its socket.

    Attributes:
      process: the ``subprocess.Popen`` of ``python -m trainer.store_process``.
    """

    def __init__(self, process: subprocess.Popen, connection):
        self.process = process
        self._connection = connection
        self._lock = threading.Lock()  # the metric writer thread and the main thread share it
        self._unread = 0               # answers left unread by a call cut short by Ctrl-C
        self._used = False
        self.broken = False

    def call(self, op: str, *args, **kwargs):
        """Send one request and return its answer (raising the error it raised).

        Raises:
          ConnectionError: the store process is gone or was given up (``broken`` is
            then True).
        """
        from . import signals

        with self._lock:
            if self.broken:
                raise ConnectionError("the store process has ended")
            try:
                while self._unread:  # answers to calls cut short by Ctrl-C
                    self._wait()
                    with signals.blocked():
                        self._connection.recv()
                        self._unread -= 1
                with signals.blocked():  # a request is written whole or not at all
                    self._connection.send((op, args, kwargs))
                    self._used = True
                self._unread += 1
                self._wait()
                with signals.blocked():
                    status, value = self._connection.recv()
                    self._unread -= 1
            except (EOFError, OSError) as err:
                self._give_up()
                raise ConnectionError(f"the store process has ended ({err})") from None
        if status == "error":
            raise value
        return value

    def _wait(self) -> None:
        """Wait for an answer. Interruptible (Ctrl-C while a slow server answers), while
        reading it is not, so a stop never leaves half a message in the socket. Once the
        job was asked to stop (``signals.stopping``, or a signal held pending while a run
        is closed), a child that has not answered in ``GIVE_UP_S`` is given up, so that
        the run is closed in-process instead of waiting on it.

        Raises:
          EOFError: the child ended, or was given up.
        """
        import signal

        from . import signals

        waited = 0.0
        while not self._connection.poll(0.5):
            waited += 0.5
            if self.process.poll() is not None:
                raise EOFError(f"exit code {self.process.returncode}")
            if waited < GIVE_UP_S:
                continue
            held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            pending = signal.sigpending() & held & {signal.SIGINT, signal.SIGTERM}
            if pending or signals.held() or signals.stopping():
                raise EOFError(f"no answer in {waited:.0f} s after a stop")

    def _give_up(self) -> None:
        if not self.broken:
            self.broken = True
            with contextlib.suppress(OSError):
                self._connection.close()
            with contextlib.suppress(OSError):
                self.process.kill()
            print("warning: the MLflow store process ended; this process writes the store "
                  "itself from here on", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the parent's end; the child sees the end of its input and exits."""
        with self._lock:
            self.broken = True
            self._connection.close()
            if not self._used:  # nothing to finish (a usage error, --help): no orphan
                self.process.kill()


class RemoteClient:
    """An ``mlflow.MlflowClient`` whose calls run in the store process.

    Any method of ``MlflowClient`` can be called; arguments must pickle, and
    answers are plain values (see the module docstring). ``log_batch_plain``
    takes metrics, params and tags as tuples, so the parent needs no MLflow
    entities. When the store process has ended, calls go to an in-process client
    opened on first need.
    """

    def __init__(self, process: StoreProcess, store):
        self._process = process
        self._store = store
        self._local = None

    def _local_client(self):
        if self._local is None:
            from .tracking import open_store_here

            self._local = open_store_here(self._store)
        return self._local

    def open(self) -> None:
        """Open (create, migrate, check) the store in the store process.

        Raises:
          tracking.TrackingError: the store cannot be opened.
        """
        self._call("open")

    def _call(self, name: str, *args, **kwargs):
        if not self._process.broken:
            try:
                return self._process.call(name, self._store, *args, **kwargs)
            except ConnectionError:
                pass
        if name == "open":
            self._local_client()
            return None
        if name == "log_batch_plain":
            from .tracking import log_batch

            return log_batch(self._local_client(), *args, **kwargs)
        if name in OPS:
            return run_op(name, self._local_client(), *args, **kwargs)
        return getattr(self._local_client(), name)(*args, **kwargs)

    def log_batch_plain(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """``log_batch`` with ``(key, value, timestamp_ms, step)`` metric tuples and
        ``(key, value)`` param and tag tuples."""
        self._call("log_batch_plain", run_id, list(metrics), list(params), list(tags))

    def run_op(self, name: str, *args, **kwargs):
        """Run ``OPS[name](client, *args, **kwargs)`` in the store process."""
        return self._call(name, *args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)


def start() -> StoreProcess | None:
    """Start the store process (it begins importing MLflow at once).

    Returns:
      the process, or None when it cannot be started (the caller then opens the
      store in-process, as before).
    """
    import multiprocessing.connection

    try:
        parent_end, child_end = multiprocessing.connection.Pipe(duplex=True)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        # In a session of its own: a terminal's Ctrl-C (and a signal to the job's process
        # group) reaches the whole foreground group, and one while the child still imports
        # would print its traceback. Ignoring SIGINT here around the start, as before, lost
        # a Ctrl-C that arrived meanwhile (POSIX discards a pending signal set to SIG_IGN:
        # the job ran on, seen under load in test_issue13_item9_ctrl_c_while_importing).
        # A stop arriving during the start is held and handled after it.
        from . import signals

        with signals.blocked():
            process = subprocess.Popen(
                [sys.executable, "-m", "trainer.store_process", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), env=env, stdin=subprocess.DEVNULL,
                start_new_session=True)
        child_end.close()
    except OSError:
        return None
    return StoreProcess(process, parent_end)


def run_op(name: str, client, *args, **kwargs):
    """Call the function ``OPS[name]`` with ``client`` first (in a process that has MLflow)."""
    import importlib

    module, function = OPS[name].split(":")
    return getattr(importlib.import_module(module), function)(client, *args, **kwargs)


def plain(value, depth: int = 0):
    """An MLflow answer as picklable plain values, without MLflow classes.

    Entities (``mlflow.entities._mlflow_object._MlflowObject``: iterable as
    ``(property, value)`` pairs) become ``SimpleNamespace``; lists and paged lists
    become lists; dicts stay dicts; other objects become ``str``.
    """
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    if depth > 20:
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    from mlflow.entities._mlflow_object import _MlflowObject

    if isinstance(value, _MlflowObject):
        return SimpleNamespace(**{k: plain(v, depth + 1) for k, v in value})
    return str(value)


def _watch_parent(parent_pid: int, busy: threading.Event) -> None:
    """Exit when the parent is gone: at once when idle, else when the request in hand
    ends or after ``PARENT_GONE_GRACE_S`` (half-made store migrations are worse than a
    short wait; a request that hangs, such as a lock that is never free, is not)."""
    import time

    while os.getppid() == parent_pid:
        time.sleep(0.5)
    deadline = time.monotonic() + PARENT_GONE_GRACE_S
    while busy.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(0)


def _serve(connection) -> None:
    """Answer requests until the parent closes its end (or dies)."""
    from . import tracking

    clients: dict = {}
    parent_pid = os.getppid()
    busy = threading.Event()
    threading.Thread(target=_watch_parent, args=(parent_pid, busy), daemon=True,
                     name="trainer-store-watch").start()
    warming = threading.Thread(target=_warm_up, daemon=True, name="trainer-store-warm-up")

    def client_for(store):
        if store not in clients:
            clients[store] = tracking.open_store_here(store, owner_pid=parent_pid)
        return clients[store]

    while True:
        try:
            op, args, kwargs = connection.recv()
        except (EOFError, OSError):
            return
        busy.set()
        try:
            store, *args = args
            client = client_for(store)
            if op == "open":
                result = None
            elif op == "log_batch_plain":
                result = tracking.retry_busy(tracking.log_batch, client, *args, **kwargs)
            elif op in OPS:
                result = plain(tracking.retry_busy(run_op, op, client, *args, **kwargs))
            else:
                result = plain(tracking.retry_busy(getattr(client, op), *args, **kwargs))
            answer = ("ok", result)
        except tracking.TrackingError as err:
            answer = ("error", tracking.TrackingError(str(err)))
        except Exception as err:  # noqa: BLE001 - sent to the parent, raised there
            answer = ("error", StoreError(f"{type(err).__name__}: {err}"))
        busy.clear()
        try:  # send pickles the whole answer before it writes a byte
            connection.send(answer)
        except OSError:
            return
        except Exception as err:  # noqa: BLE001 - the answer does not pickle
            connection.send(("error", StoreError(f"answer to {op} cannot be sent: {err}")))
        if op == "open" and warming.ident is None and answer[0] == "ok":  # once
            warming.start()


def _warm_up() -> None:
    """Import what logging a run's model and datasets needs (0.5 s of imports, measured:
    the first model logged in a process took 0.58 s, the next 0.10 s), in a thread
    while the job trains, so the end of the run does not wait for them."""
    with contextlib.suppress(Exception):  # only a head start: the calls import them anyway
        import mlflow.data.pandas_dataset  # noqa: F401
        import mlflow.models.model  # noqa: F401
        import mlflow.pyfunc  # noqa: F401
        import mlflow.pyfunc.model  # noqa: F401

        from . import mlflow_model  # noqa: F401


def _main(fd: int) -> None:
    import multiprocessing.connection

    # Ctrl-C in a terminal reaches the whole process group: the parent handles it and
    # still needs this process to close its runs; its exit ends this one (EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # what the job prints is the job's: MLflow's INFO lines and progress bars while it logs
    # a model ("Validating input example...", "Downloading artifacts") are not for the user
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    connection = multiprocessing.connection.Connection(fd)
    # the slow part, done while the parent imports JAX
    import mlflow  # noqa: F401
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    _serve(connection)


if __name__ == "__main__":
    # through the module's own name, so the errors sent back pickle as
    # trainer.store_process.StoreError, not __main__.StoreError
    from trainer.store_process import _main as main

    main(int(sys.argv[1]))
