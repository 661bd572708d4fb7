"""Pure TensorFlow / NumPy references the ops are checked against."""

import numpy as np
import tensorflow as tf


def expand_block_mask_np(block_mask, shape, block_size):
    rows, cols = block_size
    k, n = shape
    return np.repeat(np.repeat(np.asarray(block_mask), rows, axis=0), cols, axis=1)[:k, :n]


def element_mask(mask, shape, block_size):
    """The mask at element level, whichever level it was given at."""
    mask = np.asarray(mask)
    return mask if mask.shape == tuple(shape) else expand_block_mask_np(mask, shape, block_size)


def effective_weight(w, mask, block_size):
    """tf.where(mask != 0, w * mask, 0), with a block mask expanded first."""
    w = tf.convert_to_tensor(w)
    mask = tf.convert_to_tensor(element_mask(mask, w.shape, block_size))
    live = tf.cast(mask, tf.bool) if mask.dtype == tf.bool else tf.not_equal(mask, tf.zeros_like(mask))
    return tf.where(live, w * tf.cast(mask, w.dtype), tf.zeros_like(w))


def masked_matmul_reference(x, w, mask, block_size):
    x = tf.convert_to_tensor(x)
    w_eff = effective_weight(w, mask, block_size)
    if x.shape.rank == 1:
        return tf.tensordot(x, w_eff, axes=1)
    return tf.matmul(x, w_eff)


def random_block_mask(rng, grid_shape, density):
    """A 0/1 block mask with round(density * blocks) live blocks."""
    blocks = int(np.prod(grid_shape))
    live = rng.permutation(blocks) < int(round(density * blocks))
    return live.reshape(grid_shape).astype(np.float32)


def tolerance(dtype, k):
    """rtol, atol for a sum of k products in dtype."""
    eps = np.finfo(np.dtype(dtype)).eps
    return 64 * eps, 16 * eps * max(k, 1)


def _live(mask):
    mask = tf.convert_to_tensor(mask)
    return tf.cast(mask, tf.bool) if mask.dtype == tf.bool else tf.not_equal(mask, tf.zeros_like(mask))


def conv_element_mask(mask, filter_shape, channel_block):
    """A conv filter mask at element level [kh, kw, cin, cout], whichever level it was given at."""
    mask = np.asarray(mask)
    if mask.ndim == 4:
        return mask
    kh, kw, cin, cout = filter_shape
    per_tap = expand_block_mask_np(mask, (cin, cout), channel_block)
    return np.broadcast_to(per_tap, (kh, kw, cin, cout))


def masked_conv2d_reference(x, filters, mask, output_mask, strides, padding, dilations, channel_block):
    """tf.nn.conv2d with where(mask != 0, filters * mask, 0), times the output mask where it is live."""
    x = tf.convert_to_tensor(x)
    filters = tf.convert_to_tensor(filters)
    if mask is not None:
        element = tf.convert_to_tensor(conv_element_mask(mask, filters.shape, channel_block))
        filters = tf.where(_live(element), filters * tf.cast(element, filters.dtype), tf.zeros_like(filters))
    y = tf.nn.conv2d(x, filters, strides, padding, dilations=dilations)
    if output_mask is None:
        return y
    output_mask = tf.convert_to_tensor(output_mask)
    if output_mask.shape.rank == 3:
        output_mask = output_mask[..., None]
    return tf.where(_live(output_mask), y * tf.cast(output_mask, y.dtype), tf.zeros_like(y))
