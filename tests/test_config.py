"""Configuration: every experiment composes, validates and trains; typos are caught (C11)."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import RecordingTracker
from trainer.config import (CONF_DIR, SCHEMAS, AdamOptimConfig, AdamWOptimConfig, Config,
                            ConfigError, CsvDataConfig, MlpModelConfig, ModelConfig,
                            MomentumOptimConfig, SeedDataConfig, SgdOptimConfig,
                            TabularDataConfig, TiedModelConfig,
                            check_overrides, experiment_names, group_options, logged_config,
                            register_configs, to_config, validate)
from trainer.data import load_dataset
from trainer.loop import train_and_evaluate
from trainer.tracking import flatten_config

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


@pytest.mark.parametrize("overrides", [
    ["+experiment=smoke", "optim.learning_rate=0.1,0.2", "model.hidden=[4,4]",
     "optim.clip_norm=null", "trainer.num_steps=10", "hydra.job.chdir=true",
     "tracking.uri=sqlite:///x.db"],
    ["data=csv", "data.path=x.csv", "data.target=[a,b]", "model=tied", "model.width=8"],
    ["+experiment=seed", "model.width=8", "data.seed_width=8", "data.batch_size=1"],
    ["+experiment=diabetes", "optim.weight_decay=0.01,0.1"],
    ["optim=momentum", "optim.momentum=0.5", "model=mlp", "model.tied_hidden=true"],
    ["+experiment=smoke", "optim=sgd,momentum"],  # smoke sets no optimizer's own key
    ["-m", "+experiment=smoke", "optim=glob(*)", "data=glob(d*)"],
    ["+experiment=tied-diabetes", "data=seed,digits", "model=tied"],
])
def test_c11_good_overrides_pass(overrides):
    check_overrides([o for o in overrides if o != "-m"])


@pytest.mark.parametrize("overrides,message", [
    (["data.path=x.csv", "data.target=[y]"],
     "data.path applies to data=csv (this run uses data=diabetes)"),
    (["+experiment=smoke", "data.target=[y]"],
     "data.target applies to data=csv (this run uses data=diabetes)"),
    (["data=digits", "data.task=classification"],
     "data.task applies to data=csv (this run uses data=digits)"),
    (["+experiment=smoke", "model.width=8"],
     "model.width applies to model=tied (this run uses model=mlp)"),
    (["+experiment=seed", "model.hidden=[8]"],
     "model.hidden applies to model=mlp (this run uses model=tied)"),
    (["data.seed_width=3"], "data.seed_width applies to data=seed (this run uses data=diabetes)"),
    (["+experiment=smoke", "optim.momentum=0.5"],
     "optim.momentum applies to optim=momentum (this run uses optim=adam)"),
    (["+experiment=diabetes", "optim=momentum", "optim.weight_decay=0.1"],
     "optim.weight_decay applies to optim=adamw (this run uses optim=momentum)"),
    (["-m", "optim=adam,momentum", "optim.momentum=0.5"],
     "optim.momentum applies to optim=momentum (this run uses optim=adam)"),
    (["-m", "+experiment=seed,smoke", "model.width=8"],
     "model.width applies to model=tied (this run uses model=mlp)"),
    # an experiment's values for its own kinds: Hydra would stop with a ConfigKeyError
    (["+experiment=diabetes", "model=tied", "model.width=16"],
     "+experiment=diabetes sets model.hidden, which model=tied does not have (it applies to "
     "model=mlp); keep the experiment's model=mlp, or start from an experiment made for "
     "model=tied (seed, tied-diabetes)"),
    (["-m", "+experiment=diabetes", "optim=adamw,sgd"],
     "+experiment=diabetes sets optim.weight_decay, which optim=sgd does not have"),
    (["+experiment=seed", "model=mlp"], "+experiment=seed sets model.width, which model=mlp"),
    (["-m", "model=glob(ti*)", "model.hidden=[8]"],  # glob() used to stop check_overrides
     "model.hidden applies to model=mlp (this run uses model=tied)"),
    (["-m", "+experiment=diabetes", "optim=glob(adam*)"],
     "+experiment=diabetes sets optim.weight_decay, which optim=adam does not have"),
])
def test_a_key_of_another_kind_is_refused_naming_the_option(overrides, message):
    """Issue 14 item 7: ``data.path=... data.target=[y]`` without ``data=csv`` used to train
    on diabetes; a key the run's kind lacks is refused, naming the option that has it."""
    with pytest.raises(ConfigError) as err:
        check_overrides([o for o in overrides if o != "-m"])
    assert message in str(err.value)


