"""Benchmark 6: framework overhead, the service's loop against a hand-written jit + scan loop.

Both train the same tanh MLP (same initial params), with the same optax optimizer
and schedule, on the same batches (the same per-epoch permutation of the same
training rows), for the same number of steps, in this one process. The service
runs through ``loop.train_and_evaluate`` with MLflow logging on, into a
temporary SQLite store (its own, not the suite's); the hand-written loop is a
plain ``jax.jit`` of a ``lax.scan`` over steps that only returns the loss.

Checked first, on an untimed warm-up round (which also starts MLflow's logging
threads and creates the store; the first run in a process ran about half speed):
the two runs' step-0 losses agree, and so do their final params.

Figure: ``overhead/ratio`` = service steps/s / hand-written steps/s, both in the
steady state (compilation and the first call excluded; the last timed region
ends at ``jax.block_until_ready``). The service's figure is the wall time between
its chunks' completions, so host work and MLflow logging that delay the device
count against it. The quality bar is ratio >= 0.95. Each repeat runs both sides
back to back; the figure is the median over repeats of the per-repeat ratio, so
slow drifts of a shared machine cancel.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from .harness import HIGHER, BenchResult, Recorder, matmul_tol
from .. import measure
from ..config import AdamWOptimConfig, Config, MlpModelConfig, TabularDataConfig, TrainerConfig
from ..data import load_dataset
from ..loop import SHUFFLE_STREAM, train_and_evaluate
from ..steps import row_permutation
from ..models import ModelSpec, init_model
from ..tracking import get_or_create_experiment, open_store, resolve_store, start_run

__all__ = ["Sizes", "QUICK", "run", "make_config", "hand_written_run", "service_run"]

NAME = "overhead"
BAR = 0.95  # the quality bar on the ratio


@dataclass(frozen=True)
class Sizes:
    num_steps: int = 200_000                                # steps per training run, each side
    steps_per_call: int = TrainerConfig.steps_per_call      # steps per compiled call
    log_every_steps: int = TrainerConfig.log_every_steps    # the service's metric interval
    eval_every_steps: int = TrainerConfig.eval_every_steps  # the service's validation interval
    repeats: int = 5                                        # timed rounds (each: both sides)


QUICK = Sizes(num_steps=20_000, repeats=1)  # a service run costs ~3 s of fixed work here


def make_config(sizes: Sizes) -> Config:
    """The measured training: tanh MLP [8] on diabetes, batch 32, AdamW with cosine decay."""
    return Config(model=MlpModelConfig(hidden=[8]),
                  data=TabularDataConfig(kind="diabetes", batch_size=32),
                  optim=AdamWOptimConfig(learning_rate=3e-3, weight_decay=0.1,
                                         schedule="cosine"),
                  trainer=TrainerConfig(num_steps=sizes.num_steps,
                                        steps_per_call=sizes.steps_per_call,
                                        log_every_steps=sizes.log_every_steps,
                                        eval_every_steps=sizes.eval_every_steps, progress=False))


def hand_written_run(cfg: Config, dataset) -> tuple[float, float, list]:
    """Train with a minimal jit + scan loop.

    Returns:
      ``(steps_per_s, step0_loss, final_layers)``: steady-state steps/s (the first,
      compiling call excluded), the loss before step 0, and the final params as
      ``[{"kernel", "bias"}, ...]`` per layer, input first (host arrays).
    """
    root = jax.random.key(cfg.seed)
    spec = ModelSpec("mlp", dataset.in_features, dataset.out_features, 0,
                     tuple(cfg.model.hidden), False, cfg.model.init, cfg.model.init_scale)
    params = nnx.to_pure_dict(nnx.split(init_model(spec, key=root), nnx.Param)[1])
    layers = _layer_list(params)
    o = cfg.optim  # plain optax, as one writes it by hand (the service injects its values)
    tx = optax.adamw(optax.cosine_decay_schedule(o.learning_rate, cfg.trainer.num_steps,
                                                 alpha=o.final_lr_fraction),
                     weight_decay=o.weight_decay)
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    n, batch = x_train.shape[0], min(cfg.data.batch_size, x_train.shape[0])
    steps_per_epoch = n // batch
    steps_per_call = cfg.trainer.steps_per_call
    shuffle_key = jax.random.fold_in(root, SHUFFLE_STREAM)

    def forward(layers, x):
        for layer in layers[:-1]:
            x = jnp.tanh(x @ layer["kernel"] + layer["bias"][None, :])
        return x @ layers[-1]["kernel"] + layers[-1]["bias"][None, :]

    def loss(layers, x, y):
        return jnp.mean((forward(layers, x) - y) ** 2)

    def step(carry, orders, first_epoch):
        layers, opt_state, i = carry
        epoch, pos = jnp.divmod(i, steps_per_epoch)
        idx = lax.dynamic_slice_in_dim(orders[epoch - first_epoch], pos * batch, batch)
        value, grads = jax.value_and_grad(loss)(layers, x_train[idx], y_train[idx])
        updates, opt_state = tx.update(grads, opt_state, layers)
        return (optax.apply_updates(layers, updates), opt_state, i + 1), value

    n_epochs = steps_per_call // steps_per_epoch + 2

    @jax.jit
    def run(carry):
        # this call's epoch orders, drawn once (one permutation per epoch)
        first_epoch = carry[2] // steps_per_epoch
        keys = jax.vmap(lambda e: jax.random.fold_in(shuffle_key, e))(
            first_epoch + jnp.arange(n_epochs))
        orders = jax.vmap(lambda k: row_permutation(k, n))(keys)
        return lax.scan(lambda c, _: step(c, orders, first_epoch), carry, None,
                        length=steps_per_call)

    carry = (layers, tx.init(layers), jnp.asarray(0, jnp.int32))
    carry, losses = run(carry)  # compile + first call, not timed
    jax.block_until_ready((carry, losses))
    step0_loss = float(losses[0])
    chunks = cfg.trainer.num_steps // steps_per_call - 1
    t0 = time.perf_counter()
    for _ in range(chunks):
        carry, losses = run(carry)
    jax.block_until_ready((carry, losses))
    steps_per_s = chunks * steps_per_call / (time.perf_counter() - t0)
    return steps_per_s, step0_loss, jax.device_get(carry[0])


def service_run(cfg: Config, dataset, store_dir: Path) -> tuple[float, float, list]:
    """Train through ``loop.train_and_evaluate`` with MLflow logging on, into the default
    store under ``store_dir``.

    Returns:
      ``(steps_per_s, step0_loss, final_layers)`` as the service reports them.
    """
    store = resolve_store(f"sqlite:///{store_dir / 'mlruns' / 'mlflow.db'}", store_dir)
    client = open_store(store)
    experiment_id = get_or_create_experiment(client, store, "bench-overhead")
    with start_run(client, experiment_id, run_name="overhead", tags={}) as tracker:
        result = train_and_evaluate(cfg, dataset, tracker)
    steps, values = result.history["train_loss"]
    step0 = values[steps.index(0)]
    return (result.timings["steps_per_s"], step0,
            _layer_list(nnx.to_pure_dict(result.params)))


def _layer_list(params: dict) -> list:
    """``[input_layer, *hidden_layers, output_layer]`` of a pure-dict ``TanhMLP`` state."""
    hidden = params.get("hidden_layers", {})
    return [params["input_layer"], *(hidden[k] for k in sorted(hidden)), params["output_layer"]]


def run(sizes: Sizes = Sizes(), workdir: Path | None = None, *,
        log: Callable[[str], None] | None = print) -> BenchResult:
    """Time the service's loop against the hand-written one; see the module docstring.

    Raises:
      CorrectnessError: the two loops did not train the same thing.
    """
    rec = Recorder(NAME, asdict(sizes), log=log)
    cfg = make_config(sizes)
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    hand, service = [], []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        _, hand_loss0, hand_final = hand_written_run(cfg, dataset)
        _, service_loss0, service_final = service_run(cfg, dataset, Path(tmp))
        rec.check_close("step-0 loss: service vs hand-written", service_loss0, hand_loss0,
                        rtol=matmul_tol(1e-5))
        rec.check_close(f"params after {sizes.num_steps} steps: service vs hand-written",
                        service_final, hand_final, rtol=matmul_tol(1e-3),
                        atol_scale=matmul_tol(1e-4))
        for _ in range(sizes.repeats):
            hand.append(hand_written_run(cfg, dataset)[0])
            service.append(service_run(cfg, dataset, Path(tmp))[0])
    hand_t = rec.timing(f"{NAME}/hand_written/step", measure.summarize_times([1 / v for v in hand]))
    service_t = rec.timing(f"{NAME}/service/step",
                           measure.summarize_times([1 / v for v in service]))
    ratios = measure.summarize_times([s / h for h, s in zip(hand, service)])
    rec.figure(f"{NAME}/hand_written/steps_per_s", 1 / hand_t.median_s, "steps/s",
               direction=HIGHER, spread=hand_t.spread,
               description="hand-written jax.jit + lax.scan loop, steady state")
    rec.figure(f"{NAME}/service/steps_per_s", 1 / service_t.median_s, "steps/s",
               direction=HIGHER, spread=service_t.spread,
               description="loop.train_and_evaluate with MLflow logging on, steady state")
    rec.figure(f"{NAME}/ratio", ratios.median_s, "x", direction=HIGHER, spread=ratios.spread,
               description=f"service steps/s / hand-written steps/s (bar >= {BAR})",
               show=f"  service / hand-written = {ratios.median_s:.3f} (median of per-repeat "
                    f"ratios {', '.join(f'{s / h:.3f}' for h, s in zip(hand, service))}; "
                    f"bar >= {BAR})")
    rec.note(f"tanh MLP {cfg.model.hidden} on diabetes, batch {cfg.data.batch_size}, "
             f"{sizes.num_steps} steps in calls of {sizes.steps_per_call}, a metric point every "
             f"{sizes.log_every_steps} steps; median steps/s: hand-written "
             f"{statistics.median(hand):,.0f}, service {statistics.median(service):,.0f}")
    return rec.done()
