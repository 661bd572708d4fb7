"""Choosing which kernel blocks of a masked layer train: grad_masks from a rule.

Each helper computes a grad_mask (1 = trainable, 0 = frozen) at the layer's
block or element granularity, stores it with `layer.set_grad_mask` and
returns it. The layer must be built and have a grad_mask weight (made with `grad_mask`
or `grad_mask_granularity`).
"""

import numpy as np
import tensorflow as tf


def block_norms(kernel, block_size, norm="l2"):
    """Norm of each block of a `[k, n]` or `[kh, kw, k, n]` kernel, shape
    `[ceil(k / rows), ceil(n / cols)]`; a conv kernel's block spans every tap."""
    if norm not in ("l1", "l2"):
        raise ValueError(f'norm must be "l1" or "l2", got {norm!r}')
    kernel = tf.convert_to_tensor(kernel)
    k, n = kernel.shape[-2:]
    rows, cols = block_size
    grid = (-(-k // rows), -(-n // cols))
    taps = tf.reshape(kernel, (-1, k, n))
    padded = tf.pad(taps, [[0, 0], [0, grid[0] * rows - k], [0, grid[1] * cols - n]])
    blocks = tf.reshape(padded, (-1, grid[0], rows, grid[1], cols))
    if norm == "l1":
        return tf.reduce_sum(tf.abs(blocks), axis=(0, 2, 4))
    return tf.sqrt(tf.reduce_sum(tf.square(blocks), axis=(0, 2, 4)))


def train_top_k_blocks(layer, kernel_gradient, k, *, norm="l2"):
    """Freezes every block but the k whose gradient has the largest norm
    (ties broken by position); returns the block-level grad_mask."""
    norms = block_norms(kernel_gradient, layer._block_size(), norm).numpy()
    if not 0 <= k <= norms.size:
        raise ValueError(f"k must be in [0, {norms.size}] (the layer's blocks), got {k}")
    order = np.argsort(-norms, axis=None, kind="stable")
    grad_mask = np.zeros(norms.size, np.float32)
    grad_mask[order[:k]] = 1
    grad_mask = grad_mask.reshape(norms.shape)
    layer.set_grad_mask(grad_mask)
    return grad_mask


def freeze_output_channels(layer, count):
    """Freezes the kernel's first `count` output channels (units or filters).
    At block granularity `count` must be a whole number of blocks."""
    kernel_shape = tuple(layer.kernel.shape)
    out_channels = kernel_shape[-1]
    if not 0 <= count <= out_channels:
        raise ValueError(f"count must be in [0, {out_channels}], got {count}")
    element_shape, block_shape = layer._mask_shapes()
    if layer.grad_mask_granularity == "element":
        grad_mask = np.ones(element_shape, np.float32)
        grad_mask[..., :count] = 0
    else:
        cols = layer._block_size()[1]
        if count % cols and count != out_channels:
            raise ValueError(
                f"freezing {count} output channels needs element granularity: the layer's "
                f"grad_mask is block-level with {cols} output channels per block"
            )
        grad_mask = np.ones(block_shape, np.float32)
        grad_mask[:, : -(-count // cols)] = 0
    layer.set_grad_mask(grad_mask)
    return grad_mask
