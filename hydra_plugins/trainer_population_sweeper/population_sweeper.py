"""A Hydra sweeper that launches one job per population instead of one job per point.

The sweep is expanded exactly as Hydra's ``BasicSweeper`` expands it (choice lists
``a=1,2``, ``range(4)``, choice and glob sweeps over groups): a list of points, each a
list of override strings. Points that differ only in keys of ``trainer.config.VMAPPABLE_KEYS``
(seed, learning rate, ...) train as one compiled program (case C17), so they are grouped:
every other override (a config group, a width, a step count) is structural, and points
with equal structural overrides form one group. Each group becomes ONE Hydra job with its
structural overrides plus

    population.members=[{seed:0,optim.learning_rate:0.001},{seed:1,optim.learning_rate:0.001}]
    population.sweep_id='<id>'
    population.parent_run_id='<run id>'      (when the sweep record opened a parent run)

All jobs go to the configured launcher as one batch, so any Hydra launcher (basic, joblib,
submitit, Ray: trainer/conf/hydra/launcher/) runs them, one launcher job per group.
``hydra/sweeper=basic`` gives the old behaviour: one job per point.

This module is imported by Hydra's plugin scan in every Hydra application of the
environment, so it imports only Hydra at the top; the trainer is imported when needed. It
has no ``from __future__ import annotations``: the scan executes the module before putting
it in ``sys.modules``, and ``dataclass`` then fails to resolve string annotations.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType, Quote, QuotedString
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MEMBERS_KEY = "population.members"
# Keys the sweeper writes into every job; a sweep that sets them itself is refused.
SWEEPER_KEYS = (MEMBERS_KEY, "population.sweep_id", "population.parent_run_id")


@dataclass
class PopulationSweeperConf:
    _target_: str = ("hydra_plugins.trainer_population_sweeper.population_sweeper."
                     "PopulationSweeper")
    params: Optional[Dict[str, str]] = None  # sweep given in the config, as BasicSweeper's:
                                             # {key: "v1,v2"}, applied before the command line


ConfigStore.instance().store(group="hydra/sweeper", name="population",
                             node=PopulationSweeperConf, provider="trainer")


# --- grouping: pure, testable without Hydra running ----------------------------------------

@dataclass(frozen=True)
class Group:
    """Points of a sweep that share every structural override: one job, one program.

    Attributes:
      structural: the overrides every point of the group has (config groups, keys outside
        ``VMAPPABLE_KEYS``), as the first point of the group wrote them, in its order.
      members: one ``{key: value}`` per point, in the sweep's order, with the point's
        vmappable keys and their parsed values (``{}`` for a point that sets none).
    """

    structural: tuple[str, ...]
    members: tuple[dict[str, Any], ...]

    def overrides(self) -> list[str]:
        """The job's overrides: the structural ones, then ``population.members=[...]``."""
        return [*self.structural, members_override(self.members)]


def group_points(points: Sequence[Sequence[str]],
                 vmappable_keys: Sequence[str] | None = None) -> list[Group]:
    """Group sweep points that differ only in vmappable keys.

    Args:
      points: the expanded sweep, one list of override strings per point (what
        ``BasicSweeper.split_arguments`` gives), e.g. ``[["seed=0", "model=mlp"], ...]``.
      vmappable_keys: keys whose values may differ inside one population; default
        ``trainer.config.VMAPPABLE_KEYS``.

    Returns:
      The groups in the order their first point appears in the sweep; members in the
      sweep's order. Structural overrides equal up to order (and up to Hydra's canonical
      spelling of a value: ``[ 8 ]`` and ``[8]``, ``3e-3`` and ``0.003``) group together.

    Raises:
      HydraException: a point sets a key the sweeper writes itself (``population.members``,
        ``population.sweep_id``, ``population.parent_run_id``).
    """
    if vmappable_keys is None:
        from trainer.config import VMAPPABLE_KEYS

        vmappable_keys = VMAPPABLE_KEYS
    vmappable = frozenset(vmappable_keys)
    parser = OverridesParser.create()
    groups: dict[tuple[str, ...], tuple[list[str], list[dict[str, Any]]]] = {}
    for point in points:
        structural: list[str] = []
        canonical: list[str] = []
        member: dict[str, Any] = {}
        for text, ov in zip(point, parser.parse_overrides(list(point))):
            if ov.key_or_group in SWEEPER_KEYS:
                raise HydraException(
                    f"'{text}': the population sweeper sets {ov.key_or_group} itself; sweep "
                    "the member keys instead, or run with hydra/sweeper=basic")
            if _is_member_value(ov, vmappable):
                member[ov.key_or_group] = ov.value()
            else:
                structural.append(text)
                canonical.append(f"{ov.get_key_element()}={ov.get_value_element_as_str()}")
        shared, members = groups.setdefault(tuple(sorted(canonical)), (structural, []))
        members.append(member)
    return [Group(structural=tuple(shared), members=tuple(members))
            for shared, members in groups.values()]


