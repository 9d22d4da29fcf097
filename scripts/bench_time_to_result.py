"""Time to result: whole-process wall time of the main job against a hand-written script.

Usage: python scripts/bench_time_to_result.py [--python PATH] [--repeats 5] [--json PATH]

What a user waits for is the whole command. Each sample is one subprocess, timed with
``time.perf_counter`` from its start to its exit; modes alternate within each repeat so
a shared machine's drifts fall on all of them alike:

- ``reference``: ``scripts/reference_diabetes.py``, the same training written by hand
  (JAX + optax + scikit-learn, one ``lax.scan``; no tracking, plots or checks);
- ``warm``: ``python -m trainer +experiment=diabetes`` as a user's second run finds the
  machine: the store exists and the compilation and dataset caches hold its programs and
  split (one untimed run fills them first);
- ``cold``: the same command as a first run: a new launch folder (so a new store) and
  empty compilation and dataset caches;
- ``examples``: ``python -m trainer +experiment=gradcheck`` (the worked examples), warm.

Every trainer command must exit 0 (else the script exits 1). The run's own phase
figures (``time/startup_s``, ``time/compile_s``, ``time/gradcheck_s``, ``time/wall_s``,
``xla/compile_cache_hits`` and ``_misses``) are read back from each warm and cold run's
store, and reported under their short names. Results: medians, the ratios warm/reference and
cold/reference, every sample, versions and the load average, as JSON with ``--json``.
The caches of warm samples are folders of this benchmark's own (``JAX_COMPILATION_CACHE_DIR``,
``TRAINER_DATA_CACHE_DIR``), not the user's.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
MODES = ["reference", "warm", "cold", "examples"]
TIMEOUT_S = 900
FIGURES = ["startup_s", "trace_lower_s", "compile_s", "train_s", "gradcheck_s", "wall_s",
           "compile_cache_hits", "compile_cache_misses"]
# the run's names of FIGURES (trainer/names.py): timings under time/, XLA's figures under xla/
RECORDED = {k: f"xla/{k}" if k.startswith("compile_cache_") else f"time/{k}" for k in FIGURES}

READ_RUN = """import json, sys, mlflow
c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlruns/mlflow.db")
ids = [e.experiment_id for e in c.search_experiments()]
run = c.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1)[0]
print(json.dumps({"status": run.info.status, "metrics": run.data.metrics}))"""


def fail(message: str) -> NoReturn:
    print(f"bench_time_to_result: {message}", file=sys.stderr)
    sys.exit(1)


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        fail(f"exit {done.returncode}: {' '.join(argv)}\n{(done.stdout + done.stderr)[-3000:]}")
    return wall_s


def read_run(python: str, launch: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([python, "-c", READ_RUN, str(launch)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        fail(f"cannot read the store in {launch}:\n{out.stderr[-2000:]}")
    run = json.loads(out.stdout.strip().splitlines()[-1])
    if run["status"] != "FINISHED":
        fail(f"the run in {launch} ended {run['status']}")
    return {k: run["metrics"][RECORDED[k]] for k in FIGURES if RECORDED[k] in run["metrics"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    py = args.python
    root = Path(tempfile.mkdtemp(prefix="bench_ttr_"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", JAX_COMPILATION_CACHE_DIR=str(root / "cache"),
               TRAINER_DATA_CACHE_DIR=str(root / "data-cache"))
    warm_dir = root / "warm"
    warm_dir.mkdir()
    main_job = [py, "-m", "trainer", "+experiment=diabetes"]
    commands = {"reference": [py, str(REPO / "scripts" / "reference_diabetes.py")],
                "warm": main_job, "cold": main_job,
                "examples": [py, "-m", "trainer", "+experiment=gradcheck"]}
    # untimed: fill the page cache, the bytecode caches, the store and the compilation cache
    for mode in ("reference", "warm", "examples"):
        timed(commands[mode], warm_dir, env)
    samples = {m: [] for m in MODES}
    figures = {"warm": [], "cold": []}
    loads = []
    for r in range(args.repeats):
        loads.append(os.getloadavg()[0])
        for mode in MODES:
            cwd, mode_env = warm_dir, env
            if mode == "cold":
                cwd = root / f"cold{r}"
                cwd.mkdir()
                mode_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(cwd / "cache"),
                            "TRAINER_DATA_CACHE_DIR": str(cwd / "data-cache")}
            samples[mode].append(timed(commands[mode], cwd, mode_env))
            if mode in figures:
                figures[mode].append(read_run(py, cwd, env))
            print(f"repeat {r + 1}/{args.repeats} {mode:<10} {samples[mode][-1]:6.2f} s",
                  flush=True)
    median = {m: statistics.median(v) for m, v in samples.items()}
    ratios = {"warm/reference": median["warm"] / median["reference"],
              "cold/reference": median["cold"] / median["reference"]}
    phase = {m: {k: statistics.median(f[k] for f in rows if k in f) for k in FIGURES
                 if any(k in f for f in rows)} for m, rows in figures.items()}
    print(f"\n{'mode':<10} {'median s':>9} {'min s':>7} {'max s':>7}")
    for m, v in samples.items():
        print(f"{m:<10} {median[m]:9.2f} {min(v):7.2f} {max(v):7.2f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    for m, f in phase.items():
        print(f"{m} run, medians: " + ", ".join(f"{k} {v:.3g}" for k, v in f.items()))
    if args.json:
        versions = subprocess.run(
            [py, "-c", "import json, importlib.metadata as md; print(json.dumps({p: md.version(p)"
                       " for p in ['jax', 'jaxlib', 'flax', 'optax', 'mlflow', 'hydra-core']}))"],
            capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "time to result: whole-process wall time, diabetes main job",
            "commands": {m: " ".join(c) for m, c in commands.items()}, "repeats": args.repeats,
            "samples_s": samples, "median_s": median, "ratios": ratios, "run_figures": figures,
            "run_figures_median": phase, "load_avg_1min_at_repeat_start": loads,
            "git_head": head, "packages": json.loads(versions or "{}"),
            "cpu_count": os.cpu_count()}, indent=2) + "\n")
        print(f"wrote {args.json}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
