"""The CUDA masked_matmul kernels through the TF-free harness, against a
float64 NumPy reference. Skipped without a GPU, PyTorch or the harness
library (see tests/gpu/harness.py and `make gpu-test`)."""

import math

import numpy as np
import pytest

from harness import for_tests

torch, HARNESS = for_tests()
# float32 on tensor cores is TF32 (10-bit mantissa); on CUDA cores, float FMAs.
TOLERANCE = {(torch.float64, False): 1e-12, (torch.float64, True): 1e-12, (torch.float32, False): 1e-4, (torch.float32, True): 2e-3, (torch.float16, False): 2e-2,
             (torch.float16, True): 2e-2, (torch.bfloat16, False): 6e-2, (torch.bfloat16, True): 6e-2}
# Blocks whose edges fall on multiples of 16 take the tensor-core products
# when asked; the others (and tensor_cores=False) the CUDA-core ones. Shapes
# cut the 128 x 64 tensor-core tiles and 32-deep stages unevenly.
SHAPES = [  # (m, k, n, block_size)
    (1, 1, 1, (32, 32)),
    (37, 29, 53, (16, 8)),
    (8, 64, 64, (32, 32)),
    (130, 70, 90, (32, 64)),
    (5, 20, 10, (64, 64)),
    (257, 96, 160, (16, 16)),
    (300, 100, 200, (48, 80)),
    (129, 200, 65, (128, 128)),
    (64, 48, 300, (16, 96)),
    (1, 16, 16, (16, 16)),
    (300, 200, 136, (64, 32)),  # pipelined: a short last segment, an 8-wide second column tile
    (520, 256, 384, (32, 64)),  # pipelined: several 128 x 128 tiles each way
    (8, 4160, 16, (16, 16)),   # pipelined forward: one tile, its 260-segment list split 8 ways
    (2080, 64, 48, (16, 16)),  # pipelined dW: the batch split 4 ways
]
MASK_DTYPES = [torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64]


def takes_tensor_cores(product, dtype, k, n, block_size, tensor_cores):
    """The kernels' rule, restated: tensor cores (never for float64) where the
    product's output columns (and dW's rows) are cut by the blocks on
    multiples of 16, or not at all, on a device of compute capability 8.0 or
    later."""
    def aligned(block, extent):
        return block % 16 == 0 or block >= extent

    rows, cols = aligned(block_size[0], k), aligned(block_size[1], n)
    needed = {"forward": cols, "grad_input": rows, "grad_weight": rows and cols}[product]
    return tensor_cores and needed and dtype != torch.float64 and torch.cuda.get_device_capability()[0] >= 8


def takes_pipeline(product, dtype, k, n, block_size, level, tensor_cores):
    """The pipelined kernels' rule, restated: float16 / bfloat16 and float32
    (as TF32) on tensor cores, W's dimensions multiples of 8, its blocks on
    16s (or whole) both ways, a block mask except for dW."""
    def aligned(block, extent):
        return block % 16 == 0 or block >= extent

    types = (torch.float16, torch.bfloat16, torch.float32)
    return (tensor_cores and dtype in types and k % 8 == 0 and n % 8 == 0
            and aligned(block_size[0], k) and aligned(block_size[1], n)
            and (product == "grad_weight" or level == "block") and torch.cuda.get_device_capability()[0] >= 8)


def make_masks(rng, k, n, block_size, density, level):
    grid = (math.ceil(k / block_size[0]), math.ceil(n / block_size[1]))
    blocks = (rng.random(grid) < density) * rng.choice([1.0, 2.0, -0.5], grid)
    element = np.repeat(np.repeat(blocks, block_size[0], 0), block_size[1], 1)[:k, :n]
    if level == "element":
        element = element * (rng.random((k, n)) < 0.8)
        return element, element
    return blocks, element


def reference(x, w, dy, element):
    live = element != 0
    w_masked = np.where(live, w * element, 0.0)
    dw = np.where(live, (x.T @ dy) * element, 0.0)
    return x @ w_masked, dy @ w_masked.T, dw


