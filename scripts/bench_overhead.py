"""Framework overhead: the service's training loop against a hand-written jit + scan loop.

Both train the same tanh MLP (same initial params), with the same optax optimizer
and schedule, on the same batches (the same per-epoch permutation of the same
training rows), for the same number of steps, in this one process. The service
runs through ``loop.train_and_evaluate`` with MLflow logging on, into a
temporary SQLite store; the hand-written loop is a plain ``jax.jit`` of a
``lax.scan`` over steps that only returns the loss.

The figure: ``ratio`` = service steps/s / hand-written steps/s, both in the
steady state (compilation and the first call excluded; the last timed region
ends at ``jax.block_until_ready``). The service's figure is the wall time between
its chunks' completions, so host work and MLflow logging that delay the device
count against it. The quality bar is ratio >= 0.95.

Each repeat runs both sides back to back; the figure is the median over repeats
of the per-repeat ratio, so slow drifts of this shared machine cancel.

Usage: python scripts/bench_overhead.py [--steps N] [--steps-per-call K] [--repeats R] [--log-every L]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

from trainer.config import Config, DataConfig, ModelConfig, OptimConfig, TrainerConfig  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.loop import SHUFFLE_STREAM, train_and_evaluate  # noqa: E402
from trainer.models import ModelSpec, init_model  # noqa: E402
from trainer.optim import make_optimizer, make_schedule  # noqa: E402
from trainer.tracking import get_or_create_experiment, open_store, resolve_store, start_run  # noqa: E402


def hand_written_steps_per_s(cfg: Config, dataset, *, steps_per_call: int) -> float:
    """Steady-state steps/s of a minimal jit + scan loop of the same training."""
    root = jax.random.key(cfg.seed)
    spec = ModelSpec("mlp", dataset.in_features, dataset.out_features, 0,
                     tuple(cfg.model.hidden), False, cfg.model.init, cfg.model.init_scale)
    params = nnx.to_pure_dict(nnx.split(init_model(spec, key=root), nnx.Param)[1])
    layers = [params["input_layer"], *params.get("hidden_layers", {}).values(), params["output_layer"]]
    schedule = make_schedule(cfg.optim, cfg.trainer.num_steps)
    tx = make_optimizer(cfg.optim, schedule)
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    n, batch = x_train.shape[0], min(cfg.data.batch_size, x_train.shape[0])
    steps_per_epoch = n // batch
    shuffle_key = jax.random.fold_in(root, SHUFFLE_STREAM)

    def forward(layers, x):
        for layer in layers[:-1]:
            x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
        return x @ layers[-1]["kernel"] + layers[-1]["bias"]

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
        orders = jax.vmap(lambda k: jax.random.permutation(k, n))(keys)
        return lax.scan(lambda c, _: step(c, orders, first_epoch), carry, None,
                        length=steps_per_call)

    carry = (layers, tx.init(layers), jnp.asarray(0, jnp.int32))
    carry, losses = run(carry)  # compile + first call, not timed
    jax.block_until_ready((carry, losses))
    chunks = cfg.trainer.num_steps // steps_per_call - 1
    t0 = time.perf_counter()
    for _ in range(chunks):
        carry, losses = run(carry)
    jax.block_until_ready((carry, losses))
    return chunks * steps_per_call / (time.perf_counter() - t0)


def service_steps_per_s(cfg: Config, dataset, store_dir: Path) -> float:
    """Steady-state steps/s as the service reports them, MLflow logging on."""
    store = resolve_store(None, store_dir)
    client = open_store(store)
    experiment_id = get_or_create_experiment(client, store, "bench-overhead")
    with start_run(client, experiment_id, run_name="overhead", tags={}) as tracker:
        result = train_and_evaluate(cfg, dataset, tracker)
    return result.timings["steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--steps-per-call", type=int, default=TrainerConfig.steps_per_call)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=TrainerConfig.log_every_steps)
    parser.add_argument("--eval-every", type=int, default=TrainerConfig.eval_every_steps)
    args = parser.parse_args()
    cfg = Config(model=ModelConfig(hidden=[8]), data=DataConfig(kind="diabetes", batch_size=32),
                 optim=OptimConfig(name="adamw", learning_rate=3e-3, weight_decay=0.1,
                                   schedule="cosine"),
                 trainer=TrainerConfig(num_steps=args.steps, steps_per_call=args.steps_per_call,
                                       log_every_steps=args.log_every,
                                       eval_every_steps=args.eval_every, progress=False))
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    hand, service = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up round, not counted: the first run in a process also starts MLflow's
        # logging threads and creates the store, and ran about half speed here.
        hand_written_steps_per_s(cfg, dataset, steps_per_call=args.steps_per_call)
        service_steps_per_s(cfg, dataset, Path(tmp))
        for _ in range(args.repeats):
            hand.append(hand_written_steps_per_s(cfg, dataset, steps_per_call=args.steps_per_call))
            service.append(service_steps_per_s(cfg, dataset, Path(tmp)))
    h, s = statistics.median(hand), statistics.median(service)
    ratios = [b / a for a, b in zip(hand, service)]
    print(f"device: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print(f"model: tanh MLP {cfg.model.hidden} on diabetes, batch {cfg.data.batch_size}, "
          f"{args.steps} steps in calls of {args.steps_per_call}, a metric point every "
          f"{args.log_every} steps, {args.repeats} repeats")
    print(f"hand-written jit+scan : {h:12,.0f} steps/s  (runs: {', '.join(f'{v:,.0f}' for v in hand)})")
    print(f"service (MLflow on)   : {s:12,.0f} steps/s  (runs: {', '.join(f'{v:,.0f}' for v in service)})")
    print(f"ratio = {statistics.median(ratios):.3f}  (median of per-repeat ratios: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}; bar: >= 0.95)")


if __name__ == "__main__":
    main()
