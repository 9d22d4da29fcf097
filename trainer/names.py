"""The names a run's figures have in the record (MLflow), and where each kind goes.

The chart view of MLflow (3.x, ``runs-charts/runs-charts.types.ts``:
``extractChartSectionName`` and ``getBaseChartAndSectionConfigs``) puts each metric in
the section named by its key up to the last ``/``; the sections with a prefix come first,
sorted by name, and the unprefixed metrics ("Model metrics") come after all of them. So
every metric here has a prefix, and the curves' prefix sorts before the others::

    curves/     train_loss, val_loss, grad_norm, learning_rate: one point per logged step
    gradcheck/  max_rel_err: the worst error of each gradient check, at the step checked
    test/       the test metrics beside the linear baseline's (test/rmse, test/baseline_rmse)
    time/       seconds and rates of the run (compile_s, steps_per_s, wall_s, ...)
    train/      what training ended with (nonfinite_steps; best_step and best_val_loss with
                early stopping; checkpoints_saved, checkpoints_skipped)
    xla/        XLA's figures of the compiled step (flops_per_step, temp_bytes, peak_bytes, ...)

In the code the curves keep the names the train step gives them (``train_loss``, ...):
``record_curve`` names them for the record, ``CURVES`` reads them back. Constants of a
run (``RUN_PARAMS``: parameter count, rows per step) are params, not metrics: a
metric has a chart of its own, and one that every run of a sweep shares draws a flat one
(and MLflow's parallel-coordinates plot picks the first metric the runs share). No
MLflow here: the loop imports this module.
"""

from __future__ import annotations

__all__ = ["CURVES", "RUN_PARAMS", "RESULT_STEP", "GRADCHECK_WORST", "record_curve",
           "test_metric", "baseline_metric", "time_metric", "xla_metric", "train_metric"]

# the train step's name of each curve -> its name in the record, in this order
CURVES = {"train_loss": "curves/train_loss", "val_loss": "curves/val_loss",
          "grad_norm": "curves/grad_norm", "learning_rate": "curves/learning_rate"}
# constants of a run derived from its config, logged as params at its start ("derived.":
# the config's own params are its dotted keys, and data.batch_size is the one asked for,
# before clamping to the training rows). How a run was run (members, devices) are tags.
RUN_PARAMS = ("derived.num_params", "derived.batch_size")
# the step of a run's results (test/, time/, train/, xla/): MLflow's charts draw a metric
# whose points are all at step 0 as a bar per run (a result compared across runs), and one
# with a later step as a line: a lone dot on an axis stretched around it
RESULT_STEP = 0
# the run's one gradient-check metric: per-tensor errors are in gradcheck.json and its plot
GRADCHECK_WORST = "gradcheck/max_rel_err"


def record_curve(name: str) -> str:
    """The record's name of the train step's curve ``name`` (``"train_loss"`` ->
    ``"curves/train_loss"``); raises ``KeyError`` for a name that is not a curve."""
    return CURVES[name]


def test_metric(name: str) -> str:
    """``"rmse"`` -> ``"test/rmse"``: a test metric of the trained model."""
    return f"test/{name}"


def baseline_metric(name: str) -> str:
    """``"rmse"`` -> ``"test/baseline_rmse"``: the linear baseline's, in the same section."""
    return f"test/baseline_{name}"


def time_metric(name: str) -> str:
    """``"compile_s"`` -> ``"time/compile_s"``: a duration (s) or a rate (per s)."""
    return f"time/{name}"


def xla_metric(name: str) -> str:
    """``"flops_per_step"`` -> ``"xla/flops_per_step"``: a figure of the compiled step."""
    return f"xla/{name}"


def train_metric(name: str) -> str:
    """``"best_step"`` -> ``"train/best_step"``: what training ended with."""
    return f"train/{name}"
