"""Optimizers and learning-rate schedules, built from optax.

Part of the numerical core: no Hydra, no MLflow. Each factory takes only its own
config slice (an ``OptimConfig``-like object with the attributes named below).
"""

from __future__ import annotations

import optax

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_schedule", "make_optimizer"]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def make_schedule(optim, num_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step (one optimizer update).

    ``constant``: ``optax.constant_schedule``. ``cosine``: ``optax.cosine_decay_schedule``
    from ``learning_rate`` to ``final_lr_fraction * learning_rate`` over ``num_steps``
    (Loshchilov & Hutter 2017, SGDR, without restarts). ``warmup_cosine``:
    ``optax.warmup_cosine_decay_schedule``, linear warm-up from 0 over ``warmup_steps``,
    then the same cosine decay.

    Args:
      optim: needs ``schedule``, ``learning_rate``, ``warmup_steps``, ``final_lr_fraction``.
      num_steps: the run's total number of steps.

    Raises:
      ValueError: unknown schedule name.
    """
    lr = optim.learning_rate
    if optim.schedule == "constant":
        return optax.constant_schedule(lr)
    if optim.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=max(num_steps, 1),
                                           alpha=optim.final_lr_fraction)
    if optim.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=optim.warmup_steps,
            decay_steps=max(num_steps, optim.warmup_steps + 1),
            end_value=lr * optim.final_lr_fraction)
    raise ValueError(f"unknown schedule {optim.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def make_optimizer(optim, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax optimizer that ``optim`` names, driven by ``schedule``.

    ``sgd``: ``optax.sgd``; ``momentum``: ``optax.sgd(momentum=...)`` (heavy ball);
    ``adam``: ``optax.adam`` (Kingma & Ba 2015); ``adamw``: ``optax.adamw`` with
    decoupled ``weight_decay`` (Loshchilov & Hutter 2019). With ``clip_norm`` set,
    ``optax.clip_by_global_norm`` runs first.

    Args:
      optim: needs ``name``, ``momentum``, ``weight_decay``, ``clip_norm`` (None = off).
      schedule: learning rate per step, e.g. from ``make_schedule``.

    Raises:
      ValueError: unknown optimizer name.
    """
    if optim.name == "sgd":
        tx = optax.sgd(schedule)
    elif optim.name == "momentum":
        tx = optax.sgd(schedule, momentum=optim.momentum)
    elif optim.name == "adam":
        tx = optax.adam(schedule)
    elif optim.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=optim.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optim.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if optim.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
    return tx
