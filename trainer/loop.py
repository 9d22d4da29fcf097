"""The training loop: ``train_population(members, datasets, trackers)``.

A run is a population of one: ``train_and_evaluate(cfg, dataset, tracker)`` is
``train_population`` with one member. The loop builds the initial state of every
member (``build_run``), runs the compiled chunks of steps (``run_chunks``, which
yields host copies of each chunk's metrics) and between chunks calls plain
callables: the per-member record, the progress bar, the gradient checks. After
the last chunk every member is evaluated on its test split beside a linear
baseline and its final params saved. Every phase is timed with
``jax.block_until_ready`` (case C10). It knows no Hydra and no MLflow: a tracker
is any object with the methods of ``tracking.MlflowTracker``, one per member; what
it records is named as ``names`` says.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from . import compile_cache, measure, mlflow_model, names, render, report, signals
from .checkpoint import CheckpointPlan, Checkpoints, Saver
from .checks import GradcheckFailedError, Gradchecker, check_worked_examples
from .data import Dataset
from .evaluate import evaluate_test, linear_baseline
from .measure import CountingCompiler, chunk_timings
from .models import count_params, make_model_spec
from .optim import Optimizer, hyperparams, make_optimizer
from .population import MemberLayout, init_params, member_layout, pad_members
from .steps import (DeviceData, TrainState, check_scalar_loss, init_train_state, loss_for_task,
                    make_predict, make_train_chunk, make_train_step)

__all__ = ["TrainingFailedError", "NonFiniteLossError", "LossDivergedError", "MostlySkippedError",
           "GradcheckFailedError", "RunResult", "CountingCompiler",
           "Run", "Chunk", "build_run", "run_chunks", "train_population", "train_and_evaluate",
           "check_worked_examples", "chunk_points", "chunk_timings", "gradcheck_steps",
           "record_figures", "evaluate_test", "SHUFFLE_STREAM", "GRADCHECK_STREAM"]

SHUFFLE_STREAM = 7919  # fold_in(key(seed), SHUFFLE_STREAM) is the shuffling key
GRADCHECK_STREAM = 104729  # fold_in(key(seed), GRADCHECK_STREAM) draws the checks' samples


class TrainingFailedError(RuntimeError):
    """A run trained but its result is not one: ``step`` is where it was judged failed."""

    def __init__(self, message: str, step: int):
        self.step = step
        super().__init__(message)


def _smaller_rate(learning_rate: float) -> str:
    return (f"The learning rate ({learning_rate:g}) is probably too large: try a smaller "
            f"optim.learning_rate (e.g. {learning_rate / 10:g}) or set optim.clip_norm")


class NonFiniteLossError(TrainingFailedError):
    """The loss or gradient became NaN or infinite; ``step`` is the first such step."""

    def __init__(self, step: int, learning_rate: float):
        super().__init__(f"the loss became NaN or infinite at step {step}; training stopped. "
                         + _smaller_rate(learning_rate), step)


class LossDivergedError(TrainingFailedError):
    """The finite loss exceeded ``trainer.divergence_factor`` times its initial value
    (case C24); ``step`` is the first such step."""

    def __init__(self, step: int, learning_rate: float, *, factor: float, initial_loss: float):
        super().__init__(
            f"the loss exceeded {factor:g} times its initial value ({initial_loss:.4g}) at "
            f"step {step} (trainer.divergence_factor); training stopped. "
            + _smaller_rate(learning_rate), step)


class MostlySkippedError(TrainingFailedError):
    """With ``trainer.on_nonfinite=skip``, more than ``trainer.max_skipped_fraction`` of
    a member's updates were dropped (issue 14.12); ``step`` is the first dropped one."""

    def __init__(self, step: int, learning_rate: float, *, skipped: int, steps: int,
                 max_fraction: float):
        super().__init__(
            f"trainer.on_nonfinite=skip dropped {skipped} of the {steps} updates "
            f"({skipped / steps:.0%}, more than trainer.max_skipped_fraction={max_fraction:g}), "
            f"the first at step {step}: what trained is not a result. "
            + _smaller_rate(learning_rate), step)


def chunk_points(metrics, member: int = 0, *, log_every_steps: int,
                 stop_before: int | None = None,
                 last_step: int | None = None) -> list[tuple[str, float, int]]:
    """Turn one chunk's host metrics into ``(name, value, step)`` points of one member.

    Train metrics are kept at the steps ``s`` with ``s % log_every_steps == 0``, and at
    ``last_step`` (the run's last, ``num_steps - 1``), where the member was active;
    ``val_loss`` wherever it was evaluated. Values are Python
    floats and steps Python ints (case C08). With ``stop_before``, steps from there on
    are left out (a member's first non-finite step, or the step after the evaluation
    that stopped it early).

    Args:
      metrics: ``(step_metrics, eval_metrics)`` as returned by the chunk (see
        ``steps.make_train_chunk``), as NumPy arrays with a member axis last.
      member: the member's index.
    """
    step_metrics, eval_metrics = metrics
    steps = step_metrics["step"]
    keep = step_metrics["active"][:, member].astype(bool) & (
        (steps % log_every_steps == 0) | (steps == last_step))
    if stop_before is not None:
        keep &= steps < stop_before
    points = []
    for i in np.flatnonzero(keep):
        step = int(steps[i])
        for name in ("train_loss", "grad_norm", "learning_rate"):
            points.append((name, float(step_metrics[name][i, member]), step))
    for i in np.flatnonzero(eval_metrics["evaluated"]):
        step = int(eval_metrics["val_step"][i])
        if stop_before is None or step < stop_before:
            points.append(("val_loss", float(eval_metrics["val_loss"][i, member]), step))
    return points


