"""NaN and +/-Inf through every op, forward and backward.

(a) Non-finite values where a mask switches entries off (masked-out weights,
    frozen gradients and optimizer state, inputs read only by output-mask-off
    tiles, upstream gradients at output-mask-off pixels) never leak: the result
    is bit for bit the result with those entries replaced by finite values, and
    frozen entries keep their exact bits (NaN payloads included).
(b) Non-finite values in live entries propagate exactly as in the pure
    TensorFlow reference: the same positions are NaN, +Inf and -Inf, and the
    finite positions are close.

Every check compares two runs of the op (a) or the op against the reference
(b), so a kernel that leaked a masked-out NaN, or dropped a live one, fails.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import masked_ops
from masked_ops.conv import _padding_attrs
from masked_ops.ops import _ops as raw_ops
from masked_ops.optimizers import BlockFreeze, masked_update
from reference import (
    conv_element_mask,
    expand_block_mask_np,
    masked_matmul_reference,
    tolerance,
)

DTYPES = [np.float32, np.float64]
LEVELS = ["block", "element"]
POISONS = {"nan": [np.nan], "inf": [np.inf], "-inf": [-np.inf], "mixed": [np.nan, np.inf, -np.inf]}
# Distinctive NaN payloads: a frozen entry must keep these exact bits.
NAN_BITS = {np.float32: np.uint32(0x7FC12345), np.float64: np.uint64(0x7FF8_0000_DEAD_BEEF)}


def dtype_id(dtype):
    return np.dtype(dtype).name


# --- helpers -----------------------------------------------------------------


def bits(a):
    a = np.ascontiguousarray(np.asarray(a))
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bitwise_equal(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    differ = bits(actual) != bits(expected)
    if differ.any():
        where = np.argwhere(differ)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(differ.sum())} entries differ bit for bit, e.g. at {where}: "
            f"{actual[differ][:5]} vs {expected[differ][:5]}"
        )


def non_finite_mismatch(actual, expected, dtype, terms, what):
    """None when `actual` has NaN, +Inf and -Inf exactly where `expected` has
    them and is close elsewhere; else a message saying where they differ."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return f"{what}: shape {actual.shape} vs {expected.shape}"
    for name, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        got, want = test(actual), test(expected)
        if not np.array_equal(got, want):
            extra, missing = np.argwhere(got & ~want), np.argwhere(want & ~got)
            return (
                f"{what}: {name} at different positions than the reference: {len(extra)} extra "
                f"(e.g. {extra[:4].tolist()}, reference {expected[tuple(extra[:4].T)]}), {len(missing)} missing "
                f"(e.g. {missing[:4].tolist()}, got {actual[tuple(missing[:4].T)]})"
            )
    finite = np.isfinite(expected)
    rtol, atol = tolerance(dtype, terms)
    try:
        np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol)
    except AssertionError as err:
        return f"{what}: finite entries differ: {err}"
    return None


def check_all(checks):
    """Runs every (actual, expected, dtype, terms, what) check and reports all
    mismatches together, so one failing output does not hide another."""
    failures = [m for m in (non_finite_mismatch(*check) for check in checks) if m]
    assert not failures, "\n".join(failures)


def poison(rng, kind, count, dtype):
    return rng.choice(POISONS[kind], count).astype(dtype)


def with_poison_at(rng, values, positions, kind):
    """A copy of `values` with non-finite values at the boolean `positions`."""
    out = np.array(values, copy=True)
    out[positions] = poison(rng, kind, int(positions.sum()), out.dtype)
    return out


def pick(rng, candidates, count):
    """A boolean mask of `count` positions chosen among the True `candidates`."""
    flat = np.flatnonzero(candidates)
    assert flat.size > 0
    chosen = np.zeros(candidates.size, bool)
    chosen[rng.choice(flat, min(count, flat.size), replace=False)] = True
    return chosen.reshape(candidates.shape)


def keep_one_per_block(keep, block_rows, block_cols):
    """keep[...] with the first entry of every block of the last two dims set."""
    keep = keep.copy()
    keep[..., ::block_rows, ::block_cols] = True
    return keep


# --- masked_matmul -------------------------------------------------------------

# (x shape, n, block size, soft factors): a small batch with a 0/1 block mask
# (w read in place), a packed batch with narrow blocks and soft factors, and
# batch dimensions with ragged 32-blocks. No k or n is a multiple of its block.
MATMUL_CASES = [
    ((5, 45), 38, (16, 8), False),
    ((30, 70), 50, (8, 16), True),
    ((2, 7, 100), 33, (32, 32), True),
]


def matmul_case_id(case):
    x_shape, n, block, soft = case
    return f"x{'x'.join(map(str, x_shape))}-n{n}-b{block[0]}x{block[1]}-{'soft' if soft else 'binary'}"


def matmul_mask(rng, k, n, block, level, soft, special):
    """A mask and its element-level form. `special` = "live" forces one block
    row and one block column live throughout (where inputs may carry live NaN),
    "dead" forces one of each dead throughout; returns the band of rows and of
    columns so forced."""
    grid = (math.ceil(k / block[0]), math.ceil(n / block[1]))
    live = rng.random(grid) < 0.5
    row, col = rng.integers(grid[0]), rng.integers(grid[1])
    live[row, :] = live[:, col] = special == "live"
    if special == "dead":
        live[(row + 1) % grid[0], (col + 1) % grid[1]] = True
    values = rng.choice([1.0, 2.5, -0.5], grid) if soft else np.ones(grid)
    block_mask = np.where(live, values, 0.0).astype(np.float32)
    element = expand_block_mask_np(block_mask, (k, n), block)
    if level == "element":
        element = element * keep_one_per_block(rng.random((k, n)) < 0.75, *block)
        mask = element
    else:
        mask = block_mask
    rows = np.zeros(k, bool)
    rows[row * block[0]:(row + 1) * block[0]] = True
    cols = np.zeros(n, bool)
    cols[col * block[1]:(col + 1) * block[1]] = True
    return mask, element, rows, cols


def matmul_inputs(rng, x_shape, n, dtype):
    k = x_shape[-1]
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    dy = rng.standard_normal(x_shape[:-1] + (n,)).astype(dtype)
    return x, w, dy


