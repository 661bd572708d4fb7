"""grad_mask on masked_matmul and masked_conv2d: frozen weights get exact-zero
gradients, trainable ones the reference's gradient times mask * grad_mask."""

import numpy as np
import pytest
import tensorflow as tf

import masked_ops
from reference import (
    conv_element_mask,
    element_mask,
    masked_conv2d_reference,
    masked_matmul_reference,
    random_block_mask,
    tolerance,
)

MATMUL_BLOCK = (16, 8)


def matmul_masks(rng, k, n, mask_level, grad_level):
    grid = (-(-k // MATMUL_BLOCK[0]), -(-n // MATMUL_BLOCK[1]))
    mask = random_block_mask(rng, grid, 0.7) * rng.choice([1.0, 2.0], grid)
    grad_mask = random_block_mask(rng, grid, 0.5) * rng.choice([1.0, 0.5], grid)
    if mask_level == "element":
        mask = element_mask(mask, (k, n), MATMUL_BLOCK) * (rng.random((k, n)) < 0.9)
    if grad_level == "element":
        grad_mask = element_mask(grad_mask, (k, n), MATMUL_BLOCK) * (rng.random((k, n)) < 0.8)
    return mask.astype(np.float32), grad_mask.astype(np.float32)


def tape_gradients(function, x, w, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = function(x, w)
        loss = tf.reduce_sum(y * dy)
    return (y, *tape.gradient(loss, [x, w]))


@pytest.mark.parametrize("shape", [(5, 37, 29), (64, 48, 40), (1, 16, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_level", ["block", "element"])
@pytest.mark.parametrize("grad_level", ["block", "element"])
def test_matmul_weight_gradient_is_masked_by_grad_mask(shape, mask_level, grad_level):
    m, k, n = shape
    rng = np.random.default_rng([m, k, n])
    mask, grad_mask = matmul_masks(rng, k, n, mask_level, grad_level)
    x = tf.constant(rng.standard_normal((m, k)).astype(np.float32))
    w = tf.constant(rng.standard_normal((k, n)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((m, n)).astype(np.float32))
    y, dx, dw = tape_gradients(
        lambda x, w: masked_ops.masked_matmul(x, w, mask, block_size=MATMUL_BLOCK, grad_mask=grad_mask), x, w, dy
    )
    y_plain, dx_plain, _ = tape_gradients(
        lambda x, w: masked_ops.masked_matmul(x, w, mask, block_size=MATMUL_BLOCK), x, w, dy
    )
    _, _, dw_reference = tape_gradients(
        lambda x, w: masked_matmul_reference(x, w, mask, MATMUL_BLOCK), x, w, dy
    )
    frozen_factor = element_mask(grad_mask, (k, n), MATMUL_BLOCK)
    # The forward pass and dx do not see grad_mask at all.
    np.testing.assert_array_equal(y.numpy(), y_plain.numpy())
    np.testing.assert_array_equal(dx.numpy(), dx_plain.numpy())
    rtol, atol = tolerance(np.float32, m)
    np.testing.assert_allclose(dw.numpy(), dw_reference.numpy() * frozen_factor, rtol=rtol, atol=atol)
    assert np.all(dw.numpy()[frozen_factor == 0] == 0)


def test_matmul_everything_frozen_gives_exact_zeros_even_from_nan():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    x[3, 5] = np.nan
    w = tf.constant(rng.standard_normal((32, 16)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_sum(
            masked_ops.masked_matmul(x, w, np.ones((2, 1)), block_size=16, grad_mask=np.zeros((2, 1), bool))
        )
    dw = tape.gradient(loss, w)
    np.testing.assert_array_equal(dw.numpy(), np.zeros((32, 16), np.float32))


def test_matmul_grad_mask_in_a_tf_function_and_bool_dtype():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((6, 32)).astype(np.float32))
    w = tf.Variable(rng.standard_normal((32, 32)).astype(np.float32))
    grad_mask = np.array([[True, False], [False, True]])

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(
                masked_ops.masked_matmul(x, w, np.ones((2, 2), np.float32), block_size=16, grad_mask=grad_mask)
            )
        return tape.gradient(loss, w)

    dw = gradient().numpy()
    expected = np.tile(tf.reduce_sum(x, axis=0).numpy()[:, None], (1, 32)) * element_mask(grad_mask, (32, 32), (16, 16))
    np.testing.assert_allclose(dw, expected, rtol=1e-5, atol=1e-5)
    assert np.all(dw[:16, 16:] == 0) and np.all(dw[16:, :16] == 0)


def test_grad_mask_of_a_third_shape_is_rejected():
    with pytest.raises(ValueError, match="grad_mask of shape"):
        masked_ops.masked_matmul(np.ones((2, 32), np.float32), np.ones((32, 32), np.float32), np.ones((2, 2)),
                                 block_size=16, grad_mask=np.ones((4, 4)))


CONV_GEOMETRIES = [
    # (batch, h, w, cin, cout, (kh, kw), strides, padding, with output mask)
    (2, 9, 11, 32, 48, (3, 3), 1, "SAME", False),
    (1, 13, 13, 17, 24, (3, 3), 2, "VALID", False),
    (2, 12, 10, 32, 16, (1, 1), 1, "SAME", False),
    (2, 9, 9, 16, 32, (3, 3), 1, "SAME", True),
]
CONV_BLOCK = (16, 16)


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: "-".join(map(str, g[:6])) + f"-s{g[6]}-{g[7]}-o{int(g[8])}")
@pytest.mark.parametrize("grad_level", ["block", "element"])
def test_conv_filter_gradient_is_masked_by_grad_mask(geometry, grad_level):
    n, h, w, cin, cout, (kh, kw), strides, padding, with_output_mask = geometry
    rng = np.random.default_rng([n, h, w, cin, cout, kh])
    grid = (-(-cin // CONV_BLOCK[0]), -(-cout // CONV_BLOCK[1]))
    mask = random_block_mask(rng, grid, 0.8) * 1.5
    grad_mask = random_block_mask(rng, grid, 0.5)
    if grad_level == "element":
        grad_mask = conv_element_mask(grad_mask, (kh, kw, cin, cout), CONV_BLOCK) * (rng.random((kh, kw, cin, 1)) < 0.7)
    x = tf.constant(rng.standard_normal((n, h, w, cin)).astype(np.float32))
    filters = tf.constant(rng.standard_normal((kh, kw, cin, cout)).astype(np.float32))
    out_shape = masked_conv2d_reference(x, filters, mask, None, strides, padding, 1, CONV_BLOCK).shape
    output_mask = (rng.random(out_shape[:3]) < 0.6).astype(np.float32) if with_output_mask else None
    dy = tf.constant(rng.standard_normal(out_shape).astype(np.float32))
    kwargs = {"strides": strides, "padding": padding, "output_mask": output_mask, "channel_block": CONV_BLOCK, "tile": 4}
    y, dx, dfilters = tape_gradients(
        lambda x, f: masked_ops.masked_conv2d(x, f, mask, grad_mask=grad_mask, **kwargs), x, filters, dy
    )
    y_plain, dx_plain, _ = tape_gradients(lambda x, f: masked_ops.masked_conv2d(x, f, mask, **kwargs), x, filters, dy)
    _, _, df_reference = tape_gradients(
        lambda x, f: masked_conv2d_reference(x, f, mask, output_mask, strides, padding, 1, CONV_BLOCK), x, filters, dy
    )
    frozen_factor = conv_element_mask(grad_mask, (kh, kw, cin, cout), CONV_BLOCK)
    np.testing.assert_array_equal(y.numpy(), y_plain.numpy())
    np.testing.assert_array_equal(dx.numpy(), dx_plain.numpy())
    rtol, atol = tolerance(np.float32, n * h * w)
    np.testing.assert_allclose(dfilters.numpy(), df_reference.numpy() * frozen_factor, rtol=rtol, atol=atol)
    assert np.all(dfilters.numpy()[frozen_factor == 0] == 0)


def test_conv_grad_mask_without_a_filter_mask():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((1, 6, 6, 32)).astype(np.float32))
    filters = tf.constant(rng.standard_normal((3, 3, 32, 32)).astype(np.float32))
    grad_mask = np.array([[1, 0], [0, 0]], np.float32)
    _, _, dfilters = tape_gradients(
        lambda x, f: masked_ops.masked_conv2d(x, f, padding="SAME", channel_block=16, grad_mask=grad_mask),
        x, filters, tf.ones((1, 6, 6, 32)),
    )
    _, _, reference = tape_gradients(lambda x, f: tf.nn.conv2d(x, f, 1, "SAME"), x, filters, tf.ones((1, 6, 6, 32)))
    np.testing.assert_allclose(dfilters[:, :, :16, :16], reference[:, :, :16, :16], rtol=1e-5, atol=1e-4)
    assert np.all(dfilters.numpy()[:, :, 16:, :] == 0) and np.all(dfilters.numpy()[:, :, :, 16:] == 0)


@pytest.mark.parametrize("x_shape", [(6, 40), (2, 3, 40), (40,)], ids=["2d", "3d", "1d"])
def test_matmul_without_a_weight_mask_uses_the_dense_product(x_shape):
    rng = np.random.default_rng(4)
    x = tf.constant(rng.standard_normal(x_shape).astype(np.float32))
    w = tf.constant(rng.standard_normal((40, 24)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((*x_shape[:-1], 24)).astype(np.float32))
    grad_mask = random_block_mask(rng, (3, 3), 0.5)
    y, dx, dw = tape_gradients(
        lambda x, w: masked_ops.masked_matmul(x, w, block_size=MATMUL_BLOCK, grad_mask=grad_mask), x, w, dy)
    y_ref, dx_ref, dw_ref = tape_gradients(lambda x, w: tf.tensordot(x, w, 1), x, w, dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-5)
    frozen_factor = element_mask(grad_mask, (40, 24), MATMUL_BLOCK)
    np.testing.assert_allclose(dw, dw_ref * frozen_factor, rtol=1e-5, atol=1e-5)
    assert np.all(dw.numpy()[frozen_factor == 0] == 0)
    np.testing.assert_allclose(masked_ops.masked_matmul(x, w), y_ref, rtol=1e-6, atol=1e-5)


EXPLICIT = [[0, 0], [2, 1], [0, 3], [0, 0]]


# TensorFlow's own CPU convolution has no gradient for explicit padding with
# dilations, so the reference cannot take that case.
@pytest.mark.parametrize(
    "padding, strides, dilations",
    [(p, s, d) for p in ("SAME", "VALID", EXPLICIT) for s, d in ((1, 1), (2, 1), (1, 2)) if not (p is EXPLICIT and d > 1)],
    ids=lambda v: "explicit" if v is EXPLICIT else str(v),
)
def test_conv_without_a_filter_mask_uses_tensorflows_convolution(padding, strides, dilations):
    rng = np.random.default_rng(5)
    x = tf.constant(rng.standard_normal((2, 11, 9, 32)).astype(np.float32))
    filters = tf.constant(rng.standard_normal((3, 3, 32, 16)).astype(np.float32))
    grad_mask = conv_element_mask(np.array([[1.0], [0.0]]), (3, 3, 32, 16), (16, 16)) * (rng.random((3, 3, 1, 16)) < 0.6)
    reference = lambda x, f: tf.nn.conv2d(x, f, strides, padding, dilations=dilations)  # noqa: E731
    dy = tf.constant(rng.standard_normal(reference(x, filters).shape).astype(np.float32))
    kwargs = {"strides": strides, "padding": padding, "dilations": dilations, "channel_block": 16}
    y, dx, dfilters = tape_gradients(
        lambda x, f: masked_ops.masked_conv2d(x, f, grad_mask=grad_mask, **kwargs), x, filters, dy)
    y_ref, dx_ref, df_ref = tape_gradients(reference, x, filters, dy)
    rtol, atol = tolerance(np.float32, 2 * 11 * 9)
    if dilations == 1:
        np.testing.assert_array_equal(y.numpy(), y_ref.numpy())
        np.testing.assert_array_equal(dx.numpy(), dx_ref.numpy())
    else:  # dilated: the masked kernels with every block live
        np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=rtol, atol=atol)
        np.testing.assert_allclose(dx.numpy(), dx_ref.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dfilters.numpy(), df_ref.numpy() * grad_mask, rtol=rtol, atol=atol)
    assert np.all(dfilters.numpy()[grad_mask == 0] == 0)
