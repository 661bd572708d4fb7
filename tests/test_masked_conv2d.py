"""masked_conv2d and its gradients against tf.nn.conv2d on the masked filters."""

import math

import numpy as np
import pytest
import tensorflow as tf

import masked_ops
from masked_ops.ops import _ops as raw_ops
from reference import conv_element_mask, masked_conv2d_reference, random_block_mask, tolerance

# (batch, height, width, in_channels, out_channels, (kh, kw), strides,
# padding, dilations): the kernel sizes, strides, dilation, paddings, odd
# spatial sizes and channel counts off every block size the issue lists.
GEOMETRIES = [
    (1, 7, 7, 3, 17, (3, 3), 1, "SAME", 1),
    (4, 13, 13, 17, 64, (3, 3), 2, "SAME", 1),
    (1, 32, 32, 64, 17, (1, 1), 1, "VALID", 1),
    (4, 13, 13, 64, 3, (5, 5), 1, "VALID", 1),
    (1, 13, 7, 17, 17, (1, 7), 1, "SAME", 1),
    (4, 13, 13, 17, 64, (3, 3), 1, "SAME", 2),
    (1, 32, 32, 3, 64, (5, 5), 2, "VALID", 1),
    (4, 7, 13, 64, 64, (1, 1), 2, "SAME", 1),
    (1, 13, 13, 17, 3, (3, 3), 1, [[0, 0], [2, 0], [1, 3], [0, 0]], 1),
]
DENSITIES = [0.0, 0.25, 1.0]
CHANNEL_BLOCK = (16, 8)
TILE = (4, 8)


def geometry_id(geometry):
    n, h, w, cin, cout, (kh, kw), s, pad, d = geometry
    return f"{n}x{h}x{w}x{cin}-{kh}x{kw}x{cout}-s{s}-{pad if isinstance(pad, str) else 'explicit'}-d{d}"


def out_size(size, k, stride, padding, dilation, pads=(0, 0)):
    span = (k - 1) * dilation + 1
    if padding == "SAME":
        return math.ceil(size / stride)
    if padding == "VALID":
        return (size - span) // stride + 1
    return (size + pads[0] + pads[1] - span) // stride + 1


def output_hw(geometry):
    n, h, w, cin, cout, (kh, kw), s, pad, d = geometry
    if isinstance(pad, str):
        return out_size(h, kh, s, pad, d), out_size(w, kw, s, pad, d)
    return out_size(h, kh, s, "EXPLICIT", d, pad[1]), out_size(w, kw, s, "EXPLICIT", d, pad[2])


def make_filter_mask(rng, geometry, density, level, channel_block=CHANNEL_BLOCK):
    """A 0/1 filter mask: block-level, or element-level keeping the block
    structure, zeroing single entries and whole taps of some blocks."""
    n, h, w, cin, cout, (kh, kw), *_ = geometry
    grid = (math.ceil(cin / channel_block[0]), math.ceil(cout / channel_block[1]))
    block_mask = random_block_mask(rng, grid, density)
    if level == "block":
        return block_mask
    element = conv_element_mask(block_mask, (kh, kw, cin, cout), channel_block)
    return element * (rng.random((kh, kw, cin, cout)) < 0.8) * (rng.random((kh, kw, 1, 1)) < 0.7)


def make_output_mask(rng, geometry, active):
    """A 0/1/2.5 output mask whose tiles are active with probability `active`."""
    n = geometry[0]
    out_h, out_w = output_hw(geometry)
    tiles = rng.random((n, math.ceil(out_h / TILE[0]), math.ceil(out_w / TILE[1]))) < active
    pixels = np.repeat(np.repeat(tiles, TILE[0], axis=1), TILE[1], axis=2)[:, :out_h, :out_w]
    values = rng.choice(np.array([0.0, 1.0, 2.5], np.float32), size=pixels.shape, p=[0.2, 0.6, 0.2])
    return (pixels * values).astype(np.float32)


