"""Populations: members equal their lone runs, a diverging member fails alone, one
compilation for every member (C17), members validated, sharding over host devices;
end to end: a sweep is one parent and a child per point (C16), grouped by structure,
and a relaunch skips what finished and reruns what failed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import RecordingTracker, all_runs, cli_env, split_runs, store_client
from trainer.config import (CONF_DIR, SCHEMAS, Config, ConfigError, GradcheckConfig,
                            MlpModelConfig, TabularDataConfig, TrainerConfig, member_configs,
                            register_configs)
from trainer.data import load_dataset
from trainer.loop import train_and_evaluate, train_population
from trainer.optim import make_schedule

SMOKE = "+experiment=smoke"


def base_config(name: str = "adamw", **optim) -> Config:
    """The diabetes MLP with optimizer ``name`` (AdamW with decay 0.1 unless named)."""
    decay = {"weight_decay": 0.1} if name == "adamw" else {}
    return Config(model=MlpModelConfig(hidden=[8]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=SCHEMAS["optim"][name](**{"learning_rate": 3e-3, "schedule": "cosine",
                                                  **decay, **optim}),
                  trainer=TrainerConfig(num_steps=200, steps_per_call=50, log_every_steps=10,
                                        eval_every_steps=50, progress=False),
                  gradcheck=GradcheckConfig(every_steps=0))


def member(cfg: Config, *, seed: int, **optim) -> Config:
    return dataclasses.replace(cfg, seed=seed, optim=dataclasses.replace(cfg.optim, **optim))


@pytest.fixture(scope="module")
def splits():
    return {s: load_dataset(TabularDataConfig(kind="diabetes"), seed=s) for s in (0, 1)}


def test_a_member_equals_its_lone_run(splits):
    """Each member's curves, final params and test metrics equal those of the same point
    trained alone, to float32 rounding (batched and unbatched CPU kernels round
    differently: 1e-7 seen after 200 steps, so 1e-5 relative here); seeds give members
    their own split, init and shuffling."""
    base = base_config()
    members = [member(base, seed=0, learning_rate=3e-3), member(base, seed=1, learning_rate=1e-2),
               member(base, seed=0, learning_rate=1e-2)]
    trackers = [RecordingTracker() for _ in members]
    results = train_population(members, [splits[m.seed] for m in members], trackers)
    assert {r.compute["members"] for r in results} == {3}
    for m, result, tracker in zip(members, results, trackers):
        lone_tracker = RecordingTracker()
        lone = train_and_evaluate(m, splits[m.seed], lone_tracker)
        for name in ("curves/train_loss", "curves/val_loss", "curves/learning_rate",
                     "curves/grad_norm"):
            got, want = tracker.history(name), lone_tracker.history(name)
            assert [s for s, _ in got] == [s for s, _ in want], name
            np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5,
                                       atol=1e-7, err_msg=name)
        for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(lone.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert result.test_metrics["rmse"] == pytest.approx(lone.test_metrics["rmse"], rel=1e-5)
        assert result.baseline_metrics == lone.baseline_metrics
    # the members really differ: their own seeds and learning rates
    assert len({round(r.test_metrics["rmse"], 3) for r in results}) == 3


def test_a_diverging_member_fails_alone(splits):
    """A member whose loss becomes non-finite stops there (masked on the device): its
    points stop before that step and are all finite, it has no test metrics; the
    other member trains to the end as it would alone."""
    base = base_config(name="sgd", schedule="constant")
    members = [member(base, seed=0, learning_rate=0.01), member(base, seed=0, learning_rate=1e6)]
    trackers = [RecordingTracker() for _ in members]
    good, bad = train_population(members, [splits[0]] * 2, trackers)
    assert good.failed_step is None and good.test_metrics["rmse"] < 100
    assert bad.failed_step is not None and bad.failed_step < 200 and not bad.test_metrics
    assert trackers[1].tags["diverged_at_step"] == str(bad.failed_step)
    assert all(s < bad.failed_step for _, _, s in trackers[1].points
               if _ in ("curves/train_loss", "curves/val_loss"))
    assert all(np.isfinite(v) for _, v, _ in trackers[1].points)
    lone = train_and_evaluate(members[0], splits[0], RecordingTracker())
    assert good.test_metrics["rmse"] == pytest.approx(lone.test_metrics["rmse"], rel=1e-5)


def test_c17_one_compilation_for_eight_points_each_with_its_own_schedule(splits):
    """C17: 4 learning rates x 2 weight decays train as one program compiled once, and
    each member's logged learning rate per step is its own cosine schedule."""
    base = base_config()
    members = [member(base, seed=0, learning_rate=lr, weight_decay=wd)
               for lr in (1e-3, 3e-3, 1e-2, 3e-2) for wd in (0.0, 0.1)]
    trackers = [RecordingTracker() for _ in members]
    results = train_population(members, [splits[0]] * 8, trackers)
    assert {r.compute["num_compiles"] for r in results} == {1}
    schedule = make_schedule(base.optim, base.trainer.num_steps)
    for m, tracker in zip(members, trackers):
        logged = tracker.history("curves/learning_rate")
        assert len(logged) == 21  # steps 0, 10, ..., 190 and the last, 199
        want = [float(schedule(m.optim.learning_rate, 0.0)(s)) for s, _ in logged]
        np.testing.assert_allclose([v for _, v in logged], want, rtol=1e-5)  # float32 cosine
    # weight decay acts per member: same rate, different decay, different params
    a, b = results[0].params, results[1].params
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compose_with(*overrides: str):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_members_are_checked_like_configs_of_their_own():
    """A member may set only vmappable keys, each type- and range-checked, with the
    member named; its config is the base with its values and no population."""
    cfg = compose_with(SMOKE, "population.members=[{seed:3,optim.learning_rate:0.5},{seed:4}]")
    (v0, m0), (v1, m1) = member_configs(cfg)
    assert (m0.seed, m0.optim.learning_rate, m1.seed, m1.optim.learning_rate) == (3, 0.5, 4, 0.01)
    assert list(m0.population.members) == [] and v0 == {"seed": 3, "optim.learning_rate": 0.5}
    for members, message in [
            ("[{model.hidden:[4]}]", r"members\[0\]: 'model.hidden' cannot differ.*separate "
                                     r"populations"),
            ("[{seed:0},{optim.learning_rat:0.1}]", r"members\[1\].*did you mean "
                                                    r"'optim.learning_rate'"),
            ("[{seed:-1}]", r"members\[0\]: seed=-1"),
            ("[{optim.learning_rate:fast}]", r"members\[0\].optim.learning_rate=.*expected a number"),
            # vmappable, but only for the optimizer that has it (the smoke run uses Adam)
            ("[{seed:0},{optim.momentum:0.5}]", r"members\[1\]: optim.momentum applies to "
                                                r"optim=momentum \(this run uses optim=adam\)"),
            ("[{optim.weight_decay:-1.0}]", r"members\[0\]: optim.weight_decay applies to "
                                            r"optim=adamw")]:
        with pytest.raises(ConfigError, match=message):
            member_configs(compose_with(SMOKE, f"population.members={members}"))
    cfg = compose_with(SMOKE, "optim=momentum", "population.members=[{optim.momentum:0.5},{}]")
    (_, m0), (_, m1) = member_configs(cfg)
    assert (m0.optim.momentum, m1.optim.momentum) == (0.5, 0.9)
    with pytest.raises(ConfigError, match=r"members\[0\]: optim.momentum=1.5: must lie in"):
        member_configs(compose_with(SMOKE, "optim=momentum",
                                    "population.members=[{optim.momentum:1.5}]"))


