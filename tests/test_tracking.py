"""The MLflow record, in-process against a real SQLite store: store location (C01, C04),
flat params (C03), honest run status (C06), stale runs, non-finite values (C07)."""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import pytest

from trainer.tracking import (flatten_config, get_or_create_experiment, metric_histories,
                              open_store, resolve_store, start_run)


def test_default_store_is_absolute_under_launch_dir(tmp_path, monkeypatch):
    """C01/C04: the default store is named explicitly, absolute, inside mlruns/."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = resolve_store(None, tmp_path)
    assert store.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert store.artifact_root == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
    rel = resolve_store("sqlite:///sub/runs.db", tmp_path)
    assert rel.tracking_uri == f"sqlite:///{tmp_path.resolve()}/sub/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    remote = resolve_store(None, tmp_path)
    assert remote.tracking_uri == "http://127.0.0.1:5000" and remote.lock_path is None
    assert resolve_store("sqlite:////abs/x.db", tmp_path).tracking_uri == "sqlite:////abs/x.db"


def test_flatten_config_gives_one_param_per_leaf():
    """C03: dotted keys, one per leaf; lists stay one value; None is 'null'."""
    flat = flatten_config({"model": {"hidden": [8, 8], "width": 4}, "optim": {"clip": None},
                           "seed": 0})
    assert flat == {"model.hidden": "[8, 8]", "model.width": "4", "optim.clip": "null",
                    "seed": "0"}


@pytest.fixture
def store(tmp_path):
    s = resolve_store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", tmp_path)
    client = open_store(s)
    return s, client, get_or_create_experiment(client, s, "unit")


def test_metric_histories_read_the_curves_back_by_the_loops_names(store):
    """A resume reads a run's curves under the record's names (curves/train_loss) and
    returns them by the loop's (train_loss); a run recorded before the prefix holds them
    under the bare names, which are read when the prefixed ones are absent."""
    _, client, exp = store
    with start_run(client, exp, run_name="now", tags={}) as tracker:
        tracker.log_metrics([("curves/train_loss", 1.0, 0), ("curves/train_loss", 0.5, 10),
                             ("curves/val_loss", 0.7, 9), ("test/rmse", 3.0, 0)])
    with start_run(client, exp, run_name="before", tags={}) as old:
        old.log_metrics([("train_loss", 2.0, 0), ("val_loss", 1.5, 9)])
    assert metric_histories(client, tracker.run_id) == {"train_loss": ([0, 10], [1.0, 0.5]),
                                                        "val_loss": ([9], [0.7])}
    assert metric_histories(client, old.run_id) == {"train_loss": ([0], [2.0]),
                                                    "val_loss": ([9], [1.5])}


def test_c06_exception_marks_failed_and_keeps_metrics(store):
    """C06 (a): an exception mid-training ends the run FAILED with the error recorded,
    the end time set and the metrics logged before it kept."""
    _, client, exp = store
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(client, exp, run_name="r", tags={}) as tracker:
            tracker.log_metrics([("train_loss", 1.0, 0), ("train_loss", 0.5, 1)])
            raise RuntimeError("boom at step 2")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "boom at step 2" in run.data.tags["error"]
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train_loss")] == [1.0, 0.5]
    assert "error.txt" in [f.path for f in client.list_artifacts(tracker.run_id)]


def test_c06_interrupt_marks_killed(store):
    """C06 (b): Ctrl-C ends the run KILLED with its end time."""
    _, client, exp = store
    with pytest.raises(KeyboardInterrupt):
        with start_run(client, exp, run_name="r", tags={}) as tracker:
            raise KeyboardInterrupt
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None


def test_c02_each_run_closes_on_its_own(store):
    """C02: runs opened one after another in one process never share an active run."""
    _, client, exp = store
    ids = []
    for fail in (True, False):
        try:
            with start_run(client, exp, run_name="r", tags={}) as tracker:
                ids.append(tracker.run_id)
                if fail:
                    raise ValueError("early exit")
        except ValueError:
            pass
    assert len(set(ids)) == 2
    assert [client.get_run(i).info.status for i in ids] == ["FAILED", "FINISHED"]


def test_c07_non_finite_values_are_not_stored(store):
    """C07: +inf would be stored as 1.797e308; such points are dropped and counted."""
    _, client, exp = store
    with start_run(client, exp, run_name="r", tags={}) as tracker:
        dropped = tracker.log_metrics([("loss", 1.0, 0), ("loss", math.inf, 1),
                                       ("loss", math.nan, 2), ("loss", 0.5, 3)])
    assert dropped == 2
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (3, 0.5)]


def test_runs_of_dead_processes_are_marked_killed(store):
    """A run whose process died without closing it (SIGKILL) is marked KILLED by the
    next process that opens the store on the same host."""
    s, client, exp = store
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    orphan = client.create_run(exp, tags={"host": socket.gethostname(), "pid": str(pid)})
    other_host = client.create_run(exp, tags={"host": "elsewhere", "pid": str(pid)})
    open_store(s)
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert "ended without closing" in client.get_run(orphan.info.run_id).data.tags["killed_reason"]
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"


def test_experiment_artifacts_live_beside_the_store(store, tmp_path):
    """C01: artifacts go to <store dir>/artifacts/<experiment>, not the working dir."""
    s, client, exp = store
    location = client.get_experiment(exp).artifact_location
    assert location == (tmp_path / "mlruns" / "artifacts" / "unit").as_uri()
    assert get_or_create_experiment(client, s, "unit") == exp


def test_unreachable_tracking_server_fails_in_seconds(tmp_path):
    """A server that does not answer gives one clear error at once, not minutes of retries."""
    import time

    from trainer.tracking import TrackingError

    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="cannot reach the tracking server"):
        open_store(resolve_store("http://127.0.0.1:9", tmp_path))
    assert time.perf_counter() - t0 < 15


def test_a_lock_file_that_cannot_be_created_fails_at_once(tmp_path):
    """A local store whose lock file cannot be created (under /proc, as a new user found)
    fails in seconds naming the folder, not after filelock's 300 s of silent retries:
    the store's URI check tries to make a folder there before anything opens."""
    import time

    from trainer.tracking import TrackingError

    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"cannot create the database's folder /proc "):
        open_store(resolve_store("sqlite:////proc/mlflow.db", tmp_path))
    assert time.monotonic() - started < 60
    with pytest.raises(TrackingError, match=r"folder /proc/trainer-test \(/proc is not"):
        open_store(resolve_store("sqlite:////proc/trainer-test/mlflow.db", tmp_path))
