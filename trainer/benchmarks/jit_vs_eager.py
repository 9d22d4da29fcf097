"""Benchmark 1: ``jax.jit`` against eager (op-by-op) execution, for the loss and the train step.

Eager means calling the same Python function without ``jax.jit``: JAX then
dispatches every primitive on its own (op by op), with Python, Flax's
``nnx.merge`` and optax running on every call. Jitted, the whole function is one
XLA program, fused and dispatched once.

For each hidden width W of a (W, W) tanh MLP (``problems.make_mlp_problem``):
  * the loss ``(params, x, y) -> ()``;
  * the full train step ``steps.make_train_step`` (loss, ``value_and_grad``,
    Adam update, gradient norm, non-finite guard).
Checked first: the jitted loss equals the eager loss, and one jitted step gives
the eager step's loss, gradient norm, new params and optimizer state.
Figure: ``jit/{loss,step}/w{W}/speedup`` = eager time / jit time, the median of
per-repeat ratios (jit and eager sampled in turn).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from .harness import (HIGHER, BenchResult, Recorder, compile_timed, label_log_axes, matmul_tol,
                      ratio_stats, time_interleaved)
from .problems import LEARNING_RATE, make_mlp_problem
from .. import measure

__all__ = ["Sizes", "QUICK", "run"]

NAME = "jit"


@dataclass(frozen=True)
class Sizes:
    widths: tuple[int, ...] = (16, 64, 256, 1024)  # hidden width W of the (W, W) tanh MLP
    batch_size: int = 64                            # rows per call
    repeats: int = 11                               # timed samples of each function
    min_time_s: float = 0.05                        # one sample loops calls for at least this


QUICK = Sizes(widths=(16, 256), repeats=3, min_time_s=0.02)


def run(sizes: Sizes = Sizes(), workdir: Path | None = None, *, jit: Callable = jax.jit,
        log: Callable[[str], None] | None = print) -> BenchResult:
    """Time jit against eager; see the module docstring.

    Args:
      sizes: what to run. workdir: folder for the plot (none drawn if None).
      jit: the transformation under test (``jax.jit``); a test passes a broken one
        to see the benchmark refuse to report.
      log: where console lines go.

    Raises:
      CorrectnessError: the jitted loss or step disagrees with the eager one.
    """
    rec = Recorder(NAME, asdict(sizes), log=log)
    speedups: dict[str, list[tuple[int, float]]] = {"loss": [], "step": []}
    for width in sizes.widths:
        p = make_mlp_problem(width=width, batch_size=sizes.batch_size, key=jax.random.key(width))
        loss_c, loss_compile_s = compile_timed(jit(p.loss), p.params, p.x, p.y)
        step_c, step_compile_s = compile_timed(jit(p.train_step), p.state, p.batch)
        rec.compiled(f"{NAME}/loss/w{width}", loss_compile_s)
        rec.compiled(f"{NAME}/step/w{width}", step_compile_s)

        rec.check_close(f"loss w{width}: jit vs eager", loss_c(p.params, p.x, p.y),
                        p.loss(p.params, p.x, p.y), rtol=matmul_tol(1e-5), atol=1e-7)
        jit_state, jit_metrics = step_c(p.state, p.batch)
        eager_state, eager_metrics = p.train_step(p.state, p.batch)
        rec.check_close(f"train step w{width}: jit vs eager (loss, grad norm, Adam moments)",
                        (jit_metrics["train_loss"], jit_metrics["grad_norm"], jit_state.opt_state),
                        (eager_metrics["train_loss"], eager_metrics["grad_norm"],
                         eager_state.opt_state), rtol=matmul_tol(1e-4),
                        atol_scale=matmul_tol(1e-5))
        # Adam's first update is lr * g / (|g| + eps), about lr * sign(g): where g is within
        # rounding of zero (the matmul error, under TF32 on GPUs) its sign, and so the update,
        # can flip between two correct programs. Elsewhere new params agree to 5% of lr.
        mu = optax.tree_utils.tree_get(eager_state.opt_state, "mu")  # (1 - b1) * g
        threshold = matmul_tol(0.0) * max(float(jnp.max(jnp.abs(m))) for m in jax.tree.leaves(mu))
        clear = jax.tree.map(lambda m: jnp.abs(m) > threshold, mu)
        keep = lambda tree: jax.tree.map(lambda c, v: jnp.where(c, v, 0.0), clear, tree)  # noqa
        rec.check_close(f"train step w{width}: jit vs eager (new params where the gradient is "
                        "clear of rounding)", keep(jit_state.params), keep(eager_state.params),
                        rtol=matmul_tol(1e-4), atol=0.05 * LEARNING_RATE)
        rec.check_close(f"train step w{width}: jit vs eager (all new params, within Adam's "
                        "first step 2 lr)", jit_state.params, eager_state.params, rtol=0.0,
                        atol=2.05 * LEARNING_RATE)

        samples = time_interleaved({
            "loss/jit": lambda: loss_c(p.params, p.x, p.y),
            "loss/eager": lambda: p.loss(p.params, p.x, p.y),
            "step/jit": lambda: step_c(p.state, p.batch),
            "step/eager": lambda: p.train_step(p.state, p.batch),
        }, repeats=sizes.repeats, min_time_s=sizes.min_time_s)
        for what in ("loss", "step"):
            jit_s = rec.timing(f"{NAME}/{what}/w{width}/jit",
                               measure.summarize_times(samples[f"{what}/jit"]))
            eager_s = rec.timing(f"{NAME}/{what}/w{width}/eager",
                                 measure.summarize_times(samples[f"{what}/eager"]))
            ratio = ratio_stats(samples[f"{what}/eager"], samples[f"{what}/jit"])
            rec.figure(f"{NAME}/{what}/w{width}/speedup", ratio.median_s, "x", direction=HIGHER,
                       spread=ratio.spread,
                       description=f"eager {what} time / jitted {what} time, hidden (W, W), "
                                   f"W={width}, batch {sizes.batch_size}",
                       show=f"  {what:<4} W={width:<5} jit {jit_s.median_s * 1e3:9.3f} ms  "
                            f"eager {eager_s.median_s * 1e3:9.3f} ms  speed-up "
                            f"{ratio.median_s:7.1f}x (spread {ratio.spread:.0%})")
            speedups[what].append((width, ratio.median_s))
    if workdir is not None:
        rec.plot(_plot(speedups, workdir / "jit_speedup.png", batch_size=sizes.batch_size))
    return rec.done()


def _plot(speedups: dict[str, list[tuple[int, float]]], path: Path, *, batch_size: int) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for what, points in speedups.items():
        widths, values = zip(*points)
        ax.plot(widths, values, marker="o", label=f"{what} (eager / jit)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="hidden width W", ylabel="speed-up of jax.jit",
           title=f"jit against eager, tanh MLP (W, W), batch {batch_size}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    label_log_axes(ax, widths)
    fig.savefig(path)
    return path
