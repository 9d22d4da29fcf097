"""The command's pre-check: every job's config composed and checked before Hydra runs.

``check_overrides`` (trainer/config.py) reads the command line alone. What it cannot see
is found only when Hydra composes the config: a group added twice (``+model=mlp``), an
interpolation that does not resolve (``seed=${oc.env:NOPE}``), a value that fails the
schema in one point of a sweep, an output folder that cannot be made. Hydra reports
those itself, in several lines or a traceback, after a sweep's parent run may exist.
``check_command`` composes the config of every job (every point of a ``-m`` sweep) with
Hydra's own loader and runs ``config.validate`` on it, so the command either passes or
stops with one ``ConfigError`` that names the point, the key and the fix.

Like ``__main__``, this is part of the entry point: it knows Hydra; the numerical core
does not.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import CONF_DIR, ConfigError, check_overrides, register_configs, validate

__all__ = ["check_command", "job_config"]

CONFIG_NAME = "config"


def check_command(overrides: list[str], *, multirun: bool = False,
                  config_name: str | None = None) -> list[DictConfig]:
    """Check a command line as Hydra will run it, before anything runs.

    Args:
      overrides: the command's overrides as typed (``["+experiment=smoke", "seed=1"]``).
      multirun: ``-m`` was given: each point of the sweep is composed and checked.
      config_name: ``--config-name`` if given (only ``config`` exists).

    Returns:
      each job's composed config, with its ``hydra`` node (one per sweep point; one
      without ``multirun``).

    Raises:
      ConfigError: one line naming the key (and, in a sweep, the point) and the fix.
    """
    check_overrides(overrides, multirun=multirun)
    if config_name not in (None, CONFIG_NAME):
        raise ConfigError(f"--config-name={config_name}: this service has one primary config, "
                          f"{CONFIG_NAME!r}; pick an experiment with +experiment=NAME instead")
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    from hydra.core.utils import setup_globals

    register_configs()
    setup_globals()  # Hydra's ${now:...} and ${hydra:...} resolvers, as hydra.main has them
    if not OmegaConf.has_resolver("trainer.launch_id"):  # __main__ registers the real one
        OmegaConf.register_new_resolver("trainer.launch_id", lambda: "launch-id")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(f"file://{CONF_DIR}"))
    if not multirun:
        cfg = _compose(loader, list(overrides), multirun=False)
        _validate_job(cfg)
        _check_output_dir(cfg, multirun=False)
        return [cfg]
    from hydra_plugins.trainer_population_sweeper.population_sweeper import group_points

    points = _points(loader, overrides)
    # Points that differ only in vmappable keys (seed, learning rate, ...) share one
    # composition: Hydra composes each group once (about 0.3 s each on 2 busy cores), and
    # each point is the group's config with its own values set, as population members are.
    configs, number = [], 0
    for group in group_points(points):
        cfg = None
        for values in group.members:
            number += 1
            point = [*group.structural, *(f"{k}={v}" for k, v in values.items())]
            try:
                if cfg is None:
                    cfg = _compose(loader, list(group.structural), multirun=True)
                    if number == 1:  # Hydra does not sweep its own settings: one folder
                        _check_output_dir(cfg, multirun=True)
                member = cfg.copy()
                for key, value in values.items():
                    OmegaConf.update(member, key, value, merge=False)
                _validate_job(member)
            except ConfigError as err:
                raise ConfigError(f"sweep point {number} of {len(points)} "
                                  f"({' '.join(point) or 'no overrides'}): {err}") from None
            configs.append(member)
    return configs


def job_config(cfg: DictConfig) -> DictConfig:
    """A composed config without its ``hydra`` node: what the job receives."""
    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra", None)
    return job


def _points(loader, overrides: list[str]) -> list[list[str]]:
    """The points of a ``-m`` sweep as Hydra's basic sweeper expands them (choice and
    range sweeps, glob over a group's options), each a list of override strings."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(overrides))
        (points,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as err:
        raise ConfigError(f"cannot expand the sweep: {_one_line(err)}") from None
    return points


def _compose(loader, point: list[str], *, multirun: bool) -> DictConfig:
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    try:
        return loader.load_configuration(config_name=CONFIG_NAME, overrides=point,
                                         run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"Hydra cannot compose the config: {_one_line(err)}. Check the "
                          "group overrides (a group is chosen with group=NAME; + only adds "
                          "+experiment and +search)") from None


def _validate_job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    # the ${hydra:...} resolver reads the Hydra config of the job (hydra.main sets it again)
    HydraConfig.instance().set_config(cfg)
    job = job_config(cfg)
    validate(job)
    from .tracking import StoreURIError, check_experiment_name, check_store_uri

    try:
        check_store_uri(job.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None,
                        Path(cfg.hydra.runtime.cwd))
        if job.tracking.experiment_name is not None:
            check_experiment_name(job.tracking.experiment_name)
    except StoreURIError as err:
        raise ConfigError(str(err)) from None


def _check_output_dir(cfg: DictConfig, *, multirun: bool) -> None:
    """Hydra's output folder (``hydra.run.dir``, or ``hydra.sweep.dir`` with -m) must be
    one this process can create: tried in its deepest existing parent, left as it was."""
    from omegaconf.errors import OmegaConfBaseException

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}: {_one_line(err)}") from None
    folder = Path(cfg.hydra.runtime.cwd, str(value))
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a folder")
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".trainer-write-test-"))
    except OSError as err:
        raise ConfigError(f"{key}={value}: cannot create the output folder there ({err}); "
                          f"give a writable folder, e.g. {key}=outputs/run") from None


def _one_line(err: BaseException) -> str:
    """An exception's message on one line; Hydra wraps OmegaConf's errors in an exception
    whose own message is empty, so the cause's is used."""
    text = str(err).strip() or str(err.__cause__ or "").strip() or type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()
             and not line.strip().startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(" ".join(lines).split())