@dataclass
class Run:
    """Everything fixed for one population's training, built by ``build_run``.

    Attributes:
      members: each member's config (``config.Config``); structural values (model,
        data, optimizer kind, step counts) are those of ``members[0]``, shared by all.
      datasets: each member's split data.
      layout: the member axis on the devices (``population.MemberLayout``).
      graphdef, optimizer, loss_fn: the model's static structure, the optimizer with
        per-member values, the loss.
      state: the initial ``TrainState`` (``layout.size`` members), on the devices.
      data: the members' rows (``DeviceData``), on the devices.
      chunk_fn: the compiled chunk of ``steps_per_call`` steps.
      chunk_ends: the step count at the end of each chunk still to run.
      start_step: the step the state is at (0, or a restored checkpoint's step).
      batch_size: rows per step (``data.batch_size``, clamped to the training rows).
      compute: XLA's figures (``measure.step_analysis``); analysis_s: seconds to
        lower one step for its FLOPs.
    """

    members: list
    datasets: list[Dataset]
    layout: MemberLayout
    graphdef: Any
    optimizer: Optimizer
    loss_fn: Callable
    state: TrainState
    data: DeviceData
    chunk_fn: CountingCompiler
    chunk_ends: list[int]
    batch_size: int
    num_params: int
    compute: dict[str, float]
    analysis_s: float
    spec: ModelSpec
    start_step: int = 0

    @property
    def cfg(self):
        return self.members[0]

    @property
    def num_steps(self) -> int:
        return self.cfg.trainer.num_steps


def _stack(rows: list) -> Any:
    return jax.tree.map(lambda *xs: np.stack(xs), *rows)


def build_run(members: list, datasets: list[Dataset], *, loss_fn: Callable | None = None,
              checkpoints=None) -> Run:
    """Set up a population: models, optimizer, initial state and data on the devices,
    and the chunk compiled once for every member (case C17).

    With ``checkpoints`` (a ``checkpoint.Checkpoints`` holding a checkpoint of the
    same members), the state is its latest one, restored into the structure of the
    freshly built state (case C19), and the chunks run on from its step in
    ``steps_per_call`` steps: a run stopped at a chunk end and continued runs the
    same chunks as one that was never stopped.

    Args:
      members: one ``config.Config`` per member; they may differ only in
        ``config.VMAPPABLE_KEYS``.
      datasets: each member's split (``data.load_dataset(cfg.data, seed=cfg.seed)``).
      loss_fn: ``(outputs, targets) -> ()``; default MSE or cross-entropy by task.

    Raises:
      ValueError: the loss is not a scalar (case C13), or the checkpoint does not fit
        these members.
      FileNotFoundError: ``checkpoints`` holds none.
    """
    cfg, dataset = members[0], datasets[0]
    layout = member_layout(len(members))
    padded = pad_members(list(members), layout.size)
    padded_data = pad_members(list(datasets), layout.size)
    spec = make_model_spec(cfg.model, in_features=dataset.in_features,
                           out_features=dataset.out_features)
    graphdef, params = init_params(spec, [m.seed for m in padded],
                                   [m.model.init_scale for m in padded])
    loss_fn = loss_fn or loss_for_task(dataset.task)
    num_steps = cfg.trainer.num_steps
    optimizer = make_optimizer(cfg.optim, num_steps,
                               clip=any(m.optim.clip_norm is not None for m in members))
    values = _stack([hyperparams(m.optim, optimizer.names) for m in padded])
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), SHUFFLE_STREAM))(
        jnp.asarray([m.seed for m in padded], jnp.uint32))
    active = np.arange(layout.size) < len(members)
    batch_size = min(cfg.data.batch_size, dataset.x_train.shape[0])
    one = jax.tree.map(lambda a: a[0], params)
    check_scalar_loss(loss_fn, graphdef, one, dataset.x_train[:batch_size],
                      dataset.y_train[:batch_size])
    patience = cfg.trainer.patience
    state = layout.put(init_train_state(params, optimizer, values, key=keys, active=active,
                                        track_best=patience > 0))
    start = 0
    if checkpoints is not None:  # the only case that needs the step on the host
        state, _ = checkpoints.restore(like=state)
        start = int(jax.device_get(state.step))
    data = layout.put(DeviceData(*(np.stack([getattr(d, name) for d in padded_data])
                                   for name in ("x_train", "y_train", "x_val", "y_val"))))
    steps_per_call = min(cfg.trainer.steps_per_call, num_steps)
    train_step = make_train_step(graphdef, optimizer, loss_fn,
                                 skip_nonfinite=cfg.trainer.on_nonfinite == "skip",
                                 divergence_factor=cfg.trainer.divergence_factor)
    chunk = make_train_chunk(train_step, graphdef, loss_fn, num_steps=num_steps,
                             steps_per_call=steps_per_call, batch_size=batch_size,
                             eval_every_steps=cfg.trainer.eval_every_steps,
                             log_every_steps=cfg.trainer.log_every_steps,
                             patience=patience, min_delta=cfg.trainer.min_delta)
    chunk_fn = CountingCompiler(chunk)
    chunk_fn.compile(state, data)
    t0 = time.perf_counter()
    batch = (data.x_train[:, :batch_size], data.y_train[:, :batch_size])
    compute = measure.step_analysis(jax.jit(train_step).lower(state, batch), chunk_fn.compiled)
    analysis_s = time.perf_counter() - t0
    chunk_ends = list(range(start + steps_per_call, num_steps, steps_per_call))
    chunk_ends += [num_steps] if start < num_steps else []
    return Run(members=list(members), datasets=list(datasets), layout=layout,
               graphdef=graphdef, optimizer=optimizer, loss_fn=loss_fn, state=state, data=data,
               chunk_fn=chunk_fn, chunk_ends=chunk_ends,
               batch_size=batch_size, num_params=count_params(one), compute=compute,
               analysis_s=analysis_s, spec=spec, start_step=start)


