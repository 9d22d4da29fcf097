"""Benchmark 4: memory with and without the backward pass as depth grows, and ``jax.checkpoint``.

To run its backward pass, reverse-mode autodiff keeps intermediates of the
forward pass (residuals); a forward pass alone can free each intermediate once
used. Three families, each forward only and with its gradient:

* ``chain``: the notebook's experiment, ``y = x * x * ... * x`` (n products,
  elementwise) summed, for n = 10 and 100;
* ``mlp``: a tanh MLP of ``depth`` layers ``h -> tanh(h @ K_l + b_l)`` (width W,
  its own kernel per layer), MSE loss;
* ``tied``: the tied block applied ``depth`` times with ONE square Θ,
  ``h -> tanh(h @ Θᵀ)`` (depth 2 is the service's ``tied`` model).

The layers of ``mlp`` and ``tied`` run as one ``lax.scan`` over depth (stacked
kernels), as deep JAX nets are usually written, with three ways to differentiate:
``grad`` (plain), ``remat`` (``jax.checkpoint`` on the scan body: each layer's
intermediates are recomputed in the backward pass from its input, which alone is
saved) and ``sqrt_remat`` (the scan split into about sqrt(depth) checkpointed
segments of scanned layers: only segment inputs are saved, one segment's
intermediates are live at a time; Chen et al. 2016, "Training deep nets with
sublinear memory cost"). Found while building this: ``jax.checkpoint`` around
segments of an unrolled Python loop of layers did not lower XLA's temp bytes on
CPU (the CPU scheduler runs the recomputations early), so the scan form is the
one measured.

Bytes, per case:
  * ``temp_bytes``: ``measure.compiled_memory`` of the compiled function, XLA's
    buffer assignment for intermediates (every backend);
  * ``residual_bytes``: what ``jax.vjp`` saves for the backward pass, before XLA
    optimises (``jax.eval_shape``, no computation): autodiff's own bill;
  * ``peak_bytes`` (backends with allocator statistics, i.e. GPU): the device
    allocator's peak during one call, above the bytes in use before it. JAX's peak
    counter cannot be reset, so each case runs in a fresh subprocess
    (``python -m trainer.benchmarks.memory --probe SPEC``) with preallocation and
    autotuning off (so neither the pool nor autotuning scratch is counted), the
    inputs made on the host and copied in; up to ``probe_workers`` run at once.
Checked first: the chain's value and gradient against the closed forms
``sum(x**(n+1))`` and ``(n+1) x**n`` (float64); ``value_and_grad``'s value equals
the forward loss; ``remat`` and ``sqrt_remat`` gradients equal plain gradients.
Time: at the largest depth, ``remat`` and ``sqrt_remat`` gradient time over plain
gradient time (sampled in turn).

The allocation experiment (the seed notebook's question: what happens to the memory
held when 1024 elements become slightly more or fewer, and why powers of two are
liked): for arrays of ``alloc_elements`` (1000, 1023, 1024, 1025, 2048) float32 and
float64 elements, the bytes actually held beside the bytes requested (``allocation_sizes``):
  * ``xla_bytes`` (every backend): what XLA's buffer assignment reserves for one
    temporary of that size: the temp bytes of a program that keeps three sorted copies
    alive for a concatenation, less those of one that keeps two (each buffer but the
    last is padded to the assignment's alignment, so the difference is one padded
    buffer);
  * ``allocator_bytes`` (backends with allocator statistics, i.e. GPU): the device
    allocator's ``bytes_in_use`` after ``jax.device_put`` of the array, less before
    (its rounding of a request);
  * ``on_device_bytes``: ``jax.Array`` ``on_device_size_in_bytes`` (the runtime's own
    figure; on CPU the request).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .harness import (HIGHER, LOWER, BenchResult, Recorder, compile_timed,
                      label_log_axes, matmul_tol, ratio_stats, time_interleaved)
from .. import measure

__all__ = ["Sizes", "QUICK", "run", "chain_loss", "deep_loss", "segment_size",
           "residual_bytes", "probe_peak_bytes", "allocation_sizes"]

NAME = "memory"
GRAD_KINDS = ("grad", "remat", "sqrt_remat")  # the ways to differentiate a deep net


@dataclass(frozen=True)
class Sizes:
    chain_lengths: tuple[int, ...] = (10, 100)  # n, elementwise products in the chain
    chain_size: int = 1 << 16                   # elements of the chain's x (float32)
    depths: tuple[int, ...] = (4, 16, 64)       # tanh layers (mlp) / tied applications (tied)
    width: int = 128                            # W, features per row
    batch_size: int = 512                       # B, rows
    repeats: int = 9                            # timed samples of each gradient (largest depth)
    min_time_s: float = 0.05                    # one sample loops calls for at least this
    probe_workers: int = 8                      # GPU peak-bytes subprocesses run at once
    alloc_elements: tuple[int, ...] = (1000, 1023, 1024, 1025, 2048)  # allocation experiment


QUICK = Sizes(depths=(4, 16), repeats=3, min_time_s=0.02)


def chain_loss(x: jax.Array, n: int) -> jax.Array:
    """``sum(x * x * ... * x)`` with ``n`` elementwise products: ``(N,) -> ()``."""
    y = x
    for _ in range(n):
        y = y * x
    return jnp.sum(y)


def segment_size(depth: int) -> int:
    """The largest divisor of ``depth`` not above ``sqrt(depth)``: layers per checkpointed
    segment in ``sqrt_remat``."""
    return max(s for s in range(1, math.isqrt(depth) + 1) if depth % s == 0)


def deep_loss(params: dict, x: jax.Array, y: jax.Array, *, model: str, depth: int,
              remat: str = "none", checkpoint: Callable = jax.checkpoint) -> jax.Array:
    """MSE after ``depth`` tanh layers run as a ``lax.scan``.

    Args:
      params: ``mlp``: ``{"kernels": (depth, W, W), "biases": (depth, W)}`` float32;
        ``tied``: ``{"theta": (W, W)}`` float32, used by every layer.
      x, y: ``(B, W)`` float32.
      model: ``"mlp"`` or ``"tied"``.
      remat: ``"none"``, ``"remat"`` (checkpoint each layer) or ``"sqrt_remat"``
        (checkpoint segments of ``segment_size(depth)`` layers).
      checkpoint: the rematerialisation transform (``jax.checkpoint``).

    Returns:
      ``()`` float32.
    """
    if model == "mlp":
        xs = (params["kernels"], params["biases"])

        def layer(h, kb):
            kernel, bias = kb
            return jnp.tanh(h @ kernel + bias[None, :]), None
    elif model == "tied":
        theta = params["theta"]
        xs = None

        def layer(h, _):
            return jnp.tanh(h @ theta.T), None
    else:
        raise ValueError(f"unknown model {model!r}; choose 'mlp' or 'tied'")
    if remat == "none":
        h, _ = lax.scan(layer, x, xs, length=depth)
    elif remat == "remat":
        h, _ = lax.scan(checkpoint(layer), x, xs, length=depth)
    elif remat == "sqrt_remat":
        s = segment_size(depth)
        segments = jax.tree.map(lambda a: a.reshape(depth // s, s, *a.shape[1:]), xs)

        def segment(h, seg_xs):
            return lax.scan(layer, h, seg_xs, length=s)[0], None

        h, _ = lax.scan(checkpoint(segment), x, segments, length=depth // s)
    else:
        raise ValueError(f"unknown remat {remat!r}")
    return jnp.mean((h - y) ** 2)


def residual_bytes(fn: Callable, *args) -> int:
    """Bytes of the residuals ``jax.vjp(fn, *args)`` saves for the backward pass
    (shapes only, via ``jax.eval_shape``: nothing is computed)."""
    vjp_fn = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
    return int(sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves(vjp_fn)))


def _deep_inputs(model: str, depth: int, width: int, batch_size: int, seed: int = 0):
    """Host (NumPy) params, x, y with LeCun-normal weights; copied to the device by the caller."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / math.sqrt(width)
    if model == "mlp":
        kernels = rng.standard_normal((depth, width, width)) * scale
        params = {"kernels": kernels.astype(np.float32),
                  "biases": np.zeros((depth, width), np.float32)}
    else:
        params = {"theta": (rng.standard_normal((width, width)) * scale).astype(np.float32)}
    x = rng.standard_normal((batch_size, width)).astype(np.float32)
    y = rng.standard_normal((batch_size, width)).astype(np.float32)
    return params, x, y


