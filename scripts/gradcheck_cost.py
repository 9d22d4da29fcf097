"""What the default gradient checks add to a run's wall time.

Runs ``python -m trainer +experiment=NAME`` with the default checks (before training
and after the last step) and with ``gradcheck.every_steps=0``, alternately, each in
a fresh process and a temporary store, and compares three wall times: the process
(imports included), the MLflow run (its end time minus its start time) and the
loop's own ``wall_s`` metric. The figure is the median over repeats of the
per-pair ratio (checks on / checks off), so drifts of a shared machine cancel.

Usage: python scripts/gradcheck_cost.py [--experiment diabetes] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(experiment: str, checks: bool, extra: list[str]) -> dict[str, float]:
    """Run the CLI once in a temporary launch dir; returns its three wall times (s)."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="gradcheck-cost-") as launch:
        args = [sys.executable, "-m", "trainer", f"+experiment={experiment}",
                "trainer.progress=false", *extra]
        if not checks:
            args.append("gradcheck.every_steps=0")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=launch, env=env, capture_output=True, text=True)
        process_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        client = MlflowClient(f"sqlite:///{Path(launch) / 'mlruns' / 'mlflow.db'}")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return {"process_s": process_s,
                "run_s": (run.info.end_time - run.info.start_time) / 1e3,
                "wall_s": run.data.metrics["time/wall_s"],
                "gradcheck_s": run.data.metrics.get("time/gradcheck_s", 0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="diabetes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both sides")
    args = parser.parse_args(argv)
    one_run(args.experiment, True, args.overrides)  # warm-up: OS caches, first imports
    ratios: dict[str, list[float]] = {"process_s": [], "run_s": [], "wall_s": []}
    for i in range(args.repeats):
        on = one_run(args.experiment, True, args.overrides)
        off = one_run(args.experiment, False, args.overrides)
        for key in ratios:
            ratios[key].append(on[key] / off[key])
        print(f"repeat {i + 1}: " + ", ".join(
            f"{key} {on[key]:.2f}/{off[key]:.2f}" for key in ratios)
            + f" (checks took {on['gradcheck_s']:.2f} s)", flush=True)
    for key, values in ratios.items():
        print(f"{key}: checks on / off = {statistics.median(values):.3f} (median of "
              f"{len(values)}; min {min(values):.3f}, max {max(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
