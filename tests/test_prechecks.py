"""Bad input is refused before any MLflow run exists (issues 13 and 14).

In-process tests call the pre-check the CLI runs (``precheck.check_command``, which
composes every job's config with Hydra's loader and validates it; ``check_memory``;
``tracking.check_store_uri``); a few slow tests run the real CLI in a subprocess and
check the exit code, the one-line message and that no store was created.
"""

from __future__ import annotations

import pytest

from conftest import cli_env
from trainer.config import INT_MAX, SEED_MAX, ConfigError, check_overrides
from trainer.precheck import check_command, check_memory, estimate_bytes, job_config

SMOKE = "+experiment=smoke"


def refused(*overrides: str, multirun: bool = False) -> str:
    with pytest.raises(ConfigError) as err:
        check_command(list(overrides), multirun=multirun)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- issue 13 item 3.2: integers past what the device takes -----------------------------------

@pytest.mark.parametrize("override", [
    "trainer.num_steps=2147483648", "trainer.log_every_steps=99999999999999999999",
    "trainer.eval_every_steps=99999999999999999999", "seed=4294967296", "seed=4294967295",
    "model.hidden=[99999999999999999999]",
])
def test_issue13_item3_2_integers_past_int32_are_refused(override):
    key = override.split("=")[0]
    message = refused(SMOKE, override)
    assert message.startswith(f"{key}=") and "must" in message
    assert str(SEED_MAX if key == "seed" else INT_MAX) in message


@pytest.mark.parametrize("override", ["data.seed_width", "data.seed_x_key", "data.seed_y_key"])
def test_issue13_item3_2_seed_data_keys_past_int32_are_refused(override):
    assert refused("+experiment=seed", f"{override}=99999999999999999999").startswith(override)


def test_issue13_item3_2_tied_width_past_int32_is_refused():
    assert refused("+experiment=tied-diabetes",
                   "model.width=99999999999999999999").startswith("model.width=")


def test_issue14_item11_every_derived_seed_stays_in_range():
    """The largest seed the schema takes splits the data (scikit-learn draws a second split
    with seed + 1, which must stay below 2**32) and seeds JAX's int32 keys; one more is refused."""
    from trainer.config import to_config
    from trainer.data import load_dataset

    (job,) = check_command([SMOKE, f"seed={SEED_MAX}"])
    c = to_config(job_config(job.cfg))
    dataset = load_dataset(c.data, seed=c.seed)
    assert dataset.x_train.shape[0] > 0
    import jax

    # the members' seeds reach compiled code as an int32 array (loop.py, population.py)
    keys = jax.jit(jax.vmap(jax.random.key))(jax.numpy.asarray([c.seed, 0]))
    assert keys.shape == (2,)
    assert "must lie in [0, 2147483646]" in refused(SMOKE, f"seed={SEED_MAX + 1}")


# --- issue 13 item 3.3: sizes that cannot fit in memory --------------------------------------

@pytest.mark.parametrize(("overrides", "part"), [
    (("+experiment=tied-diabetes", "model.width=1000000"), "training"),
    ((SMOKE, "model.hidden=[100000,100000]"), "training"),
    ((SMOKE, "gradcheck.num_directions=100000000"), "gradient check"),
])
def test_issue13_item3_3_jobs_past_the_memory_are_refused(overrides, part):
    import jax

    (job,) = check_command(list(overrides))
    with pytest.raises(ConfigError) as err:
        check_memory(job_config(job.cfg), jax.devices())
    assert f"the {part} of this job needs at least" in str(err.value)
    assert "GiB" in str(err.value) and "reduce" in str(err.value)


def test_issue13_item3_3_estimate_matches_the_failed_allocation():
    """The issue's gradient check failed allocating 72.3 GiB: (1e8 directions, 97 params)
    float64; the estimate gives that figure, and the smoke run itself passes."""
    import jax

    (job,) = check_command([SMOKE, "gradcheck.num_directions=100000000"])
    assert estimate_bytes(job_config(job.cfg))["gradcheck"] / 2**30 == \
        pytest.approx(72.27, abs=0.01)
    (small,) = check_command([SMOKE])
    check_memory(job_config(small.cfg), jax.devices())


# --- issue 13 item 3.4: Hydra's reports become one line, before anything runs -----------------

