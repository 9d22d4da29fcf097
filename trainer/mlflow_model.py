"""The model people use: each trained run's net as an MLflow pyfunc model (case C22).

Two halves, one per process:

- ``write_bundle`` (the job's process, which holds the params): one ``net.npz``
  with the params, the standardisation fitted on the training split, a JSON
  description of the net and the data (``served_model`` reads it), and a few raw
  test rows as the input example.
- ``log_model`` (the process that imports MLflow: the store process, or this one):
  logs ``trainer/served_model.py`` as the model's code ("models from code", no
  pickled objects) with the bundle as its artifact, a signature and the input
  example, linked to the run as its output (MLflow's Logged models), optionally
  registered under a name.

Serve it with ``python -m trainer.serve RUN_ID`` (``make serve RUN=...``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["write_bundle", "log_model", "register_model", "dataset_inputs", "log_datasets",
           "model_requirements", "EXAMPLE_ROWS"]

EXAMPLE_ROWS = 5  # raw test rows stored as the model's input example


def write_bundle(path: Path, *, params, spec, dataset, run_id: str) -> Path:
    """Write what the served model needs into one ``.npz`` file.

    Args:
      path: the file to write.
      params: the member's params pytree (``nnx.State`` or nested dict of arrays).
      spec: the ``models.ModelSpec`` that built the net.
      dataset: the ``data.Dataset`` it trained on (names, task, scaling, test rows).
      run_id: the run the model comes from, kept in its description.

    Returns:
      ``path``.
    """
    from dataclasses import asdict

    from flax import nnx

    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    arrays = {}
    _flatten(pure, "params/", arrays)
    for name in ("feature_mean", "feature_std", "target_mean", "target_std"):
        value = getattr(dataset, name)
        if value is not None:
            arrays[name] = np.asarray(value, np.float64)
    arrays["example"] = dataset.raw_features(dataset.x_test[:EXAMPLE_ROWS])
    meta = {"spec": {**asdict(spec), "hidden": list(spec.hidden)}, "task": dataset.task,
            "data": dataset.name, "source": dataset.source,
            "feature_names": list(dataset.feature_names),
            "target_names": list(dataset.target_names),
            "class_names": list(dataset.class_names), "run_id": run_id}
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def _flatten(tree: dict, prefix: str, out: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}/", out)
        else:
            out[f"{prefix}{key}"] = np.asarray(value)


def model_requirements() -> list[str]:
    """The model's pip requirements: the installed versions of what ``served_model``
    imports (it needs neither JAX nor this package)."""
    from importlib import metadata

    return [f"{dist}=={metadata.version(dist)}" for dist in ("mlflow", "numpy", "pandas")]


def log_model(client, run_id: str, bundle: str, *, registered_model_name: str | None = None
              ) -> dict[str, str]:
    """Log the run's model (runs where MLflow is imported; see the module docstring).

    Args:
      client: an ``mlflow.MlflowClient`` of the run's store.
      run_id: the run the model belongs to (its source run).
      bundle: path of the ``write_bundle`` file.
      registered_model_name: also register it under this name (a new version).

    Returns:
      ``{"model_id", "model_uri", "registered_version"}`` (the last empty when not
      registered), plain strings.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    with np.load(bundle, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        example = z["example"]
    features = meta["feature_names"]
    inputs = Schema([ColSpec("double", name) for name in features])
    if meta["task"] == "classification":
        outputs = Schema([ColSpec("string", "label")]
                         + [ColSpec("double", f"probability_{c}") for c in meta["class_names"]])
    else:
        outputs = Schema([ColSpec("double", name) for name in meta["target_names"]])
    code = str(Path(__file__).resolve().parent / "served_model.py")
    run = client.get_run(run_id)
    # the run's own source, user and commit (else MLflow names the store process as its
    # source), and the run's name as the model's (else every model is called "model")
    tags = {k: v for k, v in run.data.tags.items()
            if k.startswith("mlflow.source.") or k == "mlflow.user"}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", run.info.run_name or "model")  # MLflow refuses . / : % quotes
    with _fluent_store(client.tracking_uri, run.info.experiment_id):
        info = Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
            python_model=code, artifacts={"net": str(bundle)},
            signature=ModelSignature(inputs=inputs, outputs=outputs),
            input_example=pd.DataFrame(example, columns=features),
            pip_requirements=model_requirements(),
            registered_model_name=registered_model_name,
            tags={**tags, "data": meta["data"], "model.kind": meta["spec"]["kind"]})
    version = info.registered_model_version
    client.set_tag(run_id, "model_uri", info.model_uri)  # what a sweep's parent points to
    return {"model_id": info.model_id, "model_uri": info.model_uri,
            "registered_version": "" if version is None else str(version)}


