"""MaskedConv2D: a drop-in for keras.layers.Conv2D (NHWC) whose masked channel
blocks and inactive output tiles cost nothing."""

import math

import keras
import numpy as np

from masked_ops.conv import masked_conv2d
from masked_ops.layers._base import MaskedKernelLayer
from masked_ops.masks import expand_filter_block_mask
from masked_ops.ops import positive_pair


@keras.saving.register_keras_serializable(package="masked_ops")
class MaskedConv2D(MaskedKernelLayer):
    """`activation(masked_conv2d(x, kernel, mask, output_mask=...) + bias)`.

    The filter mask is a non-trainable float32 weight saved with the model:
    channel-block-level `[ceil(in/bi), ceil(filters/bo)]` (the default, the
    same at every tap) or element-level (the kernel's shape). Blocks whose
    mask is all zero are skipped forward and backward.

    `call(x, output_mask=None)`: an optional `[batch, out_h, out_w]` mask of
    output pixels (any real or bool dtype, may change every call); output
    tiles of `tile` pixels where it is all zero are skipped and the output is
    exactly 0 wherever it is 0, before the bias and activation.

    Args:
      filters, kernel_size, strides, padding ("valid" or "same"),
      dilation_rate, activation, use_bias and the initializers, regularizers
      and constraints: as `keras.layers.Conv2D` (channels_last only).
      channel_block: `(bi, bo)` input x output channels per block, or an int.
      tile: output tile `(height, width)` for output masks, or an int.
      mask: optional initial mask, element- or block-level. Its shape picks
        the granularity when `mask_granularity` is not given.
      mask_granularity: "block" or "element"; fixes the mask weight's shape.
      use_mask, grad_mask, grad_mask_granularity: as in `MaskedDense`.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        *,
        channel_block=(32, 32),
        tile=(8, 8),
        use_mask=True,
        mask=None,
        mask_granularity=None,
        grad_mask=None,
        grad_mask_granularity=None,
        **kwargs,
    ):
        super().__init__(
            use_mask=use_mask,
            mask=mask,
            mask_granularity=mask_granularity,
            grad_mask=grad_mask,
            grad_mask_granularity=grad_mask_granularity,
            mask_ranks=(2, 4),
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
        if not isinstance(filters, (int, np.integer)) or filters < 1:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        if str(padding).lower() not in ("valid", "same"):
            raise ValueError(f'padding must be "valid" or "same", got {padding!r}')
        if (data_format or keras.config.image_data_format()) != "channels_last":
            raise ValueError("MaskedConv2D supports channels_last (NHWC) only")
        if groups != 1:
            raise ValueError(f"MaskedConv2D supports groups=1 only, got {groups!r}")
        self.filters = int(filters)
        self.kernel_size = positive_pair(kernel_size, "kernel_size")
        self.strides = positive_pair(strides, "strides")
        self.padding = str(padding).lower()
        self.dilation_rate = positive_pair(dilation_rate, "dilation_rate")
        self.channel_block = positive_pair(channel_block, "channel_block")
        self.tile = positive_pair(tile, "tile")
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _mask_shapes(self):
        element = tuple(self.kernel.shape)
        in_channels = element[2]
        block = (math.ceil(in_channels / self.channel_block[0]), math.ceil(self.filters / self.channel_block[1]))
        return element, block

    def _expand_block_mask(self, block_mask):
        return expand_filter_block_mask(block_mask, tuple(self.kernel.shape), self.channel_block)

    def _block_size(self):
        return self.channel_block

    def build(self, input_shape):
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(f"MaskedConv2D needs a known channel dimension, got input shape {input_shape}")
        self._build_weights((*self.kernel_size, in_channels, self.filters), self.filters)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: in_channels})

    def call(self, inputs, output_mask=None):
        outputs = masked_conv2d(
            inputs,
            self.kernel,
            self.mask,
            strides=self.strides,
            padding=self.padding.upper(),
            dilations=self.dilation_rate,
            output_mask=output_mask,
            channel_block=self.channel_block,
            tile=self.tile,
            grad_mask=self.grad_mask,
        )
        return self._bias_and_activation(outputs)

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        sizes = []
        for size, k, stride, dilation in zip((height, width), self.kernel_size, self.strides, self.dilation_rate):
            if size is None:
                sizes.append(None)
            elif self.padding == "same":
                sizes.append(-(-size // stride))
            else:
                sizes.append((size - (k - 1) * dilation - 1) // stride + 1)
        return (batch, *sizes, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": list(self.kernel_size),
                "strides": list(self.strides),
                "padding": self.padding,
                "dilation_rate": list(self.dilation_rate),
                "channel_block": list(self.channel_block),
                "tile": list(self.tile),
            }
        )
        return config
