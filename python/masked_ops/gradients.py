"""mask_gradients: the fused `g * m` of gradient masking, skipping zero blocks."""

import tensorflow as tf

from masked_ops.ops import _ops, normalize_block_size


def mask_gradients(grads, masks, *, block_size=(32, 32), name=None):
    """`[where(m != 0, g * m, 0) for g, m in zip(grads, masks)]`, fused.

    Like the usual `g * m` before `apply_gradients`, except that entries where
    the mask is 0 come out exactly 0 even where `g` holds NaN or Inf, and a
    block whose mask is zero throughout is written as zeros without reading
    `g` (when `g`'s buffer can be reused, blocks whose factor is 1 are not
    touched either).

    Args:
      grads: gradients: tensors, `tf.IndexedSlices` (masked row by row, never
        densified) or None (passed through).
      masks: one per gradient, None for "leave it alone". Element-level (the
        gradient's variable's shape) or block-level `[ceil(k / rows),
        ceil(n / cols)]` over the last two dimensions (`[1, ceil(n / cols)]`
        for a vector), the same for every leading index (a conv kernel's taps).
      block_size: `(rows, cols)` or an int, for the block-level masks.
    """
    grads = list(grads)
    masks = list(masks)
    if len(grads) != len(masks):
        raise ValueError(f"got {len(grads)} gradients but {len(masks)} masks")
    rows, cols = normalize_block_size(block_size)
    with tf.name_scope(name or "mask_gradients"):
        return [
            grad if grad is None or mask is None else _mask_one(grad, tf.convert_to_tensor(mask), rows, cols)
            for grad, mask in zip(grads, masks)
        ]


def _mask_one(grad, mask, rows, cols):
    if not isinstance(grad, tf.IndexedSlices):
        return _ops.masked_ops_mask_gradient(grad, mask, block_rows=rows, block_cols=cols)
    # Row i of the values is row indices[i] of the variable: gather the mask's
    # rows (a block mask's block rows, widened to the columns) and mask the
    # values with them element by element.
    values = grad.values
    dense_shape = tf.get_static_value(grad.dense_shape)
    if dense_shape is not None:
        element_level = tuple(mask.shape) == tuple(dense_shape)
    else:
        element_level = mask.shape.rank == values.shape.rank and mask.shape[1:] == values.shape[1:]
    if element_level:
        row_masks = tf.gather(mask, grad.indices)
    elif values.shape.rank == 2 and mask.shape.rank == 2:
        width = tf.shape(values)[1]
        row_masks = tf.repeat(tf.gather(mask, grad.indices // rows), cols, axis=1)[:, :width]
    else:
        raise ValueError(
            f"a mask for IndexedSlices must be element-level (rank {values.shape.rank}) or, for "
            f"rank-2 values, block-level; got mask shape {mask.shape} for values of shape {values.shape}"
        )
    masked = _ops.masked_ops_mask_gradient(values, row_masks, block_rows=rows, block_cols=cols)
    return tf.IndexedSlices(masked, grad.indices, grad.dense_shape)



# Masking is linear in the gradient: its own gradient is the same masking.
@tf.RegisterGradient("MaskedOps>MaskGradient")
def _mask_gradient_grad(op, upstream):
    attrs = {"block_rows": op.get_attr("block_rows"), "block_cols": op.get_attr("block_cols")}
    return _ops.masked_ops_mask_gradient(upstream, op.inputs[1], **attrs), None