def make_case(geometry, density, level, with_output_mask, dtype=np.float32, seed=0):
    n, h, w, cin, cout, (kh, kw), s, pad, d = geometry
    rng = np.random.default_rng([seed, n, h, w, cin, cout, kh, kw, int(density * 100)])
    return {
        "x": rng.standard_normal((n, h, w, cin)).astype(dtype),
        "filters": rng.standard_normal((kh, kw, cin, cout)).astype(dtype),
        "mask": make_filter_mask(rng, geometry, density, level),
        "output_mask": make_output_mask(rng, geometry, 0.5) if with_output_mask else None,
        "kwargs": {"strides": s, "padding": pad, "dilations": d},
        "channel_block": CHANNEL_BLOCK,
        "rng": rng,
    }


def fused(case, x=None, filters=None):
    return masked_ops.masked_conv2d(
        case["x"] if x is None else x, case["filters"] if filters is None else filters, case["mask"],
        output_mask=case["output_mask"], channel_block=case["channel_block"], tile=TILE, **case["kwargs"],
    )


def reference(case, x=None, filters=None):
    return masked_conv2d_reference(
        case["x"] if x is None else x, case["filters"] if filters is None else filters, case["mask"],
        case["output_mask"], case["kwargs"]["strides"], case["kwargs"]["padding"],
        case["kwargs"]["dilations"], case["channel_block"],
    )


def assert_close(actual, expected, dtype, terms):
    rtol, atol = tolerance(dtype, terms)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def window_terms(geometry):
    n, h, w, cin, cout, (kh, kw), *_ = geometry
    return kh * kw * cin


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
def test_forward_matches_reference(geometry, density, level, with_output_mask):
    case = make_case(geometry, density, level, with_output_mask)
    y = fused(case)
    expected = reference(case)
    assert y.shape == expected.shape
    assert_close(y, expected, np.float32, window_terms(geometry))


def check_gradients_against_tape(case, geometry):
    x = tf.constant(case["x"])
    filters = tf.constant(case["filters"])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, filters])
        y = fused(case, x, filters)
        expected = reference(case, x, filters)
        upstream = tf.constant(case["rng"].standard_normal(y.shape).astype(np.float32))
        loss = tf.reduce_sum(y * upstream)
        reference_loss = tf.reduce_sum(expected * upstream)
    dx, dfilters = tape.gradient(loss, [x, filters])
    ref_dx, ref_dfilters = tape.gradient(reference_loss, [x, filters])
    n, h, w, cin, cout, (kh, kw), *_ = geometry
    out_h, out_w = output_hw(geometry)
    assert_close(dx, ref_dx, np.float32, kh * kw * cout)
    assert_close(dfilters, ref_dfilters, np.float32, n * out_h * out_w)
    # Masked-out filter entries get exact zeros, not just small numbers.
    element = conv_element_mask(case["mask"], (kh, kw, cin, cout), case["channel_block"])
    assert np.all(dfilters.numpy()[element == 0] == 0)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("density", [0.25, 1.0])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
def test_gradients_match_reference_tape(geometry, density, with_output_mask):
    check_gradients_against_tape(make_case(geometry, density, "element", with_output_mask), geometry)


# Stride-1 forward and dx products without an output mask read their rows in
# place from zero-bordered copies of x and dy when the channel blocks are
# whole and the output strips full-width (the blocks above are too narrow for
# that); a ragged block falls back to the gather. Explicit paddings larger
# than the filter's reach crop dy's copy.
IN_PLACE_GEOMETRIES = [
    (2, 9, 11, 32, 48, (3, 3), 1, "SAME", 1),
    (1, 12, 10, 48, 32, (5, 5), 1, "VALID", 1),
    (2, 9, 13, 32, 32, (1, 7), 1, "SAME", 1),
    (2, 13, 13, 32, 48, (3, 3), 1, "SAME", 2),
    (1, 13, 11, 48, 32, (3, 3), 1, [[0, 0], [4, 1], [0, 3], [0, 0]], 1),
    (1, 7, 7, 40, 40, (3, 3), 1, "SAME", 1),
    # Over 256 output pixels: dfilters is summed in several units.
    (2, 24, 19, 16, 32, (3, 3), 1, "SAME", 1),
]