def _chain_input(size: int) -> np.ndarray:
    return np.linspace(0.5, 1.0, size, dtype=np.float32)  # x**101 stays a normal float32


def _case_function(spec: dict, checkpoint: Callable = jax.checkpoint):
    """``(fn, host_args)`` of one case: ``spec`` has ``family``, ``kind`` (``forward``
    or one of ``GRAD_KINDS``), ``n`` or ``depth``, and the sizes."""
    if spec["family"] == "chain":
        n = spec["n"]
        loss = lambda x: chain_loss(x, n)  # noqa: E731
        fn = loss if spec["kind"] == "forward" else jax.grad(loss)
        return fn, (_chain_input(spec["chain_size"]),)
    kind = spec["kind"]
    remat = "none" if kind in ("forward", "grad") else kind
    loss = lambda p, x, y: deep_loss(p, x, y, model=spec["family"], depth=spec["depth"],  # noqa
                                     remat=remat, checkpoint=checkpoint)
    fn = loss if kind == "forward" else jax.value_and_grad(loss)
    return fn, _deep_inputs(spec["family"], spec["depth"], spec["width"], spec["batch_size"])


def probe_peak_bytes(spec: dict) -> int:
    """The device allocator's peak bytes during one call of the case ``spec``, above what
    was in use before the call, measured in this (fresh) process.

    Raises:
      RuntimeError: the backend keeps no allocator statistics.
    """
    fn, host_args = _case_function(spec)
    args = jax.device_put(host_args)
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(args)
    device = jax.devices()[0]
    before = (device.memory_stats() or {}).get("bytes_in_use")
    if before is None:
        raise RuntimeError(f"the {jax.default_backend()} backend keeps no allocator statistics")
    jax.block_until_ready(compiled(*args))
    return measure.device_peak_bytes(device) - int(before)


