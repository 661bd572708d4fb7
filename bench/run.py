"""Times masked_matmul against the plain-TensorFlow ways of masking a matmul.

For every shape M x K x N, mode, block size and density, a random block-level
mask keeps round(density * blocks) blocks of a [K, N] weight alive, and
four variants compute the product of x [M, K] with the masked weight:

  fused     masked_matmul(x, w, block_mask): skips the dead blocks
  multiply  tf.matmul(x, w * m), m the element-level expansion of the mask
  where     tf.matmul(x, tf.where(m != 0, w, 0))
  dense     tf.matmul(x, w): the full dense product, unmasked

Mode "forward" times y alone; mode "train" times y with dx and dw from a
GradientTape, for a loss sum(y * g) with a fixed random g, so a step's three
matmuls are all in it.

Suites pick the shapes, densities, block sizes and modes; explicit flags
override them:
  quick   what `make bench` runs: 512x1024x1024, densities 1, 0.5, 0.25, 0.1,
          block 32, forward and train
  conv    masked_conv2d's cases: see bench/conv_suite.py
  freeze  freezing weight blocks (grad_mask, BlockFreeze): see bench/freeze_suite.py
  gated   conditional execution (Gated, GatedRows): see bench/gated_suite.py
  matmul  the full sweep: 512x2048x2048, 8x4096x4096 and 4096x1024x4096,
          densities 1, 0.5, 0.25, 0.1, 0.05, blocks 16, 32 and 64, forward and
          train, plus the peak-memory table

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

With --memory, each variant's forward call also runs alone in a fresh process
(block 32, densities 1 and 0.1), which reports how far one call raises the
process's peak resident memory: the output plus any temporaries, so a variant
that builds a masked copy of w shows about one K x N matrix more.
"""

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

# Before TensorFlow is first imported: keep its start-up chatter out of the
# output, this process's and the memory probes' it starts.
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
MIB = 2**20

# Values as they would be typed on the command line, so that a suite's
# defaults and explicit flags go through the same parsing.
SUITES = {
    "quick": {
        "shapes": "512x1024x1024",
        "densities": "1.0,0.5,0.25,0.1",
        "block_sizes": "32",
        "modes": "forward,train",
        "memory": False,
    },
    "matmul": {
        "shapes": "512x2048x2048,8x4096x4096,4096x1024x4096",
        "densities": "1.0,0.5,0.25,0.1,0.05",
        "block_sizes": "16,32,64",
        "modes": "forward,train",
        "memory": True,
    },
}

