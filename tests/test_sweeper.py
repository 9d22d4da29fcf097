"""The population sweeper (``hydra/sweeper=population``) and Hydra's own group overrides.

The grouping is a pure function, tested on override strings. The plugin itself runs
inside a real in-process Hydra multirun with a task that only records its config, and a
stand-in for ``trainer.sweep`` (the sweep record), so no job trains here; the CLI tests
(test_cli.py) run the real thing.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

from hydra_plugins.trainer_population_sweeper.population_sweeper import (
    group_points, members_override, render_value)
from trainer.config import CONF_DIR, VMAPPABLE_KEYS, ConfigError, check_overrides, \
    register_configs

LRS = ("1e-3", "3e-3", "1e-2", "3e-2")
SWEEP_4X4 = ["+experiment=smoke", f"optim.learning_rate={','.join(LRS)}", "seed=range(4)"]
# What the population sweeper hands the launcher for SWEEP_4X4 (before the sweep ids).
OVERRIDES_4X4 = [
    "+experiment=smoke",
    "population.members=["
    + ",".join(f"{{optim.learning_rate:{float(lr)!r},seed:{seed}}}"
               for lr in LRS for seed in range(4))
    + "]",
]


def expand(arguments: list[str]) -> list[list[str]]:
    """The points of a sweep, as Hydra's BasicSweeper expands them (no config groups)."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    (points,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return points


def parse_members(override: str) -> list[dict]:
    (ov,) = OverridesParser.create().parse_overrides([override])
    assert ov.key_or_group == "population.members"
    return ov.value()


# --- grouping --------------------------------------------------------------------------------

def test_lr_by_seed_is_one_group_of_16_members_in_sweep_order():
    points = expand(SWEEP_4X4)
    assert len(points) == 16
    (group,) = group_points(points)
    assert group.structural == ("+experiment=smoke",)
    assert list(group.members) == [{"optim.learning_rate": float(lr), "seed": seed}
                                   for lr in LRS for seed in range(4)]
    assert group.overrides() == OVERRIDES_4X4


def test_widths_are_separate_groups():
    """model.hidden changes the program: one group per width, the rates inside each."""
    points = expand(["+experiment=smoke", "model.hidden=[8],[16]",
                     "optim.learning_rate=0.1,0.01"])
    groups = group_points(points)
    assert [g.structural for g in groups] == [("+experiment=smoke", "model.hidden=[8]"),
                                              ("+experiment=smoke", "model.hidden=[16]")]
    for group in groups:
        assert list(group.members) == [{"optim.learning_rate": 0.1},
                                       {"optim.learning_rate": 0.01}]


def test_structural_overrides_equal_up_to_order_group_together():
    points = [["model=mlp", "trainer.num_steps=10", "seed=0"],
              ["trainer.num_steps=10", "seed=1", "model=mlp"],
              ["model=tied", "trainer.num_steps=10", "seed=2"],
              ["model.hidden=[ 8 ]", "optim.learning_rate=3e-3"],  # Hydra spells it [8]
              ["optim.learning_rate=0.1", "model.hidden=[8]"]]
    groups = group_points(points)
    assert [g.structural for g in groups] == [("model=mlp", "trainer.num_steps=10"),
                                              ("model=tied", "trainer.num_steps=10"),
                                              ("model.hidden=[ 8 ]",)]
    assert [list(g.members) for g in groups] == [
        [{"seed": 0}, {"seed": 1}], [{"seed": 2}],
        [{"optim.learning_rate": 0.003}, {"optim.learning_rate": 0.1}]]


def test_points_without_member_keys_are_one_member_each():
    groups = group_points(expand(["+experiment=smoke", "model=mlp,tied"]))
    assert [g.structural for g in groups] == [("+experiment=smoke", "model=mlp"),
                                              ("+experiment=smoke", "model=tied")]
    assert [g.overrides()[-1] for g in groups] == ["population.members=[{}]"] * 2
    # the same point twice: two members of one job
    # (fields, not Group equality: Hydra's plugin scan re-executes the module, so the
    # class imported here may no longer be the one group_points builds)
    (group,) = group_points([["trainer.num_steps=5"], ["trainer.num_steps=5"]])
    assert (group.structural, group.members) == (("trainer.num_steps=5",), ({}, {}))


def test_only_plain_assignments_of_vmappable_keys_are_member_values():
    """`+key` (add) and `~key` (delete) change the config's shape: structural, left for
    Hydra to judge; `++key` sets the value like `key=`."""
    groups = group_points([["+seed=1"], ["~seed"], ["++seed=2"], ["seed=3"]])
    assert [g.structural for g in groups] == [("+seed=1",), ("~seed",), ()]
    assert groups[2].members == ({"seed": 2}, {"seed": 3})


