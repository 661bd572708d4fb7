"""masked_matmul and its gradients against the pure-TensorFlow reference."""

import math

import numpy as np
import pytest
import tensorflow as tf

import masked_ops
from masked_ops.ops import _ops as raw_ops
from reference import (
    element_mask,
    expand_block_mask_np,
    masked_matmul_reference,
    random_block_mask,
    tolerance,
)

# (m, k, n): ragged against every block size below, M = 1, primes, a single
# column, and one large enough for several row chunks of the kernels.
SHAPES = [(1, 33, 17), (7, 64, 64), (13, 100, 70), (5, 31, 95), (4, 8, 1), (260, 700, 90)]
# Square, non-square, one and several SIMD strips wide, odd, and 1x1.
BLOCK_SIZES = [(32, 32), (8, 16), (16, 8), (16, 64), (64, 64), (5, 7), (1, 1)]
DENSITIES = [0.0, 0.1, 0.5, 1.0]


def grid_shape(k, n, block_size):
    return (math.ceil(k / block_size[0]), math.ceil(n / block_size[1]))


def make_mask(rng, k, n, block_size, density, level):
    """A random 0/1 mask at `level`; an element mask keeps the block structure
    and also zeroes single entries inside live blocks."""
    block_mask = random_block_mask(rng, grid_shape(k, n, block_size), density)
    if level == "block":
        return block_mask
    elements = expand_block_mask_np(block_mask, (k, n), block_size)
    return elements * (rng.random((k, n)) < 0.8)


def assert_close(actual, expected, dtype, k):
    rtol, atol = tolerance(dtype, k)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("level", ["block", "element"])
def test_forward_matches_reference(m, k, n, block_size, density, level):
    rng = np.random.default_rng([m, k, n, *block_size, int(density * 10)])
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    mask = make_mask(rng, k, n, block_size, density, level)
    y = masked_ops.masked_matmul(x, w, mask, block_size=block_size)
    assert y.shape == (m, n)
    assert_close(y, masked_matmul_reference(x, w, mask, block_size), np.float32, k)


def test_all_zero_mask_gives_exact_zeros():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 40)).astype(np.float32)
    w = np.full((40, 30), np.nan, np.float32)
    y = masked_ops.masked_matmul(x, w, np.zeros((2, 1), np.float32), block_size=(32, 32))
    np.testing.assert_array_equal(y.numpy(), np.zeros((9, 30), np.float32))