def _is_member_value(ov, vmappable: frozenset[str]) -> bool:
    # `+key=` appends a key the schema lacks and `~key` deletes one: both change the
    # config's structure, so they stay structural (and Hydra reports them as it would).
    return (ov.key_or_group in vmappable and ov.package is None
            and ov.type in (OverrideType.CHANGE, OverrideType.FORCE_ADD))


def members_override(members: Sequence[dict[str, Any]]) -> str:
    """``population.members=[{k:v,...},...]`` whose values parse back to ``members``."""
    return f"{MEMBERS_KEY}={render_value(list(members))}"


def render_value(value: Any) -> str:
    """Write a parsed override value in Hydra's grammar so that it parses back equal.

    Floats go through ``repr`` (shortest exact decimal; ``inf``, ``nan``), strings are
    always quoted (so ``'1e3'``, ``'null'`` or a run id of digits stay strings), ``None``
    is ``null``. Dict keys are written unquoted, as the grammar requires.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same double
    if isinstance(value, str):
        return QuotedString(text=value, quote=Quote.single).with_quotes()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        from hydra._internal.grammar.utils import escape_special_characters

        return "{" + ",".join(f"{escape_special_characters(str(k))}:{render_value(v)}"
                              for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as an override value")


# --- the plugin --------------------------------------------------------------------------

class PopulationSweeper(Sweeper):
    """Expands the sweep as ``BasicSweeper`` does, then launches one job per ``Group``.

    The sweep record (``trainer.sweep``) is opened before the launch with the composed
    config of the first job, and closed with every job's return once the launcher is done.
    """

    def __init__(self, params: Optional[dict[str, str]] = None) -> None:
        self.params = dict(params or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.task_function = task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        config_loader = self.hydra_context.config_loader
        swept = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(swept)
        (points,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        groups = group_points(points)
        job_overrides = [group.overrides() for group in groups]

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # Compose every job before anything is recorded: a bad point fails the sweep here.
        self.validate_batch_is_legal(job_overrides)
        log.info(f"Population sweep: {len(points)} points in {len(groups)} jobs")

        from trainer.sweep import open_sweep

        first_job = config_loader.load_sweep_config(self.config, job_overrides[0])
        handle = open_sweep(first_job, arguments=swept, num_points=len(points),
                            num_groups=len(groups))
        ids = [f"population.sweep_id={render_value(handle.sweep_id)}"]
        if handle.parent_run_id is not None:
            ids.append(f"population.parent_run_id={render_value(handle.parent_run_id)}")
        try:
            returns = self.launcher.launch([overrides + ids for overrides in job_overrides],
                                           initial_job_idx=0)
        except BaseException as err:  # Ctrl-C, SIGTERM, a launcher error: close the parent
            handle.abort(err)
            raise
        handle.close(list(returns))
        # A launcher that ran the jobs in other processes (joblib, submitit, Ray) leaves
        # the task object here without their exit codes: hand it what they returned
        # (trainer.task.JobTask; the process exits with the largest).
        record_returns = getattr(self.task_function, "record_returns", None)
        if record_returns is not None:
            record_returns([job.return_value for job in returns
                            if job.status is JobStatus.COMPLETED])
        for job in returns:
            _ = job.return_value  # as BasicSweeper: re-raises the error of a failed job
        return [returns]