SHARDED = r"""
import json, dataclasses, sys
from trainer.population import set_host_devices
set_host_devices(2)
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import RecordingTracker
from test_population import base_config, member
from trainer.data import load_dataset
from trainer.loop import build_run, train_population
base = base_config()
ms = [member(base, seed=s, learning_rate=lr) for s, lr in ((0, 3e-3), (1, 1e-2), (0, 1e-2))]
ds = {s: load_dataset(base.data, seed=s) for s in (0, 1)}
run = build_run(ms, [ds[m.seed] for m in ms])
shards = {str(sh.device) for sh in jax.tree.leaves(run.state.params)[0].addressable_shards}
rs = train_population(ms, [ds[m.seed] for m in ms], [RecordingTracker() for _ in ms])
print(json.dumps({"devices": jax.device_count(), "used": run.layout.num_devices,
                  "size": run.layout.size, "shards": sorted(shards),
                  "rmse": [r.test_metrics["rmse"] for r in rs],
                  "compiles": rs[0].compute["num_compiles"]}))
"""


@pytest.mark.slow
def test_members_are_sharded_over_two_host_devices_and_padded(splits, tmp_path):
    """In a process started with two host devices, three members are padded to four and
    split two per device; the results equal those of the same members on one device."""
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                          env=cli_env(), timeout=600, cwd=str(CONF_DIR.parents[1]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["devices"], out["used"], out["size"], out["compiles"]) == (2, 2, 4, 1)
    assert len(out["shards"]) == 2
    base = base_config()
    ms = [member(base, seed=s, learning_rate=lr) for s, lr in ((0, 3e-3), (1, 1e-2), (0, 1e-2))]
    here = train_population(ms, [splits[m.seed] for m in ms], [RecordingTracker() for _ in ms])
    np.testing.assert_allclose(out["rmse"], [r.test_metrics["rmse"] for r in here], rtol=1e-5)


