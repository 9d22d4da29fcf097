"""Plots drawn in worker processes while the run goes on, logged when they are ready.

Matplotlib holds the GIL while it draws, so threads would not overlap it with the
run's other work; worker processes do (``concurrent.futures.ProcessPoolExecutor``,
started with ``spawn``: forking a process that runs JAX's threads is unsafe). A
16-member population draws 32 PNGs, ~3 s in the main process on this 2-core
machine, ~1.5 s on two workers while the main process runs the gradient checks,
saves params and writes the store. The workers start when the run starts, so
their interpreter start and matplotlib import overlap compilation.

Nothing is lost when the pool cannot help: if it cannot start, or a worker dies,
the plot is drawn in the main process. An error raised by the plot function itself
is raised by ``finish``, as it would be in the main process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

__all__ = ["Renderer", "default_workers"]


def _watch_parent(parent_pid: int) -> None:
    """Worker initializer: exit when the parent is gone (a SIGKILLed run would otherwise
    leave its idle workers behind, blocked on their queue), and leave Ctrl-C to the
    parent (a terminal sends it to the whole process group; the parent shuts the pool
    down, and a worker's own traceback would only bury the parent's message)."""
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="trainer-render-watch", daemon=True).start()


def _warm() -> None:
    """Import what drawing needs, so a worker is ready before the first plot."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


class Renderer:
    """Draw artifacts elsewhere, then log each with its run's tracker.

    ``plot(tracker, fn, *args, **kwargs)`` queues ``fn(*args, **kwargs)``, a
    module-level function that writes a file and returns its path (``report.plot_*``;
    its arguments must pickle); ``finish()`` waits for every queued plot and calls
    ``tracker.log_artifact(path, artifact_path)`` in the order they were queued.
    A context manager: leaving it shuts the workers down; an error leaving it logs
    what is queued first (best effort), Ctrl-C or SIGTERM drops it.

    Args:
      workers: processes (default ``default_workers()``); 0 draws everything in the
        calling process, at ``finish``.
    """

    def __init__(self, workers: int | None = None):
        self._workers = default_workers() if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None
        self._queued: list = []

    def __enter__(self) -> "Renderer":
        if self._workers > 0:
            try:
                self._pool = ProcessPoolExecutor(
                    self._workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_watch_parent, initargs=(os.getpid(),))
                for _ in range(self._workers):
                    self._pool.submit(_warm)
            except (OSError, RuntimeError):  # no processes here: draw in this one
                self._pool = None
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and not issubclass(exc[0], KeyboardInterrupt):
            # a run ending on an error (a failed check with fail_run) keeps its plots
            with contextlib.suppress(Exception):
                self.finish()
        if self._pool is not None:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._pool = None

    def plot(self, tracker, fn: Callable, *args, artifact_path: str | None = None,
             **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)``; its file goes to ``tracker`` at ``finish``."""
        future = None
        if self._pool is not None:
            try:
                future = self._pool.submit(fn, *args, **kwargs)
            except (BrokenProcessPool, RuntimeError):
                self._pool = None
        self._queued.append((tracker, future, artifact_path, fn, args, kwargs))

    def finish(self) -> None:
        """Wait for every queued plot and log it; raise the first plot's error."""
        queued, self._queued = self._queued, []
        for tracker, future, artifact_path, fn, args, kwargs in queued:
            path = _result(future) if future is not None else None
            if path is None:
                path = fn(*args, **kwargs)
            tracker.log_artifact(path, artifact_path)


def default_workers() -> int:
    """``min(2, os.cpu_count())`` under ``python -m trainer``, else 0.

    A ``spawn`` worker first imports the parent's ``__main__``: the CLI's is guarded,
    but a user's script that trains without an ``if __name__ == "__main__"`` guard
    would start training again in every worker.
    """
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return min(2, os.cpu_count() or 1) if getattr(spec, "name", None) == "trainer.__main__" else 0


def _result(future: Future):
    """The worker's result; None when the worker died (the caller draws it itself)."""
    try:
        return future.result()
    except BrokenProcessPool:
        return None
