"""Gradient checks (trainer.gradcheck): the worked examples three ways, float64 checks
of float32 training (C12), the tied weight's two uses (C15), real gradients pass and
hand-broken ones fail, sampled tensors, and correct gradients near convergence."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import gradcheck
from conftest import sgd_step
from trainer.config import AdamOptimConfig
from trainer.optim import make_optimizer
from trainer.gradcheck import GradcheckSettings, check_gradients
from trainer.models import TanhMLP, TiedTanh, count_params
from trainer.steps import cross_entropy_loss, init_train_state, make_train_step, mse_loss

NOTEBOOK_LOSS = 1.0354788   # float32, the notebook's seed net
NOTEBOOK_NORM = 0.6549523   # float32, ‖∂L/∂Θ‖ there
LECUN = jax.nn.initializers.lecun_normal()


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def examples():
    return {row.name: row for row in gradcheck.worked_examples()}


@pytest.fixture(scope="module")
def diabetes():
    """scikit-learn's diabetes table, standardised: x (442, 10), y (442, 1) float32."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = (bunch.data - bunch.data.mean(0)) / bunch.data.std(0)
    y = (bunch.target - bunch.target.mean()) / bunch.target.std()
    return x.astype(np.float32), y.reshape(-1, 1).astype(np.float32)


