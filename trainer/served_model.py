"""The MLflow model of a trained run, written as "models from code" (no pickled objects).

``mlflow_model.log_model`` logs THIS FILE as the model's code, with one artifact:
``net.npz`` (written by ``mlflow_model.write_bundle``), which holds the params, the
standardisation fitted on the training split, and a JSON description of the net and
its data. Loading the model (``mlflow.pyfunc.load_model``, ``mlflow models serve``)
runs this file, which ends in ``mlflow.models.set_model``.

The forward pass is ``trainer.models``' (``TanhMLP``, ``TiedTanh``) written in NumPy
(float32, as trained), so that the served model needs neither JAX nor this package:
it loads in milliseconds, MLflow's check at logging time (it predicts the input
example) costs no JAX start-up, and a server needs only numpy, pandas and mlflow.
``tests/test_model.py`` checks it against the Flax models of every kind.

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


__all__ = ["TrainedNet", "forward"]


class TrainedNet(mlflow.pyfunc.PythonModel):
    """A trained tanh net with its input and output scaling (see the module docstring)."""

    def load_context(self, context) -> None:
        with np.load(context.artifacts["net"], allow_pickle=False) as bundle:
            meta = json.loads(str(bundle["meta"]))
            arrays = {k: bundle[k] for k in bundle.files if k != "meta"}
        self.meta = meta
        self.params = _nest({k[len("params/"):]: v for k, v in arrays.items()
                             if k.startswith("params/")})
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
        out = forward(self.meta["spec"]["kind"], self.params,
                      np.asarray(x, np.float32)).astype(np.float64)
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


def forward(kind: str, params: dict, x: np.ndarray) -> np.ndarray:
    """The net's outputs for standardised rows, as ``trainer.models`` computes them.

    Args:
      kind: ``"mlp"`` (``TanhMLP``) or ``"tied"`` (``TiedTanh``).
      params: the nested params (``nnx.to_pure_dict`` layout; list indices as keys).
      x: ``(N, D)`` float32.

    Returns:
      ``(N, T)`` float32 outputs (regression targets in standard units, or logits).
    """
    def linear(layer, h):
        return h @ layer["kernel"] + layer["bias"]

    if kind == "tied":  # tanh(Θ·tanh(Θ·h)) with rows as batch elements: h @ Θᵀ
        h = linear(params["input_map"], x) if "input_map" in params else x
        theta = params["theta"]
        h = np.tanh(np.tanh(h @ theta.T) @ theta.T)
        return linear(params["output_map"], h) if "output_map" in params else h
    h = np.tanh(linear(params["input_layer"], x))
    if "shared_kernel" in params:  # one kernel for every hidden-to-hidden layer
        for i in sorted(params.get("hidden_biases", {}), key=int):
            h = np.tanh(h @ params["shared_kernel"] + params["hidden_biases"][i])
    else:
        for i in sorted(params.get("hidden_layers", {}), key=int):
            h = np.tanh(linear(params["hidden_layers"][i], h))
    return linear(params["output_layer"], h)


def _nest(flat: dict) -> dict:
    """``{"a/b/c": array}`` -> ``{"a": {"b": {"c": array}}}``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


mlflow.models.set_model(TrainedNet())