@dataclass
class Chunk:
    """One finished chunk, as ``run_chunks`` yields it.

    Attributes:
      index: 0, 1, ...; end: the step count after it; steps: steps it ran.
      metrics: host copies of its ``(step_metrics, eval_metrics)``, member axis last.
      nonfinite_step: ``(M,)`` each member's first non-finite step, or -1.
      active: ``(M,)`` the members still training after it.
      state: the device state after it (not donated: a check may read it).
      interval_s: seconds from the previous chunk's results to this one's.
      early_stop_step: ``(M,)`` the step after which each member stopped early (its
        last logged step), or -1 (``TrainState.early_stop_step``).
      diverged_step: ``(M,)`` each member's first step above the divergence limit, or -1
        (``TrainState.diverged_step``).
      last_step_loss: ``(M,)`` each member's training loss at the run's last step, NaN
        before it ran (``TrainState.last_step_loss``).
    """

    index: int
    end: int
    steps: int
    metrics: Any
    nonfinite_step: np.ndarray
    active: np.ndarray
    state: TrainState
    interval_s: float
    early_stop_step: np.ndarray
    diverged_step: np.ndarray
    last_step_loss: np.ndarray


def run_chunks(run: Run, done_at: list[float]) -> Iterator[Chunk]:
    """Run the compiled chunks, yielding each one's host metrics; stops early when no
    member is active any more.

    Pipelined: chunk c+1 is queued on the device before the host fetches chunk c, so
    host work (metrics, MLflow) overlaps device work. ``done_at[c]`` is when chunk c's
    results reached the host (``device_get`` blocks until they are ready); the entry
    at index -1 is the dispatch time of the first chunk, and after the last chunk the
    last entry is replaced by the time after ``jax.block_until_ready`` on the state.
    """
    state, ends = run.state, run.chunk_ends
    if not ends:  # restored at or past the last step: nothing to run
        return
    done_at.append(time.perf_counter())
    pending = run.chunk_fn(state, run.data)
    for c, end in enumerate(ends):
        state, metrics = pending
        if c + 1 < len(ends):
            pending = run.chunk_fn(state, run.data)
        # one device-to-host transfer per chunk: metrics, the non-finite and stop records
        metrics, first_bad, active, early_stop, diverged, last_loss = jax.device_get(
            (metrics, state.nonfinite_step, state.active, state.early_stop_step,
             state.diverged_step, state.last_step_loss))
        done_at.append(time.perf_counter())
        start = ends[c - 1] if c else run.start_step
        chunk = Chunk(c, end, end - start, metrics, first_bad, active, state,
                      done_at[-1] - done_at[-2], early_stop, diverged, last_loss)
        last = c + 1 == len(ends) or not active[:run.layout.num_members].any()
        if last:
            jax.block_until_ready(state)
            done_at[-1] = time.perf_counter()
        yield chunk
        if last:
            return


