"""The CUDA masked_matmul kernels through the TF-free harness, against a
float64 NumPy reference. Skipped without a GPU, PyTorch or the harness
library (see tests/gpu/harness.py and `make gpu-test`)."""

import math

import numpy as np
import pytest

from harness import for_tests

torch, HARNESS = for_tests()
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
SHAPES = [  # (m, k, n, block_size)
    (1, 1, 1, (32, 32)),
    (37, 29, 53, (16, 8)),
    (8, 64, 64, (32, 32)),
    (130, 70, 90, (32, 64)),
    (5, 20, 10, (64, 64)),
    (257, 96, 160, (16, 16)),
]
MASK_DTYPES = [torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64]


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


def check(actual, expected, dtype, depth):
    actual = actual.float().cpu().numpy().astype(np.float64)
    assert np.isfinite(actual).all(), "an output element was left unwritten or took a masked NaN"
    scale = np.sqrt(depth) * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_products_match_reference(shape, density, level, dtype):
    m, k, n, block_size = shape
    rng = np.random.default_rng([m, k, n, int(density * 10)])
    mask, element = make_masks(rng, k, n, block_size, density, level)
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((k, n))
    dy = rng.standard_normal((m, n))
    w_with_nan = np.where(element == 0, np.nan, w)  # masked-out weights never leak
    on_gpu = lambda a: torch.tensor(a, dtype=dtype, device="cuda")  # noqa: E731
    x_t, w_t, dy_t = on_gpu(x), on_gpu(w_with_nan), on_gpu(dy)
    x, w, dy = (t.float().cpu().numpy().astype(np.float64) for t in (x_t, on_gpu(w), dy_t))
    mask_t = torch.tensor(mask, dtype=torch.float32, device="cuda")
    expected = reference(x, w, dy, element)
    # Outputs start as NaN, so an element the kernel never writes shows.
    y = HARNESS.run("forward", x_t, w_t, mask_t, level, block_size, (m, k, n),
                    torch.full((m, n), float("nan"), dtype=dtype, device="cuda"))
    dx = HARNESS.run("grad_input", dy_t, w_t, mask_t, level, block_size, (m, k, n),
                     torch.full((m, k), float("nan"), dtype=dtype, device="cuda"))
    dw = HARNESS.run("grad_weight", x_t, dy_t, mask_t, level, block_size, (m, k, n),
                     torch.full((k, n), float("nan"), dtype=dtype, device="cuda"))
    torch.cuda.synchronize()
    check(y, expected[0], dtype, k)
    check(dx, expected[1], dtype, n)
    check(dw, expected[2], dtype, m)
    assert (dw.float().cpu().numpy()[element == 0] == 0).all()


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
                    torch.full((m, n), float("nan"), device="cuda"))
    torch.cuda.synchronize()
    check(y, x @ np.where(element != 0, w * element, 0), torch.float32, k)
