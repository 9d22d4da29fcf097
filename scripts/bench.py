"""The benchmark suite: all eight benchmarks into ONE MLflow run (experiment ``benchmarks``).

Usage: python scripts/bench.py [--quick] [--tracking-uri URI] [--plots-dir DIR] [--json PATH]
                            [--set CASE.SIZE=VALUE] [--no-tracking]

jit against eager, value_and_grad against loss + grad, one dispatch per step
against lax.scan, memory with and without the backward pass (and jax.checkpoint),
throughput scaling against the peak matmul rate, the service's framework
overhead, populations (a lone run against one fixed batch; many members as one
program), and what saving a checkpoint every 1000 steps costs the loop. Every
benchmark checks its result before it reports a time; a wrong result ends the run
FAILED and the process exits 1. See trainer/benchmarks/ and
docs/benchmarks.md; compare runs with scripts/bench_compare.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__.splitlines()[0]))
