"""Early stopping (issue 9): per member, decided on the device at each evaluation. A member
whose validation loss rises stops while another trains on, and ends with the params,
test metrics and record of its best step; off (patience 0), nothing changes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from hydra import compose, initialize_config_dir

from conftest import RecordingTracker
from trainer.config import (CONF_DIR, AdamOptimConfig, Config, ConfigError, GradcheckConfig,
                            MlpModelConfig, TabularDataConfig, TrainerConfig, register_configs,
                            validate)
from trainer.data import load_dataset
from trainer.loop import build_run, run_chunks, train_population

EVERY = 20  # steps between evaluations (and logged points)
SLOW_LR, FAST_LR = 1e-4, 3e-2  # on diabetes: a validation loss that falls for 240 steps,
                               # and one that is lowest after 40 steps and then rises


def population(num_steps: int, patience: int, *, min_delta: float = 0.0,
               steps_per_call: int = 100) -> list[Config]:
    """Two Adam members of a 10-64-64-1 MLP on diabetes (seed 0), a slow and a fast one."""
    base = Config(model=MlpModelConfig(hidden=[64, 64]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=AdamOptimConfig(schedule="constant"),
                  trainer=TrainerConfig(num_steps=num_steps, steps_per_call=steps_per_call,
                                        log_every_steps=EVERY, eval_every_steps=EVERY,
                                        patience=patience, min_delta=min_delta, progress=False),
                  gradcheck=GradcheckConfig(every_steps=0))
    return [dataclasses.replace(base, optim=dataclasses.replace(base.optim, learning_rate=lr))
            for lr in (SLOW_LR, FAST_LR)]


@pytest.fixture(scope="module")
def split():
    return load_dataset(TabularDataConfig(kind="diabetes"), seed=0)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(jax.device_get(tree))]


def test_a_member_whose_validation_loss_rises_stops_while_the_other_trains_on(split):
    """Patience 3: the fast member's validation loss is lowest after step 39 and higher at
    the next three evaluations, so it stops at step 99 = 39 + 3 x 20 (masked on the
    device) with the params of step 39; the slow one improves at every evaluation and
    trains to step 239. The stopped member's test metrics and params equal those of the
    same population trained for 40 steps, bit for bit (CPU); its curves end at step 99."""
    num_steps, patience = 240, 3
    trackers = [RecordingTracker() for _ in range(2)]
    # calls of 20 steps, so that the 40-step run below runs the same chunk, twice
    slow, fast = train_population(population(num_steps, patience, steps_per_call=EVERY),
                                  [split] * 2, trackers)

    # the slow member: trained to the end, never stopped, its best is its last evaluation
    assert slow.early_stopped_at_step is None and slow.failed_step is None
    assert "early_stopped_at_step" not in trackers[0].tags
    assert trackers[0].history("curves/val_loss")[-1][0] == num_steps - 1
    assert trackers[0].history("curves/train_loss")[-1][0] == num_steps - 1  # issue 13.5
    assert slow.best_step == num_steps - 1

    # the fast member: stopped early, a success with the record of its best step
    stop, best = fast.early_stopped_at_step, fast.best_step
    assert fast.failed_step is None and fast.test_metrics
    assert trackers[1].tags["early_stopped_at_step"] == str(stop)
    assert "diverged_at_step" not in trackers[1].tags
    assert best < stop < num_steps - 1
    assert stop == best + patience * EVERY  # min_delta 0: every later evaluation was worse
    val = trackers[1].history("curves/val_loss")
    assert val[-1][0] == stop  # the curves show every step trained, and none after
    assert max(s for s, _ in trackers[1].history("curves/train_loss")) <= stop
    assert min(val, key=lambda p: p[1]) == (best, fast.best_val_loss)
    assert all(v > fast.best_val_loss for s, v in val if s > best)
    for tracker, result in zip(trackers, (slow, fast)):
        # results, at step 0 (see trainer/names.py)
        assert tracker.history("train/best_step") == [(0, result.best_step)]
        assert tracker.history("train/best_val_loss") == [(0, result.best_val_loss)]
        assert ("final_params", "final_params") in tracker.artifacts

    # the fast member ends with the params of its best step: those of a 40-step run
    straight_trackers = [RecordingTracker() for _ in range(2)]
    _, straight = train_population(population(best + 1, patience=0, steps_per_call=EVERY),
                                   [split] * 2, straight_trackers)
    assert straight.best_step is None and straight.early_stopped_at_step is None
    for a, b in zip(leaves(fast.params), leaves(straight.params)):
        np.testing.assert_array_equal(a, b)
    assert fast.test_metrics == straight.test_metrics
    assert straight_trackers[1].history("curves/val_loss")[-1] == (best, fast.best_val_loss)


def test_patience_off_changes_nothing(split):
    """Patience 0 (nothing tracked, ``best_params`` empty) and a patience too large to
    trigger train the same params and curves bit for bit: early stopping never touches
    a step. With patience 0 the record stays at its initial values."""
    def train(patience: int):
        run = build_run(population(120, patience, steps_per_call=60), [split] * 2)
        chunks = list(run_chunks(run, []))
        return chunks[-1].state, [c.metrics for c in chunks]

    off_state, off_metrics = train(0)
    on_state, on_metrics = train(10**6)
    assert off_state.best_params == ()
    np.testing.assert_array_equal(np.asarray(off_state.best_step), [-1, -1])
    np.testing.assert_array_equal(np.asarray(on_state.early_stop_step), [-1, -1])
    assert (np.asarray(on_state.best_step) >= 0).all()  # tracked, but never stopped
    for a, b in zip(leaves(off_state.params), leaves(on_state.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(off_metrics), leaves(on_metrics)):
        np.testing.assert_array_equal(a, b)


def test_min_delta_sets_what_counts_as_an_improvement_and_the_run_stops_when_all_stop(split):
    """With ``min_delta`` larger than any validation loss, only the first evaluation
    improves (on +inf): with patience 2 both members stop at step 19 + 2 x 20 = 59, and
    ``run_chunks`` ends after the first chunk of 100 steps, none of them active."""
    run = build_run(population(300, patience=2, min_delta=1e3), [split] * 2)
    chunks = list(run_chunks(run, []))
    assert [c.end for c in chunks] == [100]
    np.testing.assert_array_equal(chunks[0].early_stop_step, [59, 59])
    np.testing.assert_array_equal(chunks[0].active, [False, False])
    state = chunks[0].state
    np.testing.assert_array_equal(np.asarray(state.best_step), [19, 19])
    np.testing.assert_array_equal(np.asarray(state.evals_since_best), [2, 2])
    # masked from step 60 on: no train point is logged where a member is inactive
    step_metrics = chunks[0].metrics[0]
    assert not step_metrics["active"][step_metrics["step"] >= 60].any()
    assert step_metrics["active"][step_metrics["step"] < 60].all()


@pytest.mark.parametrize("override,message", [
    ("trainer.patience=-1", "trainer.patience=-1: must be >= 0"),
    ("trainer.min_delta=-0.5", "trainer.min_delta=-0.5: must be >= 0"),
])
def test_negative_patience_or_min_delta_is_refused(override, message):
    def composed(*overrides: str):
        register_configs()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=["+experiment=smoke", *overrides])

    with pytest.raises(ConfigError) as err:
        validate(composed(override))
    assert message in str(err.value)
    validate(composed("trainer.patience=5", "trainer.min_delta=0.01"))
