"""render.Renderer: plots drawn in worker processes, logged in order, nothing lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import wait_gone

from trainer import render, report


class Artifacts:
    def __init__(self):
        self.logged = []

    def log_artifact(self, path, artifact_path=None):
        assert Path(path).is_file()
        self.logged.append((Path(path).name, artifact_path))


def write_pid(path: Path) -> Path:
    path.write_text(str(os.getpid()))
    return path


def die_outside(path: Path, parent_pid: int) -> Path:
    """Kills the worker that runs it (never the test process)."""
    if os.getpid() != parent_pid:
        os._exit(3)
    return write_pid(path)


def fail(path: Path) -> Path:
    raise ValueError("the plot's own error")


HISTORY = {"train_loss": ([0, 10, 20], [1.0, 0.5, 0.25]), "val_loss": ([0, 20], [1.1, 0.4]),
           "learning_rate": ([0, 10, 20], [1e-3, 5e-4, 0.0])}


def test_workers_draw_and_finish_logs_in_order(tmp_path):
    tracker = Artifacts()
    with render.Renderer(workers=2) as renderer:
        for i in range(4):
            renderer.plot(tracker, report.plot_training, HISTORY, tmp_path / f"curves{i}.png",
                          title=f"member {i}")
        renderer.plot(tracker, write_pid, tmp_path / "pid.txt", artifact_path="where")
        assert tracker.logged == []  # nothing is logged before finish
        renderer.finish()
    assert tracker.logged == [(f"curves{i}.png", None) for i in range(4)] + [("pid.txt", "where")]
    assert int((tmp_path / "pid.txt").read_text()) != os.getpid()  # drawn elsewhere
    for i in range(4):
        with Image.open(tmp_path / f"curves{i}.png") as image:
            assert image.size == (900, 400)


def test_a_dead_worker_costs_nothing_but_time(tmp_path):
    tracker = Artifacts()
    with render.Renderer(workers=1) as renderer:
        renderer.plot(tracker, die_outside, tmp_path / "a.txt", os.getpid())
        renderer.plot(tracker, write_pid, tmp_path / "b.txt")
        renderer.finish()
    assert [name for name, _ in tracker.logged] == ["a.txt", "b.txt"]
    assert int((tmp_path / "a.txt").read_text()) == os.getpid()  # drawn here instead


def test_no_workers_draws_in_process_and_the_plots_errors_surface(tmp_path):
    tracker = Artifacts()
    with render.Renderer(workers=0) as renderer:
        renderer.plot(tracker, write_pid, tmp_path / "pid.txt")
        renderer.finish()
    assert int((tmp_path / "pid.txt").read_text()) == os.getpid()
    with render.Renderer(workers=1) as renderer:
        renderer.plot(tracker, fail, tmp_path / "never.png")
        with pytest.raises(ValueError, match="the plot's own error"):
            renderer.finish()


def test_an_error_leaving_the_block_still_logs_what_was_queued(tmp_path):
    tracker = Artifacts()
    with pytest.raises(RuntimeError, match="the run failed"):
        with render.Renderer(workers=1) as renderer:
            renderer.plot(tracker, write_pid, tmp_path / "kept.txt")
            raise RuntimeError("the run failed")
    assert tracker.logged == [("kept.txt", None)]


def test_default_uses_workers_only_under_the_cli():
    assert render.default_workers() == 0  # pytest's __main__ is not trainer's
    assert render.Renderer()._workers == 0


def test_workers_exit_when_the_run_is_killed(tmp_path):
    """A SIGKILLed parent leaves no worker behind."""
    import signal
    import subprocess
    import sys

    script = ("import os, sys, time\n"
              "from trainer import render\n"
              "with render.Renderer(workers=1) as r:\n"
              "    r._pool.submit(render._warm).result()\n"
              "    print(*[p.pid for p in r._pool._processes.values()], flush=True)\n"
              "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    (worker,) = map(int, proc.stdout.readline().split())
    os.kill(worker, 0)  # alive while its parent is
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    if not wait_gone(worker, 20):
        os.kill(worker, signal.SIGKILL)
        raise AssertionError(f"worker {worker} outlived its SIGKILLed parent by 20 s")