def test_every_vmappable_key_is_a_member_value():
    point = [f"{key}=0.5" for key in VMAPPABLE_KEYS]
    (group,) = group_points([point])
    assert group.structural == ()
    assert group.members == ({key: 0.5 for key in VMAPPABLE_KEYS},)


def test_keys_the_sweeper_sets_are_refused():
    from hydra.errors import HydraException

    for override in ("population.members=[{seed:1}]", "population.sweep_id=x",
                     "population.parent_run_id=abc"):
        with pytest.raises(HydraException, match="hydra/sweeper=basic"):
            group_points([["seed=0", override]])


VALUES = [3e-3, 1e-30, -1e-30, 0.1, 1 / 3, 1e16, 2.5e-308, 5e-324, -0.0, 0, 7, -3, 10**20,
          None, True, False, math.inf, -math.inf]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_member_values_round_trip(value):
    """The members override parses back to exactly the values of the points."""
    text = members_override([{"seed": 0, "optim.learning_rate": value}, {"seed": 1}])
    (first, second) = parse_members(text)
    assert list(first) == ["seed", "optim.learning_rate"]
    got = first["optim.learning_rate"]
    assert type(got) is type(value) and got == value
    if isinstance(value, float):
        assert math.copysign(1, got) == math.copysign(1, value)
    assert second == {"seed": 1}


def test_values_written_on_the_command_line_round_trip():
    """Whatever spelling the sweep used, the member gets the value Hydra parsed for it."""
    swept = ["3e-3", "1e-30", "-1e-30", "1_000", "-7", "null", "nan", "0.1"]
    points = expand([f"optim.clip_norm={','.join(swept)}"])
    (group,) = group_points(points)
    members = parse_members(group.overrides()[-1])
    expected = [OverridesParser.create().parse_overrides([p[0]])[0].value() for p in points]
    got = [m["optim.clip_norm"] for m in members]
    assert len(got) == len(expected) == len(swept)
    for g, e in zip(got, expected):
        assert (g == e or (math.isnan(g) and math.isnan(e))) and type(g) is type(e), (g, e)
    assert got[:3] == [0.003, 1e-30, -1e-30] and got[3:6] == [1000, -7, None]


@pytest.mark.parametrize("text", ["abc", "a b", "1e3", "null", "true", "12345", "", "it's",
                                  'say "hi"', "back\\slash", "ends\\", "\\'", "a,b:c=d[e]{f}",
                                  "${oc.env:HOME}", "ümlaut"])
def test_strings_round_trip_and_stay_strings(text):
    """Strings are always quoted: a run id of digits or '1e3' must not turn into a number."""
    (ov,) = OverridesParser.create().parse_overrides([f"x={render_value(text)}"])
    assert ov.value() == text
    (member,) = parse_members(members_override([{"seed": text}]))
    assert member["seed"] == text


def test_nested_values_round_trip():
    value = [1, [2.5, None], {"a.b": "c", "d": [True]}]
    (ov,) = OverridesParser.create().parse_overrides([f"x={render_value(value)}"])
    assert ov.value() == value


# --- the plugin inside Hydra ------------------------------------------------------------------

def test_plugin_is_discovered_and_registered():
    """Hydra's plugin scan finds the sweeper, and its config is `hydra/sweeper: population`."""
    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)]
    assert names.count(
        "hydra_plugins.trainer_population_sweeper.population_sweeper.PopulationSweeper") == 1
    from hydra.core.config_store import ConfigStore

    assert "population.yaml" in ConfigStore.instance().list("hydra/sweeper")
    assert "basic.yaml" in ConfigStore.instance().list("hydra/sweeper")


class FakeSweepRecord:
    """Stands in for ``trainer.sweep``: records what the sweeper passes it."""

    SWEEP_ID = "20261202"              # digits: must reach the job as a string
    PARENT_RUN_ID = "1234e5"           # would read as a float unquoted
    OVERRIDES = [f"population.sweep_id='{SWEEP_ID}'",  # what each job gets, quoted
                 f"population.parent_run_id='{PARENT_RUN_ID}'"]

    def __init__(self, parent: bool = True):
        self.opened: list[dict] = []
        self.closed: list[list] = []
        self.parent = parent
        self.module = types.ModuleType("trainer.sweep")
        self.module.open_sweep = self.open_sweep

    def open_sweep(self, job_config, *, arguments, num_points, num_groups):
        self.opened.append({"job_config": job_config, "arguments": arguments,
                            "num_points": num_points, "num_groups": num_groups})
        return types.SimpleNamespace(sweep_id=self.SWEEP_ID,
                                     parent_run_id=self.PARENT_RUN_ID if self.parent else None,
                                     close=self.closed.append)


