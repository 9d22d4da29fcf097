"""The bad-input corpus (issue 13): inputs a user may type or hand the service, each with
the class of outcome it must get.

  usage    exit 2, one message naming the cause, no MLflow run created
  failed   the run starts and ends FAILED with an ``error`` tag (exit 1)
  success  the run ends FINISHED (exit 0)

``CORPUS`` is built from the schemas (every key of every kind gets a value of the wrong
type, out-of-range values and huge values) plus hand-written entries: Hydra syntax,
interpolations, CSV files that are malformed, tracking URIs. ``tests/test_corpus.py``
checks every entry in-process through the CLI's own pre-run checks, and a sample of them
through the CLI in a subprocess.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from trainer.config import (SCHEMAS, Config, GradcheckConfig, PopulationConfig,
                            SamplerConfig, SearchConfig, TrackingConfig, TrainerConfig)

USAGE, FAILED, SUCCESS = "usage", "failed", "success"
BASE = ("+experiment=smoke",)    # a small job: the keys below are set on top of it
TIED = ("+experiment=tied-diabetes", "trainer.num_steps=60", "trainer.steps_per_call=20")


@dataclass(frozen=True)
class Case:
    """One corpus entry: ``args`` after ``python -m trainer``; ``files`` written into the
    launch folder first ({name: bytes}); ``expected`` one of USAGE / FAILED / SUCCESS;
    ``says`` a fragment the one-line message must contain (usage), lower-cased. A file
    whose bytes are None is made as a folder."""

    args: tuple[str, ...]
    expected: str
    says: str = ""
    files: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def needs_store(self) -> bool:
        """Judged only against the store (``resume=``): through the CLI alone."""
        return any(a.startswith("resume=") for a in self.args)

    @property
    def id(self) -> str:
        text = " ".join(a for a in self.args if a not in BASE)
        return text if len(text) <= 80 else text[:77] + "..."


def _flags_first(*args: str) -> tuple[str, ...]:
    """Hydra's flags (``-m``, ``--config-name``) before the overrides: its argparse takes
    the overrides as one positional list, so an override before ``-m`` leaves the ones
    after it 'unrecognized' (exit 2 from argparse, before the service is reached)."""
    return (tuple(a for a in args if a.startswith("-"))
            + tuple(a for a in args if not a.startswith("-")))


def _schema_keys() -> list[tuple[str, tuple[str, ...], type]]:
    """``(key, options that select its kind, type)`` for every key a user can set."""
    out = []
    # smoke's model.hidden does not fit model=tied: its keys start from tied-diabetes
    selectors = {"data": {"csv": ("data=csv", "data.path=t.csv", "data.target=[y]")},
                 "model": {"tied": TIED}}
    for group, kinds in SCHEMAS.items():
        seen = {"kind", "name"}     # a key shared by kinds is tried with the first that has it
        for kind, schema in kinds.items():
            select = selectors.get(group, {}).get(kind, (f"{group}={kind}",))
            for f in dataclasses.fields(schema):
                if f.name in seen:
                    continue
                seen.add(f.name)
                out.append((f"{group}.{f.name}", select, typing.get_type_hints(schema)[f.name]))
    for prefix, schema in (("trainer", TrainerConfig), ("gradcheck", GradcheckConfig),
                           ("tracking", TrackingConfig), ("population", PopulationConfig)):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            out.append((f"{prefix}.{f.name}", (), hints[f.name]))
    search = ("optim=adamw", "+search=lr_wd")   # lr_wd searches optim.weight_decay
    hints = typing.get_type_hints(SearchConfig)
    for f in dataclasses.fields(SearchConfig):
        if f.name not in ("space", "sampler"):
            out.append((f"search.{f.name}", search, hints[f.name]))
    hints = typing.get_type_hints(SamplerConfig)
    for f in dataclasses.fields(SamplerConfig):
        out.append((f"search.sampler.{f.name}", search, hints[f.name]))
    hints = typing.get_type_hints(Config)
    for name in ("seed", "mode", "resume"):
        out.append((name, (), hints[name]))
    return out


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


# Wrong types: every key of the type gets each of these, and each is a usage error.
WRONG_TYPE = {
    int: ["abc", "1.5", "true", "[1]"],
    float: ["abc", "true", "[0.1]"],
    bool: ["maybe", "2", "[true]"],
    str: ["[a]", "{a: 1}"],
}
WRONG_LIST = {int: ["abc", "[a]", "[[1]]", "{a: 1}"], str: ["abc", "[[a]]", "{a: 1}"]}

# Hydra's syntax and interpolations: each is a usage error with one line (issue 13, item 3).
HYDRA_SYNTAX = [
    (("++model=tied",), "model"),
    (("~model",), "model"),
    (("model=",), "model"),
    (("+experiment=smoke,digits",), "-m"),
    (("data.batch_size=10,20",), "-m"),
    (("seed=range(3)",), "-m"),
    (("hydra.nope=1",), "hydra.nope"),
    (("+hydra.callbacks.x._target_=os.makedirs",), "hydra.callbacks"),
    (("--config-name=nope",), "nope"),
    (("hydra.run.dir=/proc/nope",), "/proc/nope"),
    (("seed=${oc.env:HOME}",), "seed"),
    (("seed=${nonexistent}",), "nonexistent"),
    (("seed=${oc.env:NOPE_NOT_SET}",), "nope_not_set"),
    (("model.hidden=${model.hidden}",), "model.hidden"),
    (("seed=${oc.decode:'1+1'}",), "seed"),
    (("seed=glob(*)",), "seed"),
    (("seed",), "seed"),
    (("=1",), ""),
    (("seed==1",), "seed"),
    (("seed='1",), ""),
    (("trainer={num_steps: 5}",), "trainer"),
    (("seed=[1,2]",), "seed"),
    (("-m", "seed=choice(0,abc)"), "abc"),
    (("-m", "optim.learning_rate=0.01,-1"), "optim.learning_rate=-1"),
    (("-m", "seed=4294967296,0"), "seed"),
    (("-m", "optim.learning_rate=0.01,nan"), "nan"),
]

# Inputs that pass every check and fail in training: the run (or each member's run and the
# sweep's parent) ends FAILED with its error (case C24; issue 14, item 12).
FAILURES = [
    ("optim.learning_rate=1e30", "trainer.on_nonfinite=skip"),
    ("-m", "seed=0,1", "optim.learning_rate=1e30"),
]

# Tracking URIs and names (issue 13 item 3, issue 14 item 13).
TRACKING = [
    (("tracking.uri=sqlite://",), USAGE, "sqlite"),
    (("tracking.uri=sqlite:///",), USAGE, "sqlite"),
    (("tracking.uri=sqlite:///:memory:",), USAGE, "memory"),
    (("tracking.uri=sqlite:///adir",), USAGE, "folder"),         # adir/ is made first
    (("tracking.uri=sqlite:////proc/nope/mlflow.db",), USAGE, "/proc/nope"),
    (("tracking.uri=nope://x",), USAGE, "nope"),
    (("tracking.experiment_name=" + "x" * 600,), USAGE, "500"),
    (("tracking.experiment_name=",), USAGE, "experiment_name"),
    (("tracking.run_name=" + "r" * 600,), SUCCESS, ""),           # MLflow keeps 5000
    (("tracking.experiment_name='../../../escaped_exp'",), SUCCESS, ""),
    (("tracking.experiment_name='a#b'",), SUCCESS, ""),
]

# CSV files: data=csv data.path=t.csv data.target=[y] with t.csv holding these bytes.
_ROWS = "".join(f"{i % 7},{i % 5},{(i * 3) % 11}\n" for i in range(60))
GOOD_CSV = ("a,b,y\n" + _ROWS).encode()
CSV_FILES = [
    ("empty", b"", USAGE, "empty"),
    ("header only", b"a,b,y\n", USAGE, "row"),
    ("no target column", ("a,b,c\n" + _ROWS).encode(), USAGE, "'y'"),
    ("duplicate columns", ("y,a,y\n" + _ROWS).encode(), USAGE, "more than once"),
    ("ragged rows", ("a,b,y\n" + _ROWS + "1,2\n3,4,5,6\n").encode(), USAGE, "row"),
    ("not utf-8", ("a,b,y\n" + _ROWS).encode() + b"\xff\xfe,1,2\n", USAGE, "utf-8"),
    ("bad target cell", ("a,b,y\n" + _ROWS + "1,2,hello\n").encode(), USAGE, "hello"),
    ("nan target cell", ("a,b,y\n" + _ROWS + "1,2,NaN\n").encode(), USAGE, "nan"),
    ("huge feature", ("a,b,y\n" + _ROWS + "1e200,2,3\n").encode(), USAGE, "'a'"),
    ("huge target", ("a,b,y\n" + _ROWS + "1,2,1e300\n").encode(), USAGE, "'y'"),
    ("text feature", ("a,b,y\n" + _ROWS + "x,2,3\n").encode(), USAGE, "'a'"),
    ("good", GOOD_CSV, SUCCESS, ""),
]

# Values out of range, huge, or past what the device or the memory takes, key by key, with
# the class each must get; a few in-range values show the checks are not blanket refusals.
# Every key of the schemas must appear here (test_every_schema_key_is_in_the_corpus).
HUGE = "99999999999999999999"       # past int64
INT32 = "2147483648"                # past int32, the device's step counter
U, F, S = USAGE, FAILED, SUCCESS
# the schedule a key shapes, set beside it
EXTRA = {"optim.transition_begin": ("optim.schedule=linear",),
         "optim.transition_steps": ("optim.schedule=linear",),
         "optim.decay_rate": ("optim.schedule=exponential",),
         "optim.staircase": ("optim.schedule=exponential",)}
# where the message names something other than the key (lower-cased fragments)
SAYS = {("data.target", "[nope]"): "'nope'", ("data.features", "[nope]"): "'nope'",
        ("data.features", "[y]"): "both target and feature",
        ("data.path", "nope.csv"): "nope.csv", ("data.path", "/proc"): "/proc"}
VALUES: dict[str, list[tuple[str, str]]] = {
    "model.init": [("nosuch", U), ("normal", S)],
    "model.init_scale": [("0", U), ("-1", U), ("nan", U), ("inf", U), ("1e30", U),
                         ("0.5", S)],
    "model.hidden": [("[]", U), ("[0]", U), ("[-1]", U), (f"[{HUGE}]", U),
                     ("[100000,100000]", U), ("[4,4]", S)],
    "model.tied_hidden": [("true", S)],
    "model.width": [("0", U), ("-1", U), (HUGE, U), ("1000000", U), ("4", S)],
    "data.val_fraction": [("0", U), ("1", U), ("-0.1", U), ("nan", U), ("inf", U),
                          ("0.8", U), ("0.2", S)],
    "data.test_fraction": [("0", U), ("1", U), ("nan", U), ("0.2", S)],
    "data.standardize": [("false", S)],
    "data.batch_size": [("0", U), ("-1", U), (HUGE, U), ("100000", S)],
    "data.cache": [("false", S)],
    "data.seed_width": [("0", U), ("-1", U), (HUGE, U), ("4", S)],
    "data.seed_x_key": [("-1", U), ("4294967296", U), (HUGE, U), ("7", S)],
    "data.seed_y_key": [("-1", U), ("4294967296", U), (HUGE, U), ("7", S)],
    "data.path": [("nope.csv", U), ("/proc", U)],
    "data.target": [("[]", U), ("[nope]", U)],
    "data.features": [("[nope]", U), ("[]", U), ("[y]", U), ("[a]", S)],
    "data.task": [("nosuch", U), ("regression", S)],
    "optim.learning_rate": [("0", U), ("-1", U), ("nan", U), ("inf", U), ("1e30", F),
                            ("0.003", S)],
    "optim.schedule": [("nosuch", U), ("cosine", S)],
    "optim.warmup_steps": [("-1", U), ("60", U), (HUGE, U), ("10", S)],
    "optim.final_lr_fraction": [("-0.1", U), ("1.5", U), ("nan", U), ("0.1", S)],
    "optim.transition_begin": [("-1", U), ("60", U), (HUGE, U), ("10", S)],
    "optim.transition_steps": [("0", U), ("-1", U), (HUGE, U), ("20", S)],
    "optim.decay_rate": [("0", U), ("-1", U), ("nan", U), ("inf", U), ("0.5", S)],
    "optim.staircase": [("true", S)],
    "optim.clip_norm": [("0", U), ("-1", U), ("nan", U), ("inf", U), ("1.0", S)],
    "optim.momentum": [("1", U), ("-0.1", U), ("nan", U), ("0.5", S)],
    "optim.weight_decay": [("-1", U), ("nan", U), ("inf", U), ("1e30", U), ("0.01", S)],
    "trainer.num_steps": [("0", U), ("-1", U), (INT32, U), (HUGE, U), ("30", S)],
    "trainer.steps_per_call": [("0", U), ("-1", U), (HUGE, U), ("7", S)],
    "trainer.log_every_steps": [("0", U), ("-1", U), (HUGE, U), ("1000", S)],
    "trainer.eval_every_steps": [("0", U), ("-1", U), (HUGE, U), ("7", S)],
    "trainer.on_nonfinite": [("nosuch", U), ("skip", S)],
    "trainer.max_skipped_fraction": [("-0.1", U), ("1", U), ("nan", U), ("0.9", S)],
    "trainer.divergence_factor": [("1", U), ("0", U), ("nan", U), ("inf", U), ("null", S)],
    "trainer.patience": [("-1", U), (HUGE, U), ("2", S)],
    "trainer.min_delta": [("-1", U), ("nan", U), ("0.01", S)],
    "trainer.progress": [("true", S)],
    "trainer.compilation_cache": [("false", S)],
    "trainer.compilation_cache_dir": [("/proc/nope", S)],
    "trainer.checkpoints": [("false", S)],
    "trainer.checkpoint_every_steps": [("-1", U), (HUGE, U), ("20", S)],
    "trainer.checkpoint_keep": [("0", U), ("-1", U), (HUGE, U), ("1", S)],
    "trainer.checkpoint_min_interval_s": [("-1", U), ("nan", U), ("0", S)],
    "gradcheck.every_steps": [("-1", U), (HUGE, U), ("0", S)],
    "gradcheck.fail_run": [("true", S)],
    "gradcheck.probe_batch_size": [("0", U), ("-1", U), (HUGE, U), ("8", S)],
    "gradcheck.rel_tol": [("0", U), ("-1", U), ("nan", U), ("inf", U), ("1e-6", S)],
    "gradcheck.max_elements": [("0", U), (HUGE, U), ("16", S)],
    "gradcheck.num_directions": [("0", U), ("100000000", U), (HUGE, U), ("2", S)],
    "gradcheck.richardson": [("true", S)],
    "gradcheck.hvp": [("true", S)],
    "tracking.uri": [],              # TRACKING below
    "tracking.experiment_name": [],
    "tracking.run_name": [("my-run", S)],
    "tracking.register_model": [("m" * 600, U)],
    "population.members": [("[1]", U), ("[{model.hidden: [4]}]", U), ("[{seed: abc}]", U),
                           ("[{seed: -1}]", U), ("[{seed: 0},{seed: 1}]", S)],
    "population.parent_run_id": [],  # the sweeper's; a lone run has no parent to use
    "population.sweep_id": [],
    "population.rerun": [("true", S)],
    "population.host_devices": [("0", U), ("-1", U), (HUGE, U)],
    "search.num_trials": [("0", U), ("-1", U), (HUGE, U)],
    "search.trials_per_batch": [("0", U), ("-1", U), (HUGE, U)],
    "search.metric": [("nosuch", U), ("test_loss", U)],
    "search.direction": [("maximize", U), ("nosuch", U)],
    "search.study_name": [],
    "search.storage": [("nope://x", U)],
    "search.stale_after_s": [("-1", U), ("nan", U)],
    "search.sampler.name": [("nosuch", U)],
    "search.sampler.seed": [("-1", U), (HUGE, U)],
    "search.sampler.constant_liar": [],
    "search.sampler.n_startup_trials": [("-1", U), (HUGE, U)],
    "seed": [("-1", U), ("4294967296", U), (HUGE, U), ("7", S)],
    "mode": [("nosuch", U)],
    "resume": [("nosuch", U), ("latest", U)],   # in the store: the CLI sample checks them
}


def build() -> list[Case]:
    """The whole corpus, in a fixed order."""
    cases: list[Case] = []
    for key, select, tp in _schema_keys():
        base = _base_type(tp)
        if typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            wrong = WRONG_LIST.get(item, ["abc"])
        elif key in ("population.members",):
            wrong = ["abc"]
        else:
            wrong = WRONG_TYPE.get(base, [])
        if key in ("tracking.experiment_name", "tracking.run_name", "resume",
                   "search.study_name", "population.parent_run_id", "population.sweep_id",
                   "search.storage", "tracking.register_model", "tracking.uri",
                   "trainer.compilation_cache_dir", "data.path", "mode"):
            wrong = ["[a]"]        # any scalar is a string
        files = {"t.csv": GOOD_CSV} if "data=csv" in select else {}
        start = () if select == TIED else BASE
        select = (*select, *EXTRA.get(key, ()))
        for value in wrong:
            cases.append(Case((*start, *select, f"{key}={value}"), USAGE, key, files))
        for value, expected in VALUES[key]:
            says = SAYS.get((key, value), key) if expected == USAGE else ""
            cases.append(Case((*start, *select, f"{key}={value}"), expected, says, files))
    for args, says in HYDRA_SYNTAX:
        cases.append(Case(_flags_first(*BASE, *args), USAGE, says))
    for args in FAILURES:
        cases.append(Case(_flags_first(*BASE, *args), FAILED))
    for args, expected, says in TRACKING:
        files = {"adir": None} if "adir" in args[0] else {}
        cases.append(Case((*BASE, *args), expected, says, files))
    for name, body, expected, says in CSV_FILES:
        cases.append(Case((*BASE, "data=csv", "data.path=t.csv", "data.target=[y]",
                           f"tracking.run_name={name.replace(' ', '-')}"),
                          expected, says, files={"t.csv": body}))
    return cases


CORPUS = build()