def _kept_copies_temp_bytes(n: int, dtype, copies: int) -> int:
    """XLA temp bytes of a program that keeps ``copies`` sorted copies of an ``(n,)`` array
    alive until one concatenation (a sort cannot fuse into it, so each is a buffer)."""
    def keep(x):
        return jnp.concatenate([jnp.sort(x * (i + 1)) for i in range(copies)])

    spec = jax.ShapeDtypeStruct((n,), dtype)
    return measure.compiled_memory(jax.jit(keep).lower(spec).compile()).get("temp_bytes", 0)


def allocation_sizes(elements=(1000, 1023, 1024, 1025, 2048),
                     dtypes=("float32", "float64")) -> list[dict]:
    """Bytes held for ``(n,)`` arrays against the bytes requested; see the module docstring.

    Returns:
      one dict per (dtype, n): ``dtype``, ``elements``, ``requested_bytes``,
      ``xla_bytes``, ``on_device_bytes`` and, where the backend keeps allocator
      statistics, ``allocator_bytes``.
    """
    device = jax.devices()[0]
    rows = []
    with jax.enable_x64(True):  # float64 arrays; the caller's mode is restored after
        for dtype in dtypes:
            for n in elements:
                itemsize = np.dtype(dtype).itemsize
                row = {"dtype": dtype, "elements": n, "requested_bytes": n * itemsize,
                       "xla_bytes": _kept_copies_temp_bytes(n, dtype, 3)
                       - _kept_copies_temp_bytes(n, dtype, 2)}
                before = (device.memory_stats() or {}).get("bytes_in_use")
                array = jax.block_until_ready(jax.device_put(np.ones(n, dtype), device))
                after = (device.memory_stats() or {}).get("bytes_in_use")
                if before is not None and after is not None:
                    row["allocator_bytes"] = int(after - before)
                row["on_device_bytes"] = int(array.addressable_data(0).on_device_size_in_bytes())
                del array
                rows.append(row)
    return rows


