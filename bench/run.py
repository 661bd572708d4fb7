"""Times masked_matmul against the plain-TensorFlow ways of masking a matmul.

For every shape M x K x N, mode and density, a random block-level mask keeps
round(density * blocks) blocks of a [K, N] weight alive, and four variants
compute the product of x [M, K] with the masked weight:

  fused     masked_matmul(x, w, block_mask): skips the dead blocks
  multiply  tf.matmul(x, w * m), m the element-level expansion of the mask
  where     tf.matmul(x, tf.where(m != 0, w, 0))
  dense     tf.matmul(x, w): the full dense product, unmasked

Mode "forward" times y alone; mode "train" times y with dx and dw from a
GradientTape, for a loss sum(y * g) with a fixed random g, so a step's three
matmuls are all in it.

Each variant is a tf.function, traced and checked against `multiply` once, then
warmed up. Timing interleaves the variants within each repetition, rotating
their order from one repetition to the next, so drift in a noisy, shared
machine's speed lands on all of them alike instead of on whichever ran last.
Each call is timed from the call until a slice of every output reaches numpy,
and a variant's time is the median over repetitions, which shrugs off the odd
call slowed by another process.

Ratios in the table:
  vs multiply, vs where  multiply ms / fused ms, where ms / fused ms
  efficiency             live fraction * dense ms / fused ms, where the live
                         fraction is the share of blocks kept: 1.0 means the
                         fused op does its live blocks' work as fast as the
                         dense matmul does the whole product's.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

# Before TensorFlow is first imported: keep its start-up chatter out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import masked_ops  # noqa: E402

# Every case traces its own tf.functions on purpose; TensorFlow's retracing
# warning about that would only bury the table.
tf.get_logger().setLevel("ERROR")

SEED = 0
MIN_REPS = 10
MODES = ("forward", "train")
VARIANTS = ("fused", "multiply", "where", "dense")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="512x1024x1024", help="comma-separated MxKxN list")
    parser.add_argument("--densities", default="1.0,0.5,0.25,0.1", help="fractions of live blocks")
    parser.add_argument("--block-size", type=int, default=32, help="side of the square blocks")
    parser.add_argument("--reps", type=int, default=15, help=f"timed calls per variant, at least {MIN_REPS}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of forward,train")
    parser.add_argument("--json", metavar="PATH", help="also write metadata and every timing here")
    args = parser.parse_args(argv)

    # Fewer repetitions make the median little better than a single sample.
    if args.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS}, got {args.reps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be non-negative, got {args.warmup}")
    if args.block_size < 1:
        parser.error(f"--block-size must be positive, got {args.block_size}")
    try:
        args.shapes = [parse_shape(text) for text in args.shapes.split(",")]
        args.densities = [parse_density(text) for text in args.densities.split(",")]
    except ValueError as error:
        parser.error(str(error))
    args.modes = args.modes.split(",")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    return args


def parse_shape(text):
    parts = text.strip().lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"shape must be MxKxN with positive integers, got {text!r}")
    return tuple(int(part) for part in parts)


def parse_density(text):
    error = ValueError(f"density must be a number in [0, 1], got {text!r}")
    try:
        density = float(text)
    except ValueError:
        raise error from None
    # Written so that NaN fails it too.
    if not 0.0 <= density <= 1.0:
        raise error
    return density


def random_block_mask(rng, block_grid, density):
    """float32 block mask with exactly round(density * blocks) ones, at least one if density > 0."""
    total = block_grid[0] * block_grid[1]
    live = round(density * total)
    if density > 0:
        live = max(live, 1)
    flat = np.zeros(total, np.float32)
    flat[rng.permutation(total)[:live]] = 1.0
    return flat.reshape(block_grid)


def make_case(shape, density, block_size):
    """Inputs for one shape and density, the same whichever mode uses them."""
    m_dim, k_dim, n_dim = shape
    rng = np.random.default_rng(SEED)
    block_grid = (-(-k_dim // block_size), -(-n_dim // block_size))
    block_mask = random_block_mask(rng, block_grid, density)
    return {
        "x": tf.Variable(rng.standard_normal((m_dim, k_dim), np.float32)),
        "w": tf.Variable(rng.standard_normal((k_dim, n_dim), np.float32)),
        "g": tf.constant(rng.standard_normal((m_dim, n_dim), np.float32)),
        "block_mask": tf.constant(block_mask),
        "m": masked_ops.expand_block_mask(block_mask, (k_dim, n_dim), block_size),
        "live_fraction": float(block_mask.mean()),
    }


def products(case, block_size):
    """Each variant's product of x and the masked weight, by name."""
    block_mask, m = case["block_mask"], case["m"]
    return {
        "fused": lambda x, w: masked_ops.masked_matmul(x, w, block_mask, block_size=block_size),
        "multiply": lambda x, w: tf.matmul(x, w * m),
        "where": lambda x, w: tf.matmul(x, tf.where(m != 0, w, tf.zeros_like(w))),
        "dense": lambda x, w: tf.matmul(x, w),
    }


