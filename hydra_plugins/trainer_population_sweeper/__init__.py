"""Hydra sweeper ``hydra/sweeper=population``: one job per group of points that share a program.

Hydra finds the plugin by scanning the ``hydra_plugins`` namespace package and importing
every module in it; importing ``population_sweeper`` registers ``PopulationSweeperConf`` in
Hydra's ConfigStore (group ``hydra/sweeper``, name ``population``). ``trainer/conf/config.yaml``
makes it the default sweeper; ``hydra/sweeper=basic`` selects Hydra's one-job-per-point
sweeper. Nothing is re-exported here: the scan would find the plugin class twice.
"""
