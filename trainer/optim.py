"""Optimizers and learning-rate schedules, built from optax, with per-member values.

Part of the numerical core: no Hydra, no MLflow. The numbers that may differ
between the members of a population (peak learning rate, final learning-rate
fraction, weight decay, momentum, clipping norm) are never Python constants
baked into the compiled program: ``optax.inject_hyperparams`` keeps them as
float32 arrays in the optimizer state, so one executable trains every member
and a sweep over them compiles once (case C17; optax#577).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["OPTIMIZERS", "SCHEDULES", "Optimizer", "make_optimizer", "make_schedule",
           "hyperparams"]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear", "exponential")


def make_schedule(optim, num_steps: int) -> Callable[..., optax.Schedule]:
    """The learning rate as a function of the step (one optimizer update), given the
    member's peak rate and final fraction.

    ``constant``: ``optax.constant_schedule``. ``cosine``: ``optax.cosine_decay_schedule``
    from ``learning_rate`` to ``final_lr_fraction * learning_rate`` over ``num_steps``
    (Loshchilov & Hutter 2017, SGDR, without restarts). ``warmup_cosine``:
    ``optax.warmup_cosine_decay_schedule``, linear warm-up from 0 over ``warmup_steps``,
    then the same cosine decay. ``linear``: ``optax.linear_schedule`` from
    ``learning_rate`` to ``final_lr_fraction * learning_rate`` over ``transition_steps``
    steps (None: to the end of the run) after ``transition_begin`` constant ones.
    ``exponential``: ``optax.exponential_decay``, ``learning_rate * decay_rate **
    ((step - transition_begin) / transition_steps)`` (None: ``num_steps``), floored with
    ``staircase``, never below ``final_lr_fraction * learning_rate`` (a ``decay_rate`` of 1
    or more grows the rate, unbounded).

    Args:
      optim: needs ``schedule``, ``warmup_steps`` and, for ``linear`` and
        ``exponential``, ``transition_steps``, ``transition_begin``, ``decay_rate`` and
        ``staircase`` (structural: the same for every member; optax's
        ``exponential_decay`` branches on ``decay_rate`` in Python).
      num_steps: the run's total number of steps.

    Returns:
      ``schedule_for(learning_rate, final_lr_fraction) -> optax.Schedule``; the two
      arguments may be traced float32 scalars.

    Raises:
      ValueError: unknown schedule name.
    """
    kind, warmup = optim.schedule, optim.warmup_steps
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    begin = getattr(optim, "transition_begin", 0)
    transition = getattr(optim, "transition_steps", None)
    decay_rate, staircase = getattr(optim, "decay_rate", 0.1), getattr(optim, "staircase", False)

    def schedule_for(learning_rate, final_lr_fraction) -> optax.Schedule:
        if kind == "constant":
            return optax.constant_schedule(learning_rate)
        if kind == "cosine":
            return optax.cosine_decay_schedule(learning_rate, decay_steps=max(num_steps, 1),
                                               alpha=final_lr_fraction)
        if kind == "linear":
            return optax.linear_schedule(
                init_value=learning_rate, end_value=learning_rate * final_lr_fraction,
                transition_steps=transition or max(num_steps - begin, 1),
                transition_begin=begin)
        if kind == "exponential":
            return optax.exponential_decay(
                init_value=learning_rate, transition_steps=transition or max(num_steps, 1),
                decay_rate=decay_rate, transition_begin=begin, staircase=staircase,
                end_value=learning_rate * final_lr_fraction if decay_rate < 1 else None)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1), end_value=learning_rate * final_lr_fraction)

    return schedule_for


def hyperparam_names(optim, *, clip: bool) -> tuple[str, ...]:
    """The per-member values the optimizer that ``optim.name`` names keeps in its state
    (each the ``optim.*`` config key of the same name)."""
    names = ["learning_rate"]
    if optim.schedule != "constant":
        names.append("final_lr_fraction")
    if optim.name == "momentum":
        names.append("momentum")
    if optim.name == "adamw":
        names.append("weight_decay")
    if clip:
        names.append("clip_norm")
    return tuple(names)


def hyperparams(optim, names: tuple[str, ...]) -> dict[str, float]:
    """One member's values of ``names`` from its optimizer config; ``clip_norm`` None
    (no clipping) becomes +inf, which ``optax.clip_by_global_norm`` leaves unchanged."""
    values = {}
    for name in names:
        value = getattr(optim, name)
        values[name] = math.inf if value is None else float(value)
    return values


@dataclass(frozen=True)
class Optimizer:
    """An optax optimizer whose per-member values live in its state.

    Attributes:
      tx: ``optax.inject_hyperparams`` of the configured chain; its state's
        ``hyperparams`` dict holds one float32 scalar per name (per member once
        vmapped). Its ``init`` makes the state; steps go through ``update``, which
        leaves the wrapper's ``count`` at 0 (the step count is ``TrainState.step``).
      names: the names of those values (``optim.*`` config keys).
      schedule_for: ``(learning_rate, final_lr_fraction) -> optax.Schedule``.
      chain: the configured optax chain given the values by name (what ``tx`` wraps).
    """

    tx: optax.GradientTransformation
    names: tuple[str, ...]
    schedule_for: Callable[..., optax.Schedule]
    chain: Callable[..., optax.GradientTransformation]

    def init(self, params, values: dict[str, jax.Array]):
        """The optimizer state of one member: fresh moments, ``values`` as its hyperparams."""
        state = self.tx.init(params)
        return state._replace(hyperparams={name: jnp.asarray(values[name], jnp.float32)
                                           for name in self.names})

    def update(self, grads, opt_state, params):
        """One member's update: ``(updates, opt_state)``, as ``tx.update``, except that
        the wrapper's own step ``count`` is left as it is. ``optax.inject_hyperparams``
        builds the chain from the state's values and calls it, as here, and then adds 1
        to its count, which it reads only for values that are schedules of it; here none
        is (schedules live inside the chain, with a count of their own), and that add
        was one more op in every step of the loop: one of the seed model's 20 (W1), each
        a fixed few hundred nanoseconds of its 17 us step on XLA's CPU backend. The
        values are used as stored (float32, as ``init`` writes them)."""
        inner = self.chain(**opt_state.hyperparams)
        updates, inner_state = inner.update(grads, opt_state.inner_state, params)
        return updates, opt_state._replace(inner_state=inner_state)

    def learning_rate(self, opt_state, step: jax.Array) -> jax.Array:
        """The rate applied at ``step`` by the member whose state is ``opt_state``: ``()`` float32."""
        hp = opt_state.hyperparams
        rate = self.schedule_for(hp["learning_rate"], hp.get("final_lr_fraction", 0.0))(step)
        return jnp.asarray(rate, jnp.float32)


def make_optimizer(optim, num_steps: int, *, clip: bool | None = None) -> Optimizer:
    """The optax optimizer that ``optim`` names, with per-member values injected.

    ``sgd``: ``optax.sgd``; ``momentum``: ``optax.sgd(momentum=...)`` (heavy ball);
    ``adam``: ``optax.adam`` (Kingma & Ba 2015); ``adamw``: ``optax.adamw`` with
    decoupled ``weight_decay`` (Loshchilov & Hutter 2019). With clipping,
    ``optax.clip_by_global_norm(clip_norm)`` runs first.

    Args:
      optim: needs ``name``, ``schedule``, ``warmup_steps`` and, for ``clip`` None,
        ``clip_norm``.
      num_steps: the run's total number of steps (for the schedule).
      clip: include the clipping stage (a population includes it when any member
        clips; a member with ``clip_norm`` None then clips at +inf, a no-op). None:
        when ``optim.clip_norm`` is set.

    Raises:
      ValueError: unknown optimizer or schedule name.
    """
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim.name!r}; choose one of "
                         f"{', '.join(OPTIMIZERS)}")
    clip = optim.clip_norm is not None if clip is None else clip
    schedule_for = make_schedule(optim, num_steps)
    names = hyperparam_names(optim, clip=clip)
    name = optim.name

    def chain(learning_rate, final_lr_fraction=0.0, momentum=None, weight_decay=None,
              clip_norm=None):
        # a constant rate is passed as a number: as a schedule, optax would keep and
        # increment a step count of its own in every step, for nothing
        schedule = (learning_rate if optim.schedule == "constant"
                    else schedule_for(learning_rate, final_lr_fraction))
        if name == "sgd":
            tx = optax.sgd(schedule)
        elif name == "momentum":
            tx = optax.sgd(schedule, momentum=momentum)
        elif name == "adam":
            tx = optax.adam(schedule)
        else:
            tx = optax.adamw(schedule, weight_decay=weight_decay)
        if clip_norm is not None:
            tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
        return tx

    # Placeholder values: every member's own values are written into the state by init.
    tx = optax.inject_hyperparams(chain)(**{n: 1.0 for n in names})
    return Optimizer(tx=tx, names=names, schedule_for=schedule_for, chain=chain)
