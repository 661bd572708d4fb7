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


def bits(tensor):
    return tf.bitcast(tensor, tf.uint16).numpy()


def every_value(dtype):
    """All 65,536 bit patterns of a 16-bit float type, as a [256, 256] tensor."""
    return tf.bitcast(tf.constant(np.arange(65536, dtype=np.uint16).reshape(256, 256)), dtype)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("level", ["block", "element"])
def test_mask_gradients_is_the_product_in_the_16_bit_type(dtype, level):
    """Every value of the type (subnormals, Inf, NaN included) times factors
    that round, overflow or vanish in it: bit for bit the reference's
    where(m != 0, g * cast(m, T), 0), NaN exactly where it has NaN."""
    rng = np.random.default_rng(3)
    factors = rng.choice([0.0, 1.5, -0.3, 3.1e4, 1e-10, 1.0, 1.1], (16, 16))
    element = np.repeat(np.repeat(factors, 16, 0), 16, 1)
    if level == "element":
        element = element * rng.choice([0.0, 1.0, -2.7], (256, 256))
    mask = element if level == "element" else factors
    grad = every_value(dtype)
    masked = masked_ops.mask_gradients([grad], [mask.astype(np.float32)], block_size=(16, 16))[0]
    live = element != 0
    expected = tf.where(live, grad * tf.cast(element.astype(np.float32), dtype), tf.zeros_like(grad))
    nan = np.isnan(tf.cast(expected, tf.float32).numpy())
    np.testing.assert_array_equal(np.isnan(tf.cast(masked, tf.float32).numpy()), nan)
    np.testing.assert_array_equal(bits(masked)[~nan], bits(expected)[~nan])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("mode", ["assign", "add", "sub"])
def test_masked_update_in_the_16_bit_type(dtype, mode):
    rng = np.random.default_rng(4)
    initial = tf.cast(rng.standard_normal((40, 24)) * 300, dtype)
    value = tf.cast(rng.standard_normal((40, 24)) * 300, dtype)
    block_mask = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]], np.float32)
    live = np.repeat(np.repeat(block_mask, 16, 0), 8, 1)[:40, :24] != 0
    variable = tf.Variable(initial)
    masked_ops.optimizers.masked_update(variable, value, block_mask, block_size=(16, 8), mode=mode)
    updated = {"assign": value, "add": initial + value, "sub": initial - value}[mode]
    np.testing.assert_array_equal(bits(variable), bits(tf.where(live, updated, initial)))


# beta_2 = 0.99: Keras computes 1 - beta_2^t in the variable's dtype, and
# 0.999 is 1.0 in bfloat16 (Adam would not move at all).
FUSED_OPTIMIZERS = {
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "amsgrad": lambda: keras.optimizers.Adam(0.1, beta_2=0.99, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.1, beta_2=0.99, weight_decay=0.1),
    "rmsprop-centered-momentum": lambda: keras.optimizers.RMSprop(0.05, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("name", list(FUSED_OPTIMIZERS))
def test_block_freeze_fused_steps_on_16_bit_variables(dtype, name):
    """A 16-bit variable frozen by BlockFreeze takes the fused step: frozen
    entries keep their bits, the others follow the wrapped optimizer's own
    16-bit step (which rounds every intermediate where the fused step rounds
    only what it stores) within a few units in the last place."""
    rng = np.random.default_rng(5)
    block_mask = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]], np.float32)
    trainable = np.repeat(np.repeat(block_mask, 16, 0), 8, 1)[:40, :24] != 0
    start = tf.cast(rng.standard_normal((40, 24)), dtype)
    variable = keras.Variable(start, dtype=dtype)
    reference = keras.Variable(start, dtype=dtype)
    optimizer = masked_ops.optimizers.BlockFreeze(FUSED_OPTIMIZERS[name](), [(variable, block_mask)], block_size=(16, 8))
    reference_optimizer = FUSED_OPTIMIZERS[name]()
    step = tf.function(lambda grad: optimizer.apply([grad], [variable]))
    assert "MaskedOps>Masked" in str([op.type for op in step.get_concrete_function(
        tf.TensorSpec((40, 24), dtype)).graph.get_operations()])
    for _ in range(5):
        grad = tf.cast(rng.uniform(0.5, 1.0, (40, 24)), dtype)
        step(grad)
        reference_optimizer.apply([grad], [reference])
    np.testing.assert_array_equal(bits(variable.value)[~trainable], bits(start)[~trainable])
    moved = tf.cast(variable.value, tf.float32).numpy()[trainable]
    expected = tf.cast(reference.value, tf.float32).numpy()[trainable]
    assert np.abs(expected - tf.cast(start, tf.float32).numpy()[trainable]).min() > 0.1  # the steps do move it
    np.testing.assert_allclose(moved, expected, rtol=0, atol={tf.float16: 5e-3, tf.bfloat16: 5e-2}[dtype])
