"""The bad-input corpus (issue 13): every entry of ``tests/corpus.py`` gets its class.

In-process, each entry goes through the CLI's own pre-run checks (``precheck`` below
calls what ``python -m trainer`` calls before it opens a run, in the same order): a usage
error must be refused there with one line naming its cause; any other entry must pass.
A sample, with every entry that only the CLI can judge (sweeps, Hydra's own options),
runs through the CLI in subprocesses, checking exit codes, the one-line message, and the
store: no run for a usage error, a FAILED run with its error for a failure.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import cli_env, store_client
from corpus import CORPUS, FAILED, SUCCESS, USAGE, Case


IN_PROCESS = [c for c in CORPUS if not c.needs_store]


def _write_files(case: Case, cwd: Path) -> None:
    for name, body in case.files.items():
        if body is None:
            (cwd / name).mkdir()
        else:
            (cwd / name).write_bytes(body)


def precheck(args: list[str]) -> None:
    """What ``python -m trainer ARGS`` checks before it opens a run, in its order
    (``__main__._main``, then ``run_job``): every job's composed config, its store and
    output folder (``check_command``), the backend and memory, then each job's members
    and data. Raises what the CLI reports as a usage error (exit 2)."""
    from trainer.config import member_configs, to_config
    from trainer.data import load_member_datasets
    from trainer.precheck import check_backend, check_command, check_memory, job_config

    multirun = "-m" in args
    config_name = next((a.split("=", 1)[1] for a in args if a.startswith("--config-name=")),
                       None)
    overrides = [a for a in args if a != "-m" and not a.startswith("--")]
    jobs = check_command(overrides, multirun=multirun, config_name=config_name)
    devices = check_backend(jobs[0].cfg.population.host_devices)
    for job in jobs:
        check_memory(job.cfg, devices, num_members=job.num_members)
    for job in jobs:
        cfg = job_config(job.cfg)
        if cfg.search is not None:
            from trainer.search import check_search

            check_search(cfg)
        members = member_configs(cfg) if cfg.population.members else [({}, cfg)]
        load_member_datasets([to_config(member) for _, member in members], Path.cwd())


@pytest.mark.parametrize("case", IN_PROCESS, ids=lambda c: c.id)
def test_corpus_in_process(case, tmp_path, monkeypatch):
    """A usage error is refused before any run, in one line that names its cause;
    an entry that must run (to success or to a FAILED run) passes the checks."""
    from trainer.config import ConfigError
    from trainer.data import DataError

    monkeypatch.chdir(tmp_path)  # the launch folder: the store and outputs go under it
    _write_files(case, tmp_path)
    if case.expected == USAGE:
        with pytest.raises((ConfigError, DataError)) as err:
            precheck(list(case.args))
        message = str(err.value)
        assert case.says.lower() in message.lower(), message
        assert "\n" not in message.strip() and "Traceback" not in message
    else:
        precheck(list(case.args))
    assert not (tmp_path / "mlruns").exists()  # no store touched, let alone a run


def _sample() -> list[Case]:
    """Every failure and entry judged against the store, each 25th usage error, each
    10th success."""
    usage = [c for c in CORPUS if c.expected == USAGE and not c.needs_store]
    success = [c for c in CORPUS if c.expected == SUCCESS]
    return ([c for c in CORPUS if c.expected == FAILED or c.needs_store]
            + usage[::25] + success[::10])


def _run(case: Case, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir()
    _write_files(case, cwd)
    return subprocess.run([sys.executable, "-m", "trainer", *case.args], cwd=cwd,
                          env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_corpus_sample_through_the_cli(tmp_path):
    """The sample through real CLI processes, two at a time (the machine's cores)."""
    cases = _sample()
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda ic: _run(ic[1], tmp_path / f"case{ic[0]}"),
                             enumerate(cases)))
    wrong = []
    for index, (case, proc) in enumerate(zip(cases, done)):
        cwd = tmp_path / f"case{index}"
        runs = []
        if (cwd / "mlruns" / "mlflow.db").exists():
            client = store_client(cwd)
            runs = [r for e in client.search_experiments()
                    for r in client.search_runs([e.experiment_id])]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        if case.expected == USAGE:
            ok = (proc.returncode == 2 and not runs and "Traceback" not in proc.stderr
                  and len(errors) == 1 and case.says.lower() in errors[0].lower())
        elif case.expected == FAILED:
            ok = (proc.returncode == 1 and runs and "Traceback" not in proc.stderr
                  and all(r.info.status == "FAILED" and r.data.tags.get("error")
                          for r in runs))
        else:
            ok = (proc.returncode == 0 and runs
                  and all(r.info.status == "FINISHED" for r in runs))
        if not ok:
            wrong.append(f"{case.id!r}: expected {case.expected}, exit {proc.returncode}, "
                         f"runs {[r.info.status for r in runs]}, stderr: "
                         f"{proc.stderr.strip()[-400:]}")
    assert not wrong, "\n".join(wrong)


def test_every_schema_key_is_in_the_corpus():
    """A key added to a schema must get corpus entries (out of range, huge, a good value)."""
    from corpus import VALUES, _schema_keys

    keys = {key for key, _, _ in _schema_keys()}
    assert keys == set(VALUES), (sorted(keys - set(VALUES)), sorted(set(VALUES) - keys))
