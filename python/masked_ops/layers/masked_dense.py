"""MaskedDense: a drop-in for keras.layers.Dense whose masked blocks cost nothing."""

import math

import keras
import numpy as np

from masked_ops.layers._base import MaskedKernelLayer
from masked_ops.ops import expand_block_mask, masked_matmul, normalize_block_size


@keras.saving.register_keras_serializable(package="masked_ops")
class MaskedDense(MaskedKernelLayer):
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
      use_mask: False for a layer without a weight mask (`mask` is None), which
        multiplies with TensorFlow's dense kernels and can still freeze blocks
        with grad_mask.
      grad_mask: optional initial grad_mask (1 trainable, 0 frozen), element- or
        block-level; frozen kernel entries get exactly zero gradient, and
        blocks frozen throughout are never computed in the backward pass.
      grad_mask_granularity: "block" or "element": gives the layer a
        grad_mask weight (all ones) to set later with `set_grad_mask`.
      The remaining arguments are those of `keras.layers.Dense`.
    """

    def __init__(
        self,
        units,
        *,
        block_size=(32, 32),
        use_mask=True,
        mask=None,
        mask_granularity=None,
        grad_mask=None,
        grad_mask_granularity=None,
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
        super().__init__(
            use_mask=use_mask,
            mask=mask,
            mask_granularity=mask_granularity,
            grad_mask=grad_mask,
            grad_mask_granularity=grad_mask_granularity,
            mask_ranks=(2,),
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        if not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"units must be a positive int, got {units!r}")
        self.units = int(units)
        self.block_size = normalize_block_size(block_size)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def _mask_shapes(self):
        input_dim = self.kernel.shape[0]
        element = (input_dim, self.units)
        block = (math.ceil(input_dim / self.block_size[0]), math.ceil(self.units / self.block_size[1]))
        return element, block

    def _expand_block_mask(self, block_mask):
        return expand_block_mask(block_mask, tuple(self.kernel.shape), self.block_size)

    def _block_size(self):
        return self.block_size

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(f"MaskedDense needs a known last input dimension, got input shape {input_shape}")
        self._build_weights((input_dim, self.units), self.units)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    def call(self, inputs):
        outputs = masked_matmul(
            inputs, self.kernel, self.mask, block_size=self.block_size, grad_mask=self.grad_mask
        )
        return self._bias_and_activation(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "block_size": list(self.block_size)})
        return config
