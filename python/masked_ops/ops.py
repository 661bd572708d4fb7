"""masked_matmul, with its gradients registered beside it."""

import operator

import tensorflow as tf

from masked_ops._loader import op_library
from masked_ops.masks import expand_matrix_block_mask, weight_gradient_mask

_ops = op_library()


def positive_pair(value, name):
    """`value` as a pair of positive ints; an int means the same twice."""
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    first, second = (operator.index(v) for v in pair)
    if first < 1 or second < 1:
        raise tf.errors.InvalidArgumentError(
            None, None, f"{name} must be positive, got ({first}, {second})"
        )
    return first, second


def normalize_block_size(block_size):
    """`block_size` as a (rows, cols) pair of ints; an int means a square block."""
    return positive_pair(block_size, "block_size")


def expand_block_mask(block_mask, shape, block_size=(32, 32)):
    """Element-level mask of `shape` = [k, n] from a block-level mask.

    Entry (r, c) takes the value of block (r // block_rows, c // block_cols).
    """
    return expand_matrix_block_mask(block_mask, shape, normalize_block_size(block_size))


def _dense_product(x, w):
    return tf.tensordot(x, w, 1) if x.shape.rank == 1 else tf.matmul(x, w)


def _dense_product_grad_input(dy, w):
    return tf.tensordot(dy, w, [[0], [1]]) if dy.shape.rank == 1 else tf.matmul(dy, w, transpose_b=True)


def masked_matmul(x, w, mask=None, *, block_size=(32, 32), grad_mask=None, name=None):
    """`x @ where(mask != 0, w * mask, 0)`, skipping all-zero blocks of `mask`.

    Args:
      x: `[..., k]` float32, float64, float16 or bfloat16 (the 16-bit types
        computed in float32 on the CPU); any number of leading dims.
      w: `[k, n]`, same dtype as `x`.
      mask: element-level `[k, n]` or block-level
        `[ceil(k / block_rows), ceil(n / block_cols)]`, any real or bool dtype.
        Entries where it is 0 contribute exactly 0, even if `w` holds NaN or
        Inf there; other entries scale `w` by the mask value. None: no weight
        mask, and the product and its gradient for `x` are TensorFlow's dense
        ones (for freezing with `grad_mask` alone).
      block_size: `(block_rows, block_cols)` or an int for square blocks. Work
        is skipped per block, so a block whose mask is all zero costs nothing,
        forward and backward.
      grad_mask: optional, element- or block-level like `mask` (static shape).
        Freezes weights: the gradient for `w` is `(x^T dy) * mask * grad_mask`
        where both are non-zero and exactly 0 elsewhere, and blocks where
        either is all zero are never computed. The output and the gradient
        for `x` do not depend on it.

    Returns:
      `[..., n]`, dtype of `x`.
    """
    rows, cols = normalize_block_size(block_size)
    with tf.name_scope(name or "masked_matmul"):
        x = tf.convert_to_tensor(x)
        w = tf.convert_to_tensor(w, dtype_hint=x.dtype)
        attrs = {"block_rows": rows, "block_cols": cols}
        if mask is None and grad_mask is None:
            return _dense_product(x, w)
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            if grad_mask is None:
                return _ops.masked_ops_masked_matmul(x, w, mask, **attrs)
        weight_mask = weight_gradient_mask(
            mask, grad_mask, w.shape, lambda m: expand_matrix_block_mask(m, w.shape, (rows, cols)), w.dtype
        )

        @tf.custom_gradient
        def frozen_matmul(x, w):
            def grad(dy):
                if mask is None:
                    dx = _dense_product_grad_input(dy, w)
                else:
                    dx = _ops.masked_ops_masked_matmul_grad_input(dy, w, mask, **attrs)
                return dx, _ops.masked_ops_masked_matmul_grad_weight(x, dy, weight_mask, **attrs)

            y = _dense_product(x, w) if mask is None else _ops.masked_ops_masked_matmul(x, w, mask, **attrs)
            return y, grad

        return frozen_matmul(x, w)


def _block_attrs(op):
    return {"block_rows": op.get_attr("block_rows"), "block_cols": op.get_attr("block_cols")}


# Writing W = where(mask != 0, w * mask, 0), the three ops are
#   MaskedMatmul(x, w)            y  = x @ W
#   MaskedMatmulGradInput(dy, w)  dx = dy @ W^T
#   MaskedMatmulGradWeight(x, dy) dw = (x^T @ dy) masked like W
# and every gradient of one is another of the three, so gradients of any order
# keep skipping the dead blocks. The mask gets no gradient.


@tf.RegisterGradient("MaskedOps>MaskedMatmul")
def _masked_matmul_grad(op, dy):
    x, w, mask = op.inputs
    attrs = _block_attrs(op)
    dx = _ops.masked_ops_masked_matmul_grad_input(dy, w, mask, **attrs)
    dw = _ops.masked_ops_masked_matmul_grad_weight(x, dy, mask, **attrs)
    return dx, dw, None


@tf.RegisterGradient("MaskedOps>MaskedMatmulGradInput")
def _masked_matmul_grad_input_grad(op, grad_dx):
    dy, w, mask = op.inputs
    attrs = _block_attrs(op)
    grad_dy = _ops.masked_ops_masked_matmul(grad_dx, w, mask, **attrs)
    grad_w = _ops.masked_ops_masked_matmul_grad_weight(grad_dx, dy, mask, **attrs)
    return grad_dy, grad_w, None


@tf.RegisterGradient("MaskedOps>MaskedMatmulGradWeight")
def _masked_matmul_grad_weight_grad(op, grad_dw):
    x, dy, mask = op.inputs
    attrs = _block_attrs(op)
    grad_x = _ops.masked_ops_masked_matmul_grad_input(dy, grad_dw, mask, **attrs)
    grad_dy = _ops.masked_ops_masked_matmul(x, grad_dw, mask, **attrs)
    return grad_x, grad_dy, None
