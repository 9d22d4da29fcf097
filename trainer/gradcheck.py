"""Gradient checks: every derivative the service computes, against independent oracles.

The oracles, none of which uses the reverse-mode gradient under test:

* **central finite differences** per tensor, every element of small tensors and a
  seeded sample plus random directions of large ones (Nocedal & Wright,
  *Numerical Optimization*, 2nd ed., 2006, §8.1), optionally Richardson-extrapolated
  to fourth order (Richardson 1911; Nocedal & Wright §8.1);
* **forward mode against reverse mode**: ``⟨v, J u⟩`` computed by ``jax.jvp`` and by
  ``jax.vjp`` on random directions (Griewank & Walther, *Evaluating Derivatives*,
  2nd ed., 2008, §3.1-3.3);
* **the chain rule written out by hand** for the tied block ``tanh(Θ·tanh(Θ·h))``,
  split into the terms of Θ's inner and outer use, whose sum is the gradient
  (the accumulation rule, Griewank & Walther §3.2; case C15);
* **sympy's exact derivatives** of small expressions and of tiny tied nets,
  evaluated with 30 significant digits;
* optionally **Hessian-vector products** by forward-over-reverse (Pearlmutter 1994,
  "Fast exact multiplication by the Hessian") against central differences of
  gradients.

Precision (case C12). Every check runs in float64 inside ``jax.enable_x64(True)``,
whatever the training dtype: floating leaves of the params and of the batch are
cast to float64 copies, so the training (float32) is untouched and x64 is off
again when a function here returns. Central differences resolve relative errors
down to about ``eps^(2/3)``: 2.4e-5 in float32, 3.7e-11 in float64, well below the
tolerance 1e-8. (On the seed net, float32 differences with the notebook's step 1e-4
err by 3.3e-2, float64 ones with step 1e-5 by 1.0e-9.)

Tolerances. A finite-difference estimate ``D`` of ``∂L/∂θ_i`` with step ``h`` is
off by truncation (``h²·|∂³L|/6`` for central differences) and by rounding, at
least ``eps·(|L(θ+h)| + |L(θ−h)|)/(2h) ≈ eps·|L|/h`` (Nocedal & Wright §8.1; the
step ``h = eps^(1/3)·max(|θ_i|, 1)`` balances the two). A pure relative test
``|g − D| ≤ rel_tol·|D|`` therefore fails small correct gradients: near a minimum
``|g|`` shrinks while the error does not (a diabetes MLP after 3000 Adam steps:
plain relative errors up to 1.3e-6). ``eps·|L|/h`` alone is no safe floor either:
on correct gradients, an overfit MLP (loss 1.7e-6: the residuals cancel and their
rounding dominates) erred by 2e5 times it, a net fed inputs ×30 (large third
derivatives) by 300 times it. So each estimate is also made at steps ``h/2`` and
``2h``; ``E = max(|D(h) − D(h/2)|, |D(h) − D(2h)|)`` (truncation shows at 2h,
rounding at both; after Ridders' error estimate, Press et al., *Numerical
Recipes*, 3rd ed., §5.7) plus ``N = eps·|L|/h`` is what finite differences cannot
resolve, and the error floor is ``floor_safety·‖E + N‖`` over the elements checked.
Measured on 22 correct cases (diabetes and digits MLPs at init and after 300-3000
Adam steps, tied nets, the seed net, inputs ×30, targets ×100), ``‖g − D‖`` was at
most 0.61 ``‖E + N‖``, a single element at most 6.3 ``(E + N)``: hence
``floor_safety = 10``. The floor comes from the loss alone, never from the
gradient under test. Reported ``rel_err = ‖g − D‖ / max(‖D‖, floor/rel_tol)``, so
a check passes exactly when ``rel_err ≤ rel_tol``; ``raw_rel_err = ‖g − D‖/‖D‖`` is
kept beside it. Correct gradients measure rel_err 1e-12 to 1e-9 (default
settings). A dropped use of a tied weight, a flipped sign or ``1 − tanh`` for
``1 − tanh²`` fail by orders of magnitude; near convergence even one tensor of a
correct gradient scaled by 1.0001 fails.

This module is part of the numerical core: it imports neither Hydra nor MLflow,
reads and writes no files and prints nothing. Compiled functions are cached per
(graph, loss, parameter layout), so checking the same model again (every N
steps of a run) does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from .models import TiedTanh
from .names import GRADCHECK_WORST
from .steps import mse_loss

__all__ = [
    "GradcheckSettings", "TensorReport", "TiedSplit", "GradcheckReport", "ExampleResult",
    "TiedGradient", "check_gradients", "to_float64", "tensor_names",
    "finite_difference_gradient", "tied_block_gradient", "tied_mse_gradient",
    "tied_gradient_split", "symbolic_tied_gradient", "worked_examples",
    "EPS64", "CENTRAL_STEP", "RICHARDSON_STEP",
]

_FAST_COMPILE = {"xla_backend_optimization_level": 0}  # see _kernels
EPS64 = float(np.finfo(np.float64).eps)   # 2.2e-16, spacing of float64 at 1
CENTRAL_STEP = EPS64 ** (1 / 3)           # 6.1e-6: balances h² truncation and eps/h rounding
RICHARDSON_STEP = EPS64 ** (1 / 5)        # 7.4e-4: balances h⁴ truncation and eps/h rounding
_TINY = float(np.finfo(np.float64).tiny)  # guards 0/0 when a gradient is exactly zero
_CHUNK_FLOATS = 1 << 22                   # perturbed copies held at once: 4 Mi floats, 32 MiB

EXAMPLE_AUTODIFF_TOL = 1e-12  # worked examples: autodiff vs the exact value (rounding only)
EXAMPLE_FD_TOL = 1e-8         # worked examples: Richardson differences vs the exact value


# --------------------------------------------------------------------------- settings, reports

@dataclass(frozen=True)
class GradcheckSettings:
    """Thresholds and sizes of ``check_gradients``. The defaults pass every correct
    gradient in float64, near convergence too, and fail a dropped tied-weight use.

    Raises:
      ValueError: a tolerance, factor or count that is not positive.
    """

    rel_tol: float = 1e-8          # FD vs gradient: norm-wise per tensor, and per direction
    exact_rel_tol: float = 1e-10   # jvp vs vjp, closed form vs gradient: rounding only, no step
    hvp_rel_tol: float = 1e-6      # Hessian-vector product vs central differences of gradients
    floor_safety: float = 10.0     # error floor = this × (|D(h) − D(2h)| + eps·|L|/h)
    max_elements: int = 128        # per tensor: all elements up to this size, else a sample
    num_directions: int = 4        # random directions per sampled tensor (FD), jvp/vjp, HVP
    richardson: bool = False       # fourth-order Richardson differences (steps h and h/2)
    hvp: bool = False              # also check Hessian-vector products

    def __post_init__(self):
        for name in ("rel_tol", "exact_rel_tol", "hvp_rel_tol", "floor_safety"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"GradcheckSettings.{name}={value!r}: must be a positive number")
        for name in ("max_elements", "num_directions"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"GradcheckSettings.{name}={value!r}: must be an integer >= 1")


@dataclass(frozen=True)
class TensorReport:
    """Finite differences against the gradient for one parameter tensor.

    Attributes:
      name: the param path joined with ``/`` (``theta``, ``hidden_layers/0/bias``).
      shape, num_elements: of the tensor.
      num_checked: elements compared one by one (all, or ``max_elements`` sampled).
      sampled: True when ``num_checked < num_elements``.
      num_directions: random unit directions within the tensor also checked (sampled
        tensors only; 0 when every element is checked).
      grad_norm: ‖g‖₂ of the gradient under test over the whole tensor.
      fd_norm: ‖D‖₂ of the finite differences over the checked elements.
      abs_err: ‖g − D‖₂ over the checked elements; max_abs_err: its largest element.
      error_floor: ``floor_safety·‖|D(h) − D(2h)| + eps·|L|/h‖₂`` over those elements,
        what finite differences cannot resolve (module docstring).
      rel_err: ``abs_err / max(fd_norm, error_floor/rel_tol)``: the error relative to
        the gradient, or to what FD resolves when that is coarser; passed ⇔ ≤ rel_tol.
      raw_rel_err: ``abs_err / fd_norm``, the plain relative error (≈ 0.95 for the
        seed net's gradient without Θ's inner use, where rel_err shows 0.05 because
        FD resolves only ~1e-7 of gradient entries that small).
      worst_index: index into the tensor of the largest ``|g − D|``, with
        worst_gradient and worst_finite_difference there.
      directional_rel_err: the largest relative error over the random directions.
      step_rule: the finite-difference step used.
      rel_tol: the tolerance applied; passed: both errors within it.
    """

    name: str
    shape: tuple[int, ...]
    num_elements: int
    num_checked: int
    sampled: bool
    num_directions: int
    grad_norm: float
    fd_norm: float
    abs_err: float
    max_abs_err: float
    error_floor: float
    rel_err: float
    raw_rel_err: float
    worst_index: tuple[int, ...]
    worst_gradient: float
    worst_finite_difference: float
    directional_rel_err: float
    step_rule: str
    rel_tol: float
    passed: bool


@dataclass(frozen=True)
class TiedSplit:
    """∂L/∂Θ of the tied block as the sum of its inner-use and outer-use terms (C15).

    Attributes:
      name: the tensor (``theta``).
      inner_norm, outer_norm: ‖·‖_F of the two closed-form terms.
      inner_outer_cos: cosine between them (0 when either is zero).
      rel_err: ‖(inner + outer) − g‖ / ‖inner + outer‖, g the gradient under test.
      rel_tol: the tolerance applied (``exact_rel_tol``); passed: rel_err within it.
      inner, outer: the terms, ``(n, n)`` float64 (left out of ``to_dict``).
    """

    name: str
    inner_norm: float
    outer_norm: float
    inner_outer_cos: float
    rel_err: float
    rel_tol: float
    passed: bool
    inner: np.ndarray = field(repr=False, compare=False)
    outer: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class GradcheckReport:
    """Everything ``check_gradients`` measured, in float64.

    Attributes:
      tensors: one ``TensorReport`` per parameter tensor, in tree order.
      jvp_vjp_rel_err: forward vs reverse mode, worst relative error; None when
        skipped (a ``jax.custom_vjp`` in the loss or model has no forward mode).
      tied: the inner/outer split of Θ for a ``TiedTanh`` model, else None.
      hvp_rel_err: Hessian-vector products vs differences of gradients, or None.
      loss: the loss at the params (float64).
      dtype: the dtype the checks ran in, ``"float64"``.
      wall_s: seconds per check (``gradient``, ``finite_differences``, ``jvp_vjp``,
        ``tied_split``, ``hvp``) and ``total``; each includes its compilation the
        first time a model layout is checked, and ends at ``jax.block_until_ready``.
      settings: the settings used.
      notes: checks skipped, and why.
    """

    tensors: list[TensorReport]
    jvp_vjp_rel_err: float | None
    tied: TiedSplit | None
    hvp_rel_err: float | None
    loss: float
    dtype: str
    wall_s: dict[str, float]
    settings: GradcheckSettings
    notes: tuple[str, ...] = ()

    @property
    def max_rel_err(self) -> float:
        """Worst finite-difference relative error over tensors, elementwise and directional."""
        return max((max(t.rel_err, t.directional_rel_err) for t in self.tensors), default=0.0)

    @property
    def passed(self) -> bool:
        """True when every check is within its tolerance."""
        return not self.failures()

    def failures(self) -> list[str]:
        """One human-readable line per failed check, naming tensor, error and tolerance."""
        s = self.settings
        out = []
        for t in self.tensors:
            if not t.rel_err <= t.rel_tol:
                out.append(
                    f"{t.name}: finite-difference rel err {t.rel_err:.3g} > tolerance "
                    f"{t.rel_tol:.3g} (‖g − D‖/‖D‖ = {t.raw_rel_err:.3g} over {t.num_checked} "
                    f"elements; worst {t.worst_index}: gradient {t.worst_gradient:.6g}, "
                    f"finite difference {t.worst_finite_difference:.6g})")
            if not t.directional_rel_err <= t.rel_tol:
                out.append(f"{t.name}: directional-derivative rel err "
                           f"{t.directional_rel_err:.3g} > tolerance {t.rel_tol:.3g} "
                           f"({t.num_directions} random directions)")
        if self.jvp_vjp_rel_err is not None and not self.jvp_vjp_rel_err <= s.exact_rel_tol:
            out.append(f"jvp/vjp: forward-mode jvp vs reverse-mode gradient rel err "
                       f"{self.jvp_vjp_rel_err:.3g} > tolerance {s.exact_rel_tol:.3g}")
        if self.tied is not None and not self.tied.passed:
            out.append(f"{self.tied.name}: closed-form inner + outer use vs gradient rel err "
                       f"{self.tied.rel_err:.3g} > tolerance {self.tied.rel_tol:.3g}")
        if self.hvp_rel_err is not None and not self.hvp_rel_err <= s.hvp_rel_tol:
            out.append(f"hvp: Hessian-vector product vs differences of gradients rel err "
                       f"{self.hvp_rel_err:.3g} > tolerance {s.hvp_rel_tol:.3g}")
        return out

    def metrics(self) -> dict[str, float]:
        """What a run records of this check as metrics: ``gradcheck/max_rel_err``, the worst
        error (``max_rel_err``), one point per check; the rest are in ``figures``, the run's
        ``gradcheck.json`` and plot."""
        return {GRADCHECK_WORST: float(self.max_rel_err)}

    def figures(self) -> dict[str, float]:
        """Every figure of the check by name, what ``report.plot_gradcheck`` draws:
        ``gradcheck/<tensor>/rel_err``, ``gradcheck/max_rel_err``,
        ``gradcheck/jvp_vjp_rel_err``, for the tied model ``gradcheck/theta_inner_norm``,
        ``gradcheck/theta_outer_norm``, ``gradcheck/theta_inner_outer_cos``, when run
        ``gradcheck/hvp_rel_err``, and ``gradcheck/wall_s`` (total seconds)."""
        out = {f"gradcheck/{_metric_safe(t.name)}/rel_err": float(t.rel_err)
               for t in self.tensors}
        out["gradcheck/max_rel_err"] = float(self.max_rel_err)
        if self.jvp_vjp_rel_err is not None:
            out["gradcheck/jvp_vjp_rel_err"] = float(self.jvp_vjp_rel_err)
        if self.tied is not None:
            out["gradcheck/theta_inner_norm"] = float(self.tied.inner_norm)
            out["gradcheck/theta_outer_norm"] = float(self.tied.outer_norm)
            out["gradcheck/theta_inner_outer_cos"] = float(self.tied.inner_outer_cos)
        if self.hvp_rel_err is not None:
            out["gradcheck/hvp_rel_err"] = float(self.hvp_rel_err)
        out["gradcheck/wall_s"] = float(self.wall_s.get("total", 0.0))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values (JSON-serialisable), with ``passed``,
        ``max_rel_err`` and ``failures``; the tied terms' arrays are left out."""
        tied = None
        if self.tied is not None:
            tied = {f.name: getattr(self.tied, f.name) for f in dataclasses.fields(self.tied)
                    if f.name not in ("inner", "outer")}
        return _plain({
            "passed": self.passed, "dtype": self.dtype, "loss": self.loss,
            "max_rel_err": self.max_rel_err, "jvp_vjp_rel_err": self.jvp_vjp_rel_err,
            "hvp_rel_err": self.hvp_rel_err, "tied": tied,
            "tensors": [dataclasses.asdict(t) for t in self.tensors],
            "wall_s": self.wall_s, "settings": dataclasses.asdict(self.settings),
            "failures": self.failures(), "notes": list(self.notes),
        })