def _probe_all(specs: list[dict], workers: int) -> list[int]:
    """``probe_peak_bytes`` of each spec, each in a fresh subprocess."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())

    def one(spec: dict) -> int:
        out = subprocess.run([sys.executable, "-m", "trainer.benchmarks.memory", "--probe",
                              json.dumps(spec)], capture_output=True, text=True, env=env,
                             timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe {spec} failed: {out.stderr.strip()[-2000:]}")
        return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, specs))


def run(sizes: Sizes = Sizes(), workdir: Path | None = None, *,
        checkpoint: Callable = jax.checkpoint, peak_bytes: bool | None = None,
        log: Callable[[str], None] | None = print) -> BenchResult:
    """Measure memory with and without the backward pass; see the module docstring.

    Args:
      sizes: what to run. workdir: folder for the plot (none drawn if None).
      checkpoint: the rematerialisation transform under test (``jax.checkpoint``); a
        test passes a broken one to see the benchmark refuse to report.
      peak_bytes: measure allocator peaks in subprocesses; None: where the backend
        keeps allocator statistics (GPU), not on CPU.
      log: where console lines go.

    Raises:
      CorrectnessError: a value or gradient disagrees with its reference.
    """
    rec = Recorder(NAME, asdict(sizes), log=log)
    if peak_bytes is None:
        peak_bytes = measure.device_peak_bytes() is not None
    specs: list[dict] = []  # every case, in order, for the optional peak probes
    temp: dict[tuple, int] = {}
    resid: dict[tuple, int] = {}

    for n in sizes.chain_lengths:
        x = jnp.asarray(_chain_input(sizes.chain_size))
        x64 = np.asarray(x, np.float64)
        for kind in ("forward", "grad"):
            spec = {"family": "chain", "kind": kind, "n": n, "chain_size": sizes.chain_size}
            fn, _ = _case_function(spec)
            compiled, seconds = compile_timed(fn, x)
            rec.compiled(f"{NAME}/chain/n{n}/{kind}", seconds)
            if kind == "forward":
                rec.check_close(f"chain n={n}: value vs sum(x**(n+1))", compiled(x),
                                np.sum(x64 ** (n + 1)), rtol=1e-4)
            else:
                rec.check_close(f"chain n={n}: gradient vs (n+1) x**n", compiled(x),
                                (n + 1) * x64 ** n, rtol=1e-4)
                resid[("chain", n, kind)] = residual_bytes(lambda v: chain_loss(v, n), x)
            temp[("chain", n, kind)] = measure.compiled_memory(compiled).get("temp_bytes", 0)
            specs.append(spec)

    timed: dict[str, Callable] = {}
    for family in ("mlp", "tied"):
        for depth in sizes.depths:
            host = _deep_inputs(family, depth, sizes.width, sizes.batch_size)
            args = jax.device_put(host)
            outputs = {}
            for kind in ("forward", *GRAD_KINDS):
                spec = {"family": family, "kind": kind, "depth": depth, "width": sizes.width,
                        "batch_size": sizes.batch_size}
                fn, _ = _case_function(spec, checkpoint)
                compiled, seconds = compile_timed(fn, *args)
                rec.compiled(f"{NAME}/{family}/d{depth}/{kind}", seconds)
                outputs[kind] = compiled(*args)
                temp[(family, depth, kind)] = measure.compiled_memory(compiled).get("temp_bytes", 0)
                if kind != "forward":
                    remat = "none" if kind == "grad" else kind
                    resid[(family, depth, kind)] = residual_bytes(
                        lambda p, a=args: deep_loss(p, a[1], a[2], model=family, depth=depth,
                                                    remat=remat, checkpoint=checkpoint), args[0])
                    if depth == max(sizes.depths):
                        timed[f"{family}/{kind}"] = (lambda c=compiled, a=args: c(*a))
                specs.append(spec)
            rec.check_close(f"{family} depth {depth}: value_and_grad value vs forward loss",
                            outputs["grad"][0], outputs["forward"], rtol=matmul_tol(1e-5))
            for kind in GRAD_KINDS[1:]:
                rec.check_close(f"{family} depth {depth}: {kind} gradient vs plain gradient",
                                outputs[kind], outputs["grad"], rtol=matmul_tol(1e-4),
                                atol_scale=matmul_tol(1e-6))

    peaks = dict(zip([_key(s) for s in specs], _probe_all(specs, sizes.probe_workers))) \
        if peak_bytes else {}

    samples = time_interleaved(timed, repeats=sizes.repeats, min_time_s=sizes.min_time_s)
    for name, values in samples.items():
        rec.timing(f"{NAME}/{name.split('/')[0]}/d{max(sizes.depths)}/{name.split('/')[1]}",
                   measure.summarize_times(values))

    for n in sizes.chain_lengths:
        _report_case(rec, "chain", f"n{n}", n, ("forward", "grad"), temp, resid, peaks,
                     label=f"chain of {n} products, {sizes.chain_size} floats")
    for family in ("mlp", "tied"):
        for depth in sizes.depths:
            _report_case(rec, family, f"d{depth}", depth, ("forward", *GRAD_KINDS), temp, resid,
                         peaks, label=f"{family} depth {depth}, W={sizes.width}, "
                                      f"B={sizes.batch_size}")
        deepest = max(sizes.depths)
        for kind in GRAD_KINDS[1:]:
            plain, saved = temp[(family, deepest, "grad")], temp[(family, deepest, kind)]
            share = 1.0 - saved / plain if plain else 0.0
            rec.figure(f"{NAME}/{family}/d{deepest}/{kind}_saved_share", share, "share",
                       direction=HIGHER, description=f"1 - {kind} temp bytes / plain gradient "
                                                     f"temp bytes at depth {deepest}", show=False)
            ratio = ratio_stats(samples[f"{family}/{kind}"], samples[f"{family}/grad"])
            rec.figure(f"{NAME}/{family}/d{deepest}/{kind}_time_ratio", ratio.median_s, "x",
                       direction=LOWER, spread=ratio.spread,
                       description=f"{kind} gradient time / plain gradient time at depth "
                                   f"{deepest}",
                       show=f"  {family} depth {deepest}: {kind} saves {share:.0%} of the "
                            f"gradient's temp bytes and costs {ratio.median_s:.2f}x its time "
                            f"(spread {ratio.spread:.0%})")
    allocations = allocation_sizes(sizes.alloc_elements)
    for row in allocations:
        base = f"{NAME}/alloc/{row['dtype']}/n{row['elements']}"
        held = {k: row[k] for k in ("xla_bytes", "allocator_bytes") if k in row}
        for key, value in held.items():
            rec.figure(f"{base}/{key}", value, "bytes", direction=LOWER, show=False,
                       description=f"bytes held for {row['elements']} {row['dtype']} "
                                   f"({row['requested_bytes']} requested): "
                                   + ("XLA buffer assignment" if key == "xla_bytes"
                                      else "device allocator"))
        rec.note(f"{row['elements']:>5} x {row['dtype']}: requested {row['requested_bytes']} B, "
                 + ", ".join(f"{k.removesuffix('_bytes')} holds {v} B "
                             f"(+{v - row['requested_bytes']})" for k, v in held.items()))
    if workdir is not None:
        rec.plot(_plot(sizes, temp, resid, peaks, workdir / "memory_depth.png"))
        rec.plot(_plot_allocations(allocations, workdir / "memory_allocation.png"))
    return rec.done()


def _plot_allocations(rows: list[dict], path: Path) -> Path:
    """Bytes held over bytes requested, per size and dtype, for each source measured."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, dtype in zip(axes, sorted({r["dtype"] for r in rows})):
        mine = [r for r in rows if r["dtype"] == dtype]
        labels = [str(r["elements"]) for r in mine]
        xs = np.arange(len(mine))
        sources = [k for k in ("xla_bytes", "allocator_bytes") if k in mine[0]]
        width = 0.8 / (len(sources) + 1)
        ax.bar(xs, [r["requested_bytes"] for r in mine], width, label="requested")
        for i, key in enumerate(sources, start=1):
            bars = ax.bar(xs + i * width, [r[key] for r in mine], width,
                          label=key.removesuffix("_bytes").replace("xla", "XLA buffer "
                                                                          "assignment"))
            ax.bar_label(bars, labels=[f"+{r[key] - r['requested_bytes']}" for r in mine],
                         fontsize=7)
        ax.set_xticks(xs + width * len(sources) / 2, labels)
        ax.set(xlabel="elements", ylabel="bytes",
               title=f"{dtype} on {jax.default_backend()}: bytes held per array (label: padding)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def _key(spec: dict) -> tuple:
    return (spec["family"], spec.get("n", spec.get("depth")), spec["kind"])


def _report_case(rec: Recorder, family: str, tag: str, size: int, kinds, temp, resid, peaks, *,
                 label: str) -> None:
    parts = []
    for kind in kinds:
        base = f"{NAME}/{family}/{tag}/{kind}"
        rec.figure(f"{base}_temp_bytes", temp[(family, size, kind)], "bytes", direction=LOWER,
                   description=f"XLA temp bytes, {kind}, {label}", show=False)
        part = f"{kind} {temp[(family, size, kind)] / 2**20:.2f}"
        if (family, size, kind) in resid:
            rec.figure(f"{base}_residual_bytes", resid[(family, size, kind)], "bytes",
                       direction=LOWER, show=False,
                       description=f"bytes jax.vjp saves for the backward pass, {kind}, {label}")
            part += f" (residuals {resid[(family, size, kind)] / 2**20:.2f})"
        if (family, size, kind) in peaks:
            rec.figure(f"{base}_peak_bytes", peaks[(family, size, kind)], "bytes",
                       direction=LOWER, show=False,
                       description=f"device allocator peak above inputs, {kind}, {label}")
            part += f" [peak {peaks[(family, size, kind)] / 2**20:.2f}]"
        parts.append(part)
    rec.note(f"{label}: temp MiB " + ", ".join(parts))


def _plot(sizes: Sizes, temp, resid, peaks, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    ns = list(sizes.chain_lengths)
    ax = axes[0]
    for kind, marker in (("forward", "o"), ("grad", "s")):
        ax.plot(ns, [temp[("chain", n, kind)] / 2**20 for n in ns], marker=marker,
                label=f"{kind}: XLA temp")
    ax.plot(ns, [resid[("chain", n, "grad")] / 2**20 for n in ns], marker="^", ls="--",
            label="grad: jax.vjp residuals")
    ax.set(xlabel="products n", ylabel="MiB", title=f"chain, {sizes.chain_size} floats")
    for ax, family in zip(axes[1:], ("mlp", "tied")):
        depths = list(sizes.depths)
        for kind, marker in (("forward", "o"), ("grad", "s"), ("remat", "^"),
                             ("sqrt_remat", "v")):
            ax.plot(depths, [temp[(family, d, kind)] / 2**20 for d in depths], marker=marker,
                    label=f"{kind}: XLA temp")
            if peaks:
                ax.plot(depths, [peaks[(family, d, kind)] / 2**20 for d in depths], ls=":",
                        marker=marker, label=f"{kind}: device peak")
        ax.set(xscale="log", xlabel="depth (tanh layers)", ylabel="MiB",
               title=f"{family}, W={sizes.width}, B={sizes.batch_size}")
        label_log_axes(ax, depths)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def _probe_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the allocator peak of one memory case.")
    parser.add_argument("--probe", required=True, help="the case, as JSON")
    args = parser.parse_args(argv)
    print(json.dumps({"peak_bytes": probe_peak_bytes(json.loads(args.probe))}))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main())
