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

from . import measure, report
from .data import Dataset
from .models import ModelSpec, count_params, init_model
from .optim import make_optimizer, make_schedule
from .steps import (DeviceData, check_scalar_loss, init_train_state, loss_for_task,
                    make_predict, make_train_chunk, make_train_step)

__all__ = ["NonFiniteLossError", "GradcheckFailedError", "RunResult", "CountingCompiler",
           "train_and_evaluate", "check_worked_examples", "chunk_points", "chunk_timings", "gradcheck_steps",
           "evaluate_test", "SHUFFLE_STREAM", "GRADCHECK_STREAM"]

SHUFFLE_STREAM = 7919  # fold_in(key(seed), SHUFFLE_STREAM) is the shuffling key
GRADCHECK_STREAM = 104729  # fold_in(key(seed), GRADCHECK_STREAM) draws the checks' samples


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN or infinite; ``step`` is the first such step."""

    def __init__(self, step: int, learning_rate: float):
        self.step = step
        super().__init__(
            f"the loss became NaN or infinite at step {step}; training stopped. The learning "
            f"rate ({learning_rate:g}) is probably too large: try a smaller "
            f"optim.learning_rate (e.g. {learning_rate / 10:g}) or set optim.clip_norm")


class GradcheckFailedError(RuntimeError):
    """A gradient check failed where failing ends the run: in training with
    ``gradcheck.fail_run`` (``step`` is where), or a worked example (``step`` None)."""

    def __init__(self, step: int | None, failures: list[str]):
        self.step = step
        where = "" if step is None else f" at step {step}"
        super().__init__(f"gradient check failed{where}: {'; '.join(failures)}")


class CountingCompiler:
    """Ahead-of-time compilation of one function, counting its compilations.

    ``jax.jit`` compiles again, silently, whenever an argument's shape or dtype
    changes; here each call's abstract signature is compared with the compiled
    one, and a change compiles again and is recorded with the arguments that
    changed, so a run can report it. Every timed phase ends on the host after the
    work is done (tracing, lowering and XLA compilation are synchronous).

    Attributes:
      num_compiles: compilations so far (1 in a healthy run).
      recompiles: one line per compilation after the first, naming each argument
        whose shape or dtype changed (``measure.signature_changes``).
      trace_lower_s: seconds spent tracing to a jaxpr and lowering to StableHLO.
      compile_s: seconds spent in XLA compilation.
      compiled: the latest ``jax.stages.Compiled``.
    """

    def __init__(self, fn: Callable):
        self._jitted = jax.jit(fn)
        self._signature: dict | None = None
        self.compiled = None
        self.num_compiles = 0
        self.recompiles: list[str] = []
        self.trace_lower_s = 0.0
        self.compile_s = 0.0

    def compile(self, *args):
        """Trace, lower and compile for ``args``' shapes and dtypes; returns the executable."""
        signature = measure.abstract_signature(args)
        if self._signature is not None:
            self.recompiles.append("; ".join(
                measure.signature_changes(self._signature, signature)))
        t0 = time.perf_counter()
        lowered = self._jitted.trace(*args).lower()
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        self.trace_lower_s += t1 - t0
        self.compile_s += time.perf_counter() - t1
        self.num_compiles += 1
        self._signature = signature
        return self.compiled

    def __call__(self, *args):
        if measure.abstract_signature(args) != self._signature:
            self.compile(*args)
        return self.compiled(*args)