@dataclass(frozen=True)
class ExampleResult:
    """One worked example: a derivative three ways, in float64.

    Attributes:
      name: identifier, safe in metric names (``tanh_4cos2``).
      expression, point: text for the table.
      value: the function at the point (float64).
      autodiff: ``jax.grad`` in float64: a float, a tuple (gradient, row-major), or for
        the (100, 100) seed gradient its Frobenius norm.
      symbolic: the oracle named in ``oracle`` (sympy at 30 digits, rounded to
        float64; or the closed-form chain rule), same layout.
      finite_difference: Richardson-extrapolated central differences, same layout.
      rel_err_autodiff, rel_err_fd: norm-wise, against ``symbolic``.
      passed: ``rel_err_autodiff ≤ 1e-12``, ``rel_err_fd ≤ 1e-8`` and the paths add up.
      oracle: what ``symbolic`` is.
      exact: sympy's exact derivative at the point when it is short (``4*pi**3``).
      paths: for the accumulation example, ``(label, autodiff, sympy)`` per use of x.
      rel_err_paths: the sum of the autodiff paths against the sympy total.
      float32: tied rows: ``(loss, ‖∂L/∂Θ‖)`` by float32 autodiff, as the notebook
        computed them (its rounding moves the norm by ~9e-7 relative at n = 100).
    """

    name: str
    expression: str
    point: str
    value: float
    autodiff: float | tuple[float, ...]
    symbolic: float | tuple[float, ...]
    finite_difference: float | tuple[float, ...]
    rel_err_autodiff: float
    rel_err_fd: float
    passed: bool
    oracle: str
    exact: str = ""
    paths: tuple[tuple[str, float, float], ...] = ()
    rel_err_paths: float | None = None
    float32: tuple[float, ...] = ()


