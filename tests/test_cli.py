"""End-to-end tests of ``python -m trainer``: the real CLI in a subprocess, read back from MLflow.

Each test launches the CLI in a temporary launch directory (the default store is
``<launch>/mlruns/mlflow.db``) and checks what the store holds afterwards. Every CLI
start costs seconds of imports, so the tests use ``+experiment=smoke`` with small
overrides, reuse one run for several checks and start independent jobs side by side.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import split_runs, REPO, all_runs, cli_env, store_client, wait_gone

pytestmark = pytest.mark.slow

SMOKE = "+experiment=smoke"
SMOKE_STEPS = 60          # trainer.num_steps of conf/experiment/smoke.yaml
LONG_RUN = ("trainer.num_steps=2000000", "trainer.steps_per_call=1000")  # minutes, not seconds
HUGE = 1e300              # MLflow stores +inf as 1.797e308; no stored value may come near it


# --- helpers ------------------------------------------------------------------------------

def start_cli(*args: str, cwd: Path, env: dict | None = None,
              log: Path | None = None) -> subprocess.Popen:
    """Start ``python -m trainer`` without waiting. With ``log``, stdout and stderr go to
    that file (polled by ``wait_for_output``); else they are captured as text pipes."""
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115
    err = subprocess.STDOUT if log is not None else subprocess.PIPE
    # As from a terminal: a test session started in the background (`make test &`) has
    # SIGINT ignored, which a child inherits through exec (a handled signal is reset to
    # the default), and Python then never raises KeyboardInterrupt for Ctrl-C. Not a
    # preexec_fn: forking the multithreaded test process is what JAX warns against.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=cwd,
                                env=env or cli_env(), stdout=out, stderr=err, text=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log is not None:
        out.close()  # the child holds its own copy
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a process from ``start_cli`` (pipes); returns (exit code, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"CLI still running after {timeout} s:\n{out}\n{err}")
    return proc.returncode, out or "", err or ""


def sqlite_uri(db: Path) -> str:
    return f"sqlite:///{db.resolve()}"


def default_uri(launch: Path) -> str:
    return sqlite_uri(launch / "mlruns" / "mlflow.db")


def history(client, run_id: str, key: str) -> list:
    """Metric points of ``key`` ordered by step."""
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def assert_no_huge_values(client, run) -> None:
    """C07: every stored point of every metric is finite and far below MLflow's inf stand-in."""
    for key in run.data.metrics:
        for point in client.get_metric_history(run.info.run_id, key):
            assert math.isfinite(point.value) and abs(point.value) < HUGE, (key, point)


def wait_for_training(proc: subprocess.Popen, log: Path, launch: Path,
                      timeout: float = 120) -> tuple[object, str]:
    """Wait until the job's run is RUNNING in the default store with some train_loss points.

    The store is opened only after the CLI printed its run id, so the test never races the
    CLI in creating the database. Returns (client, run id).
    """
    deadline = time.monotonic() + timeout
    run_id = None
    while run_id is None:
        assert proc.poll() is None, f"CLI exited early ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no run started:\n{log.read_text()}"
        for line in log.read_text().splitlines():
            if line.startswith("run ") and "in experiment" in line:
                run_id = line.split()[1]
        time.sleep(0.2)
    client = store_client(launch)
    while True:
        assert proc.poll() is None, f"CLI exited early ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no train_loss points:\n{log.read_text()}"
        run = client.get_run(run_id)
        points = client.get_metric_history(run_id, "curves/train_loss")
        if run.info.status == "RUNNING" and len(points) >= 2:
            return client, run_id
        time.sleep(0.3)


# --- a plain run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def basic_run(tmp_path_factory):
    """One smoke run with a changed value and an interpolated one; shared by several tests."""
    launch = tmp_path_factory.mktemp("basic")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", SMOKE, "trainer.num_steps=40",
         "tracking.run_name=${optim.name}-interp"],
        cwd=launch, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = store_client(launch)
    runs = all_runs(client)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return launch, proc, client, runs[0]


