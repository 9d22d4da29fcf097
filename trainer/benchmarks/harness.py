"""What every benchmark shares: correctness checks, interleaved blocked timing, and the record.

A benchmark builds its computations, compiles them (compile time timed apart),
CHECKS that they compute the right thing, then times them and reports figures,
in that order. ``Recorder`` enforces the order: it refuses a timing or a figure
before a check has passed, and a failed check raises ``CorrectnessError`` before
anything is timed, so a wrong result never gets a time.

Figures are what the suite tracks over time. Each carries a direction
(``"higher"`` or ``"lower"`` is better, or ``None`` for a figure that is only
information) and a relative spread, which ``compare`` uses to tell a regression
from noise. Timings are the raw evidence behind them (median and spread of the
seconds per call).

Part of the numerical side: no MLflow, no file I/O beyond the plots a benchmark
saves into the folder it is given.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from .. import measure

__all__ = ["CorrectnessError", "Figure", "Check", "BenchResult", "Recorder", "max_errors",
           "matmul_rel_err", "matmul_tol",
           "compile_timed", "time_interleaved", "ratio_stats", "format_value", "label_log_axes"]

HIGHER, LOWER = "higher", "lower"  # which way a figure is better
MATMUL_TOL_FACTOR = 20.0  # tolerances of matmul results: at least this x the measured matmul error


class CorrectnessError(AssertionError):
    """A benchmark computed a wrong result; it reports no time for it."""


@dataclass(frozen=True)
class Figure:
    """One tracked number.

    Attributes:
      name: metric name, ``/``-separated, e.g. ``jit/step/w256/speedup``.
      value: the figure, in ``unit``.
      unit: e.g. ``"x"`` (ratio), ``"steps/s"``, ``"bytes"``, ``"FLOP/s"``, ``"share"``.
      direction: ``"higher"`` or ``"lower"`` is better; ``None``: information only,
        never a regression.
      spread: relative spread of the figure within this run (``(p90 - p10) / median``
        of its repeats); 0 for deterministic figures such as compiled bytes.
      description: one line saying what it is.
    """

    name: str
    value: float
    unit: str
    direction: str | None
    spread: float
    description: str = ""


@dataclass(frozen=True)
class Check:
    """One passed correctness check: ``what`` agreed with its reference.

    Attributes:
      what: what was compared with what.
      max_abs_err: largest absolute difference over all leaves.
      max_rel_err: largest ``|got - want| / |want|`` over elements where ``want != 0``.
      rtol, atol, atol_scale: the tolerance it met (``Recorder.check_close``).
    """

    what: str
    max_abs_err: float
    max_rel_err: float
    rtol: float
    atol: float
    atol_scale: float = 0.0


@dataclass
class BenchResult:
    """What one benchmark measured; only made once all its checks passed.

    Attributes:
      name: the benchmark (``jit``, ``value_and_grad``, ...).
      sizes: the sizes it ran with (a flat dict of plain values).
      figures: tracked figures, in the order reported.
      timings: raw timings, ``{name: TimingStats}`` (seconds per call).
      compile_s: seconds to trace, lower and compile each compiled function, by name.
      checks: the correctness checks that passed.
      plots: image files written into the benchmark's workdir.
      notes: human lines for the console summary.
      wall_s: the benchmark's wall time.
    """

    name: str
    sizes: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    timings: dict[str, measure.TimingStats] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Every number as an MLflow metric: figures (and ``<figure>_spread`` where a figure
        has one), ``<timing>/median_s``, ``<timing>/spread``, ``<name>/compile_s``."""
        out: dict[str, float] = {}
        for f in self.figures:
            out[f.name] = f.value
            if f.direction is not None:
                out[f"{f.name}_spread"] = f.spread
        for name, stats in self.timings.items():
            out[f"{name}/median_s"] = stats.median_s
            out[f"{name}/spread"] = stats.spread
        for name, seconds in self.compile_s.items():
            out[f"{name}/compile_s"] = seconds
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: figures with their direction, unit and spread; timings; checks."""
        return {
            "name": self.name, "sizes": self.sizes, "wall_s": self.wall_s,
            "figures": {f.name: {k: v for k, v in asdict(f).items() if k != "name"}
                        for f in self.figures},
            "timings": {k: v.as_dict() for k, v in self.timings.items()},
            "compile_s": self.compile_s,
            "checks": [asdict(c) for c in self.checks],
            "plots": [p.name for p in self.plots],
            "notes": self.notes,
        }


@functools.cache
def matmul_rel_err() -> float:
    """Relative error of a float32 matmul at the default precision, measured on this backend.

    ``||A @ B - ref|| / ||ref||`` for random (256, 256) A, B, ``ref`` at
    ``Precision.HIGHEST``. About 0 on CPU (true float32); about 3e-4 on NVIDIA GPUs
    from Ampere on, where the default lets XLA use TF32 (10 mantissa bits); more
    where it means bf16 passes (TPUs). Two correct programs that order their
    matmuls differently disagree by about this much, so checks that compare them
    scale their tolerance by it (``matmul_tol``).
    """
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (256, 256), jax.numpy.float32)
    b = jax.random.normal(kb, (256, 256), jax.numpy.float32)
    default = np.asarray(jax.jit(jax.numpy.matmul)(a, b), np.float64)
    highest = np.asarray(jax.jit(lambda x, y: jax.numpy.matmul(
        x, y, precision=jax.lax.Precision.HIGHEST))(a, b), np.float64)
    return float(np.linalg.norm(default - highest) / np.linalg.norm(highest))


def matmul_tol(tol: float) -> float:
    """``tol``, or ``MATMUL_TOL_FACTOR`` x the measured default-precision matmul error when
    that is larger (GPU TF32, TPU bf16): the tolerance for comparing two programs that
    both multiply matrices at the default precision."""
    return max(tol, MATMUL_TOL_FACTOR * matmul_rel_err())


def max_errors(got, want) -> tuple[float, float]:
    """``(max_abs_err, max_rel_err)`` between two pytrees of arrays of the same structure;
    the relative error is taken over elements where ``want != 0``."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    abs_err = rel_err = 0.0
    for g, w in zip(got_leaves, want_leaves):
        g = np.asarray(g, np.float64)
        w = np.asarray(w, np.float64)
        diff = np.abs(g - w)
        if diff.size:
            abs_err = max(abs_err, float(np.max(diff)))
            nz = w != 0
            if np.any(nz):
                rel_err = max(rel_err, float(np.max(diff[nz] / np.abs(w[nz]))))
    return abs_err, rel_err