def tied3():
    """The tied net with n = 3 and no maps (C15), one row of data."""
    model = TiedTanh(3, 3, 3, theta_init=jax.nn.initializers.normal(1.0), map_init=LECUN,
                     key=jax.random.key(0))
    x = jnp.array([[0.3, -1.2, 0.8]], jnp.float32)
    y = jnp.array([[0.5, -0.1, 0.2]], jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, (x, y)


def seed_net():
    """The notebook's seed net: Θ (100, 100), x (1, 100), y repeated (1, 100), float32."""
    n = 100
    model = TiedTanh(n, n, n, theta_init=jax.nn.initializers.normal(1.0), map_init=LECUN,
                     key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (n,)).reshape(1, n)
    y = jnp.full((1, n), jax.random.normal(jax.random.PRNGKey(2), ()), jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, (x, y)


def synthetic(rows, features, *, classes=None, outputs=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    if classes:
        return x, rng.integers(0, classes, rows).astype(np.int32)
    return x, rng.normal(size=(rows, outputs)).astype(np.float32)


def theta_of(params):
    return params["theta"][...]


def as_grads(params, *leaves):
    """A gradient pytree with params' structure from leaves in tree order."""
    return jax.tree.unflatten(jax.tree.structure(params), list(leaves))


def two_theta_grads(theta, x, y):
    """float64 autodiff of the tied MSE with the inner and outer Θ as separate inputs:
    (∂L/∂Θ_inner, ∂L/∂Θ_outer), an oracle for the split independent of the module."""
    def loss(inner, outer):
        return jnp.mean((jnp.tanh(jnp.tanh(x @ inner.T) @ outer.T) - y) ** 2)

    with jax.enable_x64(True):
        t, x, y = (jnp.asarray(a, jnp.float64) for a in (theta, x, y))
        return tuple(np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(t, t))


def tied_grad_by_hand(theta, x, y, *, inner=True, outer=True, sign=1.0,
                      dtanh=lambda h: 1 - h ** 2):
    """The tied MSE gradient by the chain rule, with switches that break it."""
    h1 = jnp.tanh(x @ theta.T)
    h2 = jnp.tanh(h1 @ theta.T)
    delta2 = 2 * (h2 - y) / h2.size * dtanh(h2)
    delta1 = (delta2 @ theta) * dtanh(h1)
    return sign * (inner * (delta1.T @ x) + outer * (delta2.T @ h1))


# --------------------------------------------------------------------------- worked examples

def test_worked_examples_agree_three_ways_and_serialise(examples):
    assert list(examples) == ["tanh_4cos2", "accumulation", "three_variables", "exact_4pi3",
                              "seed_model", "tied_n3"]
    for row in examples.values():
        assert row.rel_err_autodiff <= 1e-12, row
        assert row.rel_err_fd <= 1e-8, row
        assert row.passed, row
        assert re.fullmatch(r"[a-z0-9_]+", row.name)
    json.loads(json.dumps([dataclasses.asdict(row) for row in examples.values()]))


def test_worked_example_values_match_the_notebook(examples):
    assert examples["tanh_4cos2"].autodiff == pytest.approx(-0.16449355, rel=1e-6)
    assert examples["accumulation"].autodiff == pytest.approx(-15.50478, abs=1e-5)
    np.testing.assert_allclose(examples["three_variables"].autodiff,
                               (-5.66197, -1.74938, 17.05945), atol=1e-5)
    assert examples["three_variables"].symbolic == pytest.approx(
        examples["three_variables"].autodiff, rel=1e-12)


def test_accumulation_paths_sum_to_the_total(examples):
    row = examples["accumulation"]
    labels = [p[0] for p in row.paths]
    assert labels == ["through x²", "through cos(x)", "through atan(x)"]
    for _, autodiff, symbolic in row.paths:
        assert autodiff == pytest.approx(symbolic, rel=1e-12)
    assert math.fsum(p[1] for p in row.paths) == pytest.approx(row.symbolic, rel=1e-12)
    assert row.rel_err_paths <= 1e-12
    # every path matters: none is negligible against the total
    assert min(abs(p[2]) for p in row.paths) > 0.3


def test_exact_4pi3(examples):
    row = examples["exact_4pi3"]
    assert row.exact == "4*pi**3"  # sympy's exact value, not a float
    assert row.symbolic == pytest.approx(4 * math.pi ** 3, rel=1e-15)
    assert row.autodiff == pytest.approx(4 * math.pi ** 3, rel=1e-14)


def test_seed_model_row_reproduces_the_notebook(examples):
    row = examples["seed_model"]
    loss32, norm32 = row.float32
    assert abs(loss32 - NOTEBOOK_LOSS) / NOTEBOOK_LOSS < 5e-7
    assert abs(norm32 - NOTEBOOK_NORM) / NOTEBOOK_NORM < 5e-7
    assert abs(row.value - NOTEBOOK_LOSS) / NOTEBOOK_LOSS < 5e-7
    # float64 is the truth; the notebook's float32 norm is off by its own rounding (8.6e-7)
    assert abs(row.autodiff - NOTEBOOK_NORM) / NOTEBOOK_NORM < 1.5e-6
    assert row.oracle.startswith("closed form")
    assert row.rel_err_autodiff <= 1e-12  # closed form == autodiff in float64


def test_tied_n3_row_has_sympy_as_oracle(examples):
    row = examples["tied_n3"]
    assert row.oracle.startswith("sympy") and len(row.autodiff) == 9
    assert row.rel_err_autodiff <= 1e-13


def test_sympy_oracle_matches_float64_autodiff_for_tiny_tied_nets():
    rng = np.random.default_rng(3)
    for n, batch in ((2, 1), (3, 2)):
        theta = rng.normal(size=(n, n))
        x, y = rng.normal(size=(batch, n)), rng.normal(size=(batch, n))
        t0 = time.perf_counter()
        loss, grad = gradcheck.symbolic_tied_gradient(theta, x, y)
        assert time.perf_counter() - t0 < 5.0
        inner, outer = two_theta_grads(theta, x, y)
        autodiff = inner + outer
        assert np.linalg.norm(grad - autodiff) / np.linalg.norm(grad) <= 1e-13
        with jax.enable_x64(True):
            closed = gradcheck.tied_mse_gradient(*(jnp.asarray(a) for a in (theta, x, y)))
        assert float(closed.loss) == pytest.approx(loss, rel=1e-14)
        np.testing.assert_allclose(closed.inner, inner, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(closed.outer, outer, rtol=1e-12, atol=1e-16)
    with pytest.raises(ValueError, match="n <= 3"):
        gradcheck.symbolic_tied_gradient(np.eye(4), np.ones((1, 4)), np.ones((1, 4)))


# --------------------------------------------------------------------------- C12, C15

def test_c12_float32_training_is_checked_in_float64_and_x64_is_restored():
    graphdef, params, batch = tied3()
    before = np.asarray(theta_of(params)).copy()
    report = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0))
    assert report.dtype == "float64" and report.passed, report.failures()
    (theta,) = report.tensors
    assert theta.rel_err <= 1e-8 and theta.raw_rel_err <= 1e-8
    # x64 is off again and the caller's float32 params are untouched
    assert jnp.zeros(1).dtype == jnp.float32 and not jax.config.jax_enable_x64
    assert theta_of(params).dtype == jnp.float32
    np.testing.assert_array_equal(theta_of(params), before)
    # The same check in float32 with the notebook's step 1e-4 could never pass 1e-8.
    x, y = batch
    t32 = theta_of(params)
    loss32 = lambda t: jnp.mean((jnp.tanh(jnp.tanh(x @ t.T) @ t.T) - y) ** 2)  # noqa: E731
    fd32 = np.array([(loss32(t32.at[i].add(1e-4)) - loss32(t32.at[i].add(-1e-4))) / 2e-4
                     for i in np.ndindex(3, 3)]).reshape(3, 3)
    exact = sum(two_theta_grads(t32, x, y))
    assert np.linalg.norm(fd32 - exact) / np.linalg.norm(exact) > 1e-5


def test_c15_one_theta_after_an_sgd_step_and_its_two_uses_add_up():
    graphdef, params, (x, y) = tied3()
    state = sgd_step(graphdef, params, x, y, learning_rate=0.1)
    assert count_params(state.params) == 9 and gradcheck.tensor_names(state.params) == ["theta"]
    report = check_gradients(graphdef, state.params, (x, y), mse_loss, key=jax.random.key(0))
    assert report.passed, report.failures()
    inner, outer = two_theta_grads(theta_of(state.params), x, y)
    np.testing.assert_allclose(report.tied.inner, inner, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(report.tied.outer, outer, rtol=1e-12, atol=1e-16)
    assert report.tied.rel_err <= 1e-12
    assert report.tied.inner_norm > 1e-3 and report.tied.outer_norm > 1e-3
    assert -1 <= report.tied.inner_outer_cos <= 1


# --------------------------------------------------------------------------- broken gradients

BROKEN_TIED = {
    "inner use only": {"outer": False},
    "outer use only": {"inner": False},
    "sign flipped": {"sign": -1.0},
    "1 - tanh for 1 - tanh²": {"dtanh": lambda h: 1 - h},
}


@pytest.mark.parametrize("how", list(BROKEN_TIED))
def test_broken_tied_gradients_fail_and_name_theta(how):
    graphdef, params, batch = tied3()

    @jax.jit
    def grad_fn(p, x, y):
        return as_grads(p, tied_grad_by_hand(theta_of(p), x, y, **BROKEN_TIED[how]))

    report = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0),
                             grad_fn=grad_fn)
    assert not report.passed
    (theta,) = report.tensors
    assert theta.rel_err > 1e-2 and not theta.passed
    assert report.jvp_vjp_rel_err > 1e-3 and not report.tied.passed
    failures = report.failures()
    assert any(f.startswith("theta: finite-difference rel err") and "1e-08" in f
               for f in failures), failures
    # the same hand-written backward pass, unbroken, passes everything
    ok = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0),
                         grad_fn=lambda p, x, y: as_grads(p, tied_grad_by_hand(theta_of(p), x, y)))
    assert ok.passed, ok.failures()


