"""Entry point: ``python -m trainer +experiment=NAME [key=value ...]``.

Checks the command line against the schema, lets Hydra compose the config,
validates it, loads the data, opens the MLflow store and run, and calls
``loop.train_and_evaluate``. Errors the user can fix (config, data, a diverging
loss, the store) print one message and exit non-zero; in a multirun every job
still runs and closes its own run (case C02), and the process exits non-zero if
any job failed.
"""

from __future__ import annotations

import sys


def _keep_launch_dir_out_of_imports() -> None:
    """The launch folder holds data, not code: drop it from ``sys.path``, and keep it off
    the path of the Python processes the job starts.

    ``python -m trainer`` puts the current folder first on ``sys.path`` (the ``trainer``
    script and ``python -P`` do not): Hydra imported every module of a ``hydra_plugins``
    folder lying there, and a file named like a module we import (``rich.py``) shadowed
    it. Child processes (the store process, a launcher's workers: submitit's ``python -m
    submitit.core._submit`` scans Hydra's plugins again) get ``PYTHONSAFEPATH`` (Python
    3.11+), which keeps their own launch folder off their path. A checkout of this package
    run from its root keeps its folder: there it is the package.
    """
    import os  # loaded with the interpreter, as sys (pathlib is not: it could come from here)

    here = os.path.realpath(os.getcwd())
    if here == os.path.dirname(os.path.dirname(os.path.realpath(__file__))):
        return
    if sys.path and not sys.flags.safe_path and os.path.realpath(sys.path[0] or ".") == here:
        del sys.path[0]
    os.environ.setdefault("PYTHONSAFEPATH", "1")


if __name__ == "__main__":  # before the imports below: none of them may come from there
    _keep_launch_dir_out_of_imports()

import os
import secrets
import signal
import socket
import time
import warnings
from pathlib import Path

EXIT_USAGE = 2        # bad config or data: nothing ran
EXIT_FAILED = 1       # the run started and failed
EXIT_SIGINT = 130     # 128 + SIGINT
EXIT_SIGTERM = 143    # 128 + SIGTERM


