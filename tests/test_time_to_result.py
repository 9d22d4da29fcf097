"""Time to result (issue 10): what a small job no longer pays for, and that nothing is lost.

- The CLI's own process never imports MLflow (trainer/store_process.py runs it in a
  second process); a run through it records what an in-process run records.
- A second run of the same data imports no scikit-learn (trainer/data_cache.py), and a
  damaged or unwritable cache only warns.
- The test metrics, written out in NumPy, equal ``sklearn.metrics``.

No timing assertions: the speed figures are scripts/bench_time_to_result.py's.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import all_runs, cli_env, store_client, wait_gone

from trainer import data_cache, store_process
from trainer.config import CsvDataConfig, TabularDataConfig
from trainer.evaluate import class_metrics, linear_baseline, regression_metrics
from trainer.tracking import Store, TrackingError, resolve_store

JOB = ["+experiment=diabetes", "trainer.num_steps=200", "trainer.steps_per_call=100"]


def _imported(stderr: str) -> set[str]:
    """Top-level package names in ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.slow
def test_cli_process_imports_neither_mlflow_nor_sklearn_on_a_warm_run(tmp_path):
    """The first run fills the dataset cache; the second imports neither library in the
    CLI's process, and records the same run: params, test and baseline metrics, artifacts."""
    env = cli_env(TRAINER_DATA_CACHE_DIR=str(tmp_path / "data-cache"))
    runs = []
    for name in ("first", "second"):
        cwd = tmp_path / name
        cwd.mkdir()
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer", *JOB],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        imported = _imported(done.stderr)
        assert "jax" in imported and "hydra" in imported  # the output is what we think it is
        assert "mlflow" not in imported and "sqlalchemy" not in imported
        (run,) = all_runs(store_client(cwd))
        assert run.info.status == "FINISHED"
        runs.append((run, imported))
    (first, first_imports), (second, second_imports) = runs
    assert "sklearn" in first_imports      # split and baseline computed, then cached
    assert "sklearn" not in second_imports
    assert any((tmp_path / "data-cache").glob("diabetes-*.npz"))
    for key in ("test/rmse", "test/mae", "test/r2", "test/baseline_rmse", "test/baseline_r2"):
        assert second.data.metrics[key] == first.data.metrics[key], key
    assert second.data.params == first.data.params
    names = [{a.path for a in store_client(tmp_path / d).list_artifacts(r.info.run_id)}
             for d, r in (("first", first), ("second", second))]
    assert names[0] == names[1]
    assert {"config.yaml", "training_curves.png", "gradcheck.json", "final_params"} <= names[1]


def _data(**changes) -> TabularDataConfig:
    return dataclasses.replace(TabularDataConfig(kind="diabetes"), **changes)


def test_dataset_cache_returns_the_same_split_and_baseline(tmp_path):
    first = data_cache.load(_data(), seed=3, directory=tmp_path)
    (entry,) = tmp_path.glob("diabetes-*.npz")
    again = data_cache.load(_data(), seed=3, directory=tmp_path)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "target_mean",
                  "target_std"):
        np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
        assert getattr(again, field).dtype == getattr(first, field).dtype
    assert again.baseline == first.baseline == linear_baseline(first)
    assert (again.name, again.feature_names) == (first.name, first.feature_names)
    # another seed or split is another entry
    other = data_cache.load(_data(test_fraction=0.2), seed=3, directory=tmp_path)
    assert len(list(tmp_path.glob("diabetes-*.npz"))) == 2
    assert len(other.x_test) != len(first.x_test)
    assert entry.is_file()


def test_csv_cache_key_follows_the_file_content(tmp_path):
    table = tmp_path / "t.csv"
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(60, 3))
    table.write_text("a,b,y\n" + "\n".join(",".join(f"{v:.6f}" for v in r) for r in rows))
    cfg = CsvDataConfig(path=str(table), target=["y"])
    first = data_cache.load(cfg, seed=0, directory=tmp_path / "c")
    rows[0, 2] += 100.0  # the same file name, new content: not the cached split
    table.write_text("a,b,y\n" + "\n".join(",".join(f"{v:.6f}" for v in r) for r in rows))
    second = data_cache.load(cfg, seed=0, directory=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("csv-*.npz"))) == 2
    assert not np.array_equal(first.target_mean, second.target_mean)


def test_corrupt_or_unwritable_dataset_cache_only_warns(tmp_path):
    good = data_cache.load(_data(), seed=0, directory=tmp_path / "c")
    (entry,) = (tmp_path / "c").glob("*.npz")
    entry.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="is damaged"):
        again = data_cache.load(_data(), seed=0, directory=tmp_path / "c")
    np.testing.assert_array_equal(again.x_train, good.x_train)
    assert again.baseline == good.baseline
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="cannot write the dataset cache"):
        loaded = data_cache.load(_data(), seed=0, directory=blocker / "sub")
    np.testing.assert_array_equal(loaded.x_test, good.x_test)


