"""The CUDA kernels against cuBLAS and cuDNN, on a machine with a GPU.

Runs through the TensorFlow-free harness (tests/gpu/harness.py) with PyTorch
CUDA tensors. matmul: fused = the harness's block-sparse product with a
random block mask of the given density; dense = torch.matmul(x, w * m),
cuBLAS on the masked weight, the baseline the issue names. conv (--conv):
x = [8, 56, 56, 256], 3x3 filters 256 -> 256, SAME, against
torch.nn.functional.conv2d (cuDNN) on the masked filters, with channel-block
densities and output-tile fractions, and a late layer with few output tiles
(x = [8, 7, 7, 512], 512 -> 512) at channel-block densities; cuDNN gets its
best case, channels-last tensors (our kernels' NHWC) and its algorithms
autotuned per shape (cudnn.benchmark), since with its heuristics alone its
time changed by up to 1.8x from one process to the next. Forward alone, and forward plus both
gradients ("train"); with --modes grad_input / grad_weight one gradient
alone (the conv's against cuDNN's own backward call for it, torch.nn.grad,
dy through the output mask first). Each pair is timed interleaved with CUDA
events after warm-up; the median of --reps repetitions is reported.
--conv-only skips the matmul rows.

Precisions: fp32 (CUDA cores on both sides: PyTorch's TF32 switches off),
tf32 (float32 tensors, TF32 tensor cores on both sides: what TensorFlow does
by default on Ampere and later) and bf16 (tensor cores, float accumulators).
"fused" is the pipelined tile for every product. On a Hopper GPU with a
harness built for sm_90a, the bf16 rows are also timed with every product
that has a warpgroup (wgmma) kernel on it (the three matmul products, the
conv forward), in the same interleaved set ("wgmma" columns). The kernels'
default there takes the warpgroup tile for the matmul forward product
alone: a matmul forward row's "wgmma" time, and for train rows the
pipelined dx and dW.

  make gpu-test                       # builds build/gpu/libmasked_ops_cuda_harness.so
  python3 bench/gpu.py --conv --json bench/results/gpu.json
  python3 bench/gpu.py --summary bench/results/gpu.json   # the README's tables (no GPU needed)
"""

import argparse
import json
import math
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "gpu"))
from harness import Harness  # noqa: E402

torch = None  # imported by main(), so that --summary runs without PyTorch
HARNESS = None  # the harness under test, loaded by main()
WARPGROUP = False  # whether the device runs the warpgroup (wgmma) tile: then timed too
BASELINE_WARPGROUP = False  # whether the baseline harness has it too: then timed too
TALL = False  # whether the matmul rows are timed on the warpgroup tile with tall tiles too (--tall)


def precision(name):
    """(tensor dtype, tensor cores on both sides) of a precision's name."""
    return {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, True)}[name]


def set_baseline_tf32(allowed):
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def timed(function, reps, warmup):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def interleaved(functions, reps, warmup):
    """Medians (ms) of functions {name: callable} timed in turn, rep after
    rep, each warmed up before its first timing."""
    times = {name: [] for name in functions}
    for _ in range(reps):
        for name, function in functions.items():
            times[name] += timed(function, 1, warmup if not times[name] else 0)
    return {name: statistics.median(values) for name, values in times.items()}


def with_warpgroup(fused, harness, tall=False):
    """fused(harness) with every product that has a warpgroup (wgmma) kernel
    on it for the call (the pipelined tile otherwise), in tall tiles where
    `tall`."""
    harness.set_warpgroup_products("all")
    harness.set_warpgroup_tall_tiles(tall)
    try:
        fused(harness)
    finally:
        harness.set_warpgroup_products("none")
        harness.set_warpgroup_tall_tiles(False)


