"""Typed configuration: dataclass schemas registered with Hydra, and their validation.

Every default lives here, once, one per line with its meaning and unit. The model,
the data and the optimizer have one schema per kind, holding only the keys that
kind uses (``MlpModelConfig`` has ``hidden``, ``TiedModelConfig`` has ``width``;
``optim.momentum`` exists only for ``optim=momentum``), so a run's config and its
MLflow params list nothing that does not apply. Each schema checks its own values
in ``__post_init__``: a config built in Python is checked as one composed by Hydra.

Hydra's pattern for config groups with schemas (Hydra 1.3, "Structured config
schema for config groups"): each schema is stored in the ConfigStore and each
option's YAML in ``trainer/conf/`` (linked as ``conf/`` at the top of the
repository) names it first in its defaults list, ``defaults:
[/schema/model/mlp@_here_, _self_]``; the top-level ``Config`` types the group as
the common base class (``model: ModelConfig = MISSING``), which any kind's schema
may fill (a Union is not allowed there). The schemas live in their own groups
(``schema/model``, ...), not beside the options as in Hydra's tutorial, so that a
sweep's ``optim=glob(*)`` finds only the options. The option's YAML sets only what differs on purpose from
its schema (``tests/test_config.py`` checks that no YAML restates a default).

``check_overrides`` and ``validate`` add what Hydra does not check (case C11):
keys added with ``+``, ``experiment=`` without ``+``, unknown experiments, a key
of another kind (``model.width`` with ``model=mlp``), value ranges, with the
nearest valid name suggested.

Only this module and ``__main__`` know Hydra.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

from .data import DATA_KINDS
from .models import INITIALIZERS
from .optim import OPTIMIZERS, SCHEDULES

__all__ = ["Config", "ModelConfig", "MlpModelConfig", "TiedModelConfig", "DataConfig",
           "TabularDataConfig", "SeedDataConfig", "CsvDataConfig", "OptimConfig",
           "SgdOptimConfig", "MomentumOptimConfig", "AdamOptimConfig", "AdamWOptimConfig",
           "SearchConfig", "SearchParamConfig", "SamplerConfig",
           "TrainerConfig", "TrackingConfig", "GradcheckConfig", "PopulationConfig",
           "SCHEMAS", "VMAPPABLE_KEYS", "ConfigError", "CONF_DIR", "register_configs",
           "check_overrides", "check_numbers", "check_member", "validate", "to_config", "structured", "logged_config",
           "resume_config", "RESUME_MAY_CHANGE"]

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("model", "data", "optim", "trainer", "gradcheck", "tracking")
MODES = ("train", "gradcheck")


class ConfigError(ValueError):
    """A configuration the service cannot run; the message names the key and the fix."""


# --- the model: one schema per kind ---------------------------------------------------------

@dataclass
class ModelConfig:
    """What every model kind has. Build a kind's schema (``MlpModelConfig``,
    ``TiedModelConfig``); ``SCHEMAS["model"]`` maps each kind to its schema."""

    kind: str = MISSING                # set by the kind's schema; chosen with model=KIND
    init: str = "lecun_normal"         # "lecun_normal" | "glorot_normal" | "normal"
    init_scale: float = 1.0            # stddev of the "normal" initializer

    def __post_init__(self) -> None:
        _check_kind(self, "model", "kind")
        _choice("model.init", self.init, INITIALIZERS)
        _positive("model.init_scale", self.init_scale)


@dataclass
class MlpModelConfig(ModelConfig):
    """model=mlp: a tanh MLP with a linear output layer."""

    kind: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # hidden widths, input first
    tied_hidden: bool = False          # one square kernel shared by hidden-to-hidden layers

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ConfigError(f"model.hidden={list(self.hidden)}: give one or more positive "
                              "widths")
        if self.tied_hidden and len(set(self.hidden)) != 1:
            raise ConfigError(f"model.tied_hidden=true needs equal hidden widths, got "
                              f"model.hidden={list(self.hidden)}")


@dataclass
class TiedModelConfig(ModelConfig):
    """model=tied: the block h -> tanh(Θ·tanh(Θ·h)), one square Θ used twice (with linear
    maps in and out when the data's sizes differ from ``width``)."""

    kind: str = "tied"
    width: int = 32                    # n, the side of the square Θ (n² parameters)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("model.width", self.width)


# --- the data: one schema per kind ------------------------------------------------------

@dataclass
class DataConfig:
    """What every data kind has. Build a kind's schema (``TabularDataConfig``,
    ``SeedDataConfig``, ``CsvDataConfig``); ``SCHEMAS["data"]`` maps each kind to its schema."""

    kind: str = MISSING                # data=KIND: "seed" | "diabetes" | "digits" | "csv"
    val_fraction: float = 0.15         # share of rows held out for validation
    test_fraction: float = 0.15        # share of rows held out for the final test
    standardize: bool = True           # z-score features (and regression targets) on train stats
    batch_size: int = 32               # rows per step (clamped to the training rows)
    cache: bool = True                 # keep the split and its baseline on disk (trainer/data_cache.py)

    def __post_init__(self) -> None:
        _check_kind(self, "data", "kind")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"data.{key}={value}: must lie strictly between 0 and 1")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError("data.val_fraction + data.test_fraction must leave at least 10% "
                              f"of the rows for training, got "
                              f"{self.val_fraction + self.test_fraction}")
        _positive("data.batch_size", self.batch_size)


@dataclass
class TabularDataConfig(DataConfig):
    """data=diabetes (442 rows, 10 features, regression) or data=digits (1797 rows of 8x8
    pixels, 10 classes): scikit-learn's bundled tables."""


@dataclass
class SeedDataConfig(DataConfig):
    """data=seed: the notebook's problem, one row: x = normal(PRNGKey(seed_x_key), (n,)),
    scalar y = normal(PRNGKey(seed_y_key), ())."""

    kind: str = "seed"
    standardize: bool = False          # the notebook used the raw draws
    batch_size: int = 1                # the one row
    seed_width: int = 100              # n, the size of x and of Θ
    seed_x_key: int = 1                # x = normal(PRNGKey(seed_x_key), (n,))
    seed_y_key: int = 2                # y = normal(PRNGKey(seed_y_key), ())

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("data.seed_width", self.seed_width)
        for key in ("seed_x_key", "seed_y_key"):  # PRNGKey seeds, as `seed` (>= 0)
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)}: must be >= 0")