class TiedGradient(NamedTuple):
    """The tied model's MSE loss and its gradient by the chain rule written out.

    Attributes:
      loss: ``()``; gradient, inner, outer: ``(n, n)``, ``gradient = inner + outer``.
    """

    loss: jax.Array
    gradient: jax.Array
    inner: jax.Array
    outer: jax.Array


# --------------------------------------------------------------------------- small helpers

def to_float64(tree):
    """Float64 copies of every floating leaf of ``tree``; other leaves (labels) as arrays.

    Must run inside ``jax.enable_x64(True)``; the caller's arrays are not changed.

    Raises:
      RuntimeError: when x64 mode is off (the cast would silently give float32).
    """
    if not jax.config.jax_enable_x64:
        raise RuntimeError("to_float64 needs jax.enable_x64(True) around it")

    def cast(a):
        # on the host, with NumPy, and device_put: a jnp cast (and jnp.asarray of a NumPy
        # array, in jax 0.10) compiles one small program per shape
        a = np.asarray(a)
        return jax.device_put(a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a)

    return jax.tree.map(cast, tree)


def _path_name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":  # the array inside an nnx.Variable
                parts.append(k.name)
        else:
            parts.append(str(getattr(k, "key", k)))
    return "/".join(parts)


def tensor_names(params) -> list[str]:
    """Names of the leaves of a params pytree in tree order: the path joined with ``/``
    (``theta``, ``input_layer/kernel``, ``hidden_layers/0/bias``)."""
    return [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _metric_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)


def _plain(obj):
    """NumPy scalars and arrays, tuples and dicts -> JSON-able Python values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return obj


def _rel(err: float, scale: float) -> float:
    return float(err / max(scale, _TINY))


def _block(tree):
    return jax.block_until_ready(tree)


@dataclass(frozen=True)
class _Layout:
    """Where each leaf of a params pytree sits in one flat float64 vector (hashable,
    so compiled functions can be cached per layout)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(np.cumsum((0,) + self.sizes[:-1]).tolist())

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def of(params) -> _Layout:
        leaves, treedef = jax.tree.flatten(params)
        return _Layout(treedef, tuple(tuple(int(d) for d in np.shape(a)) for a in leaves))

    def ravel(self, tree) -> jax.Array:
        # on the host: jnp.ravel + concatenate would compile one program per leaf shape
        leaves = [np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)]
        return jax.device_put(np.concatenate(leaves) if leaves else np.zeros(0))

    def unravel(self, flat: jax.Array):
        leaves = [flat[o:o + n].reshape(s)
                  for o, n, s in zip(self.offsets, self.sizes, self.shapes)]
        return jax.tree.unflatten(self.treedef, leaves)


def _host_rng(key: jax.Array, *stream: int) -> np.random.Generator:
    """A NumPy generator seeded by the words of a JAX key and a stream id: samples and
    directions are drawn on the host, where they cost no compilation."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng([*np.asarray(key).ravel().tolist(), *stream])


def _batched(fn, xs, row_size: int, *, sequential: bool = False):
    """``fn`` over the rows of ``xs``: one row at a time (``lax.map``) when
    ``sequential``; else ``jax.vmap(fn)(xs)`` when the perturbed copies fit in
    ``_CHUNK_FLOATS``, or ``lax.map`` in chunks that do (memory stays bounded for large
    models).

    Sequential is for long, optimised programs on CPU, where XLA runs the batched
    matrix-vector products of a vmapped model far slower than a loop of plain ones
    (measured: 10,000 evaluations of the 100 x 100 seed model in float64, vmap 0.99 s, a
    loop 0.054 s). Compiled at LLVM's level 0 (the checks of a training run) the loop
    is the slower one, so those keep vmap."""
    if sequential:
        return lax.map(fn, xs)
    num_rows = jax.tree.leaves(xs)[0].shape[0]
    chunk = max(1, _CHUNK_FLOATS // max(row_size, 1))
    if num_rows <= chunk:
        return jax.vmap(fn)(xs)
    return lax.map(fn, xs, batch_size=chunk)


# --------------------------------------------------------------------------- compiled kernels

class _Kernels(NamedTuple):
    value_and_grad: Callable
    point_losses: Callable
    direction_losses: Callable
    jvp_vjp: Callable
    hvp_pairs: Callable
    tied_terms: Callable | None


def _flat_objective(graphdef, loss_fn, layout: _Layout):
    def objective(flat, x, y):
        return loss_fn(nnx.merge(graphdef, layout.unravel(flat))(x), y)

    def output(flat, x):
        return nnx.merge(graphdef, layout.unravel(flat))(x)

    return objective, output


@functools.lru_cache(maxsize=32)
def _kernels(graphdef, loss_fn, layout: _Layout, tied: bool,
             optimize: bool = False) -> _Kernels:
    """The jitted pieces of ``check_gradients`` for one model layout and loss, cached
    so that repeated checks (every N steps) compile once. ``optimize``: compile with
    XLA's full optimisation on CPU too (for programs that run long, see below)."""
    objective, output = _flat_objective(graphdef, loss_fn, layout)
    size = layout.size
    sequential = optimize and jax.default_backend() == "cpu"  # see _batched

    def point_losses(flat, idx, values, x, y):
        """(K,) losses with ``flat[idx[k]] = values[k]``, one element changed each."""
        def one(iv):
            i, v = iv
            return objective(flat.at[i].set(v), x, y)
        return _batched(one, (idx, values), size, sequential=sequential)

    def direction_losses(flat, grad, blocks, starts, which, steps, x, y):
        """For each row k the unit direction ``blocks[which[k]]`` placed at
        ``starts[which[k]]`` (zero elsewhere), step ``steps[k]``: L(θ + h u),
        L(θ − h u) and ⟨g, (θ + h u) − (θ − h u)⟩."""
        positions = jnp.arange(blocks.shape[1])

        def one(args):
            j, h = args
            u = jnp.zeros_like(flat).at[starts[j] + positions].add(blocks[j], mode="drop")
            plus, minus = flat + h * u, flat - h * u
            return objective(plus, x, y), objective(minus, x, y), jnp.vdot(grad, plus - minus)

        return _batched(one, (which, steps), size, sequential=sequential)

    def jvp_vjp(flat, grad, us, vs, x, y):
        """On directions us ``(K, P)`` and output cotangents vs ``(K, *out)``: the worst
        relative error of jvp(u) vs ⟨g, u⟩ (g under test), scale max(Σ|g_i u_i|, |jvp|),
        and of ⟨v, J u⟩ by jvp vs ⟨Jᵀ v, u⟩ by vjp, scale the larger Σ|a_i b_i|."""
        num = us.shape[0]
        f = lambda p: objective(p, x, y)  # noqa: E731
        out_fn = lambda p: output(p, x)  # noqa: E731
        _, vjp_fn = jax.vjp(out_fn, flat)
        dloss = jax.vmap(lambda u: jax.jvp(f, (flat,), (u,))[1])(us)
        gu = us @ grad
        scale_l = jnp.maximum(jnp.abs(us) @ jnp.abs(grad), jnp.abs(dloss))
        jv = jax.vmap(lambda u: jax.jvp(out_fn, (flat,), (u,))[1])(us).reshape(num, -1)
        jtv = jax.vmap(lambda v: vjp_fn(v)[0])(vs)
        vs = vs.reshape(num, -1)
        v_ju, jtv_u = jnp.sum(vs * jv, axis=1), jnp.sum(jtv * us, axis=1)
        scale_o = jnp.maximum(jnp.sum(jnp.abs(vs * jv), axis=1), jnp.sum(jnp.abs(jtv * us), axis=1))
        return jnp.maximum(jnp.max(jnp.abs(dloss - gu) / jnp.maximum(scale_l, _TINY)),
                           jnp.max(jnp.abs(v_ju - jtv_u) / jnp.maximum(scale_o, _TINY)))

    def hvp_pairs(flat, vs, h, x, y):
        """For unit directions vs ``(K, P)``, θ± = θ ± h v, d = θ+ − θ−: g(θ+) − g(θ−),
        H d by forward-over-reverse (jvp of grad), d, and ‖g(θ+)‖ + ‖g(θ−)‖."""
        grad_fn = jax.grad(objective)

        def one(v):
            plus, minus = flat + h * v, flat - h * v
            gp, gm = grad_fn(plus, x, y), grad_fn(minus, x, y)
            hv = jax.jvp(lambda p: grad_fn(p, x, y), (flat,), (plus - minus,))[1]
            return gp - gm, hv, plus - minus, jnp.linalg.norm(gp) + jnp.linalg.norm(gm)

        return jax.vmap(one)(vs)

    # These programs run a few times per training run, so their compile time is what
    # counts: on CPU, LLVM's optimisation level 0 halves it (measured: diabetes MLP first
    # check 0.92 -> 0.63 s); results stay float64-exact (IEEE operations, no fast math).
    jit = functools.partial(jax.jit, compiler_options=_FAST_COMPILE) \
        if jax.default_backend() == "cpu" and not optimize else jax.jit

    tied_terms = None
    if tied:
        def tied_terms(flat, x, y):
            return _tied_terms(graphdef, loss_fn, layout.unravel(flat), x, y)
        tied_terms = jit(tied_terms)

    return _Kernels(jit(jax.value_and_grad(objective)), jit(point_losses),
                    jit(direction_losses), jit(jvp_vjp), jit(hvp_pairs), tied_terms)


