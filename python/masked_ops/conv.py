"""masked_conv2d, with its gradients registered beside it."""

import operator

import tensorflow as tf

from masked_ops.masks import expand_filter_block_mask, weight_gradient_mask
from masked_ops.ops import _ops, positive_pair

# Attributes the gradient ops take over from the forward op.
_CONV_ATTRS = (
    "strides",
    "dilations",
    "padding",
    "explicit_paddings",
    "in_channel_block",
    "out_channel_block",
    "tile_height",
    "tile_width",
    "use_output_mask",
)


def _padding_attrs(padding):
    """(padding, explicit_paddings) op attributes from tf.nn.conv2d's forms.

    "SAME" or "VALID", or explicit amounts: [[top, bottom], [left, right]] or,
    as tf.nn.conv2d takes them for NHWC, [[0, 0], [top, bottom], [left,
    right], [0, 0]].
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f'padding must be "SAME", "VALID" or explicit amounts, got {padding!r}')
        return mode, []
    pairs = [tuple(operator.index(v) for v in pair) for pair in padding]
    if len(pairs) == 4:
        if pairs[0] != (0, 0) or pairs[3] != (0, 0):
            raise ValueError(f"explicit padding of the batch and channel dimensions must be 0, got {padding!r}")
        pairs = pairs[1:3]
    if len(pairs) != 2 or any(len(pair) != 2 for pair in pairs):
        raise ValueError(
            "explicit padding must be [[top, bottom], [left, right]] or "
            f"[[0, 0], [top, bottom], [left, right], [0, 0]], got {padding!r}"
        )
    return "EXPLICIT", [pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]]


def masked_conv2d(
    x,
    filters,
    mask=None,
    *,
    strides=1,
    padding="VALID",
    dilations=1,
    output_mask=None,
    channel_block=32,
    tile=8,
    grad_mask=None,
    name=None,
):
    """A 2-D convolution (NHWC) that skips masked-out filter blocks and output tiles.

    Computes `where(o != 0, conv2d(x, where(mask != 0, filters * mask, 0)) * o, 0)`
    with `o = output_mask[..., None]`, like `tf.nn.conv2d` on the masked filters.

    Args:
      x: `[batch, height, width, in_channels]`, float32, float64, float16 or bfloat16.
      filters: `[filter_height, filter_width, in_channels, out_channels]`.
      mask: element-level (the filters' shape) or channel-block-level
        `[ceil(in_channels / bi), ceil(out_channels / bo)]` with `(bi, bo) =
        channel_block`, any real or bool dtype; None keeps every filter (and,
        without an output mask, runs TensorFlow's own convolution and input
        gradient, for freezing with `grad_mask` alone).
        Filter entries where it is 0 contribute exactly 0, even if they hold
        NaN or Inf. A block of bi x bo channels at one tap of the window whose
        mask is all zero is never read or multiplied, forward or backward.
      strides, dilations: int or (height, width).
      padding: "VALID", "SAME", or explicit amounts as `tf.nn.conv2d` takes
        them (`[[0, 0], [top, bottom], [left, right], [0, 0]]`) or
        `[[top, bottom], [left, right]]`.
      output_mask: `[batch, out_height, out_width]` (or with a trailing 1), any
        real or bool dtype, or None. Scales each output pixel; where it is 0
        the output is exactly 0. Output tiles of `tile` pixels where it is all
        zero are not computed and pass no gradient back. It may change every call.
      channel_block: int or (in_channels, out_channels) per filter block.
      tile: int or (height, width) of the output tiles.
      grad_mask: optional, element- or channel-block-level like `mask`
        (static shape). Freezes filters: their gradient is the true one times
        `mask * grad_mask` where both are non-zero and exactly 0 elsewhere, and
        blocks where either is all zero are never computed. The output and the
        gradient for `x` do not depend on it.

    Returns:
      `[batch, out_height, out_width, out_channels]`, dtype of `x`.

    Gradients flow to `x` and `filters` (exact zeros where `mask` is 0), not to
    the masks.
    """
    in_block, out_block = positive_pair(channel_block, "channel_block")
    tile_height, tile_width = positive_pair(tile, "tile")
    stride_h, stride_w = positive_pair(strides, "strides")
    dilation_h, dilation_w = positive_pair(dilations, "dilations")
    padding_mode, explicit_paddings = _padding_attrs(padding)
    with tf.name_scope(name or "masked_conv2d"):
        x = tf.convert_to_tensor(x)
        filters = tf.convert_to_tensor(filters, dtype_hint=x.dtype)
        use_output_mask = output_mask is not None
        # TensorFlow's CPU input gradient takes no dilations (tf.nn.conv2d
        # goes through space-to-batch for them): those stay on the masked kernels.
        if mask is None and not use_output_mask and (dilation_h, dilation_w) == (1, 1):
            return _dense_conv2d(x, filters, grad_mask, padding_mode, explicit_paddings,
                                 (stride_h, stride_w), (dilation_h, dilation_w), (in_block, out_block))
        if mask is None:
            channels = tf.shape(filters, out_type=tf.int64)[2:]
            blocks = (channels + [in_block - 1, out_block - 1]) // [in_block, out_block]
            mask = tf.ones(blocks, tf.bool)
        mask = tf.convert_to_tensor(mask)
        output_mask = tf.convert_to_tensor(output_mask) if use_output_mask else tf.zeros([0], tf.bool)
        attrs = {
            "strides": [stride_h, stride_w],
            "dilations": [dilation_h, dilation_w],
            "padding": padding_mode,
            "explicit_paddings": explicit_paddings,
            "in_channel_block": in_block,
            "out_channel_block": out_block,
            "tile_height": tile_height,
            "tile_width": tile_width,
            "use_output_mask": use_output_mask,
        }
        if grad_mask is None:
            return _ops.masked_ops_masked_conv2d(x, filters, mask, output_mask, **attrs)
        filter_mask = weight_gradient_mask(
            mask,
            grad_mask,
            filters.shape,
            lambda m: expand_filter_block_mask(m, filters.shape, (in_block, out_block)),
            filters.dtype,
        )

        @tf.custom_gradient
        def frozen_conv2d(x, filters):
            def grad(dy):
                return (
                    _ops.masked_ops_masked_conv2d_grad_input(x, filters, mask, output_mask, dy, **attrs),
                    _ops.masked_ops_masked_conv2d_grad_filter(x, filters, filter_mask, output_mask, dy, **attrs),
                )

            return _ops.masked_ops_masked_conv2d(x, filters, mask, output_mask, **attrs), grad

        return frozen_conv2d(x, filters)


def _dense_conv2d(x, filters, grad_mask, padding_mode, explicit_paddings, strides, dilations, channel_block):
    """tf.nn.conv2d, and with grad_mask, its filter gradient by the masked
    kernel (frozen blocks never computed) while the input gradient is
    TensorFlow's own."""
    nhwc = lambda pair: [1, pair[0], pair[1], 1]  # noqa: E731
    paddings = [0, 0, *explicit_paddings, 0, 0] if padding_mode == "EXPLICIT" else []
    padding = padding_mode if padding_mode != "EXPLICIT" else [[0, 0], explicit_paddings[:2], explicit_paddings[2:], [0, 0]]

    def forward(x, filters):
        return tf.nn.conv2d(x, filters, nhwc(strides), padding, dilations=nhwc(dilations))

    if grad_mask is None:
        return forward(x, filters)
    filter_mask = weight_gradient_mask(None, grad_mask, filters.shape, None, filters.dtype)
    attrs = {
        "strides": list(strides), "dilations": list(dilations), "padding": padding_mode,
        "explicit_paddings": explicit_paddings, "in_channel_block": channel_block[0],
        "out_channel_block": channel_block[1], "tile_height": 1, "tile_width": 1, "use_output_mask": False,
    }

    @tf.custom_gradient
    def frozen_conv2d(x, filters):
        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=filters, out_backprop=dy, strides=nhwc(strides),
                padding=padding_mode, explicit_paddings=paddings, dilations=nhwc(dilations),
            )
            no_output_mask = tf.zeros([0], tf.bool)
            return dx, _ops.masked_ops_masked_conv2d_grad_filter(x, filters, filter_mask, no_output_mask, dy, **attrs)

        return forward(x, filters), grad

    return frozen_conv2d(x, filters)


# dx and dfilters are ops of their own that skip the same filter blocks and
# output tiles; the masks get no gradient. The gradient ops have none
# registered (no second-order gradients).
@tf.RegisterGradient("MaskedOps>MaskedConv2D")
def _masked_conv2d_grad(op, dy):
    x, filters, mask, output_mask = op.inputs
    attrs = {attr: op.get_attr(attr) for attr in _CONV_ATTRS}
    dx = _ops.masked_ops_masked_conv2d_grad_input(x, filters, mask, output_mask, dy, **attrs)
    dfilters = _ops.masked_ops_masked_conv2d_grad_filter(x, filters, mask, output_mask, dy, **attrs)
    return dx, dfilters, None, None
