"""P6: whole-process wall time of one 16-point sweep run three ways.

Usage: python scripts/bench_sweep.py [--python PATH] [--modes separate,multirun,population]
                                     [--repeats 3] [--multirun-extra "hydra/sweeper=basic"]
                                     [--baseline-python PATH] [--baseline-modes M1,M2]
                                     [--warmup 1] [--json PATH] [--keep]

The sweep: ``+experiment=diabetes optim.learning_rate=1e-3,3e-3,1e-2,3e-2 seed=0,1,2,3``
(4 learning rates x 4 seeds). A sample of a mode is the wall time, in seconds of
``time.perf_counter``, from the start of its first subprocess to the exit of its last:

- ``separate``: 16 ``python -m trainer +experiment=diabetes optim.learning_rate=LR seed=S``
  one after another (all 16 share the sample's launch folder, as a user's would);
- ``multirun``: one ``python -m trainer -m ...`` over the sweep plus ``--multirun-extra``
  (on code with a population sweeper: ``hydra/sweeper=basic``, one in-process job per point);
- ``population``: the same ``-m`` command with no extra override;
- with ``--baseline-python`` (an interpreter that imports the code from before populations,
  e.g. a worktree of d01f514 with its own venv): ``separate_before`` and ``multirun_before``,
  the first two modes run by it (its multirun is one in-process job per point), in the
  same repeats, so the "before" figures share the session's machine state
  (``--baseline-modes`` picks which).

Every sample runs in a fresh temporary launch folder, so it writes a new SQLite store
(``<launch>/mlruns/mlflow.db``). After timing, every command must have exited 0 and the store
must hold 16 FINISHED runs (population: at least 16, any parent/child shape), else the script
exits 1: a figure from failing commands is worthless. Before the repeats, ``--warmup``
untimed rounds (one single-point run of each interpreter, and one population command) fill
the page cache, the bytecode caches and the compilation cache (``~/.cache/trainer/jax``,
shared by runs on the machine, as a user's second sweep would find it). Modes
alternate within each repeat so slow drifts of a shared machine fall on all of them alike.
The JSON holds every sample, medians, ratios, versions, the git commit of the ``trainer``
that the interpreter imports, the host and its load average.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

LEARNING_RATES = ["1e-3", "3e-3", "1e-2", "3e-2"]
SEEDS = ["0", "1", "2", "3"]
NUM_POINTS = len(LEARNING_RATES) * len(SEEDS)  # runs one sample must leave FINISHED
MODES = ["separate", "multirun", "population"]
BEFORE = {"separate_before": "separate", "multirun_before": "multirun"}  # --baseline-python
COMMAND_TIMEOUT_S = 3600                        # a hung job fails the benchmark, not the machine

# Runs in the measured interpreter (its own mlflow reads its own store); argv[1] = launch folder.
COUNT_RUNS = """import json, sys, mlflow
from mlflow.entities import ViewType
c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlruns/mlflow.db")
ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
runs = c.search_runs(ids, run_view_type=ViewType.ALL, max_results=50000) if ids else []
print(json.dumps([[r.info.status, "mlflow.parentRunId" in r.data.tags] for r in runs]))"""

VERSIONS = """import json, os, sys, importlib.metadata as md, jax, trainer
v = {p: md.version(p) for p in ["jax", "jaxlib", "flax", "optax", "mlflow", "hydra-core"]}
print(json.dumps({"python": sys.version.split()[0], "packages": v, "backend": jax.default_backend(),
                  "trainer_dir": os.path.dirname(trainer.__file__)}))"""


def sweep_commands(mode: str, python: str, multirun_extra: list[str]) -> list[list[str]]:
    """The argv lists one sample of ``mode`` runs, in order (``python``: the mode's
    interpreter; a ``*_before`` mode is its plain mode without extra overrides)."""
    if mode in BEFORE:
        return sweep_commands(BEFORE[mode], python, [])
    base = [python, "-m", "trainer"]
    if mode == "separate":
        return [base + ["+experiment=diabetes", f"optim.learning_rate={lr}", f"seed={s}"]
                for lr in LEARNING_RATES for s in SEEDS]
    sweep = ["-m", "+experiment=diabetes", "optim.learning_rate=" + ",".join(LEARNING_RATES),
             "seed=" + ",".join(SEEDS)]
    return [base + sweep + (multirun_extra if mode == "multirun" else [])]


def child_env() -> dict[str, str]:
    """This process's environment without inherited MLFLOW_* settings, telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def fail(message: str) -> NoReturn:
    print(f"bench_sweep: {message}", file=sys.stderr)
    sys.exit(1)


