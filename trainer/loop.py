"""The training loop: ``train_and_evaluate(cfg, dataset, tracker)``.

Runs the compiled chunks of steps, brings metrics to the host once per chunk,
hands them to the tracker in batches, times every phase with
``jax.block_until_ready`` (case C10), evaluates on the test split beside a
linear baseline and saves the final params. It knows no Hydra and no MLflow: the
tracker is any object with the methods of ``tracking.MlflowTracker``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import report
from .data import Dataset
from .models import ModelSpec, count_params, init_model
from .optim import make_optimizer, make_schedule
from .steps import (DeviceData, check_scalar_loss, init_train_state, loss_for_task,
                    make_predict, make_train_chunk, make_train_step)

__all__ = ["NonFiniteLossError", "RunResult", "train_and_evaluate", "chunk_points", "chunk_timings",
           "evaluate_test", "SHUFFLE_STREAM"]

SHUFFLE_STREAM = 7919  # fold_in(key(seed), SHUFFLE_STREAM) is the shuffling key


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN or infinite; ``step`` is the first such step."""

    def __init__(self, step: int, learning_rate: float):
        self.step = step
        super().__init__(
            f"the loss became NaN or infinite at step {step}; training stopped. The learning "
            f"rate ({learning_rate:g}) is probably too large: try a smaller "
            f"optim.learning_rate (e.g. {learning_rate / 10:g}) or set optim.clip_norm")


@dataclass
class RunResult:
    """What a finished run measured.

    Attributes:
      test_metrics: the net's test metrics, in the target's original units.
      baseline_metrics: the same metrics of the linear baseline on the same split.
      timings: seconds unless named ``*_per_s``: ``compile_s`` (trace, lower and
        compile of the chunk), those of ``chunk_timings``, ``samples_per_s``,
        ``log_s`` (time the calling thread spent in MLflow calls, apart from the
        step figures) and ``wall_s`` (the whole function).
      num_params: trainable scalars (a shared matrix counts once).
      num_steps: steps run; nonfinite_steps: steps whose update was dropped.
      history: host copies of the logged curves, ``{name: (steps, values)}``.
      params: the final params (a host pytree).
      device: ``"backend (device kind)"``.
    """

    test_metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    timings: dict[str, float]
    num_params: int
    num_steps: int
    nonfinite_steps: int
    history: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    params: Any = None
    device: str = ""


def chunk_points(metrics, *, log_every_steps: int,
                 stop_before: int | None = None) -> list[tuple[str, float, int]]:
    """Turn one chunk's host metrics into ``(name, value, step)`` points.

    Train metrics are kept at the steps ``s`` with ``s % log_every_steps == 0``;
    ``val_loss`` wherever it was evaluated. Values are Python floats and steps
    Python ints (case C08). With ``stop_before``, steps from there on are left out.

    Args:
      metrics: ``(step_metrics, eval_metrics)`` as returned by the chunk (see
        ``steps.make_train_chunk``), as NumPy arrays.
    """
    step_metrics, eval_metrics = metrics
    steps = step_metrics["step"]
    keep = step_metrics["active"].astype(bool) & (steps % log_every_steps == 0)
    if stop_before is not None:
        keep &= steps < stop_before
    points = []
    for i in np.flatnonzero(keep):
        step = int(steps[i])
        for name in ("train_loss", "grad_norm", "learning_rate"):
            points.append((name, float(step_metrics[name][i]), step))
    for i in np.flatnonzero(eval_metrics["evaluated"]):
        step = int(eval_metrics["val_step"][i])
        if stop_before is None or step < stop_before:
            points.append(("val_loss", float(eval_metrics["val_loss"][i]), step))
    return points


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