def matmul_all(x, w, dy, mask, block):
    """y, dx and dw through the public wrapper and a tape, then dx and dw
    again from the raw gradient ops."""
    x, w, dy = tf.constant(x), tf.constant(w), tf.constant(dy)
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = masked_ops.masked_matmul(x, w, mask, block_size=block)
    dx, dw = tape.gradient(y, [x, w], output_gradients=dy)
    attrs = {"block_rows": block[0], "block_cols": block[1]}
    mask = tf.constant(mask)
    raw_dx = raw_ops.masked_ops_masked_matmul_grad_input(dy, w, mask, **attrs)
    raw_dw = raw_ops.masked_ops_masked_matmul_grad_weight(x, dy, mask, **attrs)
    return {"y": y.numpy(), "dx": dx.numpy(), "dw": dw.numpy(), "raw dx": raw_dx.numpy(), "raw dw": raw_dw.numpy()}


def matmul_reference_all(x, w, dy, mask, block):
    x, w, dy = tf.constant(x), tf.constant(w), tf.constant(dy)
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = masked_matmul_reference(x, w, mask, block)
    dx, dw = tape.gradient(y, [x, w], output_gradients=dy)
    return {"y": y.numpy(), "dx": dx.numpy(), "dw": dw.numpy(), "raw dx": dx.numpy(), "raw dw": dw.numpy()}


def matmul_terms(x_shape, n):
    m, k = int(np.prod(x_shape[:-1])), x_shape[-1]
    return {"y": k, "dx": n, "dw": m, "raw dx": n, "raw dw": m}


@pytest.mark.parametrize("case", MATMUL_CASES, ids=matmul_case_id)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", list(POISONS))
def test_matmul_masked_out_weights_never_leak(case, level, dtype, kind):
    x_shape, n, block, soft = case
    rng = np.random.default_rng([len(x_shape), n, *block, LEVELS.index(level), np.dtype(dtype).itemsize,
                                 list(POISONS).index(kind)])
    k = x_shape[-1]
    mask, element, _, _ = matmul_mask(rng, k, n, block, level, soft, special="live")
    dead = element == 0
    x, w, dy = matmul_inputs(rng, x_shape, n, dtype)
    finite_w = np.where(dead, 100 * rng.standard_normal((k, n)), w).astype(dtype)
    poisoned_w = with_poison_at(rng, w, dead, kind)
    got = matmul_all(x, poisoned_w, dy, mask, block)
    clean = matmul_all(x, finite_w, dy, mask, block)
    for name in got:
        assert_bitwise_equal(got[name], clean[name], f"{name} with {kind} in masked-out weights")
        assert np.isfinite(got[name]).all(), name
    assert np.all(got["dw"][dead] == 0) and np.all(got["raw dw"][dead] == 0)
    check_all([(clean[name], want, dtype, terms, name) for (name, want), terms in zip(
        matmul_reference_all(x, finite_w, dy, mask, block).items(), matmul_terms(x_shape, n).values())])


@pytest.mark.parametrize("case", MATMUL_CASES, ids=matmul_case_id)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matmul_inputs_under_dead_blocks_never_leak(case, level, dtype):
    """README (Known limits): a NaN or Inf in x reaches the output through live
    blocks only, never through dead blocks, which are skipped. So x under a
    block row that is dead throughout, and dy over a block column dead
    throughout, change nothing, bit for bit, forward or backward."""
    x_shape, n, block, soft = case
    rng = np.random.default_rng([len(x_shape), n, *block, LEVELS.index(level), np.dtype(dtype).itemsize, 7])
    k = x_shape[-1]
    mask, element, dead_rows, dead_cols = matmul_mask(rng, k, n, block, level, soft, special="dead")
    x, w, dy = matmul_inputs(rng, x_shape, n, dtype)
    w = with_poison_at(rng, w, element == 0, "mixed")
    x_poison = np.broadcast_to(dead_rows, x.shape) & (rng.random(x.shape) < 0.5)
    dy_poison = np.broadcast_to(dead_cols, dy.shape) & (rng.random(dy.shape) < 0.5)
    got = matmul_all(with_poison_at(rng, x, x_poison, "mixed"), w, with_poison_at(rng, dy, dy_poison, "mixed"),
                     mask, block)
    clean = matmul_all(x, w, dy, mask, block)
    for name in got:
        assert_bitwise_equal(got[name], clean[name], f"{name} with NaN/Inf in x and dy under dead blocks")
        assert np.isfinite(got[name]).all(), name


@pytest.mark.parametrize("case", MATMUL_CASES, ids=matmul_case_id)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("source", ["w", "x", "dy", "mask"])
def test_matmul_live_non_finite_propagates_as_in_the_reference(case, level, dtype, source):
    """NaN, +Inf and -Inf in live weights, in x (under a block row live
    throughout), in dy (over a block column live throughout) or in live mask
    entries: y, dx and dw (tape and raw ops) are non-finite exactly where
    tf.matmul on the masked weights is. Masked-out weights are NaN/Inf too."""
    x_shape, n, block, soft = case
    rng = np.random.default_rng([len(x_shape), n, *block, LEVELS.index(level), np.dtype(dtype).itemsize,
                                 ["w", "x", "dy", "mask"].index(source)])
    k = x_shape[-1]
    mask, element, live_rows, live_cols = matmul_mask(rng, k, n, block, level, soft, special="live")
    x, w, dy = matmul_inputs(rng, x_shape, n, dtype)
    w = with_poison_at(rng, w, element == 0, "mixed")
    if source == "w":
        w = with_poison_at(rng, w, pick(rng, element != 0, 4), "mixed")
    elif source == "x":
        x = with_poison_at(rng, x, pick(rng, np.broadcast_to(live_rows, x.shape), 4), "mixed")
    elif source == "dy":
        dy = with_poison_at(rng, dy, pick(rng, np.broadcast_to(live_cols, dy.shape), 4), "mixed")
    else:
        mask = with_poison_at(rng, mask, pick(rng, mask != 0, 2), "mixed")
    got = matmul_all(x, w, dy, mask, block)
    want = matmul_reference_all(x, w, dy, mask, block)
    assert any(not np.isfinite(v).all() for v in want.values()), "the case must produce NaN/Inf"
    terms = matmul_terms(x_shape, n)
    check_all([(got[name], want[name], dtype, terms[name], f"{name} ({source} poisoned)") for name in got])


# --- masked_conv2d -------------------------------------------------------------

# (batch, h, w, cin, cout, (kh, kw), strides, padding, dilations, channel block):
# ragged channel blocks with dilation 2 (SAME), stride 2 VALID with a 3x2
# filter, uneven explicit padding, and whole 16x16 blocks at stride 1 (rows
# read in place from a zero-bordered copy when there is no output mask).
# (TensorFlow's CPU input gradient, in the reference, takes dilations only
# through SAME / VALID.)
CONV_CASES = [
    (2, 9, 11, 20, 12, (3, 3), 1, "SAME", 2, (8, 8)),
    (2, 11, 10, 17, 9, (3, 2), 2, "VALID", 1, (8, 4)),
    (1, 10, 9, 12, 20, (3, 3), 1, [[0, 0], [2, 1], [1, 2], [0, 0]], 1, (8, 8)),
    (2, 9, 11, 32, 48, (3, 3), 1, "SAME", 1, (16, 16)),
]
TILE = (4, 4)


