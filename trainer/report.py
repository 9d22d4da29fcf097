"""What a person sees: the progress bar, the loss-curve plot, the saved params, the summary.

Uses rich for the console, matplotlib (object API, no pyplot state) for plots and
orbax for the params checkpoint.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["progress_bar", "loss_label", "plot_training", "plot_gradcheck", "save_params",
           "print_summary", "write_members_csv", "plot_sweep", "plot_member_curves",
           "print_population", "print_examples", "workdir"]


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


def loss_label(task: str, *, custom: bool = False) -> str:
    """What the training loss is, for axis labels: the loss the curves ``train_loss`` and
    ``val_loss`` hold, on the standardised target (not the test metrics' target units)."""
    if custom:
        return "loss (the run's own loss_fn)"
    if task == "regression":
        return "MSE on the standardised target"
    return "cross-entropy (nats per row)"


def plot_training(history: dict[str, tuple[list[int], list[float]]], path: Path, *,
                  title: str, loss: str = "loss") -> Path:
    """Plot train and validation loss (log scale) and the learning rate against the step.

    Args:
      history: ``{metric name: (steps, values)}`` as logged.
      path: where to write the PNG.
      title: names the data and the model.
      loss: what the loss is, with its unit (``loss_label``): the loss axis's label.

    Returns:
      ``path``.
    """
    from matplotlib.figure import Figure

    # fixed margins: the constrained layout engine doubled this plot's time (0.5 s -> 0.25 s
    # here), which a population pays once per member
    fig = Figure(figsize=(9, 4), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.92, wspace=0.28)
    ax_loss, ax_lr = fig.subplots(1, 2, width_ratios=(2, 1))
    for name, label in (("train_loss", "train"), ("val_loss", "validation")):
        if name in history:
            steps, values = history[name]
            ax_loss.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None)
    ax_loss.set(xlabel="step", ylabel=loss)
    ax_loss.set_title(title, y=1.0)  # a fixed y: matplotlib's auto placement measures every tick label
    if any(v > 0 for name in ("train_loss", "val_loss") for v in history.get(name, ([], []))[1]):
        ax_loss.set_yscale("log")
        _plain_log_labels(ax_loss.yaxis)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if "learning_rate" in history:
        ax_lr.plot(*history["learning_rate"], color="tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate")
    ax_lr.set_title("learning rate", y=1.0)
    ax_lr.grid(alpha=0.3)
    fig.savefig(path)
    return path


def plot_gradcheck(reports: list, path: Path, *, rel_tol: float | None = None) -> Path:
    """Plot gradient-check errors per tensor over the steps checked; for the tied model
    also the norms of Θ's inner-use and outer-use gradient terms and their cosine.

    Args:
      reports: ``[(step, figures)]``, ``figures`` a report's ``figures()``:
        ``gradcheck/<tensor>/rel_err``, ``gradcheck/theta_inner_norm``, ...
      path: where to write the PNG.
      rel_tol: drawn as the pass line when given.

    Returns:
      ``path``.
    """
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[int], list[float]]] = {}
    for step, figures in reports:
        for name, value in figures.items():
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    tied = "gradcheck/theta_inner_norm" in series
    # fixed margins: a layout engine would double the time of this plot (~0.1 s)
    fig = Figure(figsize=(11 if tied else 6, 4.2), dpi=100)
    fig.subplots_adjust(left=0.1 if tied else 0.14, right=0.93 if tied else 0.97, bottom=0.12,
                        top=0.92, wspace=0.3)
    axes = fig.subplots(1, 2 if tied else 1, squeeze=False)[0]
    ax = axes[0]
    markers = {"marker": "o"}
    for name, (steps, values) in sorted(series.items()):
        if name.endswith("/rel_err") and name.count("/") >= 2:
            tensor = name[len("gradcheck/"):-len("/rel_err")]
            ax.plot(steps, [max(v, 1e-17) for v in values], label=tensor, **markers)
    if "gradcheck/jvp_vjp_rel_err" in series:
        steps, values = series["gradcheck/jvp_vjp_rel_err"]
        ax.plot(steps, [max(v, 1e-17) for v in values], "k--", label="jvp vs vjp", **markers)
    if rel_tol is not None:
        ax.axhline(rel_tol, color="tab:red", lw=1, label=f"tolerance {rel_tol:g}")
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)
    ax.set(xlabel="step", ylabel="relative error (float64)")
    ax.set_title("autodiff vs finite differences, per tensor", y=1.0)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    if tied:
        ax = axes[1]
        for name, label in (("gradcheck/theta_inner_norm", "inner use"),
                            ("gradcheck/theta_outer_norm", "outer use")):
            ax.plot(*series[name], label=label, **markers)
        ax.set(xlabel="step", ylabel="norm of the term of dL/dΘ")
        ax.set_title("tied Θ: the two terms of its gradient", y=1.0)
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(*series["gradcheck/theta_inner_outer_cos"], color="tab:gray", ls=":",
                  label="cosine between them", **markers)
        twin.set(ylabel="cosine", ylim=(-1.05, 1.05))
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small")
    fig.savefig(path)
    return path


_SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _plain_log_labels(axis) -> None:
    """Label a log axis in plain text (10⁻⁸, 6×10⁻¹). Matplotlib's default formatter
    typesets every label with mathtext, whose parser was a fifth of a plot's time;
    which ticks get a label is still matplotlib's ``LogFormatter`` rule."""
    import math

    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            exponent = math.floor(math.log10(x) + 1e-9)
            coeff = round(x / 10.0 ** exponent)
            power = "10" + str(exponent).translate(_SUPERSCRIPTS)
            return power if coeff == 1 else f"{coeff}×{power}"

    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def save_params(params, path: Path) -> Path:
    """Save a params pytree (an ``nnx.State`` or nested dict of arrays) with orbax.

    Restore with ``orbax.checkpoint.StandardCheckpointer().restore(path)``, which
    gives the nested dict of arrays (``nnx.to_pure_dict`` layout).

    Returns:
      ``path``, a folder.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from . import signals

    tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    # whole or not at all: a stop raised inside orbax's save left its writer thread
    # filling the .orbax-checkpoint-tmp folder while the run's temporary folder was
    # removed ("Directory not empty", the run FAILED instead of KILLED: issue 13 item 9)
    with signals.blocked():
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(Path(path).resolve(), tree)
        checkpointer.wait_until_finished()
        checkpointer.close()
    return path


def print_summary(console, *, result, run_id: str, experiment: str, ui: str,
                  tracking_uri: str, url: str = "") -> None:
    """The final table: test metrics beside the linear baseline, timings, run id, UI command."""
    from rich.table import Table

    when = f"after {result.num_steps} steps"
    if result.best_step is not None:  # early stopping: the params of the best evaluation
        stopped = ("" if result.early_stopped_at_step is None
                   else f", stopped early at step {result.early_stopped_at_step}")
        when = (f"at the best step {result.best_step} (validation loss "
                f"{result.best_val_loss:.4g}{stopped})")
    table = Table(title=f"{experiment}: test metrics {when}", title_justify="left")
    table.add_column("metric")
    table.add_column("net", justify="right")
    table.add_column("linear baseline", justify="right")
    for name, value in result.test_metrics.items():
        base = result.baseline_metrics.get(name)
        table.add_row(name, f"{value:.4f}", "" if base is None else f"{base:.4f}")
    console.print(table)
    t, m = result.timings, result.compute
    hits = m.get("compile_cache_hits")
    cached = "" if hits is None else (f", cache {int(hits)} hit(s) "
                                      f"{int(m.get('compile_cache_misses', 0))} miss(es)")
    console.print(f"params {result.num_params:,} | startup {t.get('startup_s', 0):.2f} s | "
                  f"trace+lower {t['trace_lower_s']:.2f} s | "
                  f"compile {t['compile_s']:.2f} s ({m.get('num_compiles', 1)}x{cached}) | "
                  f"first call {t['first_call_s']:.3f} s | {result.device}")
    console.print(f"step {_seconds(t['step_s'])} median, {_seconds(t['step_p90_s'])} p90 | "
                  f"{t['steps_per_s']:,.0f} steps/s | {t['samples_per_s']:,.0f} samples/s"
                  + (f" | {m['flops_per_step']:,.0f} FLOPs/step, "
                     f"{m['flops_per_s'] / 1e9:.2f} GFLOP/s" if "flops_per_s" in m else ""))
    memory = [f"{label} {_bytes(m[name])}" for name, label in (
        ("argument_bytes", "arguments"), ("output_bytes", "outputs"),
        ("temp_bytes", "temporaries"), ("peak_bytes", "device peak")) if name in m]
    if memory:
        console.print("chunk memory: " + ", ".join(memory))
    if result.gradcheck_passed is not None:
        worst = max(r.max_rel_err for _, r in result.gradcheck)
        verdict = "passed" if result.gradcheck_passed else "[bold red]FAILED[/]"
        console.print(f"gradient checks: {verdict} ({len(result.gradcheck)} checks, worst "
                      f"relative error {worst:.1e} in float64, {t['gradcheck_s']:.2f} s)")
    console.print(f"logging {t['log_s']:.2f} s | wall {t['wall_s']:.2f} s")
    console.print(f"run {run_id} in {tracking_uri}")
    console.print(f"open it in the UI: {ui}" + (f", then {url}" if url else ""))


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value} B"


def print_examples(console, rows) -> None:
    """The worked derivative examples, each computed three ways (autodiff in float64,
    the exact oracle, finite differences), with relative errors against the oracle."""
    console.print("[bold]worked examples: each derivative three ways, in float64[/]")
    for row in rows:
        verdict = "[green]agree[/]" if row.passed else "[bold red]DISAGREE[/]"
        console.print(f"\n[bold]{row.expression}[/]  at {row.point}: {verdict}")
        console.print(f"  {'value of the function':<33} {row.value:.12g}")
        console.print(f"  {'autodiff (jax.grad)':<33} {_values(row.autodiff):<44} "
                      f"rel. err {row.rel_err_autodiff:.1e}")
        exact = f" = {row.exact}" if row.exact else ""
        console.print(f"  {row.oracle:<33} {_values(row.symbolic) + exact:<44}")
        console.print(f"  {'finite differences':<33} {_values(row.finite_difference):<44} "
                      f"rel. err {row.rel_err_fd:.1e}")
        for label, autodiff, exact_path in row.paths:
            console.print(f"  {'  path ' + label:<33} {autodiff:<44.12g} "
                          f"(sympy {exact_path:.12g})")
        if row.rel_err_paths is not None:
            console.print(f"  {'  sum of the paths':<33} {'= the total':<44} "
                          f"rel. err {row.rel_err_paths:.1e}")
        if row.float32:
            loss, norm = row.float32
            console.print(f"  {'float32, as the notebook':<33} loss {loss:.8g}, "
                          f"norm {norm:.8g}")


def _values(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        if len(value) > 3:
            return f"({len(value)} values; see worked_examples.json)"
        return "(" + ", ".join(f"{v:.10g}" for v in value) + ")"
    return f"{value:.12g}"


def write_members_csv(rows: list[dict], path: Path) -> Path:
    """One row per member of a sweep: run id and name, status, its values, final metrics."""
    import csv

    keys = sorted({k for r in rows for k in r["values"]})
    metrics = sorted({k for r in rows for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "run_name", "status", "skipped", *keys, *metrics])
        for r in rows:
            writer.writerow([r["run_id"], r["run_name"], r["status"], r["skipped"],
                             *(r["values"].get(k, "") for k in keys),
                             *(r["metrics"].get(k, "") for k in metrics)])
    return path


def plot_sweep(rows: list[dict], path: Path, *, best_run_id: str) -> Path:
    """Final validation loss of each finished member against each swept key (one panel
    per key; log x-axis for positive values spanning more than a factor 10), the best
    member ringed."""
    from matplotlib.figure import Figure

    keys = sorted({k for r in rows for k in r["values"]}) or ["member"]
    fig = Figure(figsize=(4.2 * len(keys), 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        xs = [r["values"].get(key, i) if key != "member" else i for i, r in enumerate(rows)]
        ys = [r["metrics"]["val_loss"] for r in rows]
        ax.scatter(xs, ys, color="tab:blue")
        for x, y, r in zip(xs, ys, rows):
            if r["run_id"] == best_run_id:
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors="tab:red",
                           label="best")
        numeric = [x for x in xs if isinstance(x, (int, float))]
        if numeric and min(numeric) > 0 and max(numeric) > 10 * min(numeric):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="final validation loss", title=f"validation loss vs {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def plot_member_curves(curves: dict[str, dict[str, tuple[list[int], list[float]]]], path: Path,
                       *, best_run_id: str) -> Path:
    """Train and validation loss of every member: the median over members with a
    min-max band, and the best member's own curve (log scale)."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, name, label in zip(axes, ("train_loss", "val_loss"), ("train", "validation")):
        series = [c[name] for c in curves.values() if c.get(name) and c[name][0]]
        if not series:
            continue
        steps = sorted(set().union(*(set(s) for s, _ in series)))
        table = np.full((len(series), len(steps)), np.nan)
        where = {s: j for j, s in enumerate(steps)}
        for i, (s, v) in enumerate(series):
            table[i, [where[x] for x in s]] = v
        with np.errstate(all="ignore"):
            lo, mid, hi = (np.nanmin(table, 0), np.nanmedian(table, 0), np.nanmax(table, 0))
        ax.fill_between(steps, lo, hi, alpha=0.25, label=f"min-max of {len(series)} members")
        ax.plot(steps, mid, label="median")
        best = curves.get(best_run_id, {}).get(name)
        if best and best[0]:
            ax.plot(*best, color="tab:red", lw=1, label="best member")
        if np.nanmin(table) > 0:
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=f"{label} loss", title=f"{label} loss over members")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def print_population(console, results: list, *, tracking_uri: str) -> None:
    """One line per member trained (final validation loss, or with early stopping the
    best one, whose params give the test metrics; test metrics beside the baseline) and
    the population's timings."""
    if not results:
        console.print(f"nothing to train: every point has a FINISHED run in {tracking_uri}")
        return
    from rich.table import Table

    names = list(next((r.test_metrics for r in results if r.test_metrics), {}))
    table = Table(title=f"{len(results)} members, one program", title_justify="left")
    for col in ("member", "val_loss", *names):
        table.add_column(col, justify="right")
    for i, r in enumerate(results):
        val = r.history.get("val_loss", ([], []))[1]
        val = [r.best_val_loss] if r.best_val_loss is not None else val
        status = f"FAILED at step {r.failed_step}" if r.failed_step is not None else ""
        cells = [f"{r.test_metrics[n]:.4f} ({r.baseline_metrics[n]:.4f})" if n in r.test_metrics
                 else status for n in names]
        table.add_row(str(i), f"{val[-1]:.4g}" if val else "-", *cells)
    console.print(table)
    t, m = results[0].timings, results[0].compute
    console.print(f"test metrics: net (linear baseline) | compile {t['compile_s']:.2f} s "
                  f"({m.get('num_compiles', 1)}x for all members) | {t['steps_per_s']:,.0f} "
                  f"steps/s x {m['members']} members on {m['devices']} device(s) | "
                  f"wall {t['wall_s']:.2f} s")
    console.print(f"runs in {tracking_uri}")


def print_search(console, outcome, *, tracking_uri: str) -> None:
    """The search's outcome: trials told here, the study's best trial and its run, where
    the study lives and how to go on (``search.SearchOutcome``)."""
    console.print(f"search {outcome.study_name!r}: {outcome.told} trial(s) told by this "
                  f"process ({outcome.failed} diverged); the study has {outcome.num_complete} "
                  f"complete trial(s) of {outcome.num_trials} asked")
    if outcome.best_value is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in outcome.best_params.items())
        console.print(f"best: {outcome.best_value:.6g} with {params} (run "
                      f"{outcome.best_run_id})")
    console.print(f"parent run {outcome.parent_run_id} in {tracking_uri}; study in "
                  f"{outcome.storage}")
    console.print("the same command continues the study (search.num_trials=N to extend it)")
