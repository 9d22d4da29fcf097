"""The command's pre-check: every job's config composed and checked before Hydra runs.

``check_overrides`` (trainer/config.py) reads the command line alone. What it cannot see
is found only when Hydra composes the config: a group forced in (``++model=tied``), an
interpolation that does not resolve (``seed=${oc.env:NOPE}``), a value that fails the
schema in one point of a sweep, an output folder that cannot be made. Hydra reports
those itself, in several lines or a traceback, after a sweep's parent run may exist.
``check_command`` composes the config of every job (each population of a ``-m`` sweep)
with Hydra's own loader, runs ``config.validate`` on it and checks each sweep point's
own values, so the command either passes or stops with one ``ConfigError`` that names
the point, the key and the fix. ``check_backend`` and ``check_memory`` then start JAX's
backend and compare the job's memory with the machine's, still before any run.

Like ``__main__``, this is part of the entry point: it knows Hydra; the numerical core
does not.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import (CONF_DIR, ConfigError, check_member, check_overrides, register_configs,
                     validate)

__all__ = ["Job", "check_command", "job_config", "check_backend", "check_memory",
           "estimate_bytes", "num_params"]

CONFIG_NAME = "config"


@dataclass(frozen=True)
class Job:
    """One job the command will launch, as checked.

    Attributes:
      cfg: its composed config, with the ``hydra`` node; in a sweep, the config of the
        group's structural overrides (its points differ only in vmappable keys).
      points: the sweep points it stands for (1 without ``-m``).
      num_members: the population members it trains at once: ``points`` under the
        population sweeper (one job per group), else 1 (one job per point).
    """

    cfg: DictConfig
    points: int = 1
    num_members: int = 1


def check_command(overrides: list[str], *, multirun: bool = False,
                  config_name: str | None = None) -> list[Job]:
    """Check a command line as Hydra will run it, before anything runs.

    Without ``-m``: the config is composed with Hydra's loader and validated
    (``config.validate``), its output folder and store checked. With ``-m``: the sweep is
    expanded as Hydra's sweepers expand it and grouped as the population sweeper groups
    it (points that differ only in vmappable keys); each group is composed and validated
    once, and each of its points checked with its own values (``config.check_member``).

    Args:
      overrides: the command's overrides as typed (``["+experiment=smoke", "seed=1"]``).
      multirun: ``-m`` was given.
      config_name: ``--config-name`` if given (only ``config`` exists).

    Returns:
      the jobs (one without ``multirun``, one per group of points with it).

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
        return [Job(cfg)]
    from hydra.errors import HydraException
    from hydra_plugins.trainer_population_sweeper.population_sweeper import group_points

    points = _points(loader, overrides)
    try:
        groups = group_points(points)
    except HydraException as err:  # a point sets a key the sweeper writes itself
        raise ConfigError(_one_line(err)) from None
    jobs, first = [], True
    for group in groups:
        c = None
        for values in group.members:
            point = [*group.structural, *(f"{k}={v}" for k, v in values.items())]
            try:
                if c is None:
                    cfg = _compose(loader, list(group.structural), multirun=True)
                    if first:  # Hydra does not sweep its own settings: one folder
                        _check_output_dir(cfg, multirun=True)
                        first = False
                    c = _validate_job(cfg)
                check_member(c, values)
            except ConfigError as err:
                raise ConfigError(f"sweep point {' '.join(point) or 'with no overrides'!r} "
                                  f"(one of {len(points)}): {err}") from None
        population = cfg.hydra.runtime.choices.get("hydra/sweeper") == "population"
        jobs.append(Job(cfg, points=len(group.members),
                        num_members=len(group.members) if population else 1))
    return jobs


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
    except (HydraException, OmegaConfBaseException, AssertionError, ValueError) as err:
        raise ConfigError(f"Hydra cannot compose the config: {_one_line(err)}. Check the "
                          "group overrides (a group is chosen with group=NAME; + only adds "
                          "+experiment and +search)") from None


def _validate_job(cfg: DictConfig):
    """Validate a composed config (``config.validate``) and its store; returns it as
    ``config.Config``."""
    from hydra.core.hydra_config import HydraConfig

    # the ${hydra:...} resolver reads the Hydra config of the job (hydra.main sets it again)
    HydraConfig.instance().set_config(cfg)
    job = job_config(cfg)
    c = validate(job)
    from .tracking import StoreURIError, check_experiment_name, check_store_uri

    try:
        check_store_uri(job.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None,
                        Path(cfg.hydra.runtime.cwd))
        if job.tracking.experiment_name is not None:
            check_experiment_name(job.tracking.experiment_name)
    except StoreURIError as err:
        raise ConfigError(str(err)) from None
    return c


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


# --- the backend and the machine's memory -----------------------------------------------

