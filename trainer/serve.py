"""Serve a run's MLflow model over HTTP on this machine, offline (case C22).

    python -m trainer.serve RUN_ID [--port 5001] [--host 127.0.0.1] [--tracking-uri URI]

``RUN_ID`` is a training run (its model), a sweep's parent run (its best member's
model), or a model URI (``models:/...``, ``runs:/...``). The store is the one a job
launched here would use (``tracking.resolve_store``: ``--tracking-uri``, else
``$MLFLOW_TRACKING_URI``, else ``./mlruns/mlflow.db``).

It runs ``mlflow models serve --env-manager local`` with this interpreter's folder
first on PATH: MLflow's default environment manager builds a virtualenv from the
package index (minutes, and it fails offline), and ``local`` starts ``uvicorn``
through the shell, which is found only when the virtualenv's bin folder is on
PATH; ``MLFLOW_TRACKING_URI`` is set so that a ``models:/`` URI is looked up in
this store, not in an empty one in the current folder.

Then POST raw feature rows to ``http://HOST:PORT/invocations``, e.g.
``{"dataframe_split": {"columns": ["age", ...], "data": [[0.04, ...]]}}``; the
answer is ``{"predictions": [...]}`` in the target's units. A wrong set of columns
is answered with HTTP 400 naming the columns the model takes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def resolve_model_uri(client, ref: str) -> str:
    """The model URI of ``ref``: a model URI as given; a run's ``model_uri`` tag; a sweep
    parent's ``best.model_uri``.

    Raises:
      LookupError: no such run, or the run has no model (it failed, or was trained
        before runs logged models); the message says what to give instead.
    """
    if ref.startswith(("models:/", "runs:/")):
        return ref
    try:
        run = client.get_run(ref)
    except Exception:  # MLflow raises its own type for an unknown id
        raise LookupError(f"no run {ref!r} in {client.tracking_uri} (give a run id from "
                          "this store, a models:/ URI, or --tracking-uri)") from None
    tags = run.data.tags
    uri = tags.get("model_uri") or tags.get("best.model_uri")
    if not uri:
        raise LookupError(f"run {ref} ({run.info.status}) has no logged model: only runs that "
                          "trained to the end log one; give a FINISHED training run or a "
                          "sweep's parent")
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.serve", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("model", help="run id, sweep parent run id, or models:/ URI")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    parser.add_argument("--port", type=int, default=5001, help="default 5001")
    parser.add_argument("--tracking-uri", default=None,
                        help="the store (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    args = parser.parse_args(argv)

    from mlflow import MlflowClient

    from .tracking import StoreURIError, resolve_store

    try:
        store = resolve_store(args.tracking_uri, Path.cwd())
    except StoreURIError as err:  # an in-memory or unusable SQLite URI
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    db = store.tracking_uri.removeprefix("sqlite:///")
    if store.tracking_uri.startswith("sqlite:///") and not Path(db).is_file():
        print(f"error: no store at {db} (run a job first, or give --tracking-uri)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        uri = resolve_model_uri(MlflowClient(store.tracking_uri), args.model)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    env = dict(os.environ, MLFLOW_TRACKING_URI=store.tracking_uri)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
               "local", "--host", args.host, "--port", str(args.port)]
    print(f"serving {uri} on http://{args.host}:{args.port}/invocations", flush=True)
    os.execve(sys.executable, command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