# The keys each option's schema gives, and so each run's params (no key of another kind).
COMMON = {"model": {"kind", "init", "init_scale"},
          "data": {"kind", "val_fraction", "test_fraction", "standardize", "batch_size", "cache"},
          "optim": {"name", "learning_rate", "schedule", "warmup_steps", "final_lr_fraction",
                    "clip_norm", "transition_begin", "transition_steps", "decay_rate",
                    "staircase"}}
OWN_KEYS = {("model", "mlp"): {"hidden", "tied_hidden"}, ("model", "tied"): {"width"},
            ("data", "diabetes"): set(), ("data", "digits"): set(),
            ("data", "seed"): {"seed_width", "seed_x_key", "seed_y_key"},
            ("data", "csv"): {"path", "target", "features", "task"},
            ("optim", "sgd"): set(), ("optim", "adam"): set(),
            ("optim", "momentum"): {"momentum"}, ("optim", "adamw"): {"weight_decay"}}


@pytest.mark.parametrize("group,option", sorted(OWN_KEYS))
def test_each_option_composes_to_only_its_own_keys(group, option):
    assert sorted(group_options(group)) == sorted(o for g, o in OWN_KEYS if g == group)
    csv = ["data.path=x.csv", "data.target=[y]"] if option == "csv" else []
    cfg = compose_cfg(f"{group}={option}", *csv)
    validate(cfg)
    assert set(cfg[group]) == COMMON[group] | OWN_KEYS[group, option]
    node = getattr(to_config(cfg), group)
    assert type(node) is SCHEMAS[group][option]
    assert getattr(node, "name" if group == "optim" else "kind") == option
    flat = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    others = set().union(*(keys for (g, o), keys in OWN_KEYS.items() if g == group))
    assert {f"{group}.{k}" for k in others} & set(flat) == {
        f"{group}.{k}" for k in OWN_KEYS[group, option]}


def test_no_option_restates_a_schema_default():
    """Every default lives once, in its schema: a group's YAML sets only what differs on
    purpose (before, data.batch_size was 64 in the schema and 32 in data/diabetes.yaml)."""
    restated = []
    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        group = path.parent.name
        if group == "experiment":
            continue
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        values.pop("defaults", None)
        plus = "+" if group == "search" else ""
        schema = OmegaConf.get_type(compose_cfg(f"{plus}{group}={path.stem}",
                                                *(["data.path=x", "data.target=[y]"]
                                                  if path.stem == "csv" else []))[group])
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        restated += [f"{group}/{path.name}: {key}" for key, value in values.items()
                     if defaults.get(key) == value]
    assert restated == []
    assert [p.name for p in CONF_DIR.rglob("*.yaml")
            if "batch_size" in p.read_text()] == ["digits.yaml"]  # 64 there, on purpose
    for option, batch in (("diabetes", 32), ("csv", 32), ("seed", 1), ("digits", 64)):
        csv = ["data.path=x.csv", "data.target=[y]"] if option == "csv" else []
        assert compose_cfg(f"data={option}", *csv).data.batch_size == batch


