"""MaskedDense: a drop-in for keras.layers.Dense whose masked blocks cost nothing."""

import math

import keras
import numpy as np
import tensorflow as tf

from masked_ops.layers._mask_weight import MaskWeightMixin
from masked_ops.ops import expand_block_mask, masked_matmul, normalize_block_size


@keras.saving.register_keras_serializable(package="masked_ops")
class MaskedDense(MaskWeightMixin, keras.layers.Layer):
    """`activation(x @ where(mask != 0, kernel * mask, 0) + bias)`.

    The mask is a non-trainable float32 weight saved with the model. It is
    block-level (`[ceil(in/block_rows), ceil(units/block_cols)]`, the default)
    or element-level (`[in, units]`, for soft or unstructured masks); blocks
    whose mask is all zero are skipped forward and backward.

    Args:
      units: output width.
      block_size: `(block_rows, block_cols)` or an int.
      mask: optional initial mask, element- or block-level. Its shape picks the
        granularity when `mask_granularity` is not given.
      mask_granularity: "block" or "element"; fixes the mask weight's shape.
      The remaining arguments are those of `keras.layers.Dense`.
    """

    def __init__(
        self,
        units,
        *,
        block_size=(32, 32),
        mask=None,
        mask_granularity=None,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"units must be a positive int, got {units!r}")
        self.units = int(units)
        self.block_size = normalize_block_size(block_size)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True
        self._init_mask_weight(mask, mask_granularity, rank_options=(2,))

    def _mask_shapes(self):
        input_dim = self.kernel.shape[0]
        element = (input_dim, self.units)
        block = (math.ceil(input_dim / self.block_size[0]), math.ceil(self.units / self.block_size[1]))
        return element, block

    def _expand_block_mask(self, block_mask):
        return expand_block_mask(block_mask, tuple(self.kernel.shape), self.block_size)

    def _block_size_for_messages(self):
        return self.block_size

    def build(self, input_shape):
        self._check_compute_dtype()
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(f"MaskedDense needs a known last input dimension, got input shape {input_shape}")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})
        self._build_mask_weight()

    def call(self, inputs):
        outputs = masked_matmul(inputs, self.kernel, self.mask, block_size=self.block_size)
        if self.bias is not None:
            outputs = tf.nn.bias_add(outputs, self.bias)
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "block_size": list(self.block_size),
                "mask_granularity": self.mask_granularity,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
        return config
