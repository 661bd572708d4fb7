"""Float64 NumPy references for the fuzzer's accepted calls.

When a raw op answers with a result, the inputs must have been valid: these
functions recompute what the result should be from the inputs alone, in
float64, and compare within a bound on the rounding of the op's dtype. An input
the reference cannot make sense of (a mask of neither level, a wrong dy) means
the op accepted something it should have refused.
"""

import numpy as np

PURE_OPS = {
    "MaskedMatmul", "MaskedMatmulGradInput", "MaskedMatmulGradWeight",
    "MaskedConv2D", "MaskedConv2DGradInput", "MaskedConv2DGradFilter", "MaskGradient",
}


class Refused(Exception):
    """The reference finds the inputs invalid."""


def ceil_div(a, b):
    return -(-a // b)


def conv_output_size(size, filter_size, stride, dilation, padding, pad_before, pad_after):
    """tf.nn.conv2d's output size along one dimension, or None when empty."""
    reach = (filter_size - 1) * dilation + 1
    if padding == "SAME":
        return ceil_div(size, stride)
    span = size + pad_before + pad_after if padding == "EXPLICIT" else size
    return (span - reach) // stride + 1 if span >= reach else None


def _factors(mask):
    return np.asarray(mask).astype(np.float64)


def _live(mask):
    return np.asarray(mask) != 0


def _expand(block, rows, cols, k, n):
    # A block larger than the matrix covers all of it.
    rows, cols = min(rows, max(k, 1)), min(cols, max(n, 1))
    return np.repeat(np.repeat(block, rows, axis=0), cols, axis=1)[:k, :n]


def _weight_mask(mask, k, n, rows, cols):
    """(factors, live) at element level of a [k, n] weight, as the ops resolve the level."""
    if mask.shape == (k, n):
        return _factors(mask), _live(mask)
    if mask.ndim == 2 and mask.shape == (ceil_div(k, rows), ceil_div(n, cols)):
        return _expand(_factors(mask), rows, cols, k, n), _expand(_live(mask), rows, cols, k, n)
    raise Refused(f"mask of shape {mask.shape} for a [{k}, {n}] weight with {rows}x{cols} blocks")


def _masked(values, factors, live):
    return np.where(live, values * np.where(live, factors, 0), 0.0)


def _matmul(op, a, b, mask, attrs):
    rows, cols = attrs["block_rows"], attrs["block_cols"]
    if op == "MaskedMatmul":
        x, w = a, b
        if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
            raise Refused("x / w")
        w_eff = _masked(w, *_weight_mask(mask, *w.shape, rows, cols))
        w_abs = np.abs(w_eff)
        return x @ w_eff, np.abs(x) @ w_abs, w.shape[0]
    if op == "MaskedMatmulGradInput":
        dy, w = a, b
        if dy.ndim < 1 or w.ndim != 2 or dy.shape[-1] != w.shape[1]:
            raise Refused("dy / w")
        w_eff = _masked(w, *_weight_mask(mask, *w.shape, rows, cols))
        return dy @ w_eff.T, np.abs(dy) @ np.abs(w_eff).T, w.shape[1]
    x, dy = a, b
    if x.ndim < 1 or x.shape[:-1] != dy.shape[:-1]:
        raise Refused("x / dy")
    k, n = x.shape[-1], dy.shape[-1]
    factors, live = _weight_mask(mask, k, n, rows, cols)
    rows_total = int(np.prod(x.shape[:-1]))
    x2, dy2 = x.reshape(rows_total, k), dy.reshape(rows_total, n)
    return _masked(x2.T @ dy2, factors, live), np.abs(x2).T @ np.abs(dy2) * np.abs(np.where(live, factors, 0)), len(x2)


def _conv_geometry(x_shape, f_shape, attrs):
    strides, dilations, padding = attrs["strides"], attrs["dilations"], attrs["padding"]
    pads = attrs["explicit_paddings"]
    if len(strides) != 2 or len(dilations) != 2 or min(strides + dilations) < 1:
        raise Refused("strides / dilations")
    if padding not in ("SAME", "VALID", "EXPLICIT"):
        raise Refused("padding")
    if (len(pads) != 4 or min(pads) < 0) if padding == "EXPLICIT" else pads:
        raise Refused("explicit_paddings")
    if len(x_shape) != 4 or len(f_shape) != 4 or x_shape[3] != f_shape[2] or min(f_shape[:2]) < 1:
        raise Refused("x / filters")
    out, before = [], []
    for d in range(2):
        pad_before, pad_after = pads[2 * d:2 * d + 2] if padding == "EXPLICIT" else (0, 0)
        size = x_shape[1 + d]
        length = conv_output_size(size, f_shape[d], strides[d], dilations[d], padding, pad_before, pad_after)
        if length is None:
            raise Refused("empty output")
        if padding == "SAME":
            reach = (f_shape[d] - 1) * dilations[d] + 1
            pad_before = max(0, (length - 1) * strides[d] + reach - size) // 2
        out.append(length)
        before.append(pad_before)
    return out, before


def _conv_masks(mask, output_mask, x_shape, f_shape, out, attrs):
    kh, kw, cin, cout = f_shape
    if mask.shape == tuple(f_shape):
        factors, live = _factors(mask), _live(mask)
    elif mask.ndim == 2 and mask.shape == (ceil_div(cin, attrs["in_channel_block"]),
                                           ceil_div(cout, attrs["out_channel_block"])):
        rows, cols = attrs["in_channel_block"], attrs["out_channel_block"]
        factors = np.broadcast_to(_expand(_factors(mask), rows, cols, cin, cout), f_shape)
        live = np.broadcast_to(_expand(_live(mask), rows, cols, cin, cout), f_shape)
    else:
        raise Refused("mask")
    if not attrs["use_output_mask"]:
        if output_mask.size:
            raise Refused("output_mask without use_output_mask")
        return factors, live, None
    if output_mask.shape not in ((x_shape[0], *out), (x_shape[0], *out, 1)):
        raise Refused("output_mask")
    output_mask = output_mask.reshape(x_shape[0], *out, 1)
    return factors, live, (_factors(output_mask), _live(output_mask))


def _taps(x_shape, f_shape, out, before, attrs):
    """For each filter tap, the slices of the padded input it reads, and the padded input's shape."""
    sh, sw = attrs["strides"]
    dh, dw = attrs["dilations"]
    height = max(x_shape[1] + before[0], (out[0] - 1) * sh + (f_shape[0] - 1) * dh + 1)
    width = max(x_shape[2] + before[1], (out[1] - 1) * sw + (f_shape[1] - 1) * dw + 1)
    taps = []
    for i in range(f_shape[0]):
        for j in range(f_shape[1]):
            rows = slice(i * dh, i * dh + (out[0] - 1) * sh + 1, sh)
            cols = slice(j * dw, j * dw + (out[1] - 1) * sw + 1, sw)
            taps.append((i, j, rows, cols))
    return taps, (x_shape[0], height, width, x_shape[3])


def _conv(op, x, filters, mask, output_mask, dy, attrs):
    out, before = _conv_geometry(x.shape, filters.shape, attrs)
    factors, live, output_factors = _conv_masks(mask, output_mask, x.shape, filters.shape, out, attrs)
    f_eff = _masked(filters, factors, live)
    taps, padded_shape = _taps(x.shape, filters.shape, out, before, attrs)
    inside = (slice(None), slice(before[0], before[0] + x.shape[1]), slice(before[1], before[1] + x.shape[2]))

    def gate(values, magnitudes=False):
        if output_factors is None:
            return values
        factors, live = output_factors
        return _masked(values, np.abs(factors) if magnitudes else factors, live)

    if op == "MaskedConv2D":
        results = []
        for source, weights in ((x, f_eff), (np.abs(x), np.abs(f_eff))):
            padded = np.zeros(padded_shape)
            padded[inside] = source
            y = np.zeros((x.shape[0], *out, filters.shape[3]))
            for i, j, rows, cols in taps:
                y += padded[:, rows, cols, :] @ weights[i, j]
            results.append(gate(y, magnitudes=source is not x))
        return results[0], results[1], filters.shape[0] * filters.shape[1] * filters.shape[2]
    if dy.shape != (x.shape[0], *out, filters.shape[3]):
        raise Refused("dy")
    dy_eff, dy_bound = gate(dy), gate(np.abs(dy), magnitudes=True)
    if op == "MaskedConv2DGradInput":
        results = []
        for upstream, weights in ((dy_eff, f_eff), (dy_bound, np.abs(f_eff))):
            padded = np.zeros(padded_shape)
            for i, j, rows, cols in taps:
                padded[:, rows, cols, :] += upstream @ weights[i, j].T
            results.append(padded[inside])
        return results[0], results[1], filters.shape[3] * filters.shape[0] * filters.shape[1]
    results = []
    for source, upstream in ((x, dy_eff), (np.abs(x), dy_bound)):
        padded = np.zeros(padded_shape)
        padded[inside] = source
        grad = np.zeros(filters.shape)
        for i, j, rows, cols in taps:
            pixels = x.shape[0] * out[0] * out[1]
            grad[i, j] = padded[:, rows, cols, :].reshape(pixels, x.shape[3]).T @ upstream.reshape(pixels, filters.shape[3])
        results.append(_masked(grad, factors, live) if source is x else grad * np.abs(np.where(live, factors, 0)))
    return results[0], results[1], x.shape[0] * out[0] * out[1]


def stacked_mask(mask, shape, rows, cols):
    """(factors, live) of a mask over a tensor of `shape` viewed as stacked
    [k, n] matrices ([1, n] for rank 1), broadcastable to `shape`."""
    mask = np.asarray(mask)
    if mask.shape == tuple(shape):
        return _factors(mask), _live(mask)
    k, n = (shape[-2] if len(shape) >= 2 else 1), shape[-1]
    if mask.ndim != 2 or mask.shape != (ceil_div(k, rows), ceil_div(n, cols)):
        raise Refused("mask")
    matrix = tuple(shape[-2:]) if len(shape) >= 2 else (n,)
    return (_expand(_factors(mask), rows, cols, k, n).reshape(matrix),
            _expand(_live(mask), rows, cols, k, n).reshape(matrix))


def _mask_gradient(grad, mask, attrs):
    if grad.ndim < 1:
        raise Refused("grad rank")
    factors, live = stacked_mask(mask, grad.shape, attrs["block_rows"], attrs["block_cols"])
    expected = _masked(grad, factors, live)
    return expected, np.abs(expected), 1


def _as_float64(tf, tensor):
    if tensor.dtype in (tf.bfloat16, tf.float16, tf.float32, tf.float64):
        return tf.cast(tensor, tf.float64).numpy()
    return tensor.numpy()


def check_result(tf, case, built, result):
    """'ok-checked' when the result equals the reference, 'ok' for ops with
    no reference here, else a 'finding: ...'."""
    op = case["op"]
    if op not in PURE_OPS:
        return "ok"
    if any(tensor.shape.num_elements() == 0 and np.prod([d for d in tensor.shape if d], dtype=float) > 2**16
           for tensor in [result, *built.values()]):
        # NumPy cannot hold an empty array with dimensions this large, and the
        # reference would loop over them.
        return "ok-empty"
    inputs = {name: _as_float64(tf, tensor) for name, tensor in built.items()}
    t = next(iter(built.values())).dtype  # x, dy or grad: of type T
    if result.dtype != t:
        return f"finding: result dtype {result.dtype.name}, inputs {t.name}"
    try:
        if op in ("MaskedMatmul", "MaskedMatmulGradInput", "MaskedMatmulGradWeight"):
            first, second = [inputs[name] for name in built if name != "mask"]
            expected, bound, depth = _matmul(op, first, second, inputs["mask"], case["attrs"])
        elif op == "MaskGradient":
            expected, bound, depth = _mask_gradient(inputs["grad"], inputs["mask"], case["attrs"])
        else:
            expected, bound, depth = _conv(op, inputs["x"], inputs["filters"], inputs["mask"],
                                           inputs["output_mask"], inputs.get("dy"), case["attrs"])
    except Refused as refused:
        return f"finding: accepted an invalid input ({refused})"
    except MemoryError:
        return "ok-too-large"  # a padded input NumPy cannot hold (explicit paddings near 2^31)
    actual = _as_float64(tf, result)
    if actual.shape != expected.shape:
        return f"finding: result shape {actual.shape}, reference {expected.shape}"
    # A mask factor beyond T's range is Inf in the op (tf.cast(mask, T)) but
    # finite in this float64 reference.
    factors_fit = all(np.abs(inputs[name].astype(np.float64)).max(initial=0) <= float(t.max)
                      for name in ("mask", "output_mask") if name in inputs)
    finite_inputs = factors_fit and all(
        np.isfinite(value).all() for name, value in inputs.items() if value.dtype == np.float64)
    if not finite_inputs or not np.isfinite(bound).all():
        return "ok-nonfinite"
    if bound.size and bound.max() > float(t.max) / 4:
        return "ok-overflow-range"  # where the order of the sum decides between a value and Inf - Inf
    eps = {tf.float64: 2.0**-52, tf.float32: 2.0**-23, tf.float16: 2.0**-10, tf.bfloat16: 2.0**-7}[t]
    # A result rounded into T's subnormals is off by up to half its smallest step.
    subnormal_step = {tf.float64: 2.0**-1074, tf.float32: 2.0**-149, tf.float16: 2.0**-24, tf.bfloat16: 2.0**-133}[t]
    limit = eps * (depth + 4) * bound + subnormal_step + 1e-300
    if not (np.abs(actual - expected) <= limit).all():
        worst = np.unravel_index(np.argmax(np.abs(actual - expected) - limit), actual.shape)
        return f"finding: result differs at {worst}: {actual[worst]} vs reference {expected[worst]}"
    return "ok-checked"