@pytest.mark.parametrize(("overrides", "expected"), [
    (("++model=tied",), "Hydra cannot compose the config"),
    (("data.batch_size=10,20",), "add -m"),
    (("+experiment=smoke,digits",), "add -m"),
    (("hydra.nope=1",), "hydra.nope is not a Hydra setting"),
    (("seed=${oc.env:HOME}",), "seed: "),
    (("seed=${nonexistent}",), "Interpolation key 'nonexistent' not found"),
    (("seed=${oc.env:NOPE_NOT_SET}",), "NOPE_NOT_SET"),
    (("model=tied", "model.width=${model.width}"), "model.width: Recursive interpolation"),
    (("seed=${oc.decode:'1+1'}",), "seed: "),
    (("seed=glob(*)",), "glob(...) picks options of a config group"),
    (("hydra.run.dir=/proc/nope",), "hydra.run.dir=/proc/nope: cannot create the output folder"),
])
def test_issue13_item3_4_hydra_errors_are_one_line(overrides, expected):
    assert expected in refused(*overrides)


def test_issue13_item3_4_config_name_is_refused():
    with pytest.raises(ConfigError, match="--config-name=nope"):
        check_command([SMOKE], config_name="nope")


@pytest.mark.parametrize(("overrides", "expected"), [
    (("seed=choice(0,abc)",), "seed='abc': expected an integer"),
    (("optim.learning_rate=0.01,-1",),
     "sweep point 'optim.learning_rate=-1' (one of 2): optim.learning_rate=-1.0: must be"),
    (("seed=4294967295,0",), "sweep point 'seed=4294967295' (one of 2): seed=4294967295: must"),
    (("seed=0,1", "optim=momentum", "optim.momentum=0.5,1.5"),
     "'optim=momentum seed=0 optim.momentum=1.5' (one of 4): optim.momentum=1.5: must lie in"),
    ((SMOKE, "optim=sgd,adamw", "optim.weight_decay=0.1,nan"), "optim.weight_decay"),
])
def test_issue13_item3_4_sweep_points_are_checked_and_named(overrides, expected):
    assert expected in refused(*overrides, multirun=True)


def test_issue13_item3_4_valid_sweep_gives_one_job_per_population():
    jobs = check_command([SMOKE, "seed=0,1,2", "optim=sgd,adam"], multirun=True)
    assert sorted((j.cfg.optim.name, j.points, j.num_members) for j in jobs) == \
        [("adam", 3, 3), ("sgd", 3, 3)]
    basic = check_command([SMOKE, "seed=0,1", "hydra/sweeper=basic"], multirun=True)
    assert [(j.points, j.num_members) for j in basic] == [(2, 1)]


def test_issue13_item3_3_population_memory_counts_its_members():
    """A population trains its members at once: a sweep of many members of a model that
    fits alone is refused with the members' count."""
    import jax
    import psutil

    wide = "model.hidden=[20000,20000]"  # 400M params: ~9 GiB per member with Adam
    (alone,) = check_command([SMOKE, wide])
    per_member = estimate_bytes(job_config(alone.cfg))["train"]
    members = int(psutil.virtual_memory().total // per_member) + 1
    (job,) = check_command([SMOKE, wide, f"seed=range({members})", "gradcheck.every_steps=0"],
                           multirun=True)
    assert job.num_members == members
    with pytest.raises(ConfigError, match=f"{members} member"):
        check_memory(job_config(job.cfg), jax.devices(), num_members=job.num_members)


# --- issue 13 item 3.5: store URIs and experiment names ---------------------------------------

@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite://", "in-memory"), ("sqlite:///:memory:", "in-memory"), ("sqlite:///", "in-memory"),
    ("sqlite:///{tmp}", "is a folder"),
])
def test_issue13_item3_5_store_uris_that_keep_nothing_are_refused(uri, expected, tmp_path):
    message = refused(SMOKE, f"tracking.uri={uri.format(tmp=tmp_path)}")
    assert expected in message and "sqlite:///" in message


def test_issue13_item3_5_long_experiment_name_is_refused():
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    from trainer.tracking import MAX_EXPERIMENT_NAME_LENGTH as ours

    assert ours == MAX_EXPERIMENT_NAME_LENGTH
    assert "600 characters" in refused(SMOKE, "tracking.experiment_name=" + "x" * 600)
    check_command([SMOKE, "tracking.experiment_name=" + "x" * 500])


# --- issue 14 item 10: non-finite and huge hyperparameters ---------------------------------------

@pytest.mark.parametrize("override", [
    "optim.learning_rate=nan", "optim.weight_decay=nan", "optim.weight_decay=inf",
    "optim.weight_decay=1e30", "optim.clip_norm=nan", "model.init_scale=nan",
    "model.init_scale=inf", "model.init_scale=1e30", "gradcheck.rel_tol=nan",
    "gradcheck.rel_tol=inf",
])
def test_issue14_item10_nonfinite_and_huge_floats_are_refused(override):
    key = override.split("=")[0]
    extra = ("optim=adamw",) if "weight_decay" in key else ()
    message = refused(SMOKE, *extra, override)
    assert message.startswith(f"{key}=")
    assert any(s in message for s in ("finite", "at most", "greater than 0"))