def test_basic_run_finishes_with_full_record(basic_run):
    """C03, C04: one FINISHED run with end time, tags, metrics and artifacts; stdout names
    the run id and the store."""
    launch, proc, client, run = basic_run
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None and run.info.end_time >= run.info.start_time

    tags = run.data.tags
    for key in ("git.commit", "version.jax", "jax.backend", "host", "pid", "overrides",
                "tracking_uri"):
        assert tags.get(key), f"tag {key} missing or empty: {sorted(tags)}"
    assert tags["tracking_uri"] == default_uri(launch)
    overrides = tags["overrides"].split()
    assert overrides[:2] == [SMOKE, "trainer.num_steps=40"]
    assert len(overrides) == 3 and overrides[2].startswith("tracking.run_name=")
    assert tags["jax.backend"] == "cpu"
    assert int(tags["pid"]) > 0

    metrics = run.data.metrics
    for key in ("test/rmse", "test/baseline_rmse", "time/compile_s", "time/steps_per_s",
                "time/samples_per_s", "time/wall_s", "time/log_s"):
        assert key in metrics, f"metric {key} missing: {sorted(metrics)}"
        assert math.isfinite(metrics[key]), (key, metrics[key])
    t = {k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")}
    assert t["steps_per_s"] > 0 and t["samples_per_s"] > t["steps_per_s"]
    assert 0 < t["compile_s"] < t["wall_s"]
    assert 0 <= t["log_s"] < t["wall_s"]
    # phase timings, the compile counter and XLA's figures for one step
    for key in ("time/trace_lower_s", "time/first_call_s", "time/step_s", "time/step_p90_s",
                "xla/flops_per_step", "xla/flops_per_s", "xla/argument_bytes", "xla/temp_bytes",
                "time/gradcheck_s"):
        assert metrics.get(key, 0) > 0, (key, sorted(metrics))
    assert metrics["xla/num_compiles"] == 1
    # the default gradient checks: before training and after the last step, all passed
    assert tags["gradcheck"] == "passed"
    points = history(client, run.info.run_id, "gradcheck/max_rel_err")
    assert [p.step for p in points] == [0, 40]
    assert all(p.value <= 1e-8 for p in points), points

    artifacts = {a.path: a for a in client.list_artifacts(run.info.run_id)}
    for name in ("config.yaml", "overrides.yaml", "training_curves.png", "gradcheck.json",
                 "gradcheck.png"):
        assert name in artifacts and not artifacts[name].is_dir, sorted(artifacts)
    assert "final_params" in artifacts and artifacts["final_params"].is_dir, sorted(artifacts)
    assert client.list_artifacts(run.info.run_id, "final_params"), "final_params is empty"

    out = proc.stdout
    assert run.info.run_id in out
    assert default_uri(launch) in out
    assert "gradient checks: passed" in out and "FLOPs/step" in out


def test_metric_names_group_the_record(basic_run, tmp_path):
    """Issue 11: what MLflow's chart view shows. Every metric has a section prefix (the
    unprefixed "Model metrics" section comes after all prefixed ones), and the curves'
    prefix sorts first; each test metric sits beside its linear baseline's; results are
    single points at step 0 (a bar per run); the gradient checks keep only the worst
    error, per check, the per-tensor errors are in gradcheck.json; the run's constants
    are params."""
    import json

    _, _, client, run = basic_run
    run_id, metrics = run.info.run_id, run.data.metrics
    sections = {k.split("/")[0] for k in metrics}
    assert all("/" in k for k in metrics), sorted(metrics)
    assert sections == {"curves", "gradcheck", "test", "time", "train", "xla"}, sections
    assert min(sections) == "curves"
    curves = {"curves/train_loss", "curves/val_loss", "curves/grad_norm", "curves/learning_rate"}
    assert curves <= set(metrics)
    for key in curves:
        assert len(history(client, run_id, key)) >= 2, key  # drawn as a line
    tests = {k.removeprefix("test/") for k in metrics if k.startswith("test/")}
    assert tests == {"rmse", "mae", "r2", "baseline_rmse", "baseline_mae", "baseline_r2"}
    for key in metrics:
        if not key.startswith(("curves/", "gradcheck/")):
            assert [p.step for p in history(client, run_id, key)] == [0], key
    # the constants of the run: params, not metrics
    for key in ("num_params", "batch_size", "members", "devices"):
        assert not [k for k in metrics if k.split("/")[-1] == key], key
    assert run.data.params["derived.num_params"] == "97"  # 10 features -> 8 tanh -> 1
    assert run.data.params["derived.batch_size"] == run.data.params["data.batch_size"] == "32"
    # gradient checks: one metric, the worst error of each check, equal to gradcheck.json's
    assert [k for k in metrics if k.startswith("gradcheck/")] == ["gradcheck/max_rel_err"]
    worst = history(client, run_id, "gradcheck/max_rel_err")
    path = client.download_artifacts(run_id, "gradcheck.json", str(tmp_path))
    reports = json.loads(Path(path).read_text())
    assert [r["step"] for r in reports] == [p.step for p in worst] == [0, 40]
    for report, point in zip(reports, worst):
        errors = {t["name"]: max(t["rel_err"], t["directional_rel_err"])
                  for t in report["tensors"]}
        assert set(errors) == {"input_layer/bias", "input_layer/kernel", "output_layer/bias",
                               "output_layer/kernel"}
        assert point.value == report["max_rel_err"] == max(errors.values())


def test_worked_examples_job(run_cli, tmp_path):
    """+experiment=gradcheck: the notebook's worked examples, three sources each (autodiff,
    sympy or the closed form, finite differences), agree; printed and logged to MLflow.
    The notebook's rounded figures are checked against what the oracles computed."""
    import json

    proc = run_cli("+experiment=gradcheck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agree" in proc.stdout and "DISAGREE" not in proc.stdout
    client = store_client(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED" and run.data.tags["gradcheck"] == "passed"
    assert client.get_experiment(run.info.experiment_id).name == "gradcheck"
    # the examples read no model, data, optimizer, trainer or gradcheck key: none is logged
    assert sorted(run.data.params) == ["mode", "tracking.experiment_name", "tracking.run_name",
                                       "tracking.uri"]
    assert run.data.params["mode"] == "gradcheck"
    path = client.download_artifacts(run.info.run_id, "worked_examples.json", str(tmp_path))
    rows = {r["name"]: r for r in json.loads(Path(path).read_text())}
    for name, row in rows.items():
        assert row["rel_err_autodiff"] <= 1e-12 and row["rel_err_fd"] <= 1e-8, row
        assert run.data.metrics[f"examples/{name}/rel_err_autodiff"] == row["rel_err_autodiff"]

    def close(value, expected, digits):
        return abs(value - expected) <= 0.5 * 10 ** (-digits)

    assert close(rows["tanh_4cos2"]["symbolic"], -0.16449, 5)
    assert close(rows["accumulation"]["symbolic"], -15.50478, 5)
    assert sum(p[1] for p in rows["accumulation"]["paths"]) == pytest.approx(
        rows["accumulation"]["autodiff"], rel=1e-14)
    for got, expected in zip(rows["three_variables"]["symbolic"], (-5.66197, -1.74938, 17.05945)):
        assert close(got, expected, 5)
    assert rows["exact_4pi3"]["exact"] == "4*pi**3"
    assert rows["exact_4pi3"]["symbolic"] == pytest.approx(4 * math.pi**3, rel=1e-15)
    loss32, norm32 = rows["seed_model"]["float32"]
    assert close(loss32, 1.0354788, 7) and abs(norm32 - 0.6549523) / 0.6549523 < 5e-7


def test_params_are_flat_and_resolved(basic_run):
    """C03: one param per leaf with a dotted key, values resolved, no hydra node; the
    resolved config is also a YAML artifact."""
    _, _, client, run = basic_run
    params = run.data.params
    assert params["model.hidden"] == "[8]"
    assert float(params["optim.learning_rate"]) == 0.01
    assert params["trainer.num_steps"] == "40"
    assert params["optim.name"] == "adam"
    assert params["tracking.run_name"] == "adam-interp"
    assert run.info.run_name == "adam-interp"
    assert not [k for k, v in params.items() if "${" in v]
    assert not [k for k in params if k.startswith("hydra")]
    assert not [k for k in params if "." not in k and k not in ("seed", "mode")], sorted(params)
    assert not [v for v in params.values() if v.startswith("{")], "a nested dict logged as one value"
    # only the keys of the run's kinds (an MLP on diabetes with Adam): no model.width,
    # data.seed_*, data.path or optim.momentum / weight_decay, which it does not use
    assert sorted(k for k in params if k.split(".")[0] in ("model", "data", "optim")) == sorted(
        ["model.kind", "model.init", "model.init_scale", "model.hidden", "model.tied_hidden",
         "data.kind", "data.val_fraction", "data.test_fraction", "data.standardize",
         "data.batch_size", "data.cache", "optim.name", "optim.learning_rate",
         "optim.schedule", "optim.warmup_steps", "optim.final_lr_fraction", "optim.clip_norm",
         "optim.transition_begin", "optim.transition_steps", "optim.decay_rate",
         "optim.staircase"])
    assert params["data.batch_size"] == "32" and params["data.kind"] == "diabetes"

    import yaml

    text = client.download_artifacts(run.info.run_id, "config.yaml")
    config = yaml.safe_load(Path(text).read_text())
    assert config["tracking"]["run_name"] == "adam-interp"
    assert config["trainer"]["num_steps"] == 40
    assert "hydra" not in config


def test_single_target_regression_finishes(basic_run):
    """C13: diabetes has one target column; the loss is reduced to a scalar and training works."""
    _, _, _, run = basic_run
    assert run.data.tags["task"] == "regression"
    assert run.info.status == "FINISHED"
    rmse = run.data.metrics["test/rmse"]
    assert math.isfinite(rmse) and 0 < rmse < 1e3  # diabetes targets lie in 25..346


# --- logging every step -----------------------------------------------------------------------

def test_every_step_logged_with_integer_steps(run_cli, tmp_path):
    """C08, C09: 500 steps with a point every step: all 500 points of each train curve,
    integer steps 0..499, validation at the eval steps, logging time reported apart."""
    num_steps = 500
    proc = run_cli(SMOKE, f"trainer.num_steps={num_steps}", "trainer.log_every_steps=1",
                   "trainer.steps_per_call=100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = store_client(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    run_id = run.info.run_id
    for key in ("curves/train_loss", "curves/grad_norm", "curves/learning_rate"):
        points = history(client, run_id, key)
        steps = [p.step for p in points]
        assert steps == list(range(num_steps)), f"{key}: {len(steps)} points"
        assert all(type(s) is int for s in steps)
        assert all(math.isfinite(p.value) for p in points)
    rates = [p.value for p in history(client, run_id, "curves/learning_rate")]
    assert rates == pytest.approx([0.01] * num_steps)  # a float32 on the device
    # Validation runs after every eval_every-th step (20 in smoke.yaml), logged at the step
    # it follows: 19, 39, ..., 499.
    val_steps = [p.step for p in history(client, run_id, "curves/val_loss")]
    assert val_steps == list(range(19, num_steps, 20))
    assert "time/log_s" in run.data.metrics and run.data.metrics["time/log_s"] >= 0
    assert run.data.metrics["time/log_s"] < run.data.metrics["time/wall_s"]


# --- where the store is -----------------------------------------------------------------------

def test_store_stays_in_launch_dir_with_chdir(run_cli, tmp_path):
    """C01: with hydra.job.chdir=true, a run and a two-job multirun all land in the one store
    <launch>/mlruns/mlflow.db, in one experiment; no store under outputs/ or multirun/."""
    first = run_cli(SMOKE, "hydra.job.chdir=true")
    assert first.returncode == 0, first.stdout + first.stderr
    # not 0.01: that point has a FINISHED run already (the first), so a sweep would skip it
    sweep = run_cli("-m", SMOKE, "hydra.job.chdir=true", "optim.learning_rate=0.02,0.03")
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr

    uri = default_uri(tmp_path)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert uri in first.stdout and uri in sweep.stdout
    for sub in ("outputs", "multirun"):
        assert (tmp_path / sub).is_dir(), f"Hydra made no {sub}/ folder"
        strays = [p for p in (tmp_path / sub).rglob("*") if p.name in ("mlflow.db", "mlruns")]
        assert not strays, strays
    assert not list(tmp_path.rglob("mlflow.db"))[1:], list(tmp_path.rglob("mlflow.db"))

    client = store_client(tmp_path)
    parents, runs = split_runs(all_runs(client))
    assert len(runs) == 3 and len(parents) == 1  # the sweep: one parent, two members
    assert len({r.info.experiment_id for r in runs + parents}) == 1
    assert all(r.info.status == "FINISHED" for r in runs + parents)
    assert all(r.data.tags["tracking_uri"] == uri for r in runs + parents)
    assert sorted(float(r.data.params["optim.learning_rate"]) for r in runs) == [0.01, 0.02, 0.03]


def test_tracking_uri_from_env_and_override(tmp_path):
    """C04: MLFLOW_TRACKING_URI, and the tracking.uri override, name the store the run goes to."""
    by_env, by_override = tmp_path / "env_store" / "x.db", tmp_path / "override_store" / "y.db"
    launch_env, launch_override = tmp_path / "launch_env", tmp_path / "launch_override"
    launch_env.mkdir()
    launch_override.mkdir()
    jobs = [
        start_cli(SMOKE, "trainer.num_steps=20", cwd=launch_env,
                  env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{by_env}")),
        start_cli(SMOKE, "trainer.num_steps=20", f"tracking.uri=sqlite:///{by_override}",
                  cwd=launch_override),
    ]
    results = [finish(p) for p in jobs]
    from mlflow import MlflowClient

    for (code, out, err), db, launch in zip(results, (by_env, by_override),
                                            (launch_env, launch_override)):
        assert code == 0, out + err
        assert db.is_file(), f"{db} not created"
        assert not (launch / "mlruns").exists(), "the run went to the default store instead"
        (run,) = all_runs(MlflowClient(sqlite_uri(db)))
        assert run.info.status == "FINISHED"
        assert run.data.tags["tracking_uri"] == sqlite_uri(db)
        assert sqlite_uri(db) in out


def test_parallel_jobs_on_new_store(tmp_path):
    """C05: four jobs started at once on a store that does not exist yet all finish, each
    with its full loss history."""
    assert not (tmp_path / "mlruns").exists()
    log_every = 10
    jobs = [start_cli(SMOKE, f"seed={i}", f"trainer.log_every_steps={log_every}", cwd=tmp_path)
            for i in range(4)]
    results = [finish(p) for p in jobs]
    for code, out, err in results:
        assert code == 0, out + err
    client = store_client(tmp_path)
    runs = all_runs(client)
    assert len(runs) == 4
    assert len({r.info.run_id for r in runs}) == 4
    assert sorted(int(r.data.params["seed"]) for r in runs) == [0, 1, 2, 3]
    # every log_every-th step, and the last step (issue 13, item 5)
    expected = [*range(0, SMOKE_STEPS, log_every), SMOKE_STEPS - 1]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [p.step for p in history(client, run.info.run_id, "curves/train_loss")] == expected
        assert "test/rmse" in run.data.metrics


# --- multirun ---------------------------------------------------------------------------------

def test_multirun_beside_old_file_store(run_cli, tmp_path):
    """C02, C04: a two-job sweep gives two FINISHED runs with their own ids and names; a
    leftover old-style ./mlruns file store neither diverts nor breaks them: they go into
    mlruns/mlflow.db with no maintenance-mode error."""
    old = tmp_path / "mlruns" / "0"
    old.mkdir(parents=True)
    (old / "meta.yaml").write_text("artifact_location: mlruns/0\nexperiment_id: '0'\n"
                                   "lifecycle_stage: active\nname: Default\n")
    proc = run_cli("-m", SMOKE, "seed=0,1", "trainer.num_steps=20")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "maintenance" not in output.lower()
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    parents, runs = split_runs(all_runs(store_client(tmp_path)))
    assert len(runs) == 2 and len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
    assert all(r.data.tags["tracking_uri"] == default_uri(tmp_path) for r in runs)
    assert all(r.info.status == "FINISHED" and r.info.end_time for r in runs)
    assert len({r.info.run_id for r in runs}) == 2
    assert len({r.info.run_name for r in runs}) == 2
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]


@pytest.mark.parametrize("sweeper", ["population", "basic"])
def test_multirun_continues_after_failed_job(run_cli, tmp_path, sweeper):
    """C02, C07: the first point of a sweep diverges; the second still trains in its own
    run, nothing is 'already active', and the process exits non-zero. With the
    population sweeper both are members of one program: the diverging member stops
    alone (masked on the device) and its run ends FAILED, the other finishes."""
    proc = run_cli("-m", SMOKE, "optim=sgd", "optim.learning_rate=1e6,0.01",
                   f"hydra/sweeper={sweeper}")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "already active" not in output.lower()
    parents, runs = split_runs(all_runs(store_client(tmp_path)))
    assert len(parents) == (sweeper == "population")
    assert len(runs) == 2, output
    assert len({r.info.run_id for r in runs}) == 2
    by_lr = {float(r.data.params["optim.learning_rate"]): r for r in runs}
    assert by_lr[1e6].info.status == "FAILED"
    assert by_lr[0.01].info.status == "FINISHED"
    assert all(r.info.end_time for r in runs)
    assert "test/rmse" in by_lr[0.01].data.metrics


# --- divergence -------------------------------------------------------------------------------

def test_divergence_stops_and_fails(tmp_path):
    """C07: SGD at lr=1e6 diverges after a few steps: exit non-zero, run FAILED with the step
    recorded, a message naming the step and a smaller learning rate, no huge values stored;
    with trainer.on_nonfinite=skip the run finishes and counts the dropped steps (allowed
    to drop up to 99% here; issue 14.12 tests the default share, the divergence rule is
    off so that updates are dropped, not the run stopped)."""
    stop_dir, skip_dir, mostly_dir = tmp_path / "stop", tmp_path / "skip", tmp_path / "mostly"
    for folder in (stop_dir, skip_dir, mostly_dir):
        folder.mkdir()
    diverge = (SMOKE, "optim=sgd", "optim.learning_rate=1e6", "trainer.log_every_steps=1")
    skip = (*diverge, "trainer.on_nonfinite=skip", "trainer.divergence_factor=null")
    jobs = [start_cli(*diverge, cwd=stop_dir),
            start_cli(*skip, "trainer.max_skipped_fraction=0.99", cwd=skip_dir),
            start_cli(*skip, cwd=mostly_dir)]
    (code, out, err), (skip_code, skip_out, skip_err), mostly = (finish(p) for p in jobs)
    _check_issue14_item12_mostly_skipped_run_ends_failed(mostly_dir, *mostly)

    assert code != 0, out + err
    assert "Traceback" not in err
    client = store_client(stop_dir)
    (run,) = all_runs(client)
    assert run.info.status == "FAILED" and run.info.end_time
    step = int(run.data.tags["diverged_at_step"])
    assert step > 0, "diverged at step 0: no points before it to check"
    assert f"step {step}" in err
    assert "learning_rate" in err and "smaller" in err
    assert run.info.run_id in err
    steps = [p.step for p in history(client, run.info.run_id, "curves/train_loss")]
    assert steps == list(range(step)), "the points before the divergence must be kept"
    assert_no_huge_values(client, run)

    assert skip_code == 0, skip_out + skip_err
    client = store_client(skip_dir)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["nonfinite_steps"]) > 0
    assert "diverged_at_step" not in run.data.tags
    assert_no_huge_values(client, run)


def _check_issue14_item12_mostly_skipped_run_ends_failed(launch: Path, code: int, out: str,
                                                          err: str) -> None:
    """Issue 14.12: the skip run above under the default trainer.max_skipped_fraction
    (0.5) dropped 59 of 60 updates and exited 0 with a test RMSE of 3.2e32 and only a
    tag. Now it says so and ends FAILED, with no test metrics; its points stay."""
    assert code == 1, out + err
    assert "Traceback" not in err
    client = store_client(launch)
    (run,) = all_runs(client)
    assert run.info.status == "FAILED" and run.info.end_time
    dropped = int(run.data.tags["nonfinite_steps"])
    assert dropped > SMOKE_STEPS // 2
    said = " ".join(err.split())
    assert f"dropped {dropped} of the {SMOKE_STEPS} updates" in said
    assert "trainer.max_skipped_fraction=0.5" in said and "smaller" in said
    assert "max_skipped_fraction" in run.data.tags["error"]
    assert not [k for k in run.data.metrics if k.startswith("test/")]
    assert history(client, run.info.run_id, "curves/train_loss")
    assert_no_huge_values(client, run)


def test_C24_finite_divergence_ends_failed(run_cli, tmp_path):
    """C24: the digits experiment at lr=1e30 keeps a finite loss (~1e30, softmax
    cross-entropy of huge logits), which the NaN/inf guard never caught: it exited 0,
    FINISHED, with test metrics. The divergence rule stops it: exit 1, run FAILED with
    the step, a message naming the rule and a smaller rate, no test metrics, and no
    logged loss above 1000 times the initial one."""
    proc = run_cli("+experiment=digits", "optim.learning_rate=1e30", "trainer.num_steps=300",
                   "trainer.steps_per_call=100")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    client = store_client(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "FAILED" and run.info.end_time
    step = int(run.data.tags["diverged_at_step"])
    assert f"at step {step}" in proc.stderr and f"at step {step}" in run.data.tags["error"]
    assert "trainer.divergence_factor" in proc.stderr and "smaller" in proc.stderr
    assert run.info.run_id in proc.stderr
    assert not [k for k in run.data.metrics if k.startswith("test/")]
    losses = [p.value for key in ("curves/train_loss", "curves/val_loss")
              for p in history(client, run.info.run_id, key)]
    first = history(client, run.info.run_id, "curves/train_loss")[0].value
    assert losses and max(losses) < 1000 * first * 1.5, max(losses)


def test_issue13_item5_short_run_logs_last_step_and_says_stride_leaves_few_points(
        run_cli, tmp_path):
    """Issue 13.5: 7 steps of a CSV under the diabetes experiment (stride 10) logged the
    train loss at step 0 only, silently. Now the last step is logged too and the run says
    its stride leaves few points."""
    rows = [f"{i % 7},{(i * 3) % 11},{i % 7 + 0.5 * ((i * 3) % 11)}" for i in range(80)]
    (tmp_path / "table.csv").write_text("a,b,y\n" + "\n".join(rows) + "\n")
    proc = run_cli("+experiment=diabetes", "data=csv", "data.path=table.csv",
                   "data.target=[y]", "trainer.num_steps=7", "gradcheck.every_steps=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trainer.log_every_steps=10 leaves 2 point(s)" in " ".join(proc.stdout.split())
    client = store_client(tmp_path)
    (run,) = all_runs(client)
    for key in ("curves/train_loss", "curves/learning_rate", "curves/val_loss"):
        steps = [p.step for p in history(client, run.info.run_id, key)]
        assert steps[-1] == 6, (key, steps)
    assert [p.step for p in history(client, run.info.run_id, "curves/train_loss")] == [0, 6]


# --- signals ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_marks_run_killed(tmp_path, sig, code):
    """C06 (b) Ctrl-C, (c) kill -TERM: the run ends KILLED with an end time, the process exits
    128 + signal, and the metrics logged before the signal stay."""
    log = tmp_path / "cli.log"
    proc = start_cli(SMOKE, *LONG_RUN, cwd=tmp_path, log=log)
    try:
        client, run_id = wait_for_training(proc, log, tmp_path)
        before = len(client.get_metric_history(run_id, "curves/train_loss"))
        proc.send_signal(sig)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert returncode == code, output
    run = client.get_run(run_id)
    assert run.info.status == "KILLED", output
    assert run.info.end_time is not None and run.info.end_time >= run.info.start_time
    assert len(client.get_metric_history(run_id, "curves/train_loss")) >= before
    assert "test/rmse" not in run.data.metrics


def test_killed_process_run_is_closed_by_next_job(tmp_path):
    """C06: a job killed with SIGKILL leaves its run RUNNING; the next job on the same store
    marks it KILLED and says why."""
    log = tmp_path / "cli.log"
    proc = start_cli(SMOKE, *LONG_RUN, cwd=tmp_path, log=log)
    try:
        client, run_id = wait_for_training(proc, log, tmp_path)
    finally:
        proc.kill()
        proc.wait(timeout=60)  # reaped: a zombie would still look alive
    assert client.get_run(run_id).info.status == "RUNNING"

    code, out, err = finish(start_cli(SMOKE, "trainer.num_steps=20", cwd=tmp_path))
    assert code == 0, out + err
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert killed.info.end_time is not None
    assert str(proc.pid) in killed.data.tags.get("killed_reason", "")
    statuses = sorted(r.info.status for r in all_runs(client))
    assert statuses == ["FINISHED", "KILLED"]


# --- errors the user can fix ------------------------------------------------------------------

def experiment_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "trainer" / "conf" / "experiment").glob("*.yaml"))


C11_CASES = [
    ((SMOKE, "optim.learnin_rate=0.1"), ["optim.learnin_rate", "optim.learning_rate"]),
    ((SMOKE, "+optim.learnin_rate=0.1"), ["optim.learnin_rate", "optim.learning_rate"]),
    (("experiment=smoke",), ["experiment=smoke", "+experiment=smoke"]),
    ((SMOKE, "trainer.num_steps=1.5"), ["trainer.num_steps", "1.5", "integer"]),
    (("+experiment=nosuch",), ["nosuch", *experiment_names()]),
    ((SMOKE, "data.batch_size=0"), ["data.batch_size", "greater than 0"]),
    # issue 14 item 7: used to train on diabetes and exit 0
    ((SMOKE, "data.path=x.csv", "data.target=[y]"),
     ["data.path applies to data=csv (this run uses data=diabetes)"]),
    ((SMOKE, "model.width=8"), ["model.width applies to model=tied (this run uses model=mlp)"]),
    ((SMOKE, "model.kind=tied"), ["model.kind='tied'", "pick the model with model=tied"]),
    ((SMOKE, "model=tied"), ["+experiment=smoke sets model.hidden, which model=tied does not have",
                             "tied-diabetes"]),
]


@pytest.mark.parametrize(("args", "expected"), C11_CASES,
                         ids=["typo", "plus-typo", "no-plus", "float-for-int", "no-such-experiment",
                              "zero-batch", "csv-key-without-data-csv", "tied-key-for-mlp",
                              "kind-typed", "experiment-key-for-another-kind"])
def test_config_errors_stop_before_any_run(run_cli, tmp_path, args, expected):
    """C11: a typo or bad value exits 2 before any work, with one short message that names it
    and the fix, no traceback and no store."""
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "Error executing job" not in err
    assert 0 < len(err.strip().splitlines()) <= 3, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert not (tmp_path / "mlruns").exists()
    assert not list(tmp_path.rglob("mlflow.db"))


def test_missing_csv_is_reported(run_cli, tmp_path):
    """Data errors: a missing file exits 2 naming the file; nothing is stored."""
    proc = run_cli(SMOKE, "data=csv", "data.path=missing.csv", "data.target=[y]")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "missing.csv" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlruns").exists()


def test_non_numeric_csv_cell_is_reported(run_cli, tmp_path):
    """Data errors: a non-numeric cell exits 2 naming the column and the line; nothing is stored."""
    rows = ["a,b,y"] + [f"{i},{2 * i},{3 * i}" for i in range(20)]
    rows[5] = "4,oops,12"  # line 6 of the file (line 1 is the header)
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    proc = run_cli(SMOKE, "data=csv", "data.path=table.csv", "data.target=[y]")
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout + err
    assert "table.csv" in err and "'b'" in err and "line 6" in err and "oops" in err
    assert "Traceback" not in err
    assert not (tmp_path / "mlruns").exists()


# --- Hydra's own config groups on the command line --------------------------------------------

def test_hydra_group_overrides_reach_hydra(tmp_path):
    """hydra/launcher=basic and hydra/job_logging=disabled pass the pre-check and Hydra
    applies them (no job log file); an unknown hydra/launcher=nope exits 2 with one line
    naming the options, before any run or folder exists."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    jobs = [start_cli(SMOKE, "trainer.num_steps=20", "hydra/launcher=basic",
                      "hydra/job_logging=disabled", cwd=good),
            start_cli(SMOKE, "hydra/launcher=nope", cwd=bad)]
    (code, out, err), (bad_code, bad_out, bad_err) = (finish(p) for p in jobs)

    assert code == 0, out + err
    assert "unknown config key" not in err
    (run,) = all_runs(store_client(good))
    assert run.info.status == "FINISHED"
    output_dir = Path(run.data.tags["hydra.output_dir"])
    assert (output_dir / ".hydra" / "overrides.yaml").is_file()
    assert not list(output_dir.glob("*.log")), "hydra/job_logging=disabled was not applied"

    assert bad_code == 2, bad_out + bad_err
    assert "'hydra/launcher=nope'" in bad_err and "basic" in bad_err
    assert 0 < len(bad_err.strip().splitlines()) <= 3, bad_err
    assert "Traceback" not in bad_err and "HYDRA_FULL_ERROR" not in bad_err
    assert list(bad.iterdir()) == [], "a folder or store was created"


# --- C18: one output folder per job ----------------------------------------------------------

def overrides_match_params(folder: Path, run) -> None:
    """The folder's .hydra/overrides.yaml is the command line of ``run``: every key=value
    override is the run's param, the experiment its tag."""
    import yaml

    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    assert run.data.tags["overrides"].split() == overrides
    for override in overrides:
        key, value = override.split("=", 1)
        if key == "+experiment":
            assert run.data.tags["experiment"] == value
        elif key == "population.members":  # the sweeper's job: this member's own values
            (member,) = OverridesParser.create().parse_overrides([override])[0].value()
            for k, v in member.items():
                assert float(run.data.params[k]) == float(v), (folder, k, v)
        elif key in ("population.sweep_id", "population.parent_run_id"):
            tag = {"population.sweep_id": "sweep_id",
                   "population.parent_run_id": "mlflow.parentRunId"}[key]
            assert run.data.tags[tag] == value.strip("'"), (folder, override)
        else:
            assert run.data.params[key] == value, (folder, override, run.data.params[key])


def test_c18_six_runs_started_together_get_own_folders(tmp_path):
    """C18: six single runs started together from one folder each write their own
    outputs/<date>/<time>-<pid>-<random> folder, whose .hydra files describe that run."""
    quick = ("trainer.num_steps=20", "gradcheck.every_steps=0")
    jobs = [start_cli(SMOKE, f"seed={i}", *quick, cwd=tmp_path) for i in range(6)]
    for code, out, err in (finish(p, timeout=600) for p in jobs):
        assert code == 0, out + err
    folders = sorted(p.parent for p in tmp_path.glob("outputs/*/*/.hydra"))
    assert len(folders) == 6, folders
    runs = all_runs(store_client(tmp_path))
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    by_folder = {Path(r.data.tags["hydra.output_dir"]): r for r in runs}
    assert sorted(by_folder) == [f.resolve() for f in folders]
    for folder in folders:
        overrides_match_params(folder, by_folder[folder.resolve()])
        assert folder.name.split("-")[3] == by_folder[folder.resolve()].data.tags["pid"]
    assert sorted(r.data.params["seed"] for r in runs) == [str(i) for i in range(6)]


def test_c18_two_multiruns_started_together_get_own_sweep_folders(tmp_path):
    """C18: two multiruns started together from one folder get their own
    multirun/<date>/<time>-<pid>-<random> folder; job 0 of each (a population of one)
    describes its own member run, under its own parent."""
    quick = ("trainer.num_steps=20", "gradcheck.every_steps=0")
    jobs = [start_cli("-m", SMOKE, f"optim.learning_rate={lr}", *quick, cwd=tmp_path)
            for lr in ("0.1", "0.9")]
    for code, out, err in (finish(p, timeout=600) for p in jobs):
        assert code == 0, out + err
    sweeps = sorted(p.parent for p in tmp_path.glob("multirun/*/*/multirun.yaml"))
    assert len(sweeps) == 2, sweeps
    parents, runs = split_runs(all_runs(store_client(tmp_path)))
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs + parents)
    assert len(parents) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {p.info.run_id for p in parents}
    by_folder = {Path(r.data.tags["hydra.output_dir"]): r for r in runs}
    assert sorted(by_folder) == [(s / "0").resolve() for s in sweeps]
    for sweep in sweeps:
        overrides_match_params(sweep / "0", by_folder[(sweep / "0").resolve()])
    assert sorted(r.data.params["optim.learning_rate"] for r in runs) == ["0.1", "0.9"]


def test_c23_long_param_value_is_marked_not_cut_silently(run_cli, tmp_path):
    """C23: a 7000-character run name finishes; the stored param (MLflow keeps 6000
    characters) ends in a mark, the tag ``params.cut`` names it, config.yaml has it whole."""
    import yaml

    name = "n" * 6990 + "-the-end"
    done = run_cli("+experiment=smoke", f"tracking.run_name={name}")
    assert done.returncode == 0, done.stderr[-3000:]
    client = store_client(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    stored = run.data.params["tracking.run_name"]
    assert len(stored) <= 6000 and stored != name[:len(stored)]
    assert stored.startswith("n" * 100) and "[cut: 6998 characters" in stored
    assert run.data.tags["params.cut"] == "tracking.run_name"
    other = {k: v for k, v in run.data.params.items() if k != "tracking.run_name"}
    assert not [k for k, v in other.items() if "[cut:" in v]
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml"))
                            .read_text())
    assert config["tracking"]["run_name"] == name


def test_ctrl_c_with_a_hung_store_process_still_ends_the_run(tmp_path):
    """A store process that stops answering (SIGSTOP here; a hung server or lock alike)
    must not make Ctrl-C wait for it: the job gives it up, closes the run KILLED
    in-process and exits 130; the child does not outlive the job."""
    log = tmp_path / "cli.log"
    proc = start_cli(SMOKE, *LONG_RUN, cwd=tmp_path, log=log)
    child = None
    try:
        client, run_id = wait_for_training(proc, log, tmp_path)
        found = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "trainer.store_process"],
                               capture_output=True, text=True).stdout.split()
        assert len(found) == 1, found
        child = int(found[0])
        os.kill(child, signal.SIGSTOP)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert returncode == 130, output
    assert took < 45, f"the stop waited {took:.0f} s for the hung store process"
    assert "store process ended" in output
    run = client.get_run(run_id)
    assert run.info.status == "KILLED", output
    assert run.data.tags.get("error") == "interrupted (Ctrl-C)"
    if not wait_gone(child, 30):
        pytest.fail("the store process outlived the job")
