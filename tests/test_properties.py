"""Property tests: every op on random valid shapes, block sizes, densities and
mask dtypes, against the float64 references of tests/fuzz_references.py.

make test runs a fixed, bounded set of examples (profile "ci"); a long
campaign: MASKED_OPS_HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_properties.py
"""

import os

import fuzz_references
from fuzz_references import ceil_div
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from masked_ops import _loader

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MASKED_OPS_HYPOTHESIS_PROFILE", "ci"))

FLOAT_TYPES = [tf.float32, tf.float64, tf.float16, tf.bfloat16]
MASK_TYPES = [tf.bool, tf.int8, tf.uint8, tf.int16, tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32,
              tf.float64]
MASK_VALUES = [1.0, 0.5, -2.0, 3.0]


def ops():
    return _loader.op_library()


@st.composite
def masks(draw, element_shape, grid_shape):
    """A mask at element or block level, of any dtype, with a random share of zeros."""
    shape = draw(st.sampled_from([element_shape, grid_shape]))
    dtype = draw(st.sampled_from(MASK_TYPES))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    values = np.where(rng.random(count) < density, rng.choice(MASK_VALUES, count), 0.0).reshape(shape)
    if dtype == tf.bool:
        return tf.constant(values != 0)
    if dtype.is_integer:
        values = np.trunc(values)
        if dtype.is_unsigned:
            values = np.abs(values)
    return tf.cast(tf.constant(values), dtype)


def normal(seed, shape, dtype):
    return tf.cast(tf.constant(np.random.default_rng(seed).standard_normal(shape)), dtype)


def assert_matches_reference(op, attrs, inputs, result):
    outcome = fuzz_references.check_result(tf, {"op": op, "attrs": attrs}, inputs, result)
    assert outcome == "ok-checked", outcome