@pytest.mark.parametrize("geometry", IN_PLACE_GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("channel_block", [(16, 16), (16, 32)], ids=["16x16", "16x32"])
@pytest.mark.parametrize("level", ["block", "element"])
def test_stride_one_rows_read_in_place(geometry, channel_block, level):
    case = make_case(geometry, 0.5, "block", False)
    case["channel_block"] = channel_block
    case["mask"] = make_filter_mask(case["rng"], geometry, 0.5, level, channel_block)
    assert_close(fused(case), reference(case), np.float32, window_terms(geometry))
    check_gradients_against_tape(case, geometry)


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
def test_dfilters_summed_in_several_units(strides, with_output_mask):
    geometry = (3, 41, 37, 16, 24, (3, 3), strides, "SAME", 1)
    case = make_case(geometry, 0.5, "element", with_output_mask)
    check_gradients_against_tape(case, geometry)


@pytest.mark.parametrize(
    "geometry",
    [
        (2, 5, 6, 5, 4, (3, 3), 1, "SAME", 1),
        (1, 7, 6, 3, 5, (3, 2), 2, "VALID", 1),
        (1, 7, 7, 4, 3, (2, 3), 1, "SAME", 2),
    ],
    ids=geometry_id,
)
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
def test_gradients_numerically_in_float64(geometry, with_output_mask):
    case = make_case(geometry, 0.5, "element", with_output_mask, dtype=np.float64, seed=3)
    case["mask"] = case["mask"] * 1.5
    theoretical, numerical = tf.test.compute_gradient(
        lambda x, filters: fused(case, x, filters), [case["x"], case["filters"]]
    )
    for analytic, estimate in zip(theoretical, numerical):
        np.testing.assert_allclose(analytic, estimate, rtol=1e-6, atol=1e-6)


def test_masked_out_nan_and_inf_contribute_exact_zeros():
    geometry = (2, 9, 9, 20, 12, (3, 3), 1, "SAME", 1)
    case = make_case(geometry, 0.5, "element", with_output_mask=False)
    element = conv_element_mask(case["mask"], case["filters"].shape, CHANNEL_BLOCK)
    poisoned = np.where(element == 0, np.float32(np.nan), case["filters"])
    poisoned[..., 0][element[..., 0] == 0] = np.inf
    x = tf.constant(case["x"])
    filters = tf.constant(poisoned)
    with tf.GradientTape() as tape:
        tape.watch([x, filters])
        y = fused(case, x, filters)
    dx, dfilters = tape.gradient(y, [x, filters])
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(dx.numpy()))
    assert_close(y, reference(case), np.float32, window_terms(geometry))
    assert np.all(dfilters.numpy()[element == 0] == 0)


