"""The scheduled benchmark suite: eight benchmarks as importable, testable functions.

Each benchmark module has ``Sizes`` (every default, one per line, with its unit),
``QUICK`` (the small sizes of ``--quick``) and ``run(sizes, workdir, *, log) ->
harness.BenchResult``. Each compiles (timed apart), checks its result against a
reference, then times with every region ending at ``jax.block_until_ready`` and
reports figures with a direction and a spread. ``suite`` runs them into one
MLflow run; ``compare`` compares runs over time.

| case | module | what it measures |
|---|---|---|
| ``jit`` | ``jit_vs_eager`` | jit against eager, loss and train step, over widths |
| ``value_and_grad`` | ``value_and_grad`` | the forward pass value_and_grad saves |
| ``scan`` | ``scan_steps`` | one dispatch per step against K steps per ``lax.scan`` |
| ``memory`` | ``memory`` | bytes with and without the backward pass, ``jax.checkpoint`` |
| ``scaling`` | ``scaling`` | steps/s and FLOP/s over width and batch, against peak matmul |
| ``overhead`` | ``overhead`` | the service's loop against a hand-written jit + scan loop |
| ``population`` | ``population`` | a lone run against one fixed batch (P1); many members as one program (P3) |
| ``checkpoint`` | ``checkpoint`` | a lone run saving a checkpoint every 1000 steps against none |

Modules are imported when run, so importing this package imports no JAX.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["CASES", "load"]

CASES: dict[str, str] = {
    "jit": "jit_vs_eager",
    "value_and_grad": "value_and_grad",
    "scan": "scan_steps",
    "memory": "memory",
    "scaling": "scaling",
    "overhead": "overhead",
    "population": "population",
    "checkpoint": "checkpoint",
}


def load(case: str) -> ModuleType:
    """The module of benchmark ``case`` (a key of ``CASES``).

    Raises:
      KeyError: for an unknown case, naming the known ones.
    """
    if case not in CASES:
        raise KeyError(f"unknown benchmark {case!r}; choose from {', '.join(CASES)}")
    return importlib.import_module(f"{__name__}.{CASES[case]}")
