"""`python bench/run.py --suite freeze`: freezing weight blocks against the usual recipe.

A fraction f of the weight blocks (32 x 32, random) trains; the rest is frozen.
Cases, float32:
  dense  three 2048 -> 2048 layers with relu, batch 512;
  conv   one 3x3 conv 256 -> 256 over x = [8, 56, 56, 256], SAME.
Phases:
  dw    the weight-gradient phase alone (each layer's x^T dy, or the conv's
        filter gradient): fused = the masked ops' weight-gradient kernels with
        grad_mask (frozen blocks never computed); baseline = the dense
        gradient times the mask, as the usual recipe gets it;
  step  a whole training step with Adam (the forward pass, the gradients for
        x and the weights, the update): fused = masked_matmul /
        masked_conv2d without a weight mask and with grad_mask (what
        MaskedDense / MaskedConv2D(use_mask=False) run: TensorFlow's forward
        and input gradient, the masked weight gradient), then
        BlockFreeze(Adam); baseline = tf.matmul / tf.nn.conv2d, the full
        backward, grads * mask, then Adam (which still moves frozen weights).
Timing interleaves fused and baseline as the other suites do; target = 0.8 / f
for the dw phase; the step's speedup is reported, without a target.
"""

import json
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import masked_ops
from masked_ops.ops import _ops
from masked_ops.optimizers import BlockFreeze

DENSE_WIDTH, DENSE_BATCH, DENSE_LAYERS = 2048, 512, 3
CONV_SHAPE, CONV_CHANNELS = (8, 56, 56), 256
BLOCK = 32
FRACTIONS = (1.0, 0.5, 0.25, 0.1)
SEED = 0
CONV_ATTRS = {
    "strides": [1, 1], "dilations": [1, 1], "padding": "SAME", "explicit_paddings": [],
    "in_channel_block": BLOCK, "out_channel_block": BLOCK, "tile_height": 8, "tile_width": 8,
    "use_output_mask": False,
}


def block_mask(rng, grid, fraction):
    live = rng.permutation(grid[0] * grid[1]) < round(fraction * grid[0] * grid[1])
    return live.reshape(grid).astype(np.float32)


def expand(mask, shape):
    per_matrix = np.repeat(np.repeat(mask, BLOCK, 0), BLOCK, 1)[: shape[-2], : shape[-1]]
    return np.broadcast_to(per_matrix, shape).copy()