def test_inactive_output_tiles_are_exact_zeros_and_pass_no_gradient():
    geometry = (2, 16, 16, 8, 8, (3, 3), 1, "SAME", 1)
    case = make_case(geometry, 1.0, "block", with_output_mask=False)
    output_mask = np.zeros((2, 16, 16), np.float32)
    output_mask[0, :4, :8] = 1.0  # one tile of image 0
    case["output_mask"] = output_mask
    x = tf.constant(np.where(np.arange(16)[None, :, None, None] >= 8, np.nan, case["x"]).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fused(case, x)
    dx = tape.gradient(y, x).numpy()
    y = y.numpy()
    assert np.all(y[output_mask == 0] == 0)
    assert np.all(np.isfinite(y[0, :4, :8]))
    # The tile reads input rows 0-4 and columns 0-8 of image 0, nothing else.
    assert np.all(dx[1] == 0) and np.all(dx[0, 5:] == 0) and np.all(dx[0, :, 9:] == 0)
    assert np.any(dx[0, :5, :9] != 0)


@pytest.mark.parametrize("mask_dtype", [tf.bool, tf.int8, tf.uint8, tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float64])
def test_mask_dtypes(mask_dtype):
    geometry = (1, 9, 9, 20, 12, (3, 3), 1, "SAME", 1)
    case = make_case(geometry, 0.5, "block", with_output_mask=True)
    case["mask"] = tf.cast(case["mask"] * 3, mask_dtype)
    case["output_mask"] = tf.cast(case["output_mask"] * 2, mask_dtype)
    assert_close(fused(case), reference(case), np.float32, window_terms(geometry))


def test_float64():
    geometry = (2, 9, 11, 20, 12, (3, 3), 2, "SAME", 1)
    case = make_case(geometry, 0.5, "element", with_output_mask=True, dtype=np.float64)
    y = fused(case)
    assert y.dtype == tf.float64
    assert_close(y, reference(case), np.float64, window_terms(geometry))


def test_no_mask_is_plain_conv2d():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, 11, 40)).astype(np.float32)
    filters = rng.standard_normal((3, 3, 40, 24)).astype(np.float32)
    y = masked_ops.masked_conv2d(x, filters, strides=(2, 1), padding="SAME")
    assert_close(y, tf.nn.conv2d(x, filters, (2, 1), "SAME"), np.float32, 9 * 40)


def test_output_mask_with_trailing_one():
    geometry = (2, 9, 9, 8, 8, (3, 3), 1, "VALID", 1)
    case = make_case(geometry, 1.0, "block", with_output_mask=True)
    expected = reference(case)
    case["output_mask"] = case["output_mask"][..., None]
    assert_close(fused(case), expected, np.float32, window_terms(geometry))


def test_square_channel_block_and_tile_ints():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 20, 20, 40)).astype(np.float32)
    filters = rng.standard_normal((3, 3, 40, 40)).astype(np.float32)
    mask = random_block_mask(rng, (2, 2), 0.5)
    output_mask = (rng.random((1, 20, 20)) < 0.5).astype(np.float32)
    y = masked_ops.masked_conv2d(x, filters, mask, padding="SAME", output_mask=output_mask, channel_block=32, tile=5)
    expected = masked_conv2d_reference(x, filters, mask, output_mask, 1, "SAME", 1, (32, 32))
    assert_close(y, expected, np.float32, 9 * 40)


def test_works_inside_tf_function_with_unknown_spatial_dims():
    rng = np.random.default_rng(7)
    filters = tf.constant(rng.standard_normal((3, 3, 8, 8)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 8], tf.float32)])
    def run(x):
        return masked_ops.masked_conv2d(x, filters, padding="SAME")

    x = rng.standard_normal((2, 10, 7, 8)).astype(np.float32)
    assert_close(run(x), tf.nn.conv2d(x, filters, 1, "SAME"), np.float32, 72)


# --- bad inputs: the kernels validate, whatever calls them -------------------

GOOD = {
    "x": np.zeros((1, 8, 8, 4), np.float32),
    "filters": np.zeros((3, 3, 4, 6), np.float32),
    "mask": np.ones((1, 1), np.float32),
    "output_mask": np.zeros((0,), np.float32),
}
ATTRS = {
    "strides": [1, 1],
    "dilations": [1, 1],
    "padding": "VALID",
    "explicit_paddings": [],
    "in_channel_block": 32,
    "out_channel_block": 32,
    "tile_height": 8,
    "tile_width": 8,
    "use_output_mask": False,
}


def call_raw(op_name, inputs, attrs, graph):
    op = getattr(raw_ops, op_name)
    if not graph:
        return op(**inputs, **attrs)
    return tf.function(lambda: op(**inputs, **attrs))()


