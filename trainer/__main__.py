"""Entry point: ``python -m trainer +experiment=NAME [key=value ...]``.

Checks the command line against the schema, lets Hydra compose the config,
validates it, loads the data, opens the MLflow store and run, and calls
``loop.train_and_evaluate``. Errors the user can fix (config, data, a diverging
loss, the store) print one message and exit non-zero; in a multirun every job
still runs and closes its own run (case C02), and the process exits non-zero if
any job failed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

EXIT_USAGE = 2        # bad config or data: nothing ran
EXIT_FAILED = 1       # the run started and failed
EXIT_SIGINT = 130     # 128 + SIGINT
EXIT_SIGTERM = 143    # 128 + SIGTERM


def main() -> int:
    """Run the CLI; returns the process exit code."""
    # MLflow 3 sends usage telemetry unless told not to; this job talks only to its store.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import hydra
    from hydra._internal.utils import get_args_parser
    from rich.console import Console

    from .config import CONF_DIR, ConfigError, check_overrides, register_configs

    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    if not (args.help or args.hydra_help or args.info or args.shell_completion):
        try:
            check_overrides(args.overrides)
        except ConfigError as err:
            err_console.print(f"[bold red]config error:[/] {err}")
            return EXIT_USAGE
    register_configs()
    exit_codes: list[int] = []

    def task(cfg) -> None:
        exit_codes.append(run_job(cfg, err_console))

    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()
    except KeyboardInterrupt as err:
        from .tracking import Terminated

        if not getattr(err, "reported", False):  # stopped before any run was opened
            err_console.print(f"[bold red]stopped:[/] {str(err) or 'interrupted (Ctrl-C)'}; "
                              "no run was open")
        return EXIT_SIGTERM if isinstance(err, Terminated) else EXIT_SIGINT
    return max(exit_codes, default=0)


def run_job(cfg, err_console) -> int:
    """One Hydra job: validate, load data, open the run, train. Returns an exit code."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from rich.console import Console

    from .config import ConfigError, to_config, validate
    from .data import DataError, load_dataset
    from .loop import GradcheckFailedError, NonFiniteLossError, check_worked_examples, \
        train_and_evaluate
    from .report import print_summary
    from .tracking import (TrackingError, environment_tags, flatten_config,
                           get_or_create_experiment, open_store, resolve_store, start_run,
                           ui_command)

    console = Console(highlight=False, soft_wrap=True)
    hydra_cfg = HydraConfig.get()
    launch_dir = Path(hydra_cfg.runtime.cwd)
    experiment = hydra_cfg.runtime.choices.get("experiment") or "default"
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as typed
    try:
        validate(cfg)
        c = to_config(cfg)
        data_cfg = c.data
        if data_cfg.path and not Path(data_cfg.path).expanduser().is_absolute():
            data_cfg = dataclasses.replace(data_cfg, path=str(launch_dir / data_cfg.path))
        dataset = load_dataset(data_cfg, seed=c.seed) if c.mode == "train" else None
    except (ConfigError, DataError) as err:
        kind = "config" if isinstance(err, ConfigError) else "data"
        err_console.print(f"[bold red]{kind} error:[/] {err}")
        return EXIT_USAGE

    store = resolve_store(c.tracking.uri, launch_dir)
    try:
        client = open_store(store)
        experiment_name = c.tracking.experiment_name or experiment
        experiment_id = get_or_create_experiment(client, store, experiment_name)
    except TrackingError as err:
        err_console.print(f"[bold red]tracking error:[/] {err}")
        return EXIT_FAILED
    console.print(f"tracking store: {store.tracking_uri}")
    job = f"-job{hydra_cfg.job.num}" if hydra_cfg.mode.name == "MULTIRUN" else ""
    tags = {**environment_tags(), "experiment": experiment, "overrides": " ".join(overrides),
            "tracking_uri": store.tracking_uri, "launch_dir": str(launch_dir),
            "hydra.output_dir": hydra_cfg.runtime.output_dir, "mode": c.mode}
    if dataset is not None:
        data = "" if dataset.name == experiment else f"-{dataset.name}"
        run_name = c.tracking.run_name or (f"{experiment}{data}-{c.model.kind}-{c.optim.name}-"
                                           f"lr{c.optim.learning_rate:g}-seed{c.seed}{job}")
        tags.update({"dataset": dataset.name, "task": dataset.task})
    else:
        run_name = c.tracking.run_name or f"{experiment}-worked-examples{job}"
    tracker = None
    try:
        with start_run(client, experiment_id, run_name=run_name, tags=tags) as tracker:
            console.print(f"run {tracker.run_id} ({run_name}) in experiment {experiment_name!r}")
            resolved = OmegaConf.to_container(cfg, resolve=True)
            tracker.log_params(flatten_config(resolved))
            tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
            tracker.log_text(OmegaConf.to_yaml(overrides), "overrides.yaml")
            if dataset is None:
                check_worked_examples(tracker, console)
            else:
                result = train_and_evaluate(c, dataset, tracker, console=console)
    except KeyboardInterrupt as err:
        closed = f"run {tracker.run_id} ended KILLED" if tracker else "no run was open"
        reason = str(err) or "interrupted (Ctrl-C)"
        err_console.print(f"[bold red]stopped:[/] {reason}; {closed}")
        err.reported = True
        raise
    except NonFiniteLossError as err:
        err_console.print(f"[bold red]diverged:[/] {err}. Run {tracker.run_id} ended FAILED.")
        return EXIT_FAILED
    except GradcheckFailedError as err:
        err_console.print(f"[bold red]error:[/] {err}. Run {tracker.run_id} ended FAILED.")
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
                  ui="make ui" if make_ui else ui_command(store), tracking_uri=store.tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
