"""Test metrics of a trained net beside a linear baseline on the same split.

The metrics are ``sklearn.metrics``' definitions written out in NumPy (a small job
that found its split in ``data_cache`` then imports no scikit-learn, about 2 s of its
wall time); ``tests/test_time_to_result.py`` checks them against ``sklearn.metrics`` on real
predictions. The baseline is scikit-learn's ``LinearRegression`` or
``LogisticRegression``. Host-side NumPy: no JAX, no MLflow.
"""

from __future__ import annotations

import numpy as np

from .data import Dataset

__all__ = ["evaluate_test", "linear_baseline", "regression_metrics", "class_metrics"]


def evaluate_test(dataset: Dataset, outputs: np.ndarray) -> dict[str, float]:
    """Test metrics of model outputs on ``dataset.x_test``.

    Regression: ``rmse``, ``mae`` (original target units) and ``r2``
    (coefficient of determination; left out with fewer than two test rows).
    Classification: ``accuracy`` and ``cross_entropy`` (nats, mean over rows).

    Args:
      outputs: ``(N_test, T)`` predictions in standardised units (regression) or
        ``(N_test, C)`` logits (classification).
    """
    if dataset.task == "regression":
        return regression_metrics(dataset.to_original_units(dataset.y_test),
                                  dataset.to_original_units(outputs))
    logits = np.asarray(outputs, np.float64)
    shifted = np.exp(logits - logits.max(1, keepdims=True))  # softmax without overflow
    return class_metrics(dataset.y_test, shifted / shifted.sum(1, keepdims=True))


def regression_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``rmse``, ``mae`` and ``r2`` of ``(N, T)`` float64 targets and predictions.

    As ``sklearn.metrics`` with ``multioutput="uniform_average"``: ``rmse`` is the square
    root of ``mean_squared_error``, ``mae`` is ``mean_absolute_error``, ``r2`` is the mean
    over targets of ``1 - SS_res / SS_tot`` (``r2_score``: a constant target scores 1.0
    when predicted exactly, else 0.0); ``r2`` is left out with fewer than two rows.
    """
    err = pred - true
    out = {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}
    if len(true) >= 2:
        ss_res = (err ** 2).sum(0)
        ss_tot = ((true - true.mean(0)) ** 2).sum(0)
        safe = np.where(ss_tot > 0, ss_tot, 1.0)
        scores = np.where(ss_tot > 0, 1.0 - ss_res / safe, np.where(ss_res == 0, 1.0, 0.0))
        out["r2"] = float(scores.mean())
    return out


def class_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``accuracy`` and ``cross_entropy`` of ``(N,)`` integer labels and ``(N, C)``
    float64 class probabilities.

    As ``sklearn.metrics.accuracy_score`` and ``log_loss`` (natural log, mean over
    rows, probabilities clipped to ``[eps, 1 - eps]`` with ``eps`` the float64 machine
    epsilon, as ``log_loss`` does).
    """
    labels = np.asarray(labels, np.int64)
    eps = np.finfo(np.float64).eps
    picked = np.clip(probs[np.arange(len(labels)), labels], eps, 1 - eps)
    return {"accuracy": float(np.mean(probs.argmax(1) == labels)),
            "cross_entropy": float(-np.mean(np.log(picked)))}


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
    return class_metrics(dataset.y_test, probs / probs.sum(1, keepdims=True))  # exact sums
