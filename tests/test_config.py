"""Configuration: every experiment composes, validates and trains; typos are caught (C11)."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import RecordingTracker
from trainer.config import (CONF_DIR, ConfigError, check_overrides, experiment_names,
                            register_configs, to_config, validate)
from trainer.data import load_dataset
from trainer.loop import train_and_evaluate

EXPERIMENTS = ["diabetes", "digits", "gradcheck", "seed", "smoke", "tied-diabetes"]
TRAINING_EXPERIMENTS = [name for name in EXPERIMENTS if name != "gradcheck"]


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_shipped_experiments():
    assert experiment_names() == EXPERIMENTS


@pytest.mark.parametrize("name", TRAINING_EXPERIMENTS)
def test_every_experiment_composes_validates_and_trains(name):
    """Each experiment composes against the schema, passes validation and trains a few
    steps (shrunk, as lightning-hydra-template's tests do) to finite test metrics."""
    cfg = compose_cfg(f"+experiment={name}")
    validate(cfg)
    c = to_config(cfg)
    c = dataclasses.replace(c, trainer=dataclasses.replace(
        c.trainer, num_steps=20, steps_per_call=10, eval_every_steps=10, progress=False))
    dataset = load_dataset(c.data, seed=c.seed)
    result = train_and_evaluate(c, dataset, RecordingTracker())
    assert result.num_steps == 20
    assert all(v == v for v in result.test_metrics.values())  # no NaN


def test_gradcheck_experiment_only_changes_the_mode():
    c = to_config(compose_cfg("+experiment=gradcheck"))
    assert c.mode == "gradcheck"
    assert to_config(compose_cfg("+experiment=diabetes")).mode == "train"


def test_params_resolve_interpolations():
    """C03: interpolated values are resolved before they are logged."""
    cfg = compose_cfg("+experiment=smoke", "tracking.run_name=lr${optim.learning_rate}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["tracking"]["run_name"] == "lr0.01"


@pytest.mark.parametrize("overrides,message", [
    (["+experiment=smoke", "optim.learnin_rate=0.1"], "did you mean 'optim.learning_rate'"),
    (["+experiment=smoke", "+optim.learnin_rate=0.1"], "did you mean 'optim.learning_rate'"),
    (["+experiment=smoke", "+trainer.typo=1"], "unknown config key 'trainer.typo'"),
    (["experiment=diabetes"], "+experiment=diabetes"),
    (["+experiment=smoke", "trainer.num_steps=1.5"], "trainer.num_steps=1.5: expected an integer"),
    (["+experiment=nosuch"], "choose one of: diabetes, digits, gradcheck, seed, smoke, "
                              "tied-diabetes"),
    (["gradcheck.every_step=5"], "did you mean 'gradcheck.every_steps'"),
    (["gradcheck.fail_run=maybe"], "expected true or false"),
    (["+experiment=diabetse"], "did you mean 'diabetes'"),
    (["model=tide"], "did you mean 'tied'"),
    (["optim.learning_rate=fast"], "expected a number"),
    (["model.hidden=[8,x]"], "expected a list of an integer"),
    (["-m", "optim.learning_rate=0.1,oops"], "expected a number"),
    (["seedd=1"], "did you mean 'seed'"),
    (["data.target=y1"], "write a list: data.target=[y1]"),
    (["data.path=~/x.csv"], "Quote values"),
])
def test_c11_overrides_are_checked_before_hydra(overrides, message):
    """C11: typos, missing '+', wrong types and unknown experiments get one message
    naming the key and the fix."""
    with pytest.raises(ConfigError) as err:
        check_overrides([o for o in overrides if o != "-m"])
    assert message in str(err.value)


def test_c11_good_overrides_pass():
    check_overrides(["+experiment=smoke", "optim.learning_rate=0.1,0.2", "model.hidden=[4,4]",
                     "optim.clip_norm=null", "trainer.num_steps=10", "hydra.job.chdir=true",
                     "data.target=[a,b]", "tracking.uri=sqlite:///x.db", "model=tied"])


@pytest.mark.parametrize("overrides,message", [
    (["trainer.num_steps=0"], "trainer.num_steps=0: must be greater than 0"),
    (["data.batch_size=-4"], "data.batch_size=-4: must be greater than 0"),
    (["trainer.steps_per_call=0"], "trainer.steps_per_call=0"),
    (["optim.name=adamm"], "did you mean 'adam'"),
    (["model.tied_hidden=true", "model.hidden=[8,4]"], "equal hidden widths"),
    (["data.val_fraction=0.5", "data.test_fraction=0.45"], "at least 10%"),
    (["data=csv"], "data.path"),
    (["seed=-1"], "seed=-1: must be >= 0"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1.0: must be >= 0"),
    (["optim.momentum=1.5"], "optim.momentum=1.5: must lie in [0, 1)"),
    (["model.init_scale=-1"], "model.init_scale=-1.0: must be greater than 0"),
    (["optim.warmup_steps=5000"], "less than trainer.num_steps=60"),
    (["gradcheck.every_steps=-1"], "gradcheck.every_steps=-1: use 0 (off)"),
    (["gradcheck.rel_tol=0"], "gradcheck.rel_tol=0.0: must be greater than 0"),
    (["gradcheck.max_elements=0"], "gradcheck.max_elements=0: must be greater than 0"),
    (["mode=eval"], "mode='eval': choose one of train, gradcheck"),
])
def test_composed_config_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        validate(compose_cfg("+experiment=smoke", *overrides))
    assert message in str(err.value)


def test_seed_experiment_logs_the_notebooks_values_at_step_0():
    """+experiment=seed reproduces the notebook: step 0 logs loss 1.0354788 and gradient
    norm 0.6549523 (to 6 significant digits: relative error < 5e-7), then trains."""
    c = to_config(compose_cfg("+experiment=seed"))
    c = dataclasses.replace(c, trainer=dataclasses.replace(c.trainer, progress=False))
    tracker = RecordingTracker()
    result = train_and_evaluate(c, load_dataset(c.data, seed=c.seed), tracker)
    (step0_loss,) = [v for s, v in tracker.history("curves/train_loss") if s == 0]
    (step0_norm,) = [v for s, v in tracker.history("curves/grad_norm") if s == 0]
    assert abs(step0_loss - 1.0354788) / 1.0354788 < 5e-7
    assert abs(step0_norm - 0.6549523) / 0.6549523 < 5e-7
    assert result.num_params == 100 * 100
    assert tracker.history("curves/train_loss")[-1][1] < 0.9 * step0_loss