@pytest.fixture
def multirun(tmp_path, monkeypatch, hydra_restore_singletons):
    """``multirun(*overrides, task=None, parent=True)`` runs Hydra's multirun in this
    process over the real config, with a task that records each job (and calls ``task``),
    and a ``FakeSweepRecord`` as ``trainer.sweep`` (also kept as ``multirun.record``).
    Returns (jobs, record, returns)."""

    def run(*overrides: str, task=None, parent: bool = True):
        record = run.record = FakeSweepRecord(parent=parent)
        monkeypatch.setitem(sys.modules, "trainer.sweep", record.module)
        register_configs()
        OmegaConf.register_new_resolver("trainer.launch_id", lambda: "test", replace=True)
        jobs = []

        def record_job(cfg):
            hydra_cfg = HydraConfig.get()
            jobs.append({"num": hydra_cfg.job.num,
                         "overrides": list(hydra_cfg.overrides.task),
                         "population": OmegaConf.to_container(cfg.population),
                         "output_dir": hydra_cfg.runtime.output_dir,
                         "sweeper": hydra_cfg.sweeper._target_})
            if task is not None:
                task(cfg)
            return hydra_cfg.job.num

        # as trainer.task.JobTask: the sweeper hands the task its jobs' exit codes
        run.returned = []
        record_job.record_returns = run.returned.extend
        hydra_ = Hydra.create_main_hydra2(
            task_name="trainer", config_search_path=create_config_search_path(f"file://{CONF_DIR}"))
        try:
            returns = hydra_.multirun(
                config_name="config", task_function=record_job, with_log_configuration=False,
                overrides=[*overrides, f"hydra.sweep.dir={tmp_path / 'multirun'}",
                           "hydra/job_logging=none"])
        finally:
            GlobalHydra.instance().clear()
        return jobs, record, returns

    return run


def test_sweeper_launches_one_job_per_group(multirun):
    """2 widths x 2 rates x 2 seeds: two jobs, each with four members in sweep order, the
    sweep id and parent run; the sweep record opened with the first job's config and
    closed with every job's return."""
    jobs, record, returns = multirun("+experiment=smoke", "model.hidden=[8],[16]",
                                     "optim.learning_rate=0.1,0.01", "seed=0,1")
    assert [job["num"] for job in jobs] == [0, 1]
    assert all(job["sweeper"].endswith(".PopulationSweeper") for job in jobs)
    members = [{"optim.learning_rate": lr, "seed": seed} for lr in (0.1, 0.01) for seed in (0, 1)]
    for job, width in zip(jobs, (8, 16)):
        assert job["population"]["members"] == members
        assert job["population"]["sweep_id"] == FakeSweepRecord.SWEEP_ID
        assert job["population"]["parent_run_id"] == FakeSweepRecord.PARENT_RUN_ID
        assert job["overrides"][:2] == ["+experiment=smoke", f"model.hidden=[{width}]"]
        assert job["overrides"][3:] == FakeSweepRecord.OVERRIDES
    assert jobs[0]["output_dir"] != jobs[1]["output_dir"]

    (opened,) = record.opened
    assert opened["num_points"] == 8 and opened["num_groups"] == 2
    assert opened["arguments"] == ["+experiment=smoke", "model.hidden=[8],[16]",
                                   "optim.learning_rate=0.1,0.01", "seed=0,1"]
    first = opened["job_config"]
    assert list(first.model.hidden) == [8] and len(first.population.members) == 4
    assert first.hydra.job.name == "trainer"
    (closed,) = record.closed
    assert [r.return_value for r in closed] == [0, 1]
    assert [len(batch) for batch in returns] == [2]


def test_sweeper_hands_the_task_every_exit_code(multirun):
    """A launcher that runs jobs in other processes leaves the command's task object without
    their exit codes: the sweeper passes them (trainer.task.JobTask.record_returns)."""
    multirun("+experiment=smoke", "model.hidden=[8],[16]", "seed=0,1")
    assert multirun.returned == [0, 1]  # record_job returns the job's number


def test_job_task_pickles_and_keeps_exit_codes():
    """Launchers pickle the task (cloudpickle); a job that raised counts as failed."""
    import pickle

    from trainer.task import JobTask

    task = pickle.loads(pickle.dumps(JobTask()))
    task.record_returns([0, None, 2])
    assert task.exit_codes == [0, 1, 2]