@pytest.mark.parametrize("build,message", [
    (lambda: MlpModelConfig(hidden=[0]), "model.hidden=[0]: give one or more positive widths"),
    (lambda: MlpModelConfig(hidden=[8, 4], tied_hidden=True), "equal hidden widths"),
    (lambda: MlpModelConfig(init="uniform"), "model.init='uniform': choose one of"),
    (lambda: TiedModelConfig(width=0), "model.width=0: must be greater than 0"),
    (lambda: TiedModelConfig(init_scale=-1.0), "model.init_scale=-1.0: must be greater than 0"),
    (lambda: MlpModelConfig(kind="tied"), "pick the model with model=tied"),
    (lambda: ModelConfig(), "model.kind='???': choose one of mlp, tied"),
    (lambda: TabularDataConfig(), "data.kind='???': choose one of diabetes, digits"),
    (lambda: TabularDataConfig(kind="seed"), "pick the data with data=seed"),
    (lambda: TabularDataConfig(kind="diabetes", batch_size=0),
     "data.batch_size=0: must be greater than 0"),
    (lambda: TabularDataConfig(kind="digits", val_fraction=0.5, test_fraction=0.45),
     "at least 10%"),
    (lambda: SeedDataConfig(seed_width=-2), "data.seed_width=-2: must be greater than 0"),
    (lambda: CsvDataConfig(), "data=csv needs data.path"),
    (lambda: CsvDataConfig(path="x.csv", target=["y"], task="ordinal"), "data.task='ordinal'"),
    (lambda: MomentumOptimConfig(momentum=1.5), "optim.momentum=1.5: must lie in [0, 1)"),
    (lambda: AdamWOptimConfig(weight_decay=-1.0), "optim.weight_decay=-1.0: must be >= 0"),
    (lambda: AdamOptimConfig(name="sgd"), "pick the optim with optim=sgd"),
    (lambda: AdamOptimConfig(name="adamm"), "did you mean 'adam'"),
    (lambda: SgdOptimConfig(learning_rate=0.0), "optim.learning_rate=0.0: must be greater"),
    (lambda: SgdOptimConfig(schedule="step"), "optim.schedule='step': choose one of"),
    (lambda: AdamOptimConfig(clip_norm=-1.0), "optim.clip_norm=-1.0: must be greater than 0"),
    (lambda: Config(model=MlpModelConfig(), data=SeedDataConfig()),
     "Config(optim=...) needs one of the optim schemas: SgdOptimConfig, MomentumOptimConfig"),
])
def test_schemas_built_in_python_check_their_values(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value)


def test_schemas_built_in_python_carry_only_their_kind_s_keys():
    assert SeedDataConfig().batch_size == 1 and SeedDataConfig().standardize is False
    assert TabularDataConfig(kind="diabetes").batch_size == 32
    assert not hasattr(MlpModelConfig(), "width") and not hasattr(TiedModelConfig(), "hidden")
    assert not hasattr(AdamOptimConfig(), "momentum")
    assert not hasattr(AdamOptimConfig(), "weight_decay")
    assert not hasattr(TabularDataConfig(kind="digits"), "seed_width")
    with pytest.raises(TypeError):
        MlpModelConfig(width=8)  # noqa - the point: an MLP has no width


def test_worked_examples_log_only_what_they_use():
    """mode=gradcheck reads no model, data, optimizer, trainer or gradcheck key."""
    resolved = OmegaConf.to_container(compose_cfg("+experiment=gradcheck"), resolve=True)
    assert sorted(flatten_config(logged_config(resolved))) == [
        "mode", "tracking.experiment_name", "tracking.run_name", "tracking.uri"]
    resolved = OmegaConf.to_container(compose_cfg("+experiment=smoke"), resolve=True)
    flat = flatten_config(logged_config(resolved))
    assert "resume" not in flat and flat["model.hidden"] == "[8]" and "model.width" not in flat


@pytest.mark.parametrize("overrides,message", [
    (["trainer.num_steps=0"], "trainer.num_steps=0: must be greater than 0"),
    (["data.batch_size=-4"], "data.batch_size=-4: must be greater than 0"),
    (["trainer.steps_per_call=0"], "trainer.steps_per_call=0"),
    (["optim.name=adamm"], "did you mean 'adam'"),
    (["model.tied_hidden=true", "model.hidden=[8,4]"], "equal hidden widths"),
    (["data.val_fraction=0.5", "data.test_fraction=0.45"], "at least 10%"),
    (["data=csv"], "data.path"),
    (["seed=-1"], "seed=-1: must be >= 0"),
    (["optim=adamw", "optim.weight_decay=-1"], "optim.weight_decay=-1.0: must be >= 0"),
    (["optim=momentum", "optim.momentum=1.5"], "optim.momentum=1.5: must lie in [0, 1)"),
    (["model.kind=tied"], "model.kind='tied' does not fit the MlpModelConfig schema: pick the "
                          "model with model=tied"),
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
