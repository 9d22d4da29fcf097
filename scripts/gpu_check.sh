#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU whose Python already has jax with
# CUDA (and flax, optax, orbax, sympy, scikit-learn, matplotlib, rich), but no internet.
# The other dependencies come from wheels carried in .gpuwheels/ (fetched beforehand on a
# machine with a package index:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform any -d .gpuwheels mlflow-skinny==3.17.2 sqlalchemy alembic
#   pip download --no-deps -d .gpuwheels hydra-core==1.3.2 omegaconf==2.3.0 \
#       antlr4-python3-runtime==4.9.3
# ). Results go to $OUT (default ./gpu-out): logs, the benchmark JSON and the store.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
# The Python that holds jax with CUDA (on the lent H200 machines: /opt/torch/.venv/bin/python3).
# The missing packages go into its own environment (the machine is disposable); a venv made
# from it would not see its packages when it is itself a venv.
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-index --find-links "$REPO/.gpuwheels" \
    mlflow-skinny==3.17.2 hydra-core==1.3.2 omegaconf==2.3.0 sqlalchemy alembic \
    >"$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

LAUNCH=$(mktemp -d)
cd "$LAUNCH"
for exp in seed digits gradcheck; do
    echo "=== python -m trainer +experiment=$exp"
    $PY -m trainer +experiment=$exp trainer.progress=false 2>&1 | tail -9
done
# Benchmarks: ${BENCH:-scripts/bench.py} (the whole suite) or one case, e.g. bench_overhead.py
echo "=== ${BENCH:-scripts/bench.py} ${BENCH_ARGS:-}"
$PY "$REPO/${BENCH:-scripts/bench.py}" ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tail -30
cp "$LAUNCH/mlruns/mlflow.db" "$OUT/" 2>/dev/null
echo "=== tests of the per-run figures and the in-run gradient checks, on the GPU"
cd "$REPO" && timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider \
    tests/test_measure.py tests/test_gradcheck_run.py 2>&1 | tail -15
