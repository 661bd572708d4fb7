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
