"""Memory: no growth over many calls, and outputs too large to allocate are
refused with an error instead of killing the process.

Both run in subprocesses: the first so that what other tests allocate does
not move the resident set it measures, the second under an address-space
limit that must not apply to the test process.
"""

import json
import os
import subprocess
import sys
import textwrap


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CALLS = 10_000
WARM_UP = 500
# Per op, over CALLS calls. The smallest output below is 4 KiB (the conv's y),
# so leaking one output per call would grow the resident set by 40 MiB, and a
# leak of 420 bytes per call already exceeds this; measured growth here is 0.
BOUND_MIB = 4.0


def run_script(script, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=TESTS_DIR, env=env,
                          capture_output=True, text=True, timeout=timeout)


RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys, time
    import numpy as np, tensorflow as tf
    import masked_ops
    from masked_ops.ops import _ops as raw_ops
    from masked_ops.optimizers import masked_update

    calls, warm_up = int(sys.argv[1]), int(sys.argv[2])
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    rng = np.random.default_rng(0)
    f32 = lambda *shape: tf.constant(rng.standard_normal(shape).astype(np.float32))
    c = lambda v: tf.constant(v, tf.float32)

    # masked_matmul: y [32, 50] (6.4 KiB); an element mask over ragged blocks,
    # so the live weights and x are packed into scratch buffers every call.
    x, w = f32(32, 70), f32(70, 50)
    element_mask = tf.constant((rng.random((70, 50)) < 0.6).astype(np.float32))
    block_mask = tf.constant(np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 1]],
                                      np.float32))

    def matmul_gradient():
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = masked_ops.masked_matmul(x, w, block_mask, block_size=16)
        return tape.gradient(y, [x, w])

    matmul_function = tf.function(lambda x, w: masked_ops.masked_matmul(x, w, element_mask, block_size=16))

    # masked_conv2d: y [1, 8, 8, 16] (4 KiB), stride 1 (rows read in place
    # from a zero-bordered copy) and stride 2 with an output mask (gathered).
    cx, filters = f32(1, 8, 8, 16), f32(3, 3, 16, 16)
    conv_mask = tf.constant(np.array([[1, 0], [1, 1]], np.float32))
    gx = f32(2, 15, 15, 16)
    output_mask = tf.constant((rng.random((2, 8, 8)) < 0.5).astype(np.float32))

    def conv_gradient():
        with tf.GradientTape() as tape:
            tape.watch([cx, filters])
            y = masked_ops.masked_conv2d(cx, filters, conv_mask, padding="SAME", channel_block=8)
        return tape.gradient(y, [cx, filters])

    # mask_gradients, masked_update and the fused steps on [64, 48].
    g = f32(64, 48)
    state_mask = tf.constant(np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], np.float32))
    variables = [tf.Variable(rng.random((64, 48)).astype(np.float32)) for _ in range(4)]
    handles = [v.handle for v in variables]
    block = dict(block_rows=16, block_cols=16)
    leaked = []

    ops = {
        "masked_matmul forward": lambda: masked_ops.masked_matmul(x, w, element_mask, block_size=16),
        "masked_matmul forward, tf.function": lambda: matmul_function(x, w),
        "masked_matmul gradient (tape)": matmul_gradient,
        "masked_conv2d forward": lambda: masked_ops.masked_conv2d(cx, filters, conv_mask, padding="SAME",
                                                                  channel_block=8),
        "masked_conv2d forward, stride 2, output mask": lambda: masked_ops.masked_conv2d(
            gx, filters, conv_mask, strides=2, padding="SAME", output_mask=output_mask, channel_block=8, tile=4),
        "masked_conv2d gradient (tape)": conv_gradient,
        "mask_gradients": lambda: masked_ops.mask_gradients([g], [state_mask], block_size=16),
        "masked_update": lambda: masked_update(variables[0], g, state_mask, block_size=16, mode="add"),
        "MaskedAdamStep": lambda: raw_ops.masked_ops_masked_adam_step(
            *handles, g, state_mask, c(1e-3), c(0.1), c(0.001), c(1e-7), c(1e-3), c(0.0), amsgrad=True, **block),
        "MaskedSgdStep": lambda: raw_ops.masked_ops_masked_sgd_step(
            handles[0], handles[1], g, state_mask, c(1e-3), c(0.9), c(0.01), use_momentum=True, nesterov=True,
            **block),
        "MaskedRmspropStep": lambda: raw_ops.masked_ops_masked_rmsprop_step(
            *handles, g, state_mask, c(1e-3), c(0.9), c(0.1), c(0.5), c(1e-7), c(0.0), use_momentum=True,
            centered=True, **block),
        # The control: a real leak of 4 KiB per call, which the measurement must see.
        "control: leaks 4 KiB per call": lambda: leaked.append(np.ones(1024, np.float32)),
    }
    report = {}
    for name, op in ops.items():
        for _ in range(warm_up):
            op()
        gc.collect()
        before, start = rss(), time.perf_counter()
        for _ in range(calls):
            op()
        seconds = time.perf_counter() - start
        gc.collect()
        report[name] = {"growth": rss() - before, "seconds": seconds}
    print(json.dumps(report))
    """
)


def test_resident_memory_stays_flat_over_many_calls():
    result = run_script(RSS_SCRIPT, CALLS, WARM_UP)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    summary = ", ".join(f"{name}: {r['growth'] / 2**20:+.2f} MiB in {r['seconds']:.1f} s"
                        for name, r in report.items())
    control = report.pop("control: leaks 4 KiB per call")
    assert control["growth"] > BOUND_MIB * 2**20, f"the measurement misses a real leak: {summary}"
    grew = {name: r["growth"] / 2**20 for name, r in report.items() if r["growth"] > BOUND_MIB * 2**20}
    assert not grew, f"resident memory grew by more than {BOUND_MIB} MiB over {CALLS} calls: {grew}; {summary}"


HUGE_OUTPUT_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import tensorflow as tf
    import masked_ops
    from masked_ops.ops import _ops as raw_ops

    limit = 16 << 30
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    big = 2**17
    one = dict(block_rows=big, block_cols=big)
    cases = {
        # x [2^17, 1] @ w [1, 2^17]: y [2^17, 2^17], 64 GiB of float32.
        "matmul y": lambda: masked_ops.masked_matmul(tf.zeros([big, 1]), tf.zeros([1, big]), tf.ones([1, 1]),
                                                     block_size=(1, big)),
        # dw = x^T dy with x [1, 2^17], dy [1, 2^17]: [2^17, 2^17].
        "matmul dw": lambda: raw_ops.masked_ops_masked_matmul_grad_weight(
            tf.zeros([1, big]), tf.zeros([1, big]), tf.ones([1, 1]), **one),
        # dx = dy w^T with dy [2^17, 1], w [2^17, 1]: [2^17, 2^17].
        "matmul dx": lambda: raw_ops.masked_ops_masked_matmul_grad_input(
            tf.zeros([big, 1]), tf.zeros([big, 1]), tf.ones([1, 1]), **one),
        # x [1, 1, 1, 1] padded by 2^16 on every side: y [1, 2^17 + 1, 2^17 + 1, 1].
        "conv y": lambda: masked_ops.masked_conv2d(
            tf.zeros([1, 1, 1, 1]), tf.zeros([1, 1, 1, 1]), tf.ones([1, 1]),
            padding=[[0, 0], [2**16, 2**16], [2**16, 2**16], [0, 0]]),
        # Stride 2 (the gathered path; an output mask of that size could not
        # exist) in float64: y [1, 2^17 + 1, 2^17 + 1, 1], 128 GiB.
        "conv y stride 2 float64": lambda: masked_ops.masked_conv2d(
            tf.zeros([1, 1, 1, 1], tf.float64), tf.zeros([1, 1, 1, 1], tf.float64), tf.ones([1, 1]), strides=2,
            padding=[[0, 0], [2**17, 2**17], [2**17, 2**17], [0, 0]]),
    }
    for name, case in cases.items():
        print("START", name, flush=True)
        try:
            result = case()
            print("RESULT", name, "| no error, shape", result.shape, flush=True)
        except (tf.errors.ResourceExhaustedError, tf.errors.InvalidArgumentError) as err:
            print("RESULT", name, "|", type(err).__name__, str(err).splitlines()[0][:300], flush=True)
    """
)
HUGE_CASES = ["matmul y", "matmul dw", "matmul dx", "conv y", "conv y stride 2 float64"]


def test_an_output_too_large_to_allocate_is_an_error_not_an_abort():
    """Every case in one process, so that an abort names the case it died in.

    oneDNN's CPU allocator (TensorFlow's default here) waits 10 seconds for
    memory to be freed before it reports an allocation as failed; with
    TF_ENABLE_ONEDNN_OPTS=0 the plain CPU allocator fails at once. The op sees
    the same failed allocation either way.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    result = subprocess.run([sys.executable, "-c", HUGE_OUTPUT_SCRIPT], cwd=TESTS_DIR, env=env,
                            capture_output=True, text=True, timeout=300)
    started = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("START ")]
    assert result.returncode == 0, (
        f"exit status {result.returncode} in case {started[-1] if started else None!r}: {result.stderr[-3000:]}")
    outcomes = dict(line[len("RESULT "):].split(" | ", 1) for line in result.stdout.splitlines()
                    if line.startswith("RESULT "))
    assert sorted(outcomes) == sorted(HUGE_CASES), result.stdout
    refused = {name: outcome.split()[0] in ("ResourceExhaustedError", "InvalidArgumentError")
               for name, outcome in outcomes.items()}
    assert all(refused.values()), outcomes