BAD_CASES = {
    "x-rank": ({"x": np.zeros((8, 8, 4), np.float32)}, {}, "x must have shape"),
    "filters-rank": ({"filters": np.zeros((3, 4, 6), np.float32)}, {}, "filters must have shape"),
    "channels": ({"filters": np.zeros((3, 3, 5, 6), np.float32)}, {}, "x's channels must equal"),
    "mask-shape": ({"mask": np.ones((2, 1), np.float32)}, {}, "mask must be element-level"),
    "mask-rank": ({"mask": np.ones((3, 3, 4), np.float32)}, {}, "mask must be element-level"),
    "too-small": ({"filters": np.zeros((9, 3, 4, 6), np.float32)}, {}, "smaller than the dilated filter"),
    "output-mask-shape": (
        {"output_mask": np.ones((1, 6, 5), np.float32)}, {"use_output_mask": True}, "output_mask must have shape"),
    "output-mask-unused": ({"output_mask": np.ones((1, 6, 6), np.float32)}, {}, "output_mask must be empty"),
    "strides": ({}, {"strides": [1, 0]}, "strides must be two positive"),
    "dilations": ({}, {"dilations": [1, 1, 1]}, "dilations must be two positive"),
    "explicit": ({}, {"padding": "EXPLICIT", "explicit_paddings": [1, 1, -1, 0]}, "explicit_paddings must be four"),
    "pads-without-explicit": ({}, {"explicit_paddings": [1, 1, 1, 1]}, "explicit_paddings must be empty"),
    "huge-dilation": ({}, {"dilations": [2**62, 1]}, "must each span at most"),
}


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("op_name", ["masked_ops_masked_conv2d", "masked_ops_masked_conv2d_grad_input",
                                     "masked_ops_masked_conv2d_grad_filter"])
@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_inputs_raise_invalid_argument(case, op_name, graph):
    overrides, attr_overrides, message = BAD_CASES[case]
    inputs = {**GOOD, **overrides}
    if op_name != "masked_ops_masked_conv2d":
        inputs["dy"] = np.zeros((1, 6, 6, 6), np.float32)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        call_raw(op_name, inputs, {**ATTRS, **attr_overrides}, graph)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("op_name", ["masked_ops_masked_conv2d_grad_input", "masked_ops_masked_conv2d_grad_filter"])
def test_dy_of_the_wrong_shape_is_rejected(op_name, graph):
    inputs = {**GOOD, "dy": np.zeros((1, 6, 5, 6), np.float32)}
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="dy must have the output's shape"):
        call_raw(op_name, inputs, ATTRS, graph)


def test_bad_python_arguments():
    x, filters = GOOD["x"], GOOD["filters"]
    with pytest.raises(ValueError, match="padding"):
        masked_ops.masked_conv2d(x, filters, padding="FULL")
    with pytest.raises(ValueError, match="batch and channel"):
        masked_ops.masked_conv2d(x, filters, padding=[[1, 0], [0, 0], [0, 0], [0, 0]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="channel_block must be positive"):
        masked_ops.masked_conv2d(x, filters, channel_block=0)


# (VALID rejects an input smaller than the filter, as tf.nn.conv2d does.)
@pytest.mark.parametrize(
    "x_shape, padding",
    [((1, 5, 0, 3), "SAME"), ((1, 0, 5, 3), "SAME"), ((0, 5, 5, 3), "SAME"), ((0, 5, 5, 3), "VALID")],
    ids=["no-width", "no-height", "no-batch", "no-batch-valid"],
)
def test_empty_outputs_give_zero_filter_gradients(x_shape, padding):
    """A regression: the stride-1 filter gradient divided by the output width."""
    x = tf.zeros(x_shape)
    filters = tf.ones((3, 3, 3, 4))
    with tf.GradientTape() as tape:
        tape.watch(filters)
        y = masked_ops.masked_conv2d(x, filters, np.ones((1, 1)), padding=padding, channel_block=16)
        loss = tf.reduce_sum(y)
    np.testing.assert_array_equal(tape.gradient(loss, filters).numpy(), np.zeros((3, 3, 3, 4)))
