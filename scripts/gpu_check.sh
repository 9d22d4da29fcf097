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
PY=${PYTHON:-python3}
VENV=/tmp/trainer-gpu-venv
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-index --find-links "$REPO/.gpuwheels" \
    mlflow-skinny==3.17.2 hydra-core==1.3.2 omegaconf==2.3.0 sqlalchemy alembic \
    >"$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
PY=$VENV/bin/python
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

LAUNCH=$(mktemp -d)
cd "$LAUNCH"
for exp in seed digits tied-diabetes gradcheck; do
    echo "=== python -m trainer +experiment=$exp"
    $PY -m trainer +experiment=$exp trainer.progress=false 2>&1 | tail -16
done
echo "=== scripts/bench.py ${BENCH_ARGS:-}"
$PY "$REPO/scripts/bench.py" ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tail -60
cp "$LAUNCH/mlruns/mlflow.db" "$OUT/" 2>/dev/null
echo "=== tests (numerical core) on the GPU"
cd "$REPO" && timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -x \
    tests/test_models.py tests/test_measure.py tests/test_gradcheck_run.py 2>&1 | tail -15
