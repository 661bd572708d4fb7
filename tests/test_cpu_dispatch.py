"""Runtime CPU dispatch: every backend this CPU runs computes the same op, and
results do not depend on the thread count."""

import os
import subprocess
import sys
import textwrap

import pytest

import masked_ops

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("generic", "avx2", "avx512")


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_backends():
    flags = cpu_flags()
    supported = ["generic"]
    if {"avx2", "fma"} <= flags:
        supported.append("avx2")
    if {"avx512f", "avx512vl", "fma"} <= flags:
        supported.append("avx512")
    return supported


def run(args, env_update, cwd=TESTS_DIR):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_update)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.skipif(not cpu_flags(), reason="needs /proc/cpuinfo to know what the CPU supports")
def test_default_backend_is_the_best_the_cpu_supports():
    if "MASKED_OPS_CPU_ISA" in os.environ:
        pytest.skip("MASKED_OPS_CPU_ISA is set for this run")
    assert masked_ops.cpu_backend() == supported_backends()[-1]


def test_requested_backend_is_used():
    requested = os.environ.get("MASKED_OPS_CPU_ISA")
    if requested not in supported_backends():
        pytest.skip("runs where MASKED_OPS_CPU_ISA names a backend this CPU supports")
    assert masked_ops.cpu_backend() == requested


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_passes_the_matmul_suite(backend):
    """The whole masked_matmul suite, again, with the kernels forced onto `backend`."""
    if backend not in supported_backends():
        pytest.skip(f"this CPU cannot run the {backend} kernels")
    result = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "test_masked_matmul.py", "test_masked_conv2d.py",
         "test_cpu_dispatch.py::test_requested_backend_is_used"],
        {"MASKED_OPS_CPU_ISA": backend},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_unknown_backend_request_falls_back_with_a_warning():
    result = run(
        [sys.executable, "-c", "import masked_ops; print(masked_ops.cpu_backend())"],
        {"MASKED_OPS_CPU_ISA": "sse9"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == supported_backends()[-1]
    assert "ignoring MASKED_OPS_CPU_ISA=sse9" in result.stderr


DIGEST_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np, tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
    import masked_ops
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((100, 300), np.float32))
    w = tf.constant(rng.standard_normal((300, 200), np.float32))
    mask = tf.constant((rng.random((300, 200)) < 0.3).astype(np.float32) * 1.5)
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = masked_ops.masked_matmul(x, w, mask, block_size=(16, 32))
        loss = tf.reduce_sum(tf.sin(y))
    dx, dw = tape.gradient(loss, [x, w])
    digest = hashlib.sha256()
    for t in (y, dx, dw):
        digest.update(t.numpy().tobytes())
    # Convolutions big enough for several dfilter units, stride 1 without an
    # output mask (rows read in place) and stride 2 with one (gathered).
    x = tf.constant(rng.standard_normal((2, 30, 26, 32), np.float32))
    filters = tf.constant(rng.standard_normal((3, 3, 32, 48), np.float32))
    block_mask = tf.constant((rng.random((2, 3)) < 0.7).astype(np.float32))
    for strides, output_mask in ((1, None), (2, (rng.random((2, 15, 13)) < 0.5).astype(np.float32))):
        with tf.GradientTape() as tape:
            tape.watch([x, filters])
            y = masked_ops.masked_conv2d(x, filters, block_mask, strides=strides, padding="SAME",
                                         output_mask=output_mask, channel_block=16, tile=4)
            loss = tf.reduce_sum(tf.sin(y))
        for t in (y, *tape.gradient(loss, [x, filters])):
            digest.update(t.numpy().tobytes())
    print(digest.hexdigest())
    """
)


def test_results_are_bitwise_identical_for_any_thread_count():
    digests = {}
    for threads in (1, 2, 3, 5):
        result = run([sys.executable, "-c", DIGEST_SCRIPT, str(threads)], {})
        assert result.returncode == 0, result.stderr[-3000:]
        digests[threads] = result.stdout.split()[-1]
    assert len(set(digests.values())) == 1, digests


def test_wide_simd_instructions_only_in_the_avx_backends():
    """Code outside the AVX2/AVX-512 backends must run on any x86-64: a wheel
    built here cannot be allowed to raise SIGILL on an older CPU."""
    if not {"avx2"} <= cpu_flags():
        pytest.skip("an x86-64 build is what this checks")
    library = os.path.join(os.path.dirname(masked_ops.__file__), "_masked_ops.so")
    try:
        disassembly = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", "-C", library],
            capture_output=True, text=True, check=True,
        ).stdout
    except FileNotFoundError:
        pytest.skip("objdump is not installed")
    function = None
    offenders = set()
    wide_in_backends = 0
    for line in disassembly.splitlines():
        if line.endswith(">:"):
            function = line
        elif "%ymm" in line or "%zmm" in line:
            if "::avx2::" in function or "::avx512::" in function:
                wide_in_backends += 1
            else:
                offenders.add(function)
    assert wide_in_backends > 0, "no AVX code found at all: is the library stripped?"
    assert not offenders, sorted(offenders)[:5]
