"""The team's tracking server (trainer/tracking_server.py): a real PostgreSQL cluster and
a real MLflow server on it, started as a user starts them, with a parallel sweep logged to
it through the CLI; then everything is stopped and no process is left."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, all_runs, cli_env, split_runs

from trainer.tracking_server import LocalPostgres, find_pg_bin, wait_for_http


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (children, grandchildren ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def postgres_programs() -> Path:
    """PostgreSQL's server programs: the machine's, else the ones the ``pgserver`` wheel
    bundles, installed now from the package index; skip (never pass) when neither can be had."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pgserver"],
                              capture_output=True, text=True, timeout=600)
        import importlib

        importlib.invalidate_caches()
        bin_dir = find_pg_bin()
        if bin_dir is None:
            pytest.skip("no PostgreSQL server programs here (initdb, postgres), and `pip "
                        f"install pgserver` failed: {done.stderr.strip()[-300:]}")
    return bin_dir


@pytest.fixture
def team_server(tmp_path):
    """``python -m trainer.tracking_server`` with a new cluster; yields ``(uri, postgres,
    artifacts)``; stops it with SIGTERM as a service manager would, and checks that every
    process it started is gone."""
    bin_dir = postgres_programs()
    # PostgreSQL runs as an unprivileged user when we are root: its folder must not sit
    # under pytest's tmp_path (private to root)
    base = Path(tempfile.mkdtemp(prefix="trainer-pg-"))
    base.chmod(0o711)
    port, pg_port = free_port(), free_port()
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.tracking_server", "--pg-dir", str(base / "pg"),
         "--artifacts", str(base / "artifacts"), "--port", str(port),
         "--pg-port", str(pg_port), "--pg-bin", str(bin_dir)],
        cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    children: set[int] = set()
    try:
        try:
            wait_for_http(f"{uri}/health", proc, timeout_s=120)
        except RuntimeError as err:
            pytest.fail(f"{err}:\n{log_path.read_text()[-3000:]}")
        children = descendants(proc.pid)
        postgres = LocalPostgres(base / "pg", pg_port, bin_dir)
        yield uri, postgres, base / "artifacts"
    finally:
        children |= descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in children):
            time.sleep(0.2)
        left = sorted(p for p in children if alive(p))
        for pid in left:  # never leave them running, even when the test fails
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        assert code == 0, log_path.read_text()[-3000:]
        assert not left, f"processes left running: {left}"


@pytest.mark.slow
def test_a_parallel_sweep_is_recorded_in_postgresql(team_server, run_cli, tmp_path):
    """Four structural groups (widths) make four Hydra jobs, run at once by the joblib
    launcher, each logging to the server; the parent, its children, their params and
    statuses read back through MlflowClient, and the rows are in PostgreSQL's tables."""
    from mlflow import MlflowClient

    uri, postgres, artifacts = team_server
    done = run_cli("-m", "+experiment=smoke", "model.hidden=[4],[8],[12],[16]", "seed=0",
                   "trainer.num_steps=20", "gradcheck.every_steps=0", f"tracking.uri={uri}",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Population sweep: 4 points in 4 jobs" in done.stdout + done.stderr
    assert "Joblib.Parallel(n_jobs=4" in done.stdout + done.stderr

    client = MlflowClient(tracking_uri=uri)
    (parent,), children = split_runs(all_runs(client))
    assert parent.info.status == "FINISHED" and parent.data.metrics["groups"] == 4
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert sorted(r.data.params["model.hidden"] for r in children) == ["[12]", "[16]", "[4]",
                                                                      "[8]"]
    assert {r.data.params["trainer.num_steps"] for r in children} == {"20"}
    # different processes: the jobs ran side by side, not one after the other in this one
    assert len({r.data.tags["pid"] for r in children}) == 4
    for run in children:
        assert client.get_metric_history(run.info.run_id, "curves/train_loss")
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    # artifacts went through the server into its artifact root
    assert list(artifacts.rglob("config.yaml"))

    with postgres.connect() as conn:
        rows = dict(conn.execute("SELECT run_uuid, status FROM runs").fetchall())
        params = conn.execute("SELECT count(*) FROM params WHERE key = 'model.hidden'"
                              ).fetchone()[0]
        points = conn.execute("SELECT count(*) FROM metrics WHERE key = 'curves/train_loss'"
                              ).fetchone()[0]
    assert rows == {r.info.run_id: "FINISHED" for r in [parent, *children]}
    assert params >= 4 and points >= 4 * 2