def test_seed_net_sampled_and_a_dropped_inner_use_fails():
    """Θ has 10 000 elements: 128 are sampled, 4 directions checked; without the inner
    use the gradient is off by ‖inner‖/‖∂L/∂Θ‖ ≈ 0.95."""
    graphdef, params, (x, y) = seed_net()
    report = check_gradients(graphdef, params, (x, y), mse_loss, key=jax.random.key(0))
    assert report.passed, report.failures()
    (theta,) = report.tensors
    assert (theta.num_elements, theta.num_checked, theta.sampled) == (10_000, 128, True)
    assert theta.num_directions == 4 and 0 <= theta.directional_rel_err <= 1e-8
    assert len(theta.worst_index) == 2
    again = check_gradients(graphdef, params, (x, y), mse_loss, key=jax.random.key(0))
    assert again.tensors[0].rel_err == theta.rel_err  # seeded sample: deterministic

    inner, outer = two_theta_grads(theta_of(params), x, y)
    dropped = check_gradients(graphdef, params, (x, y), mse_loss, key=jax.random.key(0),
                              grad_fn=lambda p, *_: as_grads(p, jnp.asarray(outer)))
    assert not dropped.passed
    expected = np.linalg.norm(inner) / np.linalg.norm(inner + outer)
    assert dropped.tied.rel_err == pytest.approx(expected, rel=1e-9)
    assert 0.9 < expected < 1.0
    assert dropped.tensors[0].raw_rel_err > 0.5
    assert dropped.tensors[0].directional_rel_err > 1e-3


