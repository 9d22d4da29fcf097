"""Compare the latest benchmark run with a baseline; flag regressions beyond the noise.

``python scripts/bench_compare.py [--run ID] [--baseline ID] [--floor 0.10] [--k 1.0]``

The latest run: the newest suite run (``scripts/bench.py``, tag ``bench.kind=suite``)
of experiment ``benchmarks`` that is no longer RUNNING, or ``--run`` (any run,
e.g. one of a single benchmark's script). It must have FINISHED: a FAILED run has no trustworthy
figures, and is reported as such (exit 1). The baseline: the newest earlier
FINISHED run of the same kind, that is with the same ``jax.device_kind``, suite
mode (``suite`` tag: quick or full), set of benchmarks (``bench.cases``) and size
overrides (``bench.overrides``), and on the CPU backend the same host CPU model
(``host.cpu``: every CPU is device kind ``cpu``); or ``--baseline``.

Every figure with a direction in the latest run's ``results.json`` is compared:
``change = (latest - baseline) / |baseline|``, and it REGRESSED when it moved the
wrong way by more than ``allowed = max(floor, k * (spread_baseline +
spread_latest))``, where a spread is the figure's relative (p90 - p10) / median
within its run: noisy figures get a wide band, deterministic ones (compiled
bytes) the floor. Exit 1 when any figure regressed.

History: a plot of every directed figure over the runs of the same kind (each
relative to its median over those runs, lower-is-better figures inverted so that
up is always better), with the table and the comparison as JSON, logged as
artifacts ``compare/history.png``, ``compare/table.txt`` and
``compare/comparison.json`` ON THE LATEST RUN, with tags
``compare.baseline_run_id`` and ``compare.regressions`` (``--no-log``: only print).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .suite import EXPERIMENT, RESULTS_FILE

__all__ = ["Row", "compare_figures", "figures_of", "same_kind", "pick_latest", "pick_baseline",
           "format_table", "plot_history", "main"]

KIND_TAGS = ("jax.device_kind", "suite", "bench.cases", "bench.overrides")  # runs comparable
EXIT_REGRESSED = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Row:
    """One figure's comparison.

    Attributes:
      figure, unit, direction: as in ``results.json``.
      baseline, latest: the values (None where a run lacks the figure).
      change: ``(latest - baseline) / |baseline|`` (None where undefined).
      allowed: the band, ``max(floor, k * (spread_baseline + spread_latest))``.
      status: ``"ok"``, ``"REGRESSED"``, ``"improved"``, ``"new"`` (not in the
        baseline) or ``"gone"`` (not in the latest run).
    """

    figure: str
    unit: str
    direction: str
    baseline: float | None
    latest: float | None
    change: float | None
    allowed: float | None
    status: str


def figures_of(document: dict) -> dict[str, dict]:
    """``{figure name: {value, unit, direction, spread, description}}`` of every benchmark
    in a ``results.json`` document."""
    out: dict[str, dict] = {}
    for bench in document.get("benchmarks", {}).values():
        out.update(bench.get("figures", {}))
    return out


def compare_figures(baseline: dict[str, dict], latest: dict[str, dict], *, floor: float,
                    k: float, only: str | None = None) -> list[Row]:
    """Compare two runs' figures (``figures_of``); only figures with a direction.

    Args:
      floor: the smallest relative change counted as a regression (e.g. 0.10).
      k: how many summed spreads a change must exceed.
      only: a regular expression; compare only figures whose name it matches.
    """
    rows = []
    pattern = re.compile(only) if only else None
    for name, fig in latest.items():
        if fig.get("direction") not in ("higher", "lower"):
            continue
        if pattern and not pattern.search(name):
            continue
        base = baseline.get(name)
        if base is None:
            rows.append(Row(name, fig["unit"], fig["direction"], None, fig["value"], None, None,
                            "new"))
            continue
        b, v = base["value"], fig["value"]
        allowed = max(floor, k * (base.get("spread", 0.0) + fig.get("spread", 0.0)))
        if b == 0:
            change = 0.0 if v == 0 else math.copysign(math.inf, v)
        else:
            change = (v - b) / abs(b)
        worse = -change if fig["direction"] == "higher" else change
        status = "REGRESSED" if worse > allowed else "improved" if -worse > allowed else "ok"
        rows.append(Row(name, fig["unit"], fig["direction"], b, v, change, allowed, status))
    for name, base in baseline.items():
        if name not in latest and base.get("direction") in ("higher", "lower") and (
                not pattern or pattern.search(name)):
            rows.append(Row(name, base["unit"], base["direction"], base["value"], None, None,
                            None, "gone"))
    return rows


def same_kind(run, other) -> bool:
    """Whether two runs measured the same thing on the same kind of machine."""
    a, b = run.data.tags, other.data.tags
    if any(a.get(t, "") != b.get(t, "") for t in KIND_TAGS):
        return False
    return a.get("jax.backend") != "cpu" or a.get("host.cpu") == b.get("host.cpu")


def pick_latest(runs: list, run_id: str | None = None):
    """``run_id``'s run, or the newest suite run (all benchmarks, tag ``bench.kind=suite``)
    that is not RUNNING (``runs`` newest first); None if there is none."""
    if run_id:
        for run in runs:
            if run.info.run_id == run_id:
                return run
        raise LookupError(f"no run {run_id} in experiment {EXPERIMENT!r}")
    for run in runs:
        if run.info.status != "RUNNING" and run.data.tags.get("bench.kind") == "suite":
            return run
    return None


def pick_baseline(runs: list, latest, baseline_id: str | None = None):
    """``baseline_id``'s run, or the newest FINISHED run of the same kind started before
    ``latest`` (``runs`` newest first); None if there is none."""
    if baseline_id:
        return pick_latest(runs, baseline_id)
    for run in runs:
        if (run.info.run_id != latest.info.run_id and run.info.status == "FINISHED"
                and run.info.start_time <= latest.info.start_time and same_kind(run, latest)):
            return run
    return None


def format_table(rows: list[Row]) -> str:
    """A fixed-width table: figure, baseline, latest, change %, allowed %, status."""

    def num(x):
        return "-" if x is None else f"{x:.5g}"

    def pct(x):
        return "-" if x is None else f"{x:+.1%}" if math.isfinite(x) else "inf"

    order = {"REGRESSED": 0, "gone": 1, "improved": 2, "new": 3, "ok": 4}
    rows = sorted(rows, key=lambda r: (order[r.status], r.figure))
    width = max([len(r.figure) for r in rows] + [6])
    header = (f"{'figure':<{width}}  dir  {'baseline':>12}  {'latest':>12}  {'change':>8}  "
              f"{'allowed':>8}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        arrow = "↑" if r.direction == "higher" else "↓"
        allowed = "-" if r.allowed is None else f"{r.allowed:.1%}"
        lines.append(f"{r.figure:<{width}}  {arrow}    {num(r.baseline):>12}  {num(r.latest):>12}"
                     f"  {pct(r.change):>8}  {allowed:>8}  {r.status}")
    return "\n".join(lines)


def history_points(runs: list, figures: dict[str, dict]) -> dict[str, list[tuple[int, float]]]:
    """``{figure: [(start_time_ms, value), ...]}`` oldest first, from each run's metrics."""
    out: dict[str, list[tuple[int, float]]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        for name in figures:
            if name in run.data.metrics:
                out.setdefault(name, []).append((run.info.start_time, run.data.metrics[name]))
    return out


def plot_history(points: dict[str, list[tuple[int, float]]], figures: dict[str, dict],
                 regressed: set[str], path: Path, *, title: str) -> Path:
    """One panel per benchmark; each figure relative to its median over the runs, inverted
    for lower-is-better figures, so up is better everywhere. Regressed figures in red,
    labelled. Returns ``path``."""
    import datetime as dt

    from matplotlib.figure import Figure

    groups: dict[str, list[str]] = {}
    for name in points:
        groups.setdefault(name.split("/")[0], []).append(name)
    cols = min(3, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / cols))
    fig = Figure(figsize=(5 * cols, 3.4 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (group, names) in zip(axes, sorted(groups.items())):
        for name in names:
            times, values = zip(*points[name])
            mid = statistics.median(values)
            if mid == 0 or any(v == 0 for v in values):
                continue
            rel = [v / mid if figures[name]["direction"] == "higher" else mid / v for v in values]
            when = [dt.datetime.fromtimestamp(t / 1000) for t in times]
            if name in regressed:
                ax.plot(when, rel, color="tab:red", lw=1.8, marker="o", ms=3,
                        label=name.split("/", 1)[1])
            else:
                ax.plot(when, rel, color="tab:blue", lw=0.7, alpha=0.45, marker=".", ms=2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title=group, ylabel="relative to median (up is better)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(alpha=0.3)
        if any(n in regressed for n in names):
            ax.legend(fontsize=6)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return path


def _load_document(client, run_id: str, folder: Path) -> dict:
    path = client.download_artifacts(run_id, RESULTS_FILE, str(folder))
    return json.loads(Path(path).read_text())


def main(argv: list[str] | None = None) -> int:
    """The command line of ``scripts/bench_compare.py``; returns the exit code."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<cwd>/mlruns/mlflow.db)")
    parser.add_argument("--run", default=None, help="the run to judge (default: the newest "
                                                    "suite run that is not RUNNING)")
    parser.add_argument("--baseline", default=None, help="the run to compare with (default: the "
                        "newest earlier FINISHED run of the same kind)")
    parser.add_argument("--floor", type=float, default=0.10,
                        help="smallest relative change that counts as a regression (0.10 = 10%%)")
    parser.add_argument("--k", type=float, default=1.0,
                        help="a regression must exceed k x (spread of baseline + spread of latest)")
    parser.add_argument("--only", default=None, help="compare only figures matching this regex")
    parser.add_argument("--no-log", action="store_true",
                        help="log nothing back to the latest run (only print)")
    args = parser.parse_args(argv)

    from ..tracking import TrackingError, open_store, resolve_store

    store = resolve_store(args.tracking_uri, Path.cwd())
    try:
        client = open_store(store)
    except TrackingError as err:
        print(f"tracking error: {err}", file=sys.stderr)
        return EXIT_USAGE
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        print(f"no experiment {EXPERIMENT!r} in {store.tracking_uri}: run scripts/bench.py first",
              file=sys.stderr)
        return EXIT_USAGE
    runs = client.search_runs([experiment.experiment_id], max_results=50_000,
                              order_by=["attributes.start_time DESC"])
    try:
        latest = pick_latest(runs, args.run)
        if latest is None:
            print("no finished suite run yet (scripts/bench.py); --run ID judges any run",
                  file=sys.stderr)
            return EXIT_USAGE
        baseline = pick_baseline(runs, latest, args.baseline)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"latest:   {latest.info.run_id} ({latest.info.run_name}, {latest.info.status})")
    if latest.info.status != "FINISHED":
        print(f"the latest run ended {latest.info.status} "
              f"({latest.data.tags.get('error', 'no error recorded')[:300]}); its figures are "
              "not trustworthy and are not compared", file=sys.stderr)
        return EXIT_REGRESSED
    if baseline is None:
        print("no earlier FINISHED run of the same kind (device kind, suite mode, cases, "
              "overrides, host CPU): nothing to compare yet")
        return 0
    print(f"baseline: {baseline.info.run_id} ({baseline.info.run_name})")
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        folder = Path(tmp)
        latest_doc = _load_document(client, latest.info.run_id, folder / "latest")
        base_doc = _load_document(client, baseline.info.run_id, folder / "baseline")
        latest_figs, base_figs = figures_of(latest_doc), figures_of(base_doc)
        rows = compare_figures(base_figs, latest_figs, floor=args.floor, k=args.k,
                               only=args.only)
        table = format_table(rows)
        regressed = [r for r in rows if r.status == "REGRESSED"]
        summary = (f"{len(regressed)} of {len(rows)} figures regressed beyond "
                   f"max({args.floor:.0%}, {args.k:g} x summed spread)")
        print(table)
        print(summary)
        if not args.no_log:
            kind = [r for r in runs if r.info.status == "FINISHED" and same_kind(r, latest)
                    and r.info.start_time <= latest.info.start_time]
            compared = {r.figure: latest_figs[r.figure] for r in rows if r.figure in latest_figs}
            plot_history(history_points(kind, compared), compared,
                         {r.figure for r in regressed}, folder / "history.png",
                         title=f"{len(kind)} {latest.data.tags.get('suite', '')} runs on "
                               f"{latest.data.tags.get('jax.device_kind', '?')}; "
                               f"red: regressed against {baseline.info.run_id[:8]}")
            (folder / "table.txt").write_text(f"{table}\n{summary}\n")
            (folder / "comparison.json").write_text(json.dumps({
                "latest": latest.info.run_id, "baseline": baseline.info.run_id,
                "floor": args.floor, "k": args.k, "rows": [asdict(r) for r in rows]}, indent=1))
            for name in ("history.png", "table.txt", "comparison.json"):
                client.log_artifact(latest.info.run_id, str(folder / name), "compare")
            client.set_tag(latest.info.run_id, "compare.baseline_run_id", baseline.info.run_id)
            client.set_tag(latest.info.run_id, "compare.regressions", str(len(regressed)))
            print(f"logged compare/history.png, compare/table.txt, compare/comparison.json "
                  f"on run {latest.info.run_id}")
    return EXIT_REGRESSED if regressed else 0
