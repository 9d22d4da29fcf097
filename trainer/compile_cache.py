"""JAX's persistent compilation cache, shared by every run on the machine.

A second run of the same program loads its XLA executables from disk instead of
compiling them: for the small nets this service trains, compiling is most of a
run's wall time (the chunk, the float64 gradient checks, the prediction). JAX
keys each entry by the program, the backend, the devices and the versions of jax
and jaxlib, so a hit runs the same executable the compiler would have produced and
the results are the same bits (tests/test_compile_cache.py checks it).

Where: ``trainer.compilation_cache_dir``; else ``$JAX_COMPILATION_CACHE_DIR`` (JAX's
own variable); else ``$XDG_CACHE_HOME/trainer/jax`` (``~/.cache/trainer/jax``). The
folder is created private to the user (mode 0700): an entry is a compiled program
that JAX will run. A folder that cannot be created or written costs only the
cache: one warning, and the run compiles as it would without one.

Small programs qualify: JAX by default caches only programs that took 1 s or more
to compile; here every program does. The cache keeps its size under
``MAX_BYTES``, least recently used entries first (JAX's own LRU). That LRU reads an
access-time file beside every entry and, when one is missing, fails every later write
to the folder (a warning per program, and nothing cached): a JAX process without a
size limit (JAX's default, e.g. a user's notebook given the same
``$JAX_COMPILATION_CACHE_DIR``) writes entries without one. ``enable`` gives such
entries one (their write time), so they are evicted oldest first.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_BYTES", "CacheStatus", "default_dir", "cache_dir", "enable", "counts"]

MAX_BYTES = 1 << 30   # 1 GiB; a diabetes run writes ~1 MB of entries

# (requests that looked in the cache, hits), counted from JAX's monitoring events
_COUNTS = {"requests": 0, "hits": 0}
_LISTENING = False


@dataclass(frozen=True)
class CacheStatus:
    """What ``enable`` did.

    Attributes:
      path: the cache folder, or None when the cache is off.
      reason: why it is off (None when on).
    """

    path: Path | None
    reason: str | None = None


def default_dir() -> Path:
    """``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainer/jax``, else
    ``~/.cache/trainer/jax``."""
    return cache_dir("JAX_COMPILATION_CACHE_DIR", "jax")


def cache_dir(variable: str, name: str) -> Path:
    """``$variable`` if set, else ``$XDG_CACHE_HOME/trainer/<name>``, else
    ``~/.cache/trainer/<name>``: where the machine-wide caches live."""
    if os.environ.get(variable):
        return Path(os.environ[variable]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "trainer" / name


def enable(path: str | Path | None = None, *, on: bool = True) -> CacheStatus:
    """Point JAX's persistent compilation cache at ``path`` (None: ``default_dir()``).

    Call before the first compilation; later compilations in the process use it.
    With ``on=False``, or when the folder cannot be created and written, the cache
    is left off: the second case warns (``UserWarning``) once, naming the folder and
    the fix. Never raises for the folder. A corrupt entry found later is JAX's to
    handle: it warns and compiles (``jax_raise_persistent_cache_errors`` stays off).

    Returns:
      a ``CacheStatus``.
    """
    import jax

    _listen()
    if not on:
        jax.config.update("jax_compilation_cache_dir", None)
        return CacheStatus(None, "off (trainer.compilation_cache=false)")
    folder = Path(path).expanduser() if path else default_dir()
    problem = _unwritable(folder)
    if problem is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        warnings.warn(f"compilation cache off: {problem} (set trainer.compilation_cache_dir "
                      "to a writable folder, or trainer.compilation_cache=false)", stacklevel=2)
        return CacheStatus(None, problem)
    _give_entries_access_times(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return CacheStatus(folder)


def counts() -> dict[str, int]:
    """Compilations in this process so far that looked in the cache (``requests``),
    found their executable there (``hits``) and did not (``misses``)."""
    return {**_COUNTS, "misses": _COUNTS["requests"] - _COUNTS["hits"]}


def _listen() -> None:
    global _LISTENING
    if _LISTENING:
        return
    import jax

    def on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            _COUNTS["requests"] += 1
        elif event == "/jax/compilation_cache/cache_hits":
            _COUNTS["hits"] += 1

    jax.monitoring.register_event_listener(on_event)
    _LISTENING = True


# JAX's names for an entry and its access time (jax/_src/lru_cache.py)
ENTRY_SUFFIX, ATIME_SUFFIX = "-cache", "-atime"


def _give_entries_access_times(folder: Path) -> None:
    """Write the missing access-time file of each entry in ``folder``: its write time,
    as JAX's LRU stores times (nanoseconds, 8 bytes little-endian). One listing of the
    folder finds them (a run's start-up: no call per entry when none is missing). A
    file that vanishes meanwhile (another process evicting) is skipped."""
    names = set(os.listdir(folder))
    for name in names:
        key = name.removesuffix(ENTRY_SUFFIX)
        if key == name or key + ATIME_SUFFIX in names:  # not an entry, or it has its time
            continue
        try:
            stamp = (folder / name).stat().st_mtime_ns.to_bytes(8, "little")
            (folder / (key + ATIME_SUFFIX)).write_bytes(stamp)
        except OSError:
            pass


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot hold the cache, or None if it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        return f"cannot write the cache folder {folder} ({err.strerror or err})"
    return None
