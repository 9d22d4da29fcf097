"""The model people use: each run's MLflow pyfunc model, its datasets, and serving it (C22).

In-process tests log into a real SQLite store with ``MlflowClient``; the end-to-end
test trains through the CLI and serves the model with ``python -m trainer.serve`` from
a shell without the virtualenv on PATH, then POSTs rows to it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from conftest import cli_env, store_client
from trainer import mlflow_model
from trainer.config import TabularDataConfig
from trainer.data import load_dataset
from trainer.models import ModelSpec, init_model
from trainer.tracking import run_op


def _store(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    return client, client.create_run(experiment).info.run_id


def _net(dataset, hidden=(8,)):
    spec = ModelSpec("mlp", dataset.in_features, dataset.out_features, 1, tuple(hidden), False,
                     "lecun_normal", 1.0)
    graphdef, params = nnx.split(init_model(spec, key=jax.random.key(7)))
    return spec, graphdef, params


def _raw(dataset, x):
    return np.asarray(x, np.float64) * dataset.feature_std + dataset.feature_mean


def test_logged_model_takes_raw_rows_and_answers_in_target_units(tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    dataset = load_dataset(TabularDataConfig(kind="diabetes"), seed=3)
    spec, graphdef, params = _net(dataset)
    client, run_id = _store(tmp_path)
    bundle = mlflow_model.write_bundle(tmp_path / "net.npz", params=params, spec=spec,
                                       dataset=dataset, run_id=run_id)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    info = run_op(client, "log_model", run_id, str(bundle), registered_model_name="diab")
    assert info["registered_version"] == "1"
    # MLflow's fluent API is pointed at the store for the call only: a later store of
    # this process (resolve_store reads the variable) must not land in this one
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    run = client.get_run(run_id)
    assert run.data.tags["model_uri"] == info["model_uri"]
    assert [o.model_id for o in run.outputs.model_outputs] == [info["model_id"]]
    # in the run's experiment (its Models tab), not in experiment 0 of ./mlruns
    logged = client.get_logged_model(info["model_id"])
    assert logged.experiment_id == run.info.experiment_id
    assert logged.name == run.info.run_name.replace(".", "_")  # not MLflow's "model" for every run
    assert logged.artifact_location.startswith((tmp_path / "art").as_uri())

    with mlflow_model._fluent_store(client.tracking_uri):  # where models:/ URIs resolve
        model = mlflow.pyfunc.load_model(info["model_uri"])
        logged = Model.load(info["model_uri"])
        folder = mlflow.artifacts.download_artifacts(info["model_uri"])
    rows = pd.DataFrame(_raw(dataset, dataset.x_test), columns=dataset.feature_names)
    got = model.predict(rows)
    want = dataset.to_original_units(np.asarray(nnx.merge(graphdef, params)(dataset.x_test)))
    assert list(got.columns) == ["progression"]
    np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-5)
    assert 25 < got.to_numpy().mean() < 350  # disease progression units, not z-scores
    # the columns may come in any order; a missing one is named
    shuffled = rows[list(reversed(dataset.feature_names))]
    np.testing.assert_allclose(model.predict(shuffled).to_numpy(), got.to_numpy())
    with pytest.raises(MlflowException, match=r"missing inputs \['s5', 's6'\]"):
        model.predict(rows.drop(columns=["s5", "s6"]))
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == list(dataset.feature_names)
    frame = logged.load_input_example(folder)
    np.testing.assert_allclose(frame.to_numpy(), rows.to_numpy()[:mlflow_model.EXAMPLE_ROWS])
    assert client.get_model_version("diab", "1").run_id == run_id


def test_classification_model_gives_labels_and_probabilities(tmp_path):
    import mlflow

    dataset = load_dataset(TabularDataConfig(kind="digits"), seed=0)
    spec, graphdef, params = _net(dataset, hidden=(16,))
    client, run_id = _store(tmp_path)
    bundle = mlflow_model.write_bundle(tmp_path / "net.npz", params=params, spec=spec,
                                       dataset=dataset, run_id=run_id)
    info = run_op(client, "log_model", run_id, str(bundle))
    assert info["registered_version"] == ""
    with mlflow_model._fluent_store(client.tracking_uri):
        model = mlflow.pyfunc.load_model(info["model_uri"])
    got = model.predict(
        pd.DataFrame(_raw(dataset, dataset.x_test[:40]), columns=dataset.feature_names))
    logits = np.asarray(nnx.merge(graphdef, params)(dataset.x_test[:40]))
    assert list(got.columns) == ["label"] + [f"probability_{c}" for c in range(10)]
    assert got["label"].tolist() == [str(i) for i in logits.argmax(1)]
    prob = got.drop(columns="label").to_numpy()
    np.testing.assert_allclose(prob.sum(1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(prob, np.asarray(jax.nn.softmax(logits, axis=1)), rtol=1e-4)


def test_logging_datasets_survives_a_racing_insert():
    """Two jobs in parallel processes (a launcher's) log the same split at once: the second
    insert of the dataset row breaks the store's unique key; logging once more links the
    row the first job wrote. Any other error is raised."""
    from mlflow.exceptions import MlflowException

    class RacingClient:
        def __init__(self, message):
            self.message, self.calls = message, 0

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:
                raise MlflowException(self.message)

    inputs = mlflow_model.dataset_inputs(load_dataset(TabularDataConfig(kind="diabetes"), seed=0))
    raced = RacingClient("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.digest")
    mlflow_model.log_datasets(raced, "run", inputs)
    assert raced.calls == 2
    with pytest.raises(MlflowException, match="disk I/O"):
        mlflow_model.log_datasets(RacingClient("disk I/O error"), "run", inputs)


def test_datasets_are_logged_as_run_inputs(tmp_path):
    dataset = load_dataset(TabularDataConfig(kind="diabetes"), seed=0)
    client, run_id = _store(tmp_path)
    run_op(client, "log_datasets", run_id, mlflow_model.dataset_inputs(dataset))
    inputs = client.get_run(run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert set(by_context) == {"train", "validation", "test"}
    assert by_context["test"].name == "diabetes-test"
    assert "sklearn.datasets.load_diabetes" in by_context["train"].source
    assert len({d.digest for d in by_context.values()}) == 3  # three different row sets
    rows = {c: json.loads(d.profile)["num_rows"] for c, d in by_context.items()}
    assert rows == {"train": len(dataset.x_train), "validation": len(dataset.x_val),
                    "test": len(dataset.x_test)}
    schema = json.loads(by_context["train"].schema)["mlflow_colspec"]
    assert [c["name"] for c in schema] == [*dataset.feature_names, "progression"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_c22_served_model_answers_offline_in_target_units(run_cli, tmp_path):
    import mlflow

    done = run_cli("+experiment=smoke", "tracking.register_model=smoke-net")
    assert done.returncode == 0, done.stderr
    client = store_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    uri = run.data.tags["model_uri"]
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.name == run.info.run_name.replace(".", "_") and logged.source_run_id == run.info.run_id
    assert logged.tags["mlflow.source.name"] == "python -m trainer"  # not the store process
    assert run.data.tags["mlflow.note.content"].startswith("test RMSE ")
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "validation", "test"}
    # the model reproduces the run's test predictions: its RMSE is the logged one
    dataset = load_dataset(TabularDataConfig(kind="diabetes", val_fraction=0.15, test_fraction=0.15),
                           seed=0)
    rows = pd.DataFrame(_raw(dataset, dataset.x_test), columns=dataset.feature_names)
    with mlflow_model._fluent_store(client.tracking_uri):
        predicted = mlflow.pyfunc.load_model(uri).predict(rows)["progression"].to_numpy()
    truth = dataset.to_original_units(dataset.y_test)[:, 0]
    rmse = float(np.sqrt(np.mean((predicted - truth) ** 2)))
    assert rmse == pytest.approx(run.data.metrics["test/rmse"], rel=1e-5)
    assert client.get_model_version("smoke-net", "1").run_id == run.info.run_id

    # served from a plain shell: no virtualenv on PATH, no MLFLOW_TRACKING_URI
    port = _free_port()
    env = {k: v for k, v in cli_env().items() if not k.startswith("MLFLOW_")}
    env["PATH"] = "/usr/bin:/bin"
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "trainer.serve", run.info.run_id,
                               "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        head = rows.head(4)
        status, answer = _post(port, {"dataframe_split": {
            "columns": list(head.columns), "data": head.to_numpy().tolist()}})
        assert status == 200, answer
        served = [p["progression"] for p in answer["predictions"]]
        np.testing.assert_allclose(served, predicted[:4], rtol=1e-6)
        status, answer = _post(port, {"dataframe_split": {
            "columns": list(head.columns[:3]), "data": head.to_numpy()[:, :3].tolist()}})
        assert status == 400
        assert "missing inputs" in answer["message"] and "'s6'" in answer["message"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_serve_names_a_run_without_a_model(tmp_path, capsys, monkeypatch):
    from trainer.serve import main

    (tmp_path / "mlruns").mkdir()
    client, run_id = _store(tmp_path / "mlruns")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([run_id]) == 2
    assert f"run {run_id} (RUNNING) has no logged model" in capsys.readouterr().err
    assert main(["0123456789abcdef"]) == 2
    assert "no run '0123456789abcdef'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "mlruns")
    assert main([run_id]) == 2
    assert "no store at" in capsys.readouterr().err


@pytest.mark.parametrize("spec", [
    ModelSpec("mlp", 5, 2, 1, (4, 6, 3), False, "lecun_normal", 1.0),
    ModelSpec("mlp", 5, 3, 1, (4, 4, 4), True, "lecun_normal", 1.0),
    ModelSpec("tied", 5, 1, 4, (), False, "normal", 1.0),
    ModelSpec("tied", 4, 4, 4, (), False, "normal", 1.0)],
    ids=["mlp", "mlp-tied-hidden", "tied-with-maps", "tied-exact"])
def test_served_forward_pass_is_the_flax_models(spec):
    """The served model's NumPy forward pass (no JAX in a server) equals trainer.models."""
    from trainer.served_model import _nest, forward

    graphdef, params = nnx.split(init_model(spec, key=jax.random.key(5)))
    flat = {}
    mlflow_model._flatten(nnx.to_pure_dict(params), "", flat)
    x = np.asarray(jax.random.normal(jax.random.key(6), (7, spec.in_features)), np.float32)
    np.testing.assert_allclose(forward(spec.kind, _nest(flat), x),
                               np.asarray(nnx.merge(graphdef, params)(x)), rtol=2e-5, atol=1e-6)
