"""Signals: Ctrl-C and SIGTERM held back while something must not be cut in half."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

__all__ = ["blocked"]


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
