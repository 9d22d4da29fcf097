"""Signals: Ctrl-C and SIGTERM held back while something must not be cut in half."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

__all__ = ["blocked", "stopping", "mark_stopping", "on_sigint"]

_STOPPING = False


def stopping() -> bool:
    """Whether this process was asked to stop (Ctrl-C or SIGTERM seen by our handlers):
    waits on other processes then give up sooner (``store_process``)."""
    return _STOPPING


def mark_stopping() -> None:
    global _STOPPING
    _STOPPING = True


def on_sigint(signum, frame):
    """Python's default SIGINT handler (raise ``KeyboardInterrupt``), remembering the stop."""
    mark_stopping()
    raise KeyboardInterrupt


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (a second signal while a run closes
    or a checkpoint is written waits, then acts)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