# Input and output sizes of the bundled data sets (trainer/data.py); data=csv: its columns.
DATA_SIZES = {"diabetes": (10, 1), "digits": (64, 10)}
# Optimizer state per parameter, in copies of the params (trainer/optim.py).
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def check_backend(host_devices: int | None = None, *, probe_xla_flags: bool = True) -> list:
    """Start JAX's backend as the environment asks (``JAX_PLATFORMS``, ``XLA_FLAGS``,
    ``JAX_*`` settings) and return its devices, or say in one line why it cannot start.

    Called before any run exists. ``host_devices`` (``population.host_devices``) is
    applied first, as the job would (``population.set_host_devices``), since a started
    backend keeps its device count. (A ``JAX_*`` variable with a value JAX does not take
    stops the import of JAX itself; ``__main__`` reports it.) Unknown ``XLA_FLAGS`` make XLA abort the process,
    which no handler sees: when ``XLA_FLAGS`` is set they are first tried in a child
    process that starts only XLA's CPU client (about 0.8 s on 2 busy cores; nothing
    when ``XLA_FLAGS`` is unset; ``probe_xla_flags=False`` skips it, for a job whose
    command was checked already).

    Raises:
      ConfigError: naming the setting, what is available and what to do.
    """
    if probe_xla_flags:
        _check_xla_flags()
    import jax  # imported with trainer.config (a bad JAX_* value stops __main__ there)

    from .population import set_host_devices

    set_host_devices(host_devices)
    try:
        return jax.devices()
    except (RuntimeError, AssertionError) as err:  # no such platform, no GPU, broken CUDA
        asked = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "(default)"
        from jax._src import xla_bridge

        known = ", ".join(sorted(xla_bridge._backend_factories)) or "cpu"
        why = " ".join(str(err).split()) or (
            "no device of that platform was found (for a GPU: no CUDA plugin installed, no "
            "GPU visible, or a driver that does not start)")
        raise ConfigError(f"JAX cannot start the backend asked for (JAX_PLATFORMS={asked}): "
                          f"{why[:300]}. Platforms this JAX knows: {known}; run on the CPU "
                          "with JAX_PLATFORMS=cpu, or unset JAX_PLATFORMS to use what "
                          "starts, or fix the GPU's driver/CUDA install") from None


def _check_xla_flags() -> None:
    import subprocess
    import sys

    flags = os.environ.get("XLA_FLAGS", "").strip()
    if not flags:
        return
    probe = "from jaxlib import xla_client; xla_client.make_cpu_client()"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return  # not a flag error; the job will say what goes wrong
    if done.returncode == 0:
        return
    lines = [line for line in done.stderr.splitlines() if "XLA_FLAGS" in line] or \
        done.stderr.strip().splitlines()[-1:]
    detail = lines[0].split("] ", 1)[-1] if lines else f"exit code {done.returncode}"
    raise ConfigError(f"XLA_FLAGS={flags!r}: XLA refuses it and would abort the process "
                      f"({detail}); remove that flag from XLA_FLAGS")


def num_params(model, data) -> int:
    """Parameters of one member (``model``, ``data``: config nodes or schemas).

    The data's sizes: the bundled sets' (``DATA_SIZES``), ``data.seed_width`` in and one
    out for data=seed, the listed feature and target columns for data=csv (at least one
    each: an estimate from below).
    """
    kind = data.kind
    if kind == "seed":
        sizes = (int(data.seed_width), 1)
    elif kind == "csv":
        sizes = (max(len(data.features or []), 1), max(len(data.target or []), 1))
    else:
        sizes = DATA_SIZES.get(kind, (1, 1))
    n_in, n_out = sizes
    if model.kind == "tied":
        width = int(model.width)
        return (width * width + (n_in * width + width if n_in != width else 0)
                + (width * n_out + n_out if n_out != width else 0))
    widths = [n_in, *map(int, model.hidden), n_out]
    if getattr(model, "tied_hidden", False) and len(widths) > 3:
        inner = len(widths) - 3  # hidden-to-hidden layers sharing one kernel
        return (sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
                - (inner - 1) * widths[1] * widths[1])
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def estimate_bytes(cfg, num_members: int = 1) -> dict[str, int]:
    """A lower bound of the memory a job takes, by part, in bytes.

    ``train``: per member, float32 params, gradients, the best params kept and the
    optimizer's state (``OPTIMIZER_SLOTS``), plus a batch's activations forward and
    back. ``gradcheck``: the float64 random directions of the gradient check, an array
    (num_directions, params) built on the host (gradcheck.py), when checks are on.
    """
    params = num_params(cfg.model, cfg.data)
    copies = 3 + OPTIMIZER_SLOTS.get(cfg.optim.name, 2)
    widths = [int(cfg.model.width)] * 3 if cfg.model.kind == "tied" else \
        list(map(int, cfg.model.hidden))
    activations = 2 * int(cfg.data.batch_size) * sum(widths)
    out = {"train": num_members * 4 * (params * copies + activations)}
    if cfg.gradcheck.every_steps != 0:
        out["gradcheck"] = 8 * int(cfg.gradcheck.num_directions) * params
    return out


def check_memory(cfg, devices: list, num_members: int = 1) -> None:
    """Refuse a training job whose memory (``estimate_bytes``) exceeds the machine: host
    RAM on CPU (and for the gradient check, which runs on the host), else the devices'
    memory (``bytes_limit`` of each device, times the devices).

    Raises:
      ConfigError: the estimate by part, the limit and the keys to shrink.
    """
    import psutil

    if cfg.mode != "train":  # the worked examples fix their own small sizes
        return
    ram = psutil.virtual_memory().total
    parts = estimate_bytes(cfg, num_members)
    device = devices[0] if devices else None
    device_limit = ram
    where = "host RAM"
    if device is not None and device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            device_limit = int(stats["bytes_limit"]) * len(devices)
            where = f"{len(devices)} {device.platform} device(s)' memory"
    size = "model.width" if cfg.model.kind == "tied" else "model.hidden"
    checks = [("train", "training", device_limit, where,
               f"{size}, data.batch_size or the members"),
              ("gradcheck", "gradient check", ram, "host RAM",
               "gradcheck.num_directions (or turn the checks off: gradcheck.every_steps=0)")]
    for part, name, limit, place, keys in checks:
        need = parts.get(part, 0)
        if need > limit:
            raise ConfigError(f"the {name} of this job needs at least {_gib(need)} "
                              f"({num_params(cfg.model, cfg.data):,} parameters per member, "
                              f"{num_members} member(s)); the {place} is {_gib(limit)}: "
                              f"reduce {keys}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
