"""How many parallel writers a store holds: N processes each log one realistic run at once.

Usage: python scripts/bench_writers.py [--writers 1,2,4,8,16] [--stores sqlite,postgres]
                                       [--runs 5] [--points 300] [--batch 50] [--json out.json]

Each writer process imports MLflow and opens its ``MlflowClient`` first, then waits for a
common start signal (imports and connections stay outside the timed region), and then
logs ``--runs`` runs (5), one after another, each as a trainer job does: create the run, 40 params in one batch, 12 tags, a
``--points`` metric points (3 curves) in batches of ``--batch``, end it FINISHED. Every
call is timed; an exception is counted as an error (with its first line) and the writer
goes on with its next call.

Stores, each new and migrated by this process before the writers start:
  sqlite    sqlite:///<tmp>/mlflow.db, the writers' own MlflowClient on the file (raw
            MLflow, without the trainer's store process or lock)
  postgres  ``mlflow server`` on a local PostgreSQL cluster (trainer/tracking_server.py),
            the writers' clients over HTTP
  server-sqlite  ``mlflow server`` on SQLite, for comparison

Per store and N it prints: wall time from the start signal to the last writer's end,
runs/s and points/s over that time, median and 95th-percentile latency of a metric
batch, the slowest call of any kind, runs that did not end FINISHED, and errors (the
first message).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUM_PARAMS = 40     # a trainer run logs about this many config leaves
NUM_TAGS = 12       # ... and about this many tags
CURVES = ("curves/train_loss", "curves/grad_norm", "curves/learning_rate")


def writer(uri: str, experiment_id: str, index: int, runs: int, points: int, batch: int,
           start, results) -> None:
    """One process: log ``runs`` runs, one after the other, after ``start`` is set; put
    its timings on ``results``."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (MLflow prints each run's URL)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)  # connection (and SQLite file) opened
    results.put("ready")
    start.wait()
    t0 = time.perf_counter()
    calls: dict[str, list[float]] = {"create_run": [], "params": [], "tags": [],
                                     "metrics": [], "end": []}
    errors: list[str] = []
    finished = 0

    def timed(kind, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (counted, not hidden)
            text = " ".join(str(err).split())
            cause = text.find("Error) ")  # SQLAlchemy's "(sqlite3.OperationalError) ..."
            errors.append(f"{kind}: {type(err).__name__}: "
                          f"{text[text.rfind('(', 0, cause):][:120] if cause > 0 else text[:120]}")
            return None
        finally:
            calls[kind].append(time.perf_counter() - t)

    for number in range(runs):
        finished += log_one_run(client, experiment_id, f"writer-{index}-{number}", points,
                                batch, timed)
    results.put({"index": index, "wall_s": time.perf_counter() - t0, "calls": calls,
                 "errors": errors, "finished": finished})


def log_one_run(client, experiment_id: str, name: str, points: int, batch: int,
                timed) -> int:
    """Log one run as a trainer job does; 1 if it reads back FINISHED."""
    from mlflow.entities import Metric, Param, RunTag

    run = timed("create_run", client.create_run, experiment_id, run_name=name)
    if run is None:
        return 0
    run_id = run.info.run_id
    timed("params", client.log_batch, run_id,
          params=[Param(f"group{i % 5}.key{i}", str(i * 0.001)) for i in range(NUM_PARAMS)])
    timed("tags", client.log_batch, run_id,
          tags=[RunTag(f"tag{i}", f"value {i}") for i in range(NUM_TAGS)])
    now = int(time.time() * 1000)
    series = [Metric(key, 1.0 / (step + 1), now, step * 10)
              for step in range(points // len(CURVES)) for key in CURVES]
    for lo in range(0, len(series), batch):
        timed("metrics", client.log_batch, run_id, metrics=series[lo:lo + batch])
    timed("end", client.set_terminated, run_id, "FINISHED")
    got = timed("end", client.get_run, run_id)
    return int(got is not None and got.info.status == "FINISHED")


def new_store(kind: str, folder: Path) -> tuple[str, callable]:
    """Create and migrate a store of ``kind`` in ``folder``; returns (uri, stop)."""
    from mlflow import MlflowClient

    if kind == "sqlite":
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # migrate once
        return uri, lambda: None
    from trainer.tracking_server import (LocalPostgres, find_pg_bin, mlflow_server_command,
                                         server_env, stop_process_group, wait_for_http)

    port = free_port()
    env = server_env()
    postgres = None
    if kind == "postgres":
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise SystemExit("no PostgreSQL programs found (trainer/tracking_server.py)")
        from trainer.tracking_server import _unprivileged_user

        folder.chmod(0o711)
        postgres = LocalPostgres(folder / "pg", free_port(), bin_dir, _unprivileged_user(None))
        postgres.initialise()
        postgres.start()
        backend = postgres.uri()
        env["PGPASSWORD"] = postgres.password
    else:
        backend = f"sqlite:///{folder / 'mlflow.db'}"
    log = open(folder / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(mlflow_server_command(backend, folder / "artifacts", port=port),
                              env=env, stdout=log, stderr=log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", server, timeout_s=120)

    def stop():
        stop_process_group(server)
        log.close()
        if postgres is not None:
            postgres.stop()

    return uri, stop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(uri: str, n: int, runs: int, points: int, batch: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(f"writers-{n}-{time.time_ns()}")
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(uri, experiment_id, i, runs, points, batch,
                                              start, results)) for i in range(n)]
    for p in procs:
        p.start()
    for _ in procs:  # every writer imported MLflow and connected
        assert results.get(timeout=600) == "ready"
    time.sleep(1.0)  # their last start-up work settles
    t0 = time.perf_counter()
    start.set()
    out = [results.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    metric_lat = sorted(t for r in out for t in r["calls"]["metrics"])
    errors = [e for r in out for e in r["errors"]]
    return {"writers": n, "wall_s": wall, "runs_per_s": n * runs / wall,
            "points_per_s": n * runs * points / wall,
            "metric_batch_p50_ms": 1000 * statistics.median(metric_lat),
            "metric_batch_p95_ms": 1000 * metric_lat[int(0.95 * (len(metric_lat) - 1))],
            "slowest_call_ms": 1000 * max(t for r in out for ts in r["calls"].values()
                                          for t in ts),
            "slowest_writer_s": max(r["wall_s"] for r in out),
            "not_finished": n * runs - sum(r["finished"] for r in out),
            "errors": len(errors), "first_error": errors[0] if errors else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writers", default="1,2,4,8,16")
    p.add_argument("--stores", default="sqlite,postgres")
    p.add_argument("--runs", type=int, default=5, help="runs per writer, one after another")
    p.add_argument("--points", type=int, default=300, help="metric points per run")
    p.add_argument("--batch", type=int, default=50, help="metric points per log_batch call")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args(argv)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from importlib import metadata

    versions = {d: metadata.version(d) for d in ("mlflow", "sqlalchemy", "psycopg")}
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
          + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    rows = []
    for kind in args.stores.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-writers-{kind}-"))
        try:
            uri, stop = new_store(kind, folder)
            if kind == "postgres":
                from trainer.tracking_server import find_pg_bin

                out = subprocess.run([str(find_pg_bin() / "postgres"), "--version"],
                                     capture_output=True, text=True).stdout.strip()
                print(out, flush=True)
            try:
                for n in (int(x) for x in args.writers.split(",")):
                    row = {"store": kind, **measure(uri, n, args.runs, args.points, args.batch)}
                    rows.append(row)
                    print(f"{kind:13s} N={n:2d} wall {row['wall_s']:6.2f} s  "
                          f"{row['runs_per_s']:6.2f} runs/s  {row['points_per_s']:7.0f} points/s"
                          f"  batch p50 {row['metric_batch_p50_ms']:6.1f} ms "
                          f"p95 {row['metric_batch_p95_ms']:7.1f} ms  slowest call "
                          f"{row['slowest_call_ms']:7.1f} ms  not finished "
                          f"{row['not_finished']}  errors {row['errors']} {row['first_error']}",
                          flush=True)
            finally:
                stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "cores": os.cpu_count(),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