def mlp_forward(params, x, *, stop_first_use=False):
    """TanhMLP with tied_hidden, by hand; optionally the first use of the shared kernel
    is a constant to autodiff (a gradient that drops one use)."""
    row = lambda v: v[...][None, :]  # noqa: E731  (no implicit rank promotion)
    h = jnp.tanh(x @ params["input_layer"]["kernel"][...] + row(params["input_layer"]["bias"]))
    kernel = params["shared_kernel"][...]
    for i in range(len(params["hidden_biases"])):
        k = jax.lax.stop_gradient(kernel) if stop_first_use and i == 0 else kernel
        h = jnp.tanh(h @ k + row(params["hidden_biases"][i]))
    return h @ params["output_layer"]["kernel"][...] + row(params["output_layer"]["bias"])


def test_mlp_with_a_dropped_use_of_the_shared_kernel_or_a_flipped_sign_fails():
    model = TanhMLP(5, 1, (6, 6, 6), kernel_init=LECUN, tied_hidden=True, key=jax.random.key(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = synthetic(16, 5)
    np.testing.assert_allclose(mlp_forward(params, batch[0]), model(batch[0]), rtol=1e-6)

    @jax.jit
    def dropped(p, x, y):
        return jax.grad(lambda q: mse_loss(mlp_forward(q, x, stop_first_use=True), y))(p)

    report = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0),
                             grad_fn=dropped)
    failed = {t.name for t in report.tensors if not t.passed}
    assert failed == {"shared_kernel"}, report.failures()
    assert any(f.startswith("shared_kernel:") for f in report.failures())

    @jax.jit
    def flipped(p, x, y):
        grads = jax.grad(lambda q: mse_loss(nnx.merge(graphdef, q)(x), y))(p)
        leaves = jax.tree.leaves(grads)
        names = gradcheck.tensor_names(grads)
        leaves[names.index("input_layer/kernel")] *= -1
        return as_grads(p, *leaves)

    report = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0),
                             grad_fn=flipped)
    assert {t.name for t in report.tensors if not t.passed} == {"input_layer/kernel"}
    assert report.failures()[0].startswith("input_layer/kernel: finite-difference rel err")


# --------------------------------------------------------------------------- real gradients

REAL = {
    "tied, no maps, mse": lambda: (tied3(), mse_loss),
    "tied, maps, cross-entropy": lambda: (
        nnx.split(TiedTanh(6, 3, 4, theta_init=jax.nn.initializers.normal(1.0),
                           map_init=LECUN, key=jax.random.key(0)), nnx.Param)
        + (synthetic(32, 6, classes=3),), cross_entropy_loss),
    "mlp, mse": lambda: (
        nnx.split(TanhMLP(10, 1, (8,), kernel_init=LECUN, tied_hidden=False,
                          key=jax.random.key(0)), nnx.Param) + (synthetic(64, 10),), mse_loss),
    "mlp, tied hidden, mse": lambda: (
        nnx.split(TanhMLP(5, 1, (6, 6, 6), kernel_init=LECUN, tied_hidden=True,
                          key=jax.random.key(0)), nnx.Param) + (synthetic(16, 5),), mse_loss),
    "mlp, cross-entropy": lambda: (
        nnx.split(TanhMLP(12, 4, (10, 10), kernel_init=LECUN, tied_hidden=False,
                          key=jax.random.key(0)), nnx.Param)
        + (synthetic(32, 12, classes=4),), cross_entropy_loss),
}


HVP_TOO = ("tied, maps, cross-entropy", "mlp, mse")  # compiling it costs ~1 s per model


