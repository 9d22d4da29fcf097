"""The hand-written reference of the main job: what an expert writes without the service.

Usage: python scripts/reference_diabetes.py [--seed 0]

The same training as ``python -m trainer +experiment=diabetes``: scikit-learn's
diabetes table split 70/15/15 with the service's seeds, features and target
standardised on the training rows, a 10-8-1 tanh MLP (LeCun-normal kernels, zero
biases), AdamW (learning rate 0.003, weight decay 0.1) with cosine decay to 0 over
1000 steps of 32 shuffled rows (a new permutation each epoch) in ONE ``lax.scan``,
then the test RMSE in the target's units beside a ``LinearRegression`` baseline.
No tracking, no plots, no checks: the floor a whole command can reach.
``scripts/bench_time_to_result.py`` times it beside the service's command.
"""

import argparse
import time

T0 = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

STEPS, BATCH, HIDDEN = 1000, 32, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed

    x, y = load_diabetes(return_X_y=True)
    y = y.reshape(-1, 1)
    n = len(x)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=round(0.15 * n),
                                                      random_state=seed)
    x_train, _, y_train, _ = train_test_split(x_rest, y_rest, test_size=round(0.15 * n),
                                              random_state=seed + 1)
    mean, std = x_train.mean(0), x_train.std(0)
    y_mean, y_std = y_train.mean(0), y_train.std(0)
    xs = jnp.asarray((x_train - mean) / std, jnp.float32)
    ys = jnp.asarray((y_train - y_mean) / y_std, jnp.float32)

    k1, k2, k_shuffle = jax.random.split(jax.random.key(seed), 3)
    init = jax.nn.initializers.lecun_normal()
    params = {"w1": init(k1, (10, HIDDEN)), "b1": jnp.zeros(HIDDEN),
              "w2": init(k2, (HIDDEN, 1)), "b2": jnp.zeros(1)}
    tx = optax.adamw(optax.cosine_decay_schedule(0.003, STEPS), weight_decay=0.1)

    def predict(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss(p, x, y):
        return jnp.mean((predict(p, x) - y) ** 2)

    per_epoch = xs.shape[0] // BATCH

    @jax.jit
    def train(params, key):
        def step(carry, i):
            p, s, order = carry
            epoch_key = jax.random.fold_in(key, i // per_epoch)
            order = jnp.where(i % per_epoch == 0,
                              jax.random.permutation(epoch_key, xs.shape[0]), order)
            rows = jax.lax.dynamic_slice_in_dim(order, (i % per_epoch) * BATCH, BATCH)
            value, grads = jax.value_and_grad(loss)(p, xs[rows], ys[rows])
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s, order), value

        order = jnp.arange(xs.shape[0])
        (params, _, _), losses = jax.lax.scan(step, (params, tx.init(params), order),
                                              jnp.arange(STEPS))
        return params, losses

    params, losses = jax.block_until_ready(train(params, k_shuffle))
    x_test_std = jnp.asarray((x_test - mean) / std, jnp.float32)
    pred = np.asarray(predict(params, x_test_std)) * y_std + y_mean
    rmse = float(np.sqrt(np.mean((pred - y_test) ** 2)))
    base = LinearRegression().fit((x_train - mean) / std, y_train)
    base_rmse = float(np.sqrt(np.mean((base.predict((x_test - mean) / std) - y_test) ** 2)))
    print(f"final train loss {float(losses[-1]):.4f} | test RMSE {rmse:.2f} "
          f"(linear baseline {base_rmse:.2f}) | {time.perf_counter() - T0:.2f} s in process")


if __name__ == "__main__":
    main()
