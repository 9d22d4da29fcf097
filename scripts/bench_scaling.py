"""Benchmark 5: steps/s and FLOP/s over width and batch, against peak matmul FLOP/s.

Usage: python scripts/bench_scaling.py [--quick] [--tracking-uri URI] [--set scaling.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/scaling.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["scaling"], description=__doc__.splitlines()[0]))