@dataclass
class CsvDataConfig(DataConfig):
    """data=csv: your own table, ``data=csv data.path=table.csv data.target=[col]``."""

    kind: str = "csv"
    path: Optional[str] = None         # path of the table (relative to the launch dir)
    target: list[str] = field(default_factory=list)  # column(s) to predict
    features: Optional[list[str]] = None  # feature columns (None = all but the target)
    task: str = "auto"                 # "regression" | "classification" | "auto" (regression
                                       # unless the target holds text labels)

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("data.task", self.task, ("auto", "regression", "classification"))
        if not self.path or not self.target:
            raise ConfigError("data=csv needs data.path=/path/to/table.csv and "
                              "data.target=[COL]")
        if self.features is not None and not self.features:
            raise ConfigError("data.features=[] leaves the model no input: list the feature "
                              "columns, or null for every column but the target")


# --- the optimizer: one schema per optimizer ----------------------------------------------

@dataclass
class OptimConfig:
    """What every optimizer has (trainer/optim.py). Build an optimizer's schema
    (``AdamOptimConfig``, ...); ``SCHEMAS["optim"]`` maps each name to its schema."""

    name: str = MISSING                # optim=NAME: "sgd" | "momentum" | "adam" | "adamw"
    learning_rate: float = 1e-3        # peak learning rate
    schedule: str = "constant"         # "constant" | "cosine" | "warmup_cosine" | "linear"
                                       # (optax.linear_schedule) | "exponential"
                                       # (optax.exponential_decay)
    warmup_steps: int = 0              # warmup_cosine: steps of linear warm-up from 0
    final_lr_fraction: float = 0.0     # cosine, linear: final rate / peak rate; exponential:
                                       # the floor (optax's end_value) / peak rate
    transition_begin: int = 0          # linear, exponential: steps at the peak rate first
    transition_steps: Optional[int] = None  # linear: steps from the peak to the final rate
                                       # (None: to the last step); exponential: steps per
                                       # factor decay_rate (None: num_steps)
    decay_rate: float = 0.1            # exponential: the rate's factor per transition_steps
    staircase: bool = False            # exponential: decay in whole transition_steps steps
    clip_norm: Optional[float] = None  # clip the gradient's global L2 norm to this (None = off)

    def __post_init__(self) -> None:
        _check_kind(self, "optim", "name")
        _positive("optim.learning_rate", self.learning_rate)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError(f"optim.final_lr_fraction={self.final_lr_fraction}: must lie in "
                              "[0, 1]")
        if self.clip_norm is not None:
            _positive("optim.clip_norm", self.clip_norm)
        if self.transition_begin < 0:
            raise ConfigError(f"optim.transition_begin={self.transition_begin}: must be >= 0")
        if self.transition_steps is not None:
            _positive("optim.transition_steps", self.transition_steps)
        _positive("optim.decay_rate", self.decay_rate)
        shaped = self.transition_begin or self.transition_steps is not None
        if shaped and self.schedule not in ("linear", "exponential"):
            raise ConfigError(f"optim.transition_begin and optim.transition_steps shape the "
                              f"linear and exponential schedules, not optim.schedule="
                              f"{self.schedule}: set optim.schedule=linear or exponential")


@dataclass
class SgdOptimConfig(OptimConfig):
    """optim=sgd: plain stochastic gradient descent (``optax.sgd``)."""

    name: str = "sgd"
    learning_rate: float = 0.01        # peak learning rate


@dataclass
class MomentumOptimConfig(OptimConfig):
    """optim=momentum: SGD with heavy-ball momentum (``optax.sgd(momentum=...)``)."""

    name: str = "momentum"
    learning_rate: float = 0.01        # peak learning rate
    momentum: float = 0.9              # heavy-ball coefficient

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum={self.momentum}: must lie in [0, 1)")


@dataclass
class AdamOptimConfig(OptimConfig):
    """optim=adam: Adam (Kingma & Ba 2015, ``optax.adam``)."""

    name: str = "adam"


@dataclass
class AdamWOptimConfig(OptimConfig):
    """optim=adamw: Adam with decoupled weight decay (Loshchilov & Hutter 2019, ``optax.adamw``)."""

    name: str = "adamw"
    weight_decay: float = 1e-4         # decoupled weight decay per step (x learning rate)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.weight_decay >= 0:  # catches NaN too
            finite = "a finite number " if self.weight_decay != self.weight_decay else ""
            raise ConfigError(f"optim.weight_decay={self.weight_decay}: must be {finite}>= 0")


# Each group's kinds (the value of model.kind, data.kind, optim.name, which is also the name
# of the option that picks it: model=tied) and their schemas; each schema is stored in
# Hydra's ConfigStore as schema/<group>/<name> (register_configs).
SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"mlp": MlpModelConfig, "tied": TiedModelConfig},
    "data": {"seed": SeedDataConfig, "diabetes": TabularDataConfig,
             "digits": TabularDataConfig, "csv": CsvDataConfig},
    "optim": {"sgd": SgdOptimConfig, "momentum": MomentumOptimConfig,
              "adam": AdamOptimConfig, "adamw": AdamWOptimConfig},
}
KIND_KEY = {"model": "kind", "data": "kind", "optim": "name"}
SCHEMA_NAMES = {MlpModelConfig: "mlp", TiedModelConfig: "tied", TabularDataConfig: "tabular",
                SeedDataConfig: "seed", CsvDataConfig: "csv", SgdOptimConfig: "sgd",
                MomentumOptimConfig: "momentum", AdamOptimConfig: "adam",
                AdamWOptimConfig: "adamw"}
assert tuple(SCHEMAS["data"]) == DATA_KINDS and tuple(SCHEMAS["optim"]) == OPTIMIZERS


def _check_kind(node, group: str, key: str) -> None:
    """A schema's kind must be one its class serves: ``TabularDataConfig(kind="seed")``
    or ``optim.name=sgd`` typed into an Adam config is refused, naming the option."""
    kind = getattr(node, key)
    schemas = SCHEMAS[group]
    if schemas.get(kind) is type(node):
        return
    if kind not in schemas:  # a typo, or a kind's schema built without its kind
        served = [k for k, schema in schemas.items() if schema is type(node)]
        served = served if kind == MISSING and served else list(schemas)
        raise ConfigError(f"{group}.{key}={kind!r}: choose one of {', '.join(served)}"
                          f"{_suggest(str(kind), served)} ({group}=NAME picks it)")
    raise ConfigError(f"{group}.{key}={kind!r} does not fit the {type(node).__name__} schema: "
                      f"pick the {group} with {group}={kind} (that option has its own keys)")