def test_numpy_metrics_equal_sklearn_metrics():
    from sklearn import metrics as skm
    from sklearn.linear_model import LinearRegression, LogisticRegression

    from trainer.data import load_dataset

    reg = load_dataset(_data(), seed=1)
    pred = reg.to_original_units(LinearRegression().fit(reg.x_train, reg.y_train)
                                 .predict(reg.x_test))
    true = reg.to_original_units(reg.y_test)
    got = regression_metrics(true, pred)
    assert got["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(true, pred)), rel=1e-12)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(true, pred), rel=1e-12)
    assert got["r2"] == pytest.approx(skm.r2_score(true, pred), rel=1e-12)
    # two targets, one of them constant (r2_score's force_finite rule) and one row
    two = np.column_stack([true[:, 0], np.full(len(true), 5.0)])
    two_pred = np.column_stack([pred[:, 0], np.full(len(true), 5.0)])
    assert regression_metrics(two, two_pred)["r2"] == pytest.approx(
        skm.r2_score(two, two_pred), rel=1e-12)
    two_pred[0, 1] = 6.0
    assert regression_metrics(two, two_pred)["r2"] == pytest.approx(
        skm.r2_score(two, two_pred), rel=1e-12)
    assert set(regression_metrics(true[:1], pred[:1])) == {"rmse", "mae"}

    cls = load_dataset(_data(kind="digits"), seed=1)
    probs = LogisticRegression(max_iter=2000).fit(cls.x_train, cls.y_train) \
        .predict_proba(cls.x_test).astype(np.float64)
    probs /= probs.sum(1, keepdims=True)  # as linear_baseline passes them
    got = class_metrics(cls.y_test, probs)
    assert got["accuracy"] == skm.accuracy_score(cls.y_test, probs.argmax(1))
    assert got["cross_entropy"] == pytest.approx(
        skm.log_loss(cls.y_test, probs, labels=list(range(10))), rel=1e-12)
    sure = np.eye(10)[cls.y_test]           # probabilities of exactly 0 and 1 are clipped
    sure[0] = np.roll(sure[0], 1)
    assert class_metrics(cls.y_test, sure)["cross_entropy"] == pytest.approx(
        skm.log_loss(cls.y_test, sure, labels=list(range(10))), rel=1e-9)


# --- the store process ----------------------------------------------------------------------

def test_remote_client_round_trip_and_errors(tmp_path):
    process = store_process.start()
    assert process is not None
    try:
        store = resolve_store(None, tmp_path)
        client = store_process.RemoteClient(process, store)
        client.open()
        assert (tmp_path / "mlruns" / "mlflow.db").is_file()
        experiment_id = client.create_experiment("e", artifact_location=store.artifact_root)
        run = client.create_run(experiment_id, run_name="r", tags={"a": "1"})
        run_id = run.info.run_id
        client.log_batch_plain(run_id, metrics=[("loss", 0.5, 1000, 3), ("loss", 0.25, 1001, 4)],
                               params=[("lr", "0.1")], tags=[("b", "2")])
        client.set_terminated(run_id, "FINISHED")
        got = client.get_run(run_id)
        assert got.info.status == "FINISHED" and got.info.run_name == "r"
        assert got.data.params == {"lr": "0.1"} and got.data.metrics == {"loss": 0.25}
        assert got.data.tags["a"] == "1" and got.data.tags["b"] == "2"
        history = client.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(3, 0.5), (4, 0.25)]
        assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]
        with pytest.raises(store_process.StoreError, match="MlflowException"):
            client.get_run("0" * 32)
        blocked = tmp_path / "not-a-folder"
        blocked.write_text("x")
        bad = store_process.RemoteClient(process, Store(
            f"sqlite:///{blocked}/sub/mlflow.db", None, None))
        with pytest.raises(TrackingError, match="cannot open the tracking store"):
            bad.open()
        assert client.get_run(run_id).info.run_id == run_id  # still in step after errors
    finally:
        process.close()
    assert process.process.wait(timeout=30) == 0


def test_store_process_ends_with_its_parent_and_the_client_falls_back(tmp_path):
    with subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from trainer import store_process; "
             "p = store_process.start(); print(p.process.pid, flush=True); time.sleep(600)"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(
                Path(__file__).resolve().parents[1])}) as parent:
        child_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    if not wait_gone(child_pid, 60):
        pytest.fail("the store process outlived its parent by 60 s")

    process = store_process.start()
    process.process.kill()  # a store process that died: calls go to an in-process client
    process.process.wait(timeout=30)
    client = store_process.RemoteClient(process, resolve_store(None, tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client.open()
        assert client.search_experiments(max_results=1)[0].name == "Default"
    assert process.broken
