"""Flax NNX model definitions: the tied-weight tanh block and the tanh MLP.

The models are defined and initialised with Flax NNX; the training loop then
splits them into a static ``graphdef`` and a pytree of ``params`` and runs plain
``jax.jit`` over the params (the "functional API" pattern of the Flax NNX docs,
``nnx_toy_examples/01_functional_api.py``), so updates are never lost on traced
copies (case C14).

This module is part of the numerical core: it imports neither Hydra nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ModelSpec", "make_model_spec", "TiedTanh", "TanhMLP", "make_initializer",
           "init_model", "count_params"]

INITIALIZERS = ("lecun_normal", "glorot_normal", "normal")


def make_initializer(name: str, scale: float = 1.0):
    """Return a ``jax.nn.initializers`` function for a weight matrix.

    Args:
      name: ``"lecun_normal"`` (LeCun et al. 1998, "Efficient BackProp": variance
        1/fan_in, the usual default for tanh), ``"glorot_normal"`` (Glorot & Bengio
        2010: variance 2/(fan_in + fan_out)) or ``"normal"`` (N(0, scale²), what the
        notebook used with scale 1).
      scale: standard deviation for ``"normal"``; ignored otherwise.

    Raises:
      ValueError: for an unknown name.
    """
    if name == "lecun_normal":
        return jax.nn.initializers.lecun_normal()
    if name == "glorot_normal":
        return jax.nn.initializers.glorot_normal()
    if name == "normal":
        return jax.nn.initializers.normal(stddev=scale)
    raise ValueError(f"unknown initializer {name!r}; choose one of {', '.join(INITIALIZERS)}")


class TiedTanh(nnx.Module):
    """The tied block ``h -> tanh(Θ·tanh(Θ·h))`` with ONE square ``Θ`` used twice.

    ``Θ`` has shape ``(width, width)`` and is a single ``nnx.Param``, so the
    gradient that autodiff returns for it is the sum of its inner-use and
    outer-use terms (the accumulation rule; case C15). Where the data's input
    (or output) size differs from ``width``, a linear input (or output) map
    adapts it; with neither, the model is exactly ``f(Θ, x) = tanh(Θ·tanh(Θ·x))``.

    Args:
      in_features: size of one input row.
      out_features: size of one output row.
      width: ``n``, the side of ``Θ``.
      theta_init: initializer for ``Θ``; maps use ``map_init``.
      key: PRNG key. ``Θ`` is drawn with this key itself, so ``seed=0`` with the
        ``normal`` initializer gives exactly ``jax.random.normal(PRNGKey(0), (n, n))``
        as in the notebook; the maps use keys folded in from it.
    """

    def __init__(self, in_features: int, out_features: int, width: int, *, theta_init,
                 map_init, key: jax.Array):
        self.theta = nnx.Param(theta_init(key, (width, width), jnp.float32))
        rngs = nnx.Rngs(params=jax.random.fold_in(key, 1))
        self.input_map = (nnx.Linear(in_features, width, kernel_init=map_init, rngs=rngs)
                          if in_features != width else None)
        self.output_map = (nnx.Linear(width, out_features, kernel_init=map_init, rngs=rngs)
                           if out_features != width else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to a batch.

        Args:
          x: inputs, ``(B, in_features)`` float32.

        Returns:
          ``(B, out_features)`` float32. Rows are batch elements, so ``Θ·h`` for a
          column ``h`` is ``h @ Θᵀ`` here.
        """
        h = self.input_map(x) if self.input_map is not None else x
        theta = self.theta[...]
        h = jnp.tanh(h @ theta.T)  # inner use of Θ
        h = jnp.tanh(h @ theta.T)  # outer use of Θ
        return self.output_map(h) if self.output_map is not None else h


