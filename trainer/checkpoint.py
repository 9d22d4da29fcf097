"""Checkpoints of a population's whole training state, with Orbax's ``CheckpointManager``.

A checkpoint holds the ``steps.TrainState`` of every member (params, optimizer
state with its injected per-member values, the shared step, the shuffling keys,
the non-finite record, the active mask and the early-stopping record: best
validation loss, its step and params, evaluations since) and a JSON document of what is needed
to continue the record (run ids, the resolved config). It is restored ALWAYS
against the abstract structure of a freshly built state (``restore(like=...)``),
so an optax ``ScaleByAdamState`` comes back as one, not as the lists and dicts
Orbax gives without a target (case C19). Nothing read from disk is unpickled or
executed: arrays go through Orbax's array handlers, the document through JSON.

Which checkpoints are kept: the latest ``keep`` and the one with the lowest
validation loss, by Orbax's preservation policies; their union never drops the
latest step (case C20: ``best_fn`` with ``max_to_keep`` alone deletes the newest
checkpoint when it is not among the best). Part of the numerical core's I/O: no
Hydra, no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from .steps import TrainState

__all__ = ["Checkpoints", "Saver", "CheckpointPlan", "periodic_steps", "upload_checkpoints",
           "abstract_like",
           "VAL_METRIC"]

VAL_METRIC = "val_loss"


def _saveable(state: TrainState) -> TrainState:
    # Typed PRNG keys have no array handler in Orbax; their raw uint32 data does.
    return state._replace(key=jax.random.key_data(state.key))


def _layout(tree) -> list[list]:
    """``[[shape, dtype], ...]`` of the leaves: compared before a restore, because Orbax
    restoring arrays into other shapes fails deep in its async code."""
    return [[list(a.shape), str(a.dtype)] for a in jax.tree.leaves(tree)]


def abstract_like(state: TrainState) -> TrainState:
    """The saved form of ``state`` as ``jax.ShapeDtypeStruct`` leaves, with each
    leaf's sharding: what ``Checkpoints.restore`` restores into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        _saveable(state))