@dataclass
class TrainerConfig:
    # The defaults suit long runs: at ~100k steps/s (a small MLP on 2 CPU cores) MLflow's
    # SQLite writes (~0.1 ms a point) and one host sync per call must stay rare. Short
    # experiments log more densely (conf/experiment/*.yaml).
    num_steps: int = 20000             # optimizer updates in the run
    steps_per_call: int = 2000         # steps per compiled lax.scan call (one host sync each)
    log_every_steps: int = 1000        # keep train metrics of every N-th step
    eval_every_steps: int = 1000       # validation loss every N steps (and after the last)
    on_nonfinite: str = "stop"         # "stop": end FAILED at the first NaN/inf loss;
                                       # "skip": drop such updates and go on
    max_skipped_fraction: float = 0.5  # skip: a member that dropped more than this share of
                                       # its updates ends FAILED, with no test metrics
    divergence_factor: Optional[float] = 1000.0  # a member whose (finite) train or validation
                                       # loss exceeds this many times its loss on the training
                                       # split before the first step has diverged: it stops
                                       # there and ends FAILED (null: no such rule)
    patience: int = 0                  # early stopping: evaluations of the validation loss without
                                       # an improvement before a member stops (0 = off)
    min_delta: float = 0.0             # an evaluation improves when val_loss < best - min_delta
    progress: bool = True              # show a progress bar on the console
    compilation_cache: bool = True     # JAX's persistent compilation cache (trainer/compile_cache.py)
    compilation_cache_dir: Optional[str] = None  # None: $JAX_COMPILATION_CACHE_DIR, else
                                       # $XDG_CACHE_HOME/trainer/jax (~/.cache/trainer/jax)
    checkpoints: bool = True           # save the training state: at the end, on SIGTERM or
                                       # Ctrl-C, and periodically (below); false: none, and
                                       # such a run cannot be resumed
    checkpoint_every_steps: Optional[int] = None  # periodic saves at the first chunk end at
                                       # or after each multiple of N (in the background,
                                       # latest wins: trainer/checkpoint.py); 0: none;
                                       # None: num_steps // 10 for runs of 10000 steps or
                                       # more, none for shorter ones
    checkpoint_keep: int = 2           # latest checkpoints kept (the best by validation
                                       # loss is kept besides them)
    checkpoint_min_interval_s: float = 10.0  # periodic saves start at least this many
                                       # seconds apart (each costs the loop ~0.1 s on 2 CPU
                                       # cores); the end and a stop always save


@dataclass
class GradcheckConfig:
    # Checks run in float64 on a fixed probe batch; the training stays in its own dtype (C12).
    every_steps: Optional[int] = None  # None: once before training and once after the last
                                       # step; 0: off; N: also every N steps (at the first
                                       # chunk boundary at or after each multiple of N)
    fail_run: bool = False             # a failed check ends the run FAILED (else tag + message)
    probe_batch_size: int = 64         # rows of the probe batch: the first rows of the train split
    rel_tol: float = 1e-8              # norm-wise relative error allowed (float64)
    max_elements: int = 128            # per tensor: all elements up to this, else a seeded subset
    num_directions: int = 4            # random directions for directional and jvp/vjp checks
    richardson: bool = False           # Richardson-extrapolated central differences (4th order)
    hvp: bool = False                  # also check Hessian-vector products (forward-over-reverse)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None          # MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else
                                       # sqlite:///<launch dir>/mlruns/mlflow.db)
    experiment_name: Optional[str] = None  # None: the +experiment name
    run_name: Optional[str] = None     # None: "<experiment>-<model>-<time>"
    register_model: Optional[str] = None  # also register the run's MLflow model under this
                                       # name in the model registry (a population: its best
                                       # member's); None: logged with the run only


# Config keys whose values may differ between the members of one population: each is an
# array in the training state (or used only at initialisation), never a constant baked into
# the compiled program, so one executable trains every member (case C17). Every other key is
# structural: points that differ in it are separate programs. optim.weight_decay and
# optim.momentum exist only for optim=adamw and optim=momentum: the members of a population
# share the optimizer (optim= is structural), and member_configs refuses them for the others.
VMAPPABLE_KEYS = ("seed", "optim.learning_rate", "optim.weight_decay", "optim.momentum",
                  "optim.clip_norm", "optim.final_lr_fraction", "model.init_scale")


@dataclass
class PopulationConfig:
    # A population: members that differ only in VMAPPABLE_KEYS, trained as one program.
    # Empty `members`: a lone run of the config itself (no parent run).
    members: list[dict[str, Any]] = field(default_factory=list)  # one {key: value} per member,
                                       # e.g. [{seed: 0, optim.learning_rate: 0.01}, {seed: 1}]
    parent_run_id: Optional[str] = None  # set by the sweeper: the sweep's parent run; None: the
                                       # job opens its own parent when it has members
    sweep_id: Optional[str] = None     # set by the sweeper: tags every run of one sweep
    rerun: bool = False                # also rerun points that have a FINISHED run already
    host_devices: Optional[int] = None  # CPU only: host devices the member axis is sharded
                                       # over (None: one per core); set before JAX starts


@dataclass
class SearchParamConfig:
    # One searched config key (Optuna's distributions: FloatDistribution, IntDistribution,
    # CategoricalDistribution).
    type: str = MISSING                # "float", "int" or "categorical"
    low: Optional[float] = None        # float / int: the smallest value (> 0 with log)
    high: Optional[float] = None       # float / int: the largest value, included
    log: bool = False                  # float / int: sample on a log scale
    step: Optional[float] = None       # float / int: grid step (None: continuous, int 1)
    choices: Optional[list[Any]] = None  # categorical: the values (scalars or lists)


@dataclass
class SamplerConfig:
    name: str = "tpe"                  # "tpe", "random" or "qmc" (optuna.samplers)
    seed: Optional[int] = 0            # the sampler's PRNG seed (None: from the OS)
    constant_liar: bool = True         # tpe: a trial asked while others of its batch are
                                       # still running counts as a poor result, so one batch
                                       # spreads out instead of asking the same point K times
    n_startup_trials: int = 8          # tpe: random trials before the model is used


@dataclass
class SearchConfig:
    # A hyperparameter search (+search=NAME, conf/search/): Optuna asks trials_per_batch trials,
    # they train as one population per structural group, their values are told back.
    space: dict[str, Any] = field(default_factory=dict)  # the searched keys, nested as in the
                                       # config, each ending in a SearchParamConfig:
                                       # {optim: {learning_rate: {type: float, ...}}}
    num_trials: int = 32               # trials to complete (diverged ones count; trials of a
                                       # process that died are retried and do not)
    trials_per_batch: int = 8          # trials asked at once and trained together
    metric: str = "val_loss"           # the value told to Optuna: "val_loss" (final
                                       # validation loss; with early stopping, that of the
                                       # model kept) or "min_val_loss" (lowest on the curve)
    direction: str = "minimize"        # "minimize" (both metrics are losses: maximize is refused)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    study_name: Optional[str] = None   # None: "<experiment>-<search option>"
    storage: Optional[str] = None      # None: journal file <store folder>/optuna/<study>.journal;
                                       # or an RDB URL (postgresql://..., sqlite:///...)
    stale_after_s: Optional[float] = None  # a RUNNING trial of another host counts as dead
                                       # after this many seconds (None: never; trials of
                                       # this host are checked by their process id)