def step_function(product, case, mode):
    """A tf.function returning the mode's outputs: (y,) or (y, dx, dw)."""
    x, w, g = case["x"], case["w"], case["g"]

    @tf.function
    def forward():
        return (product(x, w),)

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            y = product(x, w)
            loss = tf.reduce_sum(y * g)
        dx, dw = tape.gradient(loss, [x, w])
        return y, dx, dw

    return forward if mode == "forward" else train


def check_fused_matches_multiply(outputs, shape):
    """Raises if the fused outputs differ from the multiply ones beyond float32 rounding."""
    m_dim, k_dim, n_dim = shape
    # y sums over K terms, dx over N, dw over M; rounding grows like the root of that.
    for name, fused, reference, summed in zip(
        ("y", "dx", "dw"), outputs["fused"], outputs["multiply"], (k_dim, n_dim, m_dim)
    ):
        np.testing.assert_allclose(
            fused.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4 * np.sqrt(summed),
            err_msg=f"fused {name} differs from multiply for shape {shape}",
        )


def timed_call(function):
    """Milliseconds from the call until every output has been computed."""
    start = time.perf_counter()
    outputs = function()
    # A value reaching numpy cannot precede the kernel that computes it.
    for output in outputs:
        output[0, 0].numpy()
    return (time.perf_counter() - start) * 1e3


def interleaved_timings(functions, reps, warmup):
    """Per-variant lists of `reps` call times in ms, after `warmup` untimed calls each."""
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            timed_call(functions[name])
    timings = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(timed_call(functions[name]))
    return timings


def run_case(shape, mode, density, args):
    case = make_case(shape, density, args.block_size)
    functions = {
        name: step_function(product, case, mode)
        for name, product in products(case, args.block_size).items()
    }
    check_fused_matches_multiply({name: functions[name]() for name in ("fused", "multiply")}, shape)
    timings = interleaved_timings(functions, args.reps, args.warmup)
    medians = {name: statistics.median(times) for name, times in timings.items()}
    return {
        "shape": "x".join(map(str, shape)),
        "mode": mode,
        "density": density,
        "live_fraction": case["live_fraction"],
        "median_ms": medians,
        "timings_ms": timings,
        "speedup_vs_multiply": medians["multiply"] / medians["fused"],
        "speedup_vs_where": medians["where"] / medians["fused"],
        "efficiency": case["live_fraction"] * medians["dense"] / medians["fused"],
    }


def format_table(rows):
    """A markdown table with aligned columns, ready to paste into a README."""
    header = ["shape", "mode", "density", *(f"{name} ms" for name in VARIANTS),
              "vs multiply", "vs where", "efficiency"]
    body = [
        [row["shape"], row["mode"], f"{row['density']:g}",
         *(f"{row['median_ms'][name]:.2f}" for name in VARIANTS),
         f"{row['speedup_vs_multiply']:.2f}x", f"{row['speedup_vs_where']:.2f}x",
         f"{row['efficiency']:.2f}"]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    # Text columns read left-aligned, numbers right-aligned.
    numeric = [i >= 2 for i in range(len(header))]

    def format_line(cells):
        padded = (cell.rjust(width) if right else cell.ljust(width)
                  for cell, width, right in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (width + 1) + ":" if right else "-" * (width + 2) for width, right in zip(widths, numeric)
    ) + "|"
    return "\n".join([format_line(header), rule, *map(format_line, body)])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_threads():
    """CPUs this process may run on, which TensorFlow's default thread pools size to."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def metadata(command, args):
    return {
        "command": command,
        "tensorflow_version": tf.__version__,
        "masked_ops_version": masked_ops.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_threads": cpu_threads(),
        "block_size": args.block_size,
        "reps": args.reps,
        "warmup": args.warmup,
        "seed": SEED,
    }


def main(argv):
    args = parse_args(argv)
    command = shlex.join(["python", "bench/run.py", *argv])
    rows = [
        run_case(shape, mode, density, args)
        for shape in args.shapes
        for mode in args.modes
        for density in args.densities
    ]
    print(f"{command}  # TensorFlow {tf.__version__}, {cpu_threads()} CPU threads")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**metadata(command, args), "rows": rows}, out, indent=2)
            out.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