# --------------------------------------------------------------------------- finite differences

def _step_rule(richardson: bool) -> str:
    if richardson:
        return ("Richardson (h/2, h), h = eps^(1/5)·max(|θ_i|, 1); error estimate from "
                "the same at h/2 and 2h")
    return "central, h = eps^(1/3)·max(|θ_i|, 1); error estimate from h/2 and 2h"


def _level_factors(richardson: bool) -> tuple[float, ...]:
    """Step multipliers evaluated, so that the estimate exists at h/2, h and 2h."""
    return (0.25, 0.5, 1.0, 2.0) if richardson else (0.5, 1.0, 2.0)


def _estimate(levels: list[np.ndarray], richardson: bool):
    """The estimate at step h and its error estimate, from per-level central
    differences (ordered as ``_level_factors``).

    Richardson: ``R(h) = (4·D(h/2) − D(h))/3`` cancels the h² term (fourth order).
    The error estimate is ``max(|X(h) − X(h/2)|, |X(h) − X(2h)|)`` for the estimate
    X: truncation shows in the coarser step, rounding in both; two independent
    comparisons make an accidental near-zero estimate unlikely.
    """
    if richardson:
        half, fine, double = ((4 * levels[j] - levels[j + 1]) / 3 for j in range(3))
    else:
        half, fine, double = levels
    return fine, np.maximum(np.abs(fine - half), np.abs(fine - double))


def _noise(levels: list[np.ndarray], richardson: bool) -> np.ndarray:
    """Rounding term of the estimate at h from per-level ``eps·(|L+|+|L−|)/(θ+ − θ−)``."""
    return (4 * levels[1] + levels[2]) / 3 if richardson else levels[1]


def _element_differences(point_losses, flat, flat_np, idx, x, y, *, richardson: bool,
                         error_estimate: bool = True):
    """Central (or Richardson) differences at the elements ``idx`` of ``flat``, with
    an error estimate (``E`` is zeros when ``error_estimate`` is False, which saves
    the evaluations at h/2 and 2h).

    The perturbed values ``θ_i ± h`` are rounded to float64 first and the quotient
    uses their actual difference, so the step itself carries no rounding error.
    Every estimate is also computed at steps h/2 and 2h: the differences estimate
    its error (truncation, ×3 for central differences at 2h, plus rounding; after
    Ridders' error estimate, Press et al., *Numerical Recipes*, 3rd ed., §5.7).

    Returns:
      ``(D, E, N)``, each ``(K,)`` float64: the estimates, the error estimates
      (``_estimate``) and the rounding terms ``eps·(|L(θ+h)| + |L(θ−h)|)/(2h)``.
    """
    theta = flat_np[idx]
    base = (RICHARDSON_STEP if richardson else CENTRAL_STEP) * np.maximum(np.abs(theta), 1.0)
    factors = _level_factors(richardson)
    if not error_estimate:
        factors = (0.5, 1.0) if richardson else (1.0,)
    plus = [theta + f * base for f in factors]
    minus = [theta - f * base for f in factors]
    k, m = idx.size, len(factors)
    losses = np.asarray(point_losses(flat, jax.device_put(np.tile(idx, 2 * m)),
                                     jax.device_put(np.concatenate(plus + minus)), x, y)
                        ).reshape(2 * m, k)
    ests, noises = [], []
    for j in range(m):
        lp, lm, width = losses[j], losses[m + j], plus[j] - minus[j]
        ests.append((lp - lm) / width)
        noises.append(EPS64 * (np.abs(lp) + np.abs(lm)) / width)
    if not error_estimate:
        if richardson:
            return (4 * ests[0] - ests[1]) / 3, np.zeros(k), (4 * noises[0] + noises[1]) / 3
        return ests[0], np.zeros(k), noises[0]
    est, err = _estimate(ests, richardson)
    return est, err, _noise(noises, richardson)


