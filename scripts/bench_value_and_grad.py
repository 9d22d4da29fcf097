"""Benchmark 2: jax.value_and_grad against separate loss and grad calls.

Usage: python scripts/bench_value_and_grad.py [--quick] [--tracking-uri URI]
                                          [--set value_and_grad.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/value_and_grad.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["value_and_grad"], description=__doc__.splitlines()[0]))
