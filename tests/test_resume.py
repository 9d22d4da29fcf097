"""Checkpoints inside the loop and resume (issue 9): a training stopped by Ctrl-C or
SIGTERM saves the last recorded chunk and continues bit for bit (case C21), for a lone
run and a population; the background saver keeps the latest state and surfaces its
errors; end to end: a SIGTERMed run resumes into the same MLflow run with no duplicate
points, a SIGKILLed one from its last periodic checkpoint, a changed key is refused."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import RecordingTracker, all_runs, store_client
from test_cli import SMOKE, finish, history, start_cli, wait_for_training
from trainer.checkpoint import CheckpointPlan, Checkpoints, Saver
from trainer.config import (AdamOptimConfig, Config, GradcheckConfig, MlpModelConfig,
                            TabularDataConfig, TrainerConfig)
from trainer.data import load_dataset
from trainer.loop import build_run, run_chunks, train_population
from trainer.names import CURVES  # the loop's name of each curve -> the record's


def curve(tracker, name: str) -> list:
    """The points of the loop's curve ``name`` that ``tracker`` received, under its record name."""
    return tracker.history(CURVES[name])


def adam_cosine(num_steps: int = 40) -> Config:
    """Adam with a cosine schedule and per-epoch shuffling (batch 32 of ~300 rows)."""
    return Config(model=MlpModelConfig(hidden=[8]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=AdamOptimConfig(learning_rate=1e-2, schedule="cosine"),
                  trainer=TrainerConfig(num_steps=num_steps, steps_per_call=10,
                                        log_every_steps=1, eval_every_steps=10, progress=False),
                  gradcheck=GradcheckConfig(every_steps=0))


@pytest.fixture(scope="module")
def split():
    return load_dataset(TabularDataConfig(kind="diabetes"), seed=0)


class StoppingTracker(RecordingTracker):
    """A tracker whose ``log_metrics`` is interrupted (as by Ctrl-C) at the first point at
    or after ``stop_at``, before it records anything of that call."""

    def __init__(self, stop_at: int):
        super().__init__()
        self.stop_at = stop_at

    def log_metrics(self, points):
        points = list(points)
        if any(step >= self.stop_at for _, _, step in points):
            raise KeyboardInterrupt("test: stopped")
        return super().log_metrics(points)


def curves(tracker) -> dict[str, list]:
    return {name: curve(tracker, name) for name in CURVES}


def as_history(tracker) -> dict:
    return {name: ([s for s, _ in points], [v for _, v in points])
            for name, points in curves(tracker).items() if points}


@pytest.mark.parametrize("members", [1, 3])
def test_C21_stopped_and_resumed_equals_straight(split, tmp_path, members):
    """C21 in the loop: N steps straight equal N/2 steps, a stop (Ctrl-C while the third
    chunk's points are logged), and a resume: the checkpoint is the last chunk whose
    points were all logged (step 20), the resumed training logs every later point once,
    and the curves and final params equal the straight run's bit for bit on CPU (adam,
    cosine schedule, per-epoch shuffling), for a lone run and a population."""
    configs = [dataclasses.replace(adam_cosine(), seed=m % 2, optim=dataclasses.replace(
        adam_cosine().optim, learning_rate=1e-2 * (m + 1))) for m in range(members)]
    data = [load_dataset(TabularDataConfig(kind="diabetes"), seed=c.seed) for c in configs]

    def plan(folder, resume=False):
        return CheckpointPlan(directory=folder, every_steps=0, keep=2,
                              document={"run_ids": ["x"] * members}, resume=resume)

    straight = [RecordingTracker() for _ in configs]
    want = train_population(configs, data, straight, checkpoint=plan(tmp_path / "straight"))

    stopped = [StoppingTracker(stop_at=25)] + [RecordingTracker() for _ in configs[1:]]
    with pytest.raises(KeyboardInterrupt):
        train_population(configs, data, stopped, checkpoint=plan(tmp_path / "stopped"))
    with Checkpoints(tmp_path / "stopped") as checkpoints:
        assert checkpoints.steps() == [20]
    assert max(s for s, _ in stopped[0].history("curves/train_loss")) == 19

    resumed = [RecordingTracker() for _ in configs]
    got = train_population(configs, data, resumed, checkpoint=plan(tmp_path / "stopped", True),
                           histories=[as_history(t) for t in stopped])
    for m in range(members):
        for name in CURVES:
            first, again = curve(stopped[m], name), curve(resumed[m], name)
            joined = [p for p in first if p[0] < 20] + again
            if m == 0:  # the stopped member logged nothing of the third chunk
                assert again[0][0] == (29 if name == "val_loss" else 20)
            else:  # the others had logged it: not again
                assert all(s > max(s0 for s0, _ in first) for s, _ in again)
                joined = first + again
            assert joined == curve(straight[m], name), (m, name)
        for a, b in zip(jax.tree.leaves(got[m].params), jax.tree.leaves(want[m].params)):
            np.testing.assert_array_equal(a, b)
        assert got[m].test_metrics == want[m].test_metrics
    with Checkpoints(tmp_path / "stopped") as checkpoints:
        assert checkpoints.latest_step() == 40


def test_periodic_saves_and_the_final_one(split, tmp_path):
    """``every_steps`` offers the state at the first chunk end at or after each multiple;
    the end of training always saves; the run's figures say how many were written."""
    cfg = adam_cosine(num_steps=60)
    tracker = RecordingTracker()
    plan = CheckpointPlan(directory=tmp_path / "c", every_steps=25, keep=10, document={},
                          min_interval_s=0.0)
    (result,) = train_population([cfg], [split], [tracker], checkpoint=plan)
    with Checkpoints(tmp_path / "c") as checkpoints:
        kept = checkpoints.steps()
    assert kept[-1] == 60 and set(kept) <= {30, 50, 60}
    assert result.compute["checkpoints_saved"] == len(kept)
    assert result.compute["checkpoints_saved"] + result.compute["checkpoints_skipped"] == 3


def test_saver_latest_wins_and_errors_surface(split, tmp_path):
    """Offers while a save is in flight wait, a newer one replaces the waiting one; what
    waits is written at close; a failed background write is raised by the next call."""
    cfg = adam_cosine(num_steps=5)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps_per_call=1))
    states = [c.state for c in run_chunks(build_run([cfg], [split]), [])]
    saver = Saver(Checkpoints(tmp_path / "c", keep=10, async_save=False), min_interval_s=0,
                  max_busy_fraction=0.001)
    saver.offer(states[0], document={}, val_loss=1.0)  # saved at once
    deadline = time.monotonic() + 60
    while not saver.saved:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for state in states[1:]:  # the spacing (1000x the first save's time) holds them back
        saver.offer(state, document={}, val_loss=1.0)
    saver.close()
    assert saver.saved == [1, 5] and saver.skipped == 3

    saver = Saver(Checkpoints(tmp_path / "d", async_save=False), min_interval_s=0)
    assert saver.save_now(states[0], document={}, val_loss=1.0) == 1
    assert (tmp_path / "d" / "1").is_dir()
    saver.offer(states[1], document={"not json": object()}, val_loss=1.0)
    with pytest.raises(RuntimeError, match="checkpoint save .* failed"):
        for _ in range(100):  # until the thread has tried it
            time.sleep(0.05)
            saver.offer(states[2], document={}, val_loss=1.0)
    saver.close()


