"""What a resumed run may change (``config.resume_config``, case C21): only a larger
``trainer.num_steps``; every other difference is refused before any work, naming the keys."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import CONF_DIR, ConfigError, register_configs, resume_config


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def stored() -> dict:
    """The resolved config of a run started as ``+experiment=smoke optim.learning_rate=0.02``."""
    return OmegaConf.to_container(composed("+experiment=smoke", "optim.learning_rate=0.02"),
                                  resolve=True)


def test_resume_alone_and_the_run_s_own_command_pass(stored):
    """What is typed is compared, nothing else: the run's experiment alone (as for
    ``resume=latest``) passes and trains the run's own values."""
    for overrides in (["resume=abc"], ["+experiment=smoke", "resume=abc"],
                      ["+experiment=smoke", "optim.learning_rate=0.02", "resume=abc"]):
        cfg = resume_config(stored, overrides, composed(*overrides), experiment="smoke")
        assert cfg.optim.learning_rate == 0.02 and cfg.trainer.num_steps == 60
        assert cfg.resume == "abc"


def test_only_a_larger_step_count_is_taken(stored):
    overrides = ["resume=abc", "trainer.num_steps=200"]
    cfg = resume_config(stored, overrides, composed(*overrides), experiment="smoke")
    assert cfg.trainer.num_steps == 200
    overrides = ["resume=abc", "trainer.num_steps=30"]
    with pytest.raises(ConfigError, match="num_steps=30: the run was set to 60"):
        resume_config(stored, overrides, composed(*overrides), experiment="smoke")


@pytest.mark.parametrize(("overrides", "named"), [
    (["resume=abc", "optim.learning_rate=0.5", "seed=3"], "optim.learning_rate, seed"),
    (["+experiment=diabetes", "optim.learning_rate=0.02", "resume=abc"], "+experiment"),
    (["resume=abc", "optim=sgd"], "optim.learning_rate, optim.name"),  # sgd.yaml: its own rate
])
def test_other_changes_are_refused_naming_the_keys(stored, overrides, named):
    with pytest.raises(ConfigError, match="differ from it: " + named.replace("+", r"\+")):
        resume_config(stored, overrides, composed(*overrides), experiment="smoke")


def test_a_run_recorded_before_the_per_kind_schemas_resumes(stored):
    """Runs stored every key of a group, whatever the kind (``model.width`` for an MLP,
    ``optim.momentum`` for Adam): those keys are dropped, the run's own values kept."""
    old = OmegaConf.to_container(OmegaConf.create(stored))
    old["model"].update(width=64)
    old["data"].update(path=None, target=[], features=None, task="auto", seed_width=100,
                       seed_x_key=1, seed_y_key=2)
    old["optim"].update(momentum=0.9, weight_decay=1e-4)
    cfg = resume_config(old, ["resume=abc"], composed("resume=abc"), experiment="smoke")
    assert "width" not in cfg.model and "momentum" not in cfg.optim and "path" not in cfg.data
    assert cfg.optim.learning_rate == 0.02 and list(cfg.model.hidden) == [8]
    assert OmegaConf.to_container(cfg, resolve=True) == {**stored, "resume": "abc"}
    old["model"]["widht"] = 3  # a key of no kind is still refused
    with pytest.raises(ConfigError, match="widht"):
        resume_config(old, ["resume=abc"], composed("resume=abc"), experiment="smoke")


def test_switching_the_optimizer_names_its_keys(stored):
    overrides = ["resume=abc", "optim=momentum"]
    with pytest.raises(ConfigError, match="optim.learning_rate, optim.momentum, optim.name"):
        resume_config(stored, overrides, composed(*overrides), experiment="smoke")