def dense_case(fraction, rng):
    grid = (DENSE_WIDTH // BLOCK, DENSE_WIDTH // BLOCK)
    shape = (DENSE_WIDTH, DENSE_WIDTH)
    weights = [keras.Variable(rng.standard_normal(shape).astype(np.float32) / 64) for _ in range(DENSE_LAYERS)]
    grad_masks = [block_mask(rng, grid, fraction) for _ in range(DENSE_LAYERS)]
    element_masks = [tf.constant(expand(m, shape)) for m in grad_masks]
    x = tf.constant(rng.standard_normal((DENSE_BATCH, DENSE_WIDTH)).astype(np.float32))
    target = tf.constant(rng.standard_normal((DENSE_BATCH, DENSE_WIDTH)).astype(np.float32))
    # The phase's inputs: each layer's input and output gradient, fixed.
    layer_inputs = [tf.constant(rng.standard_normal((DENSE_BATCH, DENSE_WIDTH)).astype(np.float32))
                    for _ in range(DENSE_LAYERS)]
    layer_grads = [tf.constant(rng.standard_normal((DENSE_BATCH, DENSE_WIDTH)).astype(np.float32))
                   for _ in range(DENSE_LAYERS)]

    def network(product):
        h = x
        for index, w in enumerate(weights):
            h = product(h, w, index)
            if index + 1 < DENSE_LAYERS:
                h = tf.nn.relu(h)
        return tf.reduce_sum(h * target)

    fused_optimizer = BlockFreeze(keras.optimizers.Adam(1e-4), list(zip(weights, grad_masks)), block_size=BLOCK)
    baseline_optimizer = keras.optimizers.Adam(1e-4)

    # Each step returns its loss (so the whole forward pass runs) and the
    # gradient for x (as the layers below would need it).
    @tf.function
    def fused_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = network(lambda h, w, i: masked_ops.masked_matmul(h, w, block_size=BLOCK, grad_mask=grad_masks[i]))
        dx, *grads = tape.gradient(loss, [x, *weights])
        fused_optimizer.apply(grads, weights)
        return tf.reshape(loss, (1, 1)), dx

    @tf.function
    def baseline_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = network(lambda h, w, i: tf.matmul(h, w))
        dx, *grads = tape.gradient(loss, [x, *weights])
        baseline_optimizer.apply([g * m for g, m in zip(grads, element_masks)], weights)
        return tf.reshape(loss, (1, 1)), dx

    @tf.function
    def fused_dw():
        return tuple(_ops.masked_ops_masked_matmul_grad_weight(a, g, m, block_rows=BLOCK, block_cols=BLOCK)
                     for a, g, m in zip(layer_inputs, layer_grads, grad_masks))

    @tf.function
    def baseline_dw():
        return tuple(tf.matmul(a, g, transpose_a=True) * m
                     for a, g, m in zip(layer_inputs, layer_grads, element_masks))

    return {"dw": (fused_dw, baseline_dw), "step": (fused_step, baseline_step)}


def conv_case(fraction, rng):
    grid = (CONV_CHANNELS // BLOCK, CONV_CHANNELS // BLOCK)
    shape = (3, 3, CONV_CHANNELS, CONV_CHANNELS)
    w = keras.Variable(rng.standard_normal(shape).astype(np.float32) / 48)
    grad_mask = block_mask(rng, grid, fraction)
    element = tf.constant(expand(grad_mask, shape))
    x = tf.constant(rng.standard_normal((*CONV_SHAPE, CONV_CHANNELS)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((*CONV_SHAPE, CONV_CHANNELS)).astype(np.float32))
    no_output_mask = tf.zeros([0], tf.bool)
    fused_optimizer = BlockFreeze(keras.optimizers.Adam(1e-4), [(w, grad_mask)], block_size=BLOCK)
    baseline_optimizer = keras.optimizers.Adam(1e-4)

    @tf.function
    def fused_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = masked_ops.masked_conv2d(x, w, padding="SAME", channel_block=BLOCK, grad_mask=grad_mask)
            loss = tf.reduce_sum(y * dy)
        dx, grad = tape.gradient(loss, [x, w])
        fused_optimizer.apply([grad], [w])
        return tf.reshape(loss, (1, 1)), dx[0]

    @tf.function
    def baseline_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME") * dy)
        dx, grad = tape.gradient(loss, [x, w])
        baseline_optimizer.apply([grad * element], [w])
        return tf.reshape(loss, (1, 1)), dx[0]

    @tf.function
    def fused_dw():
        return (_ops.masked_ops_masked_conv2d_grad_filter(x, w.value, grad_mask, no_output_mask, dy, **CONV_ATTRS)[0, 0],)

    @tf.function
    def baseline_dw():
        grad = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=shape, out_backprop=dy, strides=[1, 1, 1, 1],
                                               padding="SAME")
        return ((grad * element)[0, 0],)

    return {"dw": (fused_dw, baseline_dw), "step": (fused_step, baseline_step)}


CASES = {"dense": dense_case, "conv": conv_case}


def main(argv, run):
    parser = run.case_suite_parser(__doc__.splitlines()[0], "freeze")
    parser.add_argument("--cases", default="dense,conv")
    args, command = run.parse_case_suite_args(parser, argv)
    rows = []
    for name in args.cases.split(","):
        for fraction in FRACTIONS:
            start = time.perf_counter()
            phases = CASES[name](fraction, np.random.default_rng(SEED))
            for phase, (fused, baseline) in phases.items():
                timings = run.interleaved_timings({"fused": fused, "baseline": baseline}, args.reps, args.warmup)
                medians = {variant: statistics.median(times) for variant, times in timings.items()}
                rows.append({
                    "case": name, "trainable": fraction, "phase": phase, "median_ms": medians,
                    "timings_ms": timings, "speedup": medians["baseline"] / medians["fused"],
                    "target": 0.8 / fraction if phase == "dw" else None,
                })
            print(f"{name} f={fraction:g}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    setting = (f"TensorFlow {tf.__version__}, masked_ops {masked_ops.cpu_backend()} kernels, "
               f"{run.cpu_threads()} CPU threads")
    print(f"{command}  # {setting}")
    header = ["case", "trainable f", "phase", "fused ms", "baseline ms", "speedup", "target"]
    body = [[row["case"], f"{row['trainable']:g}", row["phase"], f"{row['median_ms']['fused']:.1f}",
             f"{row['median_ms']['baseline']:.1f}", f"{row['speedup']:.2f}x",
             "-" if row["target"] is None else f"{row['target']:.2f}x"] for row in rows]
    print(run.markdown_table(header, body, text_columns=3))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "setting": setting, "rows": rows}, out, indent=2)
            out.write("\n")
