"""Launchers (trainer/conf/hydra/launcher/): a sweep through Hydra's joblib, submitit and Ray
launchers keeps the population sweeper's grouping and records what the basic launcher does.

Each test runs the real CLI on a 4-point sweep whose points form 2 populations
(``model.hidden`` is structural, ``seed`` vmappable) and checks, from the multirun folder,
the store and the launcher's own files, that the launcher ran exactly 2 jobs, in processes
other than the CLI's, with one parent run and 4 FINISHED member runs holding the points.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import all_runs, cli_env, split_runs, store_client

pytestmark = pytest.mark.slow

# 2 widths x 2 seeds: 4 points, 2 populations. 20 steps, no gradient checks, no
# checkpoints: seconds a job, most of them imports and the store.
SWEEP = ("-m", "+experiment=smoke", "model.hidden=[8],[16]", "seed=0,1",
         "trainer.num_steps=20", "gradcheck.every_steps=0", "trainer.checkpoints=false")
POINTS = [("[16]", "0"), ("[16]", "1"), ("[8]", "0"), ("[8]", "1")]


def run_sweep(tmp_path: Path, *launcher: str, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *SWEEP, *launcher], cwd=tmp_path,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def check_sweep(tmp_path: Path, proc: subprocess.CompletedProcess) -> list:
    """The sweep made 2 launcher jobs and recorded 1 parent + 4 FINISHED members, each
    population in one job, none in the CLI's process. Returns the member runs."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    jobs = sorted(p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1"], output
    parents, members = split_runs(all_runs(store_client(tmp_path)))
    (parent,) = parents
    assert len(members) == 4, output
    assert all(r.info.status == "FINISHED" for r in [parent, *members])
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in members)
    assert sorted((r.data.params["model.hidden"], r.data.params["seed"])
                  for r in members) == POINTS
    assert parent.data.metrics["members"] == 4 and parent.data.metrics["groups"] == 2
    # one job per population: each job folder holds one width's two seeds
    by_job = {}
    for r in members:
        by_job.setdefault(Path(r.data.tags["hydra.output_dir"]).name, []).append(r)
    assert sorted(by_job) == jobs
    for runs in by_job.values():
        assert len({r.data.params["model.hidden"] for r in runs}) == 1
        assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
        assert len({r.data.tags["pid"] for r in runs}) == 1  # one process per population
    # the parent is opened by the sweeper in the CLI's process; the jobs ran elsewhere
    assert parent.data.tags["pid"] not in {r.data.tags["pid"] for r in members}
    return members


def test_joblib_processes(tmp_path):
    """hydra/launcher=processes (joblib, 2 jobs at once): loky worker processes."""
    proc = run_sweep(tmp_path, "hydra/launcher=processes")
    check_sweep(tmp_path, proc)
    assert "Joblib.Parallel(n_jobs=2," in proc.stdout + proc.stderr
    assert "is launching 2 jobs" in proc.stdout + proc.stderr


def test_submitit_local(tmp_path):
    """hydra/launcher=submitit_local (what hydra/launcher=slurm runs, on this machine): one
    submitit job per population, whose output submitit keeps in its own log."""
    proc = run_sweep(tmp_path, "hydra/launcher=submitit_local")
    members = check_sweep(tmp_path, proc)
    (submitit,) = tmp_path.glob("multirun/*/*/.submitit")
    results = sorted(submitit.glob("*/*_0_result.pkl"))
    assert len(results) == 2, sorted(submitit.rglob("*"))
    parent = members[0].data.tags["mlflow.parentRunId"]
    for result in results:  # each job's console output went to submitit's log, not ours
        log = result.with_name(result.name.replace("_result.pkl", "_log.out")).read_text()
        assert f"2 member runs under parent {parent}" in log
    assert "member runs under parent" not in proc.stdout


def test_slurm_config_composes():
    """hydra/launcher=slurm extends the plugin's submitit_slurm config with our settings;
    a partition and a time limit given on the command line reach the launcher."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "+experiment=smoke", "hydra/launcher=slurm",
         "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=240", "--cfg", "hydra",
         "-p", "hydra.launcher"], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launcher = yaml.safe_load(proc.stdout.split("\n", 1)[1])
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["timeout_min"]) == ("gpu", 240)
    assert (launcher["cpus_per_task"], launcher["mem_gb"]) == (8, 16)
    assert launcher["max_num_timeout"] == 0  # no resubmission: it would train the job again


@pytest.fixture
def ray_head():
    """A one-node Ray cluster (2 CPUs) in a temp folder, started with ``ray start --head
    --block`` in a session of its own and stopped by signalling that session only (not
    ``ray stop``, which stops every Ray process on the machine). Token authentication on,
    with a token of its own in the environment (nothing written to ~/.ray). Yields
    ``(address, env, temp_dir)``: the environment a client needs to join."""
    # short: Ray's unix socket paths under it must fit 107 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                  RAY_USAGE_STATS_ENABLED="0")
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--num-cpus=2", "--port=0",
         f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
        cwd=temp_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its workers start in cwd: not in the launch folder
    try:
        address_file = temp_dir / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not (address_file.is_file() and address_file.read_text().strip()):
            assert head.poll() is None, f"ray start exited {head.returncode}"
            assert time.monotonic() < deadline, "no Ray cluster after 120 s"
            time.sleep(0.5)
        yield address_file.read_text().strip(), env, temp_dir
    finally:
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                head.poll()
                try:
                    os.killpg(head.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.3)
        head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_cluster(tmp_path, ray_head):
    """hydra/launcher=ray_cluster joins the running cluster at $RAY_ADDRESS (which the
    plugin's own config refuses: it passes object_store_memory); each population job is
    one Ray task, run by one of the cluster's worker processes."""
    address, env, temp_dir = ray_head
    proc = run_sweep(tmp_path, "hydra/launcher=ray_cluster", env={**env, "RAY_ADDRESS": address})
    members = check_sweep(tmp_path, proc)
    assert f"Connecting to existing Ray cluster at address: {address}" in proc.stderr
    assert "Ray Launcher is launching 2 jobs" in proc.stdout + proc.stderr
    worker_pids = {p.stem.rsplit("_", 1)[1]
                   for p in temp_dir.glob("session_*/logs/python-core-worker-*.log")}
    assert {r.data.tags["pid"] for r in members} <= worker_pids
    assert not list(temp_dir.glob("multirun"))  # the job folders are in the launch folder
