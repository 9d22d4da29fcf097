"""The task function Hydra runs for every job of the CLI, as a picklable object.

Hydra's launchers that run jobs in other processes or on other machines (joblib,
submitit, Ray) pickle the task function with cloudpickle and send it there. A closure
over ``__main__``'s locals does not survive that (it held a rich ``Console``, whose lock
cannot be pickled); an instance of this class, importable by name, does. It holds no
console and no open resources: each call builds what the job needs.
"""

from __future__ import annotations

__all__ = ["JobTask"]


class JobTask:
    """``run_job`` for one Hydra job; keeps every exit code it has seen.

    Attributes:
      exit_codes: the exit codes of the jobs run in this process, and of the jobs a
        launcher ran elsewhere once the sweeper reports their returns
        (``record_returns``). The process exits with their maximum.
    """

    def __init__(self) -> None:
        self.exit_codes: list[int] = []

    def __call__(self, cfg) -> int:
        """Run one job; returns its exit code, which Hydra keeps as the job's
        ``JobReturn.return_value`` (the sweep's parent run ends FAILED when one is non-zero)."""
        from rich.console import Console

        from .__main__ import run_job

        code = run_job(cfg, Console(stderr=True, highlight=False, soft_wrap=True))
        self.exit_codes.append(code)
        return code

    def record_returns(self, codes: list) -> None:
        """Keep the exit codes of jobs a launcher ran (in this process or elsewhere);
        ``None`` (a job that raised, reported by Hydra itself) counts as failed."""
        self.exit_codes.extend(1 if c is None else int(c) for c in codes)
