"""Hyperparameter search (trainer/search/): Optuna asks, populations train, Optuna is told.

In-process tests cover the space, the checks, the grouping of a batch and the recovery of
trials whose process died, against a real Optuna journal storage. The slow tests run the
CLI: a search whose batch is one program and whose record matches the study, and a search
killed with SIGKILL mid-batch that the same command continues.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from conftest import cli_env, store_client, wait_gone
from trainer.config import CONF_DIR, ConfigError, check_overrides, register_configs
from trainer.loop import RunResult
from trainer.search import (Space, check_search, fail_dead_trials, group_trials, make_space,
                            objective_value, open_study)


def _compose(*overrides: str, experiment: str | None = "diabetes"):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", [f"+experiment={experiment}"] * bool(experiment) + list(overrides))


def test_space_reads_nested_keys_and_round_trips_list_choices():
    import optuna.distributions as od

    cfg = _compose("+search=lr_width")
    space = check_search(cfg)
    assert list(space.distributions) == ["optim.learning_rate", "model.hidden"]
    lr = space.distributions["optim.learning_rate"]
    assert isinstance(lr, od.FloatDistribution) and lr.log and (lr.low, lr.high) == (1e-4, 0.3)
    hidden = space.distributions["model.hidden"]
    assert isinstance(hidden, od.CategoricalDistribution)
    assert hidden.choices == ("[4]", "[8]", "[16]", "[32]")  # Optuna stores scalars only
    assert space.decode({"optim.learning_rate": 0.01, "model.hidden": "[16]"}) == {
        "optim.learning_rate": 0.01, "model.hidden": [16]}
    # a command-line override reaches a nested key
    cfg = _compose("+search=lr_wd", "search.space.optim.learning_rate.high=0.05")
    assert check_search(cfg).distributions["optim.learning_rate"].high == 0.05


@pytest.mark.parametrize("overrides, message", [
    (["search.metric=test_rmse"], "the test split is held out"),
    (["search.direction=up"], "minimize or maximize"),
    (["search.direction=maximize"], "is a loss; minimize it"),
    (["search.sampler.name=cma"], "choose one of tpe, random, qmc"),
    (["search.trials_per_batch=0"], "search.trials_per_batch=0: must be greater than 0"),
    (["search.space.optim.learning_rate.low=0"], "log=true needs low > 0"),
    (["search.space.optim.learning_rate.low=1", "search.space.optim.learning_rate.high=0.1"],
     "give low <= high"),
    (["optim=adam", "~experiment"], "this run's config has no optim.weight_decay"),
    (["+search.space.optim.learnig_rate={type:float,low:0.1,high:1}"], "learning_rate"),
    (["+search.space.model={type:categorical,choices:[mlp,tied]}"], "is a config group"),
])
def test_bad_search_configs_are_refused_with_the_fix(overrides, message):
    experiment = None if "~experiment" in overrides else "diabetes"
    cfg = _compose("+search=lr_wd", *(o for o in overrides if o != "~experiment"),
                   experiment=experiment)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_search(cfg)


def test_search_overrides_are_checked_before_hydra_runs():
    check_overrides(["+experiment=diabetes", "+search=lr_wd", "search.num_trials=4",
                     "search.space.optim.learning_rate.high=0.1"])
    with pytest.raises(ConfigError, match="no search named 'lr_wdd'.*did you mean 'lr_wd'"):
        check_overrides(["+experiment=diabetes", "+search=lr_wdd"])
    with pytest.raises(ConfigError, match="search.num_trial"):
        check_overrides(["+experiment=diabetes", "+search=lr_wd", "search.num_trial=4"])


def test_a_batch_splits_into_one_population_per_structural_value():
    points = [{"optim.learning_rate": 0.1, "model.hidden": [8]},
              {"optim.learning_rate": 0.2, "model.hidden": [16]},
              {"optim.learning_rate": 0.3, "model.hidden": [8]},
              {"optim.learning_rate": 0.4, "model.hidden": [16]},
              {"optim.learning_rate": 0.5, "model.hidden": [4]}]
    assert group_trials(points) == [({"model.hidden": [8]}, [0, 2]),
                                    ({"model.hidden": [16]}, [1, 3]),
                                    ({"model.hidden": [4]}, [4])]
    # only vmappable keys: the whole batch is one program
    assert group_trials([{"optim.learning_rate": 0.1, "seed": 1},
                         {"optim.learning_rate": 0.2, "seed": 2}]) == [({}, [0, 1])]


def _result(val_losses, *, failed_step=None, best_val_loss=None):
    return RunResult(test_metrics={}, baseline_metrics={}, timings={}, num_params=1,
                     num_steps=10, nonfinite_steps=0, failed_step=failed_step,
                     best_val_loss=best_val_loss,
                     history={"val_loss": (list(range(len(val_losses))), val_losses)})


def test_the_value_told_is_a_validation_loss():
    assert objective_value(_result([0.9, 0.5, 0.6]), "val_loss") == 0.6
    assert objective_value(_result([0.9, 0.5, 0.6]), "min_val_loss") == 0.5
    # early stopping keeps the best step's model: its loss is the one told
    assert objective_value(_result([0.9, 0.5, 0.6], best_val_loss=0.5), "val_loss") == 0.5
    assert objective_value(_result([0.9, float("nan")], failed_step=3), "val_loss") is None
    assert objective_value(_result([0.9, float("inf")]), "val_loss") is None


def test_trials_of_a_dead_process_are_failed_and_asked_again(tmp_path):
    """A RUNNING trial whose recorded process is gone becomes FAIL and its point is queued
    again (Optuna's retry callback); one of a live process stays RUNNING."""
    import optuna
    import psutil
    from optuna.trial import TrialState

    cfg = _compose("+search=lr_wd")
    space = check_search(cfg)
    search = cfg.search
    storage = str(tmp_path / "optuna" / "s.journal")
    study = open_study(search, study_name="s", storage=storage)
    dead, alive = study.ask(space.distributions), study.ask(space.distributions)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    dead.set_user_attr("worker", {"host": os.uname().nodename, "pid": gone.pid,
                                  "started": started})
    alive.set_user_attr("worker", {"host": os.uname().nodename, "pid": os.getpid(),
                                   "started": psutil.Process().create_time()})
    # another process opens the same journal, as a relaunch would
    again = open_study(search, study_name="s", storage=storage)
    assert fail_dead_trials(again, stale_after_s=None) == [dead.number]
    trials = optuna.load_study(study_name="s", storage=again._storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING,
                                         TrialState.WAITING]
    assert "stopped before the trial was told" in trials[0].user_attrs["failure"]
    assert trials[2].params == dead.params  # the same point, asked next
    assert trials[2].system_attrs["failed_trial"] == dead.number
    assert again.ask(space.distributions).params == dead.params


def test_a_relaunch_asks_new_points_and_keeps_the_study_comparable(tmp_path):
    """Optuna keeps no sampler state in the storage: each batch's sampler is seeded with
    the trials already asked, so a relaunch (a new process, the same seed) does not ask the
    first process's points again. A relaunch with another metric or training config is
    refused; a widened space is not."""
    from trainer.search import reseed

    cfg = _compose("+search=lr_wd")
    space = check_search(cfg)
    storage = str(tmp_path / "s.journal")
    first = open_study(cfg.search, study_name="s", storage=storage, config_hash="a")
    reseed(first, cfg.search, storage=storage)
    asked = [first.ask(space.distributions).params for _ in range(3)]
    again = open_study(cfg.search, study_name="s", storage=storage, config_hash="a")
    reseed(again, cfg.search, storage=storage)
    later = [again.ask(space.distributions).params for _ in range(3)]
    assert not [p for p in later if p in asked]
    # the same seed and trials give the same points: a lone search is reproducible
    other = open_study(cfg.search, study_name="t", storage=str(tmp_path / "t.journal"))
    reseed(other, cfg.search, storage=str(tmp_path / "t.journal"))
    assert [other.ask(space.distributions).params for _ in range(3)] == asked
    with pytest.raises(ConfigError, match="holds values of search.metric=val_loss"):
        open_study(_compose("+search=lr_wd", "search.metric=min_val_loss").search,
                   study_name="s", storage=storage, config_hash="a")
    with pytest.raises(ConfigError, match="another training config"):
        open_study(cfg.search, study_name="s", storage=storage, config_hash="b")
    wider = _compose("+search=lr_wd", "search.space.optim.learning_rate.high=0.9").search
    assert open_study(wider, study_name="s", storage=storage, config_hash="a") is not None


def test_multirun_with_a_search_is_refused_before_anything_runs(run_cli, tmp_path):
    proc = run_cli("-m", "+experiment=diabetes", "+search=lr_wd")
    assert proc.returncode == 2
    assert "+search asks its own points: run it without -m" in proc.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()


def _study(storage: str):
    import optuna

    return optuna.load_study(study_name="diabetes-lr_wd", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))