def test_sweep_without_parent_run_sets_no_parent(multirun):
    jobs, _, _ = multirun("+experiment=smoke", "seed=0,1,2", parent=False)
    (job,) = jobs
    assert job["population"]["members"] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    assert job["population"]["parent_run_id"] is None
    assert not [o for o in job["overrides"] if o.startswith("population.parent_run_id")]


def test_glob_and_range_sweeps_expand_as_basic_sweeper(multirun):
    """Group sweeps (glob over config options) and range() expand as in BasicSweeper."""
    jobs, record, _ = multirun("+experiment=smoke", "optim=glob(adam*)", "seed=range(3)")
    assert [job["overrides"][:2] for job in jobs] == [["+experiment=smoke", "optim=adam"],
                                                      ["+experiment=smoke", "optim=adamw"]]
    assert all(job["population"]["members"] == [{"seed": s} for s in range(3)] for job in jobs)
    assert record.opened[0]["num_points"] == 6


def test_basic_sweeper_still_runs_one_job_per_point(multirun):
    """hydra/sweeper=basic is Hydra's own sweeper: one job per point, no population, no
    sweep record."""
    jobs, record, _ = multirun("hydra/sweeper=basic", "+experiment=smoke",
                               "optim.learning_rate=0.1,0.01", "seed=0,1")
    assert len(jobs) == 4
    assert all(job["sweeper"].endswith(".BasicSweeper") for job in jobs)
    assert all(job["population"]["members"] == [] for job in jobs)
    assert [job["overrides"][1:] for job in jobs] == [
        [f"optim.learning_rate={lr}", f"seed={s}"] for lr in (0.1, 0.01) for s in (0, 1)]
    assert record.opened == []


def test_failed_job_closes_the_record_then_fails_the_sweep(multirun):
    """C02: one job raising does not stop the other; the record is closed with every
    return, then the sweep raises the job's error as BasicSweeper does."""
    def fail_narrow(cfg):
        if list(cfg.model.hidden) == [8]:
            raise RuntimeError("job failed on purpose")

    with pytest.raises(RuntimeError, match="on purpose"):
        multirun("+experiment=smoke", "model.hidden=[8],[16]", "seed=0,1", task=fail_narrow)
    (closed,) = multirun.record.closed
    assert [r.status.name for r in closed] == ["FAILED", "COMPLETED"]


def test_bad_point_fails_before_the_record_opens(multirun):
    """Every job is composed before the sweep record opens: a bad option opens nothing."""
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="nosuch"):
        multirun("+experiment=smoke", "model=mlp,nosuch", "seed=0,1")
    assert multirun.record.opened == []


def test_exact_text_of_a_4x4_sweep(multirun):
    """4 rates x 4 seeds on the command line: the one job's exact overrides."""
    jobs, _, _ = multirun(*SWEEP_4X4)
    (job,) = jobs
    assert job["overrides"] == [*OVERRIDES_4X4, *FakeSweepRecord.OVERRIDES]
    assert len(job["population"]["members"]) == 16


# --- Hydra's own group overrides pass the pre-check ------------------------------------------

@pytest.mark.parametrize("overrides", [
    ["+experiment=smoke", "hydra/launcher=basic"],
    ["+experiment=smoke", "hydra/job_logging=disabled", "hydra/hydra_logging=none"],
    ["+experiment=smoke", "hydra/sweeper=basic"],
    ["+experiment=smoke", "hydra/sweeper=population"],
    ["+experiment=smoke", "hydra.job.chdir=true", "hydra/job_logging=stdout"],
    ["+experiment=smoke", "~hydra/job_logging"],
    ["+experiment=smoke", "hydra.searchpath=[file:///elsewhere]", "hydra/launcher=mine"],
])
def test_hydra_group_overrides_pass(overrides):
    check_overrides(overrides)


@pytest.mark.parametrize(("override", "message"), [
    ("hydra/launcher=nope", "'hydra/launcher=nope': no hydra/launcher named 'nope' "
                            "(choose one of: basic"),
    ("hydra/sweeper=basik", "no hydra/sweeper named 'basik'; did you mean 'basic'?"),
    ("hydra/lancher=basic", "Hydra has no config group 'hydra/lancher'; did you mean "
                            "'hydra/launcher'?"),
])
def test_unknown_hydra_group_or_option_is_one_clear_error(override, message):
    with pytest.raises(ConfigError) as err:
        check_overrides(["+experiment=smoke", override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)
