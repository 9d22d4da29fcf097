"""Benchmark 8: checkpoints (W2 saving every 1000 steps against not saving).

Usage: python scripts/bench_checkpoint.py [--quick] [--tracking-uri URI] [--set checkpoint.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/checkpoint.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["checkpoint"], description=__doc__.splitlines()[0]))