@dataclass
class RunResult:
    """What a finished run measured.

    Attributes:
      test_metrics: the net's test metrics, in the target's original units.
      baseline_metrics: the same metrics of the linear baseline on the same split.
      timings: seconds unless named ``*_per_s``: ``trace_lower_s`` and
        ``compile_s`` (the chunk's tracing + lowering, and XLA compilation),
        ``analysis_s`` (compiling one step alone for its cost and memory figures),
        those of ``chunk_timings``, ``samples_per_s``, ``gradcheck_s`` (all
        gradient checks), ``log_s`` (time the calling thread spent in MLflow calls,
        apart from the step figures) and ``wall_s`` (the whole function).
      compute: ``num_compiles`` of the chunk (1 expected), ``flops_per_step`` (XLA
        cost analysis of one compiled step), ``flops_per_s`` (achieved: FLOPs per
        step x steady-state steps/s), ``argument_bytes``, ``output_bytes``,
        ``temp_bytes`` (XLA memory analysis of one step; temp bytes hold what the
        backward pass keeps) and, on GPU, ``peak_bytes`` (device allocator peak).
      gradcheck: the gradient-check reports as ``[(step, report)]``;
        ``gradcheck_passed`` is False if any failed (None when none ran).
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
    compute: dict[str, float] = field(default_factory=dict)
    gradcheck: list = field(default_factory=list)
    gradcheck_passed: bool | None = None


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
      chunks), ``step_s`` and ``step_p90_s`` (median and 90th percentile over
      chunks of interval / steps); and ``steps_per_s`` over the steady state
      (chunks after the first; the only one when there is one). Intervals are wall time between completions, so they
      include host work (metrics, MLflow) whenever the device had to wait for it.
    """
    intervals = np.diff([t_start, *done_at])
    if len(done_at) > 1:
        steady_steps, steady_s = sum(chunk_steps[1:]), done_at[-1] - done_at[0]
    else:
        steady_steps, steady_s = chunk_steps[0], done_at[0] - t_start
    per_step = intervals / np.asarray(chunk_steps)
    return {"first_call_s": float(intervals[0]), "train_s": done_at[-1] - t_start,
            "step_s": float(np.median(per_step)), "step_p90_s": float(np.quantile(per_step, 0.9)),
            "steps_per_s": steady_steps / steady_s}