def timed_row(fused, dense, baseline, reps, warmup, warpgroup=False, tall=False):
    """(medians, speedups) of fused(harness) against dense, against
    fused(baseline) where a baseline harness is given, and with the
    warpgroup tile on where `warpgroup` (speedup_warpgroup: over dense;
    with a baseline that has the tile, its warpgroup time too; where `tall`
    also in tall tiles, speedup_warpgroup_tall)."""
    functions = {"fused": lambda: fused(HARNESS), "dense": dense}
    if baseline is not None:
        functions["baseline"] = lambda: fused(baseline)
    if warpgroup:
        functions["warpgroup"] = lambda: with_warpgroup(fused, HARNESS)
        if tall:
            functions["warpgroup_tall"] = lambda: with_warpgroup(fused, HARNESS, tall=True)
        if baseline is not None and BASELINE_WARPGROUP:
            functions["baseline_warpgroup"] = lambda: with_warpgroup(fused, baseline)
    medians = interleaved(functions, reps, warmup)
    speedups = {"speedup": medians["dense"] / medians["fused"]}
    if baseline is not None:
        speedups["over_baseline"] = medians["baseline"] / medians["fused"]
    if warpgroup:
        speedups["speedup_warpgroup"] = medians["dense"] / medians["warpgroup"]
        if "warpgroup_tall" in medians:
            speedups["speedup_warpgroup_tall"] = medians["dense"] / medians["warpgroup_tall"]
        if "baseline_warpgroup" in medians:
            speedups["warpgroup_over_baseline"] = medians["baseline_warpgroup"] / medians["warpgroup"]
    return medians, speedups


def kernel_family(pipelined, tensor_cores):
    return "pipelined" if pipelined else "wmma" if tensor_cores else "cuda-cores"


MATMUL_MODES = ("forward", "grad_input", "grad_weight", "train")


def products_of(mode):
    """The products a mode times: one of them, or all three ("train")."""
    return ("forward", "grad_input", "grad_weight") if mode == "train" else (mode,)