@dataclass
class Config:
    model: ModelConfig = MISSING       # a kind's schema, picked with model=KIND
    data: DataConfig = MISSING         # a kind's schema, picked with data=KIND
    optim: OptimConfig = MISSING       # an optimizer's schema, picked with optim=NAME
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    gradcheck: GradcheckConfig = field(default_factory=GradcheckConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    seed: int = 0                      # PRNG seed: init, split, shuffling, gradient-check draws
    resume: Optional[str] = None       # a run id (a lone run or a population's parent), or
                                       # "latest" (the newest resumable run of the experiment):
                                       # continue it from its latest checkpoint, in the same
                                       # MLflow run; only trainer.num_steps may grow
    mode: str = "train"                # "train", or "gradcheck": the worked derivative examples
    search: Optional[SearchConfig] = None  # +search=NAME: a hyperparameter search (trainer/search/)

    def __post_init__(self) -> None:
        # no default kind here: conf/config.yaml picks them (model: mlp, ...), once
        for group, base in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig)):
            if not isinstance(getattr(self, group), base):
                kinds = ", ".join(s.__name__ for s in dict.fromkeys(SCHEMAS[group].values()))
                raise ConfigError(f"Config({group}=...) needs one of the {group} schemas: {kinds}")


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore: ``Config`` as ``base_config``, each
    kind's schema as ``schema/<group>/<name>``, which the option's YAML names first in its
    defaults list (``/schema/model/mlp@_here_``).

    Not in the group itself (``model/mlp_schema``, as Hydra's tutorial has it): there a
    sweep's ``optim=glob(adam*)`` or ``data=glob(*)`` would pick the schemas as options.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for schema in dict.fromkeys(schemas.values()):
            cs.store(group=f"schema/{group}", name=SCHEMA_NAMES[schema], node=schema)
    cs.store(group="schema", name="search", node=SearchConfig)  # conf/search/*.yaml name it


# --- names the user may write ------------------------------------------------------------

def experiment_names() -> list[str]:
    """The experiments shipped in ``conf/experiment/``."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _schema_fields(schema) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _group_fields(group: str) -> dict[str, Any]:
    """The keys of every kind of ``group`` (model, data, optim) with their types."""
    out: dict[str, Any] = {}
    for schema in SCHEMAS[group].values():
        for name, hint in _schema_fields(schema).items():
            out.setdefault(name, hint)
    return out


def _kinds_with(group: str, key: str) -> list[str]:
    """The kinds of ``group`` whose schema has ``key`` (``"width"`` -> ``["tied"]``)."""
    return [kind for kind, schema in SCHEMAS[group].items() if key in _schema_fields(schema)]


def _not_for_kind(group: str, key: str, kind: str) -> ConfigError:
    """``model.width`` given to ``model=mlp``: name the options that have it."""
    options = " or ".join(f"{group}={k}" for k in _kinds_with(group, key))
    return ConfigError(f"{group}.{key} applies to {options} (this run uses {group}={kind}); "
                       f"choose that {group} or drop {group}.{key}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key(dotted: str, prefix: str, fields) -> ConfigError:
    valid = [prefix + name for name in fields]
    return ConfigError(f"unknown config key {dotted!r}{_suggest(dotted, valid)} "
                       f"(valid keys here: {', '.join(valid)})")


def _resolve_key(dotted: str) -> Any:
    """Return the type of a dotted schema key, or raise ConfigError with a suggestion.

    A key of the model, data or optimizer is looked up in every kind's schema
    (``model.width`` is a key of ``model=tied``); ``_check_kind_keys`` decides whether
    it applies to the kind a run uses.
    """
    parts = dotted.split(".")
    node: Any = Config
    path = []
    for part in parts:
        if path == [] and part in SCHEMAS:
            hints = {part: None}
        elif len(path) == 1 and path[0] in SCHEMAS:
            hints = _group_fields(path[0])
        elif isinstance(node, type) and is_dataclass(node):
            hints = _schema_fields(node)
        else:
            raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(path)} has no sub-keys")
        if part not in hints:
            raise _unknown_key(dotted, ".".join(path + [""]), hints)
        node = hints[part]
        path.append(part)
        if path == ["search", "space"]:  # its keys are config keys: search.check_search
            return Any
        if typing.get_origin(node) is typing.Union:  # Optional[SearchConfig]: its fields
            inner = [a for a in typing.get_args(node) if a is not type(None)]
            if len(inner) == 1 and is_dataclass(inner[0]) and len(path) < len(parts):
                node = inner[0]
    return node


# --- checks on the command line, before Hydra composes ---------------------------------

def check_overrides(overrides: list[str], *, multirun: bool | None = None) -> None:
    """Check command-line overrides against the schema before Hydra runs (case C11).

    Catches what Hydra accepts silently (``+trainer.typo=1``), what it words
    cryptically (``experiment=x`` without ``+``, an unknown experiment, a key
    misspelled, a key of another kind: ``data.path=x.csv`` without ``data=csv``) and
    values of the wrong type, with the nearest valid name; with ``multirun=False`` (no
    ``-m``), a sweep (``a=1,2``). Hydra's own settings: ``hydra.*`` keys only those of
    ``HYDRA_KEYS`` (no ``_target_``: ``hydra.callbacks`` would call any function),
    ``hydra/<group>=<option>`` checked against the options Hydra would find (its own,
    installed plugins', ours), unless ``hydra.searchpath`` adds places to look.

    Raises:
      ConfigError: naming the override and the fix.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the overrides: {' '.join(str(err).split())}. Quote "
                          "values with special characters, e.g. 'data.path=\"~/x.csv\"'"
                          ) from None
    searchpath = any(ov.key_or_group == "hydra.searchpath" for ov in parsed)
    keys = []
    for ov in parsed:
        key = ov.key_or_group
        text = ov.input_line
        if _is_glob(ov) and key not in (*GROUPS, "experiment", "search"):
            raise ConfigError(f"{text!r}: glob(...) picks options of a config group "
                              f"({', '.join((*GROUPS, 'experiment'))}); {key} is a key: give "
                              "its value, or several with -m: key=1,2")
        if multirun is False and ov.is_sweep_override():
            values = ",".join(map(str, _values(ov))) or "a,b"
            as_list = ("" if key in (*GROUPS, "experiment", "search") or key.startswith("hydra")
                       else f", or write one list value in brackets: {key}=[{values}]")
            raise ConfigError(f"{text!r} gives several values, a sweep: add -m to run one job "
                              f"per value{as_list}")
        if key == "hydra" or key.startswith("hydra."):
            _check_hydra_key(ov)
            continue
        if key.startswith("hydra/"):
            if not searchpath:
                _check_hydra_group(ov)
            continue
        if key == "experiment":
            if ov.type.name == "CHANGE":
                raise ConfigError(f"{text!r}: experiments are added with a plus sign: "
                                  f"+experiment={_first_value(ov)}")
            _check_choices(ov, "experiment", experiment_names(), plus=True)
            continue
        if key in GROUPS:
            _check_choices(ov, key, group_options(key), plus=False)
            continue
        if key == "search":
            _check_choices(ov, "search", group_options("search"), plus=True)
            continue
        if ov.is_delete():
            raise ConfigError(f"{text!r}: keys of the schema cannot be deleted; "
                              "set them to a value instead")
        expected = _resolve_key(key)
        for value in _values(ov):
            _check_type(key, value, expected)
        keys.append(key)
    chosen = _chosen_options(parsed)
    _check_kind_keys(keys, chosen)
    for values in [set(map(str, _values(ov))) for ov in parsed
                   if ov.key_or_group == "experiment"][-1:]:
        for name in sorted(values):
            _check_experiment_keys(name, chosen)


# The hydra.* keys a command may set (README, "Hydra settings"): how jobs are launched and
# swept (any key of the chosen launcher or sweeper, e.g. hydra.launcher.n_jobs), logging,
# where outputs go, Hydra's verbosity, chdir and its config search path. Keys ending in "."
# cover their sub-keys. Anything else is refused: hydra.callbacks.NAME._target_ would call
# any importable function, and a typo (hydra.nope=1) would be ignored.
HYDRA_KEYS = ("hydra.launcher.", "hydra.sweeper.", "hydra.job_logging.",
              "hydra.hydra_logging.", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir",
              "hydra.verbose", "hydra.job.chdir", "hydra.searchpath")


def _check_hydra_key(ov) -> None:
    key = ov.key_or_group
    allowed = any(key == k or (k.endswith(".") and key.startswith(k)) for k in HYDRA_KEYS)
    if "_target_" in key.split(".") and allowed:
        raise ConfigError(f"{ov.input_line!r}: a _target_ names a function to call; choose "
                          "a launcher or sweeper with hydra/launcher=NAME or hydra/sweeper=NAME")
    if not allowed:
        shown = ", ".join(k + ("*" if k.endswith(".") else "") for k in HYDRA_KEYS)
        raise ConfigError(f"{ov.input_line!r}: {key} is not a Hydra setting this service "
                          f"takes{_suggest(key, [k.rstrip('.') for k in HYDRA_KEYS])} "
                          f"(allowed: {shown})")


def _chosen_options(parsed) -> dict[str, set[str]]:
    """The options of model, data and optim that the overrides lead to (several in a
    sweep): the group's own override, else each experiment's ``override /group``, else
    ``conf/config.yaml``'s default."""
    defaults = _defaults_choices(CONF_DIR / "config.yaml", "")
    given = {ov.key_or_group: set(map(str, _values(ov))) for ov in parsed
             if ov.key_or_group in SCHEMAS and not ov.is_delete()}
    experiments = [set(map(str, _values(ov))) for ov in parsed
                   if ov.key_or_group == "experiment"]
    chosen = {}
    for group in SCHEMAS:
        if group in given:
            chosen[group] = given[group]
        elif experiments:
            chosen[group] = {_defaults_choices(CONF_DIR / "experiment" / f"{name}.yaml",
                                               "override /").get(group, defaults[group])
                             for name in experiments[-1]}
        else:
            chosen[group] = {defaults[group]}
    return chosen


def _defaults_choices(path: Path, prefix: str) -> dict[str, str]:
    """``{group: option}`` from the defaults list of a YAML file (entries ``prefix+group``)."""
    out = {}
    for entry in OmegaConf.load(path).get("defaults", []):
        if isinstance(entry, (dict, DictConfig)):
            for key, value in entry.items():
                if str(key).startswith(prefix) and str(key)[len(prefix):] in SCHEMAS:
                    out[str(key)[len(prefix):]] = str(value)
    return out


def _check_kind_keys(keys: list[str], chosen: dict[str, set[str]]) -> None:
    """Each ``model.*`` / ``data.*`` / ``optim.*`` key typed must exist in the schema of
    every option the run (or each point of a sweep) uses."""
    for key in keys:
        group, _, rest = key.partition(".")
        if group not in SCHEMAS or not rest:
            continue
        name = rest.split(".")[0]
        for kind in sorted(chosen[group]):
            schema = SCHEMAS[group].get(kind)
            if schema is not None and name not in _schema_fields(schema):
                raise _not_for_kind(group, name, kind)


def _check_experiment_keys(name: str, chosen: dict[str, set[str]]) -> None:
    """An experiment's values for one kind (``model.hidden`` in ``diabetes``) cannot apply
    to another kind chosen on the command line (``+experiment=diabetes model=tied``):
    Hydra would stop with a ConfigKeyError; this names the clash and the way out."""
    def choices(experiment: str) -> dict[str, str]:
        return _defaults_choices(CONF_DIR / "experiment" / f"{experiment}.yaml", "override /")

    body = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml"))
    for group, schemas in SCHEMAS.items():
        default = _defaults_choices(CONF_DIR / "config.yaml", "")[group]
        for key in body.get(group) or {}:
            for kind in sorted(chosen[group]):
                if key in _schema_fields(schemas[kind]):
                    continue
                made_for = [n for n in experiment_names() if choices(n).get(group) == kind]
                start = (f"an experiment made for {group}={kind} ({', '.join(made_for)})"
                         if made_for else f"no experiment, with {group}={kind}")
                raise ConfigError(
                    f"+experiment={name} sets {group}.{key}, which {group}={kind} does not have "
                    f"(it applies to {' or '.join(f'{group}={k}' for k in _kinds_with(group, key))}"
                    f"); keep the experiment's {group}={choices(name).get(group) or default}, or "
                    f"start from {start}")


def _check_hydra_group(ov) -> None:
    """``hydra/<group>=<option>``: the group and option must exist where Hydra looks.

    Hydra's own message for a wrong option is nine lines with its search path (exit 1);
    this gives one line with the options, before anything runs.
    """
    if ov.is_delete() or None in _values(ov):  # removing the group: Hydra's business
        return
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    # The same search path hydra.main builds (plugins add theirs while it is built).
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(f"file://{CONF_DIR}"))
    group = ov.key_or_group
    groups = [f"hydra/{name}" for name in loader.list_groups("hydra")]
    if group not in groups:
        raise ConfigError(f"{ov.input_line!r}: Hydra has no config group {group!r}"
                          f"{_suggest(group, groups)} (groups: {', '.join(groups)})")
    _check_choices(ov, group, loader.get_group_options(group), plus=False)