# --- end to end ---------------------------------------------------------------------------

# About 10 s of training here (2 to 4 thousand steps/s): long enough to stop it midway
# once its first points are in the store, short enough to resume to the end.
NUM_STEPS = 30000
RESUMABLE = (SMOKE, f"trainer.num_steps={NUM_STEPS}", "trainer.steps_per_call=500",
             "trainer.log_every_steps=500", "trainer.eval_every_steps=500",
             "model.hidden=[256,256]", "gradcheck.every_steps=0")


def assert_curves_whole(client, run_id: str, num_steps: int, every: int) -> None:
    """Every logged step from 0 to the end exactly once, in every curve (the training
    loss and learning rate also at the last step: issue 13, item 5)."""
    last = [num_steps - 1] if (num_steps - 1) % every else []
    for name in ("curves/train_loss", "curves/grad_norm", "curves/learning_rate"):
        steps = [p.step for p in history(client, run_id, name)]
        assert steps == list(range(0, num_steps, every)) + (
            last if name != "curves/grad_norm" else []), name
    val = [p.step for p in history(client, run_id, "curves/val_loss")]
    assert val == list(range(every - 1, num_steps, every)), "val_loss"


def wait_for_points(proc, log: Path, client, run_id: str, more_than: int,
                    timeout: float = 120) -> None:
    """Wait until the run is RUNNING with more than ``more_than`` train_loss points."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"CLI exited early ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no new points:\n{log.read_text()}"
        if (client.get_run(run_id).info.status == "RUNNING"
                and len(client.get_metric_history(run_id, "curves/train_loss")) > more_than):
            return
        time.sleep(0.3)


def stop(proc, sig) -> int:
    try:
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_C21_killed_and_stopped_run_resumes_into_the_same_run(tmp_path):
    """C21, end to end. A run SIGKILLed (no chance to save) resumes from its last periodic
    checkpoint; stopped again by SIGTERM it saves its last chunk and ends KILLED; a
    changed key is refused before any work; ``resume=latest`` continues the SAME run to
    FINISHED: one run in the store, ``resume_count`` 2, every curve point logged exactly
    once, checkpoints in ``mlruns/checkpoints/<run id>``."""
    log = tmp_path / "first.log"
    # saves at least 3 s apart, points flushed at least once a second: after a save, the
    # points past it reach the store before the next save (a fixed sleep raced them: under
    # load a save came first, and no point was logged after the latest checkpoint)
    proc = start_cli(*RESUMABLE, "trainer.checkpoint_every_steps=500",
                     "trainer.checkpoint_min_interval_s=3", cwd=tmp_path, log=log)
    try:
        client, run_id = wait_for_training(proc, log, tmp_path)
        folder = tmp_path / "mlruns" / "checkpoints" / run_id
        deadline = time.monotonic() + 120
        while True:  # train on past a checkpoint: points come after it
            steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()]
            points = len(client.get_metric_history(run_id, "curves/train_loss"))
            if steps and points > max(steps) // 500:
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(run_id).data.tags["checkpoint.dir"] == str(folder)
    with Checkpoints(folder) as checkpoints:
        periodic = checkpoints.latest_step()
    logged = len(client.get_metric_history(run_id, "curves/train_loss"))
    assert periodic is not None and logged > periodic // 500  # points after the checkpoint

    log = tmp_path / "second.log"
    proc = start_cli(f"resume={run_id}", cwd=tmp_path, log=log)
    wait_for_points(proc, log, client, run_id, more_than=logged + 1)
    assert stop(proc, signal.SIGTERM) == 143, log.read_text()
    output = log.read_text()
    assert f"run {run_id} resumed from step {periodic}" in output
    run = client.get_run(run_id)
    assert run.info.status == "KILLED", output
    assert run.data.tags["previous_end.1"].startswith("KILLED process")  # the reaper's
    assert f"resume={run_id}" in output  # the hint
    with Checkpoints(folder) as checkpoints:
        saved = checkpoints.latest_step()
    assert periodic < saved < NUM_STEPS and saved % 500 == 0
    assert f"checkpoint of step {saved} saved" in output

    code, out, err = finish(start_cli(SMOKE, f"resume={run_id}", "optim.learning_rate=0.5",
                                      "model.hidden=[4]", cwd=tmp_path))
    assert code == 2 and "model.hidden, optim.learning_rate" in err, out + err
    assert client.get_run(run_id).info.status == "KILLED"

    code, out, err = finish(start_cli(SMOKE, "resume=latest", cwd=tmp_path), timeout=600)
    assert code == 0, out + err
    assert f"run {run_id} resumed from step {saved}" in out
    runs = all_runs(client)
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume_count"] == "2"
    assert run.data.tags["previous_end.2"].startswith("KILLED received signal SIGTERM")
    assert "error" not in run.data.tags and "killed_reason" not in run.data.tags
    assert_curves_whole(client, run_id, NUM_STEPS, 500)
    assert "test/rmse" in run.data.metrics


@pytest.mark.slow
def test_a_finished_population_is_extended_in_its_own_runs(tmp_path):
    """``resume=PARENT`` of a finished population asks for more steps; with a larger
    ``trainer.num_steps`` it reopens the parent and every member run (3 members padded
    to 4 on 2 host devices, as before), continues each from the final checkpoint with no
    point logged twice, and summarises the parent again."""
    members = "population.members=[{seed:0},{seed:1,optim.learning_rate:0.003},{seed:2}]"
    code, out, err = finish(start_cli(SMOKE, members, cwd=tmp_path))
    assert code == 0, out + err
    client = store_client(tmp_path)
    (parent,) = [r for r in all_runs(client) if r.data.tags["population.role"] == "parent"]
    parent_id = parent.info.run_id
    # its members ended before it summarised them (they were RUNNING then: no best member)
    assert parent.data.metrics["members"] == 3 and "best/val_loss" in parent.data.metrics
    assert parent.data.tags["checkpoint.dir"] == str(tmp_path / "mlruns" / "checkpoints" /
                                                     parent_id)

    code, out, err = finish(start_cli(f"resume={parent_id}", cwd=tmp_path))
    assert code == 2 and "larger trainer.num_steps" in err, out + err

    code, out, err = finish(start_cli(f"resume={parent_id}", "trainer.num_steps=120",
                                      cwd=tmp_path))
    assert code == 0, out + err
    assert "3 member runs resumed from step 60 of 120" in out
    assert "3 members on 2 device(s)" in out
    runs = all_runs(client)
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["resume_count"] == "1"
        if run.data.tags["population.role"] == "member":
            steps = [p.step for p in history(client, run.info.run_id, "curves/train_loss")]
            # each segment's last step too (issue 13, item 5): 59 ended the first
            assert steps == [*range(0, 60, 10), 59, *range(60, 120, 10), 119]
    parent = client.get_run(parent_id)
    assert parent.data.metrics["members"] == 3 and "best/val_loss" in parent.data.metrics


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on a free local port (SQLite backend, artifacts
    served from a folder of its own); yields its URI."""
    import socket
    import subprocess
    import sys

    import requests

    from conftest import cli_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = tmp_path / "server"
    server.mkdir()
    log = open(server / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{server / 'mlflow.db'}", "--artifacts-destination", str(server / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log, stderr=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (server / "server.log").read_text()
            assert time.monotonic() < deadline, (server / "server.log").read_text()
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_a_remote_store_keeps_checkpoints_as_artifacts_and_resumes_elsewhere(tmp_path,
                                                                             mlflow_server):
    """With a tracking server, the final (latest) and best checkpoints are also artifacts
    of the run; a resume from another folder, where the local checkpoints do not exist,
    downloads them and continues the same run."""
    from mlflow import MlflowClient

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    uri = f"tracking.uri={mlflow_server}"
    code, out, err = finish(start_cli(SMOKE, uri, cwd=first))
    assert code == 0, out + err
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = all_runs(client)
    run_id = run.info.run_id
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/60"]
    local = first / "mlruns" / "checkpoints" / run_id
    assert run.data.tags["checkpoint.dir"] == str(local)
    import shutil

    shutil.rmtree(local)  # as on another machine

    code, out, err = finish(start_cli(f"resume={run_id}", "trainer.num_steps=80", uri,
                                      cwd=second))
    assert code == 0, out + err
    assert f"run {run_id} resumed from step 60 of 80" in out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume_count"] == "1"
    # each segment's last step too (issue 13, item 5): 59 ended the first
    assert [p.step for p in history(client, run_id, "curves/train_loss")] == \
        [*range(0, 60, 10), 59, *range(60, 80, 10), 79]
    assert "checkpoints/80" in [a.path for a in client.list_artifacts(run_id, "checkpoints")]
