"""`python bench/run.py --suite conv`: masked_conv2d against tf.nn.conv2d baselines.

Cases, all NHWC float32 with x = [8, 56, 56, 256], stride 1, SAME:
  channel  3x3 and 1x1 filters 256 -> 256 with a random channel-block mask
           (32 x 32 channels) of density d: fused masked_conv2d(x, w, block
           mask) against baseline tf.nn.conv2d(x, w * m);
  spatial  3x3 filters with a random output mask keeping a fraction a of the
           8x8 output tiles: fused masked_conv2d(x, w, output_mask=o)
           against baseline tf.nn.conv2d(x, w) * o;
  both     d = 0.5 and a = 0.25 together, against tf.nn.conv2d(x, w * m) * o.
`dense` is tf.nn.conv2d(x, w), unmasked. Modes, timing and interleaving are
those of the matmul suites (see run.py); target = 0.8 / (d * a).
"""

import json
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

import masked_ops

BATCH, SIZE, CHANNELS = 8, 56, 256
CHANNEL_BLOCK = 32
TILE = 8
SEED = 0
# (kind, kernel size, channel density d, active tile fraction a)
CASES = (
    [("channel", 3, d, 1.0) for d in (1.0, 0.5, 0.25, 0.1)]
    + [("channel", 1, d, 1.0) for d in (1.0, 0.5, 0.25, 0.1)]
    + [("spatial", 3, 1.0, a) for a in (1.0, 0.5, 0.25, 0.1)]
    + [("both", 3, 0.5, 0.25)]
)


def make_case(kernel, density, active, rng):
    blocks = CHANNELS // CHANNEL_BLOCK
    live = rng.permutation(blocks * blocks) < round(density * blocks * blocks)
    block_mask = live.reshape(blocks, blocks).astype(np.float32)
    per_tap = np.repeat(np.repeat(block_mask, CHANNEL_BLOCK, 0), CHANNEL_BLOCK, 1)
    tiles = SIZE // TILE
    active_tiles = (rng.permutation(BATCH * tiles * tiles) < round(active * BATCH * tiles * tiles))
    output_mask = np.repeat(np.repeat(active_tiles.reshape(BATCH, tiles, tiles), TILE, 1), TILE, 2)
    return {
        "x": tf.Variable(rng.standard_normal((BATCH, SIZE, SIZE, CHANNELS), np.float32)),
        "w": tf.Variable(rng.standard_normal((kernel, kernel, CHANNELS, CHANNELS), np.float32) / (kernel * 16)),
        "g": tf.constant(rng.standard_normal((BATCH, SIZE, SIZE, CHANNELS), np.float32)),
        "block_mask": tf.constant(block_mask),
        "m": tf.constant(np.broadcast_to(per_tap, (kernel, kernel, CHANNELS, CHANNELS)).copy()),
        "o": tf.constant(output_mask.astype(np.float32)),
    }


def products(case, kind):
    block_mask, m, o = case["block_mask"], case["m"], case["o"]
    use_mask = kind in ("channel", "both")
    use_tiles = kind in ("spatial", "both")

    def fused(x, w):
        return masked_ops.masked_conv2d(
            x, w, block_mask if use_mask else None, padding="SAME",
            output_mask=o if use_tiles else None, channel_block=CHANNEL_BLOCK, tile=TILE)

    def baseline(x, w):
        y = tf.nn.conv2d(x, w * m if use_mask else w, 1, "SAME")
        return y * o[..., None] if use_tiles else y

    return {"fused": fused, "baseline": baseline, "dense": lambda x, w: tf.nn.conv2d(x, w, 1, "SAME")}


def main(argv, run):
    parser = run.case_suite_parser(__doc__.splitlines()[0], "conv")
    parser.add_argument("--modes", default="forward,train")
    parser.add_argument("--kernels", default="3,1", help="filter sizes to run, of 3 and 1")
    args, command = run.parse_case_suite_args(parser, argv)
    kernels = {int(size) for size in args.kernels.split(",")}
    runs = [(case, mode) for case in CASES if case[1] in kernels for mode in args.modes.split(",")]
    rows = []
    for index, ((kind, kernel, density, active), mode) in enumerate(runs, 1):
        start = time.perf_counter()
        case = make_case(kernel, density, active, np.random.default_rng(SEED))
        functions = {name: run.step_function(product, case, mode) for name, product in products(case, kind).items()}
        outputs = {name: functions[name]() for name in ("fused", "baseline")}
        for fused_out, baseline_out in zip(outputs["fused"], outputs["baseline"]):
            np.testing.assert_allclose(fused_out.numpy(), baseline_out.numpy(), rtol=1e-3, atol=1e-2)
        timings = run.interleaved_timings(functions, args.reps, args.warmup)
        medians = {name: statistics.median(times) for name, times in timings.items()}
        rows.append({
            "kind": kind, "kernel": f"{kernel}x{kernel}", "mode": mode, "density": density, "active": active,
            "median_ms": medians, "timings_ms": timings,
            "speedup": medians["baseline"] / medians["fused"], "target": 0.8 / (density * active),
        })
        print(f"[{index}/{len(runs)}] {kind} {kernel}x{kernel} {mode} "
              f"d={density:g} a={active:g}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    setting = (f"TensorFlow {tf.__version__}, masked_ops {masked_ops.cpu_backend()} kernels, "
               f"{run.cpu_threads()} CPU threads")
    print(f"{command}  # {setting}")
    header = ["case", "filter", "mode", "d", "a", "fused ms", "baseline ms", "dense ms", "speedup", "target"]
    body = [[row["kind"], row["kernel"], row["mode"], f"{row['density']:g}", f"{row['active']:g}",
             *(f"{row['median_ms'][name]:.1f}" for name in ("fused", "baseline", "dense")),
             f"{row['speedup']:.2f}x", f"{row['target']:.2f}x"] for row in rows]
    print(run.markdown_table(header, body, text_columns=3))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "setting": setting, "rows": rows}, out, indent=2)
            out.write("\n")
