"""Losses, the train step and the scanned chunk of steps: the pure numerical core.

Nothing here does I/O, reads a config object or prints. The functions close over
plain Python values (sizes, counts) and take arrays; ``jax.jit`` is applied by
the caller.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

__all__ = [
    "TrainState", "DeviceData", "mse_loss", "cross_entropy_loss", "loss_for_task",
    "check_scalar_loss", "init_train_state", "make_train_step", "make_train_chunk",
    "make_predict",
]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
    """Everything that changes during training.

    Attributes:
      step: int32 scalar, number of steps (optimizer updates) taken so far.
      params: the model's ``nnx.Param`` state (a pytree of float32 arrays).
      opt_state: the optax optimizer state.
      key: PRNG key for shuffling; epoch ``e`` uses ``fold_in(key, e)``.
      nonfinite_step: int32 scalar, the first step whose loss or gradient was not
        finite, or -1 while every step has been finite.
      nonfinite_count: int32 scalar, how many steps were not finite.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    nonfinite_step: jax.Array
    nonfinite_count: jax.Array


class DeviceData(NamedTuple):
    """Training and validation arrays, kept on the device for the whole run.

    Attributes:
      x_train: ``(N_train, D)`` float32. y_train: ``(N_train, T)`` float32 for
        regression, ``(N_train,)`` int32 class labels for classification.
      x_val, y_val: the same for the validation split.
    """

    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every element: ``(B, T), (B, T) -> ()`` float32.

    Predictions of shape ``(B, 1)`` and targets ``(B,)`` are never broadcast to
    ``(B, B)``: the target must have the prediction's shape (case C13).
    """
    return jnp.mean((pred - target.reshape(pred.shape)) ** 2)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy: ``(B, C)`` float32 logits, ``(B,)`` int32 labels -> ``()``.

    Follows ``optax.softmax_cross_entropy_with_integer_labels``.
    """
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def loss_for_task(task: str) -> LossFn:
    """MSE for ``"regression"``, softmax cross-entropy for ``"classification"``."""
    if task == "regression":
        return mse_loss
    if task == "classification":
        return cross_entropy_loss
    raise ValueError(f"unknown task {task!r}; choose 'regression' or 'classification'")


def check_scalar_loss(loss_fn: LossFn, graphdef, params, x: jax.Array, y: jax.Array) -> None:
    """Trace ``loss_fn`` on one batch (no FLOPs run) and require a scalar (case C13).

    Raises:
      ValueError: naming the shape, if the loss is not of shape ``()``.
    """
    out = jax.eval_shape(lambda p: loss_fn(nnx.merge(graphdef, p)(x), y), params)
    if out.shape != ():
        raise ValueError(
            f"the loss must be a scalar of shape (), but it returned shape {out.shape}; "
            "reduce it (for example with jnp.mean) before taking its gradient")


def init_train_state(params, optimizer: optax.GradientTransformation, *,
                     key: jax.Array) -> TrainState:
    """Step 0: ``params`` as given, a fresh optimizer state, ``key`` for shuffling."""
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                      opt_state=optimizer.init(params), key=key,
                      nonfinite_step=jnp.asarray(-1, jnp.int32),
                      nonfinite_count=jnp.asarray(0, jnp.int32))


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn: LossFn,
                    schedule: optax.Schedule, *, skip_nonfinite: bool = True):
    """Build ``train_step(state, (x, y)) -> (state, metrics)``, one optimizer update.

    The loss and its gradient come from one ``jax.value_and_grad`` call; the
    update from ``optimizer``. A step whose loss or gradient norm is not finite
    is detected on the device: its update is dropped (``params`` and ``opt_state``
    stay as they were) when ``skip_nonfinite``; ``state.nonfinite_step`` records
    the first such step and ``state.nonfinite_count`` counts them.

    Returns metrics (float32 scalars unless stated): ``train_loss``, ``grad_norm``
    (global L2 norm of the gradient, ``optax.tree.norm``), ``learning_rate``
    (the rate applied at this step), ``finite`` (bool).
    """

    def objective(params, x, y):
        return loss_fn(nnx.merge(graphdef, params)(x), y)

    def train_step(state: TrainState, batch):
        x, y = batch
        loss, grads = jax.value_and_grad(objective)(state.params, x, y)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        first_bad = jnp.where((state.nonfinite_step < 0) & ~finite, state.step,
                              state.nonfinite_step)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               key=state.key, nonfinite_step=first_bad,
                               nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32))
        metrics = {"train_loss": loss, "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
                   "finite": finite}
        return new_state, metrics

    return train_step