SHORT = ("trainer.num_steps=200", "trainer.steps_per_call=100", "trainer.eval_every_steps=50",
         "trainer.log_every_steps=50")


@pytest.mark.slow
def test_search_batch_is_one_program_and_child_runs_match_trials(run_cli, tmp_path):
    """4 trials asked at once train as ONE population (one compile, 4 members); each trial's
    child run holds its params and the value told; the parent names the best trial."""
    proc = run_cli("+experiment=diabetes", "+search=lr_wd", "search.num_trials=4",
                   "search.trials_per_batch=4", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Validating input example" not in proc.stdout + proc.stderr  # MLflow's INFO lines
    study = _study(str(tmp_path / "mlruns" / "optuna" / "diabetes-lr_wd.journal"))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    client = store_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("diabetes").experiment_id])
    parents = [r for r in runs if r.data.tags.get("population.role") == "parent"]
    children = {int(r.data.tags["search.trial"]): r for r in runs if "search.trial" in r.data.tags}
    assert len(parents) == 1 and sorted(children) == [0, 1, 2, 3]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for t in trials:
        run = children[t.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for key, value in t.params.items():
            assert float(run.data.params[key]) == value
        assert run.data.metrics["search/value"] == pytest.approx(t.value, rel=1e-12)
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        # one program: the batch is one population of 4, compiled once
        assert run.data.tags["population.size"] == "4"
        assert run.data.metrics["xla/num_compiles"] == 1
    best = min(trials, key=lambda t: t.value)
    tags = parent.data.tags
    assert tags["search.best_trial"] == str(best.number)
    assert tags["search.best_run_id"] == children[best.number].info.run_id
    assert float(tags["search.best.optim.learning_rate"]) == best.params["optim.learning_rate"]
    assert parent.data.metrics["search/best_value"] == pytest.approx(best.value, rel=1e-12)
    assert tags["search.study"] == "diabetes-lr_wd"
    # 4 trials: the history; importances need IMPORTANCE_MIN_TRIALS
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert artifacts == {"optuna/optimization_history.png"}


@pytest.mark.slow
def test_two_workers_share_one_study_and_one_parent(tmp_path):
    """Two processes started at once with the same command share the study: 4 trials in
    all, each with one FINISHED run under ONE parent; a third launch finds nothing to do."""
    args = [sys.executable, "-m", "trainer", "+experiment=diabetes", "+search=lr_wd",
            "search.num_trials=4", "search.trials_per_batch=2", *SHORT]
    workers = [subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    told = [int(re.search(r": (\d+) trial\(s\) told by this process", out)[1])
            for out, _ in outputs]
    assert sum(told) == 4
    trials = _study(str(tmp_path / "mlruns" / "optuna" / "diabetes-lr_wd.journal")).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    client = store_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("diabetes").experiment_id])
    parents = [r for r in runs if r.data.tags.get("population.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    numbers = sorted(int(r.data.tags["search.trial"]) for r in runs
                     if "search.trial" in r.data.tags and r.info.status == "FINISHED")
    assert numbers == [0, 1, 2, 3]
    again = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 trial(s) told by this process" in again.stdout


@pytest.mark.slow
def test_search_continues_after_its_process_is_killed(tmp_path):
    """SIGKILL while the second batch trains; the same command marks that batch's trials
    FAIL, asks their points again, ends their runs KILLED and completes the study."""
    journal = tmp_path / "mlruns" / "optuna" / "diabetes-lr_wd.journal"
    args = [sys.executable, "-m", "trainer", "+experiment=diabetes", "+search=lr_wd",
            "search.num_trials=4", "search.trials_per_batch=2", "trainer.num_steps=20000",
            "trainer.steps_per_call=500", "trainer.log_every_steps=500",
            "trainer.eval_every_steps=1000", "gradcheck.every_steps=0"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    state = []
    try:
        while time.monotonic() < deadline:
            if journal.exists():
                state = [t.state.name for t in _study(str(journal)).get_trials()]
                if state.count("COMPLETE") == 2 and "RUNNING" in state:
                    break
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail(f"no second batch in flight (trials: {state})")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert wait_gone(proc.pid, 5)
    running = [t for t in _study(str(journal)).get_trials() if t.state.name == "RUNNING"]
    client = store_client(tmp_path)
    time.sleep(0.5)
    again = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "marked FAIL, asked again" in again.stdout
    trials = _study(str(journal)).get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == len(running)
    retried = {t.system_attrs.get("failed_trial"): t for t in trials if t.state.name == "COMPLETE"}
    for dead in running:
        assert retried[dead.number].params == dead.params  # the same point, trained again
    runs = client.search_runs([client.get_experiment_by_name("diabetes").experiment_id])
    by_trial = {}
    for r in runs:
        if "search.trial" in r.data.tags:
            by_trial[int(r.data.tags["search.trial"])] = r.info.status
    assert sorted(by_trial.values()).count("FINISHED") == 4
    for dead in running:  # runs of the dead process do not stay RUNNING
        assert by_trial.get(dead.number, "KILLED") == "KILLED"
    parents = [r for r in runs if r.data.tags.get("population.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["resume_count"] == "1"
