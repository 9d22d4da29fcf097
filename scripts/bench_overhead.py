"""Benchmark 6: the service's training loop against a hand-written jit + scan loop.

Usage: python scripts/bench_overhead.py [--quick] [--tracking-uri URI] [--set overhead.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/overhead.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["overhead"], description=__doc__.splitlines()[0]))
