"""Signals: Ctrl-C and SIGTERM held back while something must not be cut in half.

A process-directed signal is taken by whichever thread does not block it, and
CPython then runs the Python handler in the main thread at its next bytecode: a
``pthread_sigmask`` in the main thread alone does not keep it out once JAX, the
metric writer or orbax have started threads (issue 13 item 8). So our handlers
themselves hold a signal back while the main thread is inside ``blocked()``, and
act on it when the block ends; and once a stop is under way, a second signal no
longer interrupts its clean-up (closing the run, removing temporary folders).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

__all__ = ["blocked", "stopping", "mark_stopping", "on_sigint", "first_stop", "held"]

_STOPPING = False   # a stop was asked (maybe still held back)
_RAISED = False     # a stop was raised in the main thread: its clean-up is under way
_DEPTH = 0          # nesting of blocked() in the main thread
_HELD: list[int] = []


def stopping() -> bool:
    """Whether this process was asked to stop (Ctrl-C or SIGTERM seen by our handlers):
    waits on other processes then give up sooner (``store_process``)."""
    return _STOPPING


def held() -> bool:
    """Whether a signal arrived inside ``blocked()`` and waits for the block to end."""
    return bool(_HELD)


def mark_stopping() -> None:
    global _STOPPING
    _STOPPING = True


def first_stop(signum: int) -> bool:
    """Called by our handlers: True when this signal must raise now. False when it is
    held for the end of a ``blocked()`` block, or when a stop is already under way
    (then the user is told the run is being closed, once)."""
    global _RAISED
    mark_stopping()
    if _DEPTH:
        _HELD.append(signum)
        return False
    if _RAISED:
        if signum not in _HELD:  # remembered only to say it once
            _HELD.append(signum)
            print(f"{signal.Signals(signum).name} again: already stopping, closing the run "
                  "(kill -9 ends the process at once; the next job on the store then "
                  "closes the run)", file=sys.stderr, flush=True)
        return False
    _RAISED = True
    return True


def on_sigint(signum, frame):
    """Python's default SIGINT handler (raise ``KeyboardInterrupt``), remembering the stop;
    held back inside ``blocked()`` and ignored while a stop's clean-up runs."""
    if first_stop(signum):
        raise KeyboardInterrupt


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (a second signal while a run closes
    or a checkpoint is written waits, then acts).

    In the main thread our handlers (``on_sigint``, ``tracking.raise_terminated``) hold
    the signal whichever thread received it, and the first held one is handled as the
    outermost block ends; in other threads the signals are masked for the thread.
    """
    global _DEPTH
    sigs = {signal.SIGINT, signal.SIGTERM}
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    if main:
        _DEPTH += 1
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if main:
            _DEPTH -= 1
            if not _DEPTH and _HELD and not _RAISED:
                signum = _HELD.pop(0)
                handler = signal.getsignal(signum)
                if callable(handler):
                    handler(signum, None)
