"""What XLA and the timers report, and the figures every training run records:
phase timings, the compile counter, FLOPs and bytes per step (C10)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RecordingTracker
from trainer import measure
from trainer.config import (AdamOptimConfig, Config, GradcheckConfig, MlpModelConfig,
                            TabularDataConfig, TrainerConfig)
from trainer.data import load_dataset
from trainer.loop import CountingCompiler, gradcheck_steps, train_and_evaluate


@pytest.fixture(scope="module")
def diabetes():
    return load_dataset(TabularDataConfig(kind="diabetes"), seed=0)


def test_summarize_times_gives_order_statistics_and_spread():
    stats = measure.summarize_times([3.0, 1.0, 2.0, 4.0, 5.0])
    assert stats.median_s == 3.0 and stats.min_s == 1.0 and stats.max_s == 5.0
    assert stats.p10_s == pytest.approx(1.4) and stats.p90_s == pytest.approx(4.6)
    assert stats.spread == pytest.approx((4.6 - 1.4) / 3.0)
    assert stats.repeats == 5
    with pytest.raises(ValueError, match="at least one"):
        measure.summarize_times([])


def test_cost_and_memory_analysis_of_a_matmul():
    """XLA counts 2·n³ FLOPs for an n×n matmul and n·n·4 bytes per float32 argument."""
    n = 64
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile()
    assert measure.compiled_cost(compiled)["flops"] == 2 * n**3
    memory = measure.compiled_memory(compiled)
    assert memory["argument_bytes"] == 2 * n * n * 4
    assert memory["output_bytes"] == n * n * 4


def test_time_blocked_waits_for_the_result():
    """Each sample ends at block_until_ready: timing a matmul chain gives at least the
    time of running it synchronously, not the microseconds of its dispatch."""
    x = jnp.ones((512, 512))
    f = jax.jit(lambda a: jnp.tanh(a @ a @ a @ a))
    stats = measure.time_blocked(f, x, warmup=1, repeats=3)
    blocked = measure.time_blocked(lambda a: np.asarray(f(a)), x, warmup=0, repeats=3)
    assert stats.median_s > 0.2 * blocked.median_s


def test_signature_changes_name_the_argument():
    old = measure.abstract_signature({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
    new = measure.abstract_signature({"w": jnp.zeros((4, 2)), "b": jnp.zeros(2, jnp.int32)})
    lines = measure.signature_changes(old, new)
    assert lines == ["['b']: float32[2] -> int32[2]", "['w']: float32[3, 2] -> float32[4, 2]"]
    assert measure.signature_changes(old, old) == []


def test_counting_compiler_compiles_once_and_reports_a_changed_argument():
    """The compile counter: repeated calls with the same shapes compile once; a call
    whose argument changed shape compiles again and names that argument."""
    compiler = CountingCompiler(lambda state, x: ({"w": state["w"] * 2}, x.sum()))
    state = {"w": jnp.ones(3)}
    compiler.compile(state, jnp.ones(5))
    for _ in range(3):
        state, _ = compiler(state, jnp.ones(5))
    np.testing.assert_array_equal(state["w"], 8.0)
    assert compiler.num_compiles == 1 and compiler.recompiles == []
    compiler(state, jnp.ones(6))
    assert compiler.num_compiles == 2
    assert compiler.recompiles == ["[1]: float32[5] -> float32[6]"]
    assert compiler.compile_s > 0 and compiler.trace_lower_s > 0


def test_gradcheck_steps_follow_chunk_ends():
    ends = [100, 200, 300, 350]
    assert gradcheck_steps(None, ends) == {350}
    assert gradcheck_steps(0, ends) == set()
    assert gradcheck_steps(150, ends) == {200, 300, 350}
    assert gradcheck_steps(100, ends) == {100, 200, 300, 350}


def test_a_run_records_phase_timings_compiles_flops_and_bytes(diabetes):
    """Every run logs its phases (C10: compile apart from steps; steps timed to
    completion), the compile count (1), XLA's FLOPs and bytes for one step, and the
    achieved FLOP/s that follows from them."""
    hidden, batch = (16,), 32
    cfg = Config(model=MlpModelConfig(hidden=list(hidden)),
                 data=TabularDataConfig(kind="diabetes", batch_size=batch),
                 optim=AdamOptimConfig(learning_rate=1e-3),
                 trainer=TrainerConfig(num_steps=400, steps_per_call=100, log_every_steps=100,
                                       eval_every_steps=100, progress=False),
                 gradcheck=GradcheckConfig(every_steps=0))
    tracker = RecordingTracker()
    result = train_and_evaluate(cfg, diabetes, tracker)
    t, m = result.timings, result.compute
    for name in ("trace_lower_s", "compile_s", "analysis_s", "first_call_s", "step_s",
                 "step_p90_s", "steps_per_s", "samples_per_s", "wall_s"):
        assert t[name] > 0, name
    assert t["log_s"] == 0.0  # RecordingTracker spends no time in MLflow
    assert t["step_s"] <= t["step_p90_s"]
    assert t["compile_s"] + t["trace_lower_s"] + t["train_s"] < t["wall_s"]
    assert t["samples_per_s"] == pytest.approx(batch * t["steps_per_s"])
    assert m["num_compiles"] == 1
    # forward 2PB plus backward 2PB (weights) at least; adam adds O(P) elementwise work
    num_params = diabetes.in_features * 16 + 16 + 16 + 1
    assert 4 * num_params * batch < m["flops_per_step"] < 8 * num_params * batch + 100 * num_params
    assert m["flops_per_s"] == pytest.approx(m["flops_per_step"] * t["steps_per_s"])
    assert m["argument_bytes"] >= 4 * (3 * num_params + batch * (diabetes.in_features + 1))
    assert m["temp_bytes"] > 0
    assert ("peak_bytes" in m) == (jax.default_backend() == "gpu")
    # the run's results, at step 0 (a bar per run in MLflow's charts; see trainer/names.py)
    logged = {name for name, _, step in tracker.points if step == 0}
    assert {"time/compile_s", "time/trace_lower_s", "time/step_p90_s", "xla/flops_per_step",
            "xla/flops_per_s", "xla/num_compiles", "xla/temp_bytes"} <= logged
    assert not {n for n, _, _ in tracker.points if not n.startswith(("curves/", "test/", "time/",
                                                                      "train/", "xla/"))}
    assert tracker.params == {"derived.num_params": str(num_params),
                              "derived.batch_size": str(batch)}
    assert result.gradcheck_passed is None and "gradcheck" not in tracker.tags


def test_a_recompiled_step_is_tagged(diabetes, monkeypatch):
    """A run whose step changes an argument's dtype (a step that returns float64 params
    would) reports the second compilation and which argument changed."""
    import trainer.loop as loop

    real = loop.make_train_chunk

    def widening_chunk(*args, **kwargs):
        chunk = real(*args, **kwargs)

        def run(state, data):
            state, metrics = chunk(state, data)
            return state._replace(step=state.step.astype(jnp.int16)
                                  if state.step.dtype == jnp.int32 else state.step), metrics
        return run

    monkeypatch.setattr(loop, "make_train_chunk", widening_chunk)
    cfg = Config(model=MlpModelConfig(hidden=[8]), data=TabularDataConfig(kind="diabetes"),
                 optim=AdamOptimConfig(),
                 trainer=TrainerConfig(num_steps=30, steps_per_call=10, log_every_steps=10,
                                       eval_every_steps=10, progress=False),
                 gradcheck=GradcheckConfig(every_steps=0))
    tracker = RecordingTracker()
    result = train_and_evaluate(cfg, diabetes, tracker)
    assert result.compute["num_compiles"] == 2
    assert tracker.tags["recompiled"] == "[0].step: int32[] -> int16[]"

