"""Run benchmarks into ONE MLflow run: the entry point of ``scripts/bench*.py``.

``python scripts/bench.py [--quick] [--tracking-uri URI]`` runs all eight; each
``scripts/bench_<case>.py`` runs one and makes its own run. The store is the
service's (``tracking.resolve_store``: ``--tracking-uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns/mlflow.db``), the
experiment ``benchmarks``.

What a run holds:
  * params: every size of every benchmark run (``jit.widths``, ...), ``suite``;
  * metrics: the figures (``jit/step/w256/speedup``, and ``<figure>_spread``),
    ``<timing>/median_s``, ``<timing>/spread``, ``<function>/compile_s``, and
    ``<case>/wall_s``;
  * tags: git commit and dirty flag, library versions (``tracking.environment_tags``),
    ``jax.backend``, ``jax.device_kind``, ``host.cpu`` and the rest of
    ``measure.device_info``, ``suite`` (``quick`` or ``full``), ``bench.cases``;
  * artifacts: ``plots/*.png`` and ``results.json`` (every figure with its unit,
    direction and spread, the timings, the checks that passed, the device).
A benchmark whose result is wrong (``harness.CorrectnessError``) or that raises
reports nothing; the others still run, then the run ends FAILED with the message
in its ``error`` tag and the process exits 1. Each benchmark works in its own
temporary folder, so suites started together never share files.

``--set case.size=value`` changes one size (``--set overhead.num_steps=50000``);
such runs are tagged ``bench.overrides`` and never serve as another kind's
baseline. ``--no-tracking`` records nothing (for machines without MLflow).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from . import CASES, load

__all__ = ["EXPERIMENT", "RESULTS_FILE", "SuiteFailed", "SuiteOutcome", "UsageError",
           "resolve_sizes", "run_suite", "suite_tags", "suite_params", "make_run_name", "main"]

EXPERIMENT = "benchmarks"       # the MLflow experiment of every benchmark run
RESULTS_FILE = "results.json"   # the artifact with every figure, its direction and spread
SCHEMA_VERSION = 1              # of results.json

EXIT_FAILED = 1     # a benchmark failed its check or raised; or the store failed
EXIT_USAGE = 2      # bad command line
EXIT_SIGINT = 130   # 128 + SIGINT
EXIT_SIGTERM = 143  # 128 + SIGTERM


class SuiteFailed(RuntimeError):
    """One or more benchmarks failed; the message names each and why."""


@dataclass
class SuiteOutcome:
    """What a suite run produced.

    Attributes:
      run_id, run_name: the MLflow run (``run_id`` is ``local-...`` without tracking).
      results: ``{case: BenchResult}`` of the benchmarks that passed.
      failures: ``{case: message}`` of those that did not.
      document: the ``results.json`` content.
    """

    run_id: str
    run_name: str
    results: dict = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    document: dict = field(default_factory=dict)


def make_run_name(cases: list[str], quick: bool) -> str:
    """``<suite|case>-<quick|full>-<UTC time>-<host>-<pid>``: distinct for runs started in
    the same second on one host."""
    label = "suite" if list(cases) == list(CASES) else "+".join(cases)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{label}-{'quick' if quick else 'full'}-{stamp}-{socket.gethostname()}-{os.getpid()}"


def suite_tags(cases: list[str], quick: bool, overrides: list[str] = ()) -> dict[str, str]:
    """Tags of a benchmark run: code, versions, device, mode, cases, size overrides."""
    from .. import measure
    from ..tracking import environment_tags

    info = measure.device_info()
    return {
        **environment_tags(),
        "jax.backend": info["backend"], "jax.device_kind": info["device_kind"],
        "jax.device_count": info["device_count"], "host.cpu": info["host_cpu"],
        "host.cpu_count": info["host_cpu_count"], "version.python": info["python_version"],
        "suite": "quick" if quick else "full",
        "bench.cases": ",".join(cases),
        "bench.kind": "suite" if list(cases) == list(CASES) else "single",
        "bench.overrides": " ".join(overrides),
    }


class UsageError(ValueError):
    """A command line the suite cannot run; the message names the fix."""


def resolve_sizes(cases: list[str], *, quick: bool, overrides: list[str] = ()) -> dict:
    """``{case: Sizes}``: each case's ``QUICK`` or default sizes, with ``overrides``
    (``"case.field=value"``, value a Python literal) applied.

    Raises:
      UsageError: an unknown case or field, or a value that is not a literal.
    """
    sizes = {}
    for case in cases:
        module = load(case)
        sizes[case] = module.QUICK if quick else module.Sizes()
    for item in overrides:
        key, sep, text = item.partition("=")
        case, dot, name = key.partition(".")
        if not sep or not dot:
            raise UsageError(f"--set {item!r}: write case.field=value, e.g. "
                             "overhead.num_steps=50000")
        if case not in sizes:
            raise UsageError(f"--set {item!r}: {case!r} is not among the cases run "
                             f"({', '.join(sizes)})")
        known = {f.name for f in fields(sizes[case])}
        if name not in known:
            raise UsageError(f"--set {item!r}: {case} has no size {name!r}; it has "
                             f"{', '.join(sorted(known))}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UsageError(f"--set {item!r}: {text!r} is not a Python literal") from None
        sizes[case] = replace(sizes[case], **{name: _like(getattr(sizes[case], name), value,
                                                          item)})
    return sizes


def _like(current, value, item: str):
    """``value`` in the type of the size it replaces (a tuple, an int, a float; None where
    the default is None), or UsageError."""
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, bool) or isinstance(current, tuple):
        pass
    elif isinstance(current, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(current, int) and isinstance(value, int):
        return value
    elif current is None and (value is None or isinstance(value, int)):
        return value
    raise UsageError(f"--set {item!r}: expected a value like {current!r}")


def suite_params(sizes: dict, quick: bool) -> dict[str, str]:
    """``{"<case>.<size>": value}`` for every size of every case, plus ``suite``."""
    from ..tracking import flatten_config

    params = {"suite": "quick" if quick else "full"}
    for case, case_sizes in sizes.items():
        params.update(flatten_config({case: asdict(case_sizes)}))
    return params


def run_suite(sizes: dict, tracker, *, quick: bool, run_name: str,
              plots_dir: Path | None = None, json_path: Path | None = None,
              log: Callable[[str], None] = print) -> SuiteOutcome:
    """Run the cases in order and record each into ``tracker``; see the module docstring.

    Args:
      sizes: ``{case: Sizes}`` (``resolve_sizes``), in the order to run.
      tracker: a ``tracking.MlflowTracker`` (or an object with its methods).
      quick: recorded as the suite mode.
      run_name: recorded in ``results.json``.
      plots_dir: also copy each plot here as ``bench_<name>.png`` (e.g. ``docs/``).
      json_path: also write ``results.json`` here.
      log: where console lines go.

    Returns:
      the outcome, when every benchmark passed.

    Raises:
      SuiteFailed: after all cases ran and ``results.json`` was logged, when any
        failed; the message names each failure.
    """
    from .. import measure
    from .harness import matmul_rel_err

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    outcome = SuiteOutcome(tracker.run_id, run_name)
    for i, (case, case_sizes) in enumerate(sizes.items(), 1):
        module = load(case)
        log(f"== {case} ({i}/{len(sizes)}): {module.__doc__.splitlines()[0]}")
        with tempfile.TemporaryDirectory(prefix=f"bench-{case}-") as tmp:
            try:
                result = module.run(case_sizes, Path(tmp), log=log)
            except Exception as err:  # noqa: BLE001 - one benchmark's fault must not hide the rest
                message = f"{type(err).__name__}: {err}"
                outcome.failures[case] = message
                log(f"  FAILED: {message}")
                if not isinstance(err, AssertionError):
                    log("".join(traceback.format_exception(err))[-3000:])
                continue
            outcome.results[case] = result
            log(f"  ({case}: {result.wall_s:.1f} s)")
            metrics = result.metrics()
            metrics[f"{case}/wall_s"] = result.wall_s
            tracker.log_metrics((name, value, 0) for name, value in metrics.items())
            for plot in result.plots:
                tracker.log_artifact(plot, "plots")
                if plots_dir is not None:
                    plots_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(plot, plots_dir / f"bench_{plot.name}")

    outcome.document = {
        "schema_version": SCHEMA_VERSION, "run_id": tracker.run_id, "run_name": run_name,
        "suite": "quick" if quick else "full", "cases": list(sizes),
        "started_at": started.isoformat(), "wall_s": time.perf_counter() - t0,
        "device": {**measure.device_info(), "matmul_rel_err": matmul_rel_err()},
        "benchmarks": {case: r.as_dict() for case, r in outcome.results.items()},
        "failures": outcome.failures,
    }
    text = json.dumps(outcome.document, indent=1, sort_keys=True)
    tracker.log_text(text, RESULTS_FILE)
    tracker.log_metrics([("suite/wall_s", outcome.document["wall_s"], 0),
                         ("suite/matmul_rel_err", matmul_rel_err(), 0)])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
    _print_summary(outcome, log)
    if outcome.failures:
        raise SuiteFailed("; ".join(f"{case}: {msg}" for case, msg in outcome.failures.items()))
    return outcome


def _print_summary(outcome: SuiteOutcome, log: Callable[[str], None]) -> None:
    """Every tracked figure, with its direction (↑ higher is better, ↓ lower is better)."""
    from .harness import format_value

    arrows = {"higher": "↑", "lower": "↓"}
    log(f"== {len(outcome.results)} benchmark(s) passed, {len(outcome.failures)} failed, "
        f"{outcome.document['wall_s']:.0f} s; run {outcome.run_id} ({outcome.run_name})")
    for result in outcome.results.values():
        for f in result.figures:
            if f.direction is not None:
                log(f"  {arrows[f.direction]} {f.name:<52} {format_value(f.value, f.unit):>16}"
                    + (f"  spread {f.spread:.1%}" if f.spread else ""))


class _LocalTracker:
    """Stands in for ``MlflowTracker`` with ``--no-tracking``: keeps nothing."""

    def __init__(self):
        self.run_id = "local-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") \
                      + f"-{os.getpid()}"

    def log_metrics(self, points):
        list(points)
        return 0

    def log_artifact(self, local_path, artifact_path=None):
        pass

    def log_text(self, text, artifact_file):
        pass


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (about a minute on 2 CPU cores); tags the run "
                             "suite=quick")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<cwd>/mlruns/mlflow.db)")
    parser.add_argument("--run-name", default=None, help="MLflow run name (default: "
                        "<suite|case>-<quick|full>-<UTC time>-<host>-<pid>)")
    parser.add_argument("--plots-dir", type=Path, default=None,
                        help="also copy the plots here as bench_<name>.png (e.g. docs)")
    parser.add_argument("--json", type=Path, default=None, help="also write results.json here")
    parser.add_argument("--no-tracking", action="store_true",
                        help="record nothing in MLflow (print, and write --json if given)")
    parser.add_argument("--set", action="append", default=[], metavar="CASE.SIZE=VALUE",
                        help="change one size, e.g. --set overhead.num_steps=50000 "
                             "--set 'jit.widths=(16, 64)'; tagged bench.overrides, so "
                             "bench_compare never takes such a run as a baseline for a plain one")
    return parser


def main(argv: list[str] | None = None, *, cases: list[str] | None = None,
         description: str | None = None) -> int:
    """Parse the command line, open the store and the run, run the cases; the exit code.

    Args:
      argv: command-line arguments (``sys.argv[1:]`` if None).
      cases: the benchmarks to run (all, in order, if None).
      description: the ``--help`` text's first line.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cases = list(cases or CASES)
    parser = build_parser(description or "Run the benchmark suite into MLflow.")
    args = parser.parse_args(argv)
    try:
        sizes = resolve_sizes(cases, quick=args.quick, overrides=args.set)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    run_name = args.run_name or make_run_name(cases, args.quick)
    from .. import measure
    from ..population import set_host_devices

    set_host_devices(None)  # as the CLI: one host device per core, before JAX starts
    from ..tracking import (Terminated, TrackingError, get_or_create_experiment, open_store,
                            resolve_store, start_run)

    info = measure.device_info()
    print(f"device: {info['backend']} ({info['device_kind']}), host CPU {info['host_cpu']} x "
          f"{info['host_cpu_count']}, jax {info['jax_version']}", flush=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    try:
        if args.no_tracking:
            run_suite(sizes, _LocalTracker(), quick=args.quick, run_name=run_name,
                      plots_dir=args.plots_dir, json_path=args.json, log=log)
            return 0
        store = resolve_store(args.tracking_uri, Path.cwd())
        try:
            client = open_store(store)
            experiment_id = get_or_create_experiment(client, store, EXPERIMENT)
        except TrackingError as err:
            print(f"tracking error: {err}", file=sys.stderr)
            return EXIT_FAILED
        tags = {**suite_tags(cases, args.quick, args.set), "tracking_uri": store.tracking_uri}
        print(f"tracking store: {store.tracking_uri}, experiment {EXPERIMENT!r}", flush=True)
        with start_run(client, experiment_id, run_name=run_name, tags=tags) as tracker:
            print(f"run {tracker.run_id} ({run_name})", flush=True)
            tracker.log_params(suite_params(sizes, args.quick))
            run_suite(sizes, tracker, quick=args.quick, run_name=run_name,
                      plots_dir=args.plots_dir, json_path=args.json, log=log)
        return 0
    except SuiteFailed as err:
        print(f"benchmark failed: {err}. The run ended FAILED; no figure of a failed "
              "benchmark was recorded.", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as err:
        print(f"stopped: {str(err) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return EXIT_SIGTERM if isinstance(err, Terminated) else EXIT_SIGINT
