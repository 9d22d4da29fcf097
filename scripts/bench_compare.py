"""Compare the latest suite run with a baseline; exit 1 when a figure regressed beyond noise.

Usage: python scripts/bench_compare.py [--tracking-uri URI] [--run ID] [--baseline ID]
                                       [--floor 0.10] [--k 1.0] [--only REGEX] [--no-log]

Latest: the newest suite run of experiment ``benchmarks`` (or --run). Baseline: the previous
FINISHED run on the same device kind, suite mode, benchmarks and host CPU (or --baseline).
A figure regressed when it moved the wrong way by more than
max(floor, k x (its spread in the baseline + its spread in the latest run)).
Logs compare/history.png (every figure over the runs), compare/table.txt and
compare/comparison.json on the latest run. Details: trainer/benchmarks/compare.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.benchmarks.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