@pytest.mark.parametrize("name", list(REAL))
def test_real_gradients_pass_every_check(name):
    (graphdef, params, batch), loss_fn = REAL[name]()
    x_before = np.array(batch[0])
    report = check_gradients(graphdef, params, batch, loss_fn, key=jax.random.key(0),
                             settings=GradcheckSettings(hvp=name in HVP_TOO))
    assert report.passed, report.failures()
    assert report.max_rel_err <= 1e-8
    assert report.jvp_vjp_rel_err <= 1e-12
    if name in HVP_TOO:
        assert report.hvp_rel_err <= 1e-6
    assert (report.tied is not None) == name.startswith("tied")
    if report.tied is not None:
        assert report.tied.rel_err <= 1e-12
    for t in report.tensors:
        assert not t.sampled and t.num_checked == t.num_elements
        assert t.rel_err <= t.raw_rel_err + 1e-300  # the floor only ever relaxes
    np.testing.assert_array_equal(batch[0], x_before)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_richardson_differences_also_pass_and_fail_the_right_gradients():
    graphdef, params, batch = tied3()
    settings = GradcheckSettings(richardson=True)
    report = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0),
                             settings=settings)
    assert report.passed and report.tensors[0].step_rule.startswith("Richardson")
    assert report.tensors[0].raw_rel_err < 1e-10
    broken = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0),
                             settings=settings, grad_fn=lambda p, x, y: as_grads(
                                 p, tied_grad_by_hand(theta_of(p), x, y, inner=False)))
    assert not broken.passed


