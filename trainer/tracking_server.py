"""A team's MLflow tracking server on PostgreSQL, with a folder as artifact root.

Usage:
  python -m trainer.tracking_server --pg-dir DIR --artifacts DIR [--port 5000]
  python -m trainer.tracking_server --backend-store-uri postgresql+psycopg://USER@HOST:5432/DB --artifacts DIR

With ``--pg-dir`` it initialises a PostgreSQL cluster in that folder on first use
(``initdb``, user ``mlflow`` with a generated password in ``DIR/password``), starts it
on 127.0.0.1 only (TCP, no Unix socket, password authentication), creates the database
``mlflow`` and runs ``mlflow server`` on it; Ctrl-C or SIGTERM stops the server, then
PostgreSQL (a fast shutdown: the data is kept for the next start). With
``--backend-store-uri`` it runs ``mlflow server`` on an existing database (the password
from ``$PGPASSWORD``, ``~/.pgpass`` or the URI). Jobs log to it with
``tracking.uri=http://127.0.0.1:PORT``. README, "A tracking server for a team".

PostgreSQL refuses to run as root: as root, ``initdb`` and ``postgres`` run as an
unprivileged user (``--pg-user``; default ``postgres`` where it exists, else ``nobody``),
which owns the cluster folder. The binaries: ``--pg-bin``, ``$PG_BIN``, ``pg_config
--bindir``, the newest ``/usr/lib/postgresql/*/bin``, else those bundled in the
``pgserver`` wheel if it is installed.

This module starts programs and never imports MLflow (the server is ``python -m
mlflow server`` of this interpreter); psycopg2 creates the database.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["find_pg_bin", "LocalPostgres", "mlflow_server_command", "wait_for_http",
           "stop_process_group", "main"]

DATABASE = "mlflow"         # the database MLflow's tables go in
ROLE = "mlflow"             # the cluster's superuser, owner of DATABASE
DEFAULT_PG_PORT = 5433      # not 5432: a system cluster may hold it
DEFAULT_PORT = 5000         # MLflow's own default
DEFAULT_WORKERS = 2         # uvicorn workers: one per core here (MLflow's default is 4)
START_TIMEOUT_S = 60.0      # PostgreSQL or the MLflow server not answering after this: fail
STOP_TIMEOUT_S = 30.0       # a process not gone this long after SIGTERM/SIGINT is killed


def find_pg_bin(explicit: str | None = None) -> Path | None:
    """The folder of PostgreSQL's server programs (``initdb``, ``postgres``), or None.

    Looked for in order: ``explicit``, ``$PG_BIN``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/<major>/bin`` (Debian and Ubuntu keep them off PATH), the
    binaries bundled in the ``pgserver`` wheel.
    """
    candidates: list[Path] = []
    for given in (explicit, os.environ.get("PG_BIN")):
        if given:
            candidates.append(Path(given))
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    candidates.extend(reversed(majors))
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def _unprivileged_user(name: str | None) -> str | None:
    """The user PostgreSQL runs as: None when we are not root (we run it ourselves)."""
    if os.geteuid() != 0:
        return None
    import pwd

    if name:
        pwd.getpwnam(name)  # KeyError names an unknown user
        return name
    for candidate in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(candidate)
            return candidate
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) exists: "
                       "pass --pg-user NAME")


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in a folder of its own, listening on 127.0.0.1 only.

    Layout of ``root``: ``data/`` (the cluster), ``password`` (of role ``mlflow``, mode
    0600), ``postgres.log``. As root, everything in it belongs to ``user``.

    Attributes:
      root: the folder; created if missing.
      port: TCP port on 127.0.0.1.
      bin_dir: PostgreSQL's programs (``find_pg_bin``).
      user: run ``initdb`` and ``postgres`` as this user (required as root).
    """

    root: Path
    port: int
    bin_dir: Path
    user: str | None = None
    process: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def password(self) -> str:
        return (self.root / "password").read_text().strip()

    def uri(self, *, with_password: bool = False) -> str:
        """``postgresql+psycopg://mlflow@127.0.0.1:PORT/mlflow``: SQLAlchemy's driver for
        psycopg 3 (its default for ``postgresql://`` from SQLAlchemy 2.1 on, psycopg2's
        before). Without the password libpq reads ``$PGPASSWORD``: the server is given it
        that way, so it is not on its command line."""
        auth = f"{ROLE}:{self.password}" if with_password else ROLE
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{DATABASE}"

    def _as_user(self) -> dict:
        if self.user is None:
            return {}
        import pwd

        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def initialise(self) -> bool:
        """Run ``initdb`` once (role ``mlflow``, a generated password, scram-sha-256
        authentication, UTF-8). Returns False when the cluster already exists.

        Raises:
          RuntimeError: ``initdb`` failed, or ``user`` cannot reach ``root``.
        """
        if (self.data / "PG_VERSION").is_file():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        password = self.root / "password"
        if not password.is_file():
            password.write_text(secrets.token_urlsafe(24) + "\n")
        password.chmod(0o600)
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            for path in (self.root, password):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        # -A: every connection needs the password, local ones too (no "trust" for other
        # users of the machine); --no-sync: a new, empty cluster, nothing to lose
        cmd = [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", ROLE,
               f"--pwfile={password}", "-A", "scram-sha-256", "-E", "UTF8", "--locale=C",
               "--no-sync"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd="/",
                              env=self._env(), **self._as_user())
        if done.returncode != 0:
            hint = ""
            if self.user is not None and "ermission denied" in done.stderr:
                hint = (f" (user {self.user} cannot reach {self.root}: a parent folder is "
                        "private to root, e.g. /root or /tmp/pytest-of-root; use a folder "
                        "such as /var/tmp/trainer-pg or /srv/mlflow/pg)")
            shutil.rmtree(self.data, ignore_errors=True)
            raise RuntimeError(f"initdb failed{hint}: {done.stderr.strip()[-2000:]}")
        return True

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def start(self) -> None:
        """Start ``postgres`` as a child (its own process group), wait until it accepts
        connections, and create the database ``mlflow`` if it is missing.

        Raises:
          RuntimeError: it exited or did not answer within ``START_TIMEOUT_S``; the
            message ends with its log.
        """
        log_path = self.root / "postgres.log"
        log = open(log_path, "ab")  # noqa: SIM115 (the child keeps writing it)
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(log_path, entry.pw_uid, entry.pw_gid)
        self.process = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
             "-c", "max_connections=200"],
            stdout=log, stderr=log, cwd="/", env=self._env(), start_new_session=True,
            **self._as_user())
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self.create_database()
                return
            except Exception as err:  # psycopg.OperationalError until it accepts
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start ({err}); {log_path}:\n{tail}"
                                       ) from None
            time.sleep(0.2)

    def connect(self, database: str = DATABASE):
        """A psycopg (3) connection as role ``mlflow``, autocommit."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=ROLE,
                               password=self.password, dbname=database, connect_timeout=5,
                               autocommit=True)

    def create_database(self) -> None:
        conn = self.connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            conn.close()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients disconnected, data flushed), killed after
        ``STOP_TIMEOUT_S``."""
        if self.process is not None:
            stop_process_group(self.process, signal.SIGINT)
            self.process = None