class MemberRecord:
    """What one member's run records between chunks: its curve points (through its
    tracker, in batches), a host copy of them, and where it stopped.

    A resumed run passes the points its run already holds as ``history``: a point at
    or before the last logged step of its metric is not logged again (after a
    SIGKILL the chunks after the last checkpoint were logged once already; case C21).

    Attributes:
      history: ``{name: (steps, values)}`` as logged.
      failed_step: the member's first step above the divergence limit or, with
        ``on_nonfinite="stop"``, its first non-finite step, whichever came first.
      diverged: the failure was the divergence limit (else a non-finite loss).
      skipped: ``(dropped updates, steps trained)`` when too many of the member's updates
        were dropped (``trainer.max_skipped_fraction``), else None.
      early_stopped_at_step: where early stopping stopped the member (the step of its
        last evaluation, tag ``early_stopped_at_step``), or None. Not a failure.
    """

    def __init__(self, index: int, tracker, *, log_every_steps: int, stop_on_nonfinite: bool,
                 history: dict[str, tuple[list[int], list[float]]] | None = None,
                 num_steps: int | None = None, last_learning_rate: float = math.nan):
        self.index, self.tracker = index, tracker
        self._every, self._stop = log_every_steps, stop_on_nonfinite
        self._last = None if num_steps is None else num_steps - 1
        self._last_rate = last_learning_rate
        self.history = {k: (list(s), list(v)) for k, (s, v) in (history or {}).items()}
        self._logged_through = {k: max(s) for k, (s, _) in self.history.items() if s}
        self.failed_step: int | None = None
        self.diverged = False
        self.skipped: tuple[int, int] | None = None
        self.early_stopped_at_step: int | None = None

    def __call__(self, chunk: Chunk) -> None:
        if self.failed_step is not None or self.early_stopped_at_step is not None:
            return
        first_bad = int(chunk.nonfinite_step[self.index])
        stop_before = first_bad if first_bad >= 0 and self._stop else None
        diverged = int(chunk.diverged_step[self.index])
        if diverged >= 0 and (stop_before is None or diverged < stop_before):
            stop_before, self.diverged = diverged, True
        early = int(chunk.early_stop_step[self.index])
        if early >= 0:  # stopped at an evaluation: keep that evaluation's point, none after
            stop_before = early + 1 if stop_before is None else min(stop_before, early + 1)
        points = chunk_points(chunk.metrics, self.index, log_every_steps=self._every,
                              stop_before=stop_before, last_step=self._last)
        last = self._last
        if (last is not None and chunk.end == last + 1 and (stop_before is None or last < stop_before)
                and not any(p[2] == last and p[0] == "train_loss" for p in points)):
            # off the block grid: the loss the state kept, the schedule's rate (no gradient
            # norm: computing it at every step would halve a small net's steps/s)
            points += [("train_loss", float(chunk.last_step_loss[self.index]), last),
                       ("learning_rate", self._last_rate, last)]
        if self._logged_through:
            points = [p for p in points if p[2] > self._logged_through.get(p[0], -1)]
        self.tracker.log_metrics([(names.record_curve(name), value, step)
                                  for name, value, step in points])
        for name, value, step in points:
            steps, values = self.history.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
        if early >= 0:
            self.early_stopped_at_step = early
            self.tracker.set_tags({"early_stopped_at_step": str(early)})
        elif stop_before is not None:
            self.failed_step = stop_before
            self.tracker.set_tags({"diverged_at_step": str(stop_before)})


def _member(tree, m: int):
    return jax.tree.map(lambda a: a[m], tree)


