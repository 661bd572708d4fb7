"""float16 and bfloat16: the ops (computed in float32 on the CPU, rounded) and
the layers under a mixed-precision policy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import masked_ops
from masked_ops.layers import MaskedConv2D, MaskedDense
from reference import masked_conv2d_reference, masked_matmul_reference, random_block_mask

HALF_TYPES = [tf.float16, tf.bfloat16]
TOLERANCE = {tf.float16: 5e-3, tf.bfloat16: 3e-2}


def rounded(rng, shape, dtype):
    """Random values already representable in dtype, and their float32 copy."""
    values = tf.cast(tf.constant(rng.standard_normal(shape).astype(np.float32)), dtype)
    return values, tf.cast(values, tf.float32)


def assert_close(actual, expected, dtype, scale):
    assert actual.dtype == dtype
    np.testing.assert_allclose(tf.cast(actual, tf.float32).numpy(), expected.numpy(),
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_masked_matmul_and_gradients(dtype):
    rng = np.random.default_rng(0)
    mask = random_block_mask(rng, (3, 4), 0.5)
    x, x32 = rounded(rng, (9, 40), dtype)
    w, w32 = rounded(rng, (40, 30), dtype)
    dy, dy32 = rounded(rng, (9, 30), dtype)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w, x32, w32])
        y = masked_ops.masked_matmul(x, w, mask, block_size=(16, 8))
        y32 = masked_matmul_reference(x32, w32, mask, (16, 8))
        loss, loss32 = tf.reduce_sum(tf.cast(y, tf.float32) * dy32), tf.reduce_sum(y32 * dy32)
    assert_close(y, y32, dtype, np.sqrt(40))
    for got, want in zip(tape.gradient(loss, [x, w]), tape.gradient(loss32, [x32, w32])):
        assert_close(got, want, dtype, np.sqrt(40))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
def test_masked_conv2d_and_gradients(dtype, with_output_mask):
    rng = np.random.default_rng(1)
    mask = random_block_mask(rng, (2, 2), 0.5)
    x, x32 = rounded(rng, (2, 9, 9, 32), dtype)
    f, f32 = rounded(rng, (3, 3, 32, 16), dtype)
    output_mask = (rng.random((2, 9, 9)) < 0.6).astype(np.float32) if with_output_mask else None
    kwargs = {"strides": 1, "padding": "SAME", "dilations": 1}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, f, x32, f32])
        y = masked_ops.masked_conv2d(x, f, mask, output_mask=output_mask, channel_block=(16, 8), tile=4, **kwargs)
        y32 = masked_conv2d_reference(x32, f32, mask, output_mask, 1, "SAME", 1, (16, 8))
        loss, loss32 = tf.reduce_sum(tf.cast(y, tf.float32) ** 2) / 2, tf.reduce_sum(y32**2) / 2
    assert_close(y, y32, dtype, np.sqrt(9 * 32))
    for got, want in zip(tape.gradient(loss, [x, f]), tape.gradient(loss32, [x32, f32])):
        assert_close(got, want, dtype, 30.0 * np.sqrt(9 * 32))


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_layers_train_under_mixed_bfloat16(mixed_bfloat16):
    rng = np.random.default_rng(2)
    inputs = keras.Input((8, 8, 16))
    conv = MaskedConv2D(32, 3, padding="same", activation="relu", channel_block=16, grad_mask_granularity="block")
    hidden = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = MaskedDense(4, block_size=16, mask=np.array([[1.0], [0.0]], np.float32))
    model = keras.Model(inputs, dense(hidden))
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32" and conv.mask.dtype == "float32"
    assert model(np.zeros((1, 8, 8, 16), np.float32)).dtype == "bfloat16"
    conv.set_grad_mask(np.array([[1.0, 0.0]], np.float32))
    model.compile(optimizer=masked_ops.optimizers.BlockFreeze(keras.optimizers.Adam(0.01)), loss="mse")
    frozen = conv.kernel.numpy()[..., 16:].copy()
    x = rng.standard_normal((32, 8, 8, 16)).astype(np.float32)
    y = rng.standard_normal((32, 4)).astype(np.float32)
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0).history["loss"]
    assert np.isfinite(history).all() and history[-1] < history[0]
    np.testing.assert_array_equal(conv.kernel.numpy()[..., 16:], frozen)
