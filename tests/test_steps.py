"""The train step and the scanned chunk: updates land, scans equal single steps,
one compilation, non-finite losses caught on the device, scalar losses (C13, C14)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import RecordingTracker
from trainer.config import (AdamOptimConfig, Config, MlpModelConfig, SgdOptimConfig,
                            TabularDataConfig, TrainerConfig)
from trainer.optim import make_optimizer
from trainer.data import load_dataset
from trainer.loop import NonFiniteLossError, chunk_points, chunk_timings, train_and_evaluate
from trainer.models import ModelSpec, init_model
from trainer.steps import (DeviceData, check_scalar_loss, init_train_state, make_train_chunk, row_permutation,
                           make_train_step, mse_loss)


@pytest.fixture(scope="module")
def diabetes():
    return load_dataset(TabularDataConfig(kind="diabetes"), seed=0)


def small_setup(dataset, *, lr=1e-2, members=1):
    """A population of ``members`` copies of a tanh MLP [8] with Adam at ``lr``: stacked
    params, the optimizer, its per-member values and the members' data."""
    model = init_model(ModelSpec("mlp", dataset.in_features, 1, 0, (8,), False, "lecun_normal",
                                 1.0), key=jax.random.key(0))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(AdamOptimConfig(learning_rate=lr), 1000)
    values = {"learning_rate": jnp.full((members,), lr, jnp.float32)}
    stack = lambda a: jnp.stack([jnp.asarray(a)] * members)  # noqa: E731
    data = DeviceData(*map(stack, (dataset.x_train, dataset.y_train, dataset.x_val,
                                   dataset.y_val)))
    return graphdef, jax.tree.map(stack, params), optimizer, values, data


def adam_count(opt_state) -> jax.Array:
    """``(M,)`` int32: the updates each member's Adam has applied (``optax.scale_by_adam``'s
    count, inside the ``inject_hyperparams`` wrapper, whose own count stays 0: see
    ``Optimizer.update``)."""
    adam, _ = opt_state.inner_state
    return adam.count


def keys_for(*seeds):
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def test_c14_three_steps_update_params_and_optimizer_state(diabetes):
    """C14: the split-state pattern under plain jax.jit keeps its updates: after three
    steps the params differ, the optimizer's step count is 3 and the loss changed."""
    graphdef, params, tx, values, data = small_setup(diabetes)
    step = jax.jit(make_train_step(graphdef, tx, mse_loss))
    state = init_train_state(params, tx, values, key=keys_for(1))
    batch = (data.x_train[:, :32], data.y_train[:, :32])
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train_loss"][0]))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state.params, params)
    assert all(jax.tree.leaves(changed))
    # Adam's own count (its bias correction) took the three updates, and so did the step
    assert int(adam_count(state.opt_state)[0]) == 3 and int(state.step) == 3
    assert int(state.step) == 3
    assert losses[2] < losses[0]