def _is_glob(ov) -> bool:
    from hydra.core.override_parser.types import Glob

    return isinstance(ov.value(), Glob)


def _first_value(ov) -> str:
    values = list(_values(ov))
    return str(values[0]) if values else "NAME"


def _values(ov):
    from hydra.core.override_parser.types import Glob

    if isinstance(ov.value(), Glob):  # glob(...) picks among a group's options
        key = ov.key_or_group
        options = (experiment_names() if key == "experiment" else
                   group_options(key) if key in GROUPS else [])
        return ov.value().filter(options)
    if ov.is_sweep_override():
        if ov.is_choice_sweep() or ov.is_range_sweep():
            return list(ov.sweep_iterator())
        return []  # interval sweeps are sampled by a sweeper plugin, not checked here
    return [ov.value()]


def _check_choices(ov, group: str, options: list[str], *, plus: bool) -> None:
    for value in _values(ov):
        if not isinstance(value, str) or value not in options:
            hint = _suggest(str(value), options)
            raise ConfigError(f"{ov.input_line!r}: no {group} named {value!r}{hint} "
                              f"(choose one of: {', '.join(options)})")


def _check_type(key: str, value: Any, expected) -> None:
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: checked after Hydra resolves it
    if not _type_ok(value, expected):
        hint = ""
        if typing.get_origin(expected) is list or list in map(typing.get_origin,
                                                               typing.get_args(expected)):
            if not isinstance(value, (list, ListConfig)):
                hint = f"; write a list: {key}=[{value}]"
        raise ConfigError(f"{key}={value!r}: expected {_type_name(expected)}, "
                          f"got {type(value).__name__} {value!r}{hint}")


