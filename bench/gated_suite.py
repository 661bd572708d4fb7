"""`python bench/run.py --suite gated`: what conditional execution costs.

A block of two 1024-wide Dense layers (residual) on x = [512, 1024], timed as
a training step (forward, gradients for x and the weights). Gated: with the
gate off against the identity step (same loss on x itself), with it on
against the plain block. GatedRows: a fraction of the rows on, against the
plain block on every row. Interleaved, warmed up, medians, as the other
suites.
"""

import json
import statistics
import sys

import keras
import numpy as np
import tensorflow as tf

import masked_ops
from masked_ops.layers import Gated, GatedRows

ROWS, WIDTH = 512, 1024


class Residual(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(WIDTH, activation="relu")
        self.second = keras.layers.Dense(WIDTH)

    def call(self, x):
        return x + self.second(self.first(x))


def step(function, x, variables):
    @tf.function
    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(function(x) ** 2)
        grads = tape.gradient(loss, [x, *variables])
        return tf.reshape(loss, (1, 1)), grads[0]

    return run


def main(argv, run):
    parser = run.case_suite_parser(__doc__.splitlines()[0], "gated")
    args, command = run.parse_case_suite_args(parser, argv)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((ROWS, WIDTH)).astype(np.float32))
    block = Residual()
    block(x)
    gated, rows = Gated(block), GatedRows(block)
    variables = block.trainable_variables
    cases = [("Gated, gate off", "identity", step(lambda v: gated(v, tf.constant(False)), x, variables),
              step(tf.identity, x, [])),
             ("Gated, gate on", "block", step(lambda v: gated(v, tf.constant(True)), x, variables),
              step(block, x, variables))]
    for fraction in (0.0, 0.25, 0.5, 1.0):
        gate = tf.constant(rng.permutation(ROWS) < round(fraction * ROWS))
        cases.append((f"GatedRows, {fraction:g} of rows on", "block",
                      step(lambda v, gate=gate: rows(v, gate), x, variables), step(block, x, variables)))
    results = []
    for name, baseline_name, fused, baseline in cases:
        timings = run.interleaved_timings({"gated": fused, "baseline": baseline}, args.reps, args.warmup)
        medians = {key: statistics.median(values) for key, values in timings.items()}
        results.append({"case": name, "baseline": baseline_name, "median_ms": medians,
                        "ratio": medians["gated"] / medians["baseline"]})
        print(f"{name}: {medians['gated']:.2f} ms", file=sys.stderr, flush=True)
    setting = f"TensorFlow {tf.__version__}, masked_ops {masked_ops.cpu_backend()} kernels, {run.cpu_threads()} CPU threads"
    print(f"{command}  # {setting}")
    body = [[r["case"], r["baseline"], f"{r['median_ms']['gated']:.2f}", f"{r['median_ms']['baseline']:.2f}",
             f"{r['ratio']:.2f}"] for r in results]
    print(run.markdown_table(["case", "baseline", "gated ms", "baseline ms", "gated / baseline"], body, text_columns=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "setting": setting, "rows": results}, out, indent=2)
            out.write("\n")
