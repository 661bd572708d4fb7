"""The CUDA masked_conv2d kernels through the TF-free harness, against
PyTorch's float64 convolution on the CPU. Skipped without a GPU, PyTorch or
the harness library."""

import math

import numpy as np
import pytest

from harness import for_tests

torch, HARNESS = for_tests()
# float32 on tensor cores is TF32 (10-bit mantissa).
TOLERANCE = {(torch.float64, False): 1e-12, (torch.float64, True): 1e-12, (torch.float32, False): 1e-4, (torch.float32, True): 2e-3, (torch.float16, False): 2e-2,
             (torch.float16, True): 2e-2, (torch.bfloat16, False): 6e-2, (torch.bfloat16, True): 6e-2}
# (n, h, w, cin, cout, (kh, kw), stride, dilation, (top, bottom, left, right))
GEOMETRIES = [
    (1, 7, 7, 3, 17, (3, 3), 1, 1, (1, 1, 1, 1)),
    (2, 13, 11, 17, 64, (3, 3), 2, 1, (1, 1, 1, 1)),
    (1, 12, 12, 32, 16, (1, 1), 1, 1, (0, 0, 0, 0)),
    (2, 13, 13, 16, 24, (5, 5), 1, 2, (0, 0, 0, 0)),
    (1, 13, 9, 40, 33, (1, 7), 1, 1, (0, 0, 3, 3)),
    (1, 9, 10, 8, 8, (3, 3), 1, 1, (4, 1, 0, 3)),
    (2, 14, 13, 32, 136, (3, 3), 1, 1, (1, 1, 1, 1)),  # pipelined forward: several row and channel tiles
    (1, 15, 14, 24, 40, (3, 3), 2, 2, (2, 1, 1, 2)),   # pipelined forward: strided, dilated
    (2, 32, 32, 16, 24, (3, 3), 1, 1, (1, 1, 1, 1)),   # pipelined dfilters: 2048 output pixels split 4 ways
    (2, 16, 16, 256, 40, (3, 3), 1, 1, (1, 1, 1, 1)),  # pipelined forward: 4 row tiles or fewer busy, lists split
]
# (filter block (in, out), output tile (h, w)): channel blocks cutting the
# channels on multiples of 16 take the tensor-core products when asked (16 x 8
# only where cout <= 8); tiles of 15 pixels make 16-row strips straddle tiles.
BLOCKS_AND_TILES = [((16, 8), (4, 8)), ((16, 16), (3, 5)), ((32, 48), (8, 8))]


def out_size(size, k, stride, dilation, before, after):
    return (size + before + after - (k - 1) * dilation - 1) // stride + 1


def reference(x, filters, element, output_mask, stride, dilation, pads, dy):
    """y, dx, dfilters of where(o != 0, conv2d(x, where(m != 0, f * m, 0)) * o, 0) in float64."""
    x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    f = torch.tensor(filters, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(element, dtype=torch.float64)
    masked = torch.where(m != 0, f * m, torch.zeros_like(f))
    top, bottom, left, right = pads
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom))
    y = torch.nn.functional.conv2d(padded, masked.permute(3, 2, 0, 1), stride=stride, dilation=dilation)
    y = y.permute(0, 2, 3, 1)
    if output_mask is not None:
        o = torch.tensor(output_mask, dtype=torch.float64)[..., None]
        y = torch.where(o != 0, y * o, torch.zeros_like(y))
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return y.detach().numpy(), x.grad.numpy(), f.grad.numpy()


def check(actual, expected, dtype, terms, tensor_cores):
    actual = actual.double().cpu().numpy()
    assert np.isfinite(actual).all(), "an output element was left unwritten or took a masked NaN"
    tolerance = TOLERANCE[dtype, tensor_cores]
    scale = math.sqrt(terms) * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


