"""Conditional execution: a sub-layer that runs only when (or only on the
rows where) a gate is on, and passes its input through otherwise."""

import keras
import tensorflow as tf


class _GatedBase(keras.layers.Layer):
    """Wraps `layer`, whose output must have its input's shape."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def build(self, inputs_shape, gate_shape=None):
        if not self.layer.built:
            self.layer.build(inputs_shape)
        self.built = True

    def compute_output_shape(self, inputs_shape, gate_shape=None):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config["layer"] = keras.saving.serialize_keras_object(self.layer)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="masked_ops")
class Gated(_GatedBase):
    """`layer(x)` when the scalar boolean `gate` is true, else `x` itself.

    `call(x, gate)`: the branch not taken is not run (tf.cond), eagerly and in
    graphs, and gradients flow through whichever branch ran.
    """

    def call(self, inputs, gate):
        gate = tf.reshape(tf.cast(gate, tf.bool), [])
        return tf.cond(gate, lambda: tf.cast(self.layer(inputs), inputs.dtype), lambda: tf.identity(inputs))


@keras.saving.register_keras_serializable(package="masked_ops")
class GatedRows(_GatedBase):
    """`where(gate[:, None, ...], layer(x), x)` computed on the gated rows only.

    `call(x, gate)` with `gate` of shape [batch] (bool or 0/1): the rows whose
    gate is on are gathered, run through `layer` and scattered back; the other
    rows pass through and cost nothing. `layer` must treat rows independently.
    """

    def call(self, inputs, gate):
        rows = tf.where(tf.cast(tf.reshape(gate, [-1]), tf.bool))
        chosen = tf.gather_nd(inputs, rows)
        return tf.tensor_scatter_nd_update(inputs, rows, tf.cast(self.layer(chosen), inputs.dtype))