def mlflow_server_command(backend_store_uri: str, artifacts: Path | str, *,
                          host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                          workers: int = DEFAULT_WORKERS, app_name: str | None = None,
                          extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``python -m mlflow server`` on that store, artifacts proxied to ``artifacts``
    (``--artifacts-destination``: jobs upload through the server and need no access to
    the folder)."""
    destination = str(artifacts)
    if "://" not in destination:
        destination = Path(destination).resolve().as_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", destination, "--host", host, "--port", str(port),
           "--workers", str(workers)]
    if app_name:
        cmd += ["--app-name", app_name]
    return cmd + list(extra)


def server_env(**extra: str) -> dict[str, str]:
    """The server's environment: MLflow's job runner off (it starts a Huey consumer and
    more processes per worker; the trainer uses none of it), no telemetry."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.update(extra)
    return env


def wait_for_http(url: str, process: subprocess.Popen | None = None,
                  timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until ``url`` answers 200 (the server's ``/health``).

    Raises:
      RuntimeError: ``process`` exited first, or nothing answered within ``timeout_s``.
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.3)


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM,
                       timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Send ``sig`` to the process group of ``process`` (started with
    ``start_new_session=True``: the MLflow server's uvicorn workers, PostgreSQL's
    backends), wait for it, then SIGKILL the group if it is still there. Returns its
    exit code."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    # Workers that outlived their leader (the group id stays the leader's pid).
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return code


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.tracking_server",
        description="Run the MLflow tracking server on PostgreSQL (a local cluster in "
                    "--pg-dir, or an existing database) with a folder as artifact root.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pg-dir", type=Path,
                       help="a local PostgreSQL cluster in this folder, created on first use")
    where.add_argument("--backend-store-uri",
                       help="an existing database, e.g. postgresql+psycopg://mlflow@db.internal:5432/mlflow"
                            " (password from $PGPASSWORD or ~/.pgpass)")
    p.add_argument("--artifacts", required=True,
                   help="artifact root: a folder (or s3://..., as mlflow server takes it)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface the server binds (default 127.0.0.1; 0.0.0.0 for a team, "
                        "with --app-name basic-auth)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the server's port (5000)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"server worker processes ({DEFAULT_WORKERS})")
    p.add_argument("--app-name", help="e.g. basic-auth (README: users and passwords)")
    p.add_argument("--pg-port", type=int, default=DEFAULT_PG_PORT,
                   help=f"the local cluster's port on 127.0.0.1 ({DEFAULT_PG_PORT})")
    p.add_argument("--pg-bin", help="folder of initdb and postgres (default: found)")
    p.add_argument("--pg-user", help="as root: run PostgreSQL as this user (postgres, else nobody)")
    p.add_argument("extra", nargs="*", help="after --: more `mlflow server` options")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    postgres = None
    server = None
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    env = server_env()
    try:
        if args.pg_dir is not None:
            bin_dir = find_pg_bin(args.pg_bin)
            if bin_dir is None:
                print("no PostgreSQL server programs found (initdb, postgres): install them "
                      "(Debian: apt-get install postgresql; or pip install pgserver) or pass "
                      "--pg-bin", file=sys.stderr)
                return 2
            postgres = LocalPostgres(args.pg_dir.resolve(), args.pg_port, bin_dir,
                                     _unprivileged_user(args.pg_user))
            created = postgres.initialise()
            postgres.start()
            print(f"PostgreSQL ({bin_dir}) {'initialised and ' if created else ''}running on "
                  f"127.0.0.1:{args.pg_port}, data in {postgres.data}; database: "
                  f"{postgres.uri()} (password in {postgres.root / 'password'})", flush=True)
            backend = postgres.uri()
            env["PGPASSWORD"] = postgres.password
        else:
            backend = args.backend_store_uri
        cmd = mlflow_server_command(backend, args.artifacts, host=args.host, port=args.port,
                                    workers=args.workers, app_name=args.app_name,
                                    extra=args.extra)
        server = subprocess.Popen(cmd, env=env, start_new_session=True)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        wait_for_http(f"{url}/health", server)
        print(f"MLflow tracking server on {url} (artifacts: {args.artifacts}); jobs: "
              f"python -m trainer ... tracking.uri={url}; Ctrl-C stops it", flush=True)
        return server.wait()
    except (KeyboardInterrupt, _Stop):
        return 0
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        from .signals import blocked

        with blocked():  # a second Ctrl-C must not leave PostgreSQL running
            if server is not None:
                stop_process_group(server)
            if postgres is not None:
                postgres.stop()


if __name__ == "__main__":
    sys.exit(main())