def make_case(geometry, block, tile, level, with_output_mask, dtype, active=0.5):
    """(x, filters with NaN where masked, dy, mask, output mask or None) on
    the GPU, the harness's geometry fields, the float64 reference (y, dx,
    dfilters) of the inputs as rounded to dtype, and the element-level mask;
    output tiles active with probability `active`."""
    n, h, w, cin, cout, (kh, kw), stride, dilation, pads = geometry
    rng = np.random.default_rng([n, h, w, cin, cout, kh])
    out_h = out_size(h, kh, stride, dilation, pads[0], pads[1])
    out_w = out_size(w, kw, stride, dilation, pads[2], pads[3])
    grid = (math.ceil(cin / block[0]), math.ceil(cout / block[1]))
    blocks = (rng.random(grid) < 0.6) * rng.choice([1.0, 2.0], grid)
    per_tap = np.repeat(np.repeat(blocks, block[0], 0), block[1], 1)[:cin, :cout]
    element = np.broadcast_to(per_tap, (kh, kw, cin, cout)).copy()
    if level == "element":
        element = element * (rng.random((kh, kw, cin, cout)) < 0.8)
    mask = element if level == "element" else blocks
    tiles = rng.random((n, math.ceil(out_h / tile[0]), math.ceil(out_w / tile[1]))) < active
    output_mask = (np.repeat(np.repeat(tiles, tile[0], 1), tile[1], 2)[:, :out_h, :out_w]
                   * rng.choice([1.0, 2.5], (n, out_h, out_w))) if with_output_mask else None
    on_gpu = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=dtype, device="cuda")  # noqa: E731
    x_t = on_gpu(rng.standard_normal((n, h, w, cin)))
    filters = rng.standard_normal((kh, kw, cin, cout))
    f_t = on_gpu(np.where(element == 0, np.nan, filters))  # masked-out filters never leak
    dy_t = on_gpu(rng.standard_normal((n, out_h, out_w, cout)))
    x, dy = (t.double().cpu().numpy() for t in (x_t, dy_t))
    filters = on_gpu(filters).double().cpu().numpy()
    expected = reference(x, filters, element, output_mask, stride, dilation, pads, dy)
    fields = (n, h, w, cin, kh, kw, cout, stride, stride, dilation, dilation, pads[0], pads[2], out_h, out_w,
              *block, *tile)
    mask_t = torch.tensor(mask, dtype=torch.float32, device="cuda")
    o_t = None if output_mask is None else torch.tensor(output_mask, dtype=torch.float32, device="cuda")
    return (x_t, f_t, dy_t, mask_t, o_t), fields, expected, element


def nan_filled(dtype, *shape):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}x{g[2]}x{g[3]}-{g[5][0]}x{g[5][1]}x{g[4]}-s{g[6]}-d{g[7]}")
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_and_tile", BLOCKS_AND_TILES, ids=lambda b: f"b{b[0][0]}x{b[0][1]}-t{b[1][0]}x{b[1][1]}")
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "cuda-cores"])
def test_conv_products_match_reference(geometry, level, with_output_mask, dtype, block_and_tile, tensor_cores):
    n, h, w, cin, cout, (kh, kw), *_ = geometry
    block, tile = block_and_tile
    (x_t, f_t, dy_t, mask_t, o_t), geometry_fields, expected, element = make_case(geometry, block, tile, level,
                                                                                  with_output_mask, dtype)
    out_h, out_w = geometry_fields[13:15]
    y = HARNESS.conv2d("forward", x_t, f_t, mask_t, level, geometry_fields, nan_filled(dtype, n, out_h, out_w, cout),
                       o_t, tensor_cores)
    dx = HARNESS.conv2d("grad_input", dy_t, f_t, mask_t, level, geometry_fields, nan_filled(dtype, n, h, w, cin), o_t,
                        tensor_cores)
    df = HARNESS.conv2d("grad_weight", x_t, dy_t, mask_t, level, geometry_fields,
                        nan_filled(dtype, kh, kw, cin, cout), o_t, tensor_cores)
    torch.cuda.synchronize()
    aligned = lambda block_size, channels: block_size % 16 == 0 or block_size >= channels  # noqa: E731
    rule = {"forward": aligned(block[1], cout), "grad_input": aligned(block[0], cin),
            "grad_weight": aligned(block[0], cin) and aligned(block[1], cout)}
    for product, needed in rule.items():
        assert HARNESS.conv2d_uses_tensor_cores(product, dtype, geometry_fields, tensor_cores) == (
            tensor_cores and needed and dtype != torch.float64 and torch.cuda.get_device_capability()[0] >= 8)
    pipelined = (tensor_cores and dtype in (torch.float16, torch.bfloat16, torch.float32) and cin % 8 == 0 and cout % 8 == 0
                 and aligned(block[0], cin) and aligned(block[1], cout)
                 and torch.cuda.get_device_capability()[0] >= 8)
    for product in rule:
        assert HARNESS.conv2d_uses_pipeline(product, dtype, geometry_fields, level, tensor_cores) == (
            pipelined and (product == "grad_weight" or level == "block"))
    check(y, expected[0], dtype, kh * kw * cin, tensor_cores)
    check(dx, expected[1], dtype, kh * kw * cout, tensor_cores)
    check(df, expected[2], dtype, n * out_h * out_w, tensor_cores)
    assert (df.double().cpu().numpy()[element == 0] == 0).all()


