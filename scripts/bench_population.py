"""Benchmark 7: populations (P1: a lone run vs one fixed batch; P3: 64 members as one program).

Usage: python scripts/bench_population.py [--quick] [--tracking-uri URI] [--set population.SIZE=VALUE]

One benchmark of the suite (scripts/bench.py), into its own MLflow run in experiment
``benchmarks``; what it measures and checks: trainer/benchmarks/population.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(cases=["population"], description=__doc__.splitlines()[0]))
