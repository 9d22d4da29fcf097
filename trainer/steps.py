"""Losses, the train step and the scanned chunk of steps: the pure numerical core.

Every function works on a population: a leading member axis on params, optimizer
state, keys and data, ``jax.vmap`` over it inside the step; a lone run is a
population of one, on the same code path.

Nothing here does I/O, reads a config object or prints. The functions close over
plain Python values (sizes, counts) and take arrays; ``jax.jit`` is applied by
the caller.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from .optim import Optimizer

__all__ = [
    "TrainState", "DeviceData", "mse_loss", "cross_entropy_loss", "loss_for_task",
    "check_scalar_loss", "over_members", "MemberState", "init_train_state", "make_member_step",
    "make_train_step", "make_train_chunk", "make_predict", "row_permutation",
]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
    """Everything that changes during training, for a population of ``M`` members.

    A lone run is a population of one (``M = 1``). Members step in lockstep, so
    the step count is one shared scalar; everything else has a leading member axis.

    Attributes:
      step: ``()`` int32, steps (optimizer updates) taken so far by every member.
      params: the models' ``nnx.Param`` state, each leaf ``(M, ...)`` float32.
      opt_state: the optax state (``optax.inject_hyperparams``: its ``hyperparams``
        hold each member's learning rate etc. as ``(M,)`` float32), leaves ``(M, ...)``.
      key: ``(M,)`` PRNG keys for shuffling; epoch ``e`` of member ``m`` visits the rows
        in the order ``row_permutation(fold_in(key[m], e), N_train)``.
      nonfinite_step: ``(M,)`` int32, each member's first step whose loss or gradient
        was not finite, or -1.
      nonfinite_count: ``(M,)`` int32, how many of a member's steps were not finite.
      active: ``(M,)`` bool, the members still training: False for padding members
        and, with ``on_nonfinite="stop"``, from a member's first non-finite step on;
        with early stopping, from the evaluation that stopped it on.
      best_val_loss: ``(M,)`` float32, each member's lowest finite validation loss so
        far, or +inf. Early stopping only (``patience > 0``); else never updated.
      best_step: ``(M,)`` int32, the step after which that evaluation happened (where
        its ``val_loss`` point is logged: ``best_params`` are the params after
        ``best_step + 1`` updates), or -1. Early stopping only.
      evals_since_best: ``(M,)`` int32, evaluations since the last improvement (0 at an
        improvement). Early stopping only.
      best_params: the params at ``best_step``, leaves ``(M, ...)`` like ``params``, with
        early stopping; else ``()`` (nothing stored, nothing copied).
      early_stop_step: ``(M,)`` int32, the step after which the evaluation that stopped
        the member early happened (its last logged step), or -1.
      initial_loss: ``(M,)`` float32, each member's loss on its whole training split
        before its first update, the base of the divergence rule (``make_train_chunk``
        computes it at step 0); NaN until then, or where it was not positive (no rule).
      diverged_step: ``(M,)`` int32, each member's first step whose finite loss exceeded
        ``divergence_factor * initial_loss`` (the training loss at that step, or the
        validation loss logged at that step), or -1. The member stopped there.
      last_step_loss: ``(M,)`` float32, the training loss of the run's last step
        (``num_steps - 1``), kept by ``make_train_chunk`` also off the logging grid;
        NaN until that step has run.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    nonfinite_step: jax.Array
    nonfinite_count: jax.Array
    active: jax.Array
    best_val_loss: jax.Array
    best_step: jax.Array
    evals_since_best: jax.Array
    best_params: Any
    early_stop_step: jax.Array
    initial_loss: jax.Array
    diverged_step: jax.Array
    last_step_loss: jax.Array


class DeviceData(NamedTuple):
    """Each member's training and validation arrays, kept on the device for the whole run.

    Members whose seeds differ have different splits, so every member carries its own
    rows (small tables: ``M x N x D`` floats).

    Attributes:
      x_train: ``(M, N_train, D)`` float32. y_train: ``(M, N_train, T)`` float32 for
        regression, ``(M, N_train)`` int32 class labels for classification.
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
    """Trace ``loss_fn`` on one member's batch (no FLOPs run) and require a scalar (case C13).

    Args:
      params: ONE member's params (no member axis).

    Raises:
      ValueError: naming the shape, if the loss is not of shape ``()``.
    """
    out = jax.eval_shape(lambda p: loss_fn(nnx.merge(graphdef, p)(x), y), params)
    if out.shape != ():
        raise ValueError(
            f"the loss must be a scalar of shape (), but it returned shape {out.shape}; "
            "reduce it (for example with jnp.mean) before taking its gradient")


def over_members(fn, in_axes=0, out_axes=0):
    """``jax.vmap(fn, in_axes, out_axes)`` over the member axis, except that a population
    of one is traced without it. XLA's CPU backend runs products with a batch dimension
    of size 1 through batched kernels, and a loop carrying ``(1, ...)`` arrays reshaped
    every step costs ~13%: together a lone W2 run (10-64-64-1 MLP) lost 40% of its
    steps/s. So the whole chunk is mapped at once, and for one member its arrays are
    reshaped (bitcasts, no copies) once per call. Same function, same results.

    Args:
      fn: a function of one member's arguments.
      in_axes, out_axes: as ``jax.vmap``'s (0 or None per argument / output, or a
        pytree prefix of them).
    """
    vmapped = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes)

    def squeeze(tree, axis):
        return tree if axis is None else jax.tree.map(
            lambda v: jnp.reshape(v, v.shape[:axis] + v.shape[axis + 1:]), tree)

    def expand(tree, axis):
        return tree if axis is None else jax.tree.map(
            lambda v: jnp.reshape(v, (*jnp.shape(v)[:axis], 1, *jnp.shape(v)[axis:])), tree)

    def mapped(*args):
        ins = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        sizes = {leaf.shape[ax] for a, ax in zip(args, ins) if ax is not None
                 for leaf in jax.tree.leaves(a)}
        if sizes != {1}:
            return vmapped(*args)
        out = fn(*(squeeze(a, ax) for a, ax in zip(args, ins)))
        # out_axes is a pytree prefix of the output: expand each subtree by its axis
        return jax.tree.map(lambda axis, sub: expand(sub, axis), out_axes, out,
                            is_leaf=lambda x: x is None)

    return mapped


class MemberState(NamedTuple):
    """One member's part of a ``TrainState`` (the same fields without ``step``, and
    without the member axis)."""

    params: Any
    opt_state: Any
    key: jax.Array
    nonfinite_step: jax.Array
    nonfinite_count: jax.Array
    active: jax.Array
    best_val_loss: jax.Array
    best_step: jax.Array
    evals_since_best: jax.Array
    best_params: Any
    early_stop_step: jax.Array
    initial_loss: jax.Array
    diverged_step: jax.Array
    last_step_loss: jax.Array


def _members(state: TrainState) -> MemberState:
    return MemberState(*state[1:])


# Rows of ``LeanMember.status``.
ACTIVE, NONFINITE_STEP, NONFINITE_COUNT, DIVERGED_STEP = range(4)


class LeanMember(NamedTuple):
    """What a member's steps carry: its params, optimizer state and ``status``, ``(4,)``
    int32: ``active`` (0 or 1), ``nonfinite_step``, ``nonfinite_count`` and
    ``diverged_step`` of its ``MemberState``, packed.

    Why packed: on XLA's CPU backend every op in a loop body has a fixed cost, and four
    scalar records updated in four ops took ~5% of the seed model's steps/s (W1, the
    100 x 100 tied net, 18 us a step); one vector is one op.
    """

    params: Any
    opt_state: Any
    status: jax.Array


def lean_member(m: MemberState) -> LeanMember:
    return LeanMember(m.params, m.opt_state, jnp.stack(
        [m.active.astype(jnp.int32), m.nonfinite_step, m.nonfinite_count, m.diverged_step]))


def from_lean(m: MemberState, lean: LeanMember) -> MemberState:
    status = lean.status
    return m._replace(params=lean.params, opt_state=lean.opt_state,
                      active=status[ACTIVE] > 0, nonfinite_step=status[NONFINITE_STEP],
                      nonfinite_count=status[NONFINITE_COUNT],
                      diverged_step=status[DIVERGED_STEP])


def init_train_state(params, optimizer: Optimizer, values: dict[str, jax.Array], *,
                     key: jax.Array, active: jax.Array | None = None,
                     track_best: bool = False) -> TrainState:
    """Step 0 of a population.

    Args:
      params: the members' initial params, leaves ``(M, ...)``.
      optimizer: from ``optim.make_optimizer``.
      values: each of ``optimizer.names`` as ``(M,)`` float32, the members' own values.
      key: ``(M,)`` shuffling keys.
      active: ``(M,)`` bool, False for padding members (default: all True).
      track_best: early stopping is on: ``best_params`` starts as a copy of ``params``
        (else it is ``()``).
    """
    m = key.shape[0]
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                      opt_state=over_members(optimizer.init)(params, values), key=key,
                      nonfinite_step=jnp.full((m,), -1, jnp.int32),
                      nonfinite_count=jnp.zeros((m,), jnp.int32),
                      active=jnp.ones((m,), bool) if active is None else jnp.asarray(active),
                      best_val_loss=jnp.full((m,), jnp.inf, jnp.float32),
                      best_step=jnp.full((m,), -1, jnp.int32),
                      evals_since_best=jnp.zeros((m,), jnp.int32),
                      best_params=jax.tree.map(jnp.copy, params) if track_best else (),
                      early_stop_step=jnp.full((m,), -1, jnp.int32),
                      initial_loss=jnp.full((m,), jnp.nan, jnp.float32),
                      diverged_step=jnp.full((m,), -1, jnp.int32),
                      last_step_loss=jnp.full((m,), jnp.nan, jnp.float32))


def make_member_step(graphdef, optimizer: Optimizer, loss_fn: LossFn, *,
                     skip_nonfinite: bool = False, divergence_factor: float | None = None):
    """Build ``member_step(step, member, (x, y)) -> (member, metrics)``: one optimizer
    update of ONE member (``MemberState``) at the shared ``step``, on its batch ``x``
    ``(B, D)`` float32, ``y`` ``(B, T)`` (or ``(B,)`` labels).

    The loss and its gradient come from one ``jax.value_and_grad`` call; the update
    from ``optimizer``; an inactive member's update is masked to zero.

    Args:
      skip_nonfinite: what a member does after a non-finite step: False
        (``on_nonfinite="stop"``): at the first step whose loss is not finite it stops,
        its params frozen there, while the others go on; True (``"skip"``): a step
        whose loss or gradient is not finite is dropped and it goes on. Either way that
        update is never applied, and ``nonfinite_step`` / ``nonfinite_count`` record
        it, on the device.
      divergence_factor: a member whose finite loss exceeds ``divergence_factor`` times
        its ``initial_loss`` has diverged (case C24: a loss of 1e30 is finite): that
        update is not applied, ``diverged_step`` records the step and the member stops,
        in either mode. None: no such rule (nothing compiled for it).

    Returns metrics (``()`` each): ``train_loss``, ``grad_norm`` (global L2 norm of the
    gradient, ``optax.tree.norm``), ``learning_rate`` (the rate this step applies),
    float32; ``finite`` and ``active`` (the member was training at this step), bool.
    """

    def objective(params, x, y):
        return loss_fn(nnx.merge(graphdef, params)(x), y)

    def update(step, lean: LeanMember, initial_loss, batch):
        x, y = batch
        params, opt_state, status = lean.params, lean.opt_state, lean.status
        active = status[ACTIVE] > 0
        loss, grads = jax.value_and_grad(objective)(params, x, y)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        grad_norm = optax.tree.norm(grads)
        # A reduction over the whole gradient in every step halves a small net's steps/s
        # on CPU (it keeps XLA from fusing the update into the backward pass; measured on
        # W2: 8.8k vs 16.5k steps/s), so stopping watches the loss alone: a non-finite
        # gradient under a finite loss makes the next step's loss non-finite, and that
        # member stops there. Skipping must keep params finite, so it checks both.
        finite = jnp.isfinite(loss)
        if skip_nonfinite:
            finite &= jnp.isfinite(grad_norm)
        # a NaN initial loss (not yet computed, or not positive) compares False: no limit
        diverged = (active & finite & (loss > divergence_factor * initial_loss)
                    if divergence_factor is not None else jnp.zeros((), bool))
        apply = finite & active & ~diverged
        if skip_nonfinite:  # the member goes on: keep its optimizer state as it was
            keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
            new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        # Masking the update, not the params, lets XLA update params and moments in
        # place; a stopped member's moments may go non-finite, but it never updates again.
        updates = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), updates)
        bad = active & ~finite
        # The four records in one vector, one small op a step, not four (see LeanMember).
        # Each row is computed from the same row of the old vector, so XLA updates it in
        # place (a stack of the four new values made it copy the old vector first).
        row = jnp.arange(4)
        first = jnp.where(row == NONFINITE_STEP, bad, diverged) & (status < 0)
        status = jnp.where(
            row == ACTIVE,
            ((active if skip_nonfinite else active & ~bad) & ~diverged).astype(jnp.int32),
            jnp.where(row == NONFINITE_COUNT, status + bad.astype(jnp.int32),
                      jnp.where(first, step, status)))
        metrics = {"train_loss": loss, "grad_norm": grad_norm,
                   "learning_rate": optimizer.learning_rate(opt_state, step), "finite": finite,
                   "active": active}
        return LeanMember(optax.apply_updates(params, updates), new_opt_state, status), metrics

    def member_step(step, member: MemberState, batch):
        lean, metrics = update(step, lean_member(member), member.initial_loss, batch)
        return from_lean(member, lean), metrics

    member_step.update = update
    return member_step


def make_train_step(graphdef, optimizer: Optimizer, loss_fn: LossFn, *,
                    skip_nonfinite: bool = False, divergence_factor: float | None = None):
    """Build ``train_step(state, (x, y)) -> (state, metrics)``: one optimizer update of
    every member (``make_member_step`` mapped over the member axis).

    The batch is ``x`` ``(M, B, D)`` float32 and ``y`` ``(M, B, T)`` (or ``(M, B)``
    labels); metrics are those of ``make_member_step``, each ``(M,)``. The divergence
    rule needs ``state.initial_loss``, which ``make_train_chunk`` fills in at step 0.
    """
    member_step = make_member_step(graphdef, optimizer, loss_fn, skip_nonfinite=skip_nonfinite,
                                   divergence_factor=divergence_factor)

    def train_step(state: TrainState, batch):
        members, metrics = over_members(member_step, in_axes=(None, 0, 0))(
            state.step, _members(state), batch)
        return TrainState(state.step + 1, *members), metrics

    train_step.member_step = member_step
    train_step.divergence_factor = divergence_factor
    return train_step


def _masked(fn, num_steps: int):
    """``fn(carry, *args)`` where the shared step ``carry[0] < num_steps``; else no
    change and zero, inactive metrics of the same shapes."""

    def skip(carry, *args):
        _, shapes = jax.eval_shape(fn, carry, *args)
        return carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    return lambda carry, *args: lax.cond(carry[0] < num_steps, fn, skip, carry, *args)


PACKED_SORT_MAX_ROWS = 4096  # up to here a permutation is one sort of packed uint32 keys


def row_permutation(key: jax.Array, n: int) -> jax.Array:
    """A uniformly random permutation of ``range(n)``: ``(n,)`` int32.

    Sorting random keys is the method of ``jax.random.permutation``; XLA's CPU sort
    of (key, index) pairs took 16.6 ms for the 224 epochs of a 2000-step W2 chunk
    (8 us a step). Up to ``PACKED_SORT_MAX_ROWS`` rows the key and the index are packed
    into one uint32 (random high bits, index in the low bits) and sorted alone: 4.4 ms.
    Rows whose random parts tie (probability about ``n**2 / 2**(33 - log2 n)``, 1% an
    epoch for 310 rows) keep their index order. Larger tables use
    ``jax.random.permutation``.
    """
    if n > PACKED_SORT_MAX_ROWS:
        return jax.random.permutation(key, n)
    index_bits = max(1, (n - 1).bit_length())
    random_high = jax.random.bits(key, (n,), jnp.uint32) >> index_bits << index_bits
    packed = lax.sort(random_high | jnp.arange(n, dtype=jnp.uint32))
    return (packed & ((1 << index_bits) - 1)).astype(jnp.int32)


def _epoch_orders(key: jax.Array, first_epoch: jax.Array, n_epochs: int, n: int) -> jax.Array:
    """``(n_epochs, n)`` int32: one member's row order in epochs ``first_epoch, ...``,
    ``row_permutation(fold_in(key, epoch), n)``."""
    return jax.vmap(lambda e: row_permutation(jax.random.fold_in(key, e), n))(
        first_epoch + jnp.arange(n_epochs))


SUB_BLOCK_BYTES = 1 << 20  # at most this many bytes of all members' batches gathered at once
                           # (kept in cache: 64 W2 members at 1 MiB each ran 25% slower)


def _sub_block(block: int, batch_bytes: int) -> int:
    """The largest divisor of ``block`` whose batches (``batch_bytes`` a step, all members)
    fit in ``SUB_BLOCK_BYTES``."""
    fits = max(1, SUB_BLOCK_BYTES // max(batch_bytes, 1))
    return max(d for d in range(1, block + 1) if block % d == 0 and d <= fits)


def make_train_chunk(train_step, graphdef, loss_fn: LossFn, *, num_steps: int,
                     steps_per_call: int, batch_size: int, eval_every_steps: int,
                     log_every_steps: int, patience: int = 0, min_delta: float = 0.0):
    """Build ``train_chunk(state, data) -> (state, (step_metrics, eval_metrics))``:
    ``steps_per_call`` steps of every member in one ``lax.scan``, to be wrapped in
    ``jax.jit``.

    Each member's steps are one scan, mapped over the members (``over_members``);
    the step count is shared and never batched, so the branches below stay real
    branches under ``vmap``, not selects over members.

    Batches: epoch ``e = step // steps_per_epoch`` of member ``m`` visits its
    training rows in the order ``row_permutation(fold_in(state.key[m], e), N_train)``, in
    ``steps_per_epoch = N_train // batch_size`` batches of exactly ``batch_size``
    rows (the ragged remainder of each epoch is dropped, so shapes never change). The
    orders are drawn once per chunk for the epochs it touches (a permutation costs
    about as much as a small step), and the batches of up to ``SUB_BLOCK_BYTES`` worth
    of steps (all members together) are gathered in one op, which the steps then scan over: a gather in every
    step cost W2 13% of its steps/s on CPU (each op in a loop body has a fixed cost),
    carrying a permuted copy of the rows and re-gathering it at each epoch's start (a
    ``lax.cond`` per step) 25%. With ``batch_size == N_train`` every step uses all
    rows as they are: no permutation.

    The steps run in blocks of ``b = gcd(steps_per_call, eval_every_steps,
    log_every_steps)``. The first step of each block returns its metrics (every
    logged step is such a step); the others return none, so XLA drops their gradient
    norm and learning rate. After each block the validation loss is computed if the
    step count is a multiple of ``eval_every_steps`` or equals ``num_steps``: one
    ``lax.cond`` per block. Steps at or beyond ``num_steps`` (the tail of the last
    chunk) are masked: they change nothing and report ``active = False``.

    Early stopping (``patience > 0``; the state from ``init_train_state(...,
    track_best=True)``) is decided in the same ``lax.cond``, so it costs nothing per
    step: the early-stopping fields of ``TrainState`` are not even carried through the
    steps' loops. At each evaluation of an active member, a finite ``val_loss <
    best_val_loss - min_delta`` is an improvement (``best_val_loss``, ``best_step`` and
    ``best_params`` take the evaluation's values, ``evals_since_best`` goes to 0); any
    other evaluation adds 1 to ``evals_since_best``, and at ``patience`` the member
    stops: ``active`` turns False (``make_member_step`` masks its updates from then on)
    and ``early_stop_step`` records the evaluation's step. The last step's training loss
    is kept in ``last_step_loss`` (the block grid may not hold that step). The evaluation after the
    last step (``num_steps``) never stops a member: it has finished anyway.

    Divergence (``train_step.divergence_factor`` set, case C24): a chunk that starts at
    step 0 first computes each member's ``initial_loss`` on its whole training split
    (one ``lax.cond`` per chunk); a step's training loss above ``divergence_factor *
    initial_loss`` stops the member (``make_member_step``), and so does a validation
    loss above it, at the step its point is logged (``val_step``), so no point or
    result above the limit is ever reported.

    Args:
      train_step: from ``make_train_step`` (its ``member_step`` is used).
      patience: evaluations without an improvement before a member stops; 0: off
        (nothing tracked).
      min_delta: how much lower than the best a validation loss must be to count as an
        improvement (>= 0).

    Returns:
      ``step_metrics``: those of ``make_member_step``, each ``(n_blocks, M)``, plus
      ``step`` ``(n_blocks,)`` int32, for the first step of each block;
      ``eval_metrics``: ``val_loss`` ``(n_blocks, M)`` float32 (NaN where not
      evaluated), ``val_step`` ``(n_blocks,)`` int32 (the step after which it was
      computed) and ``evaluated`` ``(n_blocks,)`` bool. ``n_blocks = steps_per_call // b``.
    """
    member_step, factor = train_step.member_step, train_step.divergence_factor
    block = math.gcd(steps_per_call, eval_every_steps, log_every_steps)
    n_blocks = steps_per_call // block
    ragged = num_steps % steps_per_call != 0  # the last chunk runs past num_steps

    def member_chunk(step0, member: MemberState, data: DeviceData, members: int):
        n_train = data.x_train.shape[0]
        full_batch = batch_size >= n_train
        steps_per_epoch = max(n_train // batch_size, 1)
        first_epoch = step0 // steps_per_epoch
        orders = None if full_batch else _epoch_orders(
            member.key, first_epoch, steps_per_call // steps_per_epoch + 2, n_train)
        row_bytes = sum(a[0].nbytes for a in (data.x_train, data.y_train))
        sub = _sub_block(block, members * batch_size * row_bytes)

        def batches(step, n):
            """The batches of steps ``step .. step + n - 1``: ``(n, B, ...)``, one gather."""
            if full_batch:  # every step uses the rows as they are
                return jnp.zeros((n, 0)), jnp.zeros((n, 0))
            epoch, pos = jnp.divmod(step + jnp.arange(n), steps_per_epoch)
            rows = orders[(epoch - first_epoch)[:, None],
                          pos[:, None] * batch_size + jnp.arange(batch_size)[None, :]]
            return data.x_train[rows], data.y_train[rows]

        update = member_step.update
        # The last step's training loss, also off the logging grid (``last_step_loss``).
        # Where the run ends on a block boundary that step is the last of a block: each
        # block runs its last step on its own, one select a block. Else every step selects
        # (single steps are masked there anyway).
        per_step_last = bool(ragged and num_steps % block)

        def one_step(carry, batch, last: bool = False):
            step, lean, last_loss, initial_loss = carry
            batch = (data.x_train, data.y_train) if full_batch else batch
            lean, metrics = update(step, lean, initial_loss, batch)
            if last or per_step_last:
                last_loss = jnp.where(step == num_steps - 1, metrics["train_loss"], last_loss)
            return (step + 1, lean, last_loss, initial_loss), {**metrics, "step": step}

        # Mask whole blocks when num_steps falls on a block boundary, else single steps
        # (each of which then keeps the last loss itself: ``last`` has nothing to add).
        step_fn = one_step
        if per_step_last:
            masked = _masked(one_step, num_steps)
            step_fn = lambda carry, batch, last=False: masked(carry, batch)  # noqa: E731

        def steps(carry, n, *, first: bool, last: bool):
            """``n`` steps, their batches gathered at once; the first step's metrics.
            ``last``: these end a block (its last step runs on its own)."""
            xs = batches(carry[0], n)
            at = lambda i: jax.tree.map(lambda a: a[i], xs)  # noqa: E731
            alone = last and not per_step_last
            metrics, lo, hi = None, 0, n
            if first:
                carry, metrics = step_fn(carry, at(0), last=alone and n == 1)
                lo = 1
            if alone and n > lo:
                hi = n - 1
            # index the gathered batches in place: scanning over ``xs[1:]`` would copy them
            if hi > lo:
                carry = lax.fori_loop(lo, hi, lambda i, c: step_fn(c, at(i))[0], carry)
            if hi < n:
                carry, _ = step_fn(carry, at(n - 1), last=True)
            return carry, metrics

        def val_loss(params):
            return loss_fn(nnx.merge(graphdef, params)(data.x_val), data.y_val)

        def initial_loss(params):
            """The divergence rule's base: NaN (no rule) unless positive."""
            loss = loss_fn(nnx.merge(graphdef, params)(data.x_train), data.y_train)
            return jnp.where(loss > 0, loss, jnp.nan).astype(jnp.float32)

        def track_best(step, m: MemberState):
            """Evaluate ``m`` after ``step`` steps and update its early-stopping record."""
            val = val_loss(m.params)
            improved = m.active & jnp.isfinite(val) & (val < m.best_val_loss - min_delta)
            evals = jnp.where(improved, 0, m.evals_since_best + m.active.astype(jnp.int32))
            stop = m.active & (evals >= patience) & (step < num_steps)
            return val, m._replace(
                best_val_loss=jnp.where(improved, val, m.best_val_loss),
                best_step=jnp.where(improved, step - 1, m.best_step),
                evals_since_best=evals,
                best_params=jax.tree.map(lambda new, old: jnp.where(improved, new, old),
                                         m.params, m.best_params),
                active=m.active & ~stop,
                early_stop_step=jnp.where(stop, step - 1, m.early_stop_step))

        def one_block(carry):
            start, m = carry
            # the steps carry what they change, not the member's other records
            carry = (start, lean_member(m), m.last_step_loss, m.initial_loss)
            n_sub = block // sub
            carry, metrics = steps(carry, sub, first=True, last=n_sub == 1)
            if n_sub > 2:
                carry, _ = lax.scan(
                    lambda c, _: (steps(c, sub, first=False, last=False)[0], None), carry,
                    None, length=n_sub - 2)
            if n_sub > 1:
                carry, _ = steps(carry, sub, first=False, last=True)
            step, lean, last_loss, _ = carry
            m = from_lean(m, lean)._replace(last_step_loss=last_loss)
            evaluated = (step > start) & ((step % eval_every_steps == 0) | (step == num_steps))
            nan = jnp.asarray(jnp.nan, jnp.float32)
            if patience:
                val, m = lax.cond(evaluated, functools.partial(track_best, step),
                                  lambda m: (nan, m), m)
            else:
                val = lax.cond(evaluated, lambda: val_loss(m.params), lambda: nan)
            if factor is not None:  # the logged point at step - 1 is above the limit
                over = evaluated & m.active & (val > factor * m.initial_loss)
                m = m._replace(active=m.active & ~over, diverged_step=jnp.where(
                    over & (m.diverged_step < 0), step - 1, m.diverged_step))
            return (step, m), (metrics, {"val_loss": val, "val_step": step - 1,
                                         "evaluated": evaluated})

        block_fn = _masked(one_block, num_steps) if ragged and not num_steps % block \
            else one_block
        if factor is not None:
            member = member._replace(initial_loss=lax.cond(
                step0 == 0, initial_loss, lambda p: member.initial_loss, member.params))
        (step, member), (step_metrics, eval_metrics) = lax.scan(
            lambda c, _: block_fn(c), (step0, member), None, length=n_blocks)
        shared_step = {"step": step_metrics.pop("step")}
        shared_eval = {k: eval_metrics.pop(k) for k in ("val_step", "evaluated")}
        return step, member, (step_metrics, eval_metrics, shared_step, shared_eval)

    def train_chunk(state: TrainState, data: DeviceData):
        num_members = state.key.shape[0]  # static: sizes the gathers
        step, members, (step_m, eval_m, shared_step, shared_eval) = over_members(
            functools.partial(member_chunk, members=num_members), in_axes=(None, 0, 0),
            out_axes=(None, 0, (1, 1, None, None)))(state.step, _members(state), data)
        return TrainState(step, *members), ({**step_m, **shared_step}, {**eval_m, **shared_eval})

    return train_chunk


def make_predict(graphdef):
    """Build ``predict(params, x) -> outputs`` for every member: params leaves ``(M, ...)``,
    ``x`` ``(M, B, D)`` float32 -> ``(M, B, T)`` float32."""

    def predict(params, x):
        return over_members(lambda p, xs: nnx.merge(graphdef, p)(xs))(params, x)

    return predict