def case(shape, block, density, precision_name, mode, reps, warmup, baseline=None):
    dtype, tensor_cores = precision(precision_name)
    set_baseline_tf32(tensor_cores)
    m, k, n = shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    grid = (math.ceil(k / block), math.ceil(n / block))
    live = torch.randperm(grid[0] * grid[1], generator=generator) < round(density * grid[0] * grid[1])
    block_mask = live.reshape(grid).float().cuda()
    element = block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:k, :n].to(dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(k, n, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    y, dx, dw = (torch.empty(s, device="cuda", dtype=dtype) for s in ((m, n), (m, k), (k, n)))

    operands = {"forward": (x, w, y), "grad_input": (dy, w, dx), "grad_weight": (x, dy, dw)}
    products = products_of(mode)

    def fused(harness):
        for product in products:
            a, b, out = operands[product]
            harness.run(product, a, b, block_mask, "block", (block, block), shape, out, tensor_cores)

    def dense():
        w_masked = w * element if "forward" in products or "grad_input" in products else None
        if "forward" in products:
            torch.matmul(x, w_masked, out=y)
        if "grad_input" in products:
            torch.matmul(dy, w_masked.T, out=dx)
        if "grad_weight" in products:
            torch.mul(torch.matmul(x.T, dy), element, out=dw)

    medians, speedups = timed_row(fused, dense, baseline, reps, warmup,
                                  warpgroup=WARPGROUP and dtype in (torch.float16, torch.bfloat16), tall=TALL)
    kernels = {product: kernel_family(
        HARNESS.uses_pipeline(product, dtype, shape, (block, block), "block", tensor_cores),
        HARNESS.uses_tensor_cores(product, dtype, shape, (block, block), tensor_cores)) for product in products_of(mode)}
    return {"shape": list(shape), "block": block, "density": density, "precision": precision_name, "mode": mode,
            "median_ms": medians, **speedups, "target": (0.7 if block <= 32 else 0.8) / density, "kernels": kernels}


# (batch, size, channels, output tile): the conv layers timed, with their
# (density, active fraction) pairs: a ResNet stage-4 layer at batch 8 (16
# output tiles of 128 x 128: the forward splits its lists; timed first, as
# it is quick and a run cut short keeps it), and a stage-2 one.
CONV_LAYERS = {(8, 7, 512, 7): ((1.0, 1.0), (0.5, 1.0), (0.25, 1.0)),
               (8, 56, 256, 8): ((1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (0.1, 1.0), (1.0, 0.25), (1.0, 0.1),
                                 (0.5, 0.25))}
FIRST_LAYER = [8, 56, 56, 256]  # results from before the layers were recorded timed it alone


def conv_case(layer, density, active, precision_name, mode, reps, warmup, baseline=None):
    dtype, tensor_cores = precision(precision_name)
    set_baseline_tf32(tensor_cores)
    n, size, channels, tile = layer
    block = 32
    generator = torch.Generator(device="cpu").manual_seed(0)
    grid = channels // block
    live = torch.randperm(grid * grid, generator=generator) < round(density * grid * grid)
    block_mask = live.reshape(grid, grid).float().cuda()
    per_tap = block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    tiles = (torch.rand(n, size // tile, size // tile, generator=generator) < active).float()
    output_mask = tiles.repeat_interleave(tile, 1).repeat_interleave(tile, 2).cuda()
    x = torch.randn(n, size, size, channels, device="cuda", dtype=dtype)
    f = torch.randn(3, 3, channels, channels, device="cuda", dtype=dtype) / 48
    dy = torch.randn(n, size, size, channels, device="cuda", dtype=dtype)
    y, dx, df = torch.empty_like(dy), torch.empty_like(x), torch.empty_like(f)
    geometry = (n, size, size, channels, 3, 3, channels, 1, 1, 1, 1, 1, 1, size, size, block, block, tile, tile)
    o = output_mask if active < 1 else None
    operands = {"forward": (x, f, y), "grad_input": (dy, f, dx), "grad_weight": (x, dy, df)}

    def fused(harness):
        for product in products_of(mode):
            a, b, out = operands[product]
            harness.conv2d(product, a, b, block_mask, "block", geometry, out, o, tensor_cores)

    x_channels_last = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    x_channels_last.requires_grad_(mode == "train")
    dy_channels_last = dy.permute(0, 3, 1, 2)  # NCHW over NHWC memory: channels-last already
    # The filter mask as [out, in, 1, 1], for dfilters on its own.
    filter_mask = per_tap.T[:, :, None, None].to(dtype)

    def masked_dy():
        """dy through the output mask, as conv2d(x, w * m) * o's backward takes it."""
        return dy_channels_last if o is None else dy_channels_last * o[:, None].to(dtype)

    def dense():
        if mode == "grad_weight":  # cuDNN's dfilters alone, masked
            torch.nn.grad.conv2d_weight(x_channels_last, (channels, channels, 3, 3), masked_dy(),
                                        padding=1).mul_(filter_mask)
            return
        w = (f * per_tap.to(dtype)).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        if mode == "grad_input":  # cuDNN's dx alone
            torch.nn.grad.conv2d_input(x_channels_last.shape, w, masked_dy(), padding=1)
            return
        x_channels_last.grad = None  # dx written, not accumulated, as ours is
        out = torch.nn.functional.conv2d(x_channels_last, w.requires_grad_(mode == "train"), padding=1)
        if o is not None:
            out = out * o[:, None]
        if mode == "train":
            out.backward(dy_channels_last)

    medians, speedups = timed_row(fused, dense, baseline, reps, warmup,
                                  warpgroup=WARPGROUP and dtype in (torch.float16, torch.bfloat16))
    kernels = {product: kernel_family(HARNESS.conv2d_uses_pipeline(product, dtype, geometry, "block", tensor_cores),
                                      HARNESS.conv2d_uses_tensor_cores(product, dtype, geometry, tensor_cores))
               for product in products_of(mode)}
    return {"case": "conv", "layer": [n, size, size, channels], "density": density, "active": active,
            "precision": precision_name, "mode": mode,
            "median_ms": medians, **speedups, "target": 0.6 / (density * active),
            "kernels": kernels}


def baseline_cells(row):
    """The table cells of a row's time with the baseline harness, if timed."""
    if "baseline" not in row["median_ms"]:
        return ""
    return f" | {row['median_ms']['baseline']:.3f} | {row['over_baseline']:.2f}x"


def warpgroup_cells(row):
    """The table cells of a row's time with the warpgroup tile, if timed (and
    the baseline harness's, where it has the tile)."""
    if "warpgroup" not in row["median_ms"]:
        return " | | "
    cells = f" | {row['median_ms']['warpgroup']:.3f} | {row['speedup_warpgroup']:.2f}x"
    if "warpgroup_tall" in row["median_ms"]:
        cells += f" | {row['median_ms']['warpgroup_tall']:.3f} | {row['speedup_warpgroup_tall']:.2f}x"
    if "baseline_warpgroup" in row["median_ms"]:
        cells += f" | {row['median_ms']['baseline_warpgroup']:.3f} | {row['warpgroup_over_baseline']:.2f}x"
    return cells


def kernels_line(rows):
    """Which kernels each precision's rows ran (results from before this was
    recorded have none)."""
    families = {}
    for row in rows:
        for family in row.get("kernels", {}).values():
            families.setdefault(row["precision"], set()).add(family)
    if families:
        print("\nKernels: " + "; ".join(f"{name} {', '.join(sorted(found))}" for name, found in families.items()))


def summary(path):
    """The README's tables from a results file: speedups by density."""
    results = json.loads(pathlib.Path(path).read_text())
    densities = sorted({row["density"] for row in results["rows"]}, reverse=True)
    table = {}
    for row in results["rows"]:
        table.setdefault((row["precision"], row["block"], row["mode"]), {})[row["density"]] = row
    print(f"matmul {'x'.join(map(str, results['rows'][0]['shape']))}, speedup over cuBLAS on w * m "
          f"({results['device']}; target 0.7/d at block 32, 0.8/d at 64)\n")
    print("| precision | block | mode | " + " | ".join(f"d={d:g}" for d in densities) + " |")
    print("|---|---:|---|" + "---:|" * len(densities))
    for (name, block, mode), by_density in table.items():
        cells = " | ".join(f"{by_density[d]['speedup']:.2f}x" if d in by_density else "" for d in densities)
        print(f"| {name} | {block} | {mode} | {cells} |")
        for label, key in ((f"{name}, wgmma", "speedup_warpgroup"), (f"{name}, wgmma tall", "speedup_warpgroup_tall")):
            if any(key in row for row in by_density.values()):
                cells = " | ".join(f"{by_density[d][key]:.2f}x" if key in by_density.get(d, {}) else ""
                                   for d in densities)
                print(f"| {label} | {block} | {mode} | {cells} |")
    kernels_line(results["rows"])
    layers = {}
    for row in results.get("conv_rows", []):
        layers.setdefault(tuple(row.get("layer", FIRST_LAYER)), []).append(row)
    for (n, height, width, channels), conv_rows in layers.items():
        print(f"\nconv 3x3 {channels} -> {channels} on [{n}, {height}, {width}], speedup over cuDNN on f * m "
              f"({results['device']}; target 0.6/(d a))\n")
        columns = list(dict.fromkeys((row["density"], row["active"]) for row in conv_rows))
        print("| precision | mode | " + " | ".join(f"d={d:g} a={a:g}" for d, a in columns) + " |")
        print("|---|---|" + "---:|" * len(columns))
        by_key = {(r["precision"], r["mode"], r["density"], r["active"]): r for r in conv_rows}
        for precision, mode in dict.fromkeys((r["precision"], r["mode"]) for r in conv_rows):
            for label, key in ((precision, "speedup"), (f"{precision}, wgmma", "speedup_warpgroup")):
                rows = [by_key.get((precision, mode, *c), {}) for c in columns]
                if any(key in row for row in rows):
                    cells = " | ".join(f"{row[key]:.2f}x" if key in row else "" for row in rows)
                    print(f"| {label} | {mode} | {cells} |")
        kernels_line(conv_rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x4096x4096")
    parser.add_argument("--densities", default="1.0,0.5,0.25,0.1,0.05")
    parser.add_argument("--blocks", default="16,32,64")
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--modes", default="forward,train", help="of " + ", ".join(MATMUL_MODES))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--conv", action="store_true", help="also time masked_conv2d against cuDNN")
    parser.add_argument("--conv-only", action="store_true", help="time masked_conv2d only (implies --conv)")
    parser.add_argument("--baseline-harness", metavar="SO",
                        help="also time this harness library (an earlier build) interleaved with the current one")
    parser.add_argument("--no-warpgroup", action="store_true",
                        help="skip the warpgroup (wgmma) forward timings a Hopper GPU otherwise adds")
    parser.add_argument("--tall", action="store_true",
                        help="also time the matmul rows' warpgroup products in tall tiles (256 x 128)")
    parser.add_argument("--json")
    parser.add_argument("--summary", metavar="JSON", help="print the README's tables from a results file and exit")
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MATMUL_MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    if args.summary:
        summary(args.summary)
        return
    global torch, HARNESS, WARPGROUP, BASELINE_WARPGROUP, TALL
    import torch
    HARNESS = Harness(torch)
    # "fused" is the pipelined tile; "wgmma" every product that has one on the warpgroup tile.
    WARPGROUP = HARNESS.set_warpgroup_products("all") and not args.no_warpgroup
    HARNESS.set_warpgroup_products("none")
    TALL = WARPGROUP and args.tall and HARNESS.set_warpgroup_tall_tiles(False)
    baseline = Harness(torch, args.baseline_harness) if args.baseline_harness else None
    BASELINE_WARPGROUP = WARPGROUP and baseline is not None and baseline.set_warpgroup_products("all")
    if baseline is not None:
        baseline.set_warpgroup_products("none")
    shape = tuple(int(v) for v in args.shape.split("x"))
    device = torch.cuda.get_device_name()
    rows, conv_rows = [], []

    def save():
        """The results so far, rewritten after every row: a run cut short keeps them."""
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                           "rows": rows, "conv_rows": conv_rows}, indent=2) + "\n")

    versus = " | baseline ms | over baseline" if baseline else ""
    # Tall tiles are the matmul's alone: the conv table has no such columns.
    own = " | wgmma ms | wgmma speedup" if WARPGROUP else ""
    tall = " | wgmma tall ms | wgmma tall speedup" if TALL else ""
    of_baseline = " | baseline wgmma ms | wgmma over baseline" if BASELINE_WARPGROUP else ""
    wgmma = own + of_baseline
    timed_pairs = bool(baseline) + WARPGROUP + bool(BASELINE_WARPGROUP)
    if not args.conv_only:
        print(f"| precision | block | density | mode | fused ms | cuBLAS ms | speedup "
              f"| target{versus}{own}{tall}{of_baseline} |  # {device}")
        print("|---|---:|---:|---|---:|---:|---:|---:|" + "---:|---:|" * (timed_pairs + TALL))
    for precision in args.precisions.split(",") if not args.conv_only else ():
        for block in args.blocks.split(","):
            for density in args.densities.split(","):
                for mode in args.modes.split(","):
                    row = case(shape, int(block), float(density), precision, mode, args.reps, args.warmup, baseline)
                    rows.append(row)
                    save()
                    print(f"| {row['precision']} | {row['block']} | {row['density']:g} | {row['mode']} "
                          f"| {row['median_ms']['fused']:.3f} | {row['median_ms']['dense']:.3f} "
                          f"| {row['speedup']:.2f}x | {row['target']:.2f}x{baseline_cells(row)}"
                          f"{warpgroup_cells(row) if WARPGROUP else ''} |")
    if not (args.conv or args.conv_only):
        return
    torch.backends.cudnn.benchmark = True
    print(f"\n| layer | precision | density | active tiles | mode | fused ms | cuDNN ms | speedup "
          f"| target{versus}{wgmma} |  # {device}")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|" + "---:|---:|" * timed_pairs)
    for layer, pairs in CONV_LAYERS.items():
        for precision in args.precisions.split(","):
            for density, active in pairs:
                for mode in args.modes.split(","):
                    row = conv_case(layer, density, active, precision, mode, args.reps, args.warmup, baseline)
                    conv_rows.append(row)
                    save()
                    print(f"| {'x'.join(map(str, row['layer']))} | {row['precision']} | {row['density']:g} "
                          f"| {row['active']:g} | {row['mode']} | {row['median_ms']['fused']:.3f} "
                          f"| {row['median_ms']['dense']:.3f} | {row['speedup']:.2f}x "
                          f"| {row['target']:.2f}x{baseline_cells(row)}{warpgroup_cells(row) if WARPGROUP else ''} |")


if __name__ == "__main__":
    main()