@dataclass
class RunResult:
    """What a finished member run measured.

    Attributes:
      test_metrics: the net's test metrics, in the target's original units (empty
        for a member that stopped at a non-finite step).
      baseline_metrics: the same metrics of the linear baseline on the same split.
      timings: the population's (one program trains every member), seconds unless
        named ``*_per_s``: ``trace_lower_s`` and ``compile_s`` (the chunk's tracing +
        lowering, and XLA compilation, or loading it from the compilation cache),
        ``analysis_s`` (lowering one step alone for its FLOPs), those of ``measure.chunk_timings``,
        ``samples_per_s`` (rows per second of this member), ``startup_s`` (from the
        process's start to the dispatch of the first step: imports, config, store,
        data, set-up and compilation), ``gradcheck_s`` (all
        gradient checks of all members), ``log_s`` (time the calling thread spent in
        this member's MLflow calls, apart from the step figures) and ``wall_s`` (the
        whole function).
      compute: ``num_compiles`` of the chunk (1 expected, for the whole population),
        ``flops_per_step`` (XLA cost analysis of one lowered step of the population),
        ``flops_per_s``, ``argument_bytes``, ``output_bytes``, ``temp_bytes`` (XLA
        memory analysis of the compiled chunk, the program that runs), on GPU
        ``peak_bytes``; ``members`` and ``devices``: the population's size and the
        devices it was sharded over; ``compile_cache_hits`` and
        ``compile_cache_misses``: this process's compilations so far that found their
        executable in the persistent cache or compiled it (``compile_cache``).
      gradcheck: the member's gradient-check reports as ``[(step, report)]``;
        ``gradcheck_passed`` is False if any failed (None when none ran).
      num_params: trainable scalars of one member (a shared matrix counts once).
      num_steps: steps run; nonfinite_steps: the member's steps whose update was dropped.
      failed_step: the step where the member failed: its first non-finite step when it
        stopped there (``trainer.on_nonfinite=stop``), its first step above the
        divergence limit (``trainer.divergence_factor``); else None.
      error: why it failed, as the exception ``train_and_evaluate`` raises (its message
        is the run's ``error`` tag); None for a member that did not fail.
      history: host copies of the logged curves, ``{name: (steps, values)}``: every
        step trained, also after ``best_step``.
      params: the member's final params (a host pytree); with early stopping
        (``trainer.patience > 0``) those of ``best_step``, as are ``test_metrics``.
      device: ``"backend (device kind)"``.
      best_step, best_val_loss: with early stopping, the step after which the lowest
        validation loss was measured (as logged on the ``val_loss`` curve) and that
        loss; None without early stopping, or when no evaluation gave a finite loss.
      early_stopped_at_step: the step after which early stopping stopped the member
        (its last logged step), or None when it trained to ``num_steps``.
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
    failed_step: int | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    early_stopped_at_step: int | None = None
    error: TrainingFailedError | None = None


def train_population(members: list, datasets: list[Dataset], trackers: list, *,
                     console=None, loss_fn: Callable | None = None,
                     workdir: Path | None = None, checkpoint: CheckpointPlan | None = None,
                     histories: list[dict] | None = None) -> list[RunResult]:
    """Train every member as one compiled program and record each with its tracker.

    Args:
      members: one ``config.Config`` per member, differing only in
        ``config.VMAPPABLE_KEYS``; uses ``model``, ``optim``, ``trainer``,
        ``data.batch_size``, ``gradcheck`` and ``seed``.
      datasets: each member's split data (``data.load_dataset``).
      trackers: one per member; each receives ``set_tags``, ``log_params``,
        ``log_metrics``, ``log_artifact``, ``flush`` (see ``tracking.MlflowTracker``),
        under the names of ``names``.
      console: a ``rich.console.Console`` for progress and messages, or None.
      loss_fn: ``(outputs, targets) -> ()`` loss; default MSE or cross-entropy by task.
      workdir: folder for artifacts before upload (a temporary folder if None).
      checkpoint: where and when to save the state (``checkpoint.CheckpointPlan``), and
        whether to continue from the latest checkpoint there; None: no checkpoints.
        Saves run in a background thread (``checkpoint.Saver``); the end of training
        saves too, and so does a Ctrl-C or SIGTERM (``KeyboardInterrupt``): the state
        after the last chunk whose points were logged, written before the exception
        goes on, so a stopped run loses at most the chunk in flight.
      histories: with ``checkpoint.resume``, each member's points already in its run
        (``{name: (steps, values)}``): none of them is logged again.

    Returns:
      one ``RunResult`` per member. A member that stopped at a non-finite loss
      (``trainer.on_nonfinite=stop``, case C07) has ``failed_step`` set, its points
      before that step logged, and no test metrics; the others trained on. With early
      stopping (``trainer.patience > 0``) a member whose validation loss stopped
      improving stops at that evaluation (``early_stopped_at_step``, tag of that
      name), the others train on; every finished member's test metrics, saved params
      and ``params`` are those of its ``best_step``, logged with ``best_val_loss``.

    Raises:
      GradcheckFailedError: a check failed with ``gradcheck.fail_run``.
      ValueError: the loss is not a scalar (case C13).
    """
    wall_start = time.perf_counter()
    # started first: the plot workers' start-up overlaps the compilation
    with render.Renderer(min(render.default_workers(), len(members))) as renderer, \
            _saver(checkpoint) as saver:
        return _train(members, datasets, trackers, renderer, saver, checkpoint,
                      console=console, loss_fn=loss_fn, workdir=workdir,
                      wall_start=wall_start, histories=histories or [None] * len(members))


@contextlib.contextmanager
def _saver(plan: CheckpointPlan | None) -> Iterator[Saver | None]:
    """A ``Saver`` for ``plan`` (None for none), closed (pending writes done) at the end."""
    if plan is None:
        yield None
        return
    saver = Saver(Checkpoints(plan.directory, keep=plan.keep, async_save=False),
                  min_interval_s=plan.min_interval_s)
    try:
        yield saver
    finally:
        saver.close()


def _val_rank(chunk: Chunk, members: int, last: float) -> float:
    """The validation loss a checkpoint after ``chunk`` is ranked by: the mean over the
    population's members of their last validation loss in the chunk (``last`` when the
    chunk evaluated none); +inf when it is not finite."""
    evals = chunk.metrics[1]
    done = np.flatnonzero(evals["evaluated"])
    if not done.size:
        return last
    value = float(np.mean(evals["val_loss"][done[-1], :members]))
    return value if np.isfinite(value) else math.inf


def _train(members: list, datasets: list[Dataset], trackers: list, renderer, saver,
           plan: CheckpointPlan | None, *, console, loss_fn, workdir, wall_start: float,
           histories: list) -> list[RunResult]:
    cfg, tcfg = members[0], members[0].trainer
    device = jax.devices()[0]
    device_name = f"{jax.default_backend()} ({device.device_kind})"
    depth = len(getattr(cfg.model, "hidden", ()))
    if console is not None and depth > DEEP_LAYERS:  # said before the compilation starts
        console.print(f"[yellow]model.hidden has {depth} layers: the compiled training step "
                      f"unrolls every layer, so its compilation grows with depth (200 layers of "
                      f"width 4: about 2 minutes on 2 CPU cores) before step 0[/]")
    run = build_run(members, datasets, loss_fn=loss_fn,
                    checkpoints=saver.checkpoints if plan and plan.resume else None)
    checks = [Gradchecker(m.gradcheck, run.graphdef, run.loss_fn, d, t, console,
                          key=jax.random.fold_in(jax.random.key(m.seed), GRADCHECK_STREAM))
              for m, d, t in zip(members, datasets, trackers)]
    _tag_start(run, trackers, console, device_name)
    # Where failing stops the run, the step-0 checks run now, before any step; else after
    # training, beside those of the last step, so the checks' one-off float64 compilation
    # never sits between the compile and the timed steps.
    check_first = cfg.gradcheck.every_steps != 0 and run.start_step == 0
    check_first_now = check_first and cfg.gradcheck.fail_run
    if check_first_now:
        for m, check in enumerate(checks):
            check(_member(run.state.params, m), step=0)
    check_after = gradcheck_steps(cfg.gradcheck.every_steps, run.chunk_ends)
    records = [MemberRecord(m, t, log_every_steps=tcfg.log_every_steps,
                            stop_on_nonfinite=tcfg.on_nonfinite == "stop", history=h,
                            num_steps=run.num_steps,
                            last_learning_rate=learning_rate_at(members[m], run.num_steps - 1))
               for m, (t, h) in enumerate(zip(trackers, histories))]
    # saves are due as checks are: at the first chunk end at or after each multiple
    save_after = gradcheck_steps(plan.every_steps, run.chunk_ends) if plan else set()
    done_at: list[float] = []
    chunk, recorded, val = None, None, math.inf
    with report.progress_bar(console, run.num_steps, enabled=tcfg.progress) as progress:
        try:
            for chunk in run_chunks(run, done_at):
                for record in records:
                    record(chunk)
                val = _val_rank(chunk, len(members), val)
                if chunk.end in save_after and chunk.end < run.num_steps:
                    saver.offer(chunk.state, document=plan.document, val_loss=val)
                if chunk.index == 0 and run.start_step == 0:
                    _print_step0(console, chunk.metrics, len(members))
                progress(chunk.end, progress_loss(chunk, records, run.num_steps),
                         chunk.steps / chunk.interval_s)
                if chunk.end in check_after and chunk.end < run.num_steps:
                    for m, check in enumerate(checks):
                        if records[m].failed_step is None:
                            check(_member(chunk.state.params, m), step=chunk.end)
                recorded = chunk
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what the record holds
            # the last chunk whose points are all logged: a resumed run logs the rest
            if saver is not None and recorded is not None:
                with signals.blocked():
                    step = saver.save_now(recorded.state, document=plan.document,
                                          val_loss=val)
                if console is not None:
                    console.print(f"checkpoint of step {step} saved in {plan.directory}")
            raise
    state = run.state if chunk is None else chunk.state
    if saver is not None and chunk is not None:  # written while the run finishes
        saver.offer(state, document=plan.document, val_loss=val)
    late = [] if check_first_now or not check_first else [(run.state, 0)]
    if chunk is not None and run.num_steps in check_after and chunk.end == run.num_steps:
        late.append((chunk.state, run.num_steps))
    return _finish(run, state, records, checks, late, done_at, trackers, renderer,
                   workdir=workdir, device_name=device_name, wall_start=wall_start,
                   console=console, saver=saver)


def train_and_evaluate(cfg, dataset: Dataset, tracker, *, console=None,
                       loss_fn: Callable | None = None, workdir: Path | None = None,
                       checkpoint: CheckpointPlan | None = None,
                       history: dict | None = None) -> RunResult:
    """Train one configured model on ``dataset``: a population of one.

    Args and the record as in ``train_population``, with one config, dataset,
    tracker and (for a resumed run) history.

    Raises:
      NonFiniteLossError: a NaN or infinite loss with ``trainer.on_nonfinite=stop``
        (case C07); the points before it are logged first.
      LossDivergedError: the loss exceeded ``trainer.divergence_factor`` times its
        initial value (case C24); likewise.
      GradcheckFailedError, ValueError: as ``train_population``.
    """
    (result,) = train_population([cfg], [dataset], [tracker], console=console,
                                 loss_fn=loss_fn, workdir=workdir, checkpoint=checkpoint,
                                 histories=[history])
    if result.error is not None:
        raise result.error
    return result


def _judge_skipped(cfg, record: MemberRecord, first_bad: int, skipped: int,
                   num_steps: int) -> None:
    """Mark ``record`` failed when more than ``trainer.max_skipped_fraction`` of the
    updates its member took were dropped (``on_nonfinite=skip``); its points stay."""
    if record.failed_step is not None or not skipped:
        return
    early = record.early_stopped_at_step
    steps = num_steps if early is None else early + 1
    if skipped / steps > cfg.trainer.max_skipped_fraction:
        record.failed_step, record.skipped = first_bad, (skipped, steps)
        record.tracker.set_tags({"mostly_skipped": f"{skipped} of {steps} updates dropped"})


def _failure(cfg, record: MemberRecord, initial_loss: float) -> TrainingFailedError | None:
    """Why ``record``'s member failed, as an exception to raise or tag; None if it did not."""
    step = record.failed_step
    if step is None:
        return None
    if record.skipped is not None:
        skipped, steps = record.skipped
        return MostlySkippedError(step, learning_rate_at(cfg, step), skipped=skipped,
                                  steps=steps, max_fraction=cfg.trainer.max_skipped_fraction)
    if record.diverged:
        return LossDivergedError(step, learning_rate_at(cfg, step),
                                 factor=cfg.trainer.divergence_factor, initial_loss=initial_loss)
    return NonFiniteLossError(step, learning_rate_at(cfg, step))


