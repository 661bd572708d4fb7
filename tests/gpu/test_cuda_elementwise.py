"""The CUDA block-masked elementwise kernels (gradient masking, masked
updates, fused SGD / Adam / RMSprop steps) through the TF-free harness,
against NumPy. Frozen entries must keep their exact bits. Skipped without a
GPU, PyTorch or the harness library."""

import math

import numpy as np
import pytest

from harness import for_tests

torch, HARNESS = for_tests()
BLOCK = (16, 8)
SHAPES = [(40, 24), (3, 3, 17, 9), (37,)]


def masks(rng, shape, level):
    k, n = (1, shape[0]) if len(shape) == 1 else shape[-2:]
    grid = (math.ceil(k / BLOCK[0]), math.ceil(n / BLOCK[1]))
    blocks = (rng.random(grid) < 0.5) * rng.choice([1.0, 0.5], grid)
    per_matrix = np.repeat(np.repeat(blocks, BLOCK[0], 0), BLOCK[1], 1)[:k, :n]
    element = np.broadcast_to(per_matrix.reshape(shape if len(shape) == 1 else (1,) * (len(shape) - 2) + (k, n)),
                              shape).copy()
    if level == "element":
        element = element * (rng.random(shape) < 0.8)
        return element, element
    return blocks, element


def gpu(array, dtype=torch.float32):
    return torch.tensor(np.ascontiguousarray(array), dtype=dtype, device="cuda")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("level", ["block", "element"])