def _type_ok(value: Any, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, (list, ListConfig)) and all(_type_ok(v, item) for v in value)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return True


def _type_name(expected) -> str:
    origin = typing.get_origin(expected)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(expected)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false",
            str: "a string"}.get(expected, str(expected))


# --- checks on the composed config -------------------------------------------------------

MAX_MODEL_NAME_LENGTH = 256  # MLflow's registered_models.name is a VARCHAR(256)


def validate(cfg: DictConfig) -> Config:
    """Check the composed config: every key in its schema, every value in range.

    The model, data and optimizer schemas check their own values when ``to_config``
    builds them (``__post_init__``); this adds the other groups and the checks that
    span groups.

    Returns:
      the config as plain dataclasses (``to_config``), interpolations resolved.

    Raises:
      ConfigError: naming the key, the bad value and what is allowed (also an
        interpolation that does not resolve, or resolves to the wrong type).
    """
    from omegaconf.errors import OmegaConfBaseException

    try:
        _check_keys(cfg, "")
        c = to_config(cfg)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve, or
        raise _omegaconf_error(err) from None  # resolves to the wrong type
    check_numbers(c)
    _choice("trainer.on_nonfinite", c.trainer.on_nonfinite, ("stop", "skip"))
    _choice("mode", c.mode, MODES)
    if c.trainer.patience < 0:
        raise ConfigError(f"trainer.patience={c.trainer.patience}: must be >= 0 (0: no early "
                          "stopping; N: stop a member after N evaluations without improvement)")
    if not 0 <= c.trainer.max_skipped_fraction < 1:  # catches NaN too
        raise ConfigError(f"trainer.max_skipped_fraction={c.trainer.max_skipped_fraction}: must "
                          "lie in [0, 1) (the share of dropped updates a run may have)")
    factor = c.trainer.divergence_factor
    if factor is not None and not factor > 1:  # catches NaN too
        raise ConfigError(f"trainer.divergence_factor={factor}: must be > 1 (how many times "
                          "its initial value the loss may reach), or null for no such rule")
    if not c.trainer.min_delta >= 0:  # catches NaN too
        raise ConfigError(f"trainer.min_delta={c.trainer.min_delta}: must be >= 0")
    g = c.gradcheck
    if g.every_steps is not None and g.every_steps < 0:
        raise ConfigError(f"gradcheck.every_steps={g.every_steps}: use 0 (off), a positive "
                          "number of steps, or null (before and after training)")
    for key in ("probe_batch_size", "rel_tol", "max_elements", "num_directions"):
        _positive(f"gradcheck.{key}", getattr(g, key))
    if c.trainer.checkpoint_min_interval_s < 0:
        raise ConfigError(f"trainer.checkpoint_min_interval_s={c.trainer.checkpoint_min_interval_s}"
                          ": must be >= 0 (seconds between periodic saves)")
    if c.trainer.checkpoint_every_steps is not None and c.trainer.checkpoint_every_steps < 0:
        raise ConfigError(f"trainer.checkpoint_every_steps={c.trainer.checkpoint_every_steps}: "
                          "use 0 (no periodic saves), a positive number of steps, or null "
                          "(a tenth of the run for runs of 10000 steps or more)")
    for key in ("num_steps", "steps_per_call", "log_every_steps", "eval_every_steps",
                "checkpoint_keep"):
        _positive(f"trainer.{key}", getattr(c.trainer, key))
    if not c.optim.transition_begin < c.trainer.num_steps:
        raise ConfigError(f"optim.transition_begin={c.optim.transition_begin}: must be less "
                          f"than trainer.num_steps={c.trainer.num_steps}")
    if not c.optim.warmup_steps < c.trainer.num_steps:
        raise ConfigError(f"optim.warmup_steps={c.optim.warmup_steps}: must be >= 0 and less "
                          f"than trainer.num_steps={c.trainer.num_steps}")
    if c.population.host_devices is not None and c.population.host_devices < 1:
        raise ConfigError(f"population.host_devices={c.population.host_devices}: give 1 or "
                          "more, or null (one per core)")
    name = c.tracking.register_model
    if name is not None and not 0 < len(name.strip()) <= MAX_MODEL_NAME_LENGTH:
        raise ConfigError(f"tracking.register_model: a registered model's name has 1 to "
                          f"{MAX_MODEL_NAME_LENGTH} characters (got {len(name)})")
    if c.seed < 0:
        raise ConfigError(f"seed={c.seed}: must be >= 0")
    return c


