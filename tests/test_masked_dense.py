"""MaskedDense as a drop-in for keras.layers.Dense."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from masked_ops.layers import MaskedDense
from reference import element_mask, random_block_mask


def reference_dense(layer, x):
    """activation(x @ where(mask != 0, kernel * mask, 0) + bias) in plain NumPy."""
    kernel = layer.kernel.numpy()
    mask = element_mask(layer.mask.numpy(), kernel.shape, layer.block_size)
    y = np.asarray(x) @ np.where(mask != 0, kernel * mask, 0)
    if layer.bias is not None:
        y = y + layer.bias.numpy()
    return y


def test_matches_keras_dense_with_all_ones_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 37)).astype(np.float32)
    dense = keras.layers.Dense(19, activation="relu")
    masked = MaskedDense(19, activation="relu", block_size=(8, 8))
    dense.build((None, 37))
    masked.build((None, 37))
    masked.kernel.assign(dense.kernel)
    masked.bias.assign(rng.standard_normal(19).astype(np.float32))
    dense.bias.assign(masked.bias)
    np.testing.assert_allclose(masked(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["block", "element"])
@pytest.mark.parametrize("input_shape", [(5, 40), (2, 3, 40)])
def test_output_matches_masked_reference(granularity, input_shape):
    rng = np.random.default_rng(1)
    layer = MaskedDense(21, block_size=(16, 8), mask_granularity=granularity)
    layer.build((None, 40))
    block_mask = random_block_mask(rng, (3, 3), 0.5)
    layer.set_mask(block_mask)
    if granularity == "element":
        assert tuple(layer.mask.shape) == (40, 21)
        layer.set_mask(layer.mask.numpy() * rng.uniform(-1, 2, (40, 21)).astype(np.float32))
    else:
        assert tuple(layer.mask.shape) == (3, 3)
    x = rng.standard_normal(input_shape).astype(np.float32)
    y = layer(x)
    assert y.shape == input_shape[:-1] + (21,)
    np.testing.assert_allclose(y, reference_dense(layer, x), rtol=1e-5, atol=1e-5)


def test_mask_given_to_the_constructor_picks_the_granularity():
    rng = np.random.default_rng(2)
    element = (rng.random((10, 6)) < 0.5).astype(np.float32)
    layer = MaskedDense(6, block_size=4, mask=element)
    layer.build((None, 10))
    assert layer.mask_granularity == "element"
    np.testing.assert_array_equal(layer.mask.numpy(), element)

    block = MaskedDense(6, block_size=4, mask=np.array([[1, 0], [0, 1], [1, 1]], bool))
    block.build((None, 10))
    assert block.mask_granularity == "block"
    np.testing.assert_array_equal(block.mask.numpy(), [[1, 0], [0, 1], [1, 1]])


def test_set_mask_rejects_shapes_the_layer_cannot_hold():
    layer = MaskedDense(6, block_size=4)
    layer.build((None, 10))
    with pytest.raises(ValueError, match="element-level would be"):
        layer.set_mask(np.ones((10, 6)))
    with pytest.raises(ValueError, match="must have rank 2"):
        layer.set_mask(np.ones((3,)))


def test_constructor_validation():
    with pytest.raises(ValueError, match="units"):
        MaskedDense(0)
    with pytest.raises(ValueError, match="mask_granularity"):
        MaskedDense(3, mask_granularity="rows")
    with pytest.raises(tf.errors.InvalidArgumentError, match="block_size"):
        MaskedDense(3, block_size=0)


def test_unsupported_compute_dtype_is_a_clear_error():
    layer = MaskedDense(4, dtype="int32")
    with pytest.raises(TypeError, match="computes in .* not int32"):
        layer.build((None, 8))


def test_float64_layer():
    rng = np.random.default_rng(3)
    layer = MaskedDense(5, block_size=2, dtype="float64")
    x = rng.standard_normal((3, 7))
    y = layer(x)
    assert y.dtype == tf.float64
    np.testing.assert_allclose(y, reference_dense(layer, x), rtol=1e-12, atol=1e-12)


def _model(mask):
    inputs = keras.Input(shape=(32,))
    hidden = MaskedDense(64, block_size=16, activation="tanh", mask=mask, name="hidden")(inputs)
    outputs = MaskedDense(1, block_size=16, name="out")(hidden)
    return keras.Model(inputs, outputs)


def test_functional_model_has_static_shapes():
    model = _model(None)
    assert model.output.shape == (None, 1)


def test_model_trains_and_dead_blocks_stay_frozen():
    rng = np.random.default_rng(4)
    keras.utils.set_random_seed(4)
    mask = random_block_mask(rng, (2, 4), 0.5)
    model = _model(mask)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    y = np.sin(x[:, :1]) + 0.5 * x[:, 1:2]
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    hidden = model.get_layer("hidden")
    kernel_before = hidden.kernel.numpy()
    history = model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    dead = element_mask(mask, (32, 64), (16, 16)) == 0
    np.testing.assert_array_equal(hidden.kernel.numpy()[dead], kernel_before[dead])
    assert not np.array_equal(hidden.kernel.numpy()[~dead], kernel_before[~dead])


def test_keras_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    model = _model(random_block_mask(rng, (2, 4), 0.5))
    model.get_layer("out").set_mask(np.array([[1.0], [0.0], [0.5], [1.0]], np.float32))
    x = rng.standard_normal((10, 32)).astype(np.float32)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x), model(x))
    for name in ("hidden", "out"):
        np.testing.assert_array_equal(loaded.get_layer(name).mask.numpy(), model.get_layer(name).mask.numpy())
        assert not loaded.get_layer(name).mask.trainable


def test_get_config_round_trip():
    layer = MaskedDense(
        12,
        block_size=(4, 8),
        mask_granularity="element",
        activation="gelu",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(1e-3),
        activity_regularizer="l1",
        kernel_constraint=keras.constraints.MaxNorm(2.0),
        name="masked",
    )
    config = layer.get_config()
    clone = MaskedDense.from_config(config)
    assert clone.get_config() == config
    clone.build((None, 9))
    assert tuple(clone.mask.shape) == (9, 12)
    assert clone.bias is None
    assert len(clone.trainable_weights) == 1 and len(clone.non_trainable_weights) == 1
