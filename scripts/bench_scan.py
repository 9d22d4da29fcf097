"""Benchmark 3: one dispatch per step against K steps in one lax.scan.

Usage: python scripts/bench_scan.py [--quick] [--tracking-uri URI] [--set scan.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/scan_steps.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["scan"], description=__doc__.splitlines()[0]))