def finite_difference_gradient(f: Callable[[jax.Array], jax.Array], point, *,
                               richardson: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every partial derivative of a scalar function by central differences, in float64.

    Step per coordinate ``h = eps^(1/3)·max(|x_i|, 1)`` (central; Nocedal & Wright,
    *Numerical Optimization*, §8.1) or ``eps^(1/5)·max(|x_i|, 1)`` with Richardson
    extrapolation ``(4·D(h/2) − D(h))/3`` (fourth order). All coordinates are
    evaluated in one compiled, batched call.

    Args:
      f: ``(n,) float64 -> ()``, written with ``jax.numpy``.
      point: ``(n,)`` (or scalar) where to differentiate; cast to float64.
      richardson: extrapolate to fourth order.

    Returns:
      ``(gradient, error)``: ``(n,)`` float64 estimates and an estimate of their
      error, ``max(|D(h) − D(h/2)|, |D(h) − D(2h)|) + eps·|f|/h`` (module docstring).
    """
    with jax.enable_x64(True):
        flat_np = np.atleast_1d(np.asarray(point, np.float64))
        flat = jax.device_put(flat_np)
        shape = np.shape(point)

        def point_losses(flat, idx, values, x, y):
            del x, y
            return jax.vmap(lambda i, v: f(flat.at[i].set(v).reshape(shape)))(idx, values)

        est, err, noise = _element_differences(jax.jit(point_losses), flat, flat_np,
                                               np.arange(flat_np.size), None, None,
                                               richardson=richardson)
        return est, err + noise


def _tensor_reports(kernels: _Kernels, layout: _Layout, names, flat, flat_np, grad_np, x, y,
                    *, key, settings: GradcheckSettings) -> list[TensorReport]:
    """Elementwise differences for every tensor and directional ones for the sampled
    tensors (those larger than ``max_elements``): at most two compiled calls."""
    s = settings
    picks = []
    for t, (size, offset) in enumerate(zip(layout.sizes, layout.offsets)):
        if size <= s.max_elements:
            local = np.arange(size)
        else:
            local = np.sort(_host_rng(key, 0, t).choice(size, s.max_elements, replace=False))
        picks.append(local.astype(np.int64) + offset)
    idx = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    est, est_err, noise = _element_differences(kernels.point_losses, flat, flat_np, idx, x, y,
                                               richardson=s.richardson)

    # Directions, for the sampled tensors only (the others have every element checked):
    # num_directions unit vectors u per such tensor, steps as for elements with
    # max(‖θ_t‖_∞, 1) as the scale.
    # In derivative units along u, FD (L+ − L−)/(2h) against ⟨g, θ+ − θ−⟩/(2h): the
    # actual displacement, so rounding θ ± h·u costs nothing.
    sampled = [t for t, size in enumerate(layout.sizes) if picks[t].size < size]
    nd = s.num_directions if sampled else 0
    row_of = {t: i * nd for i, t in enumerate(sampled)}
    d_err = d_fd = d_floor = np.zeros(0)
    if sampled:
        rng = _host_rng(key, 1)
        sizes = [layout.sizes[t] for t in sampled]
        offsets = [layout.offsets[t] for t in sampled]
        blocks = np.zeros((len(sampled) * nd, max(sizes)))
        for i, n in enumerate(sizes):
            u = rng.standard_normal((nd, n))
            blocks[i * nd:(i + 1) * nd, :n] = u / np.linalg.norm(u, axis=1, keepdims=True)
        starts = np.repeat(np.asarray(offsets, np.int64), nd)
        scale = np.repeat([max(float(np.max(np.abs(flat_np[o:o + n]), initial=0.0)), 1.0)
                           for o, n in zip(offsets, sizes)], nd)
        base = (RICHARDSON_STEP if s.richardson else CENTRAL_STEP) * scale
        factors = _level_factors(s.richardson)
        m = len(factors)
        steps = [f * base for f in factors]
        lp, lm, dot = (np.asarray(a).reshape(m, -1) for a in kernels.direction_losses(
            flat, jax.device_put(grad_np), jax.device_put(blocks), jax.device_put(starts),
            jax.device_put(np.tile(np.arange(blocks.shape[0]), m)),
            jax.device_put(np.concatenate(steps)), x, y))
        d_fd = [(lp[j] - lm[j]) / (2 * steps[j]) for j in range(m)]
        d_err = [d_fd[j] - dot[j] / (2 * steps[j]) for j in range(m)]
        d_noise = _noise([EPS64 * (np.abs(lp[j]) + np.abs(lm[j])) / (2 * steps[j])
                          for j in range(m)], s.richardson)
        d_fd = _estimate(d_fd, s.richardson)[0]
        # The error estimate of e = D_fd − ⟨g, u⟩: the gradient's own error cancels in it.
        d_err, d_err_err = _estimate(d_err, s.richardson)
        d_floor = s.floor_safety * (d_err_err + d_noise)

    reports, start = [], 0
    for t, (name, shape, size, offset) in enumerate(
            zip(names, layout.shapes, layout.sizes, layout.offsets)):
        sel = slice(start, start + picks[t].size)
        start += picks[t].size
        g, d = grad_np[picks[t]], est[sel]
        diff = g - d
        floor = s.floor_safety * float(np.linalg.norm(est_err[sel] + noise[sel]))
        abs_err, fd_norm = float(np.linalg.norm(diff)), float(np.linalg.norm(d))
        rel_err = _rel(abs_err, max(fd_norm, floor / s.rel_tol))
        worst = int(np.argmax(np.abs(diff))) if diff.size else 0
        worst_index = tuple(int(i) for i in np.unravel_index(picks[t][worst] - offset, shape)) \
            if diff.size else ()
        dir_rel, t_nd = 0.0, 0
        if t in row_of:  # norm-wise over this tensor's directions
            dirs = slice(row_of[t], row_of[t] + nd)
            t_nd = nd
            dir_rel = _rel(float(np.linalg.norm(d_err[dirs])),
                           max(float(np.linalg.norm(d_fd[dirs])),
                               float(np.linalg.norm(d_floor[dirs])) / s.rel_tol))
        reports.append(TensorReport(
            name=name, shape=tuple(shape), num_elements=size, num_checked=int(picks[t].size),
            sampled=bool(picks[t].size < size), num_directions=t_nd,
            grad_norm=float(np.linalg.norm(grad_np[offset:offset + size])), fd_norm=fd_norm,
            abs_err=abs_err, max_abs_err=float(np.max(np.abs(diff), initial=0.0)),
            error_floor=floor, rel_err=rel_err, raw_rel_err=_rel(abs_err, fd_norm),
            worst_index=worst_index,
            worst_gradient=float(g[worst]) if g.size else 0.0,
            worst_finite_difference=float(d[worst]) if d.size else 0.0,
            directional_rel_err=dir_rel, step_rule=_step_rule(s.richardson),
            rel_tol=s.rel_tol, passed=bool(rel_err <= s.rel_tol and dir_rel <= s.rel_tol)))
    return reports


# --------------------------------------------------------------------------- jvp/vjp and HVP

def _jvp_vjp_rel_err(kernels: _Kernels, flat, grad_np, x, y, *, key, num: int,
                     out_shape: tuple[int, ...]) -> float:
    """Worst relative error of jvp(u) vs ⟨g, u⟩ and of ⟨v, J u⟩ vs ⟨Jᵀ v, u⟩ on ``num``
    seeded normal directions, each over the dot product's scale Σ|a_i b_i| (its
    rounding bound; Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1)."""
    rng = _host_rng(key, 2)
    us = rng.standard_normal((num, flat.shape[0]))
    vs = rng.standard_normal((num, *out_shape))
    return float(kernels.jvp_vjp(flat, jax.device_put(grad_np), jax.device_put(us), jax.device_put(vs),
                                 x, y))


def _hvp_rel_err(kernels: _Kernels, layout: _Layout, flat, flat_np, params64, x, y, *, key,
                 settings: GradcheckSettings, hvp_fn) -> float:
    """Relative error of H·d against g(θ + h v) − g(θ − h v), d = θ+ − θ−, norm-wise
    over ``num_directions`` random unit v, h = eps^(1/3)·max(‖θ‖_∞, 1), with the
    error floor of the gradient checks (steps h/2, h, 2h)."""
    s = settings
    h = CENTRAL_STEP * max(float(np.max(np.abs(flat_np), initial=0.0)), 1.0)
    errs, ests, noises = [], [], []
    vs = _host_rng(key, 3).standard_normal((s.num_directions, flat.shape[0]))
    vs = jax.device_put(vs / np.linalg.norm(vs, axis=1, keepdims=True))
    for step in (h / 2, h, 2 * h):
        dg, hv, disp, gnorm = (np.asarray(a) for a in kernels.hvp_pairs(flat, vs, step, x, y))
        if hvp_fn is not None:
            hv = np.stack([np.asarray(layout.ravel(to_float64(
                hvp_fn(params64, x, y, layout.unravel(jax.device_put(d)))))) for d in disp])
        ests.append(dg / (2 * step))
        errs.append((dg - hv) / (2 * step))
        noises.append(EPS64 * gnorm / (2 * step))
    err_err = np.maximum(np.linalg.norm(errs[1] - errs[0], axis=1),
                         np.linalg.norm(errs[1] - errs[2], axis=1))
    floor = s.floor_safety * np.linalg.norm(err_err + noises[1])
    scale = max(float(np.linalg.norm(ests[1])), float(floor) / s.hvp_rel_tol)
    return _rel(float(np.linalg.norm(errs[1])), scale)


# --------------------------------------------------------------------------- the tied block

def tied_block_gradient(theta: jax.Array, h0: jax.Array, g2: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
    """∂L/∂Θ of the block ``h2 = tanh(tanh(h0 Θᵀ) Θᵀ)`` by the chain rule written out.

    Forward: ``a1 = h0 Θᵀ``, ``h1 = tanh(a1)``, ``a2 = h1 Θᵀ``, ``h2 = tanh(a2)``.
    Backward, with ``tanh' = 1 − tanh²``: ``δ2 = g2 ⊙ (1 − h2²)``; the outer use
    ``a2 = h1 Θᵀ`` gives ``δ2ᵀ h1``; ``∂L/∂h1 = δ2 Θ``, ``δ1 = (δ2 Θ) ⊙ (1 − h1²)``;
    the inner use ``a1 = h0 Θᵀ`` gives ``δ1ᵀ h0``. Θ is one variable used twice, so
    ∂L/∂Θ is the sum of the two terms (the accumulation rule; Griewank & Walther,
    *Evaluating Derivatives*, §3.2). No autodiff is used.

    Args:
      theta: ``(n, n)``; h0: the block's input rows ``(B, n)``; g2: ``∂L/∂h2``,
        ``(B, n)``. Any one floating dtype.

    Returns:
      ``(inner, outer)``, each ``(n, n)`` in that dtype.
    """
    h1 = jnp.tanh(h0 @ theta.T)              # (B, n)
    h2 = jnp.tanh(h1 @ theta.T)              # (B, n)
    delta2 = g2 * (1 - h2 ** 2)              # ∂L/∂a2, (B, n)
    outer = delta2.T @ h1                    # outer use, (n, n)
    delta1 = (delta2 @ theta) * (1 - h1 ** 2)  # ∂L/∂a1, (B, n)
    inner = delta1.T @ h0                    # inner use, (n, n)
    return inner, outer


def tied_mse_gradient(theta: jax.Array, x: jax.Array, y: jax.Array) -> TiedGradient:
    """Loss and gradient of ``L = mean((tanh(Θ·tanh(Θ·x)) − y)²)`` w.r.t. Θ by hand.

    The model without maps, rows as batch elements (``h @ Θᵀ``). ``∂L/∂h2 =
    2 (h2 − y) / (B·n)`` for the mean over all ``B·n`` elements, then
    ``tied_block_gradient``.

    Args:
      theta: ``(n, n)``; x, y: ``(B, n)``, all one floating dtype.

    Returns:
      ``TiedGradient(loss (), gradient (n, n), inner (n, n), outer (n, n))``.

    Raises:
      ValueError: when x or y is not ``(B, n)``.
    """
    n = theta.shape[0]
    if theta.shape != (n, n) or x.ndim != 2 or x.shape[1] != n or y.shape != x.shape:
        raise ValueError(f"tied_mse_gradient needs theta (n, n), x and y (B, n); got "
                         f"{theta.shape}, {x.shape}, {y.shape}")
    h2 = jnp.tanh(jnp.tanh(x @ theta.T) @ theta.T)
    r = h2 - y
    loss = jnp.mean(r ** 2)
    inner, outer = tied_block_gradient(theta, x, 2 * r / r.size)
    return TiedGradient(loss, inner + outer, inner, outer)


def _tied_terms(graphdef, loss_fn, params, x, y):
    """Closed-form (inner, outer) for a TiedTanh model: maps and loss by autodiff
    (``g2 = ∂L/∂h2``), the block by hand."""
    model = nnx.merge(graphdef, params)
    h0 = model.input_map(x) if model.input_map is not None else x
    theta = model.theta[...]
    h2 = jnp.tanh(jnp.tanh(h0 @ theta.T) @ theta.T)

    def tail(h):
        return loss_fn(model.output_map(h) if model.output_map is not None else h, y)

    return tied_block_gradient(theta, h0, jax.grad(tail)(h2))


def _is_tied(graphdef, params) -> bool:
    return isinstance(nnx.merge(graphdef, params), TiedTanh)


def _split_figures(inner: np.ndarray, outer: np.ndarray, g_theta: np.ndarray, *,
                   rel_tol: float) -> TiedSplit:
    total = inner + outer
    ni, no = float(np.linalg.norm(inner)), float(np.linalg.norm(outer))
    cos = float(np.vdot(inner, outer) / (ni * no)) if ni > 0 and no > 0 else 0.0
    rel = _rel(float(np.linalg.norm(total - g_theta)), float(np.linalg.norm(total)))
    return TiedSplit(name="theta", inner_norm=ni, outer_norm=no, inner_outer_cos=cos,
                     rel_err=rel, rel_tol=rel_tol, passed=bool(rel <= rel_tol),
                     inner=inner, outer=outer)


def tied_gradient_split(graphdef, params, batch, loss_fn, *, grad_fn=None,
                        rel_tol: float = GradcheckSettings.exact_rel_tol) -> TiedSplit:
    """Θ's gradient in a ``TiedTanh`` model as its inner-use plus outer-use term (C15).

    The block's backward pass is the closed form (``tied_block_gradient``); the
    input map and ``∂L/∂h2`` through the output map and loss come from autodiff,
    so any maps and either loss work. Runs in float64 (x64 restored on return).

    Args:
      graphdef, params: ``nnx.split(model, nnx.Param)`` of a ``TiedTanh``.
      batch: ``(x (B, in_features), y)``, any dtypes; floats are cast to float64.
      loss_fn: ``(pred, y) -> ()``, e.g. ``steps.mse_loss``.
      grad_fn: ``(params, x, y) -> grads`` to compare with; default ``jax.grad``.
      rel_tol: tolerance for ``passed``.

    Returns:
      ``TiedSplit`` with the norms, the cosine and ``rel_err`` of inner + outer
      against the gradient's ``theta``.

    Raises:
      ValueError: the model is not a ``TiedTanh``.
    """
    with jax.enable_x64(True):
        params64 = to_float64(params)
        x, y = to_float64(tuple(batch))
        if not _is_tied(graphdef, params64):
            raise ValueError("tied_gradient_split needs a TiedTanh model (a param named theta)")
        layout = _Layout.of(params64)
        kernels = _kernels(graphdef, loss_fn, layout, True)
        flat = layout.ravel(params64)
        inner, outer = kernels.tied_terms(flat, x, y)
        if grad_fn is None:
            grad = kernels.value_and_grad(flat, x, y)[1]
        else:
            grad = layout.ravel(to_float64(grad_fn(params64, x, y)))
        g_theta = np.asarray(grad)[_theta_slice(tensor_names(params64), layout)]
        return _split_figures(np.asarray(inner), np.asarray(outer),
                              g_theta.reshape(np.shape(inner)), rel_tol=rel_tol)


# --------------------------------------------------------------------------- the top level

def check_gradients(graphdef, params, batch, loss_fn, *, key: jax.Array,
                    settings: GradcheckSettings = GradcheckSettings(),
                    grad_fn: Callable | None = None,
                    hvp_fn: Callable | None = None) -> GradcheckReport:
    """Check the gradient of ``L(θ) = loss_fn(nnx.merge(graphdef, θ)(x), y)`` in float64.

    Runs, in float64 inside ``jax.enable_x64(True)`` (the caller's arrays are cast
    to float64 copies, never changed or donated; x64 is off again on return):

    1. finite differences per tensor: every element of tensors up to
       ``max_elements`` elements, a seeded sample of that many otherwise, plus
       ``num_directions`` random unit directions per tensor (Nocedal & Wright §8.1;
       tolerance ``rel_tol`` with the rounding floor of the module docstring);
    2. forward vs reverse mode on ``num_directions`` random directions: jvp of L
       against ⟨g, u⟩, and ⟨v, J u⟩ against ⟨Jᵀ v, u⟩ for the model output
       (Griewank & Walther §3; tolerance ``exact_rel_tol``);
    3. for a ``TiedTanh`` model, the closed-form inner + outer terms of ∂L/∂Θ
       against the gradient (``tied_gradient_split``; tolerance ``exact_rel_tol``);
    4. when ``settings.hvp``, Hessian-vector products by forward-over-reverse
       (Pearlmutter 1994) against central differences of gradients
       (tolerance ``hvp_rel_tol``).

    Args:
      graphdef, params: ``nnx.split(model, nnx.Param)``; params' leaves any float dtype.
      batch: ``(x, y)``: x ``(B, in_features)`` float, y ``(B, T)`` float or ``(B,)`` int.
      loss_fn: ``(pred, y) -> ()``, e.g. ``steps.mse_loss``, ``steps.cross_entropy_loss``.
      key: PRNG key for the element sample and the random directions.
      settings: tolerances and sizes.
      grad_fn: the gradient under test, ``(params, x, y) -> grads`` with params'
        structure, called on float64 params; default ``jax.grad`` of L. Every check
        that involves the gradient (1, the jvp side of 2, 3) uses it.
      hvp_fn: the Hessian-vector product under test, ``(params, x, y, v) -> Hv``
        (pytrees like params); default ``jax.jvp`` of ``jax.grad``.

    Returns:
      ``GradcheckReport``, with ``dtype="float64"`` and ``wall_s`` in seconds.

    Raises:
      ValueError: the loss is not a scalar, or ``grad_fn`` returns another structure.
    """
    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    with jax.enable_x64(True):
        params64 = to_float64(params)
        x, y = to_float64(tuple(batch))
        names = tensor_names(params64)
        layout = _Layout.of(params64)
        tied = _is_tied(graphdef, params64)
        kernels = _kernels(graphdef, loss_fn, layout, tied)
        flat = layout.ravel(params64)
        flat_np = np.asarray(flat)
        out = jax.eval_shape(lambda p: nnx.merge(graphdef, p)(x), params64)
        loss_shape = jax.eval_shape(loss_fn, out, y).shape
        if loss_shape != ():
            raise ValueError(f"the loss must be a scalar of shape (), but it has shape "
                             f"{loss_shape}; reduce it (e.g. jnp.mean) before checking")

        t = time.perf_counter()
        loss, grad = kernels.value_and_grad(flat, x, y)
        if grad_fn is not None:
            grads = to_float64(grad_fn(params64, x, y))
            got = [tuple(np.shape(a)) for a in jax.tree.leaves(grads)]
            if got != list(layout.shapes):
                raise ValueError(f"grad_fn returned leaves of shapes {got}; the params "
                                 f"have {list(layout.shapes)}")
            grad = layout.ravel(grads)
        grad_np = np.asarray(_block(grad))
        loss = float(loss)
        wall["gradient"] = time.perf_counter() - t

        t = time.perf_counter()
        tensors = _tensor_reports(kernels, layout, names, flat, flat_np, grad_np, x, y,
                                  key=key, settings=settings)
        wall["finite_differences"] = time.perf_counter() - t

        t = time.perf_counter()
        notes = []
        try:
            jvp_err = _jvp_vjp_rel_err(kernels, flat, grad_np, x, y, key=key,
                                       num=settings.num_directions, out_shape=out.shape)
        except TypeError as err:
            if "custom_vjp" not in str(err):
                raise
            jvp_err = None
            notes.append("jvp/vjp check skipped: the loss or model uses a jax.custom_vjp "
                         "function, which has no forward mode")
        wall["jvp_vjp"] = time.perf_counter() - t

        split = None
        if tied:
            t = time.perf_counter()
            inner, outer = _block(kernels.tied_terms(flat, x, y))
            g_theta = grad_np[_theta_slice(names, layout)].reshape(np.shape(inner))
            split = _split_figures(np.asarray(inner), np.asarray(outer), g_theta,
                                   rel_tol=settings.exact_rel_tol)
            wall["tied_split"] = time.perf_counter() - t

        hvp_err = None
        if settings.hvp:
            t = time.perf_counter()
            hvp_err = _hvp_rel_err(kernels, layout, flat, flat_np, params64, x, y, key=key,
                                   settings=settings, hvp_fn=hvp_fn)
            wall["hvp"] = time.perf_counter() - t
    wall["total"] = time.perf_counter() - t_start
    return GradcheckReport(tensors=tensors, jvp_vjp_rel_err=jvp_err, tied=split,
                           hvp_rel_err=hvp_err, loss=loss, dtype="float64", wall_s=wall,
                           settings=settings, notes=tuple(notes))


def _theta_slice(names, layout: _Layout) -> slice:
    i = names.index("theta")
    return slice(layout.offsets[i], layout.offsets[i] + layout.sizes[i])


# --------------------------------------------------------------------------- sympy oracle

@functools.lru_cache(maxsize=8)
def _symbolic_tied_program(n: int, batch: int):
    """sympy's L and ∂L/∂Θ_ij of the tied net, lambdified to mpmath; cached per size."""
    import sympy

    thetas = sympy.symbols(f"t0:{n * n}")
    xs = sympy.symbols(f"x0:{batch * n}")
    ys = sympy.symbols(f"y0:{batch * n}")
    theta = sympy.Matrix(n, n, thetas)
    h1 = (sympy.Matrix(batch, n, xs) * theta.T).applyfunc(sympy.tanh)
    h2 = (h1 * theta.T).applyfunc(sympy.tanh)
    r = h2 - sympy.Matrix(batch, n, ys)
    loss = sum(e ** 2 for e in r) / (batch * n)
    grads = [sympy.diff(loss, t) for t in thetas]
    return sympy.lambdify((thetas, xs, ys), [loss, *grads], modules="mpmath")


