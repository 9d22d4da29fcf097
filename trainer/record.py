"""What a person reads first in the MLflow UI: run names, run and experiment descriptions.

MLflow shows a run's name in a table column cut at about 30 characters and its
description (the tag ``mlflow.note.content``) on the run page; an experiment's
description is the same tag on the experiment. Names here put what differs between
runs first and end in a short random part, so two runs of the same config differ.
"""

from __future__ import annotations

import uuid
from pathlib import Path

__all__ = ["run_name", "short_values", "describe", "experiment_description", "NOTE_TAG",
           "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND"]

NOTE_TAG = "mlflow.note.content"           # MLflow's description field (runs and experiments)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the UI (3.x) to pick its view
EXPERIMENT_KIND = "custom_model_development"   # the "Machine learning" (model training) view
CONF_DIR = Path(__file__).resolve().parent / "conf"
NAME_PARTS_MAX = 32  # characters of overrides in a name before the experiment

# short names of the keys users sweep most, as in a paper's table
SHORT = {"seed": "seed", "optim.learning_rate": "lr", "optim.weight_decay": "wd",
         "optim.momentum": "mom", "optim.clip_norm": "clip", "optim.final_lr_fraction": "final",
         "model.init_scale": "scale", "model.hidden": "h", "model.width": "n",
         "trainer.num_steps": "steps", "data.batch_size": "bs"}
# overrides that say where or how a run is recorded, not what it trains
_NOT_NAMED = ("tracking.", "hydra.", "hydra/", "population.", "resume", "trainer.progress",
              "trainer.checkpoint", "trainer.compilation_cache", "data.cache")


def short_values(values: dict) -> list[str]:
    """``{"optim.learning_rate": 0.003, "seed": 1}`` -> ``["lr0.003", "seed1"]``."""
    parts = []
    for key, value in values.items():
        text = f"{value:g}" if isinstance(value, float) else str(value).replace(" ", "")
        parts.append(f"{SHORT.get(key, key.rsplit('.', 1)[-1])}{text}")
    return parts


def run_name(experiment: str, overrides: list[str] | None = None,
             values: dict | None = None) -> str:
    """A short, unique run name, what differs first: ``lr0.01-seed3-diabetes-7f3a``.

    Args:
      experiment: the ``+experiment`` name (or the experiment's name).
      overrides: the command line's overrides as typed (``key=value``); group choices
        (``model=tied``) give their option, values ``<short key><value>``; overrides of
        where the run is recorded are left out.
      values: a population member's values (``{key: value}``), named before the overrides.

    Returns:
      at most about 50 characters, ending in 4 random hex digits.
    """
    parts = short_values(values or {})
    for item in overrides or []:
        key, _, value = item.lstrip("+~").partition("=")
        if not value or key in ("experiment",) or key.startswith(_NOT_NAMED) or \
                (values and key in values):
            continue
        if "." not in key and key != "seed":  # a config group: its option says it
            parts.append(value)
        else:
            parts.extend(short_values({key: _number(value)}))
    lead = "-".join(parts)
    if len(lead) > NAME_PARTS_MAX:
        lead = lead[:NAME_PARTS_MAX - 1] + "…"
    return "-".join(p for p in (lead, experiment, uuid.uuid4().hex[:4]) if p)


def _number(text: str):
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def describe(result, *, steps_done: int | None = None) -> str:
    """A run's headline, e.g. ``test RMSE 60.84 vs linear 61.50 (1000 steps, 97 params)``.

    Args:
      result: a ``loop.RunResult``.
    """
    test, base = result.test_metrics, result.baseline_metrics
    when = f"{steps_done or result.num_steps} steps, {result.num_params:,} params"
    if result.best_step is not None:
        when += f", best step {result.best_step}"
    for name, label in (("rmse", "RMSE"), ("accuracy", "accuracy")):
        if name in test:
            against = f" vs linear {base[name]:.4g}" if name in base else ""
            return f"test {label} {test[name]:.4g}{against} ({when})"
    if result.failed_step is not None:
        return f"diverged at step {result.failed_step} ({when})"
    return f"trained {when}"


def experiment_description(experiment: str) -> str:
    """The leading comment of ``conf/experiment/<experiment>.yaml`` (what the experiment
    is and why), with the command that adds runs to it; a generic line for others."""
    command = f"python -m trainer +experiment={experiment}"
    path = CONF_DIR / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        return f"Runs of python -m trainer (experiment {experiment!r})."
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines) + f"\n\nRuns of `{command}`."