def gradcheck_steps(every_steps: int | None, chunk_ends: list[int]) -> set[int]:
    """The chunk ends after which a gradient check runs (besides the one of step 0).

    Args:
      every_steps: ``None``: only after the last step; ``0``: never; ``N``: at the
        first chunk end at or after each multiple of ``N``, and after the last step.
      chunk_ends: the step count at the end of each chunk, increasing.
    """
    if every_steps == 0 or not chunk_ends:
        return set()
    out = {chunk_ends[-1]}
    if every_steps:
        due = every_steps
        for end in chunk_ends:
            if end >= due:
                out.add(end)
                due = (end // every_steps + 1) * every_steps
    return out


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
    gradchecker = _Gradchecker(cfg.gradcheck, graphdef, loss_fn, dataset, tracker, console,
                               key=jax.random.fold_in(root, GRADCHECK_STREAM))
    # Where failing stops the run, the step-0 check runs now, before any step; else
    # after training, beside the check of the last step, so the checks' one-off float64
    # compilation never sits between the compile and the timed steps.
    initial_params = params
    check_first_now = cfg.gradcheck.every_steps != 0 and cfg.gradcheck.fail_run
    if check_first_now:
        gradchecker(params, step=0)
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

    chunk_fn = CountingCompiler(train_chunk)
    chunk_fn.compile(state, data)
    t0 = time.perf_counter()
    batch = (data.x_train[:batch_size], data.y_train[:batch_size])
    compute = _step_analysis(jax.jit(train_step).lower(state, batch).compile())
    analysis_s = time.perf_counter() - t0

    num_chunks = -(-num_steps // steps_per_call)
    chunk_ends = [min((c + 1) * steps_per_call, num_steps) for c in range(num_chunks)]
    check_after = gradcheck_steps(cfg.gradcheck.every_steps, chunk_ends)
    history: dict[str, tuple[list[int], list[float]]] = {}
    # Pipelined: chunk c+1 is queued on the device before the host fetches and logs
    # chunk c, so host work (metrics, MLflow) overlaps device work. done_at[c] is when
    # chunk c's results reached the host (device_get blocks until they are ready).
    # Nothing is donated, so a gradient check may read the state of chunk c meanwhile.
    t_start = time.perf_counter()
    pending = chunk_fn(state, data)
    done_at: list[float] = []
    with report.progress_bar(console, num_steps, enabled=tcfg.progress) as progress:
        for c in range(num_chunks):
            state, metrics = pending
            if c + 1 < num_chunks:
                pending = chunk_fn(state, data)
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
            done = chunk_ends[c] if stop_before is None else stop_before
            interval = done_at[-1] - (done_at[-2] if c else t_start)
            last_loss = history.get("train_loss", ([], [float("nan")]))[1][-1]
            progress(done, last_loss, (done - c * steps_per_call) / interval)
            if stop_before is not None:
                tracker.set_tags({"diverged_at_step": str(stop_before)})
                raise NonFiniteLossError(stop_before, float(schedule(stop_before)))
            if chunk_ends[c] in check_after and c + 1 < num_chunks:
                gradchecker(state.params, step=chunk_ends[c])
    jax.block_until_ready(state)
    done_at[-1] = time.perf_counter()
    first_bad, nonfinite_steps = (int(v) for v in jax.device_get(
        (state.nonfinite_step, state.nonfinite_count)))
    if first_bad >= 0:
        tracker.set_tags({"first_nonfinite_step": str(first_bad),
                          "nonfinite_steps": str(nonfinite_steps)})

    late_checks = [] if check_first_now or cfg.gradcheck.every_steps == 0 else \
        [(initial_params, 0)]
    if num_steps in check_after:
        late_checks.append((state.params, num_steps))

    predict = jax.jit(make_predict(graphdef))
    outputs = np.asarray(jax.device_get(predict(state.params, jnp.asarray(dataset.x_test))))
    test_metrics = evaluate_test(dataset, outputs)
    baseline = linear_baseline(dataset)
    final = [(f"test_{k}", v, num_steps) for k, v in test_metrics.items()]
    final += [(f"baseline_test_{k}", v, num_steps) for k, v in baseline.items()]
    final.append(("nonfinite_steps", nonfinite_steps, num_steps))
    chunk_steps = np.diff([0, *chunk_ends]).tolist()
    timings = {"trace_lower_s": chunk_fn.trace_lower_s, "compile_s": chunk_fn.compile_s,
               "analysis_s": analysis_s, **chunk_timings(t_start, done_at, chunk_steps)}
    timings["samples_per_s"] = timings["steps_per_s"] * batch_size
    compute["num_compiles"] = chunk_fn.num_compiles
    if "flops_per_step" in compute:
        compute["flops_per_s"] = compute["flops_per_step"] * timings["steps_per_s"]
    peak = measure.device_peak_bytes(device)
    if peak is not None:
        compute["peak_bytes"] = peak
    if chunk_fn.recompiles:
        tracker.set_tags({"recompiled": " | ".join(chunk_fn.recompiles)})
        if console is not None:
            console.print(f"[yellow]the train step compiled {chunk_fn.num_compiles} times; "
                          f"arguments that changed: {' | '.join(chunk_fn.recompiles)}[/]")
    host_params = jax.device_get(state.params)
    with report.workdir(workdir) as folder:
        plot = report.plot_training(history, folder / "training_curves.png",
                                    title=f"{dataset.name}: {cfg.model.kind}")
        tracker.log_artifact(plot)
        ckpt = report.save_params(host_params, folder / "final_params")
        tracker.log_artifact(ckpt, "final_params")
        try:
            for params_at, step in late_checks:
                gradchecker(params_at, step=step)
        finally:  # a failed check (fail_run) keeps its report
            gradchecker.log_artifacts(folder)
    timings["gradcheck_s"] = gradchecker.wall_s
    tracker.flush()  # every training point written before the timings are taken
    timings["log_s"] = tracker.log_s
    timings["wall_s"] = time.perf_counter() - wall_start
    final += [(name, value, num_steps) for name, value in timings.items()]
    final += [(name, value, num_steps) for name, value in compute.items()]
    tracker.log_metrics(final)
    tracker.flush()
    return RunResult(test_metrics=test_metrics, baseline_metrics=baseline, timings=timings,
                     num_params=num_params, num_steps=num_steps, nonfinite_steps=nonfinite_steps,
                     history=history, params=host_params, device=device_name,
                     compute=compute, gradcheck=gradchecker.reports,
                     gradcheck_passed=gradchecker.passed)


def _step_analysis(compiled) -> dict[str, float]:
    """FLOPs and buffer bytes of one compiled train step (see ``RunResult.compute``)."""
    out: dict[str, float] = {}
    cost = measure.compiled_cost(compiled)
    if "flops" in cost:
        out["flops_per_step"] = cost["flops"]
    memory = measure.compiled_memory(compiled)
    for name in ("argument_bytes", "output_bytes", "temp_bytes"):
        if name in memory:
            out[name] = memory[name]
    return out


class _Gradchecker:
    """Runs ``gradcheck.check_gradients`` on a fixed probe batch and records each report.

    Metrics go to the tracker at the step checked; the tag ``gradcheck`` says
    ``passed`` until a check fails, then ``failed``; a failure prints one line, and
    raises ``GradcheckFailedError`` when ``fail_run`` is set.
    """

    def __init__(self, gcfg, graphdef, loss_fn, dataset: Dataset, tracker, console, *,
                 key: jax.Array):
        self._gcfg, self._graphdef, self._loss_fn = gcfg, graphdef, loss_fn
        self._tracker, self._console, self._key = tracker, console, key
        rows = min(gcfg.probe_batch_size, dataset.x_train.shape[0])
        self._probe = (np.asarray(dataset.x_train[:rows]), np.asarray(dataset.y_train[:rows]))
        self.reports: list = []
        self.passed: bool | None = None
        self.wall_s = 0.0

    def __call__(self, params, *, step: int) -> None:
        """Check the gradient at ``params`` and record the report at ``step``."""
        from . import gradcheck

        g = self._gcfg
        settings = gradcheck.GradcheckSettings(
            rel_tol=g.rel_tol, max_elements=g.max_elements, num_directions=g.num_directions,
            richardson=g.richardson, hvp=g.hvp)
        t0 = time.perf_counter()
        result = gradcheck.check_gradients(self._graphdef, params, self._probe, self._loss_fn,
                                           key=jax.random.fold_in(self._key, step),
                                           settings=settings)
        self.wall_s += time.perf_counter() - t0
        self.record(result, step=step)

    def record(self, result, *, step: int) -> None:
        """Log ``result`` at ``step``; tag, print or raise on a failure."""
        self.reports.append((step, result))
        self.reports.sort(key=lambda item: item[0])
        self._tracker.log_metrics([(name, value, step)
                                   for name, value in result.metrics().items()])
        first_failure = result.passed is False and self.passed is not False
        self.passed = result.passed if self.passed is None else (self.passed and result.passed)
        if self.passed or first_failure:
            self._tracker.set_tags({"gradcheck": "passed" if self.passed else "failed"})
        if not result.passed:
            failures = result.failures()
            if self._gcfg.fail_run:
                raise GradcheckFailedError(step, failures)
            if self._console is not None:
                self._console.print(f"[bold red]gradient check FAILED at step {step}:[/] "
                                    f"{'; '.join(failures)}")

    def log_artifacts(self, folder: Path) -> None:
        """The reports as ``gradcheck.json`` and their plot as ``gradcheck.png``."""
        if not self.reports:
            return
        import json

        path = folder / "gradcheck.json"
        path.write_text(json.dumps([{"step": step, **result.to_dict()}
                                    for step, result in self.reports], indent=1))
        self._tracker.log_artifact(path)
        self._tracker.log_artifact(report.plot_gradcheck(self.reports, folder / "gradcheck.png",
                                                         rel_tol=self._gcfg.rel_tol))


def check_worked_examples(tracker, console=None) -> list:
    """The notebook's worked derivative examples (``gradcheck.worked_examples``),
    recorded: a table on the console, per-example relative errors as metrics
    (``examples/<name>/rel_err_autodiff``, ``.../rel_err_fd``), the rows as the
    artifact ``worked_examples.json`` and the tag ``gradcheck=passed|failed``.

    Returns:
      the rows, when every example agrees.

    Raises:
      GradcheckFailedError: naming each example whose sources disagree (after
        everything is logged).
    """
    import dataclasses
    import json

    from . import gradcheck

    t0 = time.perf_counter()
    rows = gradcheck.worked_examples()
    wall_s = time.perf_counter() - t0
    if console is not None:
        report.print_examples(console, rows)
    points = [("gradcheck/wall_s", wall_s, 0)]
    for row in rows:
        points += [(f"examples/{row.name}/rel_err_autodiff", row.rel_err_autodiff, 0),
                   (f"examples/{row.name}/rel_err_fd", row.rel_err_fd, 0)]
    tracker.log_metrics(points)
    tracker.log_text(json.dumps([dataclasses.asdict(row) for row in rows], indent=1),
                     "worked_examples.json")
    failed = [row.name for row in rows if not row.passed]
    tracker.set_tags({"gradcheck": "failed" if failed else "passed"})
    if failed:
        raise GradcheckFailedError(None, [f"worked example {name!r} disagrees" for name in failed])
    return rows