def chunk_timings(t_start: float, done_at: list[float], chunk_steps: list[int]
                  ) -> dict[str, float]:
    """Step-time figures from the times at which each chunk's results reached the host.

    Args:
      t_start: ``time.perf_counter()`` just before the first chunk was dispatched
        (after compilation).
      done_at: completion time of each chunk, the last one taken after
        ``jax.block_until_ready`` on the final state (case C10).
      chunk_steps: the steps each chunk ran (the last one may run fewer).

    Returns:
      seconds: ``first_call_s`` (first chunk, dispatch to results), ``train_s`` (all
      chunks), ``step_s`` (median over chunks of interval / steps); and
      ``steps_per_s`` over the steady state (chunks after the first; the only one
      when there is one). Intervals are wall time between completions, so they
      include host work (metrics, MLflow) whenever the device had to wait for it.
    """
    intervals = np.diff([t_start, *done_at])
    if len(done_at) > 1:
        steady_steps, steady_s = sum(chunk_steps[1:]), done_at[-1] - done_at[0]
    else:
        steady_steps, steady_s = chunk_steps[0], done_at[0] - t_start
    return {"first_call_s": float(intervals[0]), "train_s": done_at[-1] - t_start,
            "step_s": float(np.median(intervals / np.asarray(chunk_steps))),
            "steps_per_s": steady_steps / steady_s}


