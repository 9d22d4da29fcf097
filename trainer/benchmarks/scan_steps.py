"""Benchmark 3: one dispatch per step against K steps in one ``lax.scan``.

A Python loop that calls a jitted single step pays the host's dispatch cost
(Python, argument handling, launching the program) on every step; a ``lax.scan``
of K steps compiled into one program pays it once per K steps. For a small net
that cost is most of a step.

The problem is a small tanh MLP (the size of the service's shipped experiments),
the service's train step (``steps.make_train_step``, Adam) on one fixed batch.
Checked first, for every K: the K scanned steps give the same per-step losses,
params and Adam state as K calls of the single compiled step.
Figures: ``scan/k{K}/steps_per_s`` (each call of the scan ends at
``block_until_ready``), ``scan/loop/steps_per_s`` (the Python loop of single
steps, dispatched asynchronously, blocked at the end of each sample), their ratio
``scan/best_over_loop`` and ``scan/flat_k``: the smallest K whose steps/s is
within ``flat_within`` (10%) of the best K's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
from jax import lax

from .harness import (HIGHER, BenchResult, Recorder, compile_timed, label_log_axes, matmul_tol,
                      ratio_stats, time_interleaved)
from .problems import make_mlp_problem
from .. import measure

__all__ = ["Sizes", "QUICK", "run", "make_scanned_steps", "flattening_k"]

NAME = "scan"


@dataclass(frozen=True)
class Sizes:
    ks: tuple[int, ...] = (1, 10, 100, 1000)  # steps per compiled lax.scan call
    width: int = 32                           # hidden width W of the (W, W) tanh MLP
    batch_size: int = 32                      # rows per step
    loop_steps: int = 1000                    # steps per call of the Python loop of single steps
    repeats: int = 11                         # timed samples of each function
    min_time_s: float = 0.1                   # one sample loops calls for at least this
    flat_within: float = 0.10                 # the curve is flat within this share of its best


QUICK = Sizes(loop_steps=200, repeats=3, min_time_s=0.04)


def make_scanned_steps(train_step: Callable, num_steps: int, *, scan: Callable = lax.scan):
    """``chunk(state, batch) -> (state, losses)``: ``num_steps`` train steps on ``batch`` in
    one ``scan``; ``losses`` is ``(num_steps,)`` float32, the loss before each step."""

    def chunk(state, batch):
        state, metrics = scan(lambda s, _: train_step(s, batch), state, None, length=num_steps)
        return state, metrics["train_loss"]

    return chunk


def flattening_k(ks: list[int], steps_per_s: list[float], within: float) -> int:
    """The smallest K whose steps/s is at least ``(1 - within)`` times the best."""
    best = max(steps_per_s)
    return min(k for k, v in zip(ks, steps_per_s) if v >= (1.0 - within) * best)


def run(sizes: Sizes = Sizes(), workdir: Path | None = None, *, scan: Callable = lax.scan,
        log: Callable[[str], None] | None = print) -> BenchResult:
    """Time the Python loop of single steps against scans of K steps; see the module docstring.

    Args:
      sizes: what to run. workdir: folder for the plot (none drawn if None).
      scan: the loop primitive under test (``jax.lax.scan``); a test passes a broken one
        to see the benchmark refuse to report.
      log: where console lines go.

    Raises:
      CorrectnessError: K scanned steps differ from K single steps.
    """
    rec = Recorder(NAME, asdict(sizes), log=log)
    p = make_mlp_problem(width=sizes.width, batch_size=sizes.batch_size, in_features=10,
                         key=jax.random.key(3))
    step_c, seconds = compile_timed(p.train_step, p.state, p.batch)
    rec.compiled(f"{NAME}/single_step", seconds)
    chunks = {}
    for k in sizes.ks:
        chunks[k], seconds = compile_timed(make_scanned_steps(p.train_step, k, scan=scan),
                                           p.state, p.batch)
        rec.compiled(f"{NAME}/k{k}", seconds)

    # K single steps from the start, their losses kept, against each scan.
    state, losses = p.state, []
    singles = {}
    for i in range(1, max(sizes.ks) + 1):
        state, metrics = step_c(state, p.batch)
        losses.append(metrics["train_loss"])
        if i in chunks:
            singles[i] = (state.params, state.opt_state, jax.numpy.stack(losses))
    for k, chunk in chunks.items():
        scanned_state, scanned_losses = chunk(p.state, p.batch)
        rec.check_close(f"{k} scanned steps vs {k} single steps (params, Adam state, losses)",
                        (scanned_state.params, scanned_state.opt_state, scanned_losses),
                        singles[k], rtol=matmul_tol(1e-4), atol_scale=matmul_tol(1e-5))

    def python_loop():
        s = p.state
        for _ in range(sizes.loop_steps):
            s, _ = step_c(s, p.batch)
        return s

    fns = {"loop": python_loop}
    fns.update({f"k{k}": (lambda chunk=chunk: chunk(p.state, p.batch))
                for k, chunk in chunks.items()})
    samples = time_interleaved(fns, repeats=sizes.repeats, min_time_s=sizes.min_time_s)
    steps_per_call = {"loop": sizes.loop_steps, **{f"k{k}": k for k in sizes.ks}}
    per_step = {name: [t / steps_per_call[name] for t in values]
                for name, values in samples.items()}
    rates = {}
    for name, values in per_step.items():
        stats = rec.timing(f"{NAME}/{name}/step", measure.summarize_times(values))
        rates[name] = 1.0 / stats.median_s
        label = "Python loop of jitted steps" if name == "loop" else f"lax.scan, K={name[1:]}"
        rec.figure(f"{NAME}/{name}/steps_per_s", rates[name], "steps/s", direction=HIGHER,
                   spread=stats.spread, description=f"{label}; W={sizes.width}, batch "
                                                    f"{sizes.batch_size}",
                   show=f"  {label:<28} {rates[name]:12,.0f} steps/s (spread {stats.spread:.0%})")
    curve = [rates[f"k{k}"] for k in sizes.ks]
    best_k = sizes.ks[curve.index(max(curve))]
    ratio = ratio_stats(per_step["loop"], per_step[f"k{best_k}"])
    rec.figure(f"{NAME}/best_over_loop", ratio.median_s, "x", direction=HIGHER,
               spread=ratio.spread, description=f"steps/s of the best scan (K={best_k}) / "
                                                "steps/s of the Python loop")
    flat = flattening_k(list(sizes.ks), curve, sizes.flat_within)
    rec.figure(f"{NAME}/flat_k", flat, "steps", direction=None,
               description=f"smallest K within {sizes.flat_within:.0%} of the best steps/s",
               show=f"  the curve flattens at K={flat} (within {sizes.flat_within:.0%} of the "
                    f"best, K={best_k}); best scan / Python loop = {ratio.median_s:.2f}x")
    if workdir is not None:
        rec.plot(_plot(list(sizes.ks), curve, rates["loop"], flat, sizes,
                       workdir / "scan_curve.png"))
    return rec.done()


def _plot(ks, curve, loop_rate, flat, sizes: Sizes, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(ks, curve, marker="o", label="K steps in one lax.scan")
    ax.axhline(loop_rate, color="tab:red", ls="--", label="Python loop, one dispatch per step")
    ax.axvline(flat, color="grey", lw=0.8, ls=":", label=f"flat from K={flat}")
    ax.set(xscale="log", xlabel="steps per compiled call K", ylabel="steps/s",
           title=f"dispatch per step against lax.scan, tanh MLP W={sizes.width}, "
                 f"batch {sizes.batch_size}")
    ax.title.set_fontsize(9)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    label_log_axes(ax, ks)
    fig.savefig(path)
    return path
