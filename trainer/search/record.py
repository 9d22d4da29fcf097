"""What a search writes in MLflow beyond its trials' runs: the parent run it opens or
reopens, the links between trials and runs, and the study's summary on the parent."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from .study import best_trial

__all__ = ["find_parent", "trial_runs", "close_dead_runs", "summarize", "TRIAL_TAG",
           "STUDY_TAG", "VALUE_METRIC", "BEST_METRIC", "IMPORTANCE_MIN_TRIALS"]

TRIAL_TAG = "search.trial"
STUDY_TAG = "search.study"
VALUE_METRIC = "search/value"
BEST_METRIC = "search/best_value"
IMPORTANCE_MIN_TRIALS = 10  # Optuna's default evaluator (PED-ANOVA in 5.1) compares the best
                            # 10% with the rest: fewer trials give equal importances


def find_parent(client, experiment_id: str, study_name: str) -> str | None:
    """The parent run of the study in this experiment (the newest), or None."""
    runs = client.search_runs([experiment_id], max_results=1, order_by=["start_time DESC"],
                              filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and "
                                            "tags.`population.role` = 'parent'")
    return runs[0].info.run_id if runs else None


def trial_runs(client, experiment_id: str, parent_id: str) -> dict[int, str]:
    """``{trial number: run id}`` of the parent's children (the newest run of a number)."""
    from ..tracking import child_runs

    return {int(r.data.tags[TRIAL_TAG]): r.info.run_id
            for r in child_runs(client, experiment_id, parent_id) if TRIAL_TAG in r.data.tags}


def close_dead_runs(client, experiment_id: str, parent_id: str, numbers: list[int]) -> None:
    """End KILLED the runs of trials whose process died (MLflow left them RUNNING)."""
    if not numbers:
        return
    from ..tracking import MlflowTracker, child_runs

    for run in child_runs(client, experiment_id, parent_id):
        if run.info.status == "RUNNING" and run.data.tags.get(TRIAL_TAG) in map(str, numbers):
            MlflowTracker(client, run.info.run_id).set_tags(
                {"killed_reason": "its process stopped before the end (the search asked "
                                  "its trial again)"})
            client.set_terminated(run.info.run_id, "KILLED")


def summarize(client, experiment_id: str, parent_id: str, study, *,
              metric: str = "val_loss") -> dict[str, str]:
    """Write the study's state on its parent run; returns the tags set.

    Tags ``search.best_trial``, ``search.best_run_id``, ``search.best.<key>`` (its
    params), ``search.trials`` (counts by state); artifacts
    ``optuna/optimization_history.png`` and, with 2+ searched keys and
    ``IMPORTANCE_MIN_TRIALS`` completed trials, ``optuna/param_importances.png`` (Optuna's
    own matplotlib plots; its default importance evaluator).
    """
    import collections

    import optuna

    from ..tracking import MlflowTracker

    trials = study.get_trials(deepcopy=False)
    counts = collections.Counter(t.state.name for t in trials)
    tags = {"search.trials": ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))}
    best = best_trial(study)
    complete = counts.get("COMPLETE", 0)
    if best is not None:
        tags.update({"search.best_trial": str(best.number),
                     "search.best_run_id": str(best.user_attrs.get("mlflow_run_id")),
                     **{f"search.best.{k}": str(v) for k, v in best.params.items()}})
    MlflowTracker(client, parent_id).set_tags(tags)
    if complete == 0:
        return tags
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory(prefix="trainer-search-") as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        folder = Path(tmp)
        plots = [("optimization_history.png",
                  optuna.visualization.matplotlib.plot_optimization_history)]
        if complete >= IMPORTANCE_MIN_TRIALS and len(best.params) >= 2:
            plots.append(("param_importances.png",
                          optuna.visualization.matplotlib.plot_param_importances))
        for name, plot in plots:
            ax = plot(study)
            if name == "optimization_history.png":  # "Objective Value" says nothing
                ax.set_ylabel(f"{metric} (told to Optuna)")
            ax.figure.set_size_inches(7, 4.5)
            # Optuna draws the legend outside the axes: keep it in the file
            ax.figure.savefig(folder / name, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            client.log_artifact(parent_id, str(folder / name), "optuna")
    return tags
