"""Benchmark 4: memory with and without the backward pass over depth; jax.checkpoint.

Usage: python scripts/bench_memory.py [--quick] [--tracking-uri URI] [--set memory.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/memory.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["memory"], description=__doc__.splitlines()[0]))