@contextlib.contextmanager
def _fluent_store(tracking_uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API, which model logging uses, at the run's store and
    experiment (else the logged model lands in experiment 0 of ``./mlruns``), and back."""
    import mlflow

    # set_tracking_uri also sets $MLFLOW_TRACKING_URI (for subprocesses), which mirrors
    # a URI set before; None unsets both (a process's resolve_store reads that variable)
    before_uri = os.environ.get("MLFLOW_TRACKING_URI")
    before_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(tracking_uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before_uri)
        if before_id is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = before_id


def register_model(client, model_uri: str, name: str) -> str:
    """Register ``model_uri`` (a logged model) under ``name`` as a new version.

    Returns:
      the version, as a string.
    """
    import mlflow

    with _fluent_store(client.tracking_uri):
        return str(mlflow.register_model(model_uri, name).version)


def dataset_inputs(dataset) -> dict:
    """The splits of ``dataset`` as MLflow should record them (``log_datasets``): raw
    features and targets in the data's own units, plain arrays and strings.

    Returns:
      ``{"name", "source", "feature_names", "target_names", "splits":
      {"train" | "validation" | "test": (features (N, D) float64, targets (N, T)
      float64 or (N,) str)}}``.
    """
    splits = {}
    for context, x, y in (("train", dataset.x_train, dataset.y_train),
                          ("validation", dataset.x_val, dataset.y_val),
                          ("test", dataset.x_test, dataset.y_test)):
        x = dataset.raw_features(x)
        if dataset.task == "classification":
            y = np.asarray(dataset.class_names)[np.asarray(y)]
        else:
            y = dataset.to_original_units(y)
        splits[context] = (x, y)
    return {"name": dataset.name, "source": dataset.source,
            "feature_names": list(dataset.feature_names),
            "target_names": list(dataset.target_names), "splits": splits}


def log_datasets(client, run_id: str, inputs: dict) -> None:
    """Record the train, validation and test splits as the run's MLflow dataset inputs
    (name ``<data>-<split>``, MLflow's digest of the rows, the source, the context tag),
    so the UI's Datasets column and the run page show what it trained and was tested on.

    Args:
      inputs: ``dataset_inputs(dataset)``.
    """
    import mlflow
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = inputs["source"]
    if source.startswith("/"):  # a CSV file: "<path> (sha256 ...)"
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # two registered classes read file:// alike
            warnings.simplefilter("ignore")
            origin = resolve_dataset_source(Path(source.split(" (sha256")[0]).as_uri())
    else:  # a scikit-learn loader or the seed problem's draws
        origin = CodeDatasetSource({"loader": source})
    entries = []
    for context, (x, y) in inputs["splits"].items():
        targets = inputs["target_names"]
        y = np.asarray(y).reshape(len(x), -1)
        # one frame at once: column by column, 100 targets (the seed problem) fragment it
        frame = pd.concat([pd.DataFrame(x, columns=inputs["feature_names"]),
                           pd.DataFrame(y, columns=targets)], axis=1)
        data = mlflow.data.from_pandas(frame, source=origin, targets=targets[0] if
                                       len(targets) == 1 else None,
                                       name=f"{inputs['name']}-{context}")
        entries.append(DatasetInput(data._to_mlflow_entity(),
                                    tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=entries)
    except MlflowException as err:
        # Jobs in parallel processes (a launcher's) logging the same split at once: the
        # store's get-or-create of the dataset row races, and the second insert breaks its
        # unique key (SQLite "UNIQUE constraint failed", PostgreSQL "UniqueViolation"). The
        # transaction was rolled back and the row now exists: once more links it.
        if "unique" not in str(err).lower():
            raise
        client.log_inputs(run_id, datasets=entries)