@pytest.mark.parametrize(
    "x_shape",
    [(2, 5, 19), (0, 19), (2, 0, 19), (3, 1, 2, 19), (19,)],
    ids=["batch-2x5", "empty-batch", "empty-inner-batch", "rank-4", "vector"],
)
def test_leading_dims(x_shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((19, 23)).astype(np.float32)
    mask = make_mask(rng, 19, 23, (8, 8), 0.5, "block")
    y = masked_ops.masked_matmul(x, w, mask, block_size=8)
    assert y.shape == x_shape[:-1] + (23,)
    assert_close(y, masked_matmul_reference(x, w, mask, (8, 8)), np.float32, 19)


@pytest.mark.parametrize("k,n", [(0, 5), (6, 0), (0, 0)])
def test_empty_weight_dimensions(k, n):
    x = np.ones((3, k), np.float32)
    w = np.ones((k, n), np.float32)
    y = masked_ops.masked_matmul(x, w, np.ones((k, n), np.float32), block_size=4)
    np.testing.assert_array_equal(y.numpy(), np.zeros((3, n), np.float32))


MASK_VALUES = {
    "bool": lambda rng, shape: rng.random(shape) < 0.5,
    "int8": lambda rng, shape: rng.integers(-3, 4, shape).astype(np.int8),
    "uint8": lambda rng, shape: rng.integers(0, 4, shape).astype(np.uint8),
    "int16": lambda rng, shape: rng.integers(-3, 4, shape).astype(np.int16),
    "int32": lambda rng, shape: rng.integers(-3, 4, shape).astype(np.int32),
    "int64": lambda rng, shape: rng.integers(-3, 4, shape).astype(np.int64),
    "float16": lambda rng, shape: soft_values(rng, shape).astype(np.float16),
    "bfloat16": lambda rng, shape: tf.cast(soft_values(rng, shape), tf.bfloat16),
    "float32": lambda rng, shape: soft_values(rng, shape).astype(np.float32),
    "float64": lambda rng, shape: soft_values(rng, shape),
}


def soft_values(rng, shape):
    """Values that are not 0/1: negative, fractional, exact zeros, negative zero."""
    values = rng.choice([0.0, -0.0, 0.5, -1.25, 2.0, 3e-3], size=shape)
    return np.asarray(values, np.float64)


@pytest.mark.parametrize("mask_dtype", sorted(MASK_VALUES))
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_dtypes_and_soft_values(mask_dtype, level, dtype):
    rng = np.random.default_rng(2)
    k, n, block_size = 37, 29, (8, 16)
    shape = (k, n) if level == "element" else grid_shape(k, n, block_size)
    mask = MASK_VALUES[mask_dtype](rng, shape)
    x = rng.standard_normal((6, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    y = masked_ops.masked_matmul(x, w, mask, block_size=block_size)
    assert y.dtype == dtype
    assert_close(y, masked_matmul_reference(x, w, mask, block_size), dtype, k)


@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_non_finite_masked_out_weights_contribute_exact_zero(level, poison):
    rng = np.random.default_rng(3)
    k, n, block_size = 40, 36, (8, 8)
    mask = make_mask(rng, k, n, block_size, 0.5, level)
    dead = element_mask(mask, (k, n), block_size) == 0
    assert dead.any() and not dead.all()
    w = rng.standard_normal((k, n)).astype(np.float32)
    clean_w = np.where(dead, 0, w).astype(np.float32)
    poisoned_w = np.where(dead, poison, w).astype(np.float32)
    x = tf.constant(rng.standard_normal((5, k)).astype(np.float32))
    poisoned_w, clean_w = tf.constant(poisoned_w), tf.constant(clean_w)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, poisoned_w, clean_w])
        y = masked_ops.masked_matmul(x, poisoned_w, mask, block_size=block_size)
        y_clean = masked_ops.masked_matmul(x, clean_w, mask, block_size=block_size)
    assert np.isfinite(y.numpy()).all()
    np.testing.assert_array_equal(y.numpy(), y_clean.numpy())
    dx, dw = tape.gradient(y, [x, poisoned_w])
    dx_clean = tape.gradient(y_clean, x)
    np.testing.assert_array_equal(dx.numpy(), dx_clean.numpy())
    assert np.all(dw.numpy()[dead] == 0)
    assert_close(y, masked_matmul_reference(x, clean_w, mask, block_size), np.float32, k)


def test_nan_mask_entries_are_live_like_the_reference():
    x = np.ones((2, 4), np.float32)
    w = np.ones((4, 3), np.float32)
    mask = np.ones((4, 3), np.float32)
    mask[1, 2] = np.nan
    y = masked_ops.masked_matmul(x, w, mask, block_size=2).numpy()
    expected = masked_matmul_reference(x, w, mask, (2, 2)).numpy()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert np.isnan(y[:, 2]).all()


@pytest.mark.parametrize("m,k,n", [(6, 45, 38), (1, 16, 16), (9, 70, 3), (300, 80, 72)])
@pytest.mark.parametrize("block_size", [(16, 16), (8, 32), (5, 3), (32, 64)])
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_gradients_match_reference_tape(m, k, n, block_size, level, density):
    rng = np.random.default_rng([m, k, n, *block_size, int(density * 10)])
    x = tf.constant(rng.standard_normal((m, k)).astype(np.float32))
    w = tf.constant(rng.standard_normal((k, n)).astype(np.float32))
    mask = tf.constant(make_mask(rng, k, n, block_size, density, level) * 1.5)
    upstream = tf.constant(rng.standard_normal((m, n)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w, mask])
        y = masked_ops.masked_matmul(x, w, mask, block_size=block_size)
        y_ref = masked_matmul_reference(x, w, mask, block_size)
        loss = tf.reduce_sum(y * upstream)
        loss_ref = tf.reduce_sum(y_ref * upstream)
    dx, dw, dmask = tape.gradient(loss, [x, w, mask])
    dx_ref, dw_ref = tape.gradient(loss_ref, [x, w])
    assert dmask is None
    assert_close(dx, dx_ref, np.float32, n)
    assert_close(dw, dw_ref, np.float32, m)
    dead = element_mask(mask.numpy(), (k, n), block_size) == 0
    np.testing.assert_array_equal(dw.numpy()[dead], 0)


def test_gradients_with_batch_dims():
    rng = np.random.default_rng(4)
    x = tf.constant(rng.standard_normal((2, 3, 21)))
    w = tf.constant(rng.standard_normal((21, 10)))
    mask = make_mask(rng, 21, 10, (4, 4), 0.5, "block")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        y = masked_ops.masked_matmul(x, w, mask, block_size=4)
        y_ref = masked_matmul_reference(x, w, mask, (4, 4))
    for got, want in zip(tape.gradient(y, [x, w]), tape.gradient(y_ref, [x, w])):
        assert_close(got, want, np.float64, 21)


@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("x_shape", [(4, 11), (2, 3, 11)])
def test_numerical_gradients_float64(level, x_shape):
    rng = np.random.default_rng(5)
    k, n, block_size = 11, 7, (4, 3)
    x = tf.constant(rng.standard_normal(x_shape))
    w = tf.constant(rng.standard_normal((k, n)))
    mask = make_mask(rng, k, n, block_size, 0.6, level) * rng.uniform(0.5, 2.0, size=1)

    def f(x, w):
        return masked_ops.masked_matmul(x, w, mask, block_size=block_size)

    theoretical, numerical = tf.test.compute_gradient(f, [x, w])
    for t, nmr in zip(theoretical, numerical):
        np.testing.assert_allclose(t, nmr, rtol=1e-6, atol=1e-6)


def test_second_order_gradients_match_reference():
    rng = np.random.default_rng(6)
    k, n, block_size = 13, 9, (4, 4)
    x = tf.constant(rng.standard_normal((5, k)))
    w = tf.constant(rng.standard_normal((k, n)))
    mask = make_mask(rng, k, n, block_size, 0.5, "element") * 0.75

    def second_order(matmul):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([x, w])
            with tf.GradientTape() as inner:
                inner.watch([x, w])
                y = matmul(x, w)
                loss = tf.reduce_sum(tf.sin(y))
            dx, dw = inner.gradient(loss, [x, w])
            penalty = tf.reduce_sum(dx**2) + tf.reduce_sum(tf.cos(dw))
        return outer.gradient(penalty, [x, w])

    got = second_order(lambda x, w: masked_ops.masked_matmul(x, w, mask, block_size=block_size))
    want = second_order(lambda x, w: masked_matmul_reference(x, w, mask, block_size))
    for g, r in zip(got, want):
        assert_close(g, r, np.float64, k * n)


def test_tf_function_static_and_dynamic_shapes():
    rng = np.random.default_rng(7)
    w = tf.constant(rng.standard_normal((50, 20)).astype(np.float32))
    mask = tf.constant(make_mask(rng, 50, 20, (16, 16), 0.5, "block"))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 50], tf.float32)])
    def f(x):
        return masked_ops.masked_matmul(x, w, mask, block_size=16)

    out_shape = f.get_concrete_function().structured_outputs.shape
    assert out_shape.as_list() == [None, None, 20]
    x = rng.standard_normal((3, 2, 50)).astype(np.float32)
    assert_close(f(x), masked_matmul_reference(x, w, mask, (16, 16)), np.float32, 50)

    @tf.function
    def static(x):
        y = masked_ops.masked_matmul(x, w, mask, block_size=16)
        assert y.shape.as_list() == [4, 20]
        return y

    static(tf.zeros((4, 50)))