def main() -> int:
    """Run the CLI; returns the process exit code."""
    _keep_launch_dir_out_of_imports()  # the `trainer` script: for the processes it starts
    # MLflow 3 sends usage telemetry unless told not to; this job talks only to its store.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    store_process = None
    terminated = KeyboardInterrupt  # until tracking is imported
    try:  # from the first import: Ctrl-C while importing prints one line, no traceback
        from . import signals, tracking

        terminated = tracking.Terminated
        # from the start, not only while a run is open: a stop before one prints its message
        signal.signal(signal.SIGTERM, tracking.raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored
            signal.signal(signal.SIGINT, signals.on_sigint)
        from hydra._internal.utils import get_args_parser

        args, unknown = get_args_parser().parse_known_args(sys.argv[1:])
        runs = not (args.help or args.hydra_help or args.info or args.shell_completion
                    or args.cfg)
        if unknown:  # Hydra's argparse would print its usage and exit 2: say why, in one line
            print(f"config error: {_unrecognized(sys.argv[1:], unknown)}", file=sys.stderr)
            return EXIT_USAGE
        # MLflow's import and the store's opening run in a second process while this one
        # imports JAX (store_process); first, so that they overlap everything below.
        if runs:
            from . import store_process as store_process_module

            store_process = store_process_module.start()
            tracking.use_store_process(store_process)
        return _main(args, runs)
    except KeyboardInterrupt as err:  # also while importing, before Hydra runs
        if not getattr(err, "reported", False):  # stopped before any run was opened
            print(f"stopped: {str(err) or 'interrupted (Ctrl-C)'}; no run was open",
                  file=sys.stderr, flush=True)
        return EXIT_SIGTERM if isinstance(err, terminated) else EXIT_SIGINT
    finally:
        if store_process is not None:
            store_process.close()


def _unrecognized(argv: list[str], unknown: list[str]) -> str:
    """Why Hydra's parser left ``unknown`` over. It reads the overrides as one list, so
    a flag typed after an override (``+experiment=x -m seed=0,1``) leaves every override
    after the flag unrecognized (corpus, issue 13)."""
    flags = [a for a in argv if a.startswith("-")]
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    late = [a for a in argv[first:] if a.startswith("-")]
    if late and not any(u.startswith("-") for u in unknown):
        example = " ".join(["python -m trainer", *flags, *(a for a in argv if a not in flags)])
        return (f"{' '.join(unknown)}: Hydra reads the overrides after its flags; put "
                f"{' '.join(late)} before them: {example}")
    return (f"unrecognized arguments {' '.join(unknown)}: see python -m trainer --help "
            f"(overrides are key=value, after any flags such as -m)")


def _main(args, runs: bool) -> int:
    import hydra
    from omegaconf import OmegaConf
    from rich.console import Console

    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        from .config import CONF_DIR, ConfigError, register_configs
    except ValueError as err:  # importing JAX read a JAX_* variable it does not take
        if "for JAX flag" not in str(err):
            raise
        name = str(err).rsplit(" ", 1)[-1].upper()
        err_console.print(f"[bold red]config error:[/] {err}: fix or unset the environment "
                          f"variable {name}")
        return EXIT_USAGE
    from .precheck import check_backend, check_command, check_memory
    from .task import JobTask

    # Output folders (conf/config.yaml) end in this id, fixed for the process: Hydra's
    # ${now:%H-%M-%S} alone is shared by launches in the same second (case C18); the pid
    # separates processes on one host, the random part containers and hosts on one disk.
    # use_cache keeps the value in the config Hydra hands to launchers in other processes.
    launch_id = f"{time.strftime('%H-%M-%S')}-{os.getpid()}-{secrets.token_hex(2)}"
    OmegaConf.register_new_resolver("trainer.launch_id", lambda: launch_id, replace=True,
                                    use_cache=True)
    if runs:
        try:
            if args.multirun and any(o.lstrip("+").startswith("search=") for o in args.overrides):
                raise ConfigError("+search asks its own points: run it without -m")
            # every job's config composed and validated: nothing runs unless all pass
            jobs = check_command(args.overrides, multirun=args.multirun,
                                 config_name=args.config_name)
            # the backend as the environment asks, started here so that a GPU that is not
            # there, or a bad XLA flag, stops the command before any run exists
            devices = check_backend(jobs[0].cfg.population.host_devices)
            for job in jobs:
                check_memory(job.cfg, devices, num_members=job.num_members)
        except ConfigError as err:
            err_console.print(f"[bold red]config error:[/] {err}")
            return EXIT_USAGE
    register_configs()
    # A picklable object, not a closure: launchers that run jobs in other processes
    # (joblib, submitit, Ray) pickle the task function (trainer/task.py).
    task = JobTask()
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()
    return max(task.exit_codes, default=0)


def run_job(cfg, err_console) -> int:
    """One Hydra job: validate, load data, open the run, train. Returns an exit code."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from rich.console import Console

    from .config import ConfigError, member_configs, resume_config, to_config, validate
    from .data import DataError, load_member_datasets
    from .precheck import check_backend, check_memory
    from . import compile_cache, record
    from .population import set_host_devices
    from .resume import HOST_DEVICES_TAG, find_resumable_run
    from .tracking import (StoreURIError, TrackingError, environment_tags,
                           get_or_create_experiment, open_store, resolve_store)

    console = Console(highlight=False, soft_wrap=True)
    hydra_cfg = HydraConfig.get()
    launch_dir = Path(hydra_cfg.runtime.cwd)
    experiment = hydra_cfg.runtime.choices.get("experiment") or "default"
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as typed
    resumed = None
    try:
        validate(cfg)
        c = to_config(cfg)
        space = None
        if c.search is not None:
            from .search import check_search

            if hydra_cfg.mode.name == "MULTIRUN":
                raise ConfigError("+search asks its own points: run it without -m")
            space = check_search(cfg)
        if c.resume is not None:  # the store first: the run holds the config
            if hydra_cfg.mode.name == "MULTIRUN":
                raise ConfigError("resume= continues one run; give it without -m (a "
                                  "population resumes through its parent's id)")
            store = resolve_store(c.tracking.uri, launch_dir)
            client = open_store(store)
            resumed = find_resumable_run(client, c.tracking.experiment_name or experiment,
                                         c.resume)
            composed, cfg = cfg, resume_config(
                resumed.document["config"], overrides, cfg,
                experiment=resumed.document.get("experiment", experiment))
            c = to_config(cfg)
            if resumed.population:  # its jobs are checked and resumed one by one
                return _resume_population(client, store, resumed, overrides, composed, c,
                                          err_console=err_console)
            planned = resumed.document["config"]["trainer"]["num_steps"]
            if resumed.status == "FINISHED" and c.trainer.num_steps <= planned:
                raise ConfigError(
                    f"resume={c.resume}: the run FINISHED its {planned} steps; to train it "
                    f"further give a larger trainer.num_steps (e.g. "
                    f"trainer.num_steps={2 * planned})")
            launch_dir = Path(resumed.document.get("launch_dir", launch_dir))
            experiment = resumed.document.get("experiment", experiment)
        # before anything starts JAX's backend: the member axis's host devices
        host_devices = set_host_devices(c.population.host_devices)
        # the caches' warnings (a folder that cannot be written, a damaged entry) as one line each
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cache = compile_cache.enable(c.trainer.compilation_cache_dir,
                                             on=c.trainer.compilation_cache)
                members = member_configs(cfg) if c.population.members else None
                # the command was checked (__main__._main); this adds the members' count
                check_memory(cfg, check_backend(c.population.host_devices,
                                                probe_xla_flags=False),
                             num_members=len(members or [None]))
                datasets = [] if c.mode != "train" else load_member_datasets(
                    [to_config(member) for _, member in members or [({}, cfg)]], launch_dir)
            finally:
                for warning in caught:
                    err_console.print(f"[yellow]warning:[/] {warning.message}")
        dataset = datasets[0] if datasets else None
    except (ConfigError, DataError) as err:
        kind = "config" if isinstance(err, ConfigError) else "data"
        err_console.print(f"[bold red]{kind} error:[/] {err}")
        return EXIT_USAGE
    except TrackingError as err:
        err_console.print(f"[bold red]tracking error:[/] {err}")
        return EXIT_FAILED
    if members is not None and c.mode != "train":
        err_console.print("[bold red]config error:[/] population.members needs mode=train")
        return EXIT_USAGE

    try:
        store = resolve_store(c.tracking.uri, launch_dir)
        client = open_store(store)
        experiment_name = c.tracking.experiment_name or experiment
        experiment_id = get_or_create_experiment(
            client, store, experiment_name,
            description=record.experiment_description(experiment))
    except StoreURIError as err:  # before any run: the URI or name cannot work
        err_console.print(f"[bold red]config error:[/] {err}")
        return EXIT_USAGE
    except TrackingError as err:
        err_console.print(f"[bold red]tracking error:[/] {err}")
        return EXIT_FAILED
    console.print(f"tracking store: {store.tracking_uri}")
    typed = " ".join(overrides)  # a sweeper's population.members list can be long
    typed = typed if len(typed) <= 5000 else typed[:5000] + " ... (see config.yaml)"
    tags = {**environment_tags(), "experiment": experiment, "overrides": typed,
            "tracking_uri": store.tracking_uri, "launch_dir": str(launch_dir),
            "hydra.output_dir": hydra_cfg.runtime.output_dir, "mode": c.mode,
            "compile_cache": str(cache.path) if cache.path else cache.reason,
            HOST_DEVICES_TAG: str(host_devices),
            # where the job ran: a launcher (joblib, SLURM, Ray) runs it away from the sweep
            "host": socket.gethostname(), "pid": str(os.getpid())}
    if space is not None:
        return _search_job(client, store, experiment_id, experiment_name, cfg, space=space,
                           search_option=hydra_cfg.runtime.choices.get("search") or "search",
                           tags=tags, launch_dir=launch_dir, console=console,
                           err_console=err_console)
    if members is not None:
        return _population_job(client, store, experiment_id, experiment_name, cfg, members,
                               datasets, tags=tags, console=console, err_console=err_console)
    return _lone_job(client, store, experiment_id, experiment_name, cfg, dataset, tags=tags,
                     experiment=experiment, overrides=overrides, resumed=resumed,
                     launch_dir=launch_dir, console=console, err_console=err_console)


def _lone_job(client, store, experiment_id, experiment_name, cfg, dataset, *, tags,
              experiment, overrides, resumed, launch_dir, console, err_console) -> int:
    """A lone run (or the worked-examples job): open it, or reopen ``resumed``, and train."""
    from omegaconf import OmegaConf

    from . import record, signals
    from .checkpoint import CheckpointPlan, periodic_steps, upload_checkpoints
    from .config import logged_config, to_config
    from .loop import GradcheckFailedError, TrainingFailedError, check_worked_examples, \
        train_and_evaluate
    from .report import print_summary
    from .resume import CHECKPOINT_TAG
    from .tracking import (StoreFault, TrackingError, config_hash, flatten_config,
                           metric_histories, resume_run, run_url, start_run, ui_command)

    c = to_config(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if dataset is not None:
        data = "" if dataset.name == experiment else f"-{dataset.name}"
        run_name = c.tracking.run_name or record.run_name(f"{experiment}{data}", overrides)
        tags.update({"dataset": dataset.name, "task": dataset.task})
    else:
        run_name = c.tracking.run_name or record.run_name(f"{experiment}-worked-examples",
                                                          overrides)
    tracker = None
    try:
        if resumed is None:
            opened = start_run(client, experiment_id, run_name=run_name, tags=tags)
        else:
            opened = resume_run(client, resumed.run_id, tags={
                "resumed.overrides": tags["overrides"], "resumed.from_step": str(resumed.step),
                "resumed.num_steps": str(c.trainer.num_steps)})
        with opened as tracker:
            if resumed is None:
                console.print(f"run {tracker.run_id} ({run_name}) in experiment "
                              f"{experiment_name!r}")
                tracker.set_tags({"config_hash": config_hash(resolved)})
                # only what the job uses: its kinds' keys; config.yaml has the rest
                tracker.log_params(flatten_config(logged_config(resolved)))
                tracker.log_text(OmegaConf.to_yaml(overrides), "overrides.yaml")
            else:  # params stay as first logged (MLflow keeps them immutable)
                console.print(f"run {tracker.run_id} resumed from step {resumed.step} of "
                              f"{c.trainer.num_steps}, in experiment {experiment_name!r}")
            tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
            if dataset is None:
                check_worked_examples(tracker, console)
            else:
                plan = None
                if c.trainer.checkpoints:
                    directory = store.checkpoint_root / tracker.run_id
                    plan = CheckpointPlan(
                        directory=directory, keep=c.trainer.checkpoint_keep,
                        every_steps=periodic_steps(c.trainer.checkpoint_every_steps,
                                                   c.trainer.num_steps),
                        document={"kind": "run", "config": resolved,
                                  "run_ids": [tracker.run_id], "experiment": experiment,
                                  "launch_dir": str(launch_dir)},
                        resume=resumed is not None,
                        min_interval_s=c.trainer.checkpoint_min_interval_s)
                    tracker.set_tags({CHECKPOINT_TAG: str(directory)})
                history = metric_histories(client, tracker.run_id) if resumed else None
                try:
                    result = train_and_evaluate(c, dataset, tracker, console=console,
                                                checkpoint=plan, history=history)
                    tracker.set_tags({record.NOTE_TAG: record.describe(result)})
                finally:  # also when stopped: a requeued job may run on another machine
                    if plan is not None and store.remote and plan.directory.is_dir():
                        with signals.blocked():
                            upload_checkpoints(tracker, plan.directory)
    except KeyboardInterrupt as err:
        closed = f"run {tracker.run_id} ended KILLED" if tracker else "no run was open"
        reason = str(err) or "interrupted (Ctrl-C)"
        hint = ""
        if tracker is not None and c.trainer.checkpoints and dataset is not None:
            hint = f"; continue it with: python -m trainer resume={tracker.run_id}"
        err_console.print(f"[bold red]stopped:[/] {reason}; {closed}{hint}")
        err.reported = True
        raise
    except TrainingFailedError as err:
        err_console.print(f"[bold red]diverged:[/] {err}. Run {tracker.run_id} ended FAILED.")
        return EXIT_FAILED
    except GradcheckFailedError as err:
        err_console.print(f"[bold red]error:[/] {err}. Run {tracker.run_id} ended FAILED.")
        return EXIT_FAILED
    except StoreFault as err:  # its message says how the run ended and what was kept
        err_console.print(f"[bold red]tracking error:[/] {err}")
        return EXIT_FAILED
    except (ValueError, TrackingError) as err:
        closed = f" Run {tracker.run_id} ended FAILED." if tracker else ""
        err_console.print(f"[bold red]error:[/] {err}.{closed}")
        return EXIT_FAILED
    if dataset is None:
        console.print(f"run {tracker.run_id} in {store.tracking_uri}")
        return 0
    repo_root = Path(__file__).resolve().parents[1]
    make_ui = (launch_dir.resolve() == repo_root and (repo_root / "Makefile").is_file()
               and store.lock_path == repo_root / "mlruns" / ".mlflow.db.lock")
    print_summary(console, result=result, run_id=tracker.run_id, experiment=experiment_name,
                  ui="make ui" if make_ui else ui_command(store), tracking_uri=store.tracking_uri,
                  url=run_url(store, experiment_id, tracker.run_id))
    if c.trainer.checkpoints:
        console.print(f"checkpoints in {store.checkpoint_root / tracker.run_id}; to train on: "
                      f"python -m trainer resume={tracker.run_id} "
                      f"trainer.num_steps={2 * c.trainer.num_steps}")
    return 0


def _resume_population(client, store, resumed, overrides, composed, c, *,
                       err_console) -> int:
    """``resume=PARENT_ID``: continue a population's unfinished jobs (``sweep.resume_population``)."""
    from rich.console import Console

    from . import compile_cache
    from .sweep import resume_population

    console = Console(highlight=False, soft_wrap=True)
    compile_cache.enable(c.trainer.compilation_cache_dir, on=c.trainer.compilation_cache)
    console.print(f"resuming population {resumed.run_id}: {len(resumed.jobs)} job(s) with "
                  "checkpoints")
    return _run_population(lambda: resume_population(
        client, store, resumed, overrides, composed,
        tags={"resumed.overrides": " ".join(overrides)[:5000]}, console=console,
        err_console=err_console), parent_run_id=resumed.run_id, store=store, console=console,
        err_console=err_console)


def _population_job(client, store, experiment_id, experiment_name, cfg, members, datasets, *,
                    tags, console, err_console) -> int:
    """One population job: its members as child runs (``sweep.run_population_job``)."""
    from .sweep import run_population_job

    return _run_population(lambda: run_population_job(
        client, store, experiment_id, experiment_name, cfg, members, datasets, tags=tags,
        console=console, err_console=err_console), parent_run_id=None, store=store,
        console=console, err_console=err_console)


def _search_job(client, store, experiment_id, experiment_name, cfg, *, space, search_option,
                tags, launch_dir, console, err_console) -> int:
    """``+search=NAME``: ask, train as populations, tell (``search.run_search``)."""
    from .report import print_search
    from .search import run_search

    outcome, code = _guarded(lambda: run_search(
        client, store, experiment_id, experiment_name, cfg, space=space,
        search_option=search_option, tags=tags, launch_dir=launch_dir, console=console,
        err_console=err_console),
        on_stop=lambda err: "the trials in flight ended KILLED and will be asked again; "
                            "continue the search with the same command",
        runs="The batch's runs", err_console=err_console)
    if code is not None:
        return code
    print_search(console, outcome, tracking_uri=store.tracking_uri)
    if outcome.num_complete == 0 and outcome.num_trials:
        err_console.print("[bold red]error:[/] no trial of the study completed (every one "
                          "diverged or failed): narrow search.space (e.g. a lower "
                          "optim.learning_rate high) or set optim.clip_norm")
        return EXIT_FAILED
    return 0


def _run_population(train, *, parent_run_id, store, console, err_console) -> int:
    """Run ``train()`` (a new or resumed population job), print its outcome and return
    the exit code; a stop names the command that resumes it."""
    from .report import print_population

    def on_stop(err) -> str:
        parent = parent_run_id or getattr(err, "parent_run_id", None)
        hint = f"; continue with: python -m trainer resume={parent}" if parent else ""
        return f"the population's runs ended KILLED{hint}"

    results, code = _guarded(train, on_stop=on_stop, runs="The population's runs",
                             err_console=err_console)
    if code is not None:
        return code
    print_population(console, results, tracking_uri=store.tracking_uri)
    return EXIT_FAILED if any(r.failed_step is not None for r in results) else 0


def _guarded(train, *, on_stop, runs: str, err_console):
    """``(train(), None)``, or ``(None, exit code)`` after printing the error the user can
    act on; Ctrl-C or SIGTERM prints ``on_stop(err)`` and goes on up (exit 130 / 143)."""
    from .config import ConfigError
    from .loop import GradcheckFailedError
    from .tracking import StoreFault, TrackingError

    try:
        return train(), None
    except ConfigError as err:  # found before any run was (re)opened
        err_console.print(f"[bold red]config error:[/] {err}")
        return None, EXIT_USAGE
    except KeyboardInterrupt as err:
        err_console.print(f"[bold red]stopped:[/] {str(err) or 'interrupted (Ctrl-C)'}; "
                          f"{on_stop(err)}")
        err.reported = True
        raise
    except StoreFault as err:  # its message says how the runs ended and what was kept
        err_console.print(f"[bold red]tracking error:[/] {err}")
        return None, EXIT_FAILED
    except (GradcheckFailedError, ValueError, TrackingError) as err:
        err_console.print(f"[bold red]error:[/] {err}. {runs} ended FAILED.")
        return None, EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