def run_sample(commands: list[list[str]], expect_runs: int, at_least: bool, python: str,
               keep: bool) -> float:
    """Run ``commands`` in a fresh launch folder; returns their wall time in seconds.

    Raises SystemExit (1) when a command exits non-zero or the store does not hold
    ``expect_runs`` FINISHED runs (``at_least``: that many or more); the folder is then kept.
    """
    launch = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    env = child_env()
    start = time.perf_counter()
    for i, argv in enumerate(commands):
        with open(launch / f"cmd{i:02d}.log", "w") as log:
            rc = subprocess.run(argv, cwd=launch, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=COMMAND_TIMEOUT_S).returncode
        if rc != 0:
            tail = (launch / f"cmd{i:02d}.log").read_text()[-3000:]
            fail(f"exit {rc}: {shlex.join(argv)}\n(launch folder kept: {launch})\n{tail}")
    wall_s = time.perf_counter() - start
    if not (launch / "mlruns" / "mlflow.db").is_file():
        fail(f"no store at {launch}/mlruns/mlflow.db after {shlex.join(commands[0])}")
    out = subprocess.run([python, "-c", COUNT_RUNS, str(launch)], cwd=launch, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"could not read the store in {launch}:\n{out.stderr[-3000:]}")
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    finished = sum(status == "FINISHED" for status, _ in runs)
    if finished < expect_runs or (not at_least and finished != expect_runs):
        fail(f"{finished} FINISHED runs of {len(runs)} ({sum(p for _, p in runs)} children) in "
             f"{launch}, expected {'>= ' if at_least else ''}{expect_runs}")
    if not keep:
        shutil.rmtree(launch, ignore_errors=True)
    return wall_s


def describe(python: str) -> dict:
    """Versions, the imported checkout's commit and the host, for the JSON."""
    with tempfile.TemporaryDirectory() as cwd:  # not the driver's cwd: it may hold a trainer/
        out = subprocess.run([python, "-c", VERSIONS], cwd=cwd, env=child_env(),
                             capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{python} cannot import jax and trainer:\n{out.stderr[-3000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    git = ["git", "-C", info["trainer_dir"]]
    info["git_head"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                      text=True).stdout.strip() or None
    info["git_dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "-uno"],
                                            capture_output=True, text=True).stdout.strip())
    info["interpreter"] = python
    info["host"] = {"node": platform.node(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "processor": cpu_model()}
    return info


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs trainer")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    parser.add_argument("--repeats", type=int, default=3, help="samples per mode")
    parser.add_argument("--multirun-extra", default="", help="extra overrides for multirun")
    parser.add_argument("--baseline-python", help="interpreter of the code before populations: "
                        "adds modes separate_before and multirun_before")
    parser.add_argument("--baseline-modes", default=",".join(BEFORE),
                        help="which of " + ",".join(BEFORE) + " --baseline-python runs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed single-point runs first")
    parser.add_argument("--json", type=Path, help="write samples, medians and versions here")
    parser.add_argument("--keep", action="store_true", help="keep the launch folders")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES) or args.repeats < 1:
        parser.error(f"--modes must name some of {MODES}; --repeats must be >= 1")
    extra = shlex.split(args.multirun_extra)
    pythons = {m: args.python for m in modes}
    if args.baseline_python:
        before = [m for m in args.baseline_modes.split(",") if m]
        if not before or set(before) - set(BEFORE):
            parser.error(f"--baseline-modes must name some of {list(BEFORE)}")
        modes += before
        pythons.update({m: args.baseline_python for m in before})

    info = describe(args.python)
    print(f"{args.python}: trainer {info['git_head']}{' (dirty)' if info['git_dirty'] else ''}, "
          f"jax {info['packages']['jax']} on {info['backend']}, host {info['host']['node']}")
    if args.baseline_python:
        info["baseline"] = describe(args.baseline_python)
        print(f"{args.baseline_python}: trainer {info['baseline']['git_head']} (the before modes)")
    load_before = uptime()
    for _ in range(args.warmup):
        for python in dict.fromkeys(pythons.values()):
            run_sample(sweep_commands("separate", python, extra)[:1], 1, False, python, False)
        if "population" in modes:
            run_sample(sweep_commands("population", args.python, extra), NUM_POINTS, True,
                       args.python, False)
    samples_s: dict[str, list[float]] = {m: [] for m in modes}
    loads: dict[str, list[float]] = {m: [] for m in modes}  # 1-minute load average at each start
    for r in range(args.repeats):
        for mode in modes:
            loads[mode].append(os.getloadavg()[0])
            wall_s = run_sample(sweep_commands(mode, pythons[mode], extra), NUM_POINTS,
                                mode == "population", pythons[mode], args.keep)
            samples_s[mode].append(wall_s)
            print(f"repeat {r + 1}/{args.repeats} {mode:<16} {wall_s:8.1f} s", flush=True)
    load_after = uptime()

    median_s = {m: statistics.median(v) for m, v in samples_s.items()}
    pairs = [("separate", "population"), ("multirun", "population"), ("separate", "multirun"),
             ("separate_before", "population"), ("multirun_before", "population"),
             ("separate_before", "separate"), ("multirun_before", "multirun")]
    ratios = {f"{a}/{b}": median_s[a] / median_s[b] for a, b in pairs
              if a in median_s and b in median_s}
    print(f"\n{'mode':<16} {'n':>3} {'median s':>9} {'min s':>8} {'max s':>8}")
    for m, v in samples_s.items():
        print(f"{m:<16} {len(v):>3} {median_s[m]:9.1f} {min(v):8.1f} {max(v):8.1f}")
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x (ratio of medians)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "P6 16-point diabetes sweep, whole-process wall time",
            "commands": {m: [shlex.join(c) for c in sweep_commands(m, pythons[m], extra)]
                         for m in modes},
            "repeats": args.repeats, "warmup": args.warmup, "samples_s": samples_s,
            "median_s": median_s, "min_s": {m: min(v) for m, v in samples_s.items()},
            "max_s": {m: max(v) for m, v in samples_s.items()}, "ratios": ratios,
            "load_avg_1min_at_sample_start": loads, "uptime_before": load_before,
            "uptime_after": load_after, **info}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
