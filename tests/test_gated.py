"""Gated and GatedRows: conditional execution that runs only what is on."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from masked_ops.layers import Gated, GatedRows, MaskedDense


class Counting(keras.layers.Layer):
    """A residual Dense that counts the rows it is run on."""

    def __init__(self, units=6, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)
        self.rows = tf.Variable(0, dtype=tf.int64, trainable=False)

    def call(self, x):
        self.rows.assign_add(tf.shape(x, out_type=tf.int64)[0])
        return x + self.dense(x)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_gated_runs_the_layer_only_when_on(graph):
    inner = Counting()
    gated = Gated(inner)
    x = tf.constant(np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32))
    gated(x, tf.constant(True))
    call = tf.function(gated.__call__) if graph else gated.__call__
    inner.rows.assign(0)
    np.testing.assert_array_equal(call(x, tf.constant(False)).numpy(), x.numpy())
    assert int(inner.rows.numpy()) == 0
    np.testing.assert_allclose(call(x, tf.constant(True)).numpy(), inner(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("gate_value", [False, True])
def test_gated_gradients_through_either_branch(gate_value):
    inner = keras.layers.Dense(6)
    gated = Gated(inner)
    x = tf.constant(np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32))
    gated(x, tf.constant(True))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(gated(x, tf.constant(gate_value)) ** 2)
    dx, dkernel = tape.gradient(loss, [x, inner.kernel])
    if gate_value:
        with tf.GradientTape() as tape:
            tape.watch(x)
            reference = tf.reduce_sum(inner(x) ** 2)
        expected_dx, expected_dkernel = tape.gradient(reference, [x, inner.kernel])
        np.testing.assert_allclose(dx.numpy(), expected_dx.numpy(), rtol=1e-5)
        np.testing.assert_allclose(dkernel.numpy(), expected_dkernel.numpy(), rtol=1e-5)
    else:
        np.testing.assert_allclose(dx.numpy(), 2 * x.numpy(), rtol=1e-6)
        assert dkernel is None or np.all(dkernel.numpy() == 0)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_gated_rows_equals_where_and_runs_only_gated_rows(graph):
    inner = Counting()
    gated = GatedRows(inner)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((7, 6)).astype(np.float32))
    gate = tf.constant([True, False, False, True, True, False, False])
    gated(x, gate)
    inner.rows.assign(0)
    call = tf.function(gated.__call__) if graph else gated.__call__
    y = call(x, gate)
    assert int(inner.rows.numpy()) == 3
    expected = tf.where(gate[:, None], inner(x), x)
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-6)
    none = call(x, tf.zeros([7], tf.bool))
    np.testing.assert_array_equal(none.numpy(), x.numpy())


def test_gated_rows_gradients_and_keras_file(tmp_path):
    rng = np.random.default_rng(3)
    inputs = keras.Input((6,))
    gate = keras.Input((), dtype="bool")
    outputs = GatedRows(MaskedDense(6, block_size=3, mask=np.array([[1.0, 0.0], [1.0, 1.0]])), name="rows")(inputs, gate)
    model = keras.Model([inputs, gate], outputs)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    g = np.array([True, False, True, True, False])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model([x, g]) ** 2)
    kernel = model.get_layer("rows").layer.kernel
    assert np.any(tape.gradient(loss, kernel).numpy() != 0)
    path = os.path.join(tmp_path, "gated.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded([x, g]).numpy(), model([x, g]).numpy(), rtol=1e-6)