# The memory table is a yes/no question per variant (does it build a K x N
# temporary?), which one block size and the two ends of the density range answer.
MEMORY_BLOCK_SIZE = "32"
MEMORY_DENSITIES = (1.0, 0.1)
MEMORY_WARMUP_SHAPE = (64, 64, 64)
MEMORY_PROBE_FLAG = "--memory-probe"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Flags left out take the suite's value: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{key}={value}" for key, value in suite.items())
            for name, suite in SUITES.items()
        ),
    )
    # "conv", "freeze" and "gated" are dispatched to their *_suite.py before
    # this parser runs; listed for --help.
    parser.add_argument("--suite", choices=[*SUITES, "conv", "freeze", "gated"], default="quick", help="default: %(default)s")
    parser.add_argument("--shapes", help="comma-separated MxKxN list")
    parser.add_argument("--densities", help="comma-separated fractions of live blocks")
    parser.add_argument("--block-sizes", "--block-size", dest="block_sizes",
                        help="comma-separated block sizes: N (square) or RxC")
    parser.add_argument("--modes", help="comma-separated subset of forward,train")
    parser.add_argument("--reps", type=int, default=15, help=f"timed calls per variant, at least {MIN_REPS}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction,
                        help="also measure each variant's peak extra memory per forward call")
    parser.add_argument("--json", metavar="PATH", help="also write metadata and every timing here")
    parser.add_argument("--plot", metavar="PATH.png", help="also plot speedup over multiply against density")
    args = parser.parse_args(argv)

    for key, value in SUITES[args.suite].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Fewer repetitions make the median little better than a single sample.
    if args.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS}, got {args.reps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be non-negative, got {args.warmup}")
    try:
        args.shapes = [parse_shape(text) for text in args.shapes.split(",")]
        args.densities = [parse_density(text) for text in args.densities.split(",")]
        args.block_sizes = [parse_block_size(text) for text in args.block_sizes.split(",")]
    except ValueError as error:
        parser.error(str(error))
    args.modes = args.modes.split(",")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    return args


def case_suite_parser(description, suite):
    """The arguments every case suite (conv, freeze, gated) takes; the suite
    adds its own, then calls parse_case_suite_args."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--suite", choices=[suite], required=True)
    parser.add_argument("--reps", type=int, default=10, help=f"timed calls per variant, at least {MIN_REPS}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument("--json", metavar="PATH", help="also write every timing here")
    return parser


def parse_case_suite_args(parser, argv):
    """(args, the command line to print beside the table)."""
    args = parser.parse_args(argv)
    if args.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS}, got {args.reps}")
    return args, shlex.join(["python", "bench/run.py", *argv])


def requested_suite(argv):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--suite")
    return parser.parse_known_args(argv)[0].suite


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


def parse_block_size(text):
    """A block size as typed, in canonical form: "32" (square) or "16x64" (rows x columns)."""
    parts = text.strip().lower().split("x")
    if len(parts) not in (1, 2) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"block size must be N or RxC with positive integers, got {text!r}")
    return "x".join(str(int(part)) for part in parts)


def block_dims(block_size):
    """(rows, columns) of a block size in parse_block_size's form."""
    rows, _, cols = block_size.partition("x")
    return int(rows), int(cols or rows)


def shape_name(shape):
    return "x".join(map(str, shape))


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
    """Inputs for one shape, density and block size, the same whichever mode uses them."""
    m_dim, k_dim, n_dim = shape
    rng = np.random.default_rng(SEED)
    block_rows, block_cols = block_dims(block_size)
    block_grid = (-(-k_dim // block_rows), -(-n_dim // block_cols))
    block_mask = random_block_mask(rng, block_grid, density)
    return {
        "x": tf.Variable(rng.standard_normal((m_dim, k_dim), np.float32)),
        "w": tf.Variable(rng.standard_normal((k_dim, n_dim), np.float32)),
        "g": tf.constant(rng.standard_normal((m_dim, n_dim), np.float32)),
        "block_mask": tf.constant(block_mask),
        "m": masked_ops.expand_block_mask(block_mask, (k_dim, n_dim), (block_rows, block_cols)),
        "live_fraction": float(block_mask.mean()),
    }


def products(case, block_size):
    """Each variant's product of x and the masked weight, by name."""
    block_mask, m = case["block_mask"], case["m"]
    return {
        "fused": lambda x, w: masked_ops.masked_matmul(x, w, block_mask, block_size=block_dims(block_size)),
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


def run_case(shape, mode, block_size, density, args):
    case = make_case(shape, density, block_size)
    functions = {
        name: step_function(product, case, mode)
        for name, product in products(case, block_size).items()
    }
    check_fused_matches_multiply({name: functions[name]() for name in ("fused", "multiply")}, shape)
    timings = interleaved_timings(functions, args.reps, args.warmup)
    medians = {name: statistics.median(times) for name, times in timings.items()}
    return {
        "shape": shape_name(shape),
        "mode": mode,
        "block_size": block_size,
        "density": density,
        "live_fraction": case["live_fraction"],
        "median_ms": medians,
        "timings_ms": timings,
        "speedup_vs_multiply": medians["multiply"] / medians["fused"],
        "speedup_vs_where": medians["where"] / medians["fused"],
        "efficiency": case["live_fraction"] * medians["dense"] / medians["fused"],
    }


def run_timing_rows(args):
    """One row per shape, mode, block size and density, with progress on stderr."""
    cases = list(itertools.product(args.shapes, args.modes, args.block_sizes, args.densities))
    rows = []
    for index, (shape, mode, block_size, density) in enumerate(cases, 1):
        start = time.perf_counter()
        rows.append(run_case(shape, mode, block_size, density, args))
        # A full suite runs for many minutes; stdout stays the clean table.
        print(f"[{index}/{len(cases)}] {shape_name(shape)} {mode} block {block_size} "
              f"density {density:g}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return rows


def resident_bytes():
    """The process's current resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident():
    """Restarts the resident high-water mark from the current resident size.

    Without this the mark could still hold a peak from building the inputs
    (numpy buffers copied into TensorFlow and freed), which would hide a
    smaller allocation made by the call.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_resident_bytes():
    """The resident high-water mark, VmHWM in /proc/self/status (kB there).

    Not getrusage's ru_maxrss: that also keeps the peak of whatever this
    process image replaced at exec, the parent benchmark's resident size
    included, and clear_refs does not reset that part.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def memory_probe(shape_text, density_text, block_size_text, variant):
    """In a fresh process: bytes one forward call of `variant` adds to the resident peak."""
    shape, density = parse_shape(shape_text), parse_density(density_text)
    block_size = parse_block_size(block_size_text)
    # The process's first call of a variant also sets up the runtime (thread
    # pools, oneDNN primitives, kernel code paged in); a call on tiny inputs
    # pays for that before the measurement.
    tiny_case = make_case(MEMORY_WARMUP_SHAPE, density, block_size)
    step_function(products(tiny_case, block_size)[variant], tiny_case, "forward")()
    case = make_case(shape, density, block_size)
    forward = step_function(products(case, block_size)[variant], case, "forward")
    # Tracing builds the graph without running it, so the call below is the
    # first run at this size: the one that allocates the output and the op's
    # temporaries.
    forward.get_concrete_function()
    reset_peak_resident()
    base = resident_bytes()
    outputs = forward()
    outputs[0][0, 0].numpy()
    return peak_resident_bytes() - base


def probed_extra_mib(shape, density, variant):
    """Runs memory_probe in a child process and returns its answer in MiB."""
    command = [sys.executable, os.path.abspath(__file__), MEMORY_PROBE_FLAG,
               shape_name(shape), repr(density), str(MEMORY_BLOCK_SIZE), variant]
    # glibc otherwise raises its mmap threshold after the first large free and
    # keeps later freed buffers resident for reuse, so a temporary could land
    # in memory already counted in the base; a fixed threshold sends every
    # large buffer to mmap and back to the system when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return int(result.stdout) / MIB


def memory_rows(args):
    rows = []
    for shape, density in itertools.product(args.shapes, MEMORY_DENSITIES):
        m_dim, k_dim, n_dim = shape
        rows.append({
            "shape": shape_name(shape),
            "block_size": MEMORY_BLOCK_SIZE,
            "density": density,
            "extra_mib": {variant: probed_extra_mib(shape, density, variant) for variant in VARIANTS},
            "dense_k_by_n_mib": k_dim * n_dim * 4 / MIB,
            "output_mib": m_dim * n_dim * 4 / MIB,
        })
    return rows


MEMORY_CAPTION = (
    f"Peak extra memory of one forward call, MiB (block {MEMORY_BLOCK_SIZE}). Measured: how far the "
    "process's resident high-water mark (VmHWM) rises during the first call at this size, each "
    "variant alone in a fresh process, after its inputs are built, its function traced and the "
    "runtime warmed up on tiny inputs. It counts the output (column `y`) and any temporaries, not "
    "memory reused from pools filled earlier; a variant that builds a masked copy of w shows about "
    "one `K x N` more."
)


def markdown_table(header, body, text_columns):
    """A markdown table with aligned columns, ready to paste into a README.

    The first `text_columns` columns read left-aligned, the numbers after them
    right-aligned.
    """
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = [i >= text_columns for i in range(len(header))]

    def format_line(cells):
        padded = (cell.rjust(width) if right else cell.ljust(width)
                  for cell, width, right in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (width + 1) + ":" if right else "-" * (width + 2) for width, right in zip(widths, numeric)
    ) + "|"
    return "\n".join([format_line(header), rule, *map(format_line, body)])


def timing_table(rows):
    header = ["shape", "mode", "block", "density", *(f"{name} ms" for name in VARIANTS),
              "vs multiply", "vs where", "efficiency"]
    body = [
        [row["shape"], row["mode"], str(row["block_size"]), f"{row['density']:g}",
         *(f"{row['median_ms'][name]:.2f}" for name in VARIANTS),
         f"{row['speedup_vs_multiply']:.2f}x", f"{row['speedup_vs_where']:.2f}x",
         f"{row['efficiency']:.2f}"]
        for row in rows
    ]
    return markdown_table(header, body, text_columns=2)


def memory_table(rows):
    header = ["shape", "density", *VARIANTS, "K x N", "y"]
    body = [
        [row["shape"], f"{row['density']:g}",
         *(f"{row['extra_mib'][name]:.1f}" for name in VARIANTS),
         f"{row['dense_k_by_n_mib']:.1f}", f"{row['output_mib']:.1f}"]
        for row in rows
    ]
    return markdown_table(header, body, text_columns=1)


def plot_speedups(rows, path, title):
    """Speedup over multiply against density: a log-log subplot per shape and mode, a line per block."""
    # Only plotting runs need matplotlib; the figure renders to PNG with Agg
    # without touching pyplot's global backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    # Log axes cannot place density 0.
    densities = sorted({row["density"] for row in rows if row["density"] > 0})
    figure = Figure(figsize=(6 * len(modes), 4.5 * len(shapes)), layout="constrained")
    axes_grid = figure.subplots(len(shapes), len(modes), squeeze=False)
    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    for (shape_index, shape), (mode_index, mode) in itertools.product(enumerate(shapes), enumerate(modes)):
        axes = axes_grid[shape_index][mode_index]
        for block_size in sorted({row["block_size"] for row in rows}):
            points = sorted(
                (row["density"], row["speedup_vs_multiply"]) for row in rows
                if (row["shape"], row["mode"], row["block_size"]) == (shape, mode, block_size)
                and row["density"] > 0
            )
            axes.plot(*zip(*points), marker="o", label=f"block {block_size}")
        reference = np.array(densities)
        axes.plot(reference, 1 / reference, "k--", linewidth=1, label="1/density: dense speed per live flop")
        axes.plot(reference, 0.9 / reference, "k:", linewidth=1, label="0.9/density: target")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(densities)
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_major_formatter(plain_numbers)
        # Decades alone leave most speedups between two labels.
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(plain_numbers)
        axes.grid(True, which="both", alpha=0.3)
        axes.set_title(f"M x K x N = {shape}, {mode}")
        axes.set_xlabel("density (fraction of live blocks)")
        axes.set_ylabel("speedup over multiply (x)")
        axes.legend(fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


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


def metadata(command, args, backend):
    return {
        "command": command,
        "suite": args.suite,
        "tensorflow_version": tf.__version__,
        "masked_ops_version": masked_ops.__version__,
        "cpu_backend": backend,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_threads": cpu_threads(),
        "shapes": [shape_name(shape) for shape in args.shapes],
        "densities": args.densities,
        "block_sizes": args.block_sizes,
        "modes": args.modes,
        "reps": args.reps,
        "warmup": args.warmup,
        "seed": SEED,
    }


def main(argv):
    args = parse_args(argv)
    command = shlex.join(["python", "bench/run.py", *argv])
    rows = run_timing_rows(args)
    memory = memory_rows(args) if args.memory else None
    # Asked after the ops have run: the backend is settled at the first op call.
    backend = masked_ops.cpu_backend()
    setting = f"TensorFlow {tf.__version__}, masked_ops {backend} kernels, {cpu_threads()} CPU threads"
    print(f"{command}  # {setting}")
    print(timing_table(rows))
    if memory is not None:
        print()
        print(MEMORY_CAPTION)
        print()
        print(memory_table(memory))
    if args.json:
        results = {**metadata(command, args, backend), "rows": rows}
        if memory is not None:
            results["memory"] = {"measures": MEMORY_CAPTION, "rows": memory}
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
            out.write("\n")
    if args.plot:
        plot_speedups(rows, args.plot, f"masked_matmul speedup over tf.matmul(x, w * m); {setting}")


if __name__ == "__main__":
    # The memory table's child processes come back in here, one per measurement.
    if sys.argv[1:2] == [MEMORY_PROBE_FLAG]:
        print(memory_probe(*sys.argv[2:]))
    elif requested_suite(sys.argv[1:]) == "conv":
        # The conv and freeze suites have cases of their own, not shapes x
        # blocks x densities.
        import conv_suite

        conv_suite.main(sys.argv[1:], sys.modules[__name__])
    elif requested_suite(sys.argv[1:]) == "freeze":
        import freeze_suite

        freeze_suite.main(sys.argv[1:], sys.modules[__name__])
    elif requested_suite(sys.argv[1:]) == "gated":
        import gated_suite

        gated_suite.main(sys.argv[1:], sys.modules[__name__])
    else:
        main(sys.argv[1:])
