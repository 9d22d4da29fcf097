"""Shared test setup: strict JAX settings, a CLI runner and a store reader.

Strict settings (after equinox's tests/conftest.py): implicit rank promotion
raises, so a broadcasting bug such as (B, 1) - (B,) -> (B, B) fails loudly.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parents[1]

# CLI subprocesses of one test session share a compilation cache of their own, never the
# user's ~/.cache/trainer/jax (a test that studies the cache passes its own folder).
SESSION_CACHE = tempfile.mkdtemp(prefix="trainer-tests-jax-cache-")
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)
# Likewise the dataset cache (trainer/data_cache.py), for CLI subprocesses and in-process
# loads alike: tests never read or fill the user's ~/.cache/trainer/datasets.
DATA_CACHE = tempfile.mkdtemp(prefix="trainer-tests-data-cache-")
atexit.register(shutil.rmtree, DATA_CACHE, ignore_errors=True)
os.environ["TRAINER_DATA_CACHE_DIR"] = DATA_CACHE


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no inherited tracking URI, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
                "JAX_COMPILATION_CACHE_DIR": SESSION_CACHE})
    env.update(extra)
    return env


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` no longer exists (reaping it if it is our child);
    False if it is still there after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    return False


@pytest.fixture
def run_cli(tmp_path):
    """``run_cli(*args, cwd=tmp_path, env=None, timeout=300)`` runs ``python -m trainer``
    in a subprocess and returns the ``CompletedProcess`` (text output captured)."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd or tmp_path,
                              env=env or cli_env(), capture_output=True, text=True,
                              timeout=timeout)

    return run


def store_client(launch_dir: Path):
    """An ``MlflowClient`` on the default store of a job launched in ``launch_dir``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{launch_dir / 'mlruns' / 'mlflow.db'}")


def all_runs(client) -> list:
    """Every run in every experiment of the store, newest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000) if experiments else []


def sgd_step(graphdef, params, x, y, *, learning_rate: float):
    """One SGD step of the service's train step on a population of one; returns the
    ``TrainState`` with the member axis taken off the params."""
    import jax.numpy as jnp

    from trainer.config import SgdOptimConfig
    from trainer.optim import make_optimizer
    from trainer.steps import init_train_state, make_train_step, mse_loss

    tx = make_optimizer(SgdOptimConfig(learning_rate=learning_rate), 1)
    step = jax.jit(make_train_step(graphdef, tx, mse_loss))
    state, _ = step(init_train_state(jax.tree.map(lambda a: a[None], params), tx,
                                     {"learning_rate": jnp.full((1,), learning_rate)},
                                     key=jax.random.key(1)[None]), (x[None], y[None]))
    return state._replace(params=jax.tree.map(lambda a: a[0], state.params))


def split_runs(runs) -> tuple[list, list]:
    """``(parents, others)``: a sweep's parent runs, and every other run (lone or member)."""
    parents = [r for r in runs if r.data.tags.get("population.role") == "parent"]
    return parents, [r for r in runs if r.data.tags.get("population.role") != "parent"]


class RecordingTracker:
    """Keeps what ``loop.train_and_evaluate`` logs, in memory, for unit tests of the loop.

    The end-to-end tests (test_cli.py) check the same calls against a real MLflow store.
    """

    def __init__(self):
        self.log_s = 0.0
        self.tags: dict[str, str] = {}
        self.params: dict[str, str] = {}
        self.points: list[tuple[str, float, int]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.models: list[tuple[dict, str | None]] = []  # (bundle's meta, registered name)
        self.datasets: list[dict] = []

    def log_model(self, bundle, *, registered_model_name=None):
        import json

        import numpy as np

        with np.load(bundle) as z:
            self.models.append((json.loads(str(z["meta"])), registered_model_name))

    def log_datasets(self, inputs):
        self.datasets.append(inputs)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_params(self, params):
        self.params.update({k: str(v) for k, v in params.items()})

    def log_metrics(self, points):
        points = list(points)
        self.points.extend(points)
        return 0

    def log_artifact(self, local_path, artifact_path=None):
        assert Path(local_path).exists()
        self.artifacts.append((Path(local_path).name, artifact_path))

    def flush(self):
        pass

    def history(self, name: str) -> list[tuple[int, float]]:
        return [(step, value) for n, value, step in self.points if n == name]
