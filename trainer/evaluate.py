"""Test metrics of a trained net beside a linear baseline on the same split.

Formulas follow ``sklearn.metrics``; the baseline is scikit-learn's
``LinearRegression`` or ``LogisticRegression``. Host-side NumPy: no JAX, no MLflow.
"""

from __future__ import annotations

import numpy as np

from .data import Dataset

__all__ = ["evaluate_test", "linear_baseline"]


def evaluate_test(dataset: Dataset, outputs: np.ndarray) -> dict[str, float]:
    """Test metrics of model outputs on ``dataset.x_test``.

    Regression: ``rmse``, ``mae`` (original target units) and ``r2``
    (coefficient of determination; left out with fewer than two test rows).
    Classification: ``accuracy`` and ``cross_entropy`` (nats, mean over rows).
    Formulas follow ``sklearn.metrics``.

    Args:
      outputs: ``(N_test, T)`` predictions in standardised units (regression) or
        ``(N_test, C)`` logits (classification).
    """
    from sklearn import metrics as skm

    if dataset.task == "regression":
        pred = dataset.to_original_units(outputs)
        true = dataset.to_original_units(dataset.y_test)
        out = {"rmse": float(np.sqrt(skm.mean_squared_error(true, pred))),
               "mae": float(skm.mean_absolute_error(true, pred))}
        if len(true) >= 2:
            out["r2"] = float(skm.r2_score(true, pred))
        return out
    from scipy.special import softmax

    return _class_metrics(dataset, softmax(np.asarray(outputs, np.float64), axis=1))


def _class_metrics(dataset: Dataset, probs: np.ndarray) -> dict[str, float]:
    from sklearn import metrics as skm

    labels = list(range(len(dataset.class_names)))
    return {"accuracy": float(skm.accuracy_score(dataset.y_test, probs.argmax(1))),
            "cross_entropy": float(skm.log_loss(dataset.y_test, probs, labels=labels))}


def linear_baseline(dataset: Dataset) -> dict[str, float]:
    """The test metrics of a linear model fitted on the same training rows.

    ``sklearn.linear_model.LinearRegression`` for regression,
    ``LogisticRegression`` (L2, C=1, lbfgs) for classification.
    """
    from sklearn.linear_model import LinearRegression, LogisticRegression

    if dataset.task == "regression":
        model = LinearRegression().fit(dataset.x_train, dataset.y_train)
        return evaluate_test(dataset, model.predict(dataset.x_test))
    model = LogisticRegression(max_iter=2000).fit(dataset.x_train, dataset.y_train)
    # Classes absent from the training rows get probability 0, so columns match labels.
    probs = np.zeros((len(dataset.x_test), len(dataset.class_names)))
    probs[:, model.classes_] = model.predict_proba(dataset.x_test)
    return _class_metrics(dataset, probs / probs.sum(1, keepdims=True))  # float32 -> exact sums
