"""Benchmark 5: steps/s and achieved FLOP/s over width and batch, against the peak matmul rate.

The machine's peak: a large float32 matrix product ``(n, n) @ (n, n)``, 2 n³
FLOPs, timed to ``block_until_ready`` (default matmul precision, as the
training steps use; on recent NVIDIA GPUs that lets XLA use TF32). It is timed
again beside every size, in turn with that size's chunk, so each size's share
of peak is a median of per-repeat ratios: on a shared machine a peak timed once
at the start gave shares of 165% when the load later fell. The figure
``peak_matmul_flops_per_s`` is the median over all those calls.

Each size: the service's train step (``problems.make_mlp_problem``: tanh MLP with
hidden (W, W), Adam) compiled alone, and K of them in one ``lax.scan`` on one
fixed batch. FLOPs per step come from XLA's cost analysis of the single compiled
step (``measure.compiled_cost``; XLA counts a loop body once, so the scanned
chunk's count is not divided by K). Steps/s from the scanned chunk, K chosen so a
call does ``chunk_s`` seconds of work at the peak rate (at most
``max_chunk_steps``): dispatch is then a small share.
Checked first: the matmul against a float64 product of sampled rows; per size,
XLA's FLOP count is not absurdly more than the matmuls' (``flops_bounds``; the
count is what the figure rests on; where it is below the matmuls' own count,
as for GEMMs XLA hands to cuBLAS on GPU, that count is used instead and said); the
timed chunk's per-step losses equal single steps' over its first ``CHECK_STEPS``
steps, and it took K steps.
Figures: ``scaling/peak_matmul_flops_per_s``; per size
``scaling/w{W}_b{B}/{steps_per_s, flops_per_s, peak_fraction}``;
``scaling/best_peak_fraction``. Two sweeps: width at batch ``base_batch`` and
batch at width ``base_width``; plotted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .harness import (HIGHER, BenchResult, Recorder, compile_timed, label_log_axes, matmul_tol,
                      ratio_stats, time_interleaved)
from .problems import make_mlp_problem
from .scan_steps import make_scanned_steps
from .. import measure

__all__ = ["Sizes", "QUICK", "run", "dense_flops_per_step", "flops_bounds", "plot_scaling"]

NAME = "scaling"
IN_FEATURES = 32   # columns of x in every size
CHECK_STEPS = 16   # scanned steps checked one by one against the single step


@dataclass(frozen=True)
class Sizes:
    widths: tuple[int, ...] = (16, 64, 256, 1024, 4096)      # W swept at batch base_batch
    batches: tuple[int, ...] = (1, 16, 256, 2048, 8192)      # B swept at width base_width
    base_width: int = 256                                    # W of the batch sweep
    base_batch: int = 256                                    # B of the width sweep
    matmul_n: int | None = None    # side of the peak matmul; None: 2048 on CPU, 8192 on GPU
    chunk_s: float = 0.05          # a scanned call does this many seconds of work at peak FLOP/s
    max_chunk_steps: int = 500     # K at most this
    repeats: int = 7               # timed calls per size
    min_time_s: float = 0.05       # a sample (chunk or matmul) repeats calls for at least this


QUICK = Sizes(widths=(16, 256), batches=(1, 256), matmul_n=1024, chunk_s=0.02, repeats=3,
              min_time_s=0.02)


def dense_flops_per_step(width: int, batch_size: int, in_features: int = IN_FEATURES,
                         out_features: int = 1) -> float:
    """The matmul FLOPs of one train step of the (W, W) MLP: per layer 2 B fan_in fan_out
    forward, the same for the kernel's gradient and, except for the first layer (whose
    input needs no gradient), the same for the gradient of its input."""
    fans = [in_features * width, width * width, width * out_features]
    return 2.0 * batch_size * (3 * sum(fans) - fans[0])


def flops_bounds(width: int, batch_size: int, num_params: int) -> tuple[float, float]:
    """What XLA's count of one step may be: at least the matmuls; at most twice them plus
    100 FLOPs per parameter (Adam) and per activation (tanh and its derivative)."""
    dense = dense_flops_per_step(width, batch_size)
    return dense, 2 * dense + 100.0 * (num_params + batch_size * (2 * width + 1))


def _checked_matmul(rec: Recorder, n: int) -> Callable[[], jax.Array]:
    """The compiled ``(n, n) @ (n, n)`` float32 product on fixed random inputs, as a
    zero-argument function, after checking it against float64 on sampled rows."""
    ka, kb = jax.random.split(jax.random.key(5))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    matmul, seconds = compile_timed(jnp.matmul, a, b)
    rec.compiled(f"{NAME}/matmul_n{n}", seconds)
    rows = np.arange(0, n, max(1, n // 16))
    got = np.asarray(matmul(a, b))[rows]
    want = np.asarray(a, np.float64)[rows] @ np.asarray(b, np.float64)
    # TF32 on GPUs keeps 10 mantissa bits: relative errors about 1e-3 of the row norm
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    rec.check_true(f"{n}x{n} float32 matmul vs float64 on sampled rows (relative error "
                   f"{rel:.2g} <= 1e-2)", rel <= 1e-2, f"relative error {rel:.3g}")
    return lambda: matmul(a, b)


def run(sizes: Sizes = Sizes(), workdir: Path | None = None, *,
        log: Callable[[str], None] | None = print) -> BenchResult:
    """Measure throughput over width and batch; see the module docstring.

    Raises:
      CorrectnessError: the matmul, a FLOP count or a scanned chunk is wrong.
    """
    rec = Recorder(NAME, asdict(sizes), log=log)
    n = sizes.matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
    matmul = _checked_matmul(rec, n)
    matmul_flops = 2.0 * n**3
    matmul_samples = list(time_interleaved({"matmul": matmul}, repeats=sizes.repeats,
                                           min_time_s=0.2)["matmul"])
    first_peak = matmul_flops / measure.summarize_times(matmul_samples).median_s
    rec.note(f"float32 {n}x{n} matmul: {first_peak / 1e9:,.1f} GFLOP/s (measured again beside "
             "every size below)")
    cases = [(w, sizes.base_batch) for w in sizes.widths]
    cases += [(sizes.base_width, b) for b in sizes.batches if (sizes.base_width, b) not in cases]
    points: dict[tuple[int, int], dict[str, float]] = {}
    for width, batch in cases:
        p = make_mlp_problem(width=width, batch_size=batch, in_features=IN_FEATURES,
                             key=jax.random.key(width * 100_003 + batch))
        tag = f"{NAME}/w{width}_b{batch}"
        step_c, seconds = compile_timed(p.train_step, p.state, p.batch)
        rec.compiled(f"{tag}/step", seconds)
        xla_flops = measure.compiled_cost(step_c).get("flops", math.nan)
        low, high = flops_bounds(width, batch, p.num_params)
        rec.check_true(f"W={width} B={batch}: XLA's FLOPs per step ({xla_flops:.4g}) not above "
                       f"{high:.4g} (matmuls x 2 + elementwise)", not xla_flops > high,
                       f"XLA counts {xla_flops:.4g}")
        if low <= xla_flops:
            flops = xla_flops
        else:
            # Seen on GPU: matmuls that XLA hands to a library (cuBLAS custom calls) are not
            # in its cost analysis. Then the matmuls' own count, a lower bound, is used.
            flops = low
            rec.note(f"W={width} B={batch}: XLA's cost analysis counts {xla_flops:.4g} FLOPs, "
                     f"fewer than the matmuls' {low:.4g} (library GEMMs go uncounted); FLOP/s "
                     "here use the matmul count, a lower bound")

        # K so that a call does about chunk_s of work at the peak rate (at least 1 step).
        k = int(min(sizes.max_chunk_steps, max(1, round(sizes.chunk_s * first_peak / flops))))
        chunk_c, seconds = compile_timed(make_scanned_steps(p.train_step, k), p.state, p.batch)
        rec.compiled(f"{tag}/chunk", seconds)
        # The timed chunk's own losses against single steps, over its first steps only: a
        # single example (B=1) is fitted within a few hundred steps, after which gradients
        # are rounding noise and two correct programs part ways.
        m = min(k, CHECK_STEPS)
        state, single_losses = p.state, []
        for _ in range(m):
            state, metrics = step_c(state, p.batch)
            single_losses.append(metrics["train_loss"])
        scanned, losses = chunk_c(p.state, p.batch)
        rec.check_close(f"W={width} B={batch}: losses of the first {m} of {k} scanned steps vs "
                        f"{m} single steps", losses[:m], jnp.stack(single_losses),
                        rtol=matmul_tol(1e-5), atol=1e-7)
        rec.check_true(f"W={width} B={batch}: the chunk took {k} steps",
                       int(scanned.step) == k and bool(jnp.isfinite(losses).all()),
                       f"step counter {int(scanned.step)}")

        # The chunk and the peak matmul in turn, so the share of peak is a per-repeat ratio
        # that a shared machine's changing load cancels out of.
        samples = time_interleaved({"chunk": lambda: chunk_c(p.state, p.batch),
                                    "matmul": matmul},
                                   repeats=sizes.repeats, min_time_s=sizes.min_time_s)
        matmul_samples += samples["matmul"]
        stats = rec.timing(f"{tag}/chunk", measure.summarize_times(samples["chunk"]))
        share = ratio_stats(samples["matmul"], samples["chunk"])
        fraction = share.median_s * flops * k / matmul_flops
        steps_per_s = k / stats.median_s
        achieved = flops * steps_per_s
        points[(width, batch)] = {"steps_per_s": steps_per_s, "flops_per_s": achieved,
                                  "peak_fraction": fraction, "spread": share.spread}
        rec.figure(f"{tag}/steps_per_s", steps_per_s, "steps/s", direction=HIGHER,
                   spread=stats.spread, show=False,
                   description=f"train steps/s, hidden ({width}, {width}), batch {batch}, "
                               f"{k} steps per call")
        rec.figure(f"{tag}/flops_per_step", flops, "FLOP", direction=None, show=False,
                   description="XLA cost analysis of the single compiled step, or the "
                               "matmuls' count where XLA's is below it")
        rec.figure(f"{tag}/flops_per_step_xla", xla_flops, "FLOP", direction=None, show=False,
                   description="XLA cost analysis of the single compiled step, as reported")
        rec.figure(f"{tag}/flops_per_s", achieved, "FLOP/s", direction=HIGHER,
                   spread=stats.spread, show=False, description="flops_per_step x steps/s")
        rec.figure(f"{tag}/peak_fraction", fraction, "share", direction=HIGHER,
                   spread=share.spread,
                   description="achieved FLOP/s / peak matmul FLOP/s, per repeat (timed in "
                               "turn), median",
                   show=f"  W={width:<5} B={batch:<5} K={k:<4} {steps_per_s:12,.1f} steps/s  "
                        f"{achieved / 1e9:9.2f} GFLOP/s  {fraction:6.1%} of peak "
                        f"(spread {share.spread:.0%})")
    peak_stats = rec.timing(f"{NAME}/matmul_n{n}", measure.summarize_times(matmul_samples))
    peak = matmul_flops / peak_stats.median_s
    rec.figure(f"{NAME}/peak_matmul_flops_per_s", peak, "FLOP/s", direction=HIGHER,
               spread=peak_stats.spread,
               description=f"float32 ({n}, {n}) @ ({n}, {n}), 2 n^3 FLOPs, median over the run",
               show=f"  peak: float32 {n}x{n} matmul {peak / 1e9:,.1f} GFLOP/s, median of "
                    f"{len(matmul_samples)} calls over the run (spread {peak_stats.spread:.0%})")
    best = max(points, key=lambda c: points[c]["peak_fraction"])
    rec.figure(f"{NAME}/best_peak_fraction", points[best]["peak_fraction"], "share",
               direction=HIGHER, spread=points[best]["spread"],
               description=f"best achieved / peak (at W={best[0]}, B={best[1]})",
               show=f"  best: {points[best]['peak_fraction']:.1%} of the peak matmul rate at "
                    f"W={best[0]}, B={best[1]}")
    if workdir is not None:
        rec.plot(plot_scaling(points, peak, sizes, workdir / "scaling.png"))
    return rec.done()


def plot_scaling(points: dict[tuple[int, int], dict[str, float]], peak: float, sizes: Sizes,
                 path: Path, *, device: str | None = None) -> Path:
    """FLOP/s (with the peak) and steps/s against width and against batch; returns ``path``.

    ``device`` names the machine in the title (default: this process's JAX device)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), dpi=110, layout="constrained")
    axes = fig.subplots(2, 2)
    sweeps = (("width", [(w, sizes.base_batch) for w in sizes.widths], 0,
               f"hidden width W (batch {sizes.base_batch})"),
              ("batch", [(sizes.base_width, b) for b in sizes.batches], 1,
               f"batch B (width {sizes.base_width})"))
    for _, cases, index, xlabel in sweeps:
        xs = [c[index] for c in cases]
        top, bottom = axes[0][index], axes[1][index]
        top.plot(xs, [points[c]["flops_per_s"] / 1e9 for c in cases], marker="o",
                 label="train step")
        top.axhline(peak / 1e9, color="tab:red", ls="--",
                    label="peak: float32 matmul, default precision")
        top.set(xscale="log", yscale="log", ylabel="GFLOP/s", xlabel=xlabel)
        for c, x in zip(cases, xs):
            top.annotate(f"{100 * points[c]['peak_fraction']:.2g}%",
                         (x, points[c]["flops_per_s"] / 1e9),
                         textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        bottom.plot(xs, [points[c]["steps_per_s"] for c in cases], marker="s",
                    color="tab:green")
        bottom.set(xscale="log", yscale="log", ylabel="steps/s", xlabel=xlabel)
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
            label_log_axes(ax, xs)
        top.legend(fontsize=8)
    device = device or f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    fig.suptitle(f"tanh MLP (W, W) train step with Adam, {device}; labels: share of peak")
    fig.savefig(path)
    return path
