"""masked_ops.keras: sparsify and strip existing models, and the mask utilities."""

import keras
import numpy as np
import pytest

import masked_ops
from masked_ops.freeze import block_norms
from masked_ops.layers import MaskedConv2D, MaskedDense


def cnn():
    inputs = keras.Input((10, 10, 8))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    head = keras.Sequential([keras.Input((800,)), keras.layers.Dense(64, activation="tanh", name="hidden"),
                             keras.layers.Dense(5, name="logits")], name="head")
    return keras.Model(inputs, head(x))


def all_layers(model):
    return {layer.name: layer for layer in model._flatten_layers(include_self=False, recursive=True)}


def test_all_ones_masks_keep_the_outputs():
    model = cnn()
    x = np.random.default_rng(0).standard_normal((3, 10, 10, 8)).astype(np.float32)
    sparse = masked_ops.keras.sparsify(model, block_size=16)
    layers = all_layers(sparse)
    assert isinstance(layers["conv"], MaskedConv2D) and isinstance(layers["hidden"], MaskedDense)
    assert isinstance(layers["logits"], MaskedDense)
    np.testing.assert_allclose(sparse(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert masked_ops.keras.densities(sparse) == {"conv": 1.0, "hidden": 1.0, "logits": 1.0}


def test_density_keeps_the_largest_blocks():
    model = cnn()
    sparse = masked_ops.keras.sparsify(model, density=0.25, block_size=16, layers=["conv", "hidden"])
    layers = all_layers(sparse)
    assert type(layers["logits"]) is keras.layers.Dense
    hidden = layers["hidden"]
    mask = hidden.mask.numpy()
    assert mask.shape == (50, 4) and mask.sum() == round(0.25 * 200)
    norms = block_norms(all_layers(model)["hidden"].kernel, (16, 16)).numpy()
    assert norms[mask == 1].min() >= norms[mask == 0].max()
    # The conv has two 16 x 16 blocks: a quarter rounds to none, and a layer
    # keeps at least one.
    assert masked_ops.keras.densities(sparse)["conv"] == 0.5


def test_given_masks_and_strip():
    model = cnn()
    rng = np.random.default_rng(1)
    element = (rng.random((800, 64)) < 0.5).astype(np.float32)
    sparse = masked_ops.keras.sparsify(model, masks={"hidden": element, "conv": np.array([[1.0, 0.0]])},
                                       block_size=16)
    x = rng.standard_normal((2, 10, 10, 8)).astype(np.float32)
    assert all_layers(sparse)["hidden"].mask_granularity == "element"
    plain = masked_ops.keras.strip(sparse)
    layers = all_layers(plain)
    assert type(layers["conv"]) is keras.layers.Conv2D and type(layers["hidden"]) is keras.layers.Dense
    np.testing.assert_allclose(plain(x).numpy(), sparse(x).numpy(), rtol=1e-5, atol=1e-5)
    kernel = layers["hidden"].kernel.numpy()
    assert np.all(kernel[element == 0] == 0)
    assert np.all(layers["conv"].kernel.numpy()[..., 16:] == 0)


def test_global_magnitude_masks_and_random_masks():
    model = cnn()
    global_masks = masked_ops.keras.magnitude_masks(model, 0.3, block_size=(16, 16), scope="global")
    kept = sum(mask.sum() for mask in global_masks.values())
    total = sum(mask.size for mask in global_masks.values())
    assert kept == round(0.3 * total)
    first = masked_ops.keras.random_masks(model, 0.5, block_size=(16, 16), seed=3)
    again = masked_ops.keras.random_masks(model, 0.5, block_size=(16, 16), seed=3)
    for name, mask in first.items():
        np.testing.assert_array_equal(mask, again[name])
        assert mask.sum() == round(0.5 * mask.size)


def test_n_m_mask():
    kernel = np.random.default_rng(4).standard_normal((3, 3, 10, 6))
    mask = masked_ops.keras.n_m_mask(kernel, 2, 4)
    groups = mask[..., :8, :].reshape(3, 3, 2, 4, 6)
    assert np.all(groups.sum(axis=3) == 2)
    assert np.all(mask[..., 8:, :].sum(axis=2) == 1)  # a last group of 2 keeps round(2 * 2 / 4) = 1
    kept = np.abs(kernel[..., :4, :])[mask[..., :4, :] == 1].min()
    assert kept >= np.abs(kernel[..., :4, :])[mask[..., :4, :] == 0].min()


def test_polynomial_density_schedule():
    schedule = lambda step: masked_ops.keras.polynomial_density(  # noqa: E731
        step, target_density=0.2, begin_step=10, end_step=30, power=3)
    assert schedule(0) == 1.0 and schedule(10) == 1.0
    assert schedule(30) == pytest.approx(0.2) and schedule(100) == pytest.approx(0.2)
    values = [schedule(step) for step in range(10, 31)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_pruning_callback_empties_masks_during_fit():
    rng = np.random.default_rng(5)
    model = masked_ops.keras.sparsify(keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(64, activation="relu", name="a"), keras.layers.Dense(4, name="b")]),
        block_size=16)
    model.compile(optimizer="adam", loss="mse")
    x, y = rng.standard_normal((160, 64)).astype(np.float32), rng.standard_normal((160, 4)).astype(np.float32)
    history = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            history.append(self.model.get_layer("a").mask.numpy().copy())

    pruning = masked_ops.keras.PruningCallback(0.25, begin_step=2, end_step=14, frequency=4)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[pruning, Record()])
    assert masked_ops.keras.densities(model) == {"a": 0.25, "b": 0.25}
    for before, after in zip(history, history[1:]):
        assert np.all(after <= before)  # pruned blocks stay pruned
    assert np.count_nonzero(history[0]) > np.count_nonzero(history[-1])
