"""Hyperparameter search: Optuna asks a batch of trials, populations train them, Optuna
is told each one's validation value.

``python -m trainer +experiment=diabetes +search=lr_wd`` runs the search that
``conf/search/lr_wd.yaml`` describes (``config.SearchConfig``). Optuna (ask-and-tell
interface, https://optuna.readthedocs.io/en/stable/tutorial/20_recipes/009_ask_and_tell.html)
proposes ``search.trials_per_batch`` trials at once; the trials whose points differ only in
``config.VMAPPABLE_KEYS`` train as ONE population (one compiled program,
``sweep.run_population_job``), and a structural key in the space (``model.hidden``)
splits a batch into one population per value asked. Each trial is a child run of the
search's parent run, with the value told to Optuna as its metric ``search/value``.

How the batch interacts with the sampler: the trials of a batch are asked before any of
them is told, so the sampler sees the batch's earlier trials as RUNNING. TPE with
``constant_liar`` (the default here) counts them as poor results, which spreads the
batch out; without it a batch's trials crowd around the same point. TPE's first
``n_startup_trials`` are random either way, so a batch of 8 with 8 start-up trials spends
its whole first batch exploring.

The study persists in Optuna's storage: by default a journal file (``JournalStorage``
with ``JournalFileBackend``, which Optuna advises for several processes on one file
system) at ``<store folder>/optuna/<study>.journal`` beside the MLflow database, or the
RDB URL in ``search.storage`` (PostgreSQL for workers on several hosts). Relaunching the
same command continues the study; several processes launched with it share it. A trial
left RUNNING by a process that died (its host and process id, recorded with the trial,
name no live process; or, for another host, ``search.stale_after_s`` passed) is marked
FAIL and asked again with the same point (``RetryHeartbeatStaleTrialCallback``, at most
``MAX_RETRIES`` times); its MLflow run is ended KILLED.
"""

from .run import SearchOutcome, objective_value, run_search
from .space import METRICS, SAMPLERS, Space, check_search, group_trials, make_space
from .study import fail_dead_trials, open_study, reseed, study_storage

__all__ = ["Space", "make_space", "check_search", "group_trials", "study_storage",
           "open_study", "reseed", "fail_dead_trials", "run_search", "objective_value",
           "SearchOutcome", "METRICS", "SAMPLERS"]