# --- issue 14 item 13: experiment names stay labels -------------------------------------------

def test_issue14_item13_experiment_names_cannot_move_artifacts(tmp_path):
    from trainer.tracking import get_or_create_experiment, open_store_here, resolve_store

    launch = tmp_path / "launch"
    launch.mkdir()
    store = resolve_store(None, launch)
    client = open_store_here(store)
    root = launch / "mlruns" / "artifacts"
    for name in ("../../../escaped_exp", "a#b", "plain-name"):
        experiment_id = get_or_create_experiment(client, store, name)
        run = client.create_run(experiment_id)
        client.log_text(run.info.run_id, name, "note.txt")
        client.set_terminated(run.info.run_id)
        (note,) = [p for p in root.rglob("note.txt") if p.read_text() == name]
        assert note.resolve().is_relative_to(root.resolve()), note
        assert client.get_experiment(experiment_id).name == name
    assert (root / "plain-name").is_dir()
    assert not (tmp_path / "escaped_exp").exists() and not list(tmp_path.glob("escaped*"))


# --- issue 14 item 15: Hydra callbacks ------------------------------------------------------------

@pytest.mark.parametrize("override", ["+hydra.callbacks.x._target_=os.makedirs",
                                      "hydra.launcher._target_=os.system", "hydra.job.env_set.X=1"])
def test_issue14_item15_hydra_keys_outside_the_allowlist_are_refused(override):
    with pytest.raises(ConfigError, match="_target_|not a Hydra setting"):
        check_overrides([SMOKE, override])


def test_issue14_item15_documented_hydra_keys_pass():
    check_overrides([SMOKE, "hydra.job.chdir=true", "hydra.run.dir=out", "hydra.sweep.dir=m",
                     "hydra.launcher.n_jobs=2", "hydra/launcher=processes", "hydra.verbose=true",
                     "hydra/job_logging=disabled", "hydra.job_logging.root.level=DEBUG"])


# --- the CLI end to end: exit 2, one line, no run --------------------------------------------------

def assert_refused_before_any_run(proc, launch, expected: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout + err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err, err
    assert 0 < len(err.strip().splitlines()) <= 3, err
    assert expected in err, err
    assert not list(launch.rglob("mlflow.db")), "a store was created"


@pytest.mark.slow
@pytest.mark.parametrize(("env", "expected"), [
    ({"JAX_PLATFORMS": "nope"}, "JAX_PLATFORMS=nope"),
    ({"JAX_PLATFORMS": "cuda"}, "JAX_PLATFORMS=cuda"),
    ({"XLA_FLAGS": "--xla_nonexistent_flag=1"}, "--xla_nonexistent_flag"),
    ({"JAX_DEFAULT_MATMUL_PRECISION": "garbage"}, "JAX_DEFAULT_MATMUL_PRECISION"),
], ids=["unknown-platform", "no-gpu", "unknown-xla-flag", "bad-jax-setting"])
def test_issue13_item2_backend_problems_stop_before_any_run(run_cli, tmp_path, env, expected):
    """13.2: a backend that cannot start (or a flag that would abort XLA) exits 2 with one
    message, and no run (none left RUNNING, none FAILED) exists."""
    proc = run_cli(SMOKE, env=cli_env(**env))
    assert_refused_before_any_run(proc, tmp_path, expected)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "expected"), [
    (("-m", SMOKE, "seed=4294967295,0"), "sweep point '+experiment=smoke seed=4294967295'"),
    ((SMOKE, "tracking.uri=sqlite://"), "in-memory"),
    ((SMOKE, "model.hidden=[100000,100000]"), "the training of this job needs at least"),
    # Hydra's argparse took this one: its usage text and "unrecognized arguments" (corpus)
    ((SMOKE, "-m", "seed=0,1"), "put -m before them: python -m trainer -m +experiment=smoke"),
    ((SMOKE, "--nope"), "unrecognized arguments --nope"),
], ids=["sweep-point", "in-memory-store", "memory", "flag-after-overrides", "unknown-flag"])
def test_issue13_item3_cli_refuses_before_any_run(run_cli, tmp_path, args, expected):
    proc = run_cli(*args)
    assert_refused_before_any_run(proc, tmp_path, expected)
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "mlruns").exists()