def test_block_size_int_means_square():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    w = rng.standard_normal((20, 12)).astype(np.float32)
    mask = make_mask(rng, 20, 12, (8, 8), 0.5, "block")
    np.testing.assert_array_equal(
        masked_ops.masked_matmul(x, w, mask, block_size=8).numpy(),
        masked_ops.masked_matmul(x, w, mask, block_size=(8, 8)).numpy(),
    )


def test_expand_block_mask_matches_numpy():
    rng = np.random.default_rng(9)
    block_mask = rng.random((3, 4))
    got = masked_ops.expand_block_mask(block_mask, (21, 30), (8, 8))
    np.testing.assert_array_equal(got.numpy(), expand_block_mask_np(block_mask, (21, 30), (8, 8)))


# Bad inputs, through the raw ops so that nothing in Python checks first.

RAW_OPS = {
    "forward": lambda a, b, mask, **kw: raw_ops.masked_ops_masked_matmul(a, b, mask, **kw),
    "grad_input": lambda a, b, mask, **kw: raw_ops.masked_ops_masked_matmul_grad_input(a, b, mask, **kw),
    "grad_weight": lambda a, b, mask, **kw: raw_ops.masked_ops_masked_matmul_grad_weight(a, b, mask, **kw),
}

# (op, first, second, mask, expected words in the message). Weight is [6, 4]
# with 4x4 blocks, so block-level masks are [2, 1].
BAD_INPUTS = [
    ("forward", (), (6, 4), (6, 4), "x must have shape [..., k], but has shape []"),
    ("forward", (3, 6), (6,), (6, 4), "w must have shape [k, n], but has shape [6]"),
    ("forward", (3, 6), (6, 4, 1), (6, 4), "w must have shape [k, n]"),
    ("forward", (3, 5), (6, 4), (6, 4), "x's last dimension must equal w's first (5 vs 6)"),
    ("forward", (3, 6), (6, 4), (3, 3), "mask must be element-level [6, 4] or block-level"),
    ("forward", (3, 6), (6, 4), (6, 4, 1), "but mask has shape [6,4,1]"),
    ("forward", (3, 6), (6, 4), (4, 6), "but mask has shape [4,6]"),
    ("grad_input", (3, 5), (6, 4), (6, 4), "dy's last dimension must equal w's second (5 vs 4)"),
    ("grad_input", (3, 4), (6, 4), (2, 2), "mask must be element-level [6, 4] or block-level"),
    ("grad_input", (), (6, 4), (6, 4), "dy must have shape [..., n]"),
    ("grad_weight", (3, 6), (2, 4), (6, 4), "x and dy must have the same leading dimensions"),
    ("grad_weight", (3, 6), (3, 4), (1, 1), "mask must be element-level [6, 4] or block-level [ceil(6/4), ceil(4/4)] = [2, 1]"),
    ("grad_weight", (3, 6), (), (6, 4), "dy must have shape [..., n]"),
]