def _masked(fn, num_steps: int):
    """``fn(state, *args)`` where ``state.step < num_steps``; else no change and zero,
    inactive metrics of the same shapes."""

    def skip(state, *args):
        _, shapes = jax.eval_shape(fn, state, *args)
        return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    return lambda state, *args: lax.cond(state.step < num_steps, fn, skip, state, *args)


def make_train_chunk(train_step, graphdef, loss_fn: LossFn, *, num_steps: int,
                     steps_per_call: int, batch_size: int, eval_every_steps: int,
                     log_every_steps: int):
    """Build ``train_chunk(state, data) -> (state, (step_metrics, eval_metrics))``:
    ``steps_per_call`` steps in one ``lax.scan``, to be wrapped in ``jax.jit``.

    Batches: epoch ``e = step // steps_per_epoch`` visits the training rows in the
    order ``jax.random.permutation(fold_in(state.key, e), N_train)``, in
    ``steps_per_epoch = N_train // batch_size`` batches of exactly ``batch_size``
    rows (the ragged remainder of each epoch is dropped, so shapes never change).
    The orders are drawn once per chunk for the epochs it touches: a permutation
    costs about as much as a small step.

    The steps run in blocks of ``b = gcd(steps_per_call, eval_every_steps,
    log_every_steps)``. The first step of each block returns its metrics (every
    logged step is such a step); the others return none, so XLA drops their
    gradient norm and learning rate. After each block the validation loss is
    computed if the step count is a multiple of ``eval_every_steps`` or equals
    ``num_steps``: one ``lax.cond`` per block, not per step. Non-finite steps are
    counted on the device in the state (``nonfinite_step``, ``nonfinite_count``).
    Steps at or beyond ``num_steps`` (the tail of the last chunk) are masked: they
    change nothing and report ``active = False``.

    Returns:
      ``step_metrics``: those of ``make_train_step`` plus ``step`` (int32) and
      ``active`` (bool), for the first step of each block; ``eval_metrics``:
      ``val_loss`` (float32, NaN where not evaluated), ``val_step`` (int32, the
      step after which it was computed) and ``evaluated`` (bool). Each of shape
      ``(steps_per_call // b,)``.
    """
    block = math.gcd(steps_per_call, eval_every_steps, log_every_steps)
    n_blocks = steps_per_call // block
    ragged = num_steps % steps_per_call != 0  # the last chunk runs past num_steps

    def one_step(state: TrainState, data: DeviceData, orders: jax.Array, first_epoch):
        steps_per_epoch = data.x_train.shape[0] // batch_size
        epoch, pos = jnp.divmod(state.step, steps_per_epoch)
        idx = lax.dynamic_slice_in_dim(orders[epoch - first_epoch], pos * batch_size, batch_size)
        new_state, metrics = train_step(state, (data.x_train[idx], data.y_train[idx]))
        return new_state, {**metrics, "step": state.step, "active": jnp.asarray(True)}

    # Mask whole blocks when num_steps falls on a block boundary, else single steps.
    step_fn = _masked(one_step, num_steps) if ragged and num_steps % block else one_step

    def one_block(state: TrainState, data: DeviceData, orders: jax.Array, first_epoch):
        start = state.step
        state, metrics = step_fn(state, data, orders, first_epoch)
        if block > 1:
            state, _ = lax.scan(lambda s, _: (step_fn(s, data, orders, first_epoch)[0], None),
                                state, None, length=block - 1)
        evaluated = (state.step > start) & (
            (state.step % eval_every_steps == 0) | (state.step == num_steps))
        val = lax.cond(evaluated,
                       lambda: loss_fn(nnx.merge(graphdef, state.params)(data.x_val), data.y_val),
                       lambda: jnp.asarray(jnp.nan, jnp.float32))
        return state, (metrics, {"val_loss": val, "val_step": state.step - 1,
                                 "evaluated": evaluated})

    block_fn = _masked(one_block, num_steps) if ragged and not num_steps % block else one_block

    def train_chunk(state: TrainState, data: DeviceData):
        n_train = data.x_train.shape[0]
        steps_per_epoch = n_train // batch_size
        n_epochs = steps_per_call // steps_per_epoch + 2  # static bound on epochs touched
        first_epoch = state.step // steps_per_epoch
        orders = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(state.key, e),
                                                           n_train))(
            first_epoch + jnp.arange(n_epochs))  # (n_epochs, N_train) int32
        return lax.scan(lambda s, _: block_fn(s, data, orders, first_epoch), state, None,
                        length=n_blocks)

    return train_chunk


def make_predict(graphdef):
    """Build ``predict(params, x) -> outputs``: ``(B, D)`` float32 -> ``(B, T)`` float32."""

    def predict(params, x):
        return nnx.merge(graphdef, params)(x)

    return predict