def conv_case_id(case):
    n, h, w, cin, cout, (kh, kw), s, pad, d, cb = case
    pad = pad if isinstance(pad, str) else "explicit"
    return f"{n}x{h}x{w}x{cin}-{kh}x{kw}x{cout}-s{s}-{pad}-d{d}-cb{cb[0]}x{cb[1]}"


class Conv:
    """One geometry: its masks, inputs, the op, its raw gradient ops and the
    float64 TensorFlow reference."""

    def __init__(self, case, level, dtype, output_mask, seed, zeros_in_active_tiles=True):
        n, h, w, cin, cout, (kh, kw), s, pad, d, cb = case
        self.case, self.dtype, self.cb = case, dtype, cb
        self.strides, self.padding, self.dilations = s, pad, d
        self.rng = rng = np.random.default_rng([seed, n, h, w, cin, cout, kh, kw, s, d, LEVELS.index(level),
                                                np.dtype(dtype).itemsize, int(output_mask)])
        grid = (math.ceil(cin / cb[0]), math.ceil(cout / cb[1]))
        live = rng.random(grid) < 0.5
        in_block, out_block = rng.integers(grid[0]), rng.integers(grid[1])
        live[in_block, :] = live[:, out_block] = True  # live at every tap, for live NaN in x and dy
        block_mask = np.where(live, rng.choice([1.0, 2.5, -0.5], grid), 0.0).astype(np.float32)
        element = conv_element_mask(block_mask, (kh, kw, cin, cout), cb).copy()
        if level == "element":
            # Single entries off, and whole blocks off at some taps (but not
            # in the forced block row and column).
            tap_off = rng.random((kh, kw) + grid) < 0.3
            tap_off[:, :, in_block, :] = tap_off[:, :, :, out_block] = False
            tap_off = np.repeat(np.repeat(tap_off, cb[0], axis=2), cb[1], axis=3)[:, :, :cin, :cout]
            element *= keep_one_per_block(rng.random(element.shape) < 0.8, *cb) & ~tap_off
            self.mask = element
        else:
            self.mask = block_mask
        self.element = element
        self.live_in_channels = np.zeros(cin, bool)
        self.live_in_channels[in_block * cb[0]:(in_block + 1) * cb[0]] = True
        self.live_out_channels = np.zeros(cout, bool)
        self.live_out_channels[out_block * cb[1]:(out_block + 1) * cb[1]] = True
        self.x = rng.standard_normal((n, h, w, cin)).astype(dtype)
        self.filters = rng.standard_normal((kh, kw, cin, cout)).astype(dtype)
        out_h, out_w = self.op(self.x, self.filters, None).shape[1:3]
        if output_mask:
            tiles = (n, math.ceil(out_h / TILE[0]), math.ceil(out_w / TILE[1]))
            active = rng.random(tiles) < 0.5
            active.flat[0], active.flat[-1] = True, False
            self.active_tiles = np.repeat(np.repeat(active, TILE[0], axis=1), TILE[1], axis=2)[:, :out_h, :out_w]
            choices, p = ([0.0, 1.0, 2.5, -0.5], [0.25, 0.35, 0.2, 0.2]) if zeros_in_active_tiles else (
                [1.0, 2.5, -0.5], None)
            values = rng.choice(choices, size=self.active_tiles.shape, p=p)
            self.output_mask = np.where(self.active_tiles, values, 0.0).astype(np.float32)
        else:
            self.output_mask = None
            self.active_tiles = np.ones((n, out_h, out_w), bool)
        self.dy = rng.standard_normal((n, out_h, out_w, cout)).astype(dtype)

    @property
    def live_pixels(self):
        return np.ones(self.dy.shape[:3], bool) if self.output_mask is None else self.output_mask != 0

    def op(self, x, filters, output_mask):
        return masked_ops.masked_conv2d(x, filters, self.mask, strides=self.strides, padding=self.padding,
                                        dilations=self.dilations, output_mask=output_mask, channel_block=self.cb,
                                        tile=TILE)

    def raw_attrs(self):
        mode, explicit = _padding_attrs(self.padding)
        pair = lambda v: [v, v]  # noqa: E731
        return {"strides": pair(self.strides), "dilations": pair(self.dilations), "padding": mode,
                "explicit_paddings": explicit, "in_channel_block": self.cb[0], "out_channel_block": self.cb[1],
                "tile_height": TILE[0], "tile_width": TILE[1], "use_output_mask": self.output_mask is not None}

    def raw_output_mask(self):
        return tf.zeros([0], tf.bool) if self.output_mask is None else tf.constant(self.output_mask)

    def raw_grad_input(self, x, filters, dy):
        return raw_ops.masked_ops_masked_conv2d_grad_input(
            x, filters, tf.constant(self.mask), self.raw_output_mask(), dy, **self.raw_attrs()).numpy()

    def raw_grad_filter(self, x, filters, dy):
        return raw_ops.masked_ops_masked_conv2d_grad_filter(
            x, filters, tf.constant(self.mask), self.raw_output_mask(), dy, **self.raw_attrs()).numpy()

    def run(self, x=None, filters=None, dy=None):
        """y, dx and dfilters through the wrapper and a tape, and dx and
        dfilters from the raw gradient ops."""
        x = tf.constant(self.x if x is None else x)
        filters = tf.constant(self.filters if filters is None else filters)
        dy = tf.constant(self.dy if dy is None else dy)
        with tf.GradientTape() as tape:
            tape.watch([x, filters])
            y = self.op(x, filters, self.output_mask)
        dx, dfilters = tape.gradient(y, [x, filters], output_gradients=dy)
        return {"y": y.numpy(), "dx": dx.numpy(), "dfilters": dfilters.numpy(),
                "raw dx": self.raw_grad_input(x, filters, dy), "raw dfilters": self.raw_grad_filter(x, filters, dy)}

    def reference(self, x=None, filters=None, dy=None):
        """The same from the reference in float64 (see direct_conv2d)."""
        as64 = lambda v, default: tf.constant(np.asarray(default if v is None else v, np.float64))  # noqa: E731
        x, filters, dy = as64(x, self.x), as64(filters, self.filters), as64(dy, self.dy)
        element = tf.constant(conv_element_mask(self.mask, filters.shape, self.cb), tf.float64)
        with tf.GradientTape() as tape:
            tape.watch([x, filters])
            active = None if self.output_mask is None else self.active_tiles
            y = self.direct(x, tf.where(element != 0, filters * element, tf.zeros_like(filters)), active)
            if self.output_mask is not None:
                o = tf.constant(self.output_mask, tf.float64)[..., None]
                y = tf.where(o != 0, y * o, tf.zeros_like(y))
        dx, dfilters = tape.gradient(y, [x, filters], output_gradients=dy)
        return {"y": y.numpy(), "dx": dx.numpy(), "dfilters": dfilters.numpy(), "raw dx": dx.numpy(),
                "raw dfilters": dfilters.numpy()}

    def direct(self, x, filters, active=None):
        return direct_conv2d(x, filters, self.strides, self.padding, self.dilations, self.dy.shape[1:3], active)

    def terms(self):
        n, h, w, cin, cout, (kh, kw), *_ = self.case
        pixels = int(np.prod(self.dy.shape[:3]))
        return {"y": kh * kw * cin, "dx": kh * kw * cout, "dfilters": pixels, "raw dx": kh * kw * cout,
                "raw dfilters": pixels}

    def reach(self, readers):
        """Per input pixel [n, h, w]: how many (output pixel, tap) pairs with
        `readers` true at the output pixel read it."""
        n, h, w, cin, cout, (kh, kw), *_ = self.case
        ones = tf.ones((n, h, w, 1), tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(ones)
            y = self.direct(ones, tf.ones((kh, kw, 1, 1), tf.float64))
        return tape.gradient(y, ones, output_gradients=tf.constant(readers, tf.float64)[..., None]).numpy()[..., 0]


def direct_conv2d(x, filters, strides, padding, dilations, out_hw, active=None):
    """tf.nn.conv2d's convolution written out in TensorFlow ops: x padded with
    zeros, one matmul per tap of the window, summed. Gradients by the tape.

    The reference for non-finite values, because it means one thing: the
    padding zeros are multiplied like any other input (0 * Inf = NaN in y and,
    for NaN in dy, in dfilters), and dx sums only the (output pixel, tap)
    pairs that exist. TensorFlow's own float32 CPU convolution (oneDNN) leaves
    padded taps out of the sum while its float64 one (Eigen) multiplies them,
    and its CPU input gradient takes no dilations in float64; where they run,
    this agrees with tf.nn.conv2d in float64.

    `active` [batch, out_h, out_w]: the pixels of output tiles whose output
    mask is not zero throughout. The others are not computed and pass no
    gradient back (README): they read nothing, so NaN/Inf never reaches them
    nor, through their zero upstream gradient (0 * Inf), x or the filters.
    """
    n, h, w, _ = x.shape
    kh, kw = filters.shape[:2]
    out_h, out_w = out_hw
    if isinstance(padding, str):
        pads = []
        for size, k, out in ((h, kh, out_h), (w, kw, out_w)):
            total = max((out - 1) * strides + (k - 1) * dilations + 1 - size, 0) if padding == "SAME" else 0
            pads.append([total // 2, total - total // 2])
    else:
        pads = [list(padding[1]), list(padding[2])]
    padded = tf.pad(x, [[0, 0], pads[0], pads[1], [0, 0]])
    y = None
    for ty in range(kh):
        for tx in range(kw):
            patch = padded[:, ty * dilations:ty * dilations + (out_h - 1) * strides + 1:strides,
                           tx * dilations:tx * dilations + (out_w - 1) * strides + 1:strides, :]
            if active is not None:
                patch = tf.where(tf.constant(active)[..., None], patch, tf.zeros_like(patch))
            term = tf.einsum("bhwc,co->bhwo", patch, filters[ty, tx])
            y = term if y is None else y + term
    return y


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("output_mask", [False, True], ids=["no-output-mask", "output-mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_conv_masked_out_filters_never_leak(case, level, output_mask, dtype):
    conv = Conv(case, level, dtype, output_mask, seed=1)
    dead = conv.element == 0
    finite = np.where(dead, 100 * conv.rng.standard_normal(dead.shape), conv.filters).astype(dtype)
    got = conv.run(filters=with_poison_at(conv.rng, conv.filters, dead, "mixed"))
    clean = conv.run(filters=finite)
    for name in got:
        assert_bitwise_equal(got[name], clean[name], f"{name} with NaN/Inf in masked-out filter entries")
        assert np.isfinite(got[name]).all(), name
    assert np.all(got["dfilters"][dead] == 0) and np.all(got["raw dfilters"][dead] == 0)
    check_all([(clean[name], want, dtype, conv.terms()[name], name)
               for name, want in conv.reference(filters=finite).items()])


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("output_mask", [False, True], ids=["no-output-mask", "output-mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_conv_gradient_ops_never_read_what_they_do_not_depend_on(case, output_mask, dtype):
    """dx does not depend on x, nor dfilters on the filters (the raw ops take
    them for their shapes): all-NaN/Inf there changes nothing, bit for bit."""
    conv = Conv(case, "element", dtype, output_mask, seed=2)
    x, filters, dy = tf.constant(conv.x), tf.constant(conv.filters), tf.constant(conv.dy)
    bad_x = tf.constant(with_poison_at(conv.rng, conv.x, np.ones(conv.x.shape, bool), "mixed"))
    bad_filters = tf.constant(with_poison_at(conv.rng, conv.filters, np.ones(conv.filters.shape, bool), "mixed"))
    assert_bitwise_equal(conv.raw_grad_input(bad_x, filters, dy), conv.raw_grad_input(x, filters, dy),
                         "dx with x all NaN/Inf")
    assert_bitwise_equal(conv.raw_grad_filter(x, bad_filters, dy), conv.raw_grad_filter(x, filters, dy),
                         "dfilters with the filters all NaN/Inf")


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_conv_inputs_under_output_mask_off_tiles_never_leak(case, level, dtype):
    """x read only by output tiles whose mask is zero throughout (which are not
    computed and pass no gradient back), and dy at every pixel whose output
    mask is 0: y, dx and dfilters are bit for bit those of finite values there,
    and y is exactly 0 wherever the output mask is."""
    conv = Conv(case, level, dtype, output_mask=True, seed=3)
    x_off = conv.reach(conv.active_tiles) == 0
    dy_off = ~conv.live_pixels
    assert x_off.any() and dy_off.any()
    bad_x = with_poison_at(conv.rng, conv.x, np.broadcast_to(x_off[..., None], conv.x.shape), "mixed")
    bad_dy = with_poison_at(conv.rng, conv.dy, np.broadcast_to(dy_off[..., None], conv.dy.shape), "mixed")
    clean = conv.run()
    for what, got in (("x under off tiles", conv.run(x=bad_x)), ("dy where the output mask is 0", conv.run(dy=bad_dy)),
                      ("both", conv.run(x=bad_x, dy=bad_dy))):
        for name in got:
            assert_bitwise_equal(got[name], clean[name], f"{name} with NaN/Inf in {what}")
        assert np.all(got["y"][dy_off] == 0)


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_conv_forward_gives_zero_under_output_mask_zeros_in_active_tiles(case, dtype):
    """README: the output mask acts as where(o != 0, y * o, 0), so NaN/Inf from
    x under a zero of the output mask gives 0, the same whether or not its tile
    was computed: x read only by zero pixels (of active tiles too) leaves y
    bit for bit as it was."""
    conv = Conv(case, "block", dtype, output_mask=True, seed=4)
    # One live pixel: its tile is computed, and the rest of that tile is 0.
    conv.output_mask = np.zeros_like(conv.output_mask)
    conv.output_mask[0, 0, 0] = 2.5
    conv.active_tiles = np.zeros_like(conv.active_tiles)
    conv.active_tiles[0, :TILE[0], :TILE[1]] = True
    x_off = conv.reach(conv.live_pixels) == 0
    assert (x_off & (conv.reach(conv.active_tiles) > 0)).any(), "some such x must be read by an active tile"
    bad_x = with_poison_at(conv.rng, conv.x, np.broadcast_to(x_off[..., None], conv.x.shape), "mixed")
    assert_bitwise_equal(conv.op(bad_x, conv.filters, conv.output_mask).numpy(),
                         conv.op(conv.x, conv.filters, conv.output_mask).numpy(), "y with NaN/Inf under zero pixels")


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("output_mask", [False, True], ids=["no-output-mask", "output-mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("source", ["filters", "x", "dy"])
def test_conv_live_non_finite_propagates_as_in_the_reference(case, level, output_mask, dtype, source):
    """NaN, +Inf and -Inf in live filter entries, in x (channels of a block row
    live at every tap, pixels read by live output pixels only) or in dy (channels
    of a live block column, at live pixels): y, dx and dfilters (tape and raw
    ops) are non-finite exactly where the float64 TensorFlow reference is.
    Masked-out filter entries are NaN/Inf too. The output mask has no zeros
    inside active tiles: what an Inf filter tap makes of the zero upstream
    gradient of such a pixel (0 * Inf) is left open by the README."""
    conv = Conv(case, level, dtype, output_mask, seed=5, zeros_in_active_tiles=False)
    dead = conv.element == 0
    filters = with_poison_at(conv.rng, conv.filters, dead, "mixed")
    x, dy = conv.x, conv.dy
    if source == "filters":
        filters = with_poison_at(conv.rng, filters, pick(conv.rng, ~dead, 3), "mixed")
    elif source == "x":
        pixels = (conv.reach(~conv.live_pixels) == 0) & (conv.reach(conv.live_pixels) > 0)
        x = with_poison_at(conv.rng, x, pick(conv.rng, pixels[..., None] & conv.live_in_channels, 3), "mixed")
    else:
        dy = with_poison_at(conv.rng, dy, pick(conv.rng, conv.live_pixels[..., None] & conv.live_out_channels, 3),
                            "mixed")
    got = conv.run(x=x, filters=filters, dy=dy)
    want = conv.reference(x=x, filters=filters, dy=dy)
    assert any(not np.isfinite(v).all() for v in want.values()), "the case must produce NaN/Inf"
    terms = conv.terms()
    check_all([(got[name], want[name], dtype, terms[name], f"{name} ({source} poisoned)") for name in got])


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("poison_value", [np.inf, np.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_conv_dx_of_a_non_finite_filter_tap_sums_only_existing_terms(padding, poison_value, dtype):
    """The smallest case of the dx check above: x [1, 4, 4, 1], a 3x3 filter of
    ones with one live tap NaN or Inf, dy all ones. dx[p] sums dy[q] * w[t]
    over the output pixels q and taps t that read p; a tap that would read p
    from an output pixel outside dy is no term at all, so it must not turn
    dx[p] into NaN (as 0 * Inf or 0 * NaN would). tf.nn.conv2d's gradient, in
    float32 and float64, agrees."""
    tap = (0, 0) if np.isinf(poison_value) else (1, 1)
    filters = np.ones((3, 3, 1, 1), dtype)
    filters[tap] = poison_value
    x = np.ones((1, 4, 4, 1), dtype)
    dy = np.ones((1, 2, 2, 1) if padding == "VALID" else (1, 4, 4, 1), dtype)
    attrs = {"strides": [1, 1], "dilations": [1, 1], "padding": padding, "explicit_paddings": [],
             "in_channel_block": 1, "out_channel_block": 1, "tile_height": 8, "tile_width": 8,
             "use_output_mask": False}
    got = raw_ops.masked_ops_masked_conv2d_grad_input(x, filters, np.ones((1, 1), np.float32),
                                                      np.zeros((0,), np.float32), dy, **attrs).numpy()
    want = tf.raw_ops.Conv2DBackpropInput(input_sizes=[1, 4, 4, 1], filter=filters, out_backprop=dy,
                                          strides=[1, 1, 1, 1], padding=padding).numpy()
    check_all([(got, want, dtype, 9, f"dx with filters[{tap}] = {poison_value}, {padding}:\n{got[0, :, :, 0]}\n"
                                     f"reference:\n{want[0, :, :, 0]}\n")])


# --- mask_gradients (MaskGradient) ----------------------------------------------

# (gradient shape, block size): a matrix, a conv kernel (the block mask at every
# tap) and a vector, none a multiple of its blocks.
MASK_GRADIENT_CASES = [((45, 38), (16, 8)), ((3, 2, 17, 29), (8, 8)), ((37,), (1, 8))]


def gradient_mask(rng, shape, block, level):
    k, n = (1, shape[0]) if len(shape) == 1 else shape[-2:]
    grid = (math.ceil(k / block[0]), math.ceil(n / block[1]))
    live = rng.random(grid) < 0.5
    live.flat[0], live.flat[-1] = True, False
    block_mask = np.where(live, rng.choice([1.0, 2.5, -0.5], grid), 0.0).astype(np.float32)
    per_matrix = expand_block_mask_np(block_mask, (k, n), block)
    element = np.broadcast_to(per_matrix if len(shape) >= 2 else per_matrix[0], shape)
    if level == "element":
        keep = keep_one_per_block(rng.random(shape).reshape(-1, shape[-1]) < 0.75, *block).reshape(shape)
        element = element * keep
        return element.astype(np.float32), element
    return block_mask, element


def mask_gradient_cases():
    return [pytest.param(*case, id="x".join(map(str, case[0]))) for case in MASK_GRADIENT_CASES]


@pytest.mark.parametrize("shape,block", mask_gradient_cases())
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", list(POISONS))
def test_mask_gradients_masked_out_entries_never_leak_and_live_ones_propagate(shape, block, level, dtype, kind):
    rng = np.random.default_rng([len(shape), *block, LEVELS.index(level), np.dtype(dtype).itemsize,
                                 list(POISONS).index(kind)])
    mask, element = gradient_mask(rng, shape, block, level)
    dead = element == 0
    grad = rng.standard_normal(shape).astype(dtype)
    finite = np.where(dead, 100 * rng.standard_normal(shape), grad).astype(dtype)
    poisoned = with_poison_at(rng, grad, dead, kind)
    live_poisoned = with_poison_at(rng, poisoned, pick(rng, ~dead, 5), kind)

    def masked(g):
        return masked_ops.mask_gradients([tf.constant(g)], [mask], block_size=block)[0].numpy()

    # (a) Masked-out entries: exact zeros, bit for bit those of finite values.
    assert_bitwise_equal(masked(poisoned), masked(finite), f"{kind} in masked-out gradient entries")
    assert np.all(bits(masked(poisoned)[dead]) == 0)
    # The same where the gradient's buffer is handed over (inside a graph, a
    # temporary), where blocks of factor 1 are left as they are.
    # (g * one with `one` an argument: a temporary that constant folding cannot remove.)
    graph_fn = tf.function(lambda g, one: masked_ops.mask_gradients([g * one], [mask], block_size=block)[0])
    in_graph = lambda g: graph_fn(g, tf.constant(1, dtype))  # noqa: E731
    assert_bitwise_equal(in_graph(tf.constant(poisoned)).numpy(), masked(finite), f"{kind}, buffer reused")
    # (b) Live entries: as where(m != 0, g * m, 0).
    with np.errstate(invalid="ignore"):
        reference = np.where(element != 0, live_poisoned * element.astype(dtype), 0).astype(dtype)
    check_all([(masked(live_poisoned), reference, dtype, 1, "mask_gradients"),
               (in_graph(tf.constant(live_poisoned)).numpy(), reference, dtype, 1, "mask_gradients, buffer reused"),
               (raw_ops.masked_ops_mask_gradient(live_poisoned, mask, block_rows=block[0], block_cols=block[1]).numpy(),
                reference, dtype, 1, "raw MaskGradient")])

    # Its gradient (the same masking of the upstream gradient), through a tape.
    g = tf.constant(finite)
    with tf.GradientTape() as tape:
        tape.watch(g)
        out = masked_ops.mask_gradients([g], [mask], block_size=block)[0]
    upstream = tape.gradient(out, g, output_gradients=tf.constant(live_poisoned))
    check_all([(upstream.numpy(), reference, dtype, 1, "gradient of mask_gradients")])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_mask_gradients_of_indexed_slices(level, dtype):
    rng = np.random.default_rng([LEVELS.index(level), np.dtype(dtype).itemsize])
    mask, element = gradient_mask(rng, (45, 38), (16, 8), level)
    indices = np.array([3, 17, 44, 3, 20, 0])
    values = rng.standard_normal((len(indices), 38)).astype(dtype)
    rows = element[indices]
    finite = np.where(rows == 0, 100.0, values).astype(dtype)
    poisoned = with_poison_at(rng, values, rows == 0, "mixed")
    live_poisoned = with_poison_at(rng, poisoned, pick(rng, rows != 0, 4), "mixed")

    def masked(v):
        slices = tf.IndexedSlices(tf.constant(v), tf.constant(indices), tf.constant([45, 38]))
        return masked_ops.mask_gradients([slices], [mask], block_size=(16, 8))[0].values.numpy()

    assert_bitwise_equal(masked(poisoned), masked(finite), "IndexedSlices with NaN/Inf in masked-out entries")
    with np.errstate(invalid="ignore"):
        reference = np.where(rows != 0, live_poisoned * rows.astype(dtype), 0).astype(dtype)
    check_all([(masked(live_poisoned), reference, dtype, 1, "IndexedSlices")])


# --- MaskedUpdateVariable ----------------------------------------------------------

STATE_SHAPE, STATE_BLOCK = (2, 37, 29), (8, 16)


def state_mask(rng, level):
    """A trainable (non-zero) / frozen (zero) mask over STATE_SHAPE, and its
    element-level liveness."""
    mask, element = gradient_mask(rng, STATE_SHAPE, STATE_BLOCK, level)
    return mask, np.broadcast_to(element, STATE_SHAPE) != 0


def nan_payload(shape, dtype, rng):
    """Frozen-entry values: NaN with a distinctive payload, +Inf and -Inf."""
    out = np.full(shape, NAN_BITS[dtype]).view(dtype).copy()
    choice = rng.integers(0, 3, shape)
    out[choice == 1], out[choice == 2] = np.inf, -np.inf
    return out


@pytest.mark.parametrize("mode", ["assign", "add", "sub"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("api", ["masked_update", "raw"])
def test_masked_update_variable(mode, level, dtype, api):
    rng = np.random.default_rng([["assign", "add", "sub"].index(mode), LEVELS.index(level),
                                 np.dtype(dtype).itemsize, api == "raw"])
    mask, live = state_mask(rng, level)
    start = rng.standard_normal(STATE_SHAPE).astype(dtype)
    value = rng.standard_normal(STATE_SHAPE).astype(dtype)

    def update(start, value):
        variable = tf.Variable(start)
        if api == "raw":
            raw_ops.masked_ops_masked_update_variable(variable.handle, tf.constant(value), tf.constant(mask),
                                                      block_rows=STATE_BLOCK[0], block_cols=STATE_BLOCK[1], mode=mode)
        else:
            masked_update(variable, value, mask, block_size=STATE_BLOCK, mode=mode)
        return variable.numpy()

    # (a) Frozen entries keep their bits (NaN payloads too), whatever value holds there.
    frozen_start = np.where(live, start, nan_payload(STATE_SHAPE, dtype, rng))
    bad_value = with_poison_at(rng, value, ~live, "mixed")
    got = update(frozen_start, bad_value)
    assert_bitwise_equal(got[~live], frozen_start[~live], "frozen entries")
    assert_bitwise_equal(got[live], update(start, np.where(live, value, 7.0).astype(dtype))[live], "live entries")
    # (b) Live NaN/Inf in the variable and the value: as assign / add / sub.
    live_start = with_poison_at(rng, frozen_start, pick(rng, live, 6), "mixed")
    live_value = with_poison_at(rng, bad_value, pick(rng, live, 6), "mixed")
    got = update(live_start, live_value)
    with np.errstate(invalid="ignore"):
        updated = {"assign": live_value, "add": live_start + live_value, "sub": live_start - live_value}[mode]
    assert_bitwise_equal(got[~live], live_start[~live], "frozen entries")
    check_all([(got[live], updated[live], dtype, 1, f"masked {mode}")])


# --- fused optimizer steps: raw ops ---------------------------------------------

# name: (op, attributes, hyper-parameters).
STEPS = {
    "adam": ("adam", {"amsgrad": False}, {"weight_decay": 0.0}),
    "amsgrad-decay": ("adam", {"amsgrad": True}, {"weight_decay": 0.1}),
    "sgd": ("sgd", {"use_momentum": False, "nesterov": False}, {"momentum": 0.0, "weight_decay": 0.0}),
    "momentum": ("sgd", {"use_momentum": True, "nesterov": False}, {"momentum": 0.9, "weight_decay": 0.0}),
    "nesterov-decay": ("sgd", {"use_momentum": True, "nesterov": True}, {"momentum": 0.9, "weight_decay": 0.05}),
    "rmsprop": ("rmsprop", {"use_momentum": False, "centered": False}, {"momentum": 0.0, "weight_decay": 0.0}),
    "rmsprop-centered-momentum-decay": (
        "rmsprop", {"use_momentum": True, "centered": True}, {"momentum": 0.5, "weight_decay": 0.1}),
}
STATE_NAMES = {"adam": ["m", "v", "v_hat"], "sgd": ["momentum"], "rmsprop": ["velocity", "momentum", "average_grad"]}


def initial_state(rng, op, dtype):
    """Variable and optimizer state; second moments non-negative, v_hat >= v,
    and for centered RMSprop average_grad^2 < velocity."""
    var = rng.standard_normal(STATE_SHAPE)
    if op == "adam":
        v = rng.random(STATE_SHAPE)
        state = {"m": 0.1 * rng.standard_normal(STATE_SHAPE), "v": v, "v_hat": v + rng.random(STATE_SHAPE)}
    elif op == "sgd":
        state = {"momentum": 0.1 * rng.standard_normal(STATE_SHAPE)}
    else:
        velocity = 1 + rng.random(STATE_SHAPE)
        state = {"velocity": velocity, "momentum": 0.1 * rng.standard_normal(STATE_SHAPE),
                 "average_grad": 0.5 * rng.uniform(-1, 1, STATE_SHAPE)}
    return {"var": var.astype(dtype), **{k: v.astype(dtype) for k, v in state.items()}}


def raw_step(op, attrs, hyper, tensors, grad, mask, dtype, steps=2):
    """Runs `steps` fused steps on fresh variables holding `tensors`."""
    variables = {name: tf.Variable(value) for name, value in tensors.items()}
    c = lambda v: tf.constant(v, dtype)  # noqa: E731
    lr, decay = c(0.01), c(hyper["weight_decay"])
    block = {"block_rows": STATE_BLOCK[0], "block_cols": STATE_BLOCK[1]}
    for step in range(1, steps + 1):
        if op == "adam":
            alpha = 0.01 * math.sqrt(1 - 0.999**step) / (1 - 0.9**step)
            raw_ops.masked_ops_masked_adam_step(
                variables["var"].handle, variables["m"].handle, variables["v"].handle, variables["v_hat"].handle,
                grad, mask, c(alpha), c(0.1), c(0.001), c(1e-7), lr, decay, **attrs, **block)
        elif op == "sgd":
            raw_ops.masked_ops_masked_sgd_step(
                variables["var"].handle, variables["momentum"].handle, grad, mask, lr, c(hyper["momentum"]), decay,
                **attrs, **block)
        else:
            raw_ops.masked_ops_masked_rmsprop_step(
                variables["var"].handle, variables["velocity"].handle, variables["momentum"].handle,
                variables["average_grad"].handle, grad, mask, lr, c(0.9), c(0.1), c(hyper["momentum"]), c(1e-7),
                decay, **attrs, **block)
    return {name: variable.numpy() for name, variable in variables.items()}


def reference_step(op, attrs, hyper, tensors, grad, dtype, steps=2):
    """Keras 3's update_step arithmetic in TensorFlow ops, on every entry
    (decoupled weight decay first, as Keras applies it)."""
    t = {name: tf.constant(value) for name, value in tensors.items()}
    g = tf.constant(grad)
    c = lambda v: tf.constant(v, dtype)  # noqa: E731
    lr, decay = c(0.01), c(hyper["weight_decay"])
    for step in range(1, steps + 1):
        var = t["var"] - t["var"] * decay * lr if hyper["weight_decay"] else t["var"]
        if op == "adam":
            alpha = lr * tf.sqrt(1 - c(0.999) ** step) / (1 - c(0.9) ** step)
            t["m"] = t["m"] + (g - t["m"]) * c(0.1)
            t["v"] = t["v"] + (g * g - t["v"]) * c(0.001)
            if attrs["amsgrad"]:
                t["v_hat"] = tf.maximum(t["v_hat"], t["v"])
            denominator = tf.sqrt(t["v_hat"] if attrs["amsgrad"] else t["v"]) + c(1e-7)
            t["var"] = var - (t["m"] * alpha) / denominator
        elif op == "sgd":
            if attrs["use_momentum"]:
                t["momentum"] = t["momentum"] * c(hyper["momentum"]) - g * lr
                t["var"] = var + (t["momentum"] * c(hyper["momentum"]) - g * lr if attrs["nesterov"] else t["momentum"])
            else:
                t["var"] = var - g * lr
        else:
            t["velocity"] = c(0.9) * t["velocity"] + c(0.1) * tf.square(g)
            if attrs["centered"]:
                t["average_grad"] = c(0.9) * t["average_grad"] + c(0.1) * g
                denominator = t["velocity"] - tf.square(t["average_grad"]) + c(1e-7)
            else:
                denominator = t["velocity"] + c(1e-7)
            increment = lr * g / tf.sqrt(denominator)
            if attrs["use_momentum"]:
                t["momentum"] = c(hyper["momentum"]) * t["momentum"] + increment
                t["var"] = var - t["momentum"]
            else:
                t["var"] = var - increment
    return {name: value.numpy() for name, value in t.items()}


def used_state(op, attrs):
    names = ["var"] + STATE_NAMES[op]
    if op == "adam" and not attrs["amsgrad"]:
        names.remove("v_hat")
    if op in ("sgd", "rmsprop") and not attrs["use_momentum"]:
        names.remove("momentum")
    if op == "rmsprop" and not attrs["centered"]:
        names.remove("average_grad")
    return names


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_raw_optimizer_steps(name, level, dtype):
    op, attrs, hyper = STEPS[name]
    rng = np.random.default_rng([list(STEPS).index(name), LEVELS.index(level), np.dtype(dtype).itemsize])
    mask, live = state_mask(rng, level)
    mask = tf.constant(mask)
    clean = initial_state(rng, op, dtype)
    grad = rng.standard_normal(STATE_SHAPE).astype(dtype)
    names = used_state(op, attrs)

    # (a) NaN/Inf in frozen entries of the gradient, the variable and every
    # state tensor: frozen entries keep their bits, live ones move exactly as
    # with finite values there.
    frozen_bad = {k: np.where(live, v, nan_payload(STATE_SHAPE, dtype, rng)) for k, v in clean.items()}
    bad_grad = with_poison_at(rng, grad, ~live, "mixed")
    got = raw_step(op, attrs, hyper, frozen_bad, bad_grad, mask, dtype)
    finite = raw_step(op, attrs, hyper, clean, np.where(live, grad, 3.0).astype(dtype), mask, dtype)
    for k in got:
        assert_bitwise_equal(got[k][~live], frozen_bad[k][~live], f"frozen entries of {k}")
        assert_bitwise_equal(got[k][live], finite[k][live], f"live entries of {k} with NaN/Inf in frozen entries")
        assert np.isfinite(got[k][live]).all(), k
    reference = reference_step(op, attrs, hyper, clean, grad, dtype)
    check_all([(finite[k][live], reference[k][live], dtype, 4, f"{k} (finite)") for k in names])

    # (b) NaN/Inf in live entries of the gradient and of the variable and its
    # state: as the reference, entry by entry; frozen entries still untouched.
    live_bad = {k: with_poison_at(rng, v, pick(rng, live, 2), "mixed") for k, v in frozen_bad.items()}
    live_grad = with_poison_at(rng, bad_grad, pick(rng, live, 6), "mixed")
    got = raw_step(op, attrs, hyper, live_bad, live_grad, mask, dtype)
    reference = reference_step(op, attrs, hyper, live_bad, live_grad, dtype)
    for k in got:
        if k in names:
            assert_bitwise_equal(got[k][~live], live_bad[k][~live], f"frozen entries of {k}")
        else:  # state this configuration does not use: never written
            assert_bitwise_equal(got[k], live_bad[k], f"unused {k}")
    assert any(not np.isfinite(reference[k][live]).all() for k in names)
    check_all([(got[k][live], reference[k][live], dtype, 4, k) for k in names])


# --- fused optimizer steps: BlockFreeze ------------------------------------------

FREEZE_SHAPE, FREEZE_BLOCK = (45, 38), (16, 8)
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "rmsprop-centered": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    # No fused step: every write goes through MaskedUpdateVariable.
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
}


def block_freeze_run(name, start, grads, mask, dtype, freeze):
    variable = keras.Variable(start, dtype=np.dtype(dtype).name)
    optimizer = OPTIMIZERS[name]()
    if freeze:
        optimizer = BlockFreeze(optimizer, [(variable, mask)], block_size=FREEZE_BLOCK)
    for grad in grads:
        optimizer.apply([tf.constant(grad)], [variable])
    return variable.numpy()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_block_freeze(name, level, dtype):
    rng = np.random.default_rng([list(OPTIMIZERS).index(name), LEVELS.index(level), np.dtype(dtype).itemsize])
    mask, element = gradient_mask(rng, FREEZE_SHAPE, FREEZE_BLOCK, level)
    live = element != 0
    start = rng.standard_normal(FREEZE_SHAPE).astype(dtype)
    grads = [rng.standard_normal(FREEZE_SHAPE).astype(dtype) for _ in range(3)]

    # (a) NaN/Inf in frozen entries of the weights and of every gradient.
    frozen_bad = np.where(live, start, nan_payload(FREEZE_SHAPE, dtype, rng))
    bad_grads = [with_poison_at(rng, g, ~live, "mixed") for g in grads]
    got = block_freeze_run(name, frozen_bad, bad_grads, mask, dtype, freeze=True)
    finite = block_freeze_run(name, start, [np.where(live, g, 1.0).astype(dtype) for g in grads], mask, dtype,
                              freeze=True)
    assert_bitwise_equal(got[~live], frozen_bad[~live], "frozen weights")
    assert_bitwise_equal(got[live], finite[live], "trainable weights with NaN/Inf in frozen entries")
    assert np.isfinite(got[live]).all()

    # (b) NaN/Inf in trainable entries: as the wrapped optimizer on its own.
    live_start = with_poison_at(rng, frozen_bad, pick(rng, live, 2), "mixed")
    live_grads = [with_poison_at(rng, g, pick(rng, live, 4), "mixed") for g in bad_grads]
    got = block_freeze_run(name, live_start, live_grads, mask, dtype, freeze=True)
    reference = block_freeze_run(name, live_start, live_grads, mask, dtype, freeze=False)
    assert_bitwise_equal(got[~live], live_start[~live], "frozen weights")
    assert not np.isfinite(reference[live]).all()
    check_all([(got[live], reference[live], dtype, 8, f"BlockFreeze({name})")])


@pytest.mark.parametrize("level", LEVELS)
def test_amsgrad_after_an_overflowing_gradient_matches_keras(level):
    """A float32 gradient whose square overflows makes v = +Inf; the next step's
    v = Inf + (g^2 - Inf) * (1 - beta_2) is NaN, and Keras's AMSGrad
    (v_hat = maximum(v_hat, v), which propagates NaN) turns the weight NaN.
    The fused step must do the same, not keep v_hat = Inf and the weight as it
    was."""
    rng = np.random.default_rng(LEVELS.index(level))
    mask, element = gradient_mask(rng, FREEZE_SHAPE, FREEZE_BLOCK, level)
    live = element != 0
    start = rng.standard_normal(FREEZE_SHAPE).astype(np.float32)
    first = rng.standard_normal(FREEZE_SHAPE).astype(np.float32)
    first[pick(rng, live, 3)] = 1e20  # squared: +Inf in float32
    second = rng.standard_normal(FREEZE_SHAPE).astype(np.float32)
    got = block_freeze_run("amsgrad", start, [first, second], mask, np.float32, freeze=True)
    reference = block_freeze_run("amsgrad", start, [first, second], mask, np.float32, freeze=False)
    assert np.isnan(reference[live]).sum() == 3
    assert_bitwise_equal(got[~live], start[~live], "frozen weights")
    check_all([(got[live], reference[live], np.float32, 8, "BlockFreeze(Adam(amsgrad=True))")])