def test_mask_gradient(shape, level):
    rng = np.random.default_rng(0)
    mask, element = masks(rng, shape, level)
    grad = rng.standard_normal(shape).astype(np.float32)
    grad[element == 0] = np.nan
    out = HARNESS.elementwise("mask_gradient", gpu(grad), gpu(mask), level, BLOCK,
                              torch.full(shape, float("nan"), device="cuda"))
    torch.cuda.synchronize()
    expected = np.where(element != 0, grad * element, 0)
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["assign", "add", "sub"])
@pytest.mark.parametrize("level", ["block", "element"])
def test_masked_update_leaves_frozen_bits(mode, level):
    rng = np.random.default_rng(1)
    shape = (3, 40, 24)
    mask, element = masks(rng, shape, level)
    start = rng.standard_normal(shape).astype(np.float32)
    value = rng.standard_normal(shape).astype(np.float32)
    value[element == 0] = np.nan
    var = gpu(start)
    HARNESS.elementwise(mode, gpu(value), gpu(mask), level, BLOCK, var)
    torch.cuda.synchronize()
    live = element != 0
    expected = start.copy()
    expected[live] = {"assign": value, "add": start + value, "sub": start - value}[mode][live]
    np.testing.assert_array_equal(var.cpu().numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_types_match_the_product_and_sum_in_the_type(dtype):
    """grad * cast(mask, T) and var + value in T, bit for bit: the kernels
    compute in double for float64 and in float, rounded once, for the 16-bit
    types, which is what T's own product and sum do (the factor is rounded
    to T first, as tf.cast rounds it)."""
    rng = np.random.default_rng(4)
    shape = (40, 24)
    element = rng.choice([0.0, 1.5, -0.3, 1.1, 1e-9], shape)
    mask = gpu(element)
    grad = gpu(rng.standard_normal(shape) * 100, dtype)
    out = HARNESS.elementwise("mask_gradient", grad, mask, "element", BLOCK,
                              torch.full(shape, float("nan"), dtype=dtype, device="cuda"))
    start, value = gpu(rng.standard_normal(shape), dtype), gpu(rng.standard_normal(shape), dtype)
    var = start.clone()
    HARNESS.elementwise("add", value, mask, "element", BLOCK, var)
    torch.cuda.synchronize()
    live = mask != 0
    assert torch.equal(out, torch.where(live, grad * mask.to(dtype), torch.zeros_like(grad)))
    assert torch.equal(var, torch.where(live, start + value, start))


def adam_reference(w, m, v, v_hat, g, alpha, beta_1, beta_2, eps, lr, wd, amsgrad):
    w = w - w * wd * lr
    m = m + (g - m) * (1 - beta_1)
    v = v + (g * g - v) * (1 - beta_2)
    second = np.maximum(v_hat, v) if amsgrad else v
    return w - m * alpha / (np.sqrt(second) + eps), m, v, second if amsgrad else v_hat


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("level", ["block", "element"])
def test_adam_step(amsgrad, level):
    rng = np.random.default_rng(2)
    shape = (40, 24)
    mask, element = masks(rng, shape, level)
    w, m, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    v, v_hat = (rng.random(shape).astype(np.float32) for _ in range(2))
    scalars = (0.01, 0.1, 0.001, 1e-7, 0.01, 0.004)
    tensors = [gpu(t) for t in (w, m, v, v_hat)]
    HARNESS.elementwise("adam", gpu(g), gpu(mask), level, BLOCK, tensors[0], tensors[1:], scalars, amsgrad)
    torch.cuda.synchronize()
    expected = adam_reference(w, m, v, v_hat, g, 0.01, 0.9, 0.999, 1e-7, 0.01, 0.004, amsgrad)
    live = element != 0
    for got, want, start in zip(tensors, expected, (w, m, v, v_hat)):
        got = got.cpu().numpy()
        np.testing.assert_array_equal(got[~live], start[~live])
        np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_step(momentum, nesterov):
    rng = np.random.default_rng(3)
    shape = (3, 3, 17, 9)
    mask, element = masks(rng, shape, "block")
    w, velocity, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    var, state = gpu(w), gpu(velocity)
    HARNESS.elementwise("sgd", gpu(g), gpu(mask), "block", BLOCK, var, [state if momentum else None],
                        (0.1, momentum, 0.0), nesterov)
    torch.cuda.synchronize()
    if momentum:
        velocity_new = velocity * momentum - g * 0.1
        expected = w + (velocity_new * momentum - g * 0.1 if nesterov else velocity_new)
    else:
        velocity_new, expected = velocity, w - g * 0.1
    live = element != 0
    np.testing.assert_array_equal(var.cpu().numpy()[~live], w[~live])
    np.testing.assert_allclose(var.cpu().numpy()[live], expected[live], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.cpu().numpy()[live], velocity_new[live], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum, centered", [(0.0, False), (0.5, True)])
def test_rmsprop_step(momentum, centered):
    rng = np.random.default_rng(4)
    shape = (40, 24)
    mask, element = masks(rng, shape, "element")
    w, g, mom = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    velocity, average = rng.random(shape).astype(np.float32) + 1, rng.random(shape).astype(np.float32) * 0.1
    var, velocity_t, mom_t, average_t = gpu(w), gpu(velocity), gpu(mom), gpu(average)
    HARNESS.elementwise("rmsprop", gpu(g), gpu(mask), "element", BLOCK, var,
                        [velocity_t, mom_t if momentum else None, average_t if centered else None],
                        (0.01, 0.9, 0.1, momentum, 1e-7, 0.0), centered)
    torch.cuda.synchronize()
    velocity_new = 0.9 * velocity + 0.1 * g * g
    denominator = velocity_new + 1e-7
    if centered:
        average_new = 0.9 * average + 0.1 * g
        denominator = velocity_new - average_new**2 + 1e-7
    increment = 0.01 * g / np.sqrt(denominator)
    expected = w - (momentum * mom + increment if momentum else increment)
    live = element != 0
    np.testing.assert_array_equal(var.cpu().numpy()[~live], w[~live])
    np.testing.assert_allclose(var.cpu().numpy()[live], expected[live], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(velocity_t.cpu().numpy()[live], velocity_new[live], rtol=1e-5, atol=1e-6)