def check(actual, expected, dtype, depth, tensor_cores=False):
    actual = actual.double().cpu().numpy()
    assert np.isfinite(actual).all(), "an output element was left unwritten or took a masked NaN"
    tolerance = TOLERANCE[dtype, tensor_cores]
    scale = np.sqrt(depth) * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "cuda-cores"])
def test_products_match_reference(shape, density, level, dtype, tensor_cores):
    m, k, n, block_size = shape
    rng = np.random.default_rng([m, k, n, int(density * 10)])
    mask, element = make_masks(rng, k, n, block_size, density, level)
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((k, n))
    dy = rng.standard_normal((m, n))
    w_with_nan = np.where(element == 0, np.nan, w)  # masked-out weights never leak
    on_gpu = lambda a: torch.tensor(a, dtype=dtype, device="cuda")  # noqa: E731
    x_t, w_t, dy_t = on_gpu(x), on_gpu(w_with_nan), on_gpu(dy)
    x, w, dy = (t.double().cpu().numpy() for t in (x_t, on_gpu(w), dy_t))
    mask_t = torch.tensor(mask, dtype=torch.float32, device="cuda")
    expected = reference(x, w, dy, element)
    # Outputs start as NaN, so an element the kernel never writes shows.
    y = HARNESS.run("forward", x_t, w_t, mask_t, level, block_size, (m, k, n),
                    torch.full((m, n), float("nan"), dtype=dtype, device="cuda"), tensor_cores)
    dx = HARNESS.run("grad_input", dy_t, w_t, mask_t, level, block_size, (m, k, n),
                     torch.full((m, k), float("nan"), dtype=dtype, device="cuda"), tensor_cores)
    dw = HARNESS.run("grad_weight", x_t, dy_t, mask_t, level, block_size, (m, k, n),
                     torch.full((k, n), float("nan"), dtype=dtype, device="cuda"), tensor_cores)
    torch.cuda.synchronize()
    for product in ("forward", "grad_input", "grad_weight"):
        assert HARNESS.uses_tensor_cores(product, dtype, (m, k, n), block_size, tensor_cores) == takes_tensor_cores(
            product, dtype, k, n, block_size, tensor_cores)
        assert HARNESS.uses_pipeline(product, dtype, (m, k, n), block_size, level, tensor_cores) == takes_pipeline(
            product, dtype, k, n, block_size, level, tensor_cores)
    check(y, expected[0], dtype, k, tensor_cores)
    check(dx, expected[1], dtype, n, tensor_cores)
    check(dw, expected[2], dtype, m, tensor_cores)
    assert (dw.double().cpu().numpy()[element == 0] == 0).all()


@pytest.mark.parametrize("block_size", [(32, 32), (16, 48), (8, 8)], ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "cuda-cores"])
def test_nan_in_inputs_reaches_live_blocks_only(block_size, dtype, tensor_cores):
    """A NaN in x (dy for dx) spreads through the live blocks it meets, the
    zeros of a live block included, and never through a dead block, whose
    stage is skipped, on either kind of core."""
    rng = np.random.default_rng(11)
    m, k, n = 70, 96, 144
    mask, _ = make_masks(rng, k, n, block_size, 0.5, "block")
    on_gpu = lambda a: torch.tensor(a, dtype=dtype, device="cuda")  # noqa: E731
    w_t, mask_t = on_gpu(rng.standard_normal((k, n))), torch.tensor(mask, dtype=torch.float32, device="cuda")
    x = rng.standard_normal((m, k))
    x[3, 40] = np.nan
    dy = rng.standard_normal((m, n))
    dy[5, 100] = np.inf
    y = HARNESS.run("forward", on_gpu(x), w_t, mask_t, "block", block_size, (m, k, n),
                    torch.zeros((m, n), dtype=dtype, device="cuda"), tensor_cores)
    dx = HARNESS.run("grad_input", on_gpu(dy), w_t, mask_t, "block", block_size, (m, k, n),
                     torch.zeros((m, k), dtype=dtype, device="cuda"), tensor_cores)
    torch.cuda.synchronize()
    y, dx = y.float().cpu().numpy(), dx.float().cpu().numpy()
    # Row 3 of y is NaN exactly where W's entry (40, j) lies in a live block.
    block_live = np.repeat(np.repeat(mask != 0, block_size[0], 0), block_size[1], 1)[:k, :n]
    np.testing.assert_array_equal(np.isnan(y[3]), block_live[40])
    assert np.isfinite(np.delete(y, 3, axis=0)).all()
    np.testing.assert_array_equal(~np.isfinite(dx[5]), block_live[:, 100])
    assert np.isfinite(np.delete(dx, 5, axis=0)).all()