def run_cli_in(cwd, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


@pytest.mark.slow
def test_c16_sweep_is_one_parent_with_a_child_per_seed(tmp_path):
    """C16: `-m +experiment=smoke seed=0,1,2,3` trains one population: one parent and four
    children; each child's curves are that seed's own (equal to a lone run of it); the
    parent names the best seed by validation loss and shows the four together."""
    register = "tracking.register_model=smoke-best"
    sweep = run_cli_in(tmp_path, "-m", SMOKE, "seed=0,1,2,3", register)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert len(list(tmp_path.glob("multirun/*/*/0/.hydra"))) == 1  # one job
    alone = run_cli_in(tmp_path, SMOKE, "seed=2", register)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    client = store_client(tmp_path)
    parents, runs = split_runs(all_runs(client))
    (parent,) = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    (lone,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in children + [parent, lone])
    for child in children:  # what a lone run holds
        assert {"test/rmse", "test/baseline_rmse", "curves/val_loss", "curves/train_loss",
                "xla/num_compiles"} <= set(child.data.metrics)
        assert child.data.metrics["xla/num_compiles"] == 1
        assert child.data.tags["population.size"] == "4"
        assert child.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "training_curves.png", "final_params"} <= names
    (seed2,) = [r for r in children if r.data.params["seed"] == "2"]
    assert seed2.data.params == lone.data.params
    assert seed2.data.tags["config_hash"] == lone.data.tags["config_hash"]
    for key in ("curves/train_loss", "curves/val_loss"):
        got, want = history(client, seed2.info.run_id, key), history(client, lone.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)
    best = min(children, key=lambda r: r.data.metrics["curves/val_loss"])
    m = parent.data.metrics
    assert parent.data.tags["best.run_id"] == best.info.run_id
    assert parent.data.params["best.seed"] == best.data.params["seed"]
    assert m["best/val_loss"] == best.data.metrics["curves/val_loss"]
    assert m["best/test_rmse"] == best.data.metrics["test/rmse"]
    assert m["best/test_baseline_rmse"] == best.data.metrics["test/baseline_rmse"]
    assert m["members"] == 4 and m["failed_members"] == 0 and m["groups"] == 1
    finals = [r.data.metrics["test/rmse"] for r in children]
    assert m["final/test_rmse/min"] == min(finals) and m["final/test_rmse/max"] == max(finals)
    assert m["final/test_rmse/median"] == pytest.approx(float(np.median(finals)))
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"members.csv", "sweep_curves.png", "sweep_val_loss.png"} <= names
    # each child carries its own model and headline; the parent points to (and registered)
    # the best one; names are short, what differs first, and unique
    uris = {r.data.tags["model_uri"] for r in children}
    assert len(uris) == 4 and lone.data.tags["model_uri"] not in uris
    assert parent.data.tags["best.model_uri"] == best.data.tags["model_uri"]
    assert parent.data.tags["mlflow.note.content"].startswith(
        f"best of 4 members: {best.info.run_name}, validation loss ")
    assert parent.data.tags["best.registered_version"] == "smoke-best version 1"
    assert client.get_model_version("smoke-best", "1").run_id == best.info.run_id
    assert client.get_model_version("smoke-best", "2").run_id == lone.info.run_id
    for child in children:
        assert child.info.run_name.startswith(f"seed{child.data.params['seed']}-smoke-")
        rmse = child.data.metrics["test/rmse"]
        assert child.data.tags["mlflow.note.content"].startswith(f"test RMSE {rmse:.4g} vs ")
    assert lone.info.run_name.startswith("seed2-smoke-")
    assert lone.info.run_name != seed2.info.run_name


