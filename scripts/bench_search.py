"""P9: a 32-trial search of learning rate and weight decay, batched against one trial per process.

Usage: python scripts/bench_search.py [--python PATH] [--num-trials 32] [--trials-per-batch 8]
                                      [--repeats 1] [--json PATH] [--keep]

The search: ``+experiment=diabetes +search=lr_wd`` (``conf/search/lr_wd.yaml``: learning rate and
weight decay, log-uniform; TPE with seed 0 and ``constant_liar``). A sample of a mode is the wall
time, in seconds of ``time.perf_counter``, from the start of its first subprocess to the exit of
its last, in a fresh temporary launch folder (a new SQLite store and a new study):

- ``batched``: ONE ``python -m trainer +experiment=diabetes +search=lr_wd`` process; Optuna asks
  ``--trials-per-batch`` trials at a time and each batch trains as one population;
- ``per_process``: the same search, one trial per process, as a user without populations would
  run it: ``search.trials_per_batch=1 search.num_trials=K`` for K = 1 .. ``--num-trials``, one
  process after another; each continues the study the previous one left (TPE sees every trial
  told before it asks, which a batch cannot).

After timing, every command must have exited 0, the study must hold ``--num-trials`` COMPLETE
trials and the store as many FINISHED trial runs, else the script exits 1. The best validation
loss of each mode (the study's best value: the final validation loss, MSE on the standardised
target) is reported beside the times: batching must not buy its speed with a worse search.
One untimed warm-up process fills the page cache, the bytecode caches and the compilation cache
(``~/.cache/trainer/jax``, as a user's second search would find it). Modes alternate within each
repeat. The JSON holds every sample, the best values, versions, the commit, the host and its load.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
MODES = ["batched", "per_process"]
COMMAND_TIMEOUT_S = 3600
STUDY = "diabetes-lr_wd"

# Runs in the measured interpreter; argv[1] = launch folder. The study's trials and the store's runs.
READ_BACK = """import json, sys, optuna, mlflow
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
root = sys.argv[1] + "/mlruns"
study = optuna.load_study(study_name=sys.argv[2],
                          storage=JournalStorage(JournalFileBackend(root + "/optuna/" + sys.argv[2] + ".journal")))
done = [t for t in study.trials if t.state.name == "COMPLETE"]
c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
e = c.get_experiment_by_name("diabetes").experiment_id
runs = c.search_runs([e], filter_string="attributes.status = 'FINISHED'", max_results=10000)
trial_runs = [r for r in runs if "search.trial" in r.data.tags]
print(json.dumps({"complete": len(done), "trials": len(study.trials),
                  "best_value": study.best_value if done else None,
                  "best_params": study.best_params if done else None,
                  "finished_trial_runs": len(trial_runs)}))
"""


def fail(message: str) -> NoReturn:
    print(f"bench_search: {message}", file=sys.stderr)
    sys.exit(1)


def run(python: str, args: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run([python, "-m", "trainer", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if proc.returncode != 0:
        fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def sample(python: str, mode: str, num_trials: int, per_batch: int, keep: bool) -> dict:
    launch = Path(tempfile.mkdtemp(prefix=f"bench-search-{mode}-"))
    base = ["+experiment=diabetes", "+search=lr_wd"]
    try:
        start = time.perf_counter()
        if mode == "batched":
            run(python, [*base, f"search.num_trials={num_trials}",
                         f"search.trials_per_batch={per_batch}"], launch)
        else:
            for k in range(1, num_trials + 1):
                run(python, [*base, f"search.num_trials={k}", "search.trials_per_batch=1"],
                    launch)
        wall = time.perf_counter() - start
        out = subprocess.run([python, "-c", READ_BACK, str(launch), STUDY], capture_output=True,
                             text=True, check=True).stdout
        back = json.loads(out)
        if back["complete"] != num_trials or back["finished_trial_runs"] != num_trials:
            fail(f"{mode}: expected {num_trials} complete trials and FINISHED runs, got {back}")
        return {"mode": mode, "wall_s": wall, **back}
    finally:
        if not keep:
            shutil.rmtree(launch, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--num-trials", type=int, default=32)
    p.add_argument("--trials-per-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the launch folders")
    a = p.parse_args()

    warm = Path(tempfile.mkdtemp(prefix="bench-search-warmup-"))
    run(a.python, ["+experiment=diabetes", "+search=lr_wd", "search.num_trials=2",
                   "search.trials_per_batch=2"], warm)
    shutil.rmtree(warm, ignore_errors=True)
    samples = []
    for repeat in range(a.repeats):
        for mode in (MODES if repeat % 2 == 0 else MODES[::-1]):
            s = sample(a.python, mode, a.num_trials, a.trials_per_batch, a.keep)
            print(f"repeat {repeat} {mode}: {s['wall_s']:.1f} s, best validation loss "
                  f"{s['best_value']:.5f}", flush=True)
            samples.append(s)
    medians = {m: statistics.median(s["wall_s"] for s in samples if s["mode"] == m) for m in MODES}
    best = {m: min(s["best_value"] for s in samples if s["mode"] == m) for m in MODES}
    ratio = medians["per_process"] / medians["batched"]
    print(f"median wall: batched {medians['batched']:.1f} s, one trial per process "
          f"{medians['per_process']:.1f} s: {ratio:.2f}x (goal >= 5x); best validation loss "
          f"batched {best['batched']:.5f}, per process {best['per_process']:.5f}")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    versions = json.loads(subprocess.run(
        [a.python, "-c", "import json, jax, optuna, mlflow; print(json.dumps({'jax': "
         "jax.__version__, 'optuna': optuna.__version__, 'mlflow': mlflow.__version__}))"],
        capture_output=True, text=True, check=True).stdout)
    result = {"benchmark": "search", "num_trials": a.num_trials,
              "trials_per_batch": a.trials_per_batch, "samples": samples,
              "median_wall_s": medians, "ratio_per_process_over_batched": ratio,
              "best_value": best, "commit": commit, "versions": versions,
              "host": platform.node(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