def _omegaconf_error(err) -> ConfigError:
    """OmegaConf's error (message, then ``full_key:`` and type lines) as one line that
    names the key."""
    key = getattr(err, "full_key", None)
    message = " ".join(str(getattr(err, "msg", None) or err).split("\n")[0].split())
    hint = ""
    if "interpolation" in message.lower() or "Interpolation" in type(err).__name__:
        hint = ("; an interpolation ${...} must resolve to a value of the key's type (give "
                "the value itself, e.g. seed=1)")
    return ConfigError(f"{key}: {message}{hint}" if key else f"{message}{hint}")


def to_config(cfg: DictConfig) -> Config:
    """The composed config as plain dataclasses (interpolations resolved): the model,
    data and optimizer as their kind's schema (``MlpModelConfig``, ...), each checked
    by its ``__post_init__``.

    Raises:
      ConfigError: a value out of range, or a kind its schema does not serve.
    """
    return OmegaConf.to_object(cfg)


def structured(tree: dict) -> DictConfig:
    """A resolved config as a plain dict (a run's stored ``config.yaml``) as a typed
    ``DictConfig``, each group in the schema of its kind.

    Keys of another kind of the same group are dropped: runs recorded before the
    schemas were split per kind stored every key of the group (``model.width`` for an
    MLP), none of which their training used. Any other unknown key is refused.

    Raises:
      ConfigError: an unknown kind or key.
    """
    tree = dict(tree)
    cfg = OmegaConf.structured(Config)
    for group, schemas in SCHEMAS.items():
        node = dict(tree.get(group) or {})
        kind = node.get(KIND_KEY[group])
        if kind not in schemas:
            raise ConfigError(f"{group}.{KIND_KEY[group]}={kind!r}: choose one of "
                              f"{', '.join(schemas)}")
        own, every = _schema_fields(schemas[kind]), _group_fields(group)
        tree[group] = {k: v for k, v in node.items() if k in own or k not in every}
        cfg[group] = OmegaConf.structured(schemas[kind])
    try:
        return OmegaConf.merge(cfg, tree)
    except Exception as err:  # noqa: BLE001 - OmegaConf's errors name the key
        raise ConfigError(f"the stored config does not fit the schema: "
                          f"{' '.join(str(err).split())}") from None


def _check_keys(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    hints = _schema_fields(schema) if is_dataclass(schema) else None
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if hints is not None and key not in hints:
            group = prefix.rstrip(".")
            if group in SCHEMAS and key in _group_fields(group):
                raise _not_for_kind(group, str(key), node[KIND_KEY[group]])
            raise _unknown_key(dotted, prefix, hints)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and \
                not child._is_none():
            _check_keys(child, dotted + ".")


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}"
                          f"{_suggest(value, choices)}")


def _positive(key: str, value) -> None:
    if not value > 0:  # catches NaN too
        finite = "a finite number " if value != value else ""  # NaN
        raise ConfigError(f"{key}={value}: must be {finite}greater than 0")


# --- what the device takes -----------------------------------------------------------------

# JAX runs with jax_enable_x64 off: every integer that reaches compiled code (step counts,
# widths, seeds, keys) is an int32 there, and a larger one stops the job inside JAX with
# "OverflowError ... parsing an argument to a jitted computation". So every integer key
# lies in [-INT_MAX - 1, INT_MAX]; the range checks above add their own lower bounds.
INT_MAX = 2**31 - 1
# The data split draws a second split with seed + 1 (data.py), which must still fit.
SEED_MAX = INT_MAX - 1
# Float keys: every one must be finite (NaN and inf pass a `<= 0` test); these also have
# a largest sensible value, past which training only overflows (weight_decay=1e30 turns the
# params to inf at the first step) or the check means nothing (a relative tolerance > 1).
FLOAT_MAX = {
    # no cap on optim.learning_rate: a rate too large is a run that diverges (case C24:
    # 1e30 trains and stops FAILED as diverged, with the step), not a usage error
    "optim.weight_decay": 1e3,
    "optim.clip_norm": 1e9,
    "model.init_scale": 1e3,
    "gradcheck.rel_tol": 1.0,
    "trainer.min_delta": 1e9,
    "trainer.checkpoint_min_interval_s": 1e7,  # about 4 months
    "search.stale_after_s": 1e9,
}


def check_numbers(node: Any, prefix: str = "") -> None:
    """Check every int and float field of a schema instance (``to_config``'s output, or
    any of its parts) against what the device takes.

    Integers (also inside lists) must fit an int32 (``INT_MAX``), ``seed`` at most
    ``SEED_MAX``; floats must be finite and at most ``FLOAT_MAX[key]`` where listed.
    ``population.members`` and ``search.space`` are skipped: each member is validated as
    a config of its own (``member_configs``), the space by ``search.check_search``.

    Raises:
      ConfigError: naming the key, the value and the allowed range.
    """
    for name in _schema_fields(type(node)):
        key, value = f"{prefix}{name}", getattr(node, name)
        if key in ("population.members", "search.space"):
            continue
        if is_dataclass(value):
            check_numbers(value, key + ".")
        elif isinstance(value, (list, tuple)):
            for item in value:
                _check_number(key, item, whole=value)
        else:
            _check_number(key, value)


def _check_number(key: str, value: Any, whole: Any = None) -> None:
    shown = f"{key}={list(whole) if whole is not None else value}"
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        high = SEED_MAX if key == "seed" else INT_MAX
        if not -INT_MAX - 1 <= value <= high:
            why = (" (the data split also uses seed + 1)" if key == "seed" else
                   " (integers reach the device as int32)")
            raise ConfigError(f"{shown}: must lie in [0, {high}]{why}" if key == "seed"
                              else f"{shown}: must be at most {high}{why}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{shown}: must be a finite number")
        high = FLOAT_MAX.get(key)
        if high is not None and value > high:
            raise ConfigError(f"{shown}: must be at most {high:g}")


# --- what a run's params record ------------------------------------------------------------

# mode=gradcheck (the worked derivative examples) reads none of the model, data, optimizer,
# trainer or gradcheck keys: its examples fix their own points and keys (gradcheck.py).
WORKED_EXAMPLES_KEYS = ("mode", "tracking")


def logged_config(resolved: dict) -> dict:
    """The part of a resolved config that a run's MLflow params record: what the job
    uses. Training: all of it (each group holds only its kind's keys) but ``resume``,
    which says how the run was launched (its ``config.yaml`` keeps it), and an unset
    ``search``.
    ``mode=gradcheck``: ``WORKED_EXAMPLES_KEYS`` only."""
    if resolved.get("mode") == "gradcheck":  # no model to register either
        kept = {k: v for k, v in resolved.items() if k in WORKED_EXAMPLES_KEYS}
        if isinstance(kept.get("tracking"), dict):
            kept["tracking"] = {k: v for k, v in kept["tracking"].items()
                                if k != "register_model"}
        return kept
    # a run's search is its parent's (a search's trials have none): only a search records it
    return {k: v for k, v in resolved.items()
            if k != "resume" and not (k == "search" and v is None)}


