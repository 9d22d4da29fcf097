"""The training problems the benchmarks time: the service's own model, loss, step and optimizer.

Synthetic data of fixed shapes (random features and targets drawn from explicit
keys): the benchmarks measure the computation, not the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
from flax import nnx

from ..config import AdamOptimConfig
from ..models import ModelSpec, count_params, init_model
from ..optim import make_optimizer
from ..steps import TrainState, init_train_state, make_train_step, mse_loss

__all__ = ["MlpProblem", "make_mlp_problem"]

LEARNING_RATE = 1e-3   # Adam's step size in every benchmark (the service's default optimizer)


@dataclass(frozen=True)
class MlpProblem:
    """A tanh MLP regression step, as the service builds it.

    Attributes:
      width, batch_size, depth: hidden width W, rows per step B, hidden layers.
      params: the model's ``nnx.Param`` state.
      x: ``(B, in_features)`` float32; y: ``(B, out_features)`` float32.
      loss: ``loss(params, x, y) -> ()`` float32 MSE, not jitted.
      train_step: ``steps.make_train_step`` with Adam: ``(state, (x, y)) -> (state, metrics)``.
      state: the step-0 ``TrainState``.
      num_params: trainable scalars.
    """

    width: int
    batch_size: int
    depth: int
    params: Any
    x: jax.Array
    y: jax.Array
    loss: Callable
    train_step: Callable
    state: TrainState
    num_params: int

    @property
    def batch(self) -> tuple[jax.Array, jax.Array]:
        """``(x, y)`` with the member axis of a population of one: ``(1, B, ...)``."""
        return self.x[None], self.y[None]


def make_mlp_problem(*, width: int, batch_size: int, depth: int = 2, in_features: int = 32,
                     out_features: int = 1, key: jax.Array) -> MlpProblem:
    """``models.TanhMLP`` with ``depth`` hidden layers of ``width`` (LeCun-normal init),
    MSE loss and ``optax.adam(LEARNING_RATE)``, on one random batch.

    Args:
      width: hidden width W; batch_size: rows B; depth: hidden layers (>= 1);
      in_features, out_features: row sizes of x and y.
      key: PRNG key for the params and the data.
    """
    k_model, k_x, k_y, k_state = jax.random.split(key, 4)
    spec = ModelSpec("mlp", in_features, out_features, 0, (width,) * depth, False,
                     "lecun_normal", 1.0)
    graphdef, params = nnx.split(init_model(spec, key=k_model), nnx.Param)
    x = jax.random.normal(k_x, (batch_size, in_features), jax.numpy.float32)
    y = jax.random.normal(k_y, (batch_size, out_features), jax.numpy.float32)

    def loss(params, x, y):
        return mse_loss(nnx.merge(graphdef, params)(x), y)

    # A population of one, as the service trains a lone run.
    optimizer = make_optimizer(AdamOptimConfig(learning_rate=LEARNING_RATE), 1)
    train_step = make_train_step(graphdef, optimizer, mse_loss)
    state = init_train_state(jax.tree.map(lambda a: a[None], params), optimizer,
                             {"learning_rate": jax.numpy.full((1,), LEARNING_RATE)},
                             key=k_state[None])
    return MlpProblem(width, batch_size, depth, params, x, y, loss, train_step, state,
                      count_params(params))