@pytest.mark.parametrize("geometry, block, tile", [
    (GEOMETRIES[6], (32, 16), (4, 4)),
    (GEOMETRIES[8], (32, 16), (5, 3)),  # tiles smaller than a stage, ragged at the edges
    (GEOMETRIES[9], (32, 16), (4, 4)),
    ((1, 16, 16, 16, 4096, (3, 3), 1, 1, (1, 1, 1, 1)), (16, 16), (4, 4)),  # dx lists over 1024 entries
], ids=["2x14x13x32", "2x32x32x16-t5x3", "2x16x16x256", "1x16x16x16-3x3x4096"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_products_under_a_sparse_output_mask(geometry, block, tile, dtype):
    """A tenth of the output tiles active: the forward conv's few busy tiles
    (its lists split on the 256-channel input), dx's row tiles, taps and row
    strips and dfilters' stages of output pixels (both tile by tile) that
    meet no live output pixel left out, on the pipelined kernels (float32 as
    TF32), against the reference."""
    n, h, w, cin, cout, (kh, kw), *_ = geometry
    (x_t, f_t, dy_t, mask_t, o_t), fields, expected, element = make_case(geometry, block, tile, "block", True,
                                                                         dtype, active=0.1)
    out_h, out_w = fields[13:15]
    for product in ("forward", "grad_input", "grad_weight"):
        assert HARNESS.conv2d_uses_pipeline(product, dtype, fields, "block") == (
            torch.cuda.get_device_capability()[0] >= 8)
    y = HARNESS.conv2d("forward", x_t, f_t, mask_t, "block", fields, nan_filled(dtype, n, out_h, out_w, cout), o_t)
    dx = HARNESS.conv2d("grad_input", dy_t, f_t, mask_t, "block", fields, nan_filled(dtype, n, h, w, cin), o_t)
    df = HARNESS.conv2d("grad_weight", x_t, dy_t, mask_t, "block", fields, nan_filled(dtype, kh, kw, cin, cout), o_t)
    torch.cuda.synchronize()
    check(y, expected[0], dtype, kh * kw * cin, True)
    check(dx, expected[1], dtype, kh * kw * cout, True)
    check(df, expected[2], dtype, n * out_h * out_w, True)
    assert (df.double().cpu().numpy()[element == 0] == 0).all()


WARPGROUP_CASES = [  # (geometry, block, tile): runs of 1, 4 and 8 strips, stages of 16 and 32, guarded halves
    (GEOMETRIES[6], (16, 16), (3, 5)),
    (GEOMETRIES[7], (32, 48), (4, 4)),
    (GEOMETRIES[6], (32, 128), (2, 8)),
    (GEOMETRIES[6], (16, 64), (8, 8)),
    ((2, 12, 11, 32, 64, (3, 3), 1, 1, (1, 1, 1, 1)), (16, 64), (8, 8)),
    (GEOMETRIES[9], (32, 16), (8, 8)),
]


@pytest.mark.parametrize("case", WARPGROUP_CASES,
                         ids=["b16x16", "b32x48", "b32x128", "b16x64", "one-block", "split-lists"])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_warpgroup_conv_forward_matches_reference(case, with_output_mask, dtype):
    """The forward conv on the warpgroup (wgmma) tile (Hopper, with every
    product chosen for it) against the float64 reference: every run width,
    stages of 16 and 32, whole and partly live tiles, 64-row halves without
    an active pixel, block factors 1 and 2, NaN in dead filter blocks,
    outputs poisoned with NaN."""
    if not HARNESS.set_warpgroup_products("all"):
        HARNESS.set_warpgroup_products("forward")
        pytest.skip("the warpgroup tile needs a compute capability 9.0 GPU and a build with sm_90a code")
    try:
        geometry, block, tile = case
        (x_t, f_t, _, mask_t, o_t), fields, expected, _ = make_case(geometry, block, tile, "block", with_output_mask,
                                                                    dtype)
        n, _, _, cin, cout, (kh, kw), *_ = geometry
        y = HARNESS.conv2d("forward", x_t, f_t, mask_t, "block", fields, nan_filled(dtype, n, *fields[13:15], cout),
                           o_t)
        torch.cuda.synchronize()
        # The reference takes the inputs as rounded to dtype, so only the
        # output's rounding and the float sums differ: a bound tight enough
        # for a misplaced chunk or a wrong tap to show.
        actual = y.double().cpu().numpy()
        assert np.isfinite(actual).all(), "an output element was left unwritten or took a masked NaN"
        np.testing.assert_allclose(actual, expected[0], rtol=1e-2, atol=1e-2 * max(1.0, np.abs(expected[0]).max()))
    finally:
        HARNESS.set_warpgroup_products("forward")
