"""mask_gradients against where(m != 0, g * m, 0)."""

import numpy as np
import pytest
import tensorflow as tf

import masked_ops
from masked_ops.ops import _ops as raw_ops
from reference import conv_element_mask, element_mask, random_block_mask


def reference(grad, element):
    grad = np.asarray(grad)
    return np.where(element != 0, grad * element.astype(grad.dtype), 0).astype(grad.dtype)


@pytest.mark.parametrize("shape", [(37,), (33, 20), (3, 3, 17, 40), (2, 1, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_where_reference(shape, level, dtype):
    rng = np.random.default_rng(list(shape))
    block = (8, 16)
    k, n = (1, shape[0]) if len(shape) == 1 else shape[-2:]
    block_mask = random_block_mask(rng, (-(-k // block[0]), -(-n // block[1])), 0.5) * rng.choice([1.0, 0.5], 1)
    per_matrix = element_mask(block_mask, (k, n), block)
    element = np.broadcast_to(per_matrix.reshape((1,) * (len(shape) - 2) + (k, n)) if len(shape) >= 2
                              else per_matrix.reshape(n), shape)
    if level == "element":
        element = element * (rng.random(shape) < 0.8)
        mask = element
    else:
        mask = block_mask
    grad = rng.standard_normal(shape).astype(dtype)
    grad[element == 0] = np.nan  # dead entries never leak
    out = masked_ops.mask_gradients([tf.constant(grad)], [mask], block_size=block)[0]
    np.testing.assert_array_equal(out.numpy(), reference(grad, element))


def test_none_gradients_and_none_masks_pass_through():
    grad = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    out = masked_ops.mask_gradients([None, grad, grad], [np.ones((2, 2)), None, np.array([[1, 0], [0, 2]])])
    assert out[0] is None
    assert out[1] is grad
    np.testing.assert_array_equal(out[2].numpy(), [[1, 0], [0, 8]])


@pytest.mark.parametrize("level", ["block", "element"])
def test_indexed_slices_are_masked_row_by_row_without_densifying(level):
    rng = np.random.default_rng(4)
    table = tf.Variable(rng.standard_normal((50, 24)).astype(np.float32))
    ids = tf.constant([3, 17, 3, 49, 0])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(tf.gather(table, ids)))
    grad = tape.gradient(loss, table)
    assert isinstance(grad, tf.IndexedSlices)
    block_mask = random_block_mask(rng, (7, 3), 0.5)
    element = element_mask(block_mask, (50, 24), (8, 8))
    mask = block_mask if level == "block" else element * (rng.random((50, 24)) < 0.7)
    if level == "element":
        element = mask
    masked = masked_ops.mask_gradients([grad], [mask], block_size=8)[0]
    assert isinstance(masked, tf.IndexedSlices)
    np.testing.assert_array_equal(masked.indices.numpy(), grad.indices.numpy())
    np.testing.assert_allclose(tf.convert_to_tensor(masked).numpy(),
                               reference(tf.convert_to_tensor(grad).numpy(), element), rtol=1e-6)


def test_conv_kernel_with_a_channel_block_mask():
    rng = np.random.default_rng(5)
    block_mask = random_block_mask(rng, (3, 2), 0.5)
    grad = rng.standard_normal((3, 3, 40, 32)).astype(np.float32)
    out = masked_ops.mask_gradients([grad], [block_mask], block_size=16)[0]
    np.testing.assert_array_equal(out.numpy(), reference(grad, conv_element_mask(block_mask, grad.shape, (16, 16))))


def test_works_in_a_tf_function_and_is_differentiable():
    mask = np.array([[1.0, 0.0], [0.5, 1.0]], np.float32)

    @tf.function
    def masked_square(g):
        with tf.GradientTape() as tape:
            tape.watch(g)
            out = masked_ops.mask_gradients([g], [mask], block_size=1)[0]
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, g)

    g = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    out, dg = masked_square(g)
    np.testing.assert_array_equal(out.numpy(), [[1, 0], [1.5, 4]])
    np.testing.assert_array_equal(dg.numpy(), 2 * out.numpy() * mask)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize(
    "grad_shape, mask_shape",
    [((4, 6), (3, 3)), ((4, 6), (4,)), ((2, 4, 6), (4, 6)), ((4, 6), (1, 1, 1))],
)
def test_bad_mask_shapes_raise_invalid_argument(grad_shape, mask_shape, graph):
    def call():
        return raw_ops.masked_ops_mask_gradient(tf.zeros(grad_shape), tf.ones(mask_shape), block_rows=4, block_cols=4)

    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must be element-level"):
        tf.function(call)() if graph else call()


def test_mismatched_lists_are_rejected():
    with pytest.raises(ValueError, match="2 gradients but 1 masks"):
        masked_ops.mask_gradients([tf.zeros(2), tf.zeros(2)], [None])
