"""Benchmark 2: ``jax.value_and_grad`` against separate ``loss`` and ``grad`` calls.

``jax.grad`` runs the forward pass to get the residuals its backward pass needs,
then drops the value; a training step that also wants the loss and calls ``loss``
and ``grad`` as two compiled functions runs the forward pass twice.
``value_and_grad`` returns both from one forward pass. (Inside ONE jitted function
XLA would merge the two forward passes itself; the case measured here is two
separate calls, as an eager loop or two jitted helpers make them.)

For each width W of a (W, W) tanh MLP: checked first that value_and_grad's value
equals the loss and its gradient equals ``grad``'s. Figures:
``value_and_grad/w{W}/saved_share`` = 1 - t(value_and_grad) / t(loss; grad), the
median over repeats (sampled in turn), and ``.../forward_share`` = t(loss) /
t(loss; grad), the most it could save (the forward pass's share of the pair).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax

from .harness import (HIGHER, BenchResult, Recorder, compile_timed, matmul_tol, ratio_stats,
                      time_interleaved)
from .problems import make_mlp_problem
from .. import measure

__all__ = ["Sizes", "QUICK", "run"]

NAME = "value_and_grad"


@dataclass(frozen=True)
class Sizes:
    widths: tuple[int, ...] = (64, 256, 1024)  # hidden width W of the (W, W) tanh MLP
    batch_size: int = 256                      # rows per call
    repeats: int = 15                          # timed samples of each function
    min_time_s: float = 0.05                   # one sample loops calls for at least this


QUICK = Sizes(widths=(256,), repeats=7, min_time_s=0.03)


def run(sizes: Sizes = Sizes(), workdir: Path | None = None, *,
        value_and_grad: Callable = jax.value_and_grad,
        log: Callable[[str], None] | None = print) -> BenchResult:
    """Time value_and_grad against loss + grad; see the module docstring.

    Args:
      sizes: what to run. workdir: unused (no plot).
      value_and_grad: the transformation under test (``jax.value_and_grad``); a
        test passes a broken one to see the benchmark refuse to report.
      log: where console lines go.

    Raises:
      CorrectnessError: the value or the gradient disagrees with loss or grad.
    """
    rec = Recorder(NAME, asdict(sizes), log=log)
    for width in sizes.widths:
        p = make_mlp_problem(width=width, batch_size=sizes.batch_size,
                             key=jax.random.key(1000 + width))
        args = (p.params, p.x, p.y)
        loss_c, t_loss = compile_timed(p.loss, *args)
        grad_c, t_grad = compile_timed(jax.grad(p.loss), *args)
        vg_c, t_vg = compile_timed(value_and_grad(p.loss), *args)
        for name, seconds in (("loss", t_loss), ("grad", t_grad), ("value_and_grad", t_vg)):
            rec.compiled(f"{NAME}/w{width}/{name}", seconds)

        value, grads = vg_c(*args)
        rec.check_close(f"w{width}: value_and_grad value vs loss", value, loss_c(*args),
                        rtol=matmul_tol(1e-5), atol=1e-7)
        rec.check_close(f"w{width}: value_and_grad gradient vs grad", grads, grad_c(*args),
                        rtol=matmul_tol(1e-4), atol_scale=matmul_tol(1e-6))

        samples = time_interleaved({
            "value_and_grad": lambda: vg_c(*args),
            "loss_then_grad": lambda: (loss_c(*args), grad_c(*args)),
            "loss": lambda: loss_c(*args),
        }, repeats=sizes.repeats, min_time_s=sizes.min_time_s)
        for name, values in samples.items():
            rec.timing(f"{NAME}/w{width}/{name}", measure.summarize_times(values))
        kept = ratio_stats(samples["value_and_grad"], samples["loss_then_grad"])
        forward = ratio_stats(samples["loss"], samples["loss_then_grad"])
        saved = 1.0 - kept.median_s
        # the spread of the saved share, relative to it: spread of the kept ratio in absolute
        # terms over the share
        spread = kept.spread * kept.median_s / saved if saved > 0 else kept.spread
        rec.figure(f"{NAME}/w{width}/saved_share", saved, "share", direction=HIGHER,
                   spread=abs(spread),
                   description=f"1 - t(value_and_grad) / t(loss; grad), W={width}, "
                               f"batch {sizes.batch_size}",
                   show=f"  W={width:<5} value_and_grad "
                        f"{measure.summarize_times(samples['value_and_grad']).median_s * 1e3:8.3f}"
                        f" ms, loss; grad "
                        f"{measure.summarize_times(samples['loss_then_grad']).median_s * 1e3:8.3f}"
                        f" ms: saves {saved:.1%} (the forward pass is {forward.median_s:.1%} of "
                        f"the pair)")
        rec.figure(f"{NAME}/w{width}/forward_share", forward.median_s, "share", direction=None,
                   spread=forward.spread, show=False,
                   description="t(loss) / t(loss; grad): the most value_and_grad can save")
    return rec.done()