def symbolic_tied_gradient(theta, x, y, *, digits: int = 30) -> tuple[float, np.ndarray]:
    """Exact loss and ∂L/∂Θ of ``L = mean((tanh(Θ·tanh(Θ·x)) − y)²)`` by sympy.

    Θ's entries are symbols; sympy differentiates the expression, and the result is
    evaluated at the given (exactly converted) float64 values with ``digits``
    significant digits (mpmath), then rounded to float64. Rows are batch elements
    (``x @ Θᵀ``) as in ``TiedTanh``. The symbolic program is cached per size.

    Args:
      theta: ``(n, n)``, n ≤ 3; x, y: ``(B, n)`` with B ≤ 4 (or ``(n,)``), any float dtype.
      digits: working precision of the evaluation.

    Returns:
      ``(loss, gradient)``: float and ``(n, n)`` float64.

    Raises:
      ValueError: a net too large for a symbolic oracle, or mismatched shapes.
    """
    import mpmath

    theta = np.asarray(theta, np.float64)
    x = np.atleast_2d(np.asarray(x, np.float64))
    y = np.atleast_2d(np.asarray(y, np.float64))
    n = theta.shape[0]
    if theta.shape != (n, n) or n > 3 or x.shape[1] != n or y.shape != x.shape \
            or x.shape[0] > 4:
        raise ValueError(f"symbolic_tied_gradient takes n <= 3 and B <= 4: theta (n, n), x and "
                         f"y (B, n); got {theta.shape}, {x.shape}, {y.shape}")
    program = _symbolic_tied_program(n, x.shape[0])
    exact = lambda a: [mpmath.mpf(float(v)) for v in a.ravel()]  # noqa: E731 (exact)
    with mpmath.workdps(digits):
        out = program(exact(theta), exact(x), exact(y))
        values = [float(v) for v in out]
    return values[0], np.asarray(values[1:]).reshape(n, n)