def _call_bad(op, first, second, mask_shape):
    return RAW_OPS[op](
        tf.zeros(first), tf.zeros(second), tf.ones(mask_shape), block_rows=4, block_cols=4
    )


@pytest.mark.parametrize("op,first,second,mask_shape,message", BAD_INPUTS)
def test_bad_inputs_raise_invalid_argument_eagerly(op, first, second, mask_shape, message):
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _call_bad(op, first, second, mask_shape)
    assert message in str(err.value)


@pytest.mark.parametrize("op,first,second,mask_shape,message", BAD_INPUTS)
def test_bad_inputs_raise_invalid_argument_in_graphs_with_unknown_shapes(
    op, first, second, mask_shape, message
):
    specs = [tf.TensorSpec(None, tf.float32)] * 3

    @tf.function(input_signature=specs)
    def call(a, b, mask):
        return RAW_OPS[op](a, b, mask, block_rows=4, block_cols=4)

    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        call(tf.zeros(first), tf.zeros(second), tf.ones(mask_shape))
    assert message in str(err.value)


@pytest.mark.parametrize("op,first,second,mask_shape,message", BAD_INPUTS)
def test_bad_static_shapes_fail_at_graph_construction(op, first, second, mask_shape, message):
    @tf.function
    def call():
        return _call_bad(op, first, second, mask_shape)

    # Static shapes are rejected by the shape function while tracing, which
    # TensorFlow reports as ValueError, with the same message.
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)) as err:
        call()
    assert message in str(err.value)


@pytest.mark.parametrize("block_size", [0, (0, 8), (8, -1)])
def test_non_positive_block_sizes(block_size):
    with pytest.raises(tf.errors.InvalidArgumentError, match="block_size must be positive"):
        masked_ops.masked_matmul(tf.zeros((2, 8)), tf.zeros((8, 8)), tf.ones((8, 8)), block_size=block_size)


