#!/usr/bin/env bash
# The nightly benchmark job, shared by deploy/cron and deploy/systemd: the full suite into the
# default store (<checkout>/mlruns/mlflow.db, or $MLFLOW_TRACKING_URI when set), then the
# comparison with the previous run of the same kind. Extra arguments go to scripts/bench.py
# (e.g. --quick). Exit status: the suite's when it failed, else the comparison's (1 on a
# regression beyond noise), so cron mails and systemd marks the unit failed either way.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p mlruns
# Two suites on one machine would slow each other's timings: wait for a running one to end.
# (Suites that do overlap are still both recorded intact; only their timings suffer.)
exec 9>mlruns/.bench-nightly.lock
flock 9
"$PY" scripts/bench.py "$@"
suite=$?
"$PY" scripts/bench_compare.py
compare=$?
exit $(( suite != 0 ? suite : compare ))