def _sympy_gradient(fn, point, digits: int = 30):
    """sympy's exact gradient of ``fn(SYM, *symbols)`` at ``point`` (sympy numbers):
    ``(values as floats, exact values as sympy expressions)``."""
    import sympy

    syms = sympy.symbols(f"s0:{len(point)}")
    expr = fn(_sym_namespace(), *syms)
    subs = dict(zip(syms, point))
    exact = [sympy.diff(expr, s).subs(subs) for s in syms]
    return [float(e.evalf(digits)) for e in exact], exact


def _sym_namespace():
    import sympy

    return SimpleNamespace(tanh=sympy.tanh, cos=sympy.cos, sin=sympy.sin, atan=sympy.atan)


_JNP = SimpleNamespace(tanh=jnp.tanh, cos=jnp.cos, sin=jnp.sin, atan=jnp.arctan)


# --------------------------------------------------------------------------- worked examples

def _norm_rel(a, b) -> float:
    a, b = np.atleast_1d(np.asarray(a, np.float64)), np.atleast_1d(np.asarray(b, np.float64))
    return _rel(float(np.linalg.norm(a - b)), float(np.linalg.norm(b)))


def _out(values):
    values = [float(v) for v in np.ravel(values)]
    return values[0] if len(values) == 1 else tuple(values)


