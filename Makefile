# Two commands on a fresh clone: `make run` and `make test`. Each creates .venv if missing
# and installs the project with its dev extras first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STORE  := sqlite:///$(CURDIR)/mlruns/mlflow.db
EXPERIMENT ?= diabetes

.PHONY: run test test-fast ui server serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m trainer +experiment=$(EXPERIMENT)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The MLflow UI over the same store, on 127.0.0.1 only; one worker and no job runner
# (the default server starts 15 processes and 2.5 GB here); no usage telemetry, as the jobs.
ui: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
	  --backend-store-uri $(STORE) --host 127.0.0.1 --port 5000 --workers 1

# The team's tracking server (README, "A tracking server for a team"): MLflow on a
# PostgreSQL cluster in $(SERVER_DIR)/postgres (created on first use, 127.0.0.1 only),
# artifacts in $(SERVER_DIR)/artifacts; jobs log to it with tracking.uri=http://127.0.0.1:$(SERVER_PORT).
# SERVER_ARGS adds options, e.g. "--host 0.0.0.0 --app-name basic-auth".
SERVER_DIR  ?= $(CURDIR)/mlruns/server
SERVER_PORT ?= 5050
server: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m trainer.tracking_server --pg-dir $(SERVER_DIR)/postgres \
	  --artifacts $(SERVER_DIR)/artifacts --port $(SERVER_PORT) $(SERVER_ARGS)

# A run's MLflow model over HTTP on 127.0.0.1, offline: RUN=<run id> (a sweep's parent
# serves its best member) or a models:/ URI; POST rows to http://127.0.0.1:$(PORT)/invocations
PORT ?= 5001
serve: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make serve RUN=<run id> [PORT=5001]" >&2; exit 2; }
	$(PY) -m trainer.serve $(RUN) --port $(PORT) --tracking-uri $(STORE)

# The benchmark suite into the default store (experiment "benchmarks"), then a comparison
# with the previous run of the same kind (exit 1 on a regression beyond noise).
# BENCH_ARGS=--quick for the one-minute version.
bench: $(STAMP)
	$(PY) scripts/bench.py $(BENCH_ARGS)
	$(PY) scripts/bench_compare.py

clean:
	rm -rf outputs multirun .pytest_cache