@st.composite
def matmul_cases(draw):
    leading = draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))
    k, n = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    block_rows, block_cols = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    dtype = draw(st.sampled_from(FLOAT_TYPES))
    mask = draw(masks([k, n], [ceil_div(k, block_rows), ceil_div(n, block_cols)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return leading, k, n, {"block_rows": block_rows, "block_cols": block_cols}, dtype, mask, seed


@given(matmul_cases())
def test_masked_matmul_and_its_gradients(case):
    leading, k, n, attrs, dtype, mask, seed = case
    x = normal(seed, leading + [k], dtype)
    w = normal(seed + 1, [k, n], dtype)
    dy = normal(seed + 2, leading + [n], dtype)
    assert_matches_reference("MaskedMatmul", attrs, {"x": x, "w": w, "mask": mask},
                             ops().MaskedOps_MaskedMatmul(x=x, w=w, mask=mask, **attrs))
    assert_matches_reference("MaskedMatmulGradInput", attrs, {"dy": dy, "w": w, "mask": mask},
                             ops().MaskedOps_MaskedMatmulGradInput(dy=dy, w=w, mask=mask, **attrs))
    assert_matches_reference("MaskedMatmulGradWeight", attrs, {"x": x, "dy": dy, "mask": mask},
                             ops().MaskedOps_MaskedMatmulGradWeight(x=x, dy=dy, mask=mask, **attrs))


@st.composite
def conv_cases(draw):
    batch, height, width = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    cin, cout = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding = draw(st.sampled_from(["SAME", "VALID", "EXPLICIT"]))
    attrs = {
        "strides": [draw(st.integers(1, 3)), draw(st.integers(1, 3))],
        "dilations": [draw(st.integers(1, 2)), draw(st.integers(1, 2))],
        "padding": padding,
        "explicit_paddings": [draw(st.integers(0, 3)) for _ in range(4)] if padding == "EXPLICIT" else [],
        "in_channel_block": draw(st.integers(1, 10)),
        "out_channel_block": draw(st.integers(1, 10)),
        "tile_height": draw(st.integers(1, 6)),
        "tile_width": draw(st.integers(1, 6)),
        "use_output_mask": draw(st.booleans()),
    }
    out = []
    for d, size in enumerate((height, width)):
        pads = attrs["explicit_paddings"][2 * d:2 * d + 2] or [0, 0]
        length = fuzz_references.conv_output_size(size, (kh, kw)[d], attrs["strides"][d], attrs["dilations"][d],
                                                  padding, *pads)
        assume(length is not None)
        out.append(length)
    mask = draw(masks([kh, kw, cin, cout], [ceil_div(cin, attrs["in_channel_block"]),
                                            ceil_div(cout, attrs["out_channel_block"])]))
    output_mask_shape = [batch, *out, 1] if draw(st.booleans()) else [batch, *out]
    output_mask = draw(masks(output_mask_shape, output_mask_shape)) if attrs["use_output_mask"] else tf.zeros([0])
    dtype = draw(st.sampled_from(FLOAT_TYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return [batch, height, width, cin], [kh, kw, cin, cout], [batch, *out, cout], attrs, dtype, mask, output_mask, seed


@given(conv_cases())
def test_masked_conv2d_and_its_gradients(case):
    x_shape, f_shape, y_shape, attrs, dtype, mask, output_mask, seed = case
    x, filters, dy = normal(seed, x_shape, dtype), normal(seed + 1, f_shape, dtype), normal(seed + 2, y_shape, dtype)
    inputs = {"x": x, "filters": filters, "mask": mask, "output_mask": output_mask}
    assert_matches_reference("MaskedConv2D", attrs, inputs, ops().MaskedOps_MaskedConv2D(**inputs, **attrs))
    inputs["dy"] = dy
    assert_matches_reference("MaskedConv2DGradInput", attrs, inputs,
                             ops().MaskedOps_MaskedConv2DGradInput(**inputs, **attrs))
    assert_matches_reference("MaskedConv2DGradFilter", attrs, inputs,
                             ops().MaskedOps_MaskedConv2DGradFilter(**inputs, **attrs))


@st.composite
def stacked_cases(draw, dtypes):
    """A tensor viewed as stacked [k, n] matrices, with its mask."""
    shape = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    attrs = {"block_rows": draw(st.integers(1, 14)), "block_cols": draw(st.integers(1, 14))}
    k, n = (shape[-2] if len(shape) >= 2 else 1), shape[-1]
    mask = draw(masks(shape, [ceil_div(k, attrs["block_rows"]), ceil_div(n, attrs["block_cols"])]))
    return shape, attrs, draw(st.sampled_from(dtypes)), mask, draw(st.integers(0, 2**31 - 1))


@given(stacked_cases(FLOAT_TYPES))
def test_mask_gradient(case):
    shape, attrs, dtype, mask, seed = case
    grad = normal(seed, shape, dtype)
    assert_matches_reference("MaskGradient", attrs, {"grad": grad, "mask": mask},
                             ops().MaskedOps_MaskGradient(grad=grad, mask=mask, **attrs))


def live_entries(mask, shape, attrs):
    """The mask's live entries at the shape of the tensor it masks."""
    _, live = fuzz_references.stacked_mask(mask.numpy(), shape, attrs["block_rows"], attrs["block_cols"])
    return np.broadcast_to(live, shape)


@given(stacked_cases(FLOAT_TYPES), st.sampled_from(["assign", "add", "sub"]))
def test_masked_update_variable(case, mode):
    shape, attrs, dtype, mask, seed = case
    old, value = normal(seed, shape, dtype), normal(seed + 1, shape, dtype)
    variable = tf.Variable(old)
    ops().MaskedOps_MaskedUpdateVariable(resource=variable.handle, value=value, mask=mask, mode=mode, **attrs)
    updated = {"assign": value, "add": old + value, "sub": old - value}[mode]
    np.testing.assert_array_equal(variable.numpy(), np.where(live_entries(mask, shape, attrs), updated, old))


def sgd_reference(w, m, g, lr, momentum, decay, use_momentum, nesterov):
    w = w - w * decay * lr
    if not use_momentum:
        return w - g * lr, m
    m_new = m * momentum - g * lr
    return w + (m_new * momentum - g * lr if nesterov else m_new), m_new


def adam_reference(w, m, v, v_hat, g, alpha, b1, b2, eps, lr, decay, amsgrad):
    w = w - w * decay * lr
    m = m + (g - m) * b1
    v = v + (g * g - v) * b2
    v_hat = np.maximum(v_hat, v) if amsgrad else v_hat
    return w - m * alpha / (np.sqrt(v_hat if amsgrad else v) + eps), m, v, v_hat


def rmsprop_reference(w, velocity, momentum, average, g, lr, rho, one_minus_rho, momentum_factor, eps, decay,
                      use_momentum, centered):
    w = w - w * decay * lr
    velocity = rho * velocity + one_minus_rho * g * g
    denominator = velocity + eps
    if centered:
        average = rho * average + one_minus_rho * g
        denominator = velocity - average * average + eps
    increment = lr * g / np.sqrt(denominator)
    if use_momentum:
        momentum = momentum_factor * momentum + increment
        return w - momentum, velocity, momentum, average
    return w - increment, velocity, momentum, average


@given(stacked_cases([tf.float64]), st.sampled_from(["sgd", "adam", "rmsprop"]), st.booleans(), st.booleans(),
       st.sampled_from([0.0, 0.01]))
def test_masked_optimizer_steps(case, kind, flag_a, flag_b, decay):
    shape, attrs, dtype, mask, seed = case
    rng = np.random.default_rng(seed)
    state = [rng.standard_normal(shape) for _ in range(4)]
    state[2], state[3] = np.abs(state[2]), np.abs(state[3])  # second moments are non-negative
    grad = rng.standard_normal(shape)
    variables = [tf.Variable(tf.constant(value, dtype)) for value in state]
    handles = [variable.handle for variable in variables]
    g = tf.constant(grad, dtype)
    scalar = lambda value: tf.constant(value, dtype)  # noqa: E731
    if kind == "sgd":
        ops().MaskedOps_MaskedSgdStep(
            variable=handles[0], momentum=handles[1], grad=g, mask=mask, learning_rate=scalar(0.1),
            momentum_factor=scalar(0.9), weight_decay=scalar(decay), use_momentum=flag_a, nesterov=flag_b, **attrs)
        new = sgd_reference(state[0], state[1], grad, 0.1, 0.9, decay, flag_a, flag_b)
        touched = [0, 1]
    elif kind == "adam":
        ops().MaskedOps_MaskedAdamStep(
            variable=handles[0], m=handles[1], v=handles[2], v_hat=handles[3], grad=g, mask=mask,
            alpha=scalar(0.01), one_minus_beta_1=scalar(0.1), one_minus_beta_2=scalar(0.001),
            epsilon=scalar(1e-7), learning_rate=scalar(0.01), weight_decay=scalar(decay), amsgrad=flag_a, **attrs)
        new = adam_reference(*state, grad, 0.01, 0.1, 0.001, 1e-7, 0.01, decay, flag_a)
        touched = [0, 1, 2, 3]
    else:
        ops().MaskedOps_MaskedRmspropStep(
            variable=handles[0], velocity=handles[2], momentum=handles[1], average_grad=handles[3], grad=g,
            mask=mask, learning_rate=scalar(0.01), rho=scalar(0.9), one_minus_rho=scalar(0.1),
            momentum_factor=scalar(0.5), epsilon=scalar(1e-7), weight_decay=scalar(decay), use_momentum=flag_a,
            centered=flag_b, **attrs)
        w, velocity, momentum, average = rmsprop_reference(
            state[0], state[2], state[1], state[3], grad, 0.01, 0.9, 0.1, 0.5, 1e-7, decay, flag_a, flag_b)
        new = (w, momentum, velocity, average)
        touched = [0, 1, 2, 3]
    live = live_entries(mask, shape, attrs)
    for index in range(4):
        expected = np.where(live, new[index], state[index]) if index in touched else state[index]
        np.testing.assert_allclose(variables[index].numpy(), expected, rtol=1e-12, atol=1e-14)
        # Frozen entries stay bit for bit.
        np.testing.assert_array_equal(variables[index].numpy()[~live], state[index][~live])