class Recorder:
    """Collects one benchmark's checks, timings and figures, in that order.

    Args:
      name: the benchmark's name; sizes: the sizes it runs with (a flat dict).
      log: called with one human line per reported figure (``print`` by default).
    """

    def __init__(self, name: str, sizes: dict[str, Any], *,
                 log: Callable[[str], None] | None = print):
        self.result = BenchResult(name=name, sizes=dict(sizes))
        self._log = log or (lambda line: None)
        self._t0 = time.perf_counter()

    def check_close(self, what: str, got, want, *, rtol: float, atol: float = 0.0,
                    atol_scale: float = 0.0) -> Check:
        """Require ``|got - want| <= atol + atol_scale * max|want_leaf| + rtol * |want|``
        elementwise over two pytrees.

        ``atol_scale`` makes the absolute tolerance a fraction of each leaf's largest
        reference value, for leaves whose scale is not known in advance (gradients,
        optimizer moments), where elements that cancel to near zero carry rounding
        error of the leaf's scale, not of their own.

        Raises:
          CorrectnessError: naming ``what``, the worst element's error and the
            tolerance, when the trees differ in structure or shape, a value is not
            finite, or an element is out of tolerance.
        """
        got_def, want_def = jax.tree.structure(got), jax.tree.structure(want)
        if got_def != want_def:
            self._fail(what, f"the result's structure {got_def} is not the reference's "
                             f"{want_def}")
        worst = 0.0
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            g = np.asarray(g, np.float64)
            w = np.asarray(w, np.float64)
            if g.shape != w.shape:
                self._fail(what, f"shape {g.shape} is not the reference's {w.shape}")
            if not (np.all(np.isfinite(g)) and np.all(np.isfinite(w))):
                self._fail(what, "a value is NaN or infinite")
            if g.size:
                leaf_atol = atol + atol_scale * float(np.max(np.abs(w)))
                worst = max(worst, float(np.max(np.abs(g - w) - (leaf_atol + rtol * np.abs(w)))))
        abs_err, rel_err = max_errors(got, want)
        if worst > 0:
            self._fail(what, f"results differ beyond tolerance (largest absolute error "
                             f"{abs_err:.3g}, relative {rel_err:.3g}; allowed atol {atol:g} + "
                             f"rtol {rtol:g} x |reference|"
                       + (f" + {atol_scale:g} x the leaf's largest |reference|"
                          if atol_scale else "") + ")")
        check = Check(what, abs_err, rel_err, rtol, atol, atol_scale)
        self.result.checks.append(check)
        return check

    def check_true(self, what: str, ok: bool, detail: str = "") -> None:
        """Require a condition that is not a numerical comparison.

        Raises:
          CorrectnessError: when ``ok`` is false, naming ``what`` and ``detail``.
        """
        if not ok:
            self._fail(what, f"does not hold{': ' + detail if detail else ''}")
        self.result.checks.append(Check(what, 0.0, 0.0, 0.0, 0.0))

    def _fail(self, what: str, why: str):
        raise CorrectnessError(f"{self.result.name}: {what}: {why}; no time is reported for a "
                               "wrong result")

    def _require_checked(self, what: str) -> None:
        if not self.result.checks:
            raise RuntimeError(f"{self.result.name}: {what} reported before any correctness "
                               "check passed; check the result first")

    def compiled(self, name: str, seconds: float) -> None:
        """Record the compile time of ``name`` (kept apart from every step time)."""
        self.result.compile_s[name] = float(seconds)

    def timing(self, name: str, stats: measure.TimingStats) -> measure.TimingStats:
        """Record raw timings (seconds per call) of ``name``."""
        self._require_checked(f"timing {name}")
        self.result.timings[name] = stats
        return stats

    def figure(self, name: str, value: float, unit: str, *, direction: str | None,
               spread: float = 0.0, description: str = "",
               show: str | bool | None = None) -> Figure:
        """Record a tracked figure; ``show`` is its console line (a default one if None,
        none if False)."""
        self._require_checked(f"figure {name}")
        if direction not in (HIGHER, LOWER, None):
            raise ValueError(f"direction must be 'higher', 'lower' or None, not {direction!r}")
        fig = Figure(name, float(value), unit, direction,
                     float(spread) if math.isfinite(spread) else 0.0, description)
        self.result.figures.append(fig)
        if show is not False:
            self._log(show or f"  {name:<44} {format_value(value, unit):>14}"
                      + (f"  (spread {spread:.0%})" if spread else ""))
        return fig

    def plot(self, path: Path) -> None:
        """Record an image written into the workdir."""
        self.result.plots.append(Path(path))

    def note(self, line: str) -> None:
        """A human line for the summary (also printed)."""
        self.result.notes.append(line)
        self._log(f"  {line}")

    def done(self) -> BenchResult:
        """The result, with its wall time."""
        self.result.wall_s = time.perf_counter() - self._t0
        return self.result