def learning_rate_at(cfg, step: int) -> float:
    """The learning rate ``cfg``'s schedule applies at ``step``."""
    from .optim import make_schedule

    schedule = make_schedule(cfg.optim, cfg.trainer.num_steps)
    return float(schedule(cfg.optim.learning_rate, cfg.optim.final_lr_fraction)(step))


def _tag_start(run: Run, trackers: list, console, device_name: str) -> None:
    device = run.layout.mesh.devices.flat[0]
    tags = {"jax.backend": jax.default_backend(), "jax.device_kind": device.device_kind,
            "jax.device_count": str(jax.device_count()),
            "population.devices": str(run.layout.num_devices),
            "population.size": str(len(run.members))}
    n_train = run.datasets[0].x_train.shape[0]
    clamped = run.batch_size < run.cfg.data.batch_size
    if clamped:
        tags["batch_size_clamped"] = f"{run.cfg.data.batch_size} -> {run.batch_size}"
    # constants of the run are params, not metrics (names.RUN_PARAMS)
    constants = {"derived.num_params": run.num_params, "derived.batch_size": run.batch_size}
    for tracker, dataset in zip(trackers, run.datasets):
        tracker.set_tags(tags)
        tracker.log_params(constants)
        tracker.log_datasets(mlflow_model.dataset_inputs(dataset))  # meanwhile, in the writer
    few = _train_points(run.start_step, run.num_steps, run.cfg.trainer.log_every_steps)
    if console is not None and few < FEW_POINTS:
        every = run.cfg.trainer.log_every_steps
        console.print(f"[yellow]trainer.log_every_steps={every} leaves {few} point(s) on the "
                      f"training curves of these {run.num_steps - run.start_step} steps (steps "
                      f"divisible by {every}, and the last step): set a smaller "
                      f"trainer.log_every_steps for a curve[/]")
    if console is not None:
        members = len(run.members)
        shape = "" if members == 1 else (f" | {members} members on {run.layout.num_devices} "
                                         f"device(s), one program")
        console.print(f"device: {device_name}{shape}")
        if clamped:
            console.print(f"data.batch_size={run.cfg.data.batch_size} is more than the "
                          f"{n_train} training rows: each step uses all {n_train}")


