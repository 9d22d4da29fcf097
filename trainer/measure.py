"""What XLA and the device say about a compiled computation, and honest timers.

Used by the training loop (one figure set per run) and the benchmark suite.
Every timer here ends at ``jax.block_until_ready`` (case C10): a jitted call
returns before its work is done, so timing the call alone measures dispatch.
Part of the numerical core's helpers: no MLflow, no Hydra, no file I/O beyond reading ``/proc``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["TimingStats", "summarize_times", "time_blocked", "compiled_cost", "compiled_memory",
           "device_peak_bytes", "device_info", "abstract_signature", "signature_changes",
           "CountingCompiler", "chunk_timings", "step_analysis", "process_start"]


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated timings, in seconds.

    Attributes:
      median_s, p10_s, p90_s, min_s, max_s: order statistics of the samples
        (percentiles by linear interpolation, ``statistics.quantiles`` "inclusive").
      spread: ``(p90_s - p10_s) / median_s``, the relative spread used to decide
        whether two figures differ by more than noise.
      repeats: number of samples.
    """

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    max_s: float
    spread: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize_times(samples_s: list[float]) -> TimingStats:
    """Order statistics of ``samples_s`` (seconds, at least one sample).

    Raises:
      ValueError: for an empty list.
    """
    if not samples_s:
        raise ValueError("summarize_times needs at least one sample")
    xs = sorted(float(s) for s in samples_s)
    med = statistics.median(xs)
    if len(xs) >= 2:
        deciles = statistics.quantiles(xs, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = xs[0]
    spread = (p90 - p10) / med if med > 0 else 0.0
    return TimingStats(med, p10, p90, xs[0], xs[-1], spread, len(xs))


def time_blocked(fn: Callable[..., Any], *args, warmup: int = 1, repeats: int = 5,
                 min_time_s: float = 0.0) -> TimingStats:
    """Time ``fn(*args)`` to completion: each sample ends at ``jax.block_until_ready``.

    Args:
      fn: the function to time (usually already jitted and compiled).
      warmup: untimed calls first (the first call of a ``jax.jit`` function compiles).
      repeats: timed samples.
      min_time_s: when positive, each sample loops ``fn`` until at least this many
        seconds have passed and reports the time per call (for calls of microseconds).

    Returns:
      ``TimingStats`` of seconds per call.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            jax.block_until_ready(fn(*args))
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                break
        samples.append(elapsed / calls)
    return summarize_times(samples)


def compiled_cost(compiled) -> dict[str, float]:
    """FLOPs and bytes that XLA's cost analysis counts for one call of ``compiled``.

    Args:
      compiled: a ``jax.stages.Compiled`` (from ``jax.jit(f).lower(...).compile()``) or
        a ``jax.stages.Lowered`` (the same FLOPs, before XLA's optimisations).

    Returns:
      ``{"flops": FLOPs, "transcendentals": count, "bytes_accessed": bytes}``; an
      entry XLA does not report is left out. XLA counts a ``while`` loop's body
      once, not once per trip, so compile the single step to get per-step FLOPs.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device
        analysis = analysis[0] if analysis else {}
    out = {}
    for src, dst in (("flops", "flops"), ("transcendentals", "transcendentals"),
                     ("bytes accessed", "bytes_accessed")):
        if analysis and src in analysis:
            out[dst] = float(analysis[src])
    return out


def compiled_memory(compiled) -> dict[str, int]:
    """Buffer sizes XLA assigned to ``compiled``, in bytes.

    Returns:
      ``argument_bytes``, ``output_bytes``, ``alias_bytes`` (outputs sharing an
      argument's buffer), ``temp_bytes`` (intermediates alive during the call:
      what autodiff keeps for the backward pass shows up here) and
      ``generated_code_bytes``; empty when the backend gives no analysis.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "generated_code_bytes": int(stats.generated_code_size_in_bytes),
    }


def device_peak_bytes(device=None) -> int | None:
    """The device allocator's peak bytes in use since the process started.

    Returns ``None`` where the backend keeps no allocator statistics (the CPU
    backend); on GPU this is ``memory_stats()["peak_bytes_in_use"]``.
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def device_info() -> dict[str, str]:
    """Backend, device kind and count, host CPU and library versions, as strings."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": str(jax.device_count()),
        "host_cpu": cpu,
        "host_cpu_count": str(os.cpu_count()),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "python_version": platform.python_version(),
    }


def abstract_signature(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` for every array leaf of ``tree``: what jit keys its cache
    on (a weakly typed leaf, such as a Python scalar, gets ``dtype`` suffixed ``(weak)``)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)

    def dtype(leaf) -> str:
        name = str(getattr(leaf, "dtype", type(leaf).__name__))
        return name + " (weak)" if getattr(leaf, "weak_type", False) else name

    return {jax.tree_util.keystr(path): (tuple(getattr(leaf, "shape", ())), dtype(leaf))
            for path, leaf in leaves}


def signature_changes(old: dict, new: dict) -> list[str]:
    """Human lines naming each argument whose shape or dtype differs between two
    ``abstract_signature`` results (added and removed leaves included)."""
    lines = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        if a is None:
            lines.append(f"{path}: new argument {b[1]}{list(b[0])}")
        elif b is None:
            lines.append(f"{path}: argument removed (was {a[1]}{list(a[0])})")
        else:
            lines.append(f"{path}: {a[1]}{list(a[0])} -> {b[1]}{list(b[0])}")
    return lines


class CountingCompiler:
    """Ahead-of-time compilation of one function, counting its compilations.

    ``jax.jit`` compiles again, silently, whenever an argument's shape or dtype
    changes; here each call's abstract signature is compared with the compiled
    one, and a change compiles again and is recorded with the arguments that
    changed, so a run can report it. Every timed phase ends on the host after the
    work is done (tracing, lowering and XLA compilation are synchronous).

    Attributes:
      num_compiles: compilations so far (1 in a healthy run).
      recompiles: one line per compilation after the first, naming each argument
        whose shape or dtype changed (``measure.signature_changes``).
      trace_lower_s: seconds spent tracing to a jaxpr and lowering to StableHLO.
      compile_s: seconds spent in XLA compilation.
      compiled: the latest ``jax.stages.Compiled``.
    """

    def __init__(self, fn: Callable):
        self._jitted = jax.jit(fn)
        self._signature: dict | None = None
        self.compiled = None
        self.num_compiles = 0
        self.recompiles: list[str] = []
        self.trace_lower_s = 0.0
        self.compile_s = 0.0

    def compile(self, *args):
        """Trace, lower and compile for ``args``' shapes and dtypes; returns the executable."""
        signature = abstract_signature(args)
        if self._signature is not None:
            self.recompiles.append("; ".join(
                signature_changes(self._signature, signature)))
        t0 = time.perf_counter()
        lowered = self._jitted.trace(*args).lower()
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        self.trace_lower_s += t1 - t0
        self.compile_s += time.perf_counter() - t1
        self.num_compiles += 1
        self._signature = signature
        return self.compiled

    def __call__(self, *args):
        if abstract_signature(args) != self._signature:
            self.compile(*args)
        return self.compiled(*args)


_IMPORTED_AT = time.perf_counter()


def process_start() -> float:
    """The ``time.perf_counter()`` reading at which this process started.

    On Linux from ``/proc/self/stat`` (start time in clock ticks since boot, 10 ms
    resolution) against ``CLOCK_BOOTTIME``, so it includes the interpreter's own
    start and every import; elsewhere the time this module was first imported.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, AttributeError, IndexError):
        return _IMPORTED_AT


def chunk_timings(t_start: float, done_at: list[float], chunk_steps: list[int]
                  ) -> dict[str, float]:
    """Step-time figures from the times at which each chunk's results reached the host.

    Args:
      t_start: ``time.perf_counter()`` just before the first chunk was dispatched
        (after compilation).
      done_at: completion time of each chunk, the last one taken after
        ``jax.block_until_ready`` on the final state (case C10).
      chunk_steps: the steps each chunk ran (the last one may run fewer).

    Returns:
      seconds: ``first_call_s`` (first chunk, dispatch to results), ``train_s`` (all
      chunks), ``step_s`` and ``step_p90_s`` (median and 90th percentile over
      chunks of interval / steps); and ``steps_per_s`` over the steady state
      (chunks after the first; the only one when there is one). Intervals are wall time between completions, so they
      include host work (metrics, MLflow) whenever the device had to wait for it.
    """
    intervals = np.diff([t_start, *done_at])
    if len(done_at) > 1:
        steady_steps, steady_s = sum(chunk_steps[1:]), done_at[-1] - done_at[0]
    else:
        steady_steps, steady_s = chunk_steps[0], done_at[0] - t_start
    per_step = intervals / np.asarray(chunk_steps)
    return {"first_call_s": float(intervals[0]), "train_s": done_at[-1] - t_start,
            "step_s": float(np.median(per_step)), "step_p90_s": float(np.quantile(per_step, 0.9)),
            "steps_per_s": steady_steps / steady_s}


def step_analysis(lowered_step, compiled_chunk) -> dict[str, float]:
    """FLOPs of one train step and buffer bytes of the compiled chunk (``RunResult.compute``).

    Args:
      lowered_step: ``jax.jit(train_step).lower(state, batch)``: XLA's cost analysis of
        the lowered step gives the FLOPs a compiled one does (a chunk's ``while`` loop
        would be counted once, not once per step), without compiling it a second time.
      compiled_chunk: the compiled chunk, the program that runs: its argument, output
        and temporary buffers (``compiled_memory``).
    """
    out: dict[str, float] = {}
    cost = compiled_cost(lowered_step)
    if "flops" in cost:
        out["flops_per_step"] = cost["flops"]
    memory = compiled_memory(compiled_chunk)
    for name in ("argument_bytes", "output_bytes", "temp_bytes"):
        if name in memory:
            out[name] = memory[name]
    return out
