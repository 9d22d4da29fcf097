"""Benchmark 1: jax.jit against eager execution, loss and train step, over widths.

Usage: python scripts/bench_jit.py [--quick] [--tracking-uri URI] [--set jit.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/jit_vs_eager.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["jit"], description=__doc__.splitlines()[0]))
