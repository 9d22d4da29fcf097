"""Checkpoints (trainer/checkpoint.py): a restored state keeps the optimizer's types and
continues bit for bit (case C19), for every optimizer's state; the keep policy never
deletes the latest checkpoint and keeps the best (case C20); a checkpoint of other members
is refused."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

from trainer.checkpoint import Checkpoints, _saveable
from trainer.config import (SCHEMAS, AdamOptimConfig, Config, GradcheckConfig, MlpModelConfig,
                            TabularDataConfig, TrainerConfig)
from trainer.data import load_dataset
from trainer.loop import build_run, run_chunks
from trainer.optim import OPTIMIZERS


def adam_config(num_steps: int, steps_per_call: int) -> Config:
    """Adam with a cosine schedule and per-epoch shuffling (batch 32 of ~300 rows)."""
    return Config(model=MlpModelConfig(hidden=[8]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=AdamOptimConfig(learning_rate=1e-2, schedule="cosine"),
                  trainer=TrainerConfig(num_steps=num_steps, steps_per_call=steps_per_call,
                                        log_every_steps=1, eval_every_steps=steps_per_call,
                                        progress=False),
                  gradcheck=GradcheckConfig(every_steps=0))


@pytest.fixture(scope="module")
def split():
    return load_dataset(TabularDataConfig(kind="diabetes"), seed=0)


def _train(run) -> tuple[list, object]:
    """Every chunk of ``run``: its per-step train losses ``(steps, M)`` and the last state."""
    chunks = list(run_chunks(run, []))
    losses = np.concatenate([c.metrics[0]["train_loss"] for c in chunks])
    steps = np.concatenate([c.metrics[0]["step"] for c in chunks])
    return list(zip(steps.tolist(), losses.tolist())), chunks[-1].state


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, opt_state
    return found[0]


@pytest.mark.parametrize("members", [1, 3])
def test_C19_restore_keeps_optimizer_types_and_continues_bitwise(split, tmp_path, members):
    """C19: train 5 steps with adam, checkpoint, resume to step 10. The restored optimizer
    state is a ``ScaleByAdamState`` with count 5 (not the dicts and lists Orbax gives
    without a target), and the losses of steps 5-9 and the final params equal those
    of an uninterrupted 10-step run, bit for bit on CPU; for a population too."""
    cfg = adam_config(num_steps=10, steps_per_call=5)
    configs = [dataclasses.replace(cfg, optim=dataclasses.replace(
        cfg.optim, learning_rate=1e-2 * (m + 1))) for m in range(members)]
    datasets = [split] * members
    straight, straight_state = _train(build_run(configs, datasets))

    first = build_run(configs, datasets)
    chunk = next(run_chunks(first, []))
    assert chunk.end == 5
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(chunk.state, document={"run_id": "abc"}, val_loss=1.0, wait=True)
    assert (tmp_path / "ckpt" / "5").is_dir()

    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        resumed_run = build_run(configs, datasets, checkpoints=checkpoints)
        assert checkpoints.document() == {"run_id": "abc"}
    assert resumed_run.start_step == 5 and resumed_run.chunk_ends == [10]
    adam = _adam_state(resumed_run.state.opt_state)
    assert type(resumed_run.state.opt_state) is type(straight_state.opt_state)
    assert jax.tree.structure(resumed_run.state) == jax.tree.structure(straight_state)
    np.testing.assert_array_equal(np.asarray(adam.count), np.full((members,), 5))
    assert jax.dtypes.issubdtype(resumed_run.state.key.dtype, jax.dtypes.prng_key)

    resumed, resumed_state = _train(resumed_run)
    assert [s for s, _ in resumed] == list(range(5, 10))
    assert resumed == straight[5:]  # bitwise: same floats
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed_state.params)),
                    jax.tree.leaves(jax.device_get(straight_state.params))):
        np.testing.assert_array_equal(a, b)


def _node_types(tree) -> list[tuple[str, type]]:
    """Every node of ``tree``, inner ones included (namedtuples, dicts, tuples, empty
    ``EmptyState``s), as ``(path, type)`` in flattening order."""
    nodes = []

    def walk(path, node):
        nodes.append((jax.tree_util.keystr(path), type(node)))
        if jax.tree_util.treedef_is_leaf(jax.tree.structure(node)):
            return
        children, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
        for key, child in children:
            walk(path + key, child)

    walk((), tree)
    return nodes


# the state class each optimizer's moments (or, for sgd, its schedule count) live in
MOMENT_STATE = {"sgd": optax.ScaleByScheduleState, "momentum": optax.TraceState,
                "adam": optax.ScaleByAdamState, "adamw": optax.ScaleByAdamState}
CLIP_NORM = {"sgd": None, "momentum": 0.5, "adam": None, "adamw": 0.5}  # 0.5: it clips


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_C19_every_optimizers_state_round_trips(split, tmp_path, name):
    """C19 for every optimizer (cosine schedule; momentum and adamw also clip the gradient
    norm, which nests the optimizer's chain in one with ``clip_by_global_norm``'s
    ``EmptyState``, a node without leaves): the optimizer state restored into a freshly
    built run has the saved tree structure, the same type at every node (inner ones
    included), the same dtypes and values, and the run continues with the losses of an
    uninterrupted one, bit for bit."""
    assert set(MOMENT_STATE) == set(OPTIMIZERS)
    cfg = adam_config(num_steps=10, steps_per_call=5)
    cfg = dataclasses.replace(cfg, optim=SCHEMAS["optim"][name](
        learning_rate=cfg.optim.learning_rate, schedule=cfg.optim.schedule,
        clip_norm=CLIP_NORM[name]))
    chunks = run_chunks(build_run([cfg], [split]), [])
    first = next(chunks)
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(first.state, document={}, val_loss=1.0, wait=True)
    straight = np.concatenate([c.metrics[0]["train_loss"] for c in chunks])  # steps 5-9

    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        resumed_run = build_run([cfg], [split], checkpoints=checkpoints)
    saved, restored = jax.device_get((first.state.opt_state, resumed_run.state.opt_state))
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    assert _node_types(restored) == _node_types(saved)
    types = {t for _, t in _node_types(restored)}
    assert MOMENT_STATE[name] in types
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                            jax.tree.leaves(saved)):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    resumed = np.concatenate([c.metrics[0]["train_loss"] for c in run_chunks(resumed_run, [])])
    assert resumed.shape == straight.shape == (5, 1)
    np.testing.assert_array_equal(resumed, straight)  # bitwise


def test_C19_the_early_stopping_record_round_trips(split, tmp_path):
    """With early stopping on (patience 3), the state also holds each member's best
    validation loss, its step, its params and the evaluations since: checkpointed at
    step 60, where the fast member (lowest validation loss after step 39) has had one
    evaluation without improvement, and resumed, that member stops at the same step
    (99 = 39 + 3 x 20) and the run ends in the same state, every field bit for bit,
    as an uninterrupted one; the other member trains on."""
    base = Config(model=MlpModelConfig(hidden=[64, 64]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=AdamOptimConfig(schedule="constant"),
                  trainer=TrainerConfig(num_steps=120, steps_per_call=60, log_every_steps=20,
                                        eval_every_steps=20, patience=3, progress=False),
                  gradcheck=GradcheckConfig(every_steps=0))
    configs = [dataclasses.replace(base, optim=dataclasses.replace(base.optim, learning_rate=lr))
               for lr in (1e-4, 3e-2)]
    datasets = [split] * 2
    _, straight_state = _train(build_run(configs, datasets))
    np.testing.assert_array_equal(np.asarray(straight_state.early_stop_step), [-1, 99])
    np.testing.assert_array_equal(np.asarray(straight_state.best_step), [119, 39])

    chunk = next(run_chunks(build_run(configs, datasets), []))
    np.testing.assert_array_equal(np.asarray(chunk.state.evals_since_best), [0, 1])
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(chunk.state, document={}, val_loss=1.0, wait=True)
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        resumed_run = build_run(configs, datasets, checkpoints=checkpoints)
    assert jax.tree.structure(resumed_run.state) == jax.tree.structure(straight_state)
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed_run.state.best_params)),
                    jax.tree.leaves(jax.device_get(chunk.state.best_params))):
        np.testing.assert_array_equal(a, b)
    _, resumed_state = _train(resumed_run)
    for a, b in zip(*(jax.tree.leaves(jax.device_get(_saveable(s)))
                      for s in (resumed_state, straight_state))):
        np.testing.assert_array_equal(a, b)


def test_C20_keeping_the_best_never_deletes_the_latest(split, tmp_path):
    """C20: checkpoints at steps 1-4, step 4 with the worst validation loss, keeping 2:
    the latest (4) and the best (2) are kept, and a restore continues from step 4."""
    cfg = adam_config(num_steps=4, steps_per_call=1)
    run = build_run([cfg], [split])
    with Checkpoints(tmp_path / "ckpt", keep=1) as checkpoints:
        for chunk, val_loss in zip(run_chunks(run, []), [0.5, 0.2, 0.4, 0.9]):
            checkpoints.save(chunk.state, document={"step": chunk.end}, val_loss=val_loss)
        checkpoints.wait()
        assert checkpoints.steps() == [2, 4]
        assert checkpoints.latest_step() == 4 and checkpoints.best_step() == 2
        assert checkpoints.document(2) == {"step": 2}
    with Checkpoints(tmp_path / "ckpt", keep=1) as checkpoints:  # as a resumed process
        again = build_run([dataclasses.replace(cfg, trainer=dataclasses.replace(
            cfg.trainer, num_steps=6))], [split], checkpoints=checkpoints)
        assert again.start_step == 4 and again.chunk_ends == [5, 6]
        for chunk, val_loss in zip(run_chunks(again, []), [0.8, 0.7]):
            checkpoints.save(chunk.state, document={"step": chunk.end}, val_loss=val_loss)
        checkpoints.wait()
        # the best of the first process survives the second one's saves: its metric
        # was read back from disk
        assert checkpoints.steps() == [2, 6] and checkpoints.best_step() == 2


def test_a_checkpoint_of_other_members_is_refused(split, tmp_path):
    """A checkpoint restored into a state of another shape (a wider net) raises, instead
    of training from arrays that do not belong to it."""
    cfg = adam_config(num_steps=2, steps_per_call=1)
    chunk = next(run_chunks(build_run([cfg], [split]), []))
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(chunk.state, document={}, val_loss=1.0)
    wider = dataclasses.replace(cfg, model=MlpModelConfig(hidden=[16]))
    with Checkpoints(tmp_path / "ckpt") as checkpoints, pytest.raises(
        ValueError, match=r"does not fit .* \(saved \[\[1, 8\], .float32.\], expected \[\[1, 16\]"):
        build_run([wider], [split], checkpoints=checkpoints)
    with pytest.raises(FileNotFoundError), Checkpoints(tmp_path / "empty") as empty:
        build_run([cfg], [split], checkpoints=empty)


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        Checkpoints(tmp_path / "x", keep=0)