# --- populations -------------------------------------------------------------------------

def member_configs(cfg: DictConfig) -> list[tuple[dict[str, Any], DictConfig]]:
    """The members of the population that ``cfg`` describes, each as its own config.

    ``population.members`` empty: one member, ``cfg`` itself (a lone run). Otherwise
    each member is ``cfg`` with its ``{key: value}`` entries set; every key must be
    one of ``VMAPPABLE_KEYS`` (the others change the program, so their points are
    separate populations) and every member is type- and range-checked like a config
    of its own. The returned configs have ``population`` reset to its defaults, so a
    member's config is exactly that of the same point run alone.

    Returns:
      ``[(values, member_cfg)]``: the member's own values as given, and its config.

    Raises:
      ConfigError: naming the member, the key and the fix.
    """
    members = OmegaConf.to_container(cfg.population.members, resolve=True) or [{}]
    base = cfg.copy()
    with open_dict(base):
        base.population = OmegaConf.structured(PopulationConfig)
    out = []
    for index, values in enumerate(members):
        if not isinstance(values, dict):
            raise ConfigError(f"population.members[{index}]={values!r}: each member is a "
                              "mapping of config keys to values, e.g. {seed: 0}")
        member = base.copy()
        for key, value in values.items():
            if key not in VMAPPABLE_KEYS:
                hint = (f"; {key!r} changes the compiled program, so points that differ in "
                        "it are separate populations (a multirun groups them for you)"
                        if _is_schema_key(key) else _suggest(key, VMAPPABLE_KEYS))
                raise ConfigError(f"population.members[{index}]: {key!r} cannot differ "
                                  f"between members (allowed: {', '.join(VMAPPABLE_KEYS)})"
                                  f"{hint}")
            _check_type(f"population.members[{index}].{key}", value, _resolve_key(key))
            group, _, name = key.partition(".")
            if group in SCHEMAS and name not in member[group]:  # optim.momentum with adam
                raise ConfigError(f"population.members[{index}]: "
                                  f"{_not_for_kind(group, name, member[group][KIND_KEY[group]])}")
            OmegaConf.update(member, key, value, merge=False)
        try:
            validate(member)
        except ConfigError as err:
            raise ConfigError(f"population.members[{index}]: {err}") from None
        out.append((values, member))
    return out


def check_member(c: Config, values: dict[str, Any]) -> Config:
    """``c`` (a validated config) with one member's ``{key: value}`` set, checked as
    ``validate`` checks them: each key one of ``VMAPPABLE_KEYS`` that ``c``'s kinds have,
    of the schema's type, in range. Cheap (no OmegaConf): for the many points of a sweep.

    Raises:
      ConfigError: naming the key and the fix.
    """
    import dataclasses

    groups: dict[str, dict[str, Any]] = {}
    seed = c.seed
    for key, value in values.items():
        if key not in VMAPPABLE_KEYS:
            raise ConfigError(f"{key!r} cannot differ between members (allowed: "
                              f"{', '.join(VMAPPABLE_KEYS)})")
        _check_type(key, value, _resolve_key(key))
        group, _, name = key.partition(".")
        if key == "seed":
            seed = value
        elif not hasattr(getattr(c, group), name):  # optim.momentum with optim=adam
            raise _not_for_kind(group, name, getattr(getattr(c, group), KIND_KEY[group]))
        else:
            groups.setdefault(group, {})[name] = None if value is None else float(value)
    member = dataclasses.replace(c, seed=seed, **{  # each schema's __post_init__ checks
        group: dataclasses.replace(getattr(c, group), **changes)
        for group, changes in groups.items()})
    check_numbers(member)
    if member.seed < 0:
        raise ConfigError(f"seed={member.seed}: must be >= 0")
    return member


def _is_schema_key(key: str) -> bool:
    try:
        _resolve_key(key)
    except ConfigError:
        return False
    return True


# --- resuming a run ----------------------------------------------------------------------

# What a resumed run may change: how long it trains (only longer) and nothing it computes.
RESUME_MAY_CHANGE = ("resume", "trainer.num_steps", "tracking.uri", "trainer.progress",
                     "trainer.compilation_cache", "trainer.compilation_cache_dir", "data.cache")


def resume_config(stored: dict, overrides: list[str], composed: DictConfig, *,
                  experiment: str) -> DictConfig:
    """The config of a resumed run: the run's stored resolved config, with a larger
    ``trainer.num_steps`` if one is given (case C21).

    What the command typed is compared with the run: each ``key=value`` with the
    run's value, each group choice (``optim=sgd``) by the values it gives that group,
    ``+experiment=NAME`` with the run's experiment. So the run's own command with
    ``resume=ID`` appended passes, and so does ``resume=ID`` alone. Any difference
    outside ``RESUME_MAY_CHANGE`` is refused, naming every such key, and the step
    count may only grow.

    Args:
      stored: the run's resolved config as saved with its checkpoints.
      overrides: the command-line overrides as typed.
      composed: the config Hydra composed from them.
      experiment: the run's experiment (the ``+experiment`` it was started with).

    Raises:
      ConfigError: naming the changed keys, or the step count that shrank.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    base = structured(stored)
    old = OmegaConf.to_container(base, resolve=True)
    new = OmegaConf.to_container(composed, resolve=True)
    changed = []
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key == "experiment":
            if ov.value() != experiment:
                changed.append(f"+experiment (the run's is {experiment!r})")
            continue
        parts = key.split(".")
        a, b = _select(new, parts), _select(old, parts)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, key + ".")
        elif a != b:
            changed.append(key)
    changed = sorted({k for k in changed if k not in RESUME_MAY_CHANGE})
    if changed:
        raise ConfigError(
            f"a resumed run trains the config it was started with; these keys differ from "
            f"it: {', '.join(changed)}. Only trainer.num_steps may change (to continue "
            "longer); drop the other overrides, or start a new run without resume=")
    old_steps, new_steps = old["trainer"]["num_steps"], _select(
        new, ["trainer", "num_steps"]) if any(o.startswith("trainer.num_steps=")
                                               for o in overrides) else old["trainer"]["num_steps"]
    if new_steps < old_steps:
        raise ConfigError(f"trainer.num_steps={new_steps}: the run was set to {old_steps} "
                          "steps; a resumed run can only train as long or longer")
    with open_dict(base):
        base.trainer.num_steps = new_steps
        base.resume = new.get("resume")
    return base


def _select(tree: dict, parts: list[str]):
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _changed_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
