"""Mask helpers shared by the ops and layers: block expansion and the
weight-gradient mask that `grad_mask` makes."""

import tensorflow as tf


def is_live(mask):
    """mask != 0 as bool: NaN is live, -0 is not (as in the kernels)."""
    mask = tf.convert_to_tensor(mask)
    return mask if mask.dtype == tf.bool else tf.not_equal(mask, tf.zeros_like(mask))


def expand_matrix_block_mask(block_mask, shape, block_size):
    """Element-level `[k, n]` mask: entry (r, c) is block (r // rows, c // cols)."""
    rows, cols = block_size
    block_mask = tf.convert_to_tensor(block_mask)
    k, n = shape
    return tf.repeat(tf.repeat(block_mask, rows, axis=0), cols, axis=1)[:k, :n]


def expand_filter_block_mask(block_mask, filter_shape, channel_block):
    """Element-level `[kh, kw, cin, cout]` conv mask from a channel-block mask
    (the same at every tap)."""
    kh, kw, in_channels, out_channels = filter_shape
    per_tap = expand_matrix_block_mask(block_mask, (in_channels, out_channels), channel_block)
    return tf.broadcast_to(per_tap, (kh, kw, in_channels, out_channels))


def weight_gradient_mask(mask, grad_mask, element_shape, expand_block_mask, dtype):
    """The mask that gives `(x^T dy) * mask * grad_mask` where both are non-zero
    and exact zeros elsewhere, when handed to a weight-gradient op (mask None:
    no weight mask).

    Block-level when both masks are, else element-level (the block-level one
    expanded by `expand_block_mask`). A mask is element-level when its shape
    is the weight's, `element_shape`; shapes must be static.
    """
    grad_mask = tf.convert_to_tensor(grad_mask)
    if mask is None:
        factors = tf.cast(grad_mask, dtype)
        return tf.where(is_live(grad_mask), factors, tf.zeros_like(factors))
    mask = tf.convert_to_tensor(mask)
    element_shape = tuple(element_shape)
    for name, value in (("mask", mask), ("grad_mask", grad_mask)):
        if not value.shape.is_fully_defined():
            raise ValueError(f"{name} needs a static shape when grad_mask is given, got {value.shape}")
    mask_is_element = tuple(mask.shape) == element_shape
    grad_is_element = tuple(grad_mask.shape) == element_shape
    if mask_is_element != grad_is_element:
        if mask_is_element:
            grad_mask = expand_block_mask(grad_mask)
        else:
            mask = expand_block_mask(mask)
    elif tuple(mask.shape) != tuple(grad_mask.shape):
        raise ValueError(
            f"grad_mask of shape {tuple(grad_mask.shape)} does not match mask of shape "
            f"{tuple(mask.shape)} (element-level would be {element_shape})"
        )
    live = tf.logical_and(is_live(mask), is_live(grad_mask))
    product = tf.cast(mask, dtype) * tf.cast(grad_mask, dtype)
    return tf.where(live, product, tf.zeros_like(product))