def _expression_row(name, expression, point_text, fn, point_exact) -> ExampleResult:
    """One small expression: jax.grad (float64), sympy (30 digits), Richardson FD."""
    import sympy

    point64 = np.asarray([float(sympy.N(p, 30)) for p in point_exact], np.float64)
    with jax.enable_x64(True):
        f = lambda v: fn(_JNP, *[v[i] for i in range(v.shape[0])])  # noqa: E731
        value, ad = jax.value_and_grad(f)(jnp.asarray(point64))
        value, ad = float(value), np.asarray(ad)
    fd, _ = finite_difference_gradient(f, point64, richardson=True)
    sym, exact = _sympy_gradient(fn, point_exact)
    rel_ad, rel_fd = _norm_rel(ad, sym), _norm_rel(fd, sym)
    exact_text = ", ".join(str(e) for e in exact)
    return ExampleResult(
        name=name, expression=expression, point=point_text, value=value, autodiff=_out(ad),
        symbolic=_out(sym), finite_difference=_out(fd), rel_err_autodiff=rel_ad,
        rel_err_fd=rel_fd, passed=bool(rel_ad <= EXAMPLE_AUTODIFF_TOL and rel_fd <= EXAMPLE_FD_TOL),
        oracle="sympy, 30 digits", exact=exact_text if len(exact_text) <= 40 else "")


def _accumulation_row() -> ExampleResult:
    """z = x²·cos(x)/atan(x) at 7: x is used three times; the three path derivatives
    (each use of x as its own variable) add up to dz/dx."""
    import sympy

    def z3(m, a, b, c):  # the three uses of x as separate inputs
        return a ** 2 * m.cos(b) / m.atan(c)

    row = _expression_row("accumulation", "x²·cos(x)/atan(x)", "x = 7",
                          lambda m, x: z3(m, x, x, x), [sympy.Integer(7)])
    with jax.enable_x64(True):
        seven = jnp.asarray(7.0, jnp.float64)
        paths_ad = [float(g) for g in jax.grad(functools.partial(z3, _JNP), argnums=(0, 1, 2))(
            seven, seven, seven)]
    paths_sym, _ = _sympy_gradient(z3, [sympy.Integer(7)] * 3)
    labels = ("through x²", "through cos(x)", "through atan(x)")
    rel_paths = _norm_rel(math.fsum(paths_ad), row.symbolic)
    rel_paths_sym = _norm_rel(math.fsum(paths_sym), row.symbolic)
    return dataclasses.replace(
        row, paths=tuple(zip(labels, paths_ad, paths_sym)), rel_err_paths=rel_paths,
        passed=bool(row.passed and rel_paths <= EXAMPLE_AUTODIFF_TOL
                    and rel_paths_sym <= EXAMPLE_AUTODIFF_TOL))


def _seed_draws(n: int):
    """The notebook's draws (float32): Θ ~ N(0, 1) (n, n) from PRNGKey(0), x (n,) from
    PRNGKey(1), y () from PRNGKey(2); as rows x (1, n) and y repeated (1, n)."""
    theta = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    x = jax.random.normal(jax.random.PRNGKey(1), (n,))
    y = jax.random.normal(jax.random.PRNGKey(2), ())
    return theta, x.reshape(1, n), jnp.full((1, n), y, jnp.float32)


def _tied_model(theta):
    """A ``TiedTanh`` without maps holding ``theta``: the service's own model."""
    n = theta.shape[0]
    model = TiedTanh(n, n, n, theta_init=jax.nn.initializers.zeros,
                     map_init=jax.nn.initializers.zeros, key=jax.random.PRNGKey(0))
    model.theta[...] = theta
    return nnx.split(model, nnx.Param)


def _tied_row(name: str, n: int) -> ExampleResult:
    """The seed model at the notebook's draws: autodiff of the service's TiedTanh +
    mse_loss in float64 against the closed form (n = 100) or sympy (n ≤ 3), and
    Richardson differences of every element."""
    theta, x, y = _seed_draws(n)
    graphdef, params = _tied_model(theta)
    loss32, grad32 = jax.jit(jax.value_and_grad(
        lambda p: mse_loss(nnx.merge(graphdef, p)(x), y)))(params)
    float32 = (float(loss32), float(jnp.linalg.norm(jax.tree.leaves(grad32)[0])))
    with jax.enable_x64(True):
        params64 = to_float64(params)
        x64, y64 = to_float64((x, y))
        layout = _Layout.of(params64)
        # optimised: its differences evaluate the loss 4·n² times (40,000 at n = 100), which
        # LLVM's level 0 runs 15x slower (measured: 3.0 s against 0.2 s)
        kernels = _kernels(graphdef, mse_loss, layout, True, optimize=True)
        flat = layout.ravel(params64)
        loss, ad = kernels.value_and_grad(flat, x64, y64)
        loss, ad = float(loss), np.asarray(ad)
        fd, _, _ = _element_differences(kernels.point_losses, flat, np.asarray(flat),
                                        np.arange(n * n), x64, y64, richardson=True,
                                        error_estimate=False)
        if n <= 3:
            _, oracle_grad = symbolic_tied_gradient(np.asarray(theta), np.asarray(x),
                                                    np.asarray(y))
            oracle_grad = oracle_grad.ravel()
            oracle = "sympy, 30 digits"
        else:
            oracle_grad = np.asarray(jax.jit(tied_mse_gradient)(
                jnp.asarray(theta, jnp.float64), x64, y64).gradient).ravel()
            oracle = "closed form (chain rule by hand)"
    rel_ad, rel_fd = _norm_rel(ad, oracle_grad), _norm_rel(fd, oracle_grad)
    summary = (lambda g: _out(g)) if n <= 3 else (lambda g: float(np.linalg.norm(g)))
    what = "∂L/∂Θ" if n <= 3 else "‖∂L/∂Θ‖"
    return ExampleResult(
        name=name, expression=f"{what}, L = mean((tanh(Θ·tanh(Θ·x)) − y)²), n = {n}",
        point="Θ ~ N(0,1) key 0, x key 1, y key 2", value=loss, autodiff=summary(ad),
        symbolic=summary(oracle_grad), finite_difference=summary(fd), rel_err_autodiff=rel_ad,
        rel_err_fd=rel_fd,
        passed=bool(rel_ad <= EXAMPLE_AUTODIFF_TOL and rel_fd <= EXAMPLE_FD_TOL), oracle=oracle,
        float32=float32)


def worked_examples() -> list[ExampleResult]:
    """The notebook's worked derivative examples, each computed three ways in float64.

    Rows (the exact values come from sympy at run time, none is stored here):

    * ``tanh_4cos2``: d/dx tanh(4·cos²x) at x = 7 (≈ −0.16449);
    * ``accumulation``: z = x²·cos(x)/atan(x) at 7 (≈ −15.50478), with the three
      path derivatives (one per use of x) and their sum;
    * ``three_variables``: ∇ of x·y·a·b/z + a − b, a = atan(x/y), b = cos(z² − x),
      at (7, 5, 2) (≈ (−5.66197, −1.74938, 17.05945));
    * ``exact_4pi3``: d/dx (x²·cos x)² at π, exactly 4π³;
    * ``seed_model``: the notebook's tied net, n = 100: loss ≈ 1.0354788 (``value``),
      ‖∂L/∂Θ‖ ≈ 0.6549523, oracle the closed-form chain rule;
    * ``tied_n3``: the same at n = 3, oracle sympy.

    Returns:
      ``ExampleResult`` rows; ``dataclasses.asdict`` of each is JSON-serialisable.
    """
    import sympy

    def three(m, x, y, z):
        a, b = m.atan(x / y), m.cos(z ** 2 - x)
        return x * y * a * b / z + a - b

    seven = [sympy.Integer(7)]
    return [
        _expression_row("tanh_4cos2", "d/dx tanh(4·cos²x)", "x = 7",
                        lambda m, x: m.tanh(4 * m.cos(x) ** 2), seven),
        _accumulation_row(),
        _expression_row("three_variables", "∇ x·y·a·b/z + a − b, a = atan(x/y), b = cos(z²−x)",
                        "(x, y, z) = (7, 5, 2)", three,
                        [sympy.Integer(7), sympy.Integer(5), sympy.Integer(2)]),
        _expression_row("exact_4pi3", "d/dx (x²·cos x)²", "x = π",
                        lambda m, x: (x ** 2 * m.cos(x)) ** 2, [sympy.pi]),
        _tied_row("seed_model", 100),
        _tied_row("tied_n3", 3),
    ]
