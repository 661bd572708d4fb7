"""grad_mask on MaskedDense and MaskedConv2D, and the freeze helpers."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import masked_ops
from masked_ops.layers import MaskedConv2D, MaskedDense
from reference import conv_element_mask, element_mask, random_block_mask


def kernel_gradient(layer, x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(layer(x)))
    return tape.gradient(loss, layer.kernel)


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_dense_kernel_gradient_is_frozen_where_grad_mask_is_zero(granularity):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 40)).astype(np.float32)
    mask = random_block_mask(rng, (3, 3), 0.8)
    grad_mask = random_block_mask(rng, (3, 3), 0.5)
    layer = MaskedDense(21, block_size=(16, 8), mask=mask, grad_mask_granularity=granularity)
    layer.build((None, 40))
    layer.set_grad_mask(grad_mask)
    assert tuple(layer.grad_mask.shape) == ((40, 21) if granularity == "element" else (3, 3))
    frozen = kernel_gradient(layer, x).numpy()
    plain = MaskedDense(21, block_size=(16, 8), mask=mask)
    plain.build((None, 40))
    plain.kernel.assign(layer.kernel)
    plain.bias.assign(layer.bias)
    expected = kernel_gradient(plain, x).numpy() * element_mask(grad_mask, (40, 21), (16, 8))
    np.testing.assert_allclose(frozen, expected, rtol=1e-6, atol=1e-6)
    assert np.all(frozen[element_mask(grad_mask, (40, 21), (16, 8)) == 0] == 0)


def conv_model(grad_mask):
    inputs = keras.Input((9, 9, 16))
    hidden = MaskedConv2D(32, 3, padding="same", activation="relu", channel_block=16, grad_mask=grad_mask,
                          name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = MaskedDense(4, block_size=16, grad_mask=np.array([[1.0], [0.0]], np.float32), name="out")(pooled)
    return keras.Model(inputs, outputs)


def test_frozen_blocks_stay_bit_exact_through_fit_with_plain_sgd():
    rng = np.random.default_rng(1)
    grad_mask = np.array([[1.0, 0.0]], np.float32)
    model = conv_model(grad_mask)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = {name: model.get_layer(name).kernel.numpy().copy() for name in ("conv", "out")}
    x = rng.standard_normal((32, 9, 9, 16)).astype(np.float32)
    y = rng.standard_normal((32, 4)).astype(np.float32)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    conv_kernel = model.get_layer("conv").kernel.numpy()
    np.testing.assert_array_equal(conv_kernel[..., 16:], before["conv"][..., 16:])
    assert not np.allclose(conv_kernel[..., :16], before["conv"][..., :16])
    out_kernel = model.get_layer("out").kernel.numpy()
    np.testing.assert_array_equal(out_kernel[16:], before["out"][16:])
    assert not np.allclose(out_kernel[:16], before["out"][:16])


def test_grad_mask_round_trips_through_keras_file(tmp_path):
    model = conv_model(np.array([[0.0, 1.0]], np.float32))
    path = os.path.join(tmp_path, "frozen.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for name in ("conv", "out"):
        np.testing.assert_array_equal(loaded.get_layer(name).grad_mask.numpy(), model.get_layer(name).grad_mask.numpy())
        assert not loaded.get_layer(name).grad_mask.trainable
        assert loaded.get_layer(name).grad_mask_granularity == "block"


def test_layers_without_grad_mask_have_none_and_refuse_one_after_build():
    layer = MaskedDense(8, block_size=4)
    layer.build((None, 8))
    assert layer.grad_mask is None and layer.get_config()["grad_mask_granularity"] is None
    with pytest.raises(ValueError, match="grad_mask_granularity"):
        layer.set_grad_mask(np.ones((2, 2)))
    early = MaskedDense(8, block_size=4)
    early.set_grad_mask(np.array([[1, 0], [0, 1]], bool))
    early.build((None, 8))
    np.testing.assert_array_equal(early.grad_mask.numpy(), [[1, 0], [0, 1]])


def test_block_norms_match_numpy():
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((3, 3, 20, 10)).astype(np.float32)
    norms = masked_ops.freeze.block_norms(kernel, (8, 4), "l2").numpy()
    l1 = masked_ops.freeze.block_norms(kernel, (8, 4), "l1").numpy()
    assert norms.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            block = kernel[:, :, i * 8:(i + 1) * 8, j * 4:(j + 1) * 4]
            np.testing.assert_allclose(norms[i, j], np.sqrt(np.sum(block**2)), rtol=1e-5)
            np.testing.assert_allclose(l1[i, j], np.sum(np.abs(block)), rtol=1e-5)


def test_train_top_k_blocks_keeps_the_largest_gradients():
    layer = MaskedDense(16, block_size=8, grad_mask_granularity="block")
    layer.build((None, 24))
    gradient = np.zeros((24, 16), np.float32)
    gradient[8:16, 0:8] = 5.0
    gradient[16:24, 8:16] = -3.0
    gradient[0:8, 0:8] = 0.1
    grad_mask = masked_ops.freeze.train_top_k_blocks(layer, gradient, 2)
    np.testing.assert_array_equal(grad_mask, [[0, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(layer.grad_mask.numpy(), grad_mask)


def test_freeze_output_channels_at_both_granularities():
    conv = MaskedConv2D(8, 3, channel_block=4, grad_mask_granularity="element")
    conv.build((None, 6, 6, 5))
    masked_ops.freeze.freeze_output_channels(conv, 3)
    element = conv.grad_mask.numpy()
    assert np.all(element[..., :3] == 0) and np.all(element[..., 3:] == 1)
    dense = MaskedDense(8, block_size=4, grad_mask_granularity="block")
    dense.build((None, 6))
    masked_ops.freeze.freeze_output_channels(dense, 4)
    np.testing.assert_array_equal(dense.grad_mask.numpy(), [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="element granularity"):
        masked_ops.freeze.freeze_output_channels(dense, 3)


def test_conv_layer_gradient_frozen_by_element_grad_mask():
    rng = np.random.default_rng(3)
    grad_mask = conv_element_mask(np.array([[1.0, 0.0], [0.0, 1.0]]), (3, 3, 32, 32), (16, 16))
    grad_mask = grad_mask * (rng.random((3, 3, 32, 32)) < 0.5)
    layer = MaskedConv2D(32, 3, padding="same", channel_block=16, grad_mask=grad_mask)
    x = rng.standard_normal((2, 7, 7, 32)).astype(np.float32)
    gradient = kernel_gradient(layer, x).numpy()
    assert layer.grad_mask_granularity == "element"
    assert np.all(gradient[grad_mask == 0] == 0)
    assert np.count_nonzero(gradient[grad_mask != 0]) > 0.9 * np.count_nonzero(grad_mask)


def test_layers_without_a_weight_mask_match_keras_and_still_freeze(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 9, 9, 16)).astype(np.float32)
    inputs = keras.Input((9, 9, 16))
    conv = MaskedConv2D(32, 3, padding="same", channel_block=16, use_mask=False, grad_mask_granularity="block",
                        name="conv")
    dense = MaskedDense(8, block_size=16, use_mask=False, grad_mask=np.array([[0.0], [1.0]]), name="dense")
    outputs = dense(keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    model = keras.Model(inputs, outputs)
    assert conv.mask is None and dense.mask is None
    with pytest.raises(ValueError, match="use_mask=False"):
        dense.set_mask(np.ones((2, 1)))
    plain_conv = keras.layers.Conv2D(32, 3, padding="same")
    plain_conv.build((None, 9, 9, 16))
    plain_conv.set_weights(conv.get_weights()[:2])
    np.testing.assert_array_equal(conv(x).numpy(), plain_conv(x).numpy())
    conv.set_grad_mask(np.array([[1.0, 0.0]]))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(model(x)))
    conv_grad, dense_grad = tape.gradient(loss, [conv.kernel, dense.kernel])
    assert np.all(conv_grad.numpy()[..., 16:] == 0) and np.any(conv_grad.numpy()[..., :16] != 0)
    assert np.all(dense_grad.numpy()[:16] == 0) and np.any(dense_grad.numpy()[16:] != 0)
    path = os.path.join(tmp_path, "no_mask.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("conv").mask is None and not loaded.get_layer("conv").use_mask
    np.testing.assert_array_equal(loaded.get_layer("conv").grad_mask.numpy(), [[1.0, 0.0]])
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


def test_masks_given_to_a_layer_built_inside_fit_are_kept():
    """A regression: a Sequential without an Input builds its layers while
    fit traces the step; masks assigned then were lost."""
    rng = np.random.default_rng(5)
    mask = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    grad_mask = np.array([[0.0, 1.0], [1.0, 1.0]], np.float32)
    layer = MaskedDense(16, block_size=8, mask=mask, grad_mask=grad_mask)
    model = keras.Sequential([layer, keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(rng.standard_normal((8, 16)), rng.standard_normal((8, 2)), epochs=1, verbose=0)
    np.testing.assert_array_equal(layer.mask.numpy(), mask)
    np.testing.assert_array_equal(layer.grad_mask.numpy(), grad_mask)