@pytest.mark.parametrize("attr", ["block_rows", "block_cols"])
def test_raw_op_rejects_non_positive_block_attrs(attr):
    attrs = {"block_rows": 4, "block_cols": 4, attr: 0}
    with pytest.raises(tf.errors.InvalidArgumentError, match=attr):
        raw_ops.masked_ops_masked_matmul(tf.zeros((2, 8)), tf.zeros((8, 8)), tf.ones((8, 8)), **attrs)


def test_huge_block_sizes_are_clamped_to_the_matrix():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 9)).astype(np.float32)
    w = rng.standard_normal((9, 5)).astype(np.float32)
    y = raw_ops.masked_ops_masked_matmul(x, w, tf.ones((1, 1)), block_rows=2**40, block_cols=2**40)
    assert_close(y, x @ w, np.float32, 9)


def test_dtype_mismatch_and_unsupported_dtypes_are_rejected():
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError)):
        masked_ops.masked_matmul(tf.zeros((2, 3), tf.float32), tf.zeros((3, 4), tf.float64), tf.ones((3, 4)))
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        masked_ops.masked_matmul(tf.zeros((2, 3), tf.int32), tf.zeros((3, 4), tf.int32), tf.ones((3, 4)))
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        masked_ops.masked_matmul(tf.zeros((2, 3)), tf.zeros((3, 4)), tf.ones((3, 4), tf.string))


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.int32, np.float32])
@pytest.mark.parametrize("m", [1, 8, 24, 25])
@pytest.mark.parametrize("live_factor", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_batch_reads_weights_in_place(mask_dtype, m, live_factor, dtype):
    """Small batches with block masks and whole blocks read w in place: the
    forward product when every factor is 1, dx (by dot products with w's rows)
    for any factor; a larger batch packs. All must agree with the reference,
    and dead blocks must stay unread."""
    if mask_dtype is np.bool_ and live_factor != 1:
        pytest.skip("a bool mask has no other factor")
    rng = np.random.default_rng([m, live_factor])
    k, n, block_size = 128, 96, (32, 32)
    block_mask = random_block_mask(rng, grid_shape(k, n, block_size), 0.5) * live_factor
    dead = expand_block_mask_np(block_mask, (k, n), block_size) == 0
    w = np.where(dead, np.nan, rng.standard_normal((k, n))).astype(dtype)
    x = tf.constant(rng.standard_normal((m, k)).astype(dtype))
    w, clean_w = tf.constant(w), tf.constant(np.where(dead, 0, w).astype(dtype))
    upstream = tf.constant(rng.standard_normal((m, n)).astype(dtype))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w, clean_w])
        y = masked_ops.masked_matmul(x, w, block_mask.astype(mask_dtype), block_size=block_size)
        y_ref = masked_matmul_reference(x, clean_w, block_mask, block_size)
        loss, loss_ref = tf.reduce_sum(y * upstream), tf.reduce_sum(y_ref * upstream)
    assert_close(y, y_ref, dtype, k)
    dx, dw = tape.gradient(loss, [x, w])
    dx_ref, dw_ref = tape.gradient(loss_ref, [x, clean_w])
    assert_close(dx, dx_ref, dtype, n)
    assert_close(dw, dw_ref, dtype, m)


@pytest.mark.parametrize("block_size", [(8, 8), (32, 32), (64, 16), (4, 40)])
@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("k", [2048, 2100])
def test_deep_products_accumulate_across_runs(block_size, density, k):
    """Depths far beyond one pass of the kernels (runs of live blocks, runs
    of m in dw), so that partial results are accumulated in the output; with
    whole blocks along k at low density x is read in place (301 rows: a
    partial last row tile still comes packed), ragged k always packs."""
    rng = np.random.default_rng([*block_size, int(density * 10), k])
    m, n = 301, 48
    x = tf.constant(rng.standard_normal((m, k)).astype(np.float32))
    w = tf.constant(rng.standard_normal((k, n)).astype(np.float32))
    mask = make_mask(rng, k, n, block_size, density, "block")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        y = masked_ops.masked_matmul(x, w, mask, block_size=block_size)
        y_ref = masked_matmul_reference(x, w, mask, block_size)
    assert_close(y, y_ref, np.float32, k)
    for got, want, depth in zip(tape.gradient(y, [x, w]), tape.gradient(y_ref, [x, w]), (n, m)):
        assert_close(got, want, np.float32, depth)