def train_and_evaluate(cfg, dataset: Dataset, tracker, *, console=None,
                       loss_fn: Callable | None = None, workdir: Path | None = None) -> RunResult:
    """Train the configured model on ``dataset`` and record everything with ``tracker``.

    Args:
      cfg: a ``config.Config`` (dataclasses): uses ``model``, ``optim``, ``trainer``,
        ``data.batch_size`` and ``seed``.
      dataset: the split data (``data.load_dataset``).
      tracker: receives ``set_tags``, ``log_metrics``, ``log_artifact``; see
        ``tracking.MlflowTracker``.
      console: a ``rich.console.Console`` for progress and messages, or None.
      loss_fn: ``(outputs, targets) -> ()`` loss; default MSE or cross-entropy by task.
      workdir: folder for artifacts before upload (a temporary folder if None).

    Returns:
      a ``RunResult``.

    Raises:
      NonFiniteLossError: a NaN or infinite loss with ``trainer.on_nonfinite=stop``
        (case C07); the points before it are logged first.
      ValueError: the loss is not a scalar (case C13).
    """
    wall_start = time.perf_counter()
    tcfg = cfg.trainer
    num_steps = tcfg.num_steps
    device = jax.devices()[0]
    device_name = f"{jax.default_backend()} ({device.device_kind})"
    tracker.set_tags({"jax.backend": jax.default_backend(), "jax.device_kind": device.device_kind,
                      "jax.device_count": str(jax.device_count())})
    if console is not None:
        console.print(f"device: {device_name}")

    root = jax.random.key(cfg.seed)
    spec = ModelSpec(kind=cfg.model.kind, in_features=dataset.in_features,
                     out_features=dataset.out_features, width=cfg.model.width,
                     hidden=tuple(cfg.model.hidden), tied_hidden=cfg.model.tied_hidden,
                     init=cfg.model.init, init_scale=cfg.model.init_scale)
    model = init_model(spec, key=root)
    graphdef, params = nnx.split(model, nnx.Param)
    num_params = count_params(params)
    loss_fn = loss_fn or loss_for_task(dataset.task)
    schedule = make_schedule(cfg.optim, num_steps)
    optimizer = make_optimizer(cfg.optim, schedule)

    n_train = dataset.x_train.shape[0]
    batch_size = min(cfg.data.batch_size, n_train)
    if batch_size < cfg.data.batch_size:
        tracker.set_tags({"batch_size_clamped": f"{cfg.data.batch_size} -> {batch_size}"})
        if console is not None:
            console.print(f"data.batch_size={cfg.data.batch_size} is more than the {n_train} "
                          f"training rows: each step uses all {n_train}")
    steps_per_call = min(tcfg.steps_per_call, num_steps)
    check_scalar_loss(loss_fn, graphdef, params, dataset.x_train[:batch_size],
                      dataset.y_train[:batch_size])
    data = jax.device_put(DeviceData(dataset.x_train, dataset.y_train, dataset.x_val,
                                     dataset.y_val))
    state = init_train_state(params, optimizer,
                             key=jax.random.fold_in(root, SHUFFLE_STREAM))
    train_step = make_train_step(graphdef, optimizer, loss_fn, schedule,
                                 skip_nonfinite=tcfg.on_nonfinite == "skip")
    train_chunk = make_train_chunk(train_step, graphdef, loss_fn, num_steps=num_steps,
                                   steps_per_call=steps_per_call, batch_size=batch_size,
                                   eval_every_steps=tcfg.eval_every_steps,
                                   log_every_steps=tcfg.log_every_steps)
    tracker.log_metrics([("num_params", num_params, 0), ("batch_size", batch_size, 0)])

    t0 = time.perf_counter()
    compiled = jax.jit(train_chunk).lower(state, data).compile()
    compile_s = time.perf_counter() - t0

    num_chunks = -(-num_steps // steps_per_call)
    history: dict[str, tuple[list[int], list[float]]] = {}
    # Pipelined: chunk c+1 is queued on the device before the host fetches and logs
    # chunk c, so host work (metrics, MLflow) overlaps device work. done_at[c] is when
    # chunk c's results reached the host (device_get blocks until they are ready).
    t_start = time.perf_counter()
    pending = compiled(state, data)
    done_at: list[float] = []
    with report.progress_bar(console, num_steps, enabled=tcfg.progress) as progress:
        for c in range(num_chunks):
            state, metrics = pending
            if c + 1 < num_chunks:
                pending = compiled(state, data)
            # one device-to-host transfer per chunk: metrics and the non-finite record
            metrics, first_bad = jax.device_get((metrics, state.nonfinite_step))
            done_at.append(time.perf_counter())
            stop_before = None
            if first_bad >= 0 and tcfg.on_nonfinite == "stop":
                stop_before = int(first_bad)
            points = chunk_points(metrics, log_every_steps=tcfg.log_every_steps,
                                  stop_before=stop_before)
            tracker.log_metrics(points)
            for name, value, step in points:
                steps_list, values = history.setdefault(name, ([], []))
                steps_list.append(step)
                values.append(value)
            if c == 0 and console is not None:
                console.print(f"step 0: loss {float(metrics[0]['train_loss'][0]):.8g}, "
                              f"gradient norm {float(metrics[0]['grad_norm'][0]):.8g}")
            done = min((c + 1) * steps_per_call, num_steps) if stop_before is None \
                else stop_before
            interval = done_at[-1] - (done_at[-2] if c else t_start)
            last_loss = history.get("train_loss", ([], [float("nan")]))[1][-1]
            progress(done, last_loss, (done - c * steps_per_call) / interval)
            if stop_before is not None:
                tracker.set_tags({"diverged_at_step": str(stop_before)})
                raise NonFiniteLossError(stop_before, float(schedule(stop_before)))
    jax.block_until_ready(state)
    done_at[-1] = time.perf_counter()
    first_bad, nonfinite_steps = (int(v) for v in jax.device_get(
        (state.nonfinite_step, state.nonfinite_count)))
    if first_bad >= 0:
        tracker.set_tags({"first_nonfinite_step": str(first_bad),
                          "nonfinite_steps": str(nonfinite_steps)})

    predict = jax.jit(make_predict(graphdef))
    outputs = np.asarray(jax.device_get(predict(state.params, jnp.asarray(dataset.x_test))))
    test_metrics = evaluate_test(dataset, outputs)
    baseline = linear_baseline(dataset)
    final = [(f"test_{k}", v, num_steps) for k, v in test_metrics.items()]
    final += [(f"baseline_test_{k}", v, num_steps) for k, v in baseline.items()]
    final.append(("nonfinite_steps", nonfinite_steps, num_steps))
    chunk_steps = [min(steps_per_call, num_steps - c * steps_per_call)
                   for c in range(num_chunks)]
    timings = {"compile_s": compile_s, **chunk_timings(t_start, done_at, chunk_steps)}
    timings["samples_per_s"] = timings["steps_per_s"] * batch_size
    host_params = jax.device_get(state.params)
    with report.workdir(workdir) as folder:
        plot = report.plot_training(history, folder / "training_curves.png",
                                    title=f"{dataset.name}: {cfg.model.kind}")
        tracker.log_artifact(plot)
        ckpt = report.save_params(host_params, folder / "final_params")
        tracker.log_artifact(ckpt, "final_params")
    tracker.flush()  # every training point written before the timings are taken
    timings["log_s"] = tracker.log_s
    timings["wall_s"] = time.perf_counter() - wall_start
    final += [(name, value, num_steps) for name, value in timings.items()]
    tracker.log_metrics(final)
    tracker.flush()
    return RunResult(test_metrics=test_metrics, baseline_metrics=baseline, timings=timings,
                     num_params=num_params, num_steps=num_steps, nonfinite_steps=nonfinite_steps,
                     history=history, params=host_params, device=device_name)