@pytest.mark.parametrize("block_size", [(32, 32), (64, 64), (16, 128)], ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("density", [0.1, 1.0])
def test_pipelined_products_at_size(block_size, density):
    """The three products of a 1024 x 1024 bfloat16 weight (many stages and
    tiles: the benchmark's regime) against the float64 reference."""
    m, k, n = 768, 1024, 1024
    rng = np.random.default_rng([k, *block_size, int(density * 10)])
    mask, element = make_masks(rng, k, n, block_size, density, "block")
    on_gpu = lambda a: torch.tensor(a, dtype=torch.bfloat16, device="cuda")  # noqa: E731
    x_t, w_t, dy_t = (on_gpu(rng.standard_normal(s)) for s in ((m, k), (k, n), (m, n)))
    mask_t = torch.tensor(mask, dtype=torch.float32, device="cuda")
    x, w, dy = (t.double().cpu().numpy() for t in (x_t, w_t, dy_t))
    expected = reference(x, w, dy, element)
    outputs = []
    for product, a, b, out_shape in (("forward", x_t, w_t, (m, n)), ("grad_input", dy_t, w_t, (m, k)),
                                     ("grad_weight", x_t, dy_t, (k, n))):
        assert HARNESS.uses_pipeline(product, torch.bfloat16, (m, k, n), block_size, "block")
        outputs.append(HARNESS.run(product, a, b, mask_t, "block", block_size, (m, k, n),
                                   torch.full(out_shape, float("nan"), dtype=torch.bfloat16, device="cuda")))
    torch.cuda.synchronize()
    for actual, wanted, depth in zip(outputs, expected, (k, n, m)):
        check(actual, wanted, torch.bfloat16, depth, True)


@pytest.fixture(autouse=True)
def pipelined_tile():
    """Every product on the pipelined tile unless a test asks for the
    warpgroup one (on Hopper the forward product would take it by default,
    and the pipelined kernels would go untested there); the kernels' default
    afterwards."""
    HARNESS.set_warpgroup_products("none")
    yield
    HARNESS.set_warpgroup_products("forward")


@pytest.fixture
def warpgroup():
    """The half types' three products on the warpgroup (wgmma) tile for the
    test, which fails if a launch fell back to the pipelined tile for want of
    a tensor map; skipped where the GPU or the build has none."""
    if not HARNESS.set_warpgroup_products("all"):
        pytest.skip("the warpgroup tile needs a compute capability 9.0 GPU and a build with sm_90a code")
    refusals = HARNESS.tensor_map_refusals()
    yield
    assert HARNESS.tensor_map_refusals() == refusals, "the driver refused a tensor map: the pipelined tile ran"


def run_product(product, a, b, mask, block_size, dtype):
    """The forward product (a = x, b = W), dx (a = dy, b = W) or dW (a = x,
    b = dy) of float64 arrays and a block mask as dtype, into a NaN-filled
    output."""
    m = a.shape[0]
    k, n = (a.shape[1], b.shape[1]) if product == "grad_weight" else b.shape
    on_gpu = lambda v: torch.tensor(np.ascontiguousarray(v), dtype=dtype, device="cuda")  # noqa: E731
    out_shape = {"forward": (m, n), "grad_input": (m, k), "grad_weight": (k, n)}[product]
    out = torch.full(out_shape, float("nan"), dtype=dtype, device="cuda")
    HARNESS.run(product, on_gpu(a), on_gpu(b), torch.tensor(mask, dtype=torch.float32, device="cuda"), "block",
                block_size, (m, k, n), out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("product", ["forward", "grad_input", "grad_weight"])
def test_warpgroup_layout_probe(warpgroup, product, dtype):
    """One 128 x 128 output tile over 32 of depth (two wgmma k-steps, both
    halves) with inputs whose products name their own place: row r of the
    left operand selects depth r % 32, and the right operand's entries are
    their output column (then their depth), so the output is its column
    (then r % 32) exactly. On
    failure the message shows a corner of what came out, to tell a
    transposed operand, a wrong descriptor stride or a misplaced accumulator
    from the log alone."""
    m, depth, columns = 128, 32, 128
    a = (np.arange(depth)[None, :] == (np.arange(m) % depth)[:, None]).astype(np.float64)
    by_column = np.tile(np.arange(columns, dtype=np.float64), (depth, 1))  # [depth, column]: the column
    by_depth = np.tile(np.arange(depth, dtype=np.float64)[:, None], (1, columns))  # the depth
    for name, w, expected in (("column", by_column, np.tile(np.arange(columns, dtype=np.float64), (m, 1))),
                              ("depth", by_depth, np.tile((np.arange(m) % depth)[:, None].astype(np.float64),
                                                          (1, columns)))):
        if product == "forward":
            out = run_product(product, a, w, np.ones((1, 1)), (depth, columns), dtype)
        elif product == "grad_input":  # W is [columns, depth]: dx = a @ W^T
            out = run_product(product, a, w.T, np.ones((1, 1)), (columns, depth), dtype)
        else:  # dW = x^T dy: x [depth, rows] selects, dy [depth, columns] names
            out = run_product(product, a.T, w, np.ones((1, 1)), (m, columns), dtype)
        out = out.double().cpu().numpy()
        wrong = np.argwhere(out != expected)
        assert wrong.size == 0, (f"{product} {name} probe: {len(wrong)} entries wrong, first at {wrong[:4].tolist()};\n"
                                 f"out[:10, :10] =\n{out[:10, :10]}\nout[64:70, 120:128] =\n{out[64:70, 120:128]}")


WARPGROUP_SHAPES = [s for s in SHAPES if takes_pipeline("forward", torch.float16, s[1], s[2], s[3], "block", True)] + [
    (768, 1024, 1024, (32, 32)), (768, 1024, 1024, (64, 64)), (768, 1024, 1024, (16, 128)),
    (300, 256, 512, (32, 128)), (300, 512, 256, (128, 32)), (200, 256, 256, (256, 256)),
    (256, 192, 240, (48, 80)), (300, 192, 288, (96, 96))]


def check_rounded_inputs(actual, expected):
    """actual against a reference computed from the inputs as rounded to the
    16-bit type: only the output's rounding and the float sums differ, so
    the bound is tight enough that a misplaced operand chunk, a strip read
    from the wrong run or a dropped depth step shows (tests/gpu's usual
    sqrt(depth) bound lets such faults through in bfloat16)."""
    actual = actual.double().cpu().numpy()
    assert np.isfinite(actual).all(), "an output element was left unwritten or took a masked NaN"
    np.testing.assert_allclose(actual, expected, rtol=1e-2, atol=1e-2 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("shape", WARPGROUP_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_warpgroup_products_match_reference(warpgroup, shape, density, dtype):
    """The three products on the wgmma tile (Hopper) against the float64
    reference: every run width (blocks of 16 to 256 output columns), whole
    and partly live tiles, split lists and batches, block factors 1, 2 and
    -0.5 (stages rescaled in shared memory), NaN in dead blocks, outputs
    poisoned with NaN."""
    check_products_on_rounded_inputs(shape, density, dtype)


@pytest.mark.parametrize("shape", WARPGROUP_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("density", [0.1, 1.0])
def test_warpgroup_tall_tiles_match_reference(warpgroup, shape, density):
    """The three products with tall tiles switched on (the forward product
    and dx in 256 x 128 tiles, two warpgroups sharing each stage of W, where
    a product has one split, more than 128 rows and stages of 32)."""
    if not HARNESS.set_warpgroup_tall_tiles(True):
        pytest.skip("a harness built without tall tiles")
    try:
        check_products_on_rounded_inputs(shape, density, torch.bfloat16)
    finally:
        HARNESS.set_warpgroup_tall_tiles(False)


@pytest.mark.parametrize("shape", WARPGROUP_SHAPES[-4:], ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_warpgroup_default_products_match_reference(shape, density):
    """The three products with the kernels' default choice of tile (on
    Hopper the forward product on the wgmma tile, dx and dW pipelined)."""
    HARNESS.set_warpgroup_products("forward")
    refusals = HARNESS.tensor_map_refusals()
    check_products_on_rounded_inputs(shape, density, torch.bfloat16)
    assert HARNESS.tensor_map_refusals() == refusals, "the driver refused a tensor map: the pipelined tile ran"


def check_products_on_rounded_inputs(shape, density, dtype):
    """The three products of a random case against the reference of its
    inputs rounded to dtype (check_rounded_inputs)."""
    m, k, n, block_size = shape
    rng = np.random.default_rng([m, k, n, int(density * 10), 1])
    mask, element = make_masks(rng, k, n, block_size, density, "block")
    x, w, dy = rng.standard_normal((m, k)), rng.standard_normal((k, n)), rng.standard_normal((m, n))
    rounded = lambda v: torch.tensor(v, dtype=dtype).double().numpy()  # noqa: E731
    expected = reference(rounded(x), rounded(w), rounded(dy), element)
    w_with_nan = np.where(element == 0, np.nan, w)
    check_rounded_inputs(run_product("forward", x, w_with_nan, mask, block_size, dtype), expected[0])
    check_rounded_inputs(run_product("grad_input", dy, w_with_nan, mask, block_size, dtype), expected[1])
    dw = run_product("grad_weight", x, dy, mask, block_size, dtype)
    check_rounded_inputs(dw, expected[2])
    assert (dw.double().cpu().numpy()[element == 0] == 0).all()


@pytest.mark.parametrize("block_size", [(32, 32), (16, 48), (32, 128), (128, 16)], ids=lambda b: f"b{b[0]}x{b[1]}")
def test_warpgroup_nan_reaches_live_blocks_only(warpgroup, block_size):
    """A NaN in x (Inf in dy for dx) spreads through the live blocks it meets
    and no dead one, whole-tile, per-block and per-strip products alike."""
    rng = np.random.default_rng(13)
    m, k, n = 40, 160, 256
    mask, _ = make_masks(rng, k, n, block_size, 0.5, "block")
    w = rng.standard_normal((k, n))
    x, dy = rng.standard_normal((m, k)), rng.standard_normal((m, n))
    x[3, 40] = np.nan
    dy[5, 100] = np.inf
    block_live = np.repeat(np.repeat(mask != 0, block_size[0], 0), block_size[1], 1)[:k, :n]
    y = run_product("forward", x, w, mask, block_size, torch.float16).double().cpu().numpy()
    dx = run_product("grad_input", dy, w, mask, block_size, torch.float16).double().cpu().numpy()
    np.testing.assert_array_equal(np.isnan(y[3]), block_live[40])
    assert np.isfinite(np.delete(y, 3, axis=0)).all()
    np.testing.assert_array_equal(~np.isfinite(dx[5]), block_live[:, 100])
    assert np.isfinite(np.delete(dx, 5, axis=0)).all()


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_every_mask_dtype(mask_dtype):
    rng = np.random.default_rng(7)
    m, k, n, block_size = 33, 48, 40, (16, 8)
    mask, element = make_masks(rng, k, n, block_size, 0.5, "block")
    mask = (mask != 0) if mask_dtype == torch.bool else np.abs(mask) * 2
    element = np.repeat(np.repeat(np.asarray(mask, np.float64), 16, 0), 8, 1)[:k, :n]
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((k, n))
    y = HARNESS.run("forward", torch.tensor(x, dtype=torch.float32, device="cuda"),
                    torch.tensor(w, dtype=torch.float32, device="cuda"),
                    torch.tensor(mask, device="cuda").to(mask_dtype), "block", block_size, (m, k, n),
                    torch.full((m, n), float("nan"), device="cuda"), tensor_cores=False)
    torch.cuda.synchronize()
    check(y, x @ np.where(element != 0, w * element, 0), torch.float32, k)
