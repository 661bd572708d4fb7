"""MaskedConv2D as a drop-in for keras.layers.Conv2D, and a small CNN that trains with it."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from masked_ops.layers import MaskedConv2D
from reference import masked_conv2d_reference, random_block_mask


def test_matches_keras_conv2d_with_all_ones_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 11, 9, 13)).astype(np.float32)
    conv = keras.layers.Conv2D(10, 3, strides=2, padding="same", activation="relu")
    masked = MaskedConv2D(10, 3, strides=2, padding="same", activation="relu", channel_block=8)
    conv.build(x.shape)
    masked.build(x.shape)
    masked.kernel.assign(conv.kernel)
    masked.bias.assign(rng.standard_normal(10).astype(np.float32))
    conv.bias.assign(masked.bias)
    y = masked(x)
    assert y.shape == conv.compute_output_shape(x.shape) == masked.compute_output_shape(x.shape)
    np.testing.assert_allclose(y, conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_masks_match_reference(granularity):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 12, 12, 20)).astype(np.float32)
    layer = MaskedConv2D(12, (3, 1), padding="valid", dilation_rate=(2, 1), channel_block=(8, 4),
                         tile=4, mask_granularity=granularity, use_bias=False)
    layer.build(x.shape)
    layer.set_mask(random_block_mask(rng, (3, 3), 0.5))
    if granularity == "element":
        assert tuple(layer.mask.shape) == (3, 1, 20, 12)
        layer.set_mask(layer.mask.numpy() * rng.uniform(-1, 2, (3, 1, 20, 12)).astype(np.float32))
    else:
        assert tuple(layer.mask.shape) == (3, 3)
    output_mask = (rng.random((2, 8, 12)) < 0.5).astype(np.float32)
    y = layer(x, output_mask=output_mask)
    expected = masked_conv2d_reference(x, layer.kernel, layer.mask.numpy(), output_mask, 1, "VALID",
                                       (2, 1), (8, 4))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_config_and_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    inputs = keras.Input((10, 10, 6))
    layer = MaskedConv2D(8, 3, padding="same", activation="relu", channel_block=(4, 4), tile=(2, 5))
    model = keras.Model(inputs, layer(inputs))
    layer.set_mask(random_block_mask(rng, (2, 2), 0.5))
    clone = MaskedConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = rng.standard_normal((3, 10, 10, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
    np.testing.assert_array_equal(loaded.layers[-1].mask.numpy(), layer.mask.numpy())


def test_rejects_what_it_does_not_support():
    with pytest.raises(ValueError, match="channels_last"):
        MaskedConv2D(4, 3, data_format="channels_first")
    with pytest.raises(ValueError, match="groups"):
        MaskedConv2D(4, 3, groups=2)
    with pytest.raises(ValueError, match="padding"):
        MaskedConv2D(4, 3, padding="causal")
    layer = MaskedConv2D(4, 3, channel_block=4)
    layer.build((None, 8, 8, 8))
    with pytest.raises(ValueError, match="fits neither"):
        layer.set_mask(np.ones((3, 3), np.float32))


def test_small_cnn_trains_and_masked_blocks_stay_zero_in_effect():
    """A two-conv CNN with half its channel blocks masked learns a toy task,
    and the masked filter blocks receive exactly zero gradient all along."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((256, 12, 12, 4)).astype(np.float32)
    # Label: is the top-left quadrant brighter than the bottom-right one?
    labels = (images[:, :6, :6].mean(axis=(1, 2, 3)) > images[:, 6:, 6:].mean(axis=(1, 2, 3))).astype(np.int32)
    keras.utils.set_random_seed(0)
    first = MaskedConv2D(16, 3, padding="same", activation="relu", channel_block=(4, 4))
    second = MaskedConv2D(16, 3, strides=2, padding="same", activation="relu", channel_block=(4, 4))
    model = keras.Sequential([
        keras.Input((12, 12, 4)),
        first,
        second,
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
    second_mask = random_block_mask(rng, (4, 4), 0.5)
    second.set_mask(second_mask)
    kernel_before = second.kernel.numpy()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    initial_loss = model.evaluate(images, labels, verbose=0)[0]
    history = model.fit(images, labels, epochs=15, batch_size=32, verbose=0)
    final_loss, accuracy = model.evaluate(images, labels, verbose=0)
    assert final_loss < 0.5 * initial_loss
    assert accuracy > 0.9
    assert history.history["loss"][-1] < history.history["loss"][0]
    # Adam moves nothing whose gradient has always been exactly zero.
    dead = np.repeat(np.repeat(second_mask == 0, 4, axis=0), 4, axis=1)
    kernel_after = second.kernel.numpy()
    np.testing.assert_array_equal(kernel_after[:, :, dead], kernel_before[:, :, dead])
    assert np.any(kernel_after[:, :, ~dead] != kernel_before[:, :, ~dead])