@pytest.mark.slow
def test_sweep_makes_one_program_per_width(tmp_path):
    """A sweep over model.hidden and the learning rate makes one population job per width,
    each compiled once for its two learning rates; one parent over all four points."""
    proc = run_cli_in(tmp_path, "-m", SMOKE, "model.hidden=[4],[6]",
                      "optim.learning_rate=0.01,0.02", "gradcheck.every_steps=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(tmp_path.glob("multirun/*/*/*/.hydra"))) == 2
    parents, runs = split_runs(all_runs(store_client(tmp_path)))
    (parent,) = parents
    assert len(runs) == 4 and parent.data.metrics["groups"] == 2
    by_width = {}
    for r in runs:
        by_width.setdefault(r.data.params["model.hidden"], []).append(r)
        assert r.data.metrics["xla/num_compiles"] == 1
        assert r.data.tags["population.size"] == "2"
    assert sorted(by_width) == ["[4]", "[6]"]
    for group in by_width.values():
        assert sorted(r.data.params["optim.learning_rate"] for r in group) == ["0.01", "0.02"]
        assert len({r.data.tags["hydra.output_dir"] for r in group}) == 1


@pytest.mark.slow
def test_relaunch_skips_finished_points_and_reruns_failed_ones(tmp_path):
    """Relaunching a sweep skips the point that FINISHED (saying so), reruns the one that
    failed; population.rerun=true runs both again."""
    args = ("-m", SMOKE, "optim=sgd", "optim.learning_rate=1e6,0.01", "gradcheck.every_steps=0")
    first = run_cli_in(tmp_path, *args)
    assert first.returncode == 1, first.stdout + first.stderr
    again = run_cli_in(tmp_path, *args)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "skipped 1 of 2 points" in again.stdout
    forced = run_cli_in(tmp_path, *args, "population.rerun=true")
    client = store_client(tmp_path)
    parents, runs = split_runs(all_runs(client))
    assert len(parents) == 3
    by_parent = {p.info.run_id: [r for r in runs if r.data.tags["mlflow.parentRunId"]
                                 == p.info.run_id] for p in parents}
    counts = sorted(len(v) for v in by_parent.values())
    assert counts == [1, 2, 2], counts
    assert forced.returncode == 1
    for runs_of in by_parent.values():
        for r in runs_of:
            want = "FAILED" if r.data.params["optim.learning_rate"] == "1000000.0" else "FINISHED"
            assert r.info.status == want
    (second,) = [p for p in parents if len(by_parent[p.info.run_id]) == 1]
    assert second.data.metrics["skipped_members"] == 1
    assert any(k.startswith("skipped.") for k in second.data.tags)


def test_C24_a_member_whose_finite_loss_explodes_fails_alone(splits):
    """C24: Adam at 1e6 drives the loss to ~1e12, finite, so the non-finite mask never
    fires; the divergence rule (trainer.divergence_factor, on the device) stops that
    member at its first step above the limit: no point above it, no test metrics, an
    error naming the rule and a smaller rate; the other member trains on as alone."""
    base = base_config(name="adam", schedule="constant")
    members = [member(base, seed=0, learning_rate=3e-3), member(base, seed=0, learning_rate=1e6)]
    trackers = [RecordingTracker() for _ in members]
    good, bad = train_population(members, [splits[0]] * 2, trackers)
    assert good.failed_step is None and good.error is None and good.test_metrics["rmse"] < 100
    assert bad.failed_step is not None and not bad.test_metrics and bad.nonfinite_steps == 0
    assert "divergence_factor" in str(bad.error) and "smaller" in str(bad.error)
    assert trackers[1].tags["diverged_at_step"] == str(bad.failed_step)
    losses = [(s, v) for n, v, s in trackers[1].points
              if n in ("curves/train_loss", "curves/val_loss")]
    assert losses and all(s < bad.failed_step for s, _ in losses)
    first = trackers[1].history("curves/train_loss")[0][1]
    assert max(v for _, v in losses) < 1000 * first * 1.5  # the limit, from the split's loss
    lone = train_and_evaluate(members[0], splits[0], RecordingTracker())
    assert good.test_metrics["rmse"] == pytest.approx(lone.test_metrics["rmse"], rel=1e-5)
    off = [dataclasses.replace(members[1], trainer=dataclasses.replace(
        members[1].trainer, divergence_factor=None))]
    (unchecked,) = train_population(off, [splits[0]], [RecordingTracker()])
    assert unchecked.failed_step is None and unchecked.nonfinite_steps == 0, \
        "the loss must stay finite, or this test checks the non-finite mask instead"
    assert unchecked.test_metrics["rmse"] > 1e3  # what was reported before the rule


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_issue13_item7_linear_and_exponential_schedules_per_member(splits, schedule):
    """Issue 13.7: optim.schedule=linear and exponential are optax's linear_schedule and
    exponential_decay with their documented parameters; each member's rate and final
    fraction stay injected arrays: two members, one compilation, each logging its own
    schedule."""
    import optax

    shape = ({"transition_begin": 20, "transition_steps": 150} if schedule == "linear" else
             {"transition_begin": 20, "transition_steps": 50, "decay_rate": 0.5,
              "staircase": True})
    base = base_config(name="adam", schedule=schedule, **shape)
    members = [member(base, seed=0, learning_rate=1e-2, final_lr_fraction=0.1),
               member(base, seed=0, learning_rate=3e-3, final_lr_fraction=0.3)]
    trackers = [RecordingTracker() for _ in members]
    results = train_population(members, [splits[0]] * 2, trackers)
    assert {r.compute["num_compiles"] for r in results} == {1}
    for m, tracker, result in zip(members, trackers, results):
        lr, end = m.optim.learning_rate, m.optim.learning_rate * m.optim.final_lr_fraction
        if schedule == "linear":
            reference = optax.linear_schedule(lr, end, transition_steps=150, transition_begin=20)
        else:
            reference = optax.exponential_decay(lr, transition_steps=50, decay_rate=0.5,
                                                transition_begin=20, staircase=True,
                                                end_value=end)
        logged = tracker.history("curves/learning_rate")
        np.testing.assert_allclose([v for _, v in logged],
                                   [float(reference(s)) for s, _ in logged], rtol=1e-5)
        # exponential at step 199: three whole halvings, floored at the final fraction
        last = end if schedule == "linear" else max(lr * 0.5 ** 3, end)
        assert logged[0][1] == pytest.approx(lr) and logged[-1][1] == pytest.approx(last)
        assert result.test_metrics["rmse"] < 100


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.schedule=cosine", "optim.transition_steps=10"], "optim.schedule=linear"),
    (["optim.schedule=exponential", "optim.decay_rate=0"], "optim.decay_rate=0"),
    (["optim.schedule=linear", "optim.transition_begin=60"], "less than trainer.num_steps"),
])
def test_issue13_item7_schedule_keys_are_checked(overrides, message):
    from trainer.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_with(SMOKE, *overrides))


def test_issue13_item4_deep_models_are_drawn_eagerly_with_the_same_bits(monkeypatch):
    """Issue 13.4: a deep stack spent minutes compiling its init as one program (one
    draw per layer; measured here: 100 s jitted, 8.8 s eager for 50 layers of width 4).
    Past JIT_INIT_MAX_LEAVES arrays the init runs eagerly, and draws the same params."""
    from trainer import population
    from trainer.models import make_model_spec

    spec = make_model_spec(MlpModelConfig(hidden=[8, 8]), in_features=3, out_features=1)
    _, jitted = population.init_params(spec, [0, 1], [1.0, 1.0])
    monkeypatch.setattr(population, "JIT_INIT_MAX_LEAVES", 2)
    _, eager = population.init_params(spec, [0, 1], [1.0, 1.0])
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(a, b)
