"""Gradient checks inside training runs: when they run, what they log, and what a
failed check does to the run (issue: gradient checks; cases C12, C15)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RecordingTracker
from trainer.config import (AdamOptimConfig, Config, GradcheckConfig, MlpModelConfig,
                            TabularDataConfig, TiedModelConfig, TrainerConfig)
from trainer.data import load_dataset
from trainer.loop import GradcheckFailedError, train_and_evaluate
from trainer.steps import mse_loss


@pytest.fixture(scope="module")
def diabetes():
    return load_dataset(TabularDataConfig(kind="diabetes"), seed=0)


def config(*, model=None, steps=200, **gradcheck) -> Config:
    return Config(model=model or MlpModelConfig(hidden=[8]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=AdamOptimConfig(learning_rate=1e-2),
                  trainer=TrainerConfig(num_steps=steps, steps_per_call=50, log_every_steps=50,
                                        eval_every_steps=50, progress=False),
                  gradcheck=GradcheckConfig(**gradcheck))


@jax.custom_vjp
def half_gradient_mse(pred, target):
    """MSE whose backward pass forgets the factor 2 of d(r²)/dr: a broken gradient."""
    return mse_loss(pred, target)


def _fwd(pred, target):
    return mse_loss(pred, target), (pred, target)


def _bwd(res, g):
    pred, target = res
    r = pred - target.reshape(pred.shape)
    return g * r / r.size, jnp.zeros_like(target)  # should be 2 r / N


half_gradient_mse.defvjp(_fwd, _bwd)


def test_default_checks_run_before_and_after_training_and_are_logged(diabetes, tmp_path):
    """Default: a check at step 0 and after the last step; the worst relative error as
    the run's one gradient-check metric at those steps, the per-tensor errors and
    jvp-vs-vjp in the reports gradcheck.json and gradcheck.png; tag gradcheck=passed;
    all in float64 (C12) and passing."""
    tracker = RecordingTracker()
    result = train_and_evaluate(config(), diabetes, tracker, workdir=tmp_path)
    tensors = ["input_layer/bias", "input_layer/kernel", "output_layer/bias",
               "output_layer/kernel"]
    worst = tracker.history("gradcheck/max_rel_err")
    assert [s for s, _ in worst] == [0, 200]
    assert all(0 <= v <= 1e-8 for _, v in worst), worst
    assert {n for n, _, _ in tracker.points if n.startswith("gradcheck/")} == {
        "gradcheck/max_rel_err"}
    assert tracker.tags["gradcheck"] == "passed" and result.gradcheck_passed is True
    assert {"gradcheck.json", "gradcheck.png"} <= {n for n, _ in tracker.artifacts}
    saved = json.loads((tmp_path / "gradcheck.json").read_text())
    assert [r["step"] for r in saved] == [0, 200]
    assert all(r["dtype"] == "float64" for r in saved)
    assert [t["name"] for t in saved[0]["tensors"]] == tensors
    for report, (step, value) in zip(saved, worst):  # the metric is each report's worst
        assert value == report["max_rel_err"] == max(
            max(t["rel_err"], t["directional_rel_err"]) for t in report["tensors"])
        assert all(t["rel_err"] <= 1e-8 for t in report["tensors"])
        assert 0 <= report["jvp_vjp_rel_err"] <= 1e-8
    assert result.timings["gradcheck_s"] > 0
    assert jnp.zeros(1).dtype == jnp.float32  # x64 is off again for everything else


def test_checks_every_n_steps_land_on_chunk_ends(diabetes):
    tracker = RecordingTracker()
    train_and_evaluate(config(every_steps=75), diabetes, tracker)
    # chunks end at 50, 100, 150, 200: the first ends at or after 75, 150 and the last
    assert sorted(s for s, _ in tracker.history("gradcheck/max_rel_err")) == [0, 100, 150, 200]


def test_checks_off(diabetes):
    tracker = RecordingTracker()
    result = train_and_evaluate(config(every_steps=0), diabetes, tracker)
    assert not [p for p in tracker.points if p[0].startswith("gradcheck/")]
    assert "gradcheck" not in tracker.tags and result.gradcheck_passed is None
    assert "gradcheck.json" not in {n for n, _ in tracker.artifacts}


def test_checks_leave_the_training_unchanged(diabetes):
    """The float64 checks (x64 mode switched on and off around them, at chunk ends
    and after training) leave the float32 training untouched: the final params are
    bit-identical."""
    on = train_and_evaluate(config(every_steps=50), diabetes, RecordingTracker())
    off = train_and_evaluate(config(every_steps=0), diabetes, RecordingTracker())
    for a, b in zip(jax.tree.leaves(on.params), jax.tree.leaves(off.params)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_tied_model_logs_the_inner_and_outer_terms(diabetes):
    """C15 in a run: the tied model's checks report both terms of dL/dΘ and their cosine
    (in gradcheck.json and its plot, not as metrics); their sum equals autodiff (the
    check passes)."""
    cfg = config(model=TiedModelConfig(width=8))
    tracker = RecordingTracker()
    result = train_and_evaluate(cfg, diabetes, tracker)
    assert not tracker.history("gradcheck/theta_inner_norm")
    assert [s for s, _ in result.gradcheck] == [0, 200]
    for _, report in result.gradcheck:
        tied = report.figures()
        assert tied["gradcheck/theta_inner_norm"] > 0 and tied["gradcheck/theta_outer_norm"] > 0
        assert -1 <= tied["gradcheck/theta_inner_outer_cos"] <= 1
    assert result.gradcheck_passed is True
    (_, first), = [r for r in result.gradcheck if r[0] == 0]
    assert first.tied.rel_err < 1e-10


def test_a_broken_gradient_marks_the_run_and_says_so(diabetes, capsys):
    """A loss with a wrong backward pass: the check fails, the run gets the tag
    gradcheck=failed and a console line naming the tensor, and training goes on."""
    from rich.console import Console

    tracker = RecordingTracker()
    result = train_and_evaluate(config(), diabetes, tracker, loss_fn=half_gradient_mse,
                                console=Console(force_terminal=False, width=200))
    assert tracker.tags["gradcheck"] == "failed" and result.gradcheck_passed is False
    worst = tracker.history("gradcheck/max_rel_err")
    assert [s for s, _ in worst] == [0, 200] and all(v > 0.3 for _, v in worst)
    out = capsys.readouterr().out
    assert "gradient check FAILED at step 0" in out and "input_layer/kernel" in out
    # a custom_vjp has no forward mode: that one check is skipped, and the report says so
    (_, first), = [r for r in result.gradcheck if r[0] == 0]
    assert first.jvp_vjp_rel_err is None and "custom_vjp" in first.notes[0]
    assert "gradcheck/jvp_vjp_rel_err" not in first.figures()
    assert result.num_steps == 200 and tracker.history("test/rmse")


def test_fail_run_stops_a_run_with_a_broken_gradient(diabetes):
    """gradcheck.fail_run=true: the first failed check ends the run with an error that
    names the step and the tensors; what was logged before stays."""
    tracker = RecordingTracker()
    with pytest.raises(GradcheckFailedError, match="at step 0: .*input_layer/kernel") as err:
        train_and_evaluate(config(fail_run=True), diabetes, tracker,
                           loss_fn=half_gradient_mse)
    assert err.value.step == 0
    assert tracker.tags["gradcheck"] == "failed"
    assert tracker.history("gradcheck/max_rel_err")[0][1] > 0.3
    assert not tracker.history("curves/train_loss")  # stopped before any step ran


def test_probe_batch_is_the_first_training_rows(diabetes):
    """The probe is fixed: the first probe_batch_size rows of the training split, so
    checks at different steps compare like with like; a larger size is clamped."""
    from trainer.checks import Gradchecker as _Gradchecker

    g = _Gradchecker(dataclasses.replace(GradcheckConfig(), probe_batch_size=10**6), None,
                     mse_loss, diabetes, RecordingTracker(), None, key=jax.random.key(0))
    np.testing.assert_array_equal(g._probe[0], diabetes.x_train)