def format_value(value: float, unit: str) -> str:
    """A figure for people: MiB for bytes, GFLOP/s, percent for shares, ``x`` for ratios."""
    if unit == "bytes":
        return f"{value / 2**20:,.2f} MiB"
    if unit == "FLOP/s":
        return f"{value / 1e9:,.2f} GFLOP/s"
    if unit == "share":
        return f"{value:.1%}"
    if unit == "x":
        return f"{value:,.3g}x"
    if abs(value) >= 1000:
        return f"{value:,.0f} {unit}"
    return f"{value:.4g} {unit}"


def compile_timed(fn: Callable, *args, static_argnums=()) -> tuple[Any, float]:
    """``jax.jit(fn)`` traced, lowered and compiled for ``args``, and the seconds it took.

    ``fn`` may already be a ``jax.jit`` function (then it is lowered directly). The
    compiled object runs without further tracing, so step timings never include
    compilation (case C10).

    Returns:
      ``(compiled, compile_s)``: a ``jax.stages.Compiled`` and seconds.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, static_argnums=static_argnums)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, min_time_s: float,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, sampled in turn.

    Each repeat takes one sample of every function, one after the other, so slow
    drifts of a shared machine hit all of them alike and per-repeat ratios cancel
    them. A sample calls its function until ``min_time_s`` has passed, each call
    ending at ``jax.block_until_ready`` (``measure.time_blocked``), and reports
    seconds per call.

    Returns:
      ``{name: [seconds per call, one per repeat]}``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(
                measure.time_blocked(fn, warmup=0, repeats=1, min_time_s=min_time_s).median_s)
    return samples


def ratio_stats(numerator: list[float], denominator: list[float]) -> measure.TimingStats:
    """Order statistics of the per-repeat ratios ``numerator[i] / denominator[i]``
    (``median_s`` holds the median ratio; the fields are unitless here)."""
    return measure.summarize_times([a / b for a, b in zip(numerator, denominator)])


def label_log_axes(ax, xticks=None) -> None:
    """Plain numbers on a matplotlib axes' log scales (``1024``, not ``2 x 10^3``): x ticks
    at ``xticks`` (the measured sizes) when given, no minor tick labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
    if xticks is not None:
        ax.set_xticks(list(xticks))
        ax.xaxis.set_minor_formatter(NullFormatter())