def test_scanned_chunk_equals_single_steps(diabetes):
    """K steps in one lax.scan give the params of K single jitted steps on the batches
    the documented order names (permutation of fold_in(key, epoch))."""
    graphdef, params, tx, values, data = small_setup(diabetes)
    batch_size, k = 32, 12
    keys = keys_for(3)
    step = make_train_step(graphdef, tx, mse_loss)
    chunk = jax.jit(make_train_chunk(step, graphdef, mse_loss, num_steps=24, steps_per_call=k,
                                     batch_size=batch_size, eval_every_steps=4,
                                     log_every_steps=2))
    scanned, (step_metrics, eval_metrics) = chunk(init_train_state(params, tx, values,
                                                                   key=keys), data)

    single = jax.jit(step)
    state = init_train_state(params, tx, values, key=keys)
    n = data.x_train.shape[1]
    per_epoch = n // batch_size
    losses = []
    for s in range(k):
        order = row_permutation(jax.random.fold_in(keys[0], s // per_epoch), n)
        idx = order[(s % per_epoch) * batch_size:(s % per_epoch + 1) * batch_size]
        state, m = single(state, (data.x_train[:, idx], data.y_train[:, idx]))
        losses.append(float(m["train_loss"][0]))
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # metrics come back for the first step of each block of gcd(12, 4, 2) = 2 steps
    assert step_metrics["step"].tolist() == list(range(0, k, 2))
    np.testing.assert_allclose(step_metrics["train_loss"][:, 0], losses[::2], rtol=1e-5)
    assert eval_metrics["evaluated"].tolist() == [False, True] * 3
    assert eval_metrics["val_step"][1::2].tolist() == [3, 7, 11]


@pytest.mark.parametrize("num_steps,every", [
    (15, 5),   # blocks of 5, num_steps on a block boundary: whole blocks masked
    (13, 5),   # blocks of 5, num_steps inside a block: single steps masked
    (13, 1),   # blocks of 1
])
def test_ragged_last_chunk_is_masked(diabetes, num_steps, every):
    """num_steps not a multiple of steps_per_call: the tail does nothing, the last
    step is evaluated, and the step counter stops at num_steps."""
    graphdef, params, tx, values, data = small_setup(diabetes)
    step = make_train_step(graphdef, tx, mse_loss)
    chunk = jax.jit(make_train_chunk(step, graphdef, mse_loss, num_steps=num_steps,
                                     steps_per_call=10, batch_size=32, eval_every_steps=every,
                                     log_every_steps=every))
    state = init_train_state(params, tx, values, key=keys_for(0))
    state, _ = chunk(state, data)
    before = jax.tree.leaves(state.params)
    state, (step_metrics, eval_metrics) = chunk(state, data)
    assert int(state.step) == num_steps
    active_steps = step_metrics["step"][step_metrics["active"][:, 0]].tolist()
    assert active_steps == list(range(10, num_steps, every))
    evaluated_at = eval_metrics["val_step"][eval_metrics["evaluated"]].tolist()
    assert evaluated_at[-1] == num_steps - 1
    assert any(not np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(state.params)))
    state2, _ = chunk(state, data)  # a further chunk changes nothing
    for a, b in zip(jax.tree.leaves(state2.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("skip", [True, False])
def test_nonfinite_step_is_recorded_on_device_and_isolated(diabetes, skip):
    """C07: a member's first non-finite step is recorded in the state and its update
    dropped, so its params stay finite; in skip mode it goes on, in stop mode it stops
    (frozen); the other member trains on either way."""
    graphdef, params, tx, values, data = small_setup(diabetes, members=2)
    step = jax.jit(make_train_step(graphdef, tx, mse_loss, skip_nonfinite=skip))
    state = init_train_state(params, tx, values, key=keys_for(0, 1))
    good = (data.x_train[:, :4], data.y_train[:, :4])
    bad = (good[0], good[1].at[0, 0, 0].set(jnp.inf))  # member 0 only
    state, m0 = step(state, good)
    state, m1 = step(state, bad)
    frozen = jax.tree.map(lambda a: a[0], state.params)
    state, m2 = step(state, good)
    assert m0["finite"].tolist() == [True, True] and m1["finite"].tolist() == [False, True]
    assert state.nonfinite_step.tolist() == [1, -1]
    assert state.nonfinite_count.tolist() == [1, 0]
    assert state.active.tolist() == [skip, True]
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state.params))
    moved = [not np.array_equal(a[0], b) for a, b in zip(jax.tree.leaves(state.params),
                                                        jax.tree.leaves(frozen))]
    assert all(moved) == skip and any(moved) == skip
    assert int(adam_count(state.opt_state)[1]) == 3
    assert int(adam_count(state.opt_state)[0]) == (2 if skip else 3)  # skipped: state kept


def test_c13_non_scalar_loss_stops_before_training_with_its_shape(diabetes):
    """C13: a loss that returns one value per row is refused, naming the shape."""
    graphdef, params, *_ = small_setup(diabetes)
    params = jax.tree.map(lambda a: a[0], params)  # one member

    def per_row_loss(pred, target):
        return jnp.mean((pred - target) ** 2, axis=1)

    x, y = jnp.asarray(diabetes.x_train[:32]), jnp.asarray(diabetes.y_train[:32])
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        check_scalar_loss(per_row_loss, graphdef, params, x, y)
    check_scalar_loss(mse_loss, graphdef, params, x, y)  # (B, 1) targets: a scalar loss


def test_c13_mse_never_broadcasts_rows_against_columns():
    """C13: predictions (B, 1) and targets (B,) give the per-row error, not (B, B)."""
    pred = jnp.array([[1.0], [2.0], [3.0]])
    target = jnp.array([1.0, 2.0, 5.0])
    assert mse_loss(pred, target).shape == ()
    assert float(mse_loss(pred, target)) == pytest.approx(4.0 / 3.0)


def cfg_for(steps=300, **trainer):
    return Config(model=MlpModelConfig(hidden=[8]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=AdamOptimConfig(learning_rate=1e-2),
                  trainer=TrainerConfig(num_steps=steps, steps_per_call=100, log_every_steps=1,
                                        eval_every_steps=50, progress=False, **trainer))


def test_training_lowers_the_loss_and_compiles_the_chunk_once(diabetes, caplog):
    """The loss falls; the chunk is compiled once for the whole run."""
    tracker = RecordingTracker()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        result = train_and_evaluate(cfg_for(steps=300), diabetes, tracker)
    compiles = [r for r in caplog.records if "Compiling jit(train_chunk)" in r.getMessage()]
    assert len(compiles) == 1
    losses = [v for _, v in tracker.history("curves/train_loss")]
    assert len(losses) == 300
    assert np.mean(losses[-50:]) < 0.7 * np.mean(losses[:10])
    val = tracker.history("curves/val_loss")
    assert [s for s, _ in val] == [49, 99, 149, 199, 249, 299]
    assert result.test_metrics["rmse"] > 0 and "rmse" in result.baseline_metrics
    assert {name for name, _ in tracker.artifacts} == {"training_curves.png", "final_params",
                                                       "gradcheck.json", "gradcheck.png"}


def test_divergence_stops_with_the_step_and_keeps_earlier_points(diabetes):
    """C07: a huge learning rate stops the run at the first non-finite step; the points
    before it are logged and none after it; the message suggests a smaller rate. (The
    divergence rule, which would stop it earlier at a finite loss, is off: C24 tests it.)"""
    cfg = cfg_for(steps=300, divergence_factor=None)
    cfg = dataclasses.replace(cfg, optim=SgdOptimConfig(learning_rate=1e4))
    tracker = RecordingTracker()
    with pytest.raises(NonFiniteLossError, match="smaller") as err:
        train_and_evaluate(cfg, diabetes, tracker)
    bad_step = err.value.step
    assert tracker.tags["diverged_at_step"] == str(bad_step)
    steps = [s for n, _, s in tracker.points if n == "curves/train_loss"]
    assert steps == list(range(bad_step))
    assert all(np.isfinite(v) for _, v, _ in tracker.points)


def test_chunk_points_are_plain_python_numbers():
    """C08: values are Python floats, steps Python ints; only steps on the log grid."""
    steps = np.array([10, 12, 14, 16], np.int32)
    step_metrics = {"train_loss": np.linspace(1, 2, 4, dtype=np.float32)[:, None],
                    "grad_norm": np.ones((4, 1), np.float32),
                    "learning_rate": np.ones((4, 1), np.float32),
                    "finite": np.ones((4, 1), bool), "step": steps,
                    "active": np.array([[1], [1], [1], [0]], bool)}
    eval_metrics = {"val_loss": np.array([[0.5], [np.nan]], np.float32),
                    "val_step": np.array([13, 15], np.int32),
                    "evaluated": np.array([True, False])}
    points = chunk_points((step_metrics, eval_metrics), log_every_steps=4)
    assert [s for n, _, s in points if n == "train_loss"] == [12]
    assert ("val_loss", 0.5, 13) in points
    assert all(type(v) is float and type(s) is int for _, v, s in points)
    every = chunk_points((step_metrics, eval_metrics), log_every_steps=2, stop_before=13)
    assert [s for n, _, s in every if n == "train_loss"] == [10, 12]
    assert not [p for p in every if p[0] == "val_loss"]


def test_chunk_timings_follow_completions():
    """C10: step time is the median over chunks of interval / steps; steps/s counts
    only the chunks after the first."""
    t = chunk_timings(10.0, [12.0, 13.0, 14.0], [100, 100, 100])
    assert t["first_call_s"] == pytest.approx(2.0)
    assert t["train_s"] == pytest.approx(4.0)
    assert t["step_s"] == pytest.approx(0.01)
    assert t["steps_per_s"] == pytest.approx(100.0)
    # a short last chunk counts its own steps
    t = chunk_timings(10.0, [12.0, 13.0, 13.5], [100, 100, 50])
    assert t["step_s"] == pytest.approx(0.01)
    assert t["steps_per_s"] == pytest.approx(100.0)


def test_c10_reported_step_time_matches_blocked_wall_time(diabetes):
    """C10: the logged step time agrees within 2x with an independent measurement: the
    same compiled chunk called in a loop, timed only after jax.block_until_ready. (An
    unsynchronised timer would report the dispatch time, far below it.)"""
    import time

    hidden, batch, k = (128, 128), 256, 100
    cfg = Config(model=MlpModelConfig(hidden=list(hidden)),
                 data=TabularDataConfig(kind="diabetes", batch_size=batch),
                 optim=AdamOptimConfig(learning_rate=1e-3),
                 trainer=TrainerConfig(num_steps=5 * k, steps_per_call=k, log_every_steps=k,
                                       eval_every_steps=k, progress=False))
    result = train_and_evaluate(cfg, diabetes, RecordingTracker())

    model = init_model(ModelSpec("mlp", diabetes.in_features, 1, 0, hidden, False,
                                 "lecun_normal", 1.0), key=jax.random.key(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda a: a[None], params)
    *_, tx, values, data = small_setup(diabetes, lr=1e-3)
    step = make_train_step(graphdef, tx, mse_loss)
    chunk = jax.jit(make_train_chunk(step, graphdef, mse_loss, num_steps=5 * k,
                                     steps_per_call=k, batch_size=batch, eval_every_steps=k,
                                     log_every_steps=k))
    state = init_train_state(params, tx, values, key=keys_for(1))
    state, _ = chunk(state, data)  # compile and warm up
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(4):
        state, _ = chunk(state, data)
    jax.block_until_ready(state)
    blocked_step_s = (time.perf_counter() - t0) / (4 * k)
    assert 0.5 < result.timings["step_s"] / blocked_step_s < 2.0
    assert result.timings["compile_s"] > 0 and result.timings["train_s"] < result.timings["wall_s"]


@pytest.mark.parametrize("steps", [100, 95])
def test_issue13_item5_last_step_logged(diabetes, steps):
    """Issue 13.5: the last step's loss and learning rate are logged even off the logging
    grid (99 and 94 with a stride of 10; 95 steps also leave a ragged last chunk), with
    the values a run that logs every step records there; the grid's points are
    unchanged; the gradient norm stays on the grid (computing it every step is what the
    grid saves)."""
    def run(every):
        cfg = cfg_for(steps=steps)
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(
            cfg.trainer, steps_per_call=50, log_every_steps=every))
        tracker = RecordingTracker()
        train_and_evaluate(cfg, diabetes, tracker)
        return {name: dict(tracker.history(f"curves/{name}"))
                for name in ("train_loss", "grad_norm", "learning_rate")}

    strided, every = run(10), run(1)
    for name, points in strided.items():
        grid = [*range(0, steps, 10)] + ([] if name == "grad_norm" else [steps - 1])
        assert sorted(points) == grid, name
        for step, value in points.items():
            assert value == pytest.approx(every[name][step], rel=1e-5), (name, step)


def test_issue13_item6_progress_bar_shows_the_latest_loss_in_full(diabetes):
    """Issue 13.6: at the end of a partial chunk (7 steps, stride 10) the bar showed the
    step-0 loss, the last logged point; it shows the last step's loss now, and a huge
    loss as such (8.1e+30, not 0)."""
    import io

    from rich.console import Console

    from trainer.report import progress_bar

    cfg = cfg_for(steps=7)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(
        cfg.trainer, log_every_steps=10, progress=True), gradcheck=dataclasses.replace(
        cfg.gradcheck, every_steps=0))
    out, tracker = io.StringIO(), RecordingTracker()
    train_and_evaluate(cfg, diabetes, tracker, console=Console(file=out, width=120))
    (first, at_0), (last, at_6) = tracker.history("curves/train_loss")
    assert (first, last) == (0, 6) and f"{at_0:.4g}" != f"{at_6:.4g}"
    bar = next(line for line in out.getvalue().splitlines() if line.startswith("step 7/7"))
    assert f"loss {at_6:.4g} " in bar, bar

    out = io.StringIO()
    with progress_bar(Console(file=out, width=120), 1500) as update:
        update(1500, 8.1e30, 100.0)
    assert "loss 8.1e+30 " in out.getvalue()
