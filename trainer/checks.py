"""Gradient checks inside runs: a recorder called between chunks, and the worked examples job.

The checks themselves are ``gradcheck.check_gradients`` (pure); this module
records their reports with a tracker (any object with the methods of
``tracking.MlflowTracker``) and decides what a failure does.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from . import report
from .data import Dataset

__all__ = ["GradcheckFailedError", "Gradchecker", "check_worked_examples"]


class GradcheckFailedError(RuntimeError):
    """A gradient check failed where failing ends the run: in training with
    ``gradcheck.fail_run`` (``step`` is where), or a worked example (``step`` None)."""

    def __init__(self, step: int | None, failures: list[str]):
        self.step = step
        where = "" if step is None else f" at step {step}"
        super().__init__(f"gradient check failed{where}: {'; '.join(failures)}")


class Gradchecker:
    """Runs ``gradcheck.check_gradients`` on a fixed probe batch and records each report.

    The worst error of each check goes to the tracker as the metric
    ``gradcheck/max_rel_err`` at the step checked; the per-tensor errors go to the
    artifacts ``gradcheck.json`` and ``gradcheck.png`` (``log_artifacts``). The tag
    ``gradcheck`` says ``passed`` until a check fails, then ``failed``; a failure prints
    one line, and raises ``GradcheckFailedError`` when ``fail_run`` is set.
    """

    def __init__(self, gcfg, graphdef, loss_fn, dataset: Dataset, tracker, console, *,
                 key: jax.Array):
        self._gcfg, self._graphdef, self._loss_fn = gcfg, graphdef, loss_fn
        self._tracker, self._console, self._key = tracker, console, key
        rows = min(gcfg.probe_batch_size, dataset.x_train.shape[0])
        self._probe = (np.asarray(dataset.x_train[:rows]), np.asarray(dataset.y_train[:rows]))
        self.reports: list = []
        self.passed: bool | None = None
        self.wall_s = 0.0

    def __call__(self, params, *, step: int) -> None:
        """Check the gradient at ``params`` and record the report at ``step``."""
        from . import gradcheck

        g = self._gcfg
        settings = gradcheck.GradcheckSettings(
            rel_tol=g.rel_tol, max_elements=g.max_elements, num_directions=g.num_directions,
            richardson=g.richardson, hvp=g.hvp)
        t0 = time.perf_counter()
        result = gradcheck.check_gradients(self._graphdef, params, self._probe, self._loss_fn,
                                           key=jax.random.fold_in(self._key, step),
                                           settings=settings)
        self.wall_s += time.perf_counter() - t0
        self.record(result, step=step)

    def record(self, result, *, step: int) -> None:
        """Log ``result`` at ``step``; tag, print or raise on a failure."""
        self.reports.append((step, result))
        self.reports.sort(key=lambda item: item[0])
        self._tracker.log_metrics([(name, value, step)
                                   for name, value in result.metrics().items()])
        first_failure = result.passed is False and self.passed is not False
        self.passed = result.passed if self.passed is None else (self.passed and result.passed)
        if self.passed or first_failure:
            self._tracker.set_tags({"gradcheck": "passed" if self.passed else "failed"})
        if not result.passed:
            failures = result.failures()
            if self._gcfg.fail_run:
                raise GradcheckFailedError(step, failures)
            if self._console is not None:
                self._console.print(f"[bold red]gradient check FAILED at step {step}:[/] "
                                    f"{'; '.join(failures)}")

    def log_artifacts(self, folder: Path, renderer) -> None:
        """The reports as ``gradcheck.json``, and their plot ``gradcheck.png`` queued on
        ``renderer`` (a ``render.Renderer``; logged at its ``finish``)."""
        if not self.reports:
            return
        import json

        path = folder / "gradcheck.json"
        path.write_text(json.dumps([{"step": step, **result.to_dict()}
                                    for step, result in self.reports], indent=1))
        self._tracker.log_artifact(path)
        # plain (step, metrics) pairs: what the plot reads, and what pickles to a worker
        points = [(step, result.figures()) for step, result in self.reports]
        renderer.plot(self._tracker, report.plot_gradcheck, points, folder / "gradcheck.png",
                      rel_tol=self._gcfg.rel_tol)


def check_worked_examples(tracker, console=None) -> list:
    """The notebook's worked derivative examples (``gradcheck.worked_examples``),
    recorded: a table on the console, per-example relative errors as metrics
    (``examples/<name>/rel_err_autodiff``, ``.../rel_err_fd``), the rows as the
    artifact ``worked_examples.json`` and the tag ``gradcheck=passed|failed``.

    Returns:
      the rows, when every example agrees.

    Raises:
      GradcheckFailedError: naming each example whose sources disagree (after
        everything is logged).
    """
    import dataclasses
    import json

    from . import gradcheck

    t0 = time.perf_counter()
    rows = gradcheck.worked_examples()
    wall_s = time.perf_counter() - t0
    if console is not None:
        report.print_examples(console, rows)
    points = [("gradcheck/wall_s", wall_s, 0)]
    for row in rows:
        points += [(f"examples/{row.name}/rel_err_autodiff", row.rel_err_autodiff, 0),
                   (f"examples/{row.name}/rel_err_fd", row.rel_err_fd, 0)]
    tracker.log_metrics(points)
    tracker.log_text(json.dumps([dataclasses.asdict(row) for row in rows], indent=1),
                     "worked_examples.json")
    failed = [row.name for row in rows if not row.passed]
    tracker.set_tags({"gradcheck": "failed" if failed else "passed"})
    if failed:
        raise GradcheckFailedError(None, [f"worked example {name!r} disagrees" for name in failed])
    return rows