class Checkpoints:
    """The checkpoints of one training (a lone run or one population job) in ``directory``.

    Args:
      directory: the folder, one subfolder per saved step (created if missing).
      keep: how many of the latest checkpoints to keep, besides the best one (>= 1).
      async_save: write in Orbax's background thread; an error of such a write
        surfaces at the next ``save``, ``wait`` or ``close``.

    Raises:
      ValueError: ``keep`` < 1.
    """

    def __init__(self, directory: Path, *, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        self.directory = Path(directory).resolve()
        # BestN keeps the n LAST after sorting, so reverse=True keeps the lowest loss.
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m[VAL_METRIC], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False)])
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=async_save,
                create=True,
                # best_fn only makes Orbax write each step's metrics to disk: without
                # them a reopened manager sees none, and BestN would drop the best.
                best_fn=lambda m: m[VAL_METRIC], best_mode="min"))

    def save(self, state: TrainState, *, document: dict[str, Any], val_loss: float,
             wait: bool = False) -> int:
        """Save ``state`` at its step, with ``document`` (JSON-serialisable) beside it.

        Args:
          val_loss: ranks the checkpoint for the best one; a non-finite value ranks last.
          wait: block until it is on disk (before a signal ends the process).

        Returns:
          the step saved. A step already on disk is not written again (a training is
          deterministic: the same step holds the same state).
        """
        ocp = self._ocp
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return step
        val = float(val_loss) if math.isfinite(val_loss) else math.inf
        tree = _saveable(state)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), document=ocp.args.JsonSave(document),
            layout=ocp.args.JsonSave(_layout(tree))),
            metrics={VAL_METRIC: val}, force=True)
        if wait:
            self._manager.wait_until_finished()
        return step

    def steps(self) -> list[int]:
        """The steps kept on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the lowest validation loss (the latest among equals)."""
        def rank(step: int) -> tuple[float, int]:
            return (self._manager.metrics(step) or {}).get(VAL_METRIC, math.inf), -step

        return min(self.steps(), key=rank, default=None)

    def document(self, step: int | None = None) -> dict[str, Any]:
        """The JSON document saved with ``step`` (default: the latest)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            document=ocp.args.JsonRestore())).document)

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The state saved at ``step`` (default: the latest), in the structure, types,
        dtypes and shardings of ``like`` (a freshly built state of the same config).

        Raises:
          FileNotFoundError: no checkpoint in the folder.
          ValueError: the saved arrays do not fit ``like`` (another model or population).
        """
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = abstract_like(like)
        saved = self._manager.restore(step, args=ocp.args.Composite(
            layout=ocp.args.JsonRestore())).layout
        expected = _layout(target)
        if saved != expected:
            diff = next((i for i, (a, b) in enumerate(zip(saved, expected)) if a != b),
                        min(len(saved), len(expected)))
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} does not fit this "
                f"config's training state: {len(saved)} arrays saved, {len(expected)} "
                f"expected, the first difference at array {diff} (saved "
                f"{saved[diff] if diff < len(saved) else 'nothing'}, expected "
                f"{expected[diff] if diff < len(expected) else 'nothing'}); was the "
                "model, optimizer or population changed?")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            document=ocp.args.JsonRestore()))
        state = restored.state
        key = jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(like.key))
        return state._replace(key=key), dict(restored.document)

    def wait(self) -> None:
        """Block until every save has reached the disk; raise a failed write's error."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Saver:
    """Saves a training's checkpoints in one background thread, so the loop never waits.

    Orbax writes a checkpoint of even a small state in 60 to 200 ms here (an asyncio
    loop, threads, a temporary folder renamed on commit, the old steps deleted), while
    1000 steps of a 10-64-64-1 MLP take about 25 ms. On this 2-core machine a save in
    a background thread still costs the loop about its own duration (Orbax's threads
    and Python's GIL compete with the steps; ``scripts/bench_checkpoint.py``). So the
    cost is bounded by how often saves happen:

    - ``offer`` hands a state over and returns at once (JAX arrays are immutable and
      the chunk does not donate its input, so no copy is needed). At most one save is
      in flight; a state offered while one is written waits, and a newer offer
      replaces it (latest wins).
    - Saves start at least ``min_interval_s`` apart, the first one ``min_interval_s``
      after the saver starts, and the thread works at most ``max_busy_fraction`` of
      the time (after a save of ``d`` seconds the next starts no sooner than
      ``d / max_busy_fraction`` after it started: a slow disk spaces them further).
      Offers in between are skipped (counted in ``skipped``), except the newest,
      saved when the wait ends.
    - ``save_now`` (the end of training, SIGTERM, Ctrl-C) waits for the thread and
      saves synchronously: what it returns is on disk.

    A failed background write is raised by the next ``offer``, ``save_now`` or
    ``close`` in the loop's thread, with Orbax's error. Give it ``Checkpoints`` with
    ``async_save=False``: this thread is the background, and Orbax's own would raise
    its errors in a thread of its own.

    Attributes:
      saved: steps saved so far, in order. skipped: offers replaced by a newer one.
    """

    def __init__(self, checkpoints: Checkpoints, *, min_interval_s: float = 10.0,
                 max_busy_fraction: float = 0.05):
        import threading
        import time

        self.checkpoints = checkpoints
        self.min_interval_s = min_interval_s
        self.max_busy_fraction = max_busy_fraction
        self.saved: list[int] = []
        self.skipped = 0
        self._cond = threading.Condition()
        self._waiting: tuple | None = None   # (state, document, val_loss)
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._next_start = time.monotonic() + min_interval_s  # no save starts before
        self._idle = False                   # the thread waits for an offer (not sleeping)
        self._wake = threading.Event()       # ends the thread's sleep early: set by close
        self._thread = threading.Thread(target=self._work, name="trainer-checkpoint-saver",
                                        daemon=True)
        self._thread.start()

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"a checkpoint save in {self.checkpoints.directory} failed: "
                               f"{err}") from err

    def offer(self, state: TrainState, *, document: dict[str, Any], val_loss: float) -> None:
        """Queue ``state`` for a save in the background (latest wins); never blocks on I/O.

        Raises:
          RuntimeError: an earlier background save failed (its error chained).
        """
        with self._cond:
            self._raise_error()
            if self._waiting is not None:
                self.skipped += 1
            self._waiting = (state, document, val_loss)
            # Only an idle thread is woken: waking one that sleeps out the spacing at
            # every chunk end (a timed wait re-entered 30 times a second) cost W2 ~5-20%.
            if self._idle:
                self._cond.notify()

    def save_now(self, state: TrainState, *, document: dict[str, Any], val_loss: float) -> int:
        """Save ``state`` now and wait until it is on disk; a waiting offer is dropped.

        Returns:
          the step saved.

        Raises:
          RuntimeError: an earlier background save failed; or Orbax's error of this one.
        """
        with self._cond:
            if self._waiting is not None:
                self.skipped += 1
                self._waiting = None
            while self._busy:
                self._cond.wait()
            self._raise_error()
            self._busy = True
        try:
            step = self.checkpoints.save(state, document=document, val_loss=val_loss, wait=True)
            self.saved.append(step)
            return step
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _work(self) -> None:
        import time

        while True:
            with self._cond:
                self._idle = True
                while not self._closed and (self._waiting is None or self._busy):
                    self._cond.wait()
                self._idle = False
                if self._closed and self._waiting is None:
                    return
                delay = 0.0 if self._closed else self._next_start - time.monotonic()
                if delay <= 0:
                    (state, document, val_loss), self._waiting = self._waiting, None
                    self._busy = True
            if delay > 0:  # sleep out the spacing; newer offers replace the waiting one
                self._wake.wait(delay)
                continue
            start = time.monotonic()
            try:
                step = self.checkpoints.save(state, document=document, val_loss=val_loss,
                                             wait=True)
                self.saved.append(step)
            except BaseException as err:  # raised in the loop's thread at its next call
                with self._cond:
                    self._error = err
            took = time.monotonic() - start
            with self._cond:
                self._next_start = start + max(took / self.max_busy_fraction,
                                               self.min_interval_s)
                self._busy = False
                self._cond.notify_all()

    def close(self) -> None:
        """Write what waits (ignoring the spacing), stop the thread, close the manager;
        a second call does nothing.

        Raises:
          RuntimeError: a background save failed.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake.set()
        self._thread.join()
        self.checkpoints.close()
        with self._cond:
            self._raise_error()


AUTO_MIN_STEPS = 10_000  # runs this long or longer save periodically by default


def periodic_steps(every_steps: int | None, num_steps: int) -> int:
    """The spacing of periodic saves in steps; 0 for none.

    ``every_steps`` None (the default) gives ``num_steps // 10`` for runs of at least
    ``AUTO_MIN_STEPS`` steps (a preempted long run loses at most a tenth of its work
    and one chunk) and none for shorter ones, which take seconds and save at the
    end and on SIGTERM or Ctrl-C anyway.
    """
    if every_steps is None:
        return num_steps // 10 if num_steps >= AUTO_MIN_STEPS else 0
    return every_steps


@dataclass
class CheckpointPlan:
    """Where and when one training (a lone run or a population job) saves its state.

    Attributes:
      directory: the training's folder (``<store folder>/checkpoints/<run id>``).
      every_steps: periodic saves at the first chunk end at or after each multiple
        (0: none; see ``periodic_steps``). The end of training and a SIGTERM or
        Ctrl-C always save.
      keep: latest checkpoints kept, besides the best by validation loss.
      document: JSON-serialisable, saved with every checkpoint: what continuing the
        record needs (run ids, the resolved config).
      resume: continue from the latest checkpoint in ``directory``.
      min_interval_s: periodic saves start at least this many seconds apart
        (``Saver``); the end and a stop always save.
    """

    directory: Path
    every_steps: int
    keep: int
    document: dict[str, Any]
    resume: bool = False
    min_interval_s: float = 10.0


def upload_checkpoints(tracker, directory: Path, artifact_path: str = "checkpoints") -> list[int]:
    """Log the latest and the best checkpoint in ``directory`` as artifacts of the
    tracker's run (``<artifact_path>/<step>``): for a remote store, whose runs may be
    resumed on another machine (``download_checkpoints``).

    Args:
      tracker: an object with ``log_artifact(local_path, artifact_path)``
        (``tracking.MlflowTracker``).

    Returns:
      the steps uploaded.
    """
    with Checkpoints(directory) as checkpoints:
        steps = sorted({s for s in (checkpoints.latest_step(), checkpoints.best_step())
                        if s is not None})
    for step in steps:
        tracker.log_artifact(Path(directory) / str(step), f"{artifact_path}/{step}")
    return steps
