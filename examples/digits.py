"""Sparsify a trained Keras model and fine-tune it with pruning, on scikit-learn's digits.

    python examples/digits.py [--quick] [--plot digits.png]

Trains a dense MLP (64 -> 1024 -> 1024 -> 10), swaps its Dense layers for
MaskedDense (masked_ops.keras.sparsify, all blocks live), fine-tunes while a
PruningCallback empties the masks down to 25% of the 32 x 32 blocks, and
prints test accuracy and training-step time of the dense and the sparse
model side by side. Then, for each density in a sweep, sparsifies the dense
model by block magnitude, fine-tunes it briefly and records accuracy and step
time, and plots both against density. Nothing is downloaded: the digits
ship with scikit-learn. --quick runs a reduced version (for the tests).
"""

import argparse
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import masked_ops

BLOCK = 32


def data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)


def dense_model(width):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(width, activation="relu", name="hidden_1"),
        keras.layers.Dense(width, activation="relu", name="hidden_2"),
        keras.layers.Dense(10, name="logits"),
    ])
    compile_model(model)
    return model


def compile_model(model, learning_rate=1e-3):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])


def step_ms(model, x, y, batch, reps):
    """Median time of one training step on a batch (the compiled step, after warm-up)."""
    xb, yb = x[:batch], y[:batch]
    for _ in range(3):
        model.train_on_batch(xb, yb)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model.train_on_batch(xb, yb)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def accuracy(model, x, y):
    return float(model.evaluate(x, y, verbose=0)[1])


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run, for the tests")
    parser.add_argument("--plot", metavar="PATH.png", help="save accuracy and speed against density here")
    args = parser.parse_args(argv)
    width, epochs, reps, batch = (256, 2, 5, 128) if args.quick else (1024, 20, 20, 512)
    x_train, x_test, y_train, y_test = data()
    # Training-step time is measured on a batch of this size (repeated digits).
    x_time = np.resize(x_train, (batch, 64))
    y_time = np.resize(y_train, (batch,))

    dense = dense_model(width)
    dense.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    dense_accuracy = accuracy(dense, x_test, y_test)
    dense_ms = step_ms(dense, x_time, y_time, batch, reps)

    sparse = masked_ops.keras.sparsify(dense, block_size=BLOCK, layers=["hidden_1", "hidden_2"])
    compile_model(sparse, 5e-4)
    steps = epochs * int(np.ceil(len(x_train) / 64))
    pruning = masked_ops.keras.PruningCallback(0.25, begin_step=0, end_step=steps // 2, frequency=max(1, steps // 20))
    sparse.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0, callbacks=[pruning])
    sparse_accuracy = accuracy(sparse, x_test, y_test)
    sparse_ms = step_ms(sparse, x_time, y_time, batch, reps)
    densities = masked_ops.keras.densities(sparse)

    print(f"{'':22} {'dense':>10} {'sparse':>10}")
    print(f"{'block density':22} {1.0:>10.2f} {statistics.mean(densities.values()):>10.2f}")
    print(f"{'test accuracy':22} {dense_accuracy:>10.3f} {sparse_accuracy:>10.3f}")
    print(f"{'training step (ms)':22} {dense_ms:>10.2f} {sparse_ms:>10.2f}")
    print(f"{'speedup':22} {'':>10} {dense_ms / sparse_ms:>9.2f}x")

    sweep = []
    for density in (1.0, 0.5, 0.25, 0.1):
        model = masked_ops.keras.sparsify(dense, density=density, block_size=BLOCK, layers=["hidden_1", "hidden_2"])
        compile_model(model, 5e-4)
        model.fit(x_train, y_train, epochs=max(1, epochs // 4), batch_size=64, verbose=0)
        sweep.append((density, accuracy(model, x_test, y_test), dense_ms / step_ms(model, x_time, y_time, batch, reps)))
    print()
    print(f"{'density':>8} {'accuracy':>9} {'speedup':>8}")
    for density, acc, speedup in sweep:
        print(f"{density:>8.2f} {acc:>9.3f} {speedup:>7.2f}x")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        densities_x = [d for d, _, _ in sweep]
        figure, left = plt.subplots(figsize=(6, 4))
        left.plot(densities_x, [a for _, a, _ in sweep], "o-", color="tab:blue", label="test accuracy")
        left.set_xlabel("block density (32 x 32 blocks, hidden layers)")
        left.set_ylabel("test accuracy", color="tab:blue")
        left.invert_xaxis()
        right = left.twinx()
        right.plot(densities_x, [s for _, _, s in sweep], "s--", color="tab:red", label="training-step speedup")
        right.set_ylabel("training-step speedup over dense", color="tab:red")
        left.set_title(f"digits MLP 64-{width}-{width}-10, batch {batch}")
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