class TanhMLP(nnx.Module):
    """A tanh MLP with a linear output layer.

    Layers: ``Linear(in, hidden[0])``, then ``tanh``, then hidden-to-hidden
    ``Linear`` + ``tanh`` blocks, then ``Linear(hidden[-1], out)``. With
    ``tied_hidden`` every hidden-to-hidden layer uses the same square kernel
    (one ``nnx.Param``), each with its own bias.

    Args:
      in_features, out_features: sizes of one input and one output row.
      hidden: hidden widths, at least one; all equal when ``tied_hidden``.
      kernel_init: initializer for every kernel; biases start at zero.
      tied_hidden: share one kernel across the hidden-to-hidden layers.
      key: PRNG key for the kernels.
    """

    def __init__(self, in_features: int, out_features: int, hidden: tuple[int, ...], *,
                 kernel_init, tied_hidden: bool, key: jax.Array):
        rngs = nnx.Rngs(params=key)
        self.tied_hidden = tied_hidden
        self.input_layer = nnx.Linear(in_features, hidden[0], kernel_init=kernel_init, rngs=rngs)
        n_inner = len(hidden) - 1
        if tied_hidden and n_inner > 0:
            width = hidden[0]
            self.shared_kernel = nnx.Param(kernel_init(rngs.params(), (width, width), jnp.float32))
            self.hidden_biases = nnx.List(
                [nnx.Param(jnp.zeros((width,), jnp.float32)) for _ in range(n_inner)])
            self.hidden_layers = nnx.List([])
        else:
            self.shared_kernel = None
            self.hidden_biases = nnx.List([])
            self.hidden_layers = nnx.List([
                nnx.Linear(hidden[i], hidden[i + 1], kernel_init=kernel_init, rngs=rngs)
                for i in range(n_inner)])
        self.output_layer = nnx.Linear(hidden[-1], out_features, kernel_init=kernel_init,
                                       rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, in_features)`` float32 -> ``(B, out_features)`` float32 (pre-activation)."""
        h = jnp.tanh(self.input_layer(x))
        if self.shared_kernel is not None:
            kernel = self.shared_kernel[...]
            for bias in self.hidden_biases:
                h = jnp.tanh(h @ kernel + bias[...][None, :])
        else:
            for layer in self.hidden_layers:
                h = jnp.tanh(layer(h))
        return self.output_layer(h)


@dataclass(frozen=True)
class ModelSpec:
    """What ``init_model`` needs, taken from the model config and the data.

    Attributes:
      kind: ``"tied"`` or ``"mlp"``.
      in_features, out_features: row sizes of the data's inputs and targets.
      width: side of ``Θ`` for ``tied`` (0 for ``mlp``).
      hidden: hidden widths for ``mlp`` (empty for ``tied``).
      tied_hidden: share the hidden-to-hidden kernel in ``mlp`` (False for ``tied``).
      init: initializer name (see ``make_initializer``); init_scale: its stddev for ``normal``.
    """

    kind: str
    in_features: int
    out_features: int
    width: int
    hidden: tuple[int, ...]
    tied_hidden: bool
    init: str
    init_scale: float


def make_model_spec(model, *, in_features: int, out_features: int) -> ModelSpec:
    """The ``ModelSpec`` of a model config (a kind's schema: ``config.MlpModelConfig``
    reads ``hidden`` and ``tied_hidden``, ``config.TiedModelConfig`` reads ``width``).

    Raises:
      ValueError: unknown ``model.kind``.
    """
    if model.kind == "tied":
        shape = {"width": model.width, "hidden": (), "tied_hidden": False}
    elif model.kind == "mlp":
        shape = {"width": 0, "hidden": tuple(model.hidden), "tied_hidden": model.tied_hidden}
    else:
        raise ValueError(f"unknown model kind {model.kind!r}; choose 'tied' or 'mlp'")
    return ModelSpec(kind=model.kind, in_features=in_features, out_features=out_features,
                     init=model.init, init_scale=model.init_scale, **shape)


def init_model(spec: ModelSpec, *, key: jax.Array) -> nnx.Module:
    """Build and initialise the model that ``spec`` describes.

    Raises:
      ValueError: unknown ``spec.kind`` or initializer.
    """
    weight_init = make_initializer(spec.init, spec.init_scale)
    if spec.kind == "tied":
        return TiedTanh(spec.in_features, spec.out_features, spec.width, theta_init=weight_init,
                        map_init=jax.nn.initializers.lecun_normal(), key=key)
    if spec.kind == "mlp":
        return TanhMLP(spec.in_features, spec.out_features, tuple(spec.hidden),
                       kernel_init=weight_init, tied_hidden=spec.tied_hidden, key=key)
    raise ValueError(f"unknown model kind {spec.kind!r}; choose 'tied' or 'mlp'")


def count_params(params) -> int:
    """Number of scalar trainable parameters in a params pytree (a shared array counts once)."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
