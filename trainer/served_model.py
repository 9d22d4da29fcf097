"""The MLflow model of a trained run, written as "models from code" (no pickled objects).

``mlflow_model.log_model`` logs THIS FILE as the model's code, with one artifact:
``net.npz`` (written by ``mlflow_model.write_bundle``), which holds the params, the
standardisation fitted on the training split, and a JSON description of the net and
its data. Loading the model (``mlflow.pyfunc.load_model``, ``mlflow models serve``)
runs this file, which ends in ``mlflow.models.set_model``; ``load_context`` rebuilds
the Flax model from ``trainer.models`` (the same definition that trained it) and
puts the params in it.

The model takes raw feature rows, in the units of the data (a ``pandas.DataFrame``
with the training features as columns, or an ``(N, D)`` array in their order), and
returns, for regression, a DataFrame of predictions in the target's original units
(one column per target); for classification, a DataFrame with ``label`` (the
predicted class) and ``probability_<class>`` per class (softmax of the outputs).
A wrong number or wrong names of columns raise ``MlflowException``
(``INVALID_PARAMETER_VALUE``: HTTP 400 from ``mlflow models serve``) naming the
expected columns.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class TrainedNet(mlflow.pyfunc.PythonModel):
    """A trained tanh net with its input and output scaling (see the module docstring)."""

    def load_context(self, context) -> None:
        import jax
        from flax import nnx

        from trainer.models import ModelSpec, init_model

        with np.load(context.artifacts["net"], allow_pickle=False) as bundle:
            meta = json.loads(str(bundle["meta"]))
            arrays = {k: bundle[k] for k in bundle.files if k != "meta"}
        self.meta = meta
        spec = ModelSpec(**{**meta["spec"], "hidden": tuple(meta["spec"]["hidden"])})
        # the key only fills the arrays that the saved params replace
        graphdef, state = nnx.split(init_model(spec, key=jax.random.key(0)))
        pure = nnx.to_pure_dict(state)
        _fill(pure, arrays, "params/")
        nnx.replace_by_pure_dict(state, pure)
        self.net = nnx.merge(graphdef, state)
        self.apply = jax.jit(lambda net, x: net(x))
        self.scaling = {k: arrays.get(k) for k in ("feature_mean", "feature_std",
                                                   "target_mean", "target_std")}

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Predict for raw feature rows.

        Args:
          model_input: ``pandas.DataFrame`` with the training features as columns
            (any order; extra columns are refused), or an ``(N, D)`` array-like.

        Returns:
          ``pandas.DataFrame`` with N rows (see the module docstring).

        Raises:
          MlflowException: wrong columns or shape, or non-numeric values.
        """
        features = self.meta["feature_names"]
        x = _rows(model_input, features)
        mean, std = self.scaling["feature_mean"], self.scaling["feature_std"]
        if mean is not None:
            x = (x - mean) / std
        out = np.asarray(self.apply(self.net, np.asarray(x, np.float32)), np.float64)
        if self.meta["task"] == "classification":
            classes = self.meta["class_names"]
            z = out - out.max(axis=1, keepdims=True)
            prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            frame = pd.DataFrame({f"probability_{c}": prob[:, i] for i, c in enumerate(classes)})
            frame.insert(0, "label", [classes[i] for i in out.argmax(axis=1)])
            return frame
        if self.scaling["target_mean"] is not None:
            out = out * self.scaling["target_std"] + self.scaling["target_mean"]
        return pd.DataFrame(out, columns=list(self.meta["target_names"]))


def _rows(model_input, features: list[str]) -> np.ndarray:
    """``model_input`` as an ``(N, D)`` float64 array in the training features' order."""
    expected = (f"{len(features)} columns: {', '.join(features)}" if len(features) <= 12
                else f"{len(features)} columns ({', '.join(features[:6])}, ...)")
    if isinstance(model_input, pd.DataFrame):
        names = [str(c) for c in model_input.columns]
        if sorted(names) != sorted(features):
            missing = [f for f in features if f not in names]
            extra = [c for c in names if c not in features]
            if len(names) == len(features) and all(n.isdigit() for n in names):
                frame = model_input  # a plain array sent as "inputs": columns 0..D-1
            else:
                raise MlflowException(
                    f"the model takes {expected}; got {len(names)} column(s)"
                    + (f", missing {', '.join(missing[:6])}" if missing else "")
                    + (f", unknown {', '.join(extra[:6])}" if extra else ""),
                    INVALID_PARAMETER_VALUE)
        else:
            frame = model_input[features]
        values = frame.to_numpy()
    else:
        values = np.asarray(model_input)
        if values.ndim == 1:
            values = values.reshape(1, -1)
    if values.ndim != 2 or values.shape[1] != len(features):
        raise MlflowException(f"the model takes rows of {expected}; got an array of shape "
                              f"{values.shape}", INVALID_PARAMETER_VALUE)
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise MlflowException(f"feature values must be numbers ({err})",
                              INVALID_PARAMETER_VALUE) from None


def _fill(tree: dict, arrays: dict, prefix: str) -> None:
    """Replace the leaves of a nested dict by ``arrays[prefix + "a/b/c"]``."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _fill(value, arrays, name + "/")
        else:
            tree[key] = arrays[name]


mlflow.models.set_model(TrainedNet())
