"""What a person sees: the progress bar, the loss-curve plot, the saved params, the summary.

Uses rich for the console, matplotlib (object API, no pyplot state) for plots and
orbax for the params checkpoint.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["progress_bar", "plot_training", "save_params", "print_summary", "workdir"]


@contextlib.contextmanager
def progress_bar(console, total_steps: int, *, enabled: bool = True
                 ) -> Iterator[Callable[[int, float, float], None]]:
    """Yield ``update(step, loss, steps_per_s)``; a rich progress bar when enabled.

    Called once per chunk, never per step.
    """
    if console is None or not enabled:
        yield lambda step, loss, rate: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    columns = [TextColumn("step"), MofNCompleteColumn(), BarColumn(),
               TextColumn("loss {task.fields[loss]:.4g}"),
               TextColumn("{task.fields[rate]:,.0f} steps/s"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=total_steps, loss=float("nan"), rate=0.0)

        def update(step: int, loss: float, rate: float) -> None:
            progress.update(task, completed=step, loss=loss, rate=rate)

        yield update


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """``path`` itself, or a temporary folder removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="trainer-") as tmp:
        yield Path(tmp)


def plot_training(history: dict[str, tuple[list[int], list[float]]], path: Path, *,
                  title: str) -> Path:
    """Plot train and validation loss (log scale) and the learning rate against the step.

    Args:
      history: ``{metric name: (steps, values)}`` as logged.
      path: where to write the PNG.

    Returns:
      ``path``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    ax_loss, ax_lr = fig.subplots(1, 2, width_ratios=(2, 1))
    for name, label in (("train_loss", "train"), ("val_loss", "validation")):
        if name in history:
            steps, values = history[name]
            ax_loss.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None)
    ax_loss.set(xlabel="step", ylabel="loss", title=title)
    if any(v > 0 for name in ("train_loss", "val_loss") for v in history.get(name, ([], []))[1]):
        ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if "learning_rate" in history:
        ax_lr.plot(*history["learning_rate"], color="tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_lr.grid(alpha=0.3)
    fig.savefig(path)
    return path


def save_params(params, path: Path) -> Path:
    """Save a params pytree (an ``nnx.State`` or nested dict of arrays) with orbax.

    Restore with ``orbax.checkpoint.StandardCheckpointer().restore(path)``, which
    gives the nested dict of arrays (``nnx.to_pure_dict`` layout).

    Returns:
      ``path``, a folder.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).resolve(), tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def print_summary(console, *, result, run_id: str, experiment: str, ui: str,
                  tracking_uri: str) -> None:
    """The final table: test metrics beside the linear baseline, timings, run id, UI command."""
    from rich.table import Table

    table = Table(title=f"{experiment}: test metrics after {result.num_steps} steps",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("net", justify="right")
    table.add_column("linear baseline", justify="right")
    for name, value in result.test_metrics.items():
        base = result.baseline_metrics.get(name)
        table.add_row(name, f"{value:.4f}", "" if base is None else f"{base:.4f}")
    console.print(table)
    t = result.timings
    console.print(f"params {result.num_params:,} | compile {t['compile_s']:.2f} s | "
                  f"{t['steps_per_s']:,.0f} steps/s | {t['samples_per_s']:,.0f} samples/s | "
                  f"logging {t['log_s']:.2f} s | wall {t['wall_s']:.2f} s | {result.device}")
    console.print(f"run {run_id} in {tracking_uri}")
    console.print(f"open it in the UI: {ui}")