DEEP_LAYERS = 32  # hidden layers past which the run warns of a long compilation (issue 13.4)
FEW_POINTS = 5  # fewer train-curve points than this is no curve: the run says so


def _train_points(start: int, num_steps: int, every: int) -> int:
    """Train-curve points of steps ``start .. num_steps - 1``: every ``every``-th step and
    the last one."""
    on_grid = len(range(-(-start // every) * every, num_steps, every))
    return on_grid + ((num_steps - 1) % every != 0 and num_steps > start)


def _print_step0(console, metrics, members: int) -> None:
    if console is None:
        return
    step_metrics = metrics[0]
    who = "" if members == 1 else "member 0: "
    console.print(f"step 0: {who}loss {float(step_metrics['train_loss'][0, 0]):.8g}, "
                  f"gradient norm {float(step_metrics['grad_norm'][0, 0]):.8g}")


def progress_loss(chunk: Chunk, records: list[MemberRecord], num_steps: int) -> float:
    """The loss the progress bar shows after ``chunk``: the lowest, over the members still
    training, of each one's training loss at the latest step the chunk measured (the
    run's last step after the last chunk), not the last logged point, which a partial
    chunk may not hold (issue 13.6); NaN when none."""
    step_metrics = chunk.metrics[0]
    latest = []
    for r in records:
        if r.failed_step is not None or r.early_stopped_at_step is not None:
            continue
        if chunk.end == num_steps and np.isfinite(chunk.last_step_loss[r.index]):
            latest.append(float(chunk.last_step_loss[r.index]))
            continue
        rows = np.flatnonzero(step_metrics["active"][:, r.index])
        if rows.size:
            latest.append(float(step_metrics["train_loss"][rows[-1], r.index]))
    return min(latest) if latest else math.nan


def _finish(run: Run, state: TrainState, records: list[MemberRecord], checks: list,
            late: list, done_at: list[float], trackers: list, renderer, *, workdir,
            device_name: str, wall_start: float, console, saver) -> list[RunResult]:
    """After the last chunk: test metrics, baselines, plots (drawn by ``renderer``'s
    workers meanwhile), params, late checks, timings. With early stopping the test
    metrics and saved params are those of each member's ``best_step`` (its final ones
    where no evaluation gave a finite loss)."""
    members, num_steps = run.members, run.num_steps
    first_bad, nonfinite, best_step, best_val, initial = (np.asarray(v) for v in jax.device_get(
        (state.nonfinite_step, state.nonfinite_count, state.best_step, state.best_val_loss,
         state.initial_loss)))
    early_stopping = run.cfg.trainer.patience > 0
    host_params = jax.device_get(state.params)
    if early_stopping:  # each member's best params, where an evaluation gave one
        host_best = jax.device_get(state.best_params)
        host_params = jax.tree.map(
            lambda b, p: np.where((best_step >= 0).reshape((-1,) + (1,) * (p.ndim - 1)), b, p),
            host_best, host_params)
    predict = jax.jit(make_predict(run.graphdef))
    x_test = run.layout.put(np.stack(pad_members([d.x_test for d in run.datasets],
                                                 run.layout.size)))
    params_in = run.layout.put(host_params) if early_stopping else state.params
    outputs = np.asarray(jax.device_get(predict(params_in, x_test)))
    baselines: dict[int, dict[str, float]] = {}  # one fit per distinct split
    chunk_steps = np.diff([run.start_step, *run.chunk_ends[:len(done_at) - 1]]).tolist()
    timings = {"trace_lower_s": run.chunk_fn.trace_lower_s, "compile_s": run.chunk_fn.compile_s,
               "analysis_s": run.analysis_s, **chunk_timings(done_at[0], done_at[1:],
                                                             chunk_steps)}
    timings["samples_per_s"] = timings["steps_per_s"] * run.batch_size
    timings["startup_s"] = done_at[0] - measure.process_start()
    compute = dict(run.compute, num_compiles=run.chunk_fn.num_compiles,
                   members=len(members), devices=run.layout.num_devices)
    if "flops_per_step" in compute:
        compute["flops_per_s"] = compute["flops_per_step"] * timings["steps_per_s"]
    peak = measure.device_peak_bytes(jax.devices()[0])
    if peak is not None:
        compute["peak_bytes"] = peak
    if run.chunk_fn.recompiles:
        for tracker in trackers:
            tracker.set_tags({"recompiled": " | ".join(run.chunk_fn.recompiles)})
        if console is not None:
            console.print(f"[yellow]the train step compiled {run.chunk_fn.num_compiles} times; "
                          f"arguments that changed: {' | '.join(run.chunk_fn.recompiles)}[/]")
    results, finals = [], []
    with report.workdir(workdir) as root:
        for m, (cfg, dataset, record, check, tracker) in enumerate(
                zip(members, run.datasets, records, checks, trackers)):
            folder = root if len(members) == 1 else root / f"member-{m}"
            folder.mkdir(parents=True, exist_ok=True)
            if first_bad[m] >= 0:
                tracker.set_tags({"first_nonfinite_step": str(int(first_bad[m])),
                                  "nonfinite_steps": str(int(nonfinite[m]))})
            _judge_skipped(cfg, record, int(first_bad[m]), int(nonfinite[m]), num_steps)
            params = _member(host_params, m)
            test, final = {}, []
            if record.failed_step is None:
                test = evaluate_test(dataset, outputs[m])
                if cfg.seed not in baselines:
                    baselines[cfg.seed] = (dataset.baseline if dataset.baseline is not None
                                           else linear_baseline(dataset))
                final = [(names.test_metric(k), v) for k, v in test.items()]
                final += [(names.baseline_metric(k), v) for k, v in baselines[cfg.seed].items()]
            final.append((names.train_metric("nonfinite_steps"), int(nonfinite[m])))
            best = early_stopping and record.failed_step is None and best_step[m] >= 0
            if best:
                final += [(names.train_metric("best_step"), int(best_step[m])),
                          (names.train_metric("best_val_loss"), float(best_val[m]))]
            loss = report.loss_label(dataset.task,
                                     custom=run.loss_fn is not loss_for_task(dataset.task))
            renderer.plot(tracker, report.plot_training, record.history,
                          folder / "training_curves.png", loss=loss,
                          title=f"{dataset.name}: {cfg.model.kind} model, "
                                f"{run.num_params:,} params")
            if record.failed_step is None:
                tracker.log_artifact(report.save_params(params, folder / "final_params"),
                                     "final_params")
                # a population registers its best member's model (sweep.summarize_parent)
                tracker.log_model(mlflow_model.write_bundle(
                    folder / "net.npz", params=params, spec=run.spec, dataset=dataset,
                    run_id=getattr(tracker, "run_id", "")),
                    registered_model_name=cfg.tracking.register_model if len(members) == 1
                    else None)
            try:
                for state_at, step in late:
                    if record.failed_step is None:
                        check(_member(state_at.params, m), step=step)
            finally:  # a failed check (fail_run) keeps its report
                check.log_artifacts(folder, renderer)
            results.append(RunResult(
                test_metrics=test, baseline_metrics=baselines.get(cfg.seed, {}),
                timings=dict(timings), num_params=run.num_params, num_steps=num_steps,
                nonfinite_steps=int(nonfinite[m]), history=record.history, params=params,
                device=device_name, compute=compute, gradcheck=check.reports,
                gradcheck_passed=check.passed, failed_step=record.failed_step,
                best_step=int(best_step[m]) if best else None,
                best_val_loss=float(best_val[m]) if best else None,
                early_stopped_at_step=record.early_stopped_at_step,
                error=_failure(cfg, record, float(initial[m]))))
            finals.append(final)
        renderer.finish()
        for tracker in trackers:  # the models are read from ``root`` meanwhile
            tracker.flush()
    gradcheck_s = sum(c.wall_s for c in checks)
    if saver is not None:  # the last save was written meanwhile; wait for it
        t0 = time.perf_counter()
        saver.close()
        compute.update(checkpoint_wait_s=time.perf_counter() - t0,
                       checkpoints_saved=len(saver.saved),
                       checkpoints_skipped=saver.skipped)
    cache = compile_cache.counts()  # after the last checks' compilations
    compute.update(compile_cache_hits=cache["hits"], compile_cache_misses=cache["misses"])
    for tracker, result, final in zip(trackers, results, finals):
        tracker.flush()  # every training point written before the timings are taken
        result.timings.update(gradcheck_s=gradcheck_s, log_s=tracker.log_s,
                              wall_s=time.perf_counter() - wall_start)
        tracker.log_metrics([(name, value, names.RESULT_STEP) for name, value in
                             final + record_figures(result.timings, compute)])
        tracker.flush()
    return results


def record_figures(timings: dict[str, float], compute: dict[str, float]
                   ) -> list[tuple[str, float]]:
    """A run's ``RunResult.timings`` and ``.compute`` as ``(record name, value)`` metrics:
    timings under ``time/``, XLA's figures under ``xla/``, the checkpoint counts under
    ``train/``; ``members`` and ``devices`` are left out (the tags ``population.size``
    and ``population.devices``). See ``names``."""
    out = [(names.time_metric(k), v) for k, v in timings.items()]
    for k, v in compute.items():
        if k in ("members", "devices"):
            continue
        if k in ("checkpoints_saved", "checkpoints_skipped"):
            out.append((names.train_metric(k), v))
        elif k == "checkpoint_wait_s":
            out.append((names.time_metric(k), v))
        else:
            out.append((names.xla_metric(k), v))
    return out


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


