"""The team's MLflow tracking server on PostgreSQL (``make server``); the same as
``python -m trainer.tracking_server``, whose docstring and ``--help`` say more.

Usage: python scripts/tracking_server.py --pg-dir DIR --artifacts DIR [--port 5000]
       python scripts/tracking_server.py --backend-store-uri postgresql+psycopg://... --artifacts DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.tracking_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
