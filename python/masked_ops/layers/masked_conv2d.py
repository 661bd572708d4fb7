"""MaskedConv2D: a drop-in for keras.layers.Conv2D (NHWC) whose masked channel
blocks and inactive output tiles cost nothing."""

import math

import keras
import numpy as np
import tensorflow as tf

from masked_ops.conv import masked_conv2d
from masked_ops.layers._mask_weight import MaskWeightMixin
from masked_ops.ops import positive_pair


@keras.saving.register_keras_serializable(package="masked_ops")
class MaskedConv2D(MaskWeightMixin, keras.layers.Layer):
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
        mask=None,
        mask_granularity=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
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
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self._init_mask_weight(mask, mask_granularity, rank_options=(2, 4))

    def _mask_shapes(self):
        element = tuple(self.kernel.shape)
        in_channels = element[2]
        block = (math.ceil(in_channels / self.channel_block[0]), math.ceil(self.filters / self.channel_block[1]))
        return element, block

    def _expand_block_mask(self, block_mask):
        kh, kw, in_channels, out_channels = self.kernel.shape
        per_tap = tf.repeat(tf.repeat(block_mask, self.channel_block[0], axis=0), self.channel_block[1], axis=1)
        return tf.broadcast_to(per_tap[:in_channels, :out_channels], (kh, kw, in_channels, out_channels))

    def _block_size_for_messages(self):
        return self.channel_block

    def build(self, input_shape):
        self._check_compute_dtype()
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(f"MaskedConv2D needs a known channel dimension, got input shape {input_shape}")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, in_channels, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: in_channels})
        self._build_mask_weight()

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
        )
        if self.bias is not None:
            outputs = tf.nn.bias_add(outputs, self.bias)
        return self.activation(outputs)

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
