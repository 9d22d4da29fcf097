"""The search space and the checks of a search config (``+search=NAME``): Optuna
distributions from ``search.space``, nested as the config is, and the split of a batch's
points into populations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import GROUPS, VMAPPABLE_KEYS, ConfigError, to_config

__all__ = ["Space", "make_space", "check_search", "group_trials", "METRICS", "SAMPLERS"]

METRICS = ("val_loss", "min_val_loss")
SAMPLERS = ("tpe", "random", "qmc")
PARAM_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Space:
    """The searched keys and their Optuna distributions.

    Attributes:
      distributions: ``{dotted config key: optuna distribution}``, in the space's order.
      encoded: keys of categorical choices that are not scalars (``model.hidden: [[8],
        [16]]``): Optuna stores only scalars, so these choices go to it as JSON text.
    """

    distributions: dict
    encoded: frozenset[str]

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's Optuna params as config values, in the space's order."""
        return {k: json.loads(params[k]) if k in self.encoded else params[k]
                for k in self.distributions}


def make_space(space: dict, cfg: DictConfig | None = None) -> Space:
    """Read ``search.space`` (nested as the config, each leaf a ``SearchParamConfig``).

    Args:
      space: e.g. ``{"optim": {"learning_rate": {"type": "float", "low": 1e-4,
        "high": 0.3, "log": True}}}``.
      cfg: the composed config the search runs: each key must be one of its keys.

    Raises:
      ConfigError: an unknown key, a config group, a bad range, naming the fix.
    """
    import optuna.distributions as od

    from ..config import _resolve_key  # the schema's own lookup, with its suggestions

    leaves: dict[str, dict] = {}
    _leaves(space, "", leaves)
    if not leaves:
        raise ConfigError("search.space is empty: give at least one key to search, e.g. "
                          "search.space={optim:{learning_rate:{type:float,low:1e-4,high:0.3,"
                          "log:true}}}")
    distributions, encoded = {}, set()
    for key, p in leaves.items():
        where = f"search.space.{key}"
        if key in GROUPS:  # seed, a top-level key, is searchable
            raise ConfigError(f"{where}: {key} is a config group; a search varies keys "
                              f"(e.g. {key}.<key>); run one search per {key} option")
        _resolve_key(key)
        if cfg is not None and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            group = key.split(".")[0]
            option = (OmegaConf.select(cfg, f"{group}.kind", default=None)
                      or OmegaConf.select(cfg, f"{group}.name", default="?"))
            raise ConfigError(f"{where}: this run's config has no {key} ({group}={option} "
                              "has no such key); choose the option that has it")
        unknown = set(p) - {"type", "low", "high", "log", "step", "choices"}
        if unknown or p.get("type") not in PARAM_TYPES:
            raise ConfigError(f"{where}: give type (one of {', '.join(PARAM_TYPES)}) and "
                              f"low/high/log/step or choices, got {p}")
        if p["type"] == "categorical":
            choices = p.get("choices")
            if not choices:
                raise ConfigError(f"{where}: a categorical key needs choices: [...]")
            if any(isinstance(c, (list, dict)) for c in choices):
                encoded.add(key)
                choices = [json.dumps(c) for c in choices]
            distributions[key] = od.CategoricalDistribution(choices)
            continue
        low, high, log, step = p.get("low"), p.get("high"), bool(p.get("log")), p.get("step")
        if low is None or high is None or not low <= high:
            raise ConfigError(f"{where}: give low <= high, got low={low} high={high}")
        if log and (low <= 0 or step is not None):
            raise ConfigError(f"{where}: log=true needs low > 0 and no step")
        if p["type"] == "int":
            if low != int(low) or high != int(high):
                raise ConfigError(f"{where}: an int key needs whole low and high")
            distributions[key] = od.IntDistribution(int(low), int(high), log=log,
                                                    step=int(step or 1))
        else:
            distributions[key] = od.FloatDistribution(float(low), float(high), log=log,
                                                      step=step)
    return Space(distributions, frozenset(encoded))


_ABSENT = object()


def _leaves(node: Any, prefix: str, out: dict) -> None:
    if isinstance(node, dict) and "type" in node:
        out[prefix.rstrip(".")] = node
    elif isinstance(node, dict):
        for k, v in node.items():
            _leaves(v, f"{prefix}{k}.", out)
    else:
        raise ConfigError(f"search.space.{prefix.rstrip('.')}={node!r}: each searched key "
                          "is a mapping with type: float, int or categorical")


def check_search(cfg: DictConfig) -> Space:
    """Check ``cfg.search`` against the composed config; returns its ``Space``.

    Raises:
      ConfigError: naming the key and the fix.
    """
    c = to_config(cfg)
    s = c.search
    if c.population.members:
        raise ConfigError("+search asks its own points; drop population.members")
    if c.resume is not None:
        raise ConfigError("a search resumes by running the same command again; drop resume=")
    if c.mode != "train":
        raise ConfigError("+search needs mode=train")
    if s.metric not in METRICS:
        why = (": a search optimises a validation value; the test split is held out for "
               "the report" if s.metric.startswith("test") else "")
        raise ConfigError(f"search.metric={s.metric!r}{why} (choose one of "
                          f"{', '.join(METRICS)})")
    if s.direction not in ("minimize", "maximize"):
        raise ConfigError(f"search.direction={s.direction!r}: minimize or maximize")
    if s.direction == "maximize":  # every metric offered is a loss
        raise ConfigError(f"search.direction=maximize: search.metric={s.metric} is a loss; "
                          "minimize it (the default)")
    if s.sampler.name not in SAMPLERS:
        raise ConfigError(f"search.sampler.name={s.sampler.name!r}: choose one of "
                          f"{', '.join(SAMPLERS)}")
    for key in ("num_trials", "trials_per_batch"):
        if not getattr(s, key) > 0:
            raise ConfigError(f"search.{key}={getattr(s, key)}: must be greater than 0")
    if s.sampler.n_startup_trials < 0:
        raise ConfigError("search.sampler.n_startup_trials must be >= 0")
    if s.sampler.seed is not None and s.sampler.seed < 0:  # numpy's seeds are >= 0
        raise ConfigError(f"search.sampler.seed={s.sampler.seed}: must be >= 0, or null "
                          "(from the OS)")
    if s.stale_after_s is not None and not s.stale_after_s > 0:
        raise ConfigError(f"search.stale_after_s={s.stale_after_s}: give seconds > 0, or null "
                          "(trials of other hosts are never given up on)")
    if s.storage is not None and "://" in s.storage:  # an RDB URL; else a journal file
        scheme = s.storage.partition("://")[0].partition("+")[0].lower()
        if scheme not in RDB_SCHEMES:
            raise ConfigError(f"search.storage={s.storage}: Optuna's RDB storage takes "
                              f"{', '.join(x + '://' for x in RDB_SCHEMES)} URLs; or give a "
                              "journal file path")
    return make_space(OmegaConf.to_container(cfg.search.space, resolve=True), cfg)


# SQLAlchemy dialects Optuna's RDBStorage is documented with
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def group_trials(points: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """Split a batch's points into populations: ``[(structural values, [indices])]``, in
    the order their first point appears; points with equal structural values (keys
    outside ``VMAPPABLE_KEYS``) share one program."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for i, point in enumerate(points):
        structural = {k: v for k, v in point.items() if k not in VMAPPABLE_KEYS}
        groups.setdefault(json.dumps(structural, sort_keys=True), (structural, []))[1].append(i)
    return list(groups.values())