def test_a_gauss_newton_product_fails_the_hessian_vector_check():
    """J^T (∂²L/∂pred²) J v drops the curvature of the tanh layers: not the Hessian."""
    model = TanhMLP(10, 1, (8,), kernel_init=LECUN, tied_hidden=False, key=jax.random.key(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = synthetic(64, 10)

    @jax.jit
    def gauss_newton(p, x, y, v):
        out = lambda q: nnx.merge(graphdef, q)(x)  # noqa: E731
        pred, jv = jax.jvp(out, (p,), (v,))
        _, vjp = jax.vjp(out, p)
        return vjp(2 * jv / pred.size)[0]

    report = check_gradients(graphdef, params, batch, mse_loss, key=jax.random.key(0),
                             settings=GradcheckSettings(hvp=True), hvp_fn=gauss_newton)
    assert report.hvp_rel_err > 1e-3
    assert [f for f in report.failures() if f.startswith("hvp:")]
    assert all(t.passed for t in report.tensors)


# --------------------------------------------------------------------------- near convergence

def test_correct_gradient_near_convergence_passes_where_a_pure_relative_test_fails(diabetes):
    """The roundoff trap: after 3000 Adam steps the gradient is ~1e-3 and finite
    differences cannot resolve it to 1e-8 relative; the error floor keeps the correct
    gradient passing, and a gradient wrong by 0.1 % in one tensor still fails."""
    x, y = diabetes
    model = TanhMLP(10, 1, (8,), kernel_init=LECUN, tied_hidden=False, key=jax.random.key(0))
    graphdef, params = nnx.split(model, nnx.Param)
    num_steps = 3000
    tx = make_optimizer(AdamOptimConfig(learning_rate=3e-2, schedule="cosine"),
                        num_steps)
    step = make_train_step(graphdef, tx, mse_loss)
    state = init_train_state(jax.tree.map(lambda a: a[None], params), tx,
                             {"learning_rate": jnp.full((1,), 3e-2),
                              "final_lr_fraction": jnp.zeros((1,))}, key=jax.random.key(1)[None])
    state, metrics = jax.jit(lambda s: jax.lax.scan(
        lambda s, _: step(s, (x[None], y[None])), s, None, length=num_steps))(state)
    state = state._replace(params=jax.tree.map(lambda a: a[0], state.params))
    assert float(metrics["grad_norm"][-1, 0]) < 3e-3 < float(metrics["grad_norm"][0, 0])

    report = check_gradients(graphdef, state.params, (x, y), mse_loss, key=jax.random.key(0))
    assert report.passed, report.failures()
    assert max(t.raw_rel_err for t in report.tensors) > 1e-7  # a pure relative test fails

    @jax.jit
    def off_by_a_thousandth(p, x, y):
        grads = jax.grad(lambda q: mse_loss(nnx.merge(graphdef, q)(x), y))(p)
        leaves = jax.tree.leaves(grads)
        leaves[0] = leaves[0] * 1.001
        return as_grads(p, *leaves)

    wrong = check_gradients(graphdef, state.params, (x, y), mse_loss, key=jax.random.key(0),
                            grad_fn=off_by_a_thousandth)
    assert [t.name for t in wrong.tensors if not t.passed] == [report.tensors[0].name]


# --------------------------------------------------------------------------- the report

def test_report_metrics_and_json():
    (graphdef, params, batch), loss_fn = REAL["tied, maps, cross-entropy"]()
    report = check_gradients(graphdef, params, batch, loss_fn, key=jax.random.key(0),
                             settings=GradcheckSettings(hvp=True))
    # a run keeps the worst error as its metric; the rest are figures for the report's plot
    assert report.metrics() == {"gradcheck/max_rel_err": report.max_rel_err}
    assert report.max_rel_err == max(max(t.rel_err, t.directional_rel_err)
                                     for t in report.tensors)
    figures = report.figures()
    tensors = ["input_map/bias", "input_map/kernel", "output_map/bias", "output_map/kernel",
               "theta"]
    assert [t.name for t in report.tensors] == tensors
    assert set(figures) == {f"gradcheck/{t}/rel_err" for t in tensors} | {
        "gradcheck/max_rel_err", "gradcheck/jvp_vjp_rel_err", "gradcheck/theta_inner_norm",
        "gradcheck/theta_outer_norm", "gradcheck/theta_inner_outer_cos",
        "gradcheck/hvp_rel_err", "gradcheck/wall_s"}
    assert all(type(v) is float and math.isfinite(v) for v in figures.values())
    assert all(re.fullmatch(r"[A-Za-z0-9_/]+", k) for k in figures)
    assert figures["gradcheck/max_rel_err"] == report.max_rel_err
    assert set(report.wall_s) == {"gradient", "finite_differences", "jvp_vjp", "tied_split",
                                  "hvp", "total"}
    assert report.wall_s["total"] >= sum(v for k, v in report.wall_s.items() if k != "total")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True and data["dtype"] == "float64" and data["failures"] == []
    assert data["tensors"][4]["shape"] == [4, 4] and "inner" not in data["tied"]

    mlp = REAL["mlp, mse"]()[0]
    plain = check_gradients(*mlp, mse_loss, key=jax.random.key(0)).figures()
    assert "gradcheck/theta_inner_norm" not in plain and "gradcheck/hvp_rel_err" not in plain


def test_tied_gradient_split_with_maps_matches_autodiff():
    (graphdef, params, batch), loss_fn = REAL["tied, maps, cross-entropy"]()
    split = gradcheck.tied_gradient_split(graphdef, params, batch, loss_fn)
    assert split.passed and split.rel_err <= 1e-12
    assert split.inner.shape == split.outer.shape == (4, 4) and split.inner.dtype == np.float64
    assert split.inner_norm > 0 and split.outer_norm > 0
    assert jnp.zeros(1).dtype == jnp.float32


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="rel_tol"):
        GradcheckSettings(rel_tol=0.0)
    with pytest.raises(ValueError, match="max_elements"):
        GradcheckSettings(max_elements=0)
    (graphdef, params, batch), loss_fn = REAL["mlp, mse"]()
    with pytest.raises(ValueError, match="TiedTanh"):
        gradcheck.tied_gradient_split(graphdef, params, batch, loss_fn)
    with pytest.raises(ValueError, match="grad_fn returned"):
        check_gradients(graphdef, params, batch, loss_fn, key=jax.random.key(0),
                        grad_fn=lambda p, x, y: jax.tree.leaves(p)[:1])
    with pytest.raises(ValueError, match=r"scalar of shape \(\), but it has shape \(64, 1\)"):
        check_gradients(graphdef, params, batch, lambda pred, y: (pred - y) ** 2,
                        key=jax.random.key(0))
    with pytest.raises(RuntimeError, match="enable_x64"):
        gradcheck.to_float64(params)
