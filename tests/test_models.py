"""Models: shapes, parameter counts, the tied weight (C15) and the notebook's seed values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import sgd_step
from trainer.config import SeedDataConfig
from trainer.data import load_dataset
from trainer.models import ModelSpec, TanhMLP, TiedTanh, count_params, init_model
from trainer.steps import mse_loss


def spec(**kw) -> ModelSpec:
    base = dict(kind="mlp", in_features=10, out_features=1, width=4, hidden=(8, 8),
                tied_hidden=False, init="lecun_normal", init_scale=1.0)
    return ModelSpec(**{**base, **kw})


@pytest.mark.parametrize("kind,in_f,out_f,expected", [
    ("tied", 3, 3, 9),                        # exactly f(Θ, x): Θ only
    ("tied", 10, 1, 10 * 4 + 4 + 16 + 4 + 1),  # input map, Θ, output map
    ("mlp", 10, 1, 10 * 8 + 8 + 8 * 8 + 8 + 8 + 1),
])
def test_output_shape_and_param_count(kind, in_f, out_f, expected):
    model = init_model(spec(kind=kind, in_features=in_f, out_features=out_f,
                            width=3 if in_f == 3 else 4), key=jax.random.key(0))
    _, params = nnx.split(model, nnx.Param)
    assert count_params(params) == expected
    assert model(jnp.ones((5, in_f), jnp.float32)).shape == (5, out_f)


def test_tied_hidden_shares_one_kernel():
    model = init_model(spec(hidden=(8, 8, 8, 8), tied_hidden=True), key=jax.random.key(0))
    untied = init_model(spec(hidden=(8, 8, 8, 8)), key=jax.random.key(0))
    count = lambda m: count_params(nnx.split(m, nnx.Param)[1])  # noqa: E731
    assert count(untied) - count(model) == 2 * 8 * 8  # three kernels became one


def _tied3():
    """The tied model with n = 3 (case C15), its data and loss."""
    model = TiedTanh(3, 3, 3, theta_init=jax.nn.initializers.normal(1.0),
                     map_init=jax.nn.initializers.lecun_normal(), key=jax.random.key(0))
    x = jnp.array([[0.3, -1.2, 0.8]], jnp.float32)
    y = jnp.array([[0.5, -0.1, 0.2]], jnp.float32)
    return model, x, y


def test_c15_tied_model_has_one_theta_after_a_step():
    """C15: n = 3 gives 9 trainable parameters, not 18, and one Θ after the update."""
    model, x, y = _tied3()
    graphdef, params = nnx.split(model, nnx.Param)
    assert count_params(params) == 9
    assert [p.shape for p in jax.tree.leaves(params)] == [(3, 3)]
    state = sgd_step(graphdef, params, x, y, learning_rate=0.1)
    leaves = jax.tree.leaves(state.params)
    assert len(leaves) == 1 and leaves[0].shape == (3, 3)
    assert not np.allclose(leaves[0], jax.tree.leaves(params)[0])


def test_c15_gradient_is_sum_of_inner_and_outer_use_and_passes_finite_differences():
    """C15: ∂L/∂Θ equals the inner-use plus the outer-use partial gradient, and
    matches float64 central differences."""
    model, x, y = _tied3()
    theta = np.asarray(model.theta[...], np.float64)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def loss_two_thetas(inner, outer):
        h = jnp.tanh(x64 @ inner.T)
        return jnp.mean((jnp.tanh(h @ outer.T) - y64) ** 2)

    with jax.enable_x64(True):
        t = jnp.asarray(theta)
        full = jax.grad(lambda th: loss_two_thetas(th, th))(t)
        inner, outer = jax.grad(loss_two_thetas, argnums=(0, 1))(t, t)
        np.testing.assert_allclose(full, inner + outer, rtol=1e-12, atol=1e-15)
        assert np.linalg.norm(inner) > 1e-3 and np.linalg.norm(outer) > 1e-3

        eps = 1e-6
        fd = np.zeros_like(theta)
        for i in np.ndindex(theta.shape):
            d = np.zeros_like(theta)
            d[i] = eps
            fd[i] = (loss_two_thetas(t + d, t + d) - loss_two_thetas(t - d, t - d)) / (2 * eps)
        rel = np.linalg.norm(fd - full) / np.linalg.norm(full)
        assert rel < 1e-8
        # A gradient with the inner use dropped fails the same check.
        rel_dropped = np.linalg.norm(fd - outer) / np.linalg.norm(full)
        assert rel_dropped > 1e-2

    # The model's own float32 autodiff gradient agrees with the float64 sum.
    graphdef, params = nnx.split(model, nnx.Param)
    g = jax.grad(lambda p: mse_loss(nnx.merge(graphdef, p)(x), y))(params)
    np.testing.assert_allclose(jax.tree.leaves(g)[0], full, rtol=1e-4, atol=1e-6)


def test_seed_model_reproduces_the_notebook():
    """The notebook's draws: loss 1.0354788 and ‖∂L/∂Θ‖ = 0.6549523, gradient (100, 100)."""
    data = load_dataset(SeedDataConfig(standardize=False, batch_size=1), seed=0)
    model = init_model(ModelSpec("tied", 100, 100, 100, (), False, "normal", 1.0),
                       key=jax.random.key(0))
    np.testing.assert_array_equal(model.theta[...],
                                  jax.random.normal(jax.random.PRNGKey(0), (100, 100)))
    graphdef, params = nnx.split(model, nnx.Param)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    loss, grads = jax.value_and_grad(lambda p: mse_loss(nnx.merge(graphdef, p)(x), y))(params)
    (g,) = jax.tree.leaves(grads)
    assert g.shape == (100, 100)
    assert abs(float(loss) - 1.0354788) / 1.0354788 < 5e-7
    assert abs(float(jnp.linalg.norm(g)) - 0.6549523) / 0.6549523 < 5e-7


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="initializer"):
        init_model(spec(init="xavier"), key=jax.random.key(0))
    with pytest.raises(ValueError, match="model kind"):
        init_model(spec(kind="cnn"), key=jax.random.key(0))


def test_mlp_is_tanh_then_linear():
    model = TanhMLP(2, 1, (3,), kernel_init=jax.nn.initializers.lecun_normal(),
                    tied_hidden=False, key=jax.random.key(0))
    x = jnp.array([[0.5, -0.5]], jnp.float32)
    k1, b1 = model.input_layer.kernel[...], model.input_layer.bias[...]
    k2, b2 = model.output_layer.kernel[...], model.output_layer.bias[...]
    np.testing.assert_allclose(model(x), jnp.tanh(x @ k1 + b1[None]) @ k2 + b2[None], rtol=1e-6)
