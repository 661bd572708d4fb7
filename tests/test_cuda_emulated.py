"""The CUDA kernels of cc/kernels/cuda, run on the CPU under the CUDA emulation
of tests/cuda_emulation, against float64 NumPy references.

The kernels (*_kernels.cuh) and their launch sequences (*_launch.cuh: grid
sizes, which kernels in which order, when the tensor-core kernels are taken)
are the GPU build's own; the emulation compiles them with g++ and runs every
CUDA thread of a block as a fiber (see tests/cuda_emulation/include/
cuda_emulation.h). So these tests check the kernels' indexing, masking,
skipping of dead blocks and tensor-core tiling everywhere g++ runs; what they
cannot check is the hardware (timing, real WMMA layouts, memory model): the
GPU tests of tests/gpu do that where there is a GPU.

Every call runs on copies of its arrays between red zones; a write out of
bounds, a write to an input, a barrier some threads skip, a misaligned WMMA
access or a trap fails the test (the emulation's diagnostics). Outputs start
as NaN, so that an element the kernels never write shows, and masked-out
weights are NaN, so that a masked weight that leaks shows.
"""

import ctypes
import math
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from fuzz_references import _conv, _matmul
from tensor_copy_model import PROBE_CASES, describe_misplacement, landed_box, probe_array

try:
    import ml_dtypes
except ImportError:  # bfloat16 cases are skipped
    ml_dtypes = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
SOURCES = ["emulator.cc", "emulator_matmul.cc", "emulator_conv2d.cc", "emulator_elementwise.cc",
           "emulator_selftest.cc"]

DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
MASK_CODES = {"float32": 0, "bool": 1}
PRODUCTS = {"forward": 0, "grad_input": 1, "grad_weight": 2}
LEVELS = {"element": 0, "block": 1}
# emu_set_warpgroup_mma: a device without the warpgroup tile; one with it and
# the launchers' default (the forward product on it); all three products on it.
WARPGROUP_NONE, WARPGROUP_FORWARD, WARPGROUP_ALL = 0, 1, 2
MATMUL_OPS = {"forward": "MaskedMatmul", "grad_input": "MaskedMatmulGradInput", "grad_weight": "MaskedMatmulGradWeight"}
CONV_OPS = {"forward": "MaskedConv2D", "grad_input": "MaskedConv2DGradInput", "grad_weight": "MaskedConv2DGradFilter"}
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SUBNORMAL_STEP = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}


def np_dtype(name):
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Emulator:
    """The emulated launchers (tests/cuda_emulation/emulator*.cc) through ctypes."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.emu_matmul.argtypes = [i, i, i] + [i64] * 5 + [p, p, p, i, p, i]
        lib.emu_matmul_uses_tensor_cores.argtypes = [i, i] + [i64] * 4 + [i]
        lib.emu_matmul_uses_pipeline.argtypes = [i, i] + [i64] * 4 + [i, i]
        lib.emu_conv2d.argtypes = [i, i, i, i, ctypes.POINTER(i64), p, p, p, i, p, p, i]
        lib.emu_conv2d_uses_tensor_cores.argtypes = [i, i, ctypes.POINTER(i64), i]
        lib.emu_conv2d_uses_pipeline.argtypes = [i, i, ctypes.POINTER(i64), i, i]
        lib.emu_elementwise.argtypes = [i, i, i] + [i64] * 5 + [p, p, i, p, ctypes.POINTER(p), p, i]
        lib.emu_set_schedule.argtypes = [i, ctypes.c_uint64]
        lib.emu_set_copy_line_check.argtypes = [i]
        lib.emu_set_device_tensor_cores.argtypes = [i]
        lib.emu_set_warpgroup_mma.argtypes = [i]
        lib.emu_set_warpgroup_tall_tiles.argtypes = [i]
        lib.emu_take_diagnostics.argtypes = [ctypes.c_char_p, i64]
        lib.emu_take_diagnostics.restype = i64
        lib.emu_stats.argtypes = [ctypes.POINTER(i64)]
        lib.emu_self_test.argtypes = [i, p, i64]
        lib.emu_set_tensor_maps_refused.argtypes = [i]
        lib.emu_tensor_map_refusals.restype = i64
        lib.emu_tensor_map_refusals.argtypes = []
        lib.emu_tensor_copy_probe.argtypes = [p, i64, i64, i, i, ctypes.c_int32, ctypes.c_int32, p, p]
        for name in ("float_to_half", "half_to_float", "float_to_bfloat16", "bfloat16_to_float", "float_to_tf32"):
            getattr(lib, f"emu_{name}").argtypes = [p, p, i64]
        self.lib = lib

    def diagnostics(self):
        """The emulation's diagnostics since the last call ('' when none)."""
        buffer = ctypes.create_string_buffer(1 << 16)
        self.lib.emu_take_diagnostics(buffer, len(buffer))
        return buffer.value.decode()

    def stats(self):
        names = ("launches", "blocks", "threads", "barriers", "mma_syncs", "warpgroup_mma_columns", "warpgroup_mmas",
                 "async_copies", "tensor_copies", "busiest_block_tensor_work")
        values = (ctypes.c_int64 * len(names))()
        self.lib.emu_stats(values)
        return dict(zip(names, values))

    def reset(self):
        self.lib.emu_reset_stats()
        self.lib.emu_set_schedule(0, 0)
        self.lib.emu_set_device_tensor_cores(1)
        self.lib.emu_set_warpgroup_mma(WARPGROUP_NONE)
        self.lib.emu_set_copy_line_check(0)
        self.lib.emu_set_tensor_maps_refused(0)
        self.lib.emu_set_warpgroup_tall_tiles(0)
        self.diagnostics()

    def checked(self, what, status):
        diagnostics = self.diagnostics()
        assert status == 0 and not diagnostics, f"{what}: status {status}\n{diagnostics}"

    def matmul(self, product, a, b, mask, level, block, shape, out, tensor_cores):
        m, k, n = shape
        self.checked(f"matmul {product}", self.lib.emu_matmul(
            PRODUCTS[product], DTYPE_CODES[a.dtype.name], MASK_CODES[mask.dtype.name], m, k, n, *block,
            a.ctypes.data, b.ctypes.data, mask.ctypes.data, 0 if level == "element" else 1, out.ctypes.data,
            int(tensor_cores)))
        return out

    def matmul_uses_tensor_cores(self, product, dtype, shape, block, tensor_cores=True):
        return self.lib.emu_matmul_uses_tensor_cores(PRODUCTS[product], DTYPE_CODES[dtype], shape[1], shape[2],
                                                     *block, int(tensor_cores)) == 1

    def matmul_uses_pipeline(self, product, dtype, shape, block, level, tensor_cores=True):
        return self.lib.emu_matmul_uses_pipeline(PRODUCTS[product], DTYPE_CODES[dtype], shape[1], shape[2], *block,
                                                 LEVELS[level], int(tensor_cores)) == 1

    def conv2d(self, product, a, b, mask, level, geometry, out, output_mask, tensor_cores):
        fields = (ctypes.c_int64 * 19)(*geometry)
        self.checked(f"conv2d {product}", self.lib.emu_conv2d(
            PRODUCTS[product], DTYPE_CODES[a.dtype.name], MASK_CODES[mask.dtype.name],
            -1 if output_mask is None else MASK_CODES[output_mask.dtype.name], fields, a.ctypes.data,
            b.ctypes.data, mask.ctypes.data, 0 if level == "element" else 1,
            None if output_mask is None else output_mask.ctypes.data, out.ctypes.data, int(tensor_cores)))
        return out

    def conv2d_uses_tensor_cores(self, product, dtype, geometry, tensor_cores=True):
        fields = (ctypes.c_int64 * 19)(*geometry)
        return self.lib.emu_conv2d_uses_tensor_cores(PRODUCTS[product], DTYPE_CODES[dtype], fields,
                                                     int(tensor_cores)) == 1

    def conv2d_uses_pipeline(self, product, dtype, geometry, level, tensor_cores=True):
        fields = (ctypes.c_int64 * 19)(*geometry)
        return self.lib.emu_conv2d_uses_pipeline(PRODUCTS[product], DTYPE_CODES[dtype], fields, LEVELS[level],
                                                 int(tensor_cores)) == 1

    def elementwise(self, op, a, mask, level, block, out, state=(), scalars=(), flag=False):
        """op as in emulator_elementwise.cc over a as [outer, k, n]; updates out and state in place."""
        outer, k, n = a.shape
        pointers = (ctypes.c_void_p * 3)(*([None if s is None else s.ctypes.data for s in state]
                                           + [None] * (3 - len(state))))
        values = np.asarray(list(scalars) + [0.0] * (6 - len(scalars)), a.dtype)
        self.checked(f"elementwise {op}", self.lib.emu_elementwise(
            op, DTYPE_CODES[a.dtype.name], MASK_CODES[mask.dtype.name], outer, k, n, *block, a.ctypes.data,
            mask.ctypes.data, 0 if level == "element" else 1, out.ctypes.data, pointers, values.ctypes.data, int(flag)))

    def convert(self, name, values, out_dtype):
        values = np.ascontiguousarray(values)
        out = np.empty(values.shape, out_dtype)
        getattr(self.lib, f"emu_{name}")(values.ctypes.data, out.ctypes.data, values.size)
        return out


@pytest.fixture(scope="session")
def emulator_library(tmp_path_factory):
    """Builds the emulated launchers once per session (g++, the sources in parallel)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("the CUDA emulation tests need g++ to build the emulated kernels")
    build = tmp_path_factory.mktemp("cuda_emulation")
    # -fno-strict-aliasing: the kernels read 16-byte chunks through reinterpret_cast, as CUDA code does.
    flags = ["-O2", "-std=c++17", "-fno-strict-aliasing", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
             "-I", str(EMULATION / "include"), "-I", str(ROOT)]
    jobs = [(source, subprocess.Popen([compiler, *flags, "-c", str(EMULATION / source), "-o",
                                       str(build / (source + ".o"))],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for source in SOURCES]
    failures = []
    for source, job in jobs:
        output, _ = job.communicate()
        if job.returncode != 0:
            failures.append(f"{source}:\n{output}")
    assert not failures, "building the CUDA emulation failed:\n" + "\n".join(failures)
    library = build / "libmasked_ops_cuda_emulated.so"
    subprocess.run([compiler, "-shared", "-pthread", "-o", str(library), *(str(build / (s + ".o")) for s in SOURCES)],
                   check=True)
    return Emulator(library)


@pytest.fixture
def emulator(emulator_library):
    emulator_library.reset()
    yield emulator_library
    emulator_library.reset()


def check(actual, expected, bound, depth, dtype, tensor_cores, what):
    """actual against the float64 reference: tests/gpu's tolerances, then a
    rounding-error bound (bound: the sum of the terms' magnitudes)."""
    actual = actual.astype(np.float64)
    unwritten = np.argwhere(np.isnan(actual))
    assert unwritten.size == 0, f"{what}: NaN (unwritten, or a masked NaN leaked) at {unwritten[:5].tolist()}"
    tolerance = {"float64": 1e-12, "float32": 2e-3 if tensor_cores else 1e-5, "float16": 2e-2,
                 "bfloat16": 6e-2}[dtype]
    scale = math.sqrt(max(depth, 1)) * max(1.0, np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale, err_msg=what)
    # Output rounding; operands rounded to TF32 or to the half type (a masked
    # weight, an output-masked dy) before the tensor cores; the sum in the
    # compute type.
    u = UNIT_ROUNDOFF[dtype]
    if dtype in ("float16", "bfloat16"):
        operands = 2 * u
    else:
        operands = 2 * 2.0**-11 if tensor_cores and dtype == "float32" else 0.0
    accumulate = (depth + 2) * (2.0**-53 if dtype == "float64" else 2.0**-24)
    limit = u * np.abs(expected) + (operands + accumulate) * bound + SUBNORMAL_STEP[dtype] + 1e-300
    excess = np.abs(actual - expected) - limit
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else None
    assert excess.size == 0 or excess[worst] <= 0, (
        f"{what}: {actual[worst]} vs reference {expected[worst]} at {worst} (bound {bound[worst]})")


# -- the emulation itself -------------------------------------------------------------------------------


def test_conversions_match_numpy(emulator):
    """__half2float / __float2half_rn / __bfloat162float / __float2bfloat16_rn
    against NumPy and ml_dtypes (round to nearest even, NaN kept)."""
    every = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(emulator.convert("half_to_float", every, np.float32),
                                  every.view(np.float16).astype(np.float32))
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           # float16 and bfloat16 values, and the ties halfway between neighbours
                           (every.view(np.float16).astype(np.float32).view(np.uint32) + np.uint32(0x1000)),
                           (every.astype(np.uint32) << 16) + np.uint32(0x8000),
                           np.array([0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0, 0x80000000, 0x477ff000,
                                     0x477fefff, 0x33000000, 0x33000001, 0x387fe000], dtype=np.uint32)])
    values = bits.view(np.float32)
    with np.errstate(over="ignore"):
        expected_half = values.astype(np.float16)
    half = emulator.convert("float_to_half", values, np.uint16).view(np.float16)
    np.testing.assert_array_equal(np.isnan(half), np.isnan(expected_half))
    finite = ~np.isnan(expected_half)
    np.testing.assert_array_equal(half[finite].view(np.uint16), expected_half[finite].view(np.uint16))
    if ml_dtypes is not None:
        bf16 = np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(emulator.convert("bfloat16_to_float", every, np.float32),
                                      every.view(bf16).astype(np.float32))
        with np.errstate(invalid="ignore"):
            expected = values.astype(bf16)
        actual = emulator.convert("float_to_bfloat16", values, np.uint16).view(bf16)
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
        finite = ~np.isnan(expected)
        np.testing.assert_array_equal(actual[finite].view(np.uint16), expected[finite].view(np.uint16))


def test_tf32_rounds_to_nearest_ties_away(emulator):
    """__float_to_tf32 as cvt.rna.tf32.f32: a 10-bit mantissa, to nearest, ties away from zero."""
    rng = np.random.default_rng(1)
    special = np.float32([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-11 - 2**-23, 2**-130, np.inf, -np.inf,
                          np.nan])
    values = np.concatenate([rng.standard_normal(50_000).astype(np.float32) * np.float32(1e3), special])
    actual = emulator.convert("float_to_tf32", values, np.float32)
    assert (actual.view(np.uint32) & 0x1FFF == 0).all()
    finite = np.isfinite(values) & (np.abs(values) >= 2.0**-126) & (np.abs(values) < 3e38)
    v = values[finite].astype(np.float64)
    unit = 2.0 ** (np.floor(np.log2(np.abs(v))) - 10)
    expected = np.sign(v) * np.floor(np.abs(v) / unit + 0.5) * unit
    np.testing.assert_array_equal(actual[finite].astype(np.float64), expected)
    # Ties away from zero (1 + 2^-11 is halfway between 1 and 1 + 2^-10); a
    # subnormal with no low bits stays; Inf stays; NaN stays NaN.
    np.testing.assert_array_equal(actual[-8:-1], np.float32([1 + 2**-10, 1 + 2**-9, -(1 + 2**-10), 1, 2**-130, np.inf,
                                                              -np.inf]))
    assert np.isnan(actual[-1])


def self_test(emulator, which, data):
    data = np.array(data, dtype=np.float32)  # a copy: the kernels write into it
    status = emulator.lib.emu_self_test(which, data.ctypes.data, data.size)
    return status, data, emulator.diagnostics()


def test_barriers_order_shared_memory_under_every_schedule(emulator):
    data = np.random.default_rng(2).standard_normal(1024).astype(np.float32)
    expected = data[:512].astype(np.float64).reshape(2, 256).sum(1)
    results = {}
    for schedule in (0, 1, 2):
        emulator.lib.emu_set_schedule(schedule, 7)
        status, out, diagnostics = self_test(emulator, 0, data)
        assert status == 0 and not diagnostics
        np.testing.assert_allclose(out[512:514], expected, rtol=1e-5)
        status, out, diagnostics = self_test(emulator, 1, data)  # the same kernel without its barrier
        assert status == 0 and not diagnostics
        results[schedule] = out[512:514]
    # Without the barrier, thread 0 sums before the others store (forward
    # order) or after (reverse): the schedules tell a missing barrier.
    assert not np.allclose(results[0], expected, rtol=1e-5)
    np.testing.assert_allclose(results[1], expected, rtol=1e-5)


@pytest.mark.parametrize("which, status, message", [
    (2, 0, "__syncthreads() reached by 128 threads after 128 others of the block exited"),
    (3, 0, "threads of a block wait at different __syncthreads()"),
    (4, 0, "wmma::load_matrix_sync: pointer not 256-bit aligned"),
    (5, 719, "__trap()"),
    (6, 9, "invalid launch configuration"),
    (7, -1001, "write out of the bounds of data"),
    (14, 719, "a warp-collective operation not reached by every lane of the warp at the same place"),
], ids=["exited-threads-barrier", "two-barriers", "misaligned-wmma", "trap", "2048-threads", "out-of-bounds",
        "half-warp-ldmatrix"])
def test_emulation_reports(emulator, which, status, message):
    actual_status, _, diagnostics = self_test(emulator, which, np.zeros(1024))
    assert actual_status == status
    assert message in diagnostics, diagnostics


def test_tensor_copies_land_swizzled_when_waited_for(emulator):
    """A tensor copy's box lands at the wait on its mbarrier (before it, NaN),
    rows of 32 bytes whose 16-byte chunks swap where bit 7 of the shared-window
    address is set (the 32-byte swizzle; dynamic shared memory starts at 1152
    there), elements past the array's 16 x 10 zeros."""
    rng = np.random.default_rng(5)
    data = rng.standard_normal(1024).astype(np.float32)
    status, out, diagnostics = self_test(emulator, 19, data)
    assert status == 0 and not diagnostics
    assert np.isnan(out[256:320]).all()
    source = data[:80].view(np.uint16).reshape(10, 16)
    expected = np.zeros(128, np.uint16)
    for r in range(8):
        for c in range(16):
            address = 1152 + r * 32 + c * 2
            swizzled = address ^ (((address >> 7) & 1) << 4)
            row, column = 5 + r, 4 + c
            expected[(swizzled - 1152) // 2] = source[row, column] if row < 10 and column < 16 else 0
    np.testing.assert_array_equal(out[320:384].view(np.uint16), expected)


@pytest.mark.parametrize("box_inner, box_outer, inner, outer, offset", PROBE_CASES)
def test_tensor_copy_probe_lands_as_modelled(emulator, box_inner, box_outer, inner, outer, offset):
    """The GPU harness's tensor-copy probe under the emulation lands what
    tests/gpu expects of a GPU (tests/tensor_copy_model.py)."""
    array = probe_array(offset)
    landed = np.zeros(box_inner * box_outer, np.uint16)
    completed = np.zeros(1, np.int32)
    status = emulator.lib.emu_tensor_copy_probe(array.ctypes.data, array.shape[1], array.shape[0], box_inner,
                                                box_outer, inner, outer, landed.ctypes.data, completed.ctypes.data)
    assert status == 0 and completed[0] == 1, emulator.diagnostics()
    expected = landed_box(array, inner, outer, box_inner, box_outer)
    assert np.array_equal(landed, expected), describe_misplacement(landed, expected, box_inner)


def test_warpgroup_product_of_unfenced_stores_is_reported(emulator):
    """wgmma reads shared memory through the async proxy: a stage written by
    stores (or landed cp.async copies) is its to read only after each
    writing thread's fence.proxy.async. The emulation reports the product
    that reads unfenced bytes; the same kernel with the fences runs clean."""
    status, out, diagnostics = self_test(emulator, 21, np.zeros(1024))
    assert status == 0 and not diagnostics, diagnostics
    np.testing.assert_array_equal(out[:128], 16.0)
    status, _, diagnostics = self_test(emulator, 22, np.zeros(1024))
    assert "without a fence.proxy.async since" in diagnostics, diagnostics


def test_mbarrier_wait_that_never_completes_is_reported(emulator):
    status, _, diagnostics = self_test(emulator, 20, np.zeros(1024))
    assert status == 719
    assert "mbarrier: threads wait for a phase that never completes" in diagnostics, diagnostics


def test_async_copies_land_when_waited_for(emulator):
    """cp.async data is there after wait_group and a barrier; before, the
    destination holds NaN, so a kernel that forgets the wait gets NaN."""
    data = np.random.default_rng(4).standard_normal(1024).astype(np.float32)
    status, out, diagnostics = self_test(emulator, 15, data)
    assert status == 0 and not diagnostics
    np.testing.assert_array_equal(out[256:512], np.roll(data[:256], -32))
    status, out, diagnostics = self_test(emulator, 16, data)
    assert status == 0 and not diagnostics
    assert np.isnan(out[256:512]).all()


@pytest.mark.parametrize("which", [17, 18], ids=["b-depth-outer", "b-depth-inner"])
def test_ldmatrix_mma_products(emulator, which):
    """ldmatrix fragments into mma.sync, with the lane addresses of the
    pipelined kernels: A B + C of the bfloat16 operands, summed in float."""
    if ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    data = np.random.default_rng(which).standard_normal(1024).astype(np.float32)
    status, out, diagnostics = self_test(emulator, which, data)
    assert status == 0 and not diagnostics
    a, b, c = (data[i * 256:(i + 1) * 256].reshape(16, 16) for i in range(3))
    a, b = (v.astype(ml_dtypes.bfloat16).astype(np.float64) for v in (a, b))
    np.testing.assert_allclose(out[768:].reshape(16, 16), a @ b + c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", range(8, 14), ids=[f"{t}-{a}" for t in ("half", "bfloat16", "tf32")
                                                     for a in ("a-col-major", "a-row-major")])
def test_wmma_products(emulator, which):
    """mma_sync of loaded fragments: exact products of the operands (rounded
    to the half type, or to TF32 by __float_to_tf32), summed in float."""
    rng = np.random.default_rng(which)
    data = rng.standard_normal(1024).astype(np.float32)
    status, out, diagnostics = self_test(emulator, which, data)
    assert status == 0 and not diagnostics
    a, b, c = (data[i * 256:(i + 1) * 256].reshape(16, 16) for i in range(3))
    if which < 10:
        a, b = a.astype(np.float16), b.astype(np.float16)
    elif which < 12:
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        a, b = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    else:
        a, b = (emulator.convert("float_to_tf32", v, np.float32) for v in (a, b))
    a, b = a.astype(np.float64), b.astype(np.float64)
    expected = a @ b + c
    bound = np.abs(a) @ np.abs(b) + np.abs(c)
    assert (np.abs(out[768:].reshape(16, 16) - expected) <= 18 * 2.0**-24 * bound).all()


# -- masked_matmul --------------------------------------------------------------------------------------

# (dtype, tensor_cores): float64 never takes tensor cores (asking falls back).
NUMERICS = [("float64", False), ("float64", True), ("float32", False), ("float32", True), ("float16", False),
            ("float16", True), ("bfloat16", False), ("bfloat16", True)]
MATMUL_SHAPES = [  # (m, k, n, block)
    (37, 29, 53, (16, 8)),     # forward and dW on CUDA cores (8 columns), dx on tensor cores
    (130, 100, 90, (32, 48)),  # everything on tensor cores; 48-wide blocks straddle the 64-wide tiles
    (1, 16, 16, (16, 16)),     # one row
    (40, 70, 50, (48, 80)),    # blocks wider than the weight
    (20, 24, 33, (64, 64)),    # one block larger than the whole weight
    (257, 96, 160, (16, 16)),  # several tensor-core tiles each way, a last row tile of one row
    (130, 128, 192, (32, 64)),  # 16-byte chunks staged in every product (full stages, aligned rows)
    (33, 40, 36, (8, 24)),     # nothing on 16s: CUDA cores for all three
    (9, 7, 5, (1, 1)),         # one entry per block
    (150, 200, 136, (64, 32)),  # pipelined: a short last segment, a second column tile 8 wide, a last row tile
    (64, 48, 272, (16, 48)),   # pipelined stages of 16 (forward: 16-row blocks; dx: 48-column blocks)
    (260, 64, 64, (128, 128)),  # pipelined: one block larger than the weight
]


def matmul_rule(product, dtype, k, n, block, tensor_cores):
    """The launchers' rule, restated: tensor cores (never float64) where the
    product's output columns (dW: and rows) are cut on multiples of 16, or
    not at all."""
    def aligned(size, extent):
        return size % 16 == 0 or size >= extent
    rows, cols = aligned(block[0], k), aligned(block[1], n)
    needed = {"forward": cols, "grad_input": rows, "grad_weight": rows and cols}[product]
    return tensor_cores and needed and dtype != "float64"


def pipeline_rule(product, dtype, k, n, block, level, tensor_cores):
    """The pipelined kernels' rule, restated: the half types and float32 (as
    TF32) on tensor cores, W's dimensions multiples of 8 and its blocks on
    16s both ways, and a block mask except for dW."""
    def aligned(size, extent):
        return size % 16 == 0 or size >= extent
    return (tensor_cores and dtype in ("float16", "bfloat16", "float32") and k % 8 == 0 and n % 8 == 0
            and aligned(block[0], k) and aligned(block[1], n) and (product == "grad_weight" or level == "block"))


def make_masks(rng, k, n, block, density, level, values=(1.0, 2.0, -0.5)):
    """(mask as passed, its element-level expansion): block factors from
    `values`, live with probability `density` (at least one block dead and one
    live when there are several and 0 < density < 1); element masks also drop
    a fifth of the entries, some as -0 (dead too), and make some live ones
    tiny (1e-30: live, though zero in float16)."""
    grid = (math.ceil(k / block[0]), math.ceil(n / block[1]))
    live = rng.random(grid) < density
    if 0 < density < 1 and live.size > 1:
        live.flat[0], live.flat[-1] = False, True
    blocks = live * rng.choice(values, grid)
    element = np.repeat(np.repeat(blocks, min(block[0], k), 0), min(block[1], n), 1)[:k, :n]
    if level == "element":
        element = element * (rng.random((k, n)) < 0.8)
        special = rng.random((k, n)) < 0.1
        element = np.where(special & (element == 0), -0.0, element)
        element = np.where(special & (element != 0), 1e-30 * np.sign(element), element)
        return element, element
    return blocks, element


def matmul_case(shape, block, dtype, level, density=0.6, mask_dtype="float32", seed=0):
    """(mask, its element-level factors, [(product, a, b, out shape, depth)]) of one case."""
    m, k, n = shape
    rng = np.random.default_rng([m, k, n, *block, seed, len(level), DTYPE_CODES[dtype]])
    t = np_dtype(dtype)
    mask, element = make_masks(rng, k, n, block, density, level)
    if mask_dtype == "bool":
        mask, element = mask != 0, (element != 0).astype(np.float64)
    mask = np.ascontiguousarray(mask, dtype=mask_dtype)
    x, w, dy = (rng.standard_normal(s).astype(t) for s in ((m, k), (k, n), (m, n)))
    w_nan = np.where(element == 0, np.nan, w.astype(np.float64)).astype(t)  # masked-out weights never leak
    return mask, element, [("forward", x, w_nan, (m, n), k), ("grad_input", dy, w_nan, (m, k), n),
                           ("grad_weight", x, dy, (k, n), m)]


def run_matmul(emulator, shape, block, dtype, tensor_cores, level, density=0.6, mask_dtype="float32", seed=0):
    """The three products of one case, checked against the reference."""
    k, n = shape[1:]
    t = np_dtype(dtype)
    mask, element, products = matmul_case(shape, block, dtype, level, density, mask_dtype, seed)
    attrs = {"block_rows": block[0], "block_cols": block[1]}
    outputs = {}
    for product, a, b, out_shape, depth in products:
        emulator.lib.emu_reset_stats()
        out = emulator.matmul(product, a, b, mask, level, block, shape, np.full(out_shape, np.nan, t), tensor_cores)
        tensor_path = matmul_rule(product, dtype, k, n, block, tensor_cores)
        assert emulator.matmul_uses_tensor_cores(product, dtype, shape, block, tensor_cores) == tensor_path
        assert emulator.matmul_uses_pipeline(product, dtype, shape, block, level, tensor_cores) == pipeline_rule(
            product, dtype, k, n, block, level, tensor_cores)
        stats = emulator.stats()
        tensor_work = stats["mma_syncs"] + stats["warpgroup_mma_columns"]
        if not tensor_path:
            assert tensor_work == 0, f"{product}: a tensor-core kernel ran"
        elif element.any() and min(out_shape) > 0 and depth > 0:
            assert tensor_work > 0, f"{product}: no tensor-core kernel ran"
        expected, bound, _ = _matmul(MATMUL_OPS[product], a.astype(np.float64), b.astype(np.float64),
                                     mask.astype(np.float64), attrs)
        check(out, expected, bound, depth, dtype, tensor_path, f"{product} {dtype}")
        outputs[product] = out
    assert (outputs["grad_weight"][element == 0] == 0).all(), "dW not zero where the mask is"
    return outputs


@pytest.mark.parametrize("shape_and_block", MATMUL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("dtype, tensor_cores", NUMERICS, ids=[f"{d}-{'tc' if t else 'cc'}" for d, t in NUMERICS])
@pytest.mark.parametrize("level", ["block", "element"])
def test_matmul_products(emulator, shape_and_block, dtype, tensor_cores, level):
    *shape, block = shape_and_block
    run_matmul(emulator, tuple(shape), block, dtype, tensor_cores, level)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["all-dead", "all-live"])
@pytest.mark.parametrize("dtype, tensor_cores", [("float32", True), ("float16", True), ("float64", False)])
def test_matmul_dead_and_live_masks(emulator, density, dtype, tensor_cores):
    run_matmul(emulator, (70, 48, 80), (16, 16), dtype, tensor_cores, "block", density=density)


@pytest.mark.parametrize("dtype, tensor_cores", [("float32", True), ("bfloat16", True), ("float32", False)])
@pytest.mark.parametrize("level", ["block", "element"])
def test_matmul_bool_masks(emulator, dtype, tensor_cores, level):
    run_matmul(emulator, (45, 64, 48), (32, 16), dtype, tensor_cores, level, mask_dtype="bool")


@pytest.mark.parametrize("shape", [(0, 32, 48), (5, 0, 48), (5, 32, 0)], ids=["m0", "k0", "n0"])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tc", "cc"])
def test_matmul_empty_extents(emulator, shape, tensor_cores):
    """An empty extent: the products of it are zeros (x @ W over no depth) or empty."""
    run_matmul(emulator, shape, (16, 16), "float32", tensor_cores, "block")


@pytest.mark.parametrize("block", [(32, 32), (16, 48), (8, 8)], ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tc", "cc"])
def test_matmul_nan_reaches_live_blocks_only(emulator, block, dtype, tensor_cores):
    """A NaN in x (Inf in dy for dx) spreads through the live blocks it meets,
    the zeros of a live block included, and never through a dead block."""
    rng = np.random.default_rng(11)
    m, k, n = 40, 96, 144
    t = np_dtype(dtype)
    mask, _ = make_masks(rng, k, n, block, 0.5, "block")
    mask = mask.astype(np.float32)
    w = rng.standard_normal((k, n)).astype(t)
    x = rng.standard_normal((m, k))
    x[3, 40] = np.nan
    dy = rng.standard_normal((m, n))
    dy[5, 100] = np.inf
    y = emulator.matmul("forward", x.astype(t), w, mask, "block", block, (m, k, n), np.zeros((m, n), t), tensor_cores)
    dx = emulator.matmul("grad_input", dy.astype(t), w, mask, "block", block, (m, k, n), np.zeros((m, k), t),
                         tensor_cores)
    y, dx = y.astype(np.float64), dx.astype(np.float64)
    block_live = np.repeat(np.repeat(mask != 0, block[0], 0), block[1], 1)[:k, :n]
    np.testing.assert_array_equal(np.isnan(y[3]), block_live[40])
    assert np.isfinite(np.delete(y, 3, axis=0)).all()
    np.testing.assert_array_equal(~np.isfinite(dx[5]), block_live[:, 100])
    assert np.isfinite(np.delete(dx, 5, axis=0)).all()


def pipelined_mma_count(product, m, k, n, block, live, dtype="float16"):
    """The mma.sync calls (per warp) the pipelined kernels make for a block
    mask whose block (i, j) is live where live[i, j]: what they must skip,
    restated. Forward and dx: for every 128-row tile, every 128-column tile
    and every segment (block row of W; dx: block column) with a live block in
    the tile's columns, every stage of the segment multiplies each live
    16-column strip in both warp rows, 4 row strips by 2 halves of 8 columns
    per 16 of depth (TF32: per 8, in stages of 16). dW: every live 16 x 16
    fragment of a tile, 2 halves, twice a stage over the whole depth in
    stages of 32 (TF32: 16)."""
    rows, cols = min(block[0], k), min(block[1], n)
    tf32 = dtype == "float32"
    if product == "grad_weight":
        total = 0
        for row0 in range(0, k, 128):
            for col0 in range(0, n, 128):
                fragments = sum(bool(live[r // rows, c // cols]) for r in range(row0, min(k, row0 + 128), 16)
                                for c in range(col0, min(n, col0 + 128), 16))
                total += math.ceil(m / (16 if tf32 else 32)) * 2 * fragments * 2
        return total
    out_cols, out_block, depth, depth_block = (n, cols, k, rows) if product == "forward" else (k, rows, n, cols)
    segment_live = live if product == "forward" else live.T
    stage = 16 if tf32 else 32 if depth_block % 32 == 0 or depth_block >= depth else 16
    per_segment = math.ceil(min(depth_block, depth) / stage) * stage // (8 if tf32 else 16)
    total = 0
    for col0 in range(0, out_cols, 128):
        for segment in range(segment_live.shape[0]):
            strips = sum(bool(segment_live[segment, c // out_block]) for c in range(col0, min(out_cols, col0 + 128), 16))
            total += per_segment * strips * 2 * 4 * 2
    return math.ceil(m / 128) * total


def depth_splits(tiles, depth):
    """How many ways the pipelined weight gradients split their depth,
    restated: enough thread blocks for 264, each split 16 stages of 32 deep
    or more, at most 32."""
    return min(math.ceil(264 / max(tiles, 1)), min(max(math.ceil(depth / 32) // 16, 1), 32))


@pytest.mark.parametrize("shape, block", [((150, 200, 136), (64, 32)), ((64, 48, 272), (16, 48)),
                                          ((8, 4160, 16), (16, 16)), ((2080, 64, 48), (16, 16))],
                         ids=["short-last-segment", "stages-of-16", "260-segments", "split-batch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_pipelined_products_multiply_live_fragments_only(emulator, shape, block, dtype):
    """The pipelined kernels' tensor-core work is what the live blocks need:
    their mma.sync count matches the count restated from the mask, and the
    results match the reference (run_matmul). float32 runs as TF32
    (mma.sync m16n8k8: depth-inner operands by ldmatrix, depth-outer ones
    element by element; the reference within TF32 rounding)."""
    m, k, n = shape
    rng = np.random.default_rng(5)
    t = np_dtype(dtype)
    mask, element = make_masks(rng, k, n, block, 0.4, "block")
    mask = mask.astype(np.float32)
    live = mask != 0
    x, w, dy = (rng.standard_normal(s).astype(t) for s in ((m, k), (k, n), (m, n)))
    for product, a, b, out_shape in (("forward", x, w, (m, n)), ("grad_input", dy, w, (m, k)),
                                     ("grad_weight", x, dy, (k, n))):
        assert emulator.matmul_uses_pipeline(product, dtype, shape, block, "block")
        emulator.lib.emu_reset_stats()
        emulator.matmul(product, a, b, mask, "block", block, shape, np.full(out_shape, np.nan, t), True)
        assert emulator.stats()["mma_syncs"] == pipelined_mma_count(product, m, k, n, block, live, dtype), product
    # dW: factors, liveness, the product, and the sum of its splits where there are several.
    splits = depth_splits(math.ceil(k / 128) * math.ceil(n / 128), m)
    assert emulator.stats()["launches"] == 3 + (splits > 1)
    run_matmul(emulator, shape, block, dtype, True, "block", density=0.4)


@pytest.mark.parametrize("product", ["forward", "grad_input", "grad_weight"])
def test_pipelined_tf32_rounds_operands_to_nearest(emulator, product):
    """The TF32 products round both operands to nearest before the tensor
    cores (which would otherwise drop their low 13 bits), whichever way each
    operand is staged: 1 + 3 2^-12 becomes 1 + 2^-10, not 1 + 2^-11, so 16
    terms sum to exactly 16 (1 + 2^-10)."""
    size, block = 16, (16, 16)
    odd = np.float32(1 + 3 * 2.0**-12)
    mask = np.ones((1, 1), np.float32)
    assert emulator.matmul_uses_pipeline(product, "float32", (size,) * 3, block, "block")
    ones = np.ones((size, size), np.float32)
    for a, b in ((np.full_like(ones, odd), ones), (ones, np.full_like(ones, odd))):
        out = emulator.matmul(product, a, b, mask, "block", block, (size,) * 3, np.full_like(ones, np.nan), True)
        np.testing.assert_array_equal(out, np.float32(16 * (1 + 2.0**-10)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("op, product", [("matmul", "forward"), ("matmul", "grad_input"), ("conv", "forward"),
                                         ("conv", "grad_input")])
def test_pipelined_nan_factor_is_not_taken_for_one(emulator, op, product, dtype):
    """A NaN block factor is live and not 1: the list scan marks its entries
    scaled, so the product is NaN in (exactly) the output columns that block
    feeds, rather than the unscaled product a factor of 1 would give."""
    rng = np.random.default_rng(3)
    t = np_dtype(dtype)
    if op == "matmul":
        m, k, n, block = 64, 64, 64, (16, 16)
        mask = np.ones((4, 4), np.float32)
        mask[1, 2], mask[3, 0] = np.nan, 0.0
        assert emulator.matmul_uses_pipeline(product, dtype, (m, k, n), block, "block")
        a = rng.standard_normal((m, k) if product == "forward" else (m, n)).astype(t)
        w = rng.standard_normal((k, n)).astype(t)
        out = emulator.matmul(product, a, w, mask, "block", block, (m, k, n),
                              np.full((m, n) if product == "forward" else (m, k), np.nan, t), True)
        nan_columns = slice(32, 48) if product == "forward" else slice(16, 32)
    else:
        kh = kw = 3
        fields = (1, 8, 8, 32, kh, kw, 32, 1, 1, 1, 1, 1, 1, 8, 8, 16, 16, 4, 4)
        mask = np.ones((2, 2), np.float32)
        mask[0, 1] = np.nan
        assert emulator.conv2d_uses_pipeline(product, dtype, fields, "block")
        a = rng.standard_normal((1, 8, 8, 32)).astype(t)
        f = rng.standard_normal((kh, kw, 32, 32)).astype(t)
        out = emulator.conv2d(product, a, f, mask, "block", fields, np.full((1, 8, 8, 32), np.nan, t), None, True)
        nan_columns = slice(16, 32) if product == "forward" else slice(0, 16)
    values = out.astype(np.float64)
    assert np.isnan(values[..., nan_columns]).all()
    values[..., nan_columns] = 0
    assert np.isfinite(values).all()


@pytest.mark.parametrize("density", [0.0, 0.02, 1.0], ids=["all-dead", "few-live", "all-live"])
def test_pipelined_forward_split_over_its_list(emulator, density):
    """A small batch over a long depth (8 x 4160 x 16: one output tile) splits
    the tile's list 8 ways, adding the partial products in a second kernel
    from the splits that had entries: the reference's result and the live
    blocks' mma.sync count, no thread block taking more than an eighth of the
    list, whether no block, a few or all are live."""
    m, k, n, block = 8, 4160, 16, (16, 16)
    assert depth_splits(1, k) == 8
    rng = np.random.default_rng(9)
    mask, element = make_masks(rng, k, n, block, density, "block")
    mask = mask.astype(np.float32)
    x, w = rng.standard_normal((m, k)).astype(np.float16), rng.standard_normal((k, n))
    w = np.where(element == 0, np.nan, w).astype(np.float16)
    emulator.lib.emu_reset_stats()
    y = emulator.matmul("forward", x, w, mask, "block", block, (m, k, n), np.full((m, n), np.nan, np.float16), True)
    stats = emulator.stats()
    assert stats["launches"] == 5  # factors, liveness, lists, the split products, their sum
    assert stats["mma_syncs"] == pipelined_mma_count("forward", m, k, n, block, mask != 0)
    listed = int((mask != 0).sum())  # one column of blocks: an entry, of the same work, per live block
    assert stats["busiest_block_tensor_work"] == math.ceil(listed / 8) * stats["mma_syncs"] // max(listed, 1)
    expected, bound, _ = _matmul(MATMUL_OPS["forward"], x.astype(np.float64), np.nan_to_num(w.astype(np.float64)),
                                 mask.astype(np.float64), {"block_rows": 16, "block_cols": 16})
    check(y, expected, bound, k, "float16", True, "forward float16")


# -- the warpgroup (wgmma) forward product ---------------------------------------------------------------

def warpgroup_columns(m, depth, out_cols, block, live, tall=False):
    """The columns the warpgroup products' wgmma products span (summed per
    warpgroup), restated from a block mask whose block (i, j) is live where
    live[i, j], block (i, j) covering depth i and output columns j (the
    forward product: W's mask; dx: its transpose): for every 128-row tile
    (with tall tiles, two per 256 rows, the last one's second too),
    128-column tile and segment (block row of live) with a live block in the
    tile, every 16 of the segment's depth in stages (32, or 16 for blocks not
    on 32s along the depth), both 64-row halves multiply each run of the
    tile's strips (16 columns) that has a live strip; a run is as many strips
    (8, 4, 2 or 1) as lie in one block."""
    rows, cols = min(block[0], depth), min(block[1], out_cols)
    run = 8 if cols >= out_cols else max(p for p in (1, 2, 4, 8) if cols % (16 * p) == 0)
    stage = 32 if rows % 32 == 0 or rows >= depth else 16
    row_groups = 2 * math.ceil(m / 256) if takes_tall_tiles(m, stage, tall) else math.ceil(m / 128)
    steps = math.ceil(rows / stage) * stage // 16
    total = 0
    for col0 in range(0, out_cols, 128):
        for segment in range(live.shape[0]):
            strips = [bool(live[segment, c // cols]) for c in range(col0, min(out_cols, col0 + 128), 16)]
            runs = sum(any(strips[r:r + run]) for r in range(0, len(strips), run))
            total += steps * 2 * runs * run * 16
    return row_groups * total


def takes_tall_tiles(m, stage, tall):
    """The launchers' rule for tall tiles (256 x 128) when they are switched
    on: stages of 32, more than 128 rows and one split (every case here with
    more than 128 rows has one)."""
    return tall and stage == 32 and m > 128


def oriented(product, k, n, block, live):
    """(depth, output columns, block, live) of the forward product or dx, as
    warpgroup_columns takes them."""
    return (k, n, block, live) if product == "forward" else (n, k, block[::-1], live.T)


WARPGROUP_CASES = [  # (m, k, n, block): every run width, both stage depths, short and split lists
    (130, 128, 192, (32, 64)),   # runs of 4 strips (n64) / dx 2, a last row tile of 2 rows
    (150, 200, 136, (64, 32)),   # runs of 2 (n32) / dx 4, a short last segment, a second column tile 8 wide
    (64, 48, 272, (16, 48)),     # runs of 1 (n16), stages of 16 (forward) / 16 (dx: 48-wide blocks)
    (257, 96, 160, (16, 16)),    # runs of 1, three row tiles
    (260, 64, 64, (128, 128)),   # one block wider than W: the whole tile (n128)
    (70, 64, 256, (32, 128)),    # forward runs of 8: whole-tile products per 128-wide block
    (8, 4160, 16, (16, 16)),     # one tile's list split 8 ways (forward)
    (130, 96, 240, (48, 80)),    # runs of 1 both ways, blocks straddling strips of tiles
]


@pytest.mark.parametrize("shape_and_block", WARPGROUP_CASES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("schedule", [0, 2], ids=["in-order", "shuffled"])
def test_warpgroup_products_multiply_live_blocks_only(emulator, shape_and_block, dtype, schedule):
    """With the warpgroup tile on (a Hopper device), the forward product and
    dx of the half types run as wgmma products from wgmma's swizzled layouts
    (W N-major, W^T K-major): the reference's result (block factors 1, 2 and
    -0.5: 0/1 stages and stages rescaled in shared memory; NaN in dead
    blocks), no mma.sync, and the wgmma columns restated from the mask (dW:
    its own test). The emulation runs a product when a wait
    retires it, reading shared memory then, so a buffer refilled before every
    warp's products reading it were waited for shows in the results."""
    check_warpgroup_products(emulator, shape_and_block, dtype, schedule, tall=False)


TALL_CASES = WARPGROUP_CASES + [
    (520, 64, 256, (32, 64)),    # two tall tiles and a third of 8 rows, two column tiles
    (384, 96, 136, (96, 16)),    # one and a half tall tiles, runs of 1, a column tile 8 wide
]


@pytest.mark.parametrize("shape_and_block", TALL_CASES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-b{s[3][0]}x{s[3][1]}")
@pytest.mark.parametrize("schedule", [0, 2], ids=["in-order", "shuffled"])
def test_warpgroup_tall_tiles_multiply_live_blocks_only(emulator, shape_and_block, schedule):
    """The same with tall tiles switched on: two warpgroups of a thread
    block share each stage of W (one rescales it for both), each
    multiplying its own 128 rows of the tile's 256 (rows past the output's
    end: zeros, never stored), where a product takes them (stages of 32,
    more than 128 rows); the grid then has half the row tiles."""
    m = shape_and_block[0]
    check_warpgroup_products(emulator, shape_and_block, "bfloat16", schedule, tall=True)
    stage = 32 if shape_and_block[3][0] % 32 == 0 or shape_and_block[3][0] >= shape_and_block[1] else 16
    if takes_tall_tiles(m, stage, True) and math.ceil(m / 128) > math.ceil(m / 256):
        emulator.lib.emu_reset_stats()
        emulator.lib.emu_set_warpgroup_tall_tiles(0)
        mask, _, products = matmul_case(tuple(shape_and_block[:3]), shape_and_block[3], "bfloat16", "block",
                                        density=0.5)
        _, a, b, out_shape, _ = products[0]
        emulator.matmul("forward", a, b, mask, "block", shape_and_block[3], tuple(shape_and_block[:3]),
                        np.full(out_shape, np.nan, a.dtype), True)
        blocks_short = emulator.stats()["blocks"]
        emulator.lib.emu_reset_stats()
        emulator.lib.emu_set_warpgroup_tall_tiles(1)
        emulator.matmul("forward", a, b, mask, "block", shape_and_block[3], tuple(shape_and_block[:3]),
                        np.full(out_shape, np.nan, a.dtype), True)
        assert emulator.stats()["blocks"] < blocks_short, "the tall tiles' grid was not taken"


def check_warpgroup_products(emulator, shape_and_block, dtype, schedule, tall):
    """The forward product and dx of one case on the warpgroup tile (tall
    tiles or not) against the reference and the restated wgmma columns,
    then the three products as run_matmul checks them."""
    *shape, block = shape_and_block
    m, k, n = shape
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    emulator.lib.emu_set_warpgroup_tall_tiles(int(tall))
    emulator.lib.emu_set_schedule(schedule, 99)
    mask, element, products = matmul_case(tuple(shape), block, dtype, "block", density=0.5)
    for product, a, b, out_shape, depth in products[:2]:
        assert emulator.matmul_uses_pipeline(product, dtype, tuple(shape), block, "block")
        emulator.lib.emu_reset_stats()
        out = emulator.matmul(product, a, b, mask, "block", block, tuple(shape), np.full(out_shape, np.nan, a.dtype),
                              True)
        stats = emulator.stats()
        assert stats["mma_syncs"] == 0, product
        assert stats["warpgroup_mma_columns"] == warpgroup_columns(m, *oriented(product, k, n, block, mask != 0),
                                                                   tall=tall)
        expected, bound, _ = _matmul(MATMUL_OPS[product], a.astype(np.float64), np.nan_to_num(b.astype(np.float64)),
                                     mask.astype(np.float64), {"block_rows": block[0], "block_cols": block[1]})
        check(out, expected, bound, depth, dtype, True, f"{product} {dtype}")
    run_matmul(emulator, tuple(shape), block, dtype, True, "block", density=0.5)


WHOLE_LINE_BLOCKS = [(16, 16), (32, 32), (64, 64), (48, 80)]


@pytest.mark.parametrize("block", WHOLE_LINE_BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
def test_warpgroup_copies_are_whole_lines(emulator, block):
    """Each quarter warp's cp.async copies on the warpgroup tile (dW's
    partly live tiles: the other products come by tensor copies) read whole
    32-byte sectors and land in one 128-byte line of shared memory: on the
    H100 each such quarter warp is one L2 request, and the first layout
    (one 16-byte column of 8 rows per quarter warp) split every request
    into a half-used sector and ran at a third of the speed. Stages of 16
    (blocks of 16 and 48 rows) and 32, both operands' layouts, partly live
    tiles; rows of whole sectors (the dimensions multiples of 16)."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    emulator.lib.emu_set_copy_line_check(1)
    shape = (192, 256, 320)
    mask, _, products = matmul_case(shape, block, "bfloat16", "block", density=0.5)
    for name, a, b, out_shape, _ in products:
        if name == "grad_weight":
            emulator.lib.emu_reset_stats()
            emulator.matmul(name, a, b, mask, "block", block, shape, np.full(out_shape, np.nan, a.dtype), True)
            stats = emulator.stats()
            assert stats["warpgroup_mma_columns"] > 0 and stats["async_copies"] > 0, stats


@pytest.mark.parametrize("block", WHOLE_LINE_BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("product", ["forward", "grad_input"])
def test_warpgroup_forward_and_dx_stage_by_tensor_copies_only(emulator, product, block):
    """On the warpgroup tile the forward product and dx bring every stage,
    A and W's live runs, by tensor copies: no thread issues a cp.async
    (partly live tiles, runs of 16 to 128 columns); the results and the
    reads (no dead block) are checked as everywhere."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    shape = (192, 256, 320)
    mask, _, products = matmul_case(shape, block, "bfloat16", "block", density=0.5)
    for name, a, b, out_shape, _ in products:
        if name == product:
            emulator.lib.emu_reset_stats()
            emulator.matmul(product, a, b, mask, "block", block, shape, np.full(out_shape, np.nan, a.dtype), True)
            stats = emulator.stats()
            assert stats["warpgroup_mma_columns"] > 0 and stats["tensor_copies"] > 0, stats
            assert stats["async_copies"] == 0, stats


@pytest.mark.parametrize("refused", [False, True], ids=["maps-made", "maps-refused"])
def test_warpgroup_launches_count_refused_tensor_maps(emulator, refused):
    """A launch chosen for the warpgroup tile whose tensor maps the driver
    refuses takes the pipelined tile (the reference's results, no wgmma) and
    is counted, which tests/gpu asserts never happens; with the maps made,
    none is counted."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    emulator.lib.emu_set_tensor_maps_refused(int(refused))
    before = emulator.lib.emu_tensor_map_refusals()
    run_matmul(emulator, (192, 256, 320), (32, 64), "bfloat16", True, "block", density=0.5)
    assert emulator.lib.emu_tensor_map_refusals() - before == (3 if refused else 0)
    assert (emulator.stats()["warpgroup_mmas"] == 0) == refused  # dW's, the last product run


@pytest.mark.parametrize("block", [(16, 32), (32, 64), (32, 16)], ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("product", ["forward", "grad_input"])
def test_warpgroup_whole_tiles_take_full_width_products(emulator, product, block):
    """Where W's blocks are narrower than a tile, the tiles whose every listed
    segment is live across all 128 output columns (here the first column
    tile) take one 128-wide wgmma per step and half (a second launch), the
    others one per live run: the product count restated per tile, and the
    reference's result."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    rng = np.random.default_rng(4)
    m, depth, out_cols = 130, 64, 264
    k, n = (depth, out_cols) if product == "forward" else (out_cols, depth)
    grid = (math.ceil(k / block[0]), math.ceil(n / block[1]))
    live = rng.random(grid) < 0.5
    if product == "forward":
        live[:, :128 // block[1]] = True
        live[0, -1] = True
    else:
        live[:128 // block[0], :] = True
        live[-1, 0] = True
    mask = (live * rng.choice([1.0, 2.0], grid)).astype(np.float32)
    a = rng.standard_normal((m, k) if product == "forward" else (m, n)).astype(np.float16)
    w = rng.standard_normal((k, n)).astype(np.float16)
    emulator.lib.emu_reset_stats()
    y = emulator.matmul(product, a, w, mask, "block", block, (m, k, n), np.full((m, out_cols), np.nan, np.float16),
                        True)
    _, _, out_block, out_live = oriented(product, k, n, block, live)
    stage = 32 if out_block[0] % 32 == 0 else 16
    steps = math.ceil(out_block[0] / stage) * stage // 16
    run = max(p for p in (1, 2, 4, 8) if out_block[1] % (16 * p) == 0)
    products = 0
    for col0 in range(0, out_cols, 128):
        for segment in range(out_live.shape[0]):
            strips = [bool(out_live[segment, c // out_block[1]]) for c in range(col0, min(out_cols, col0 + 128), 16)]
            products += 1 if col0 == 0 else sum(any(strips[r:r + run]) for r in range(0, len(strips), run))
    stats = emulator.stats()
    assert stats["warpgroup_mmas"] == math.ceil(m / 128) * steps * 2 * products
    assert stats["warpgroup_mma_columns"] == warpgroup_columns(m, *oriented(product, k, n, block, live))
    expected, bound, _ = _matmul(MATMUL_OPS[product], a.astype(np.float64), w.astype(np.float64),
                                 mask.astype(np.float64), {"block_rows": block[0], "block_cols": block[1]})
    check(y, expected, bound, depth, "float16", True, f"{product} float16")


@pytest.mark.parametrize("block", [(32, 32), (16, 48), (32, 128), (128, 16)], ids=lambda b: f"b{b[0]}x{b[1]}")
def test_warpgroup_nan_reaches_live_blocks_only(emulator, block):
    """A NaN in x (Inf in dy for dx) spreads through the live blocks it meets
    and never through a dead one (nor through a dead run of a partly live
    tile), and a NaN block factor makes exactly its block's output columns
    NaN (the list marks it scaled; the stage is rescaled)."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    rng = np.random.default_rng(21)
    m, k, n = 40, 160, 256
    mask, _ = make_masks(rng, k, n, block, 0.5, "block")
    mask = mask.astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float16)
    x, dy = rng.standard_normal((m, k)), rng.standard_normal((m, n))
    x[3, 40] = np.nan
    dy[5, 100] = np.inf
    block_live = np.repeat(np.repeat(mask != 0, block[0], 0), block[1], 1)[:k, :n]

    def run(product, a):
        return emulator.matmul(product, a.astype(np.float16), w, mask, "block", block, (m, k, n),
                               np.zeros((m, n if product == "forward" else k), np.float16), True).astype(np.float64)

    y, dx = run("forward", x), run("grad_input", dy)
    np.testing.assert_array_equal(np.isnan(y[3]), block_live[40])
    assert np.isfinite(np.delete(y, 3, axis=0)).all()
    np.testing.assert_array_equal(~np.isfinite(dx[5]), block_live[:, 100])
    assert np.isfinite(np.delete(dx, 5, axis=0)).all()
    row, col = np.argwhere(mask != 0)[0]
    mask[row, col] = np.nan
    x[3, 40], dy[5, 100] = 0.0, 0.0
    for product, a, axis, (start, size) in (("forward", x, 0, (col, block[1])), ("grad_input", dy, 0, (row, block[0]))):
        out = run(product, a)
        nan_columns = np.zeros(out.shape[1], bool)
        nan_columns[start * size:(start + 1) * size] = True
        np.testing.assert_array_equal(np.isnan(out).any(axis=axis), nan_columns, err_msg=product)
        assert np.isnan(out[:, nan_columns]).all(), product


@pytest.mark.parametrize("shape, block, whole_columns", [
    ((150, 200, 136), (64, 32), 0), ((64, 272, 144), (48, 16), 0), ((2080, 64, 48), (16, 16), 0),
    ((96, 256, 256), (32, 128), 0), ((40, 256, 384), (16, 32), 128), ((2080, 128, 256), (32, 64), 128)],
    ids=["runs-of-2", "runs-of-1", "split-batch", "whole-runs", "whole-and-partly-live-tiles", "split-whole-tiles"])
@pytest.mark.parametrize("level", ["block", "element"])
def test_warpgroup_weight_gradient_multiplies_live_halves(emulator, shape, block, whole_columns, level):
    """dW on the warpgroup tile (x^T staged M-major, dy N-major): each 64-row
    half of a tile multiplies the runs of its strips in which a 16 x 16
    fragment is live, over the whole batch (split or not), and a tile whose
    every strip holds a live fragment in both halves takes one 128-wide
    product per half (here W's first whole_columns columns are all live):
    the wgmma products and columns restated from the mask, no mma.sync, and
    the reference's result, zero in dead blocks."""
    m, k, n = shape
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    rng = np.random.default_rng(8)
    grid = (math.ceil(k / block[0]), math.ceil(n / block[1]))
    live = rng.random(grid) < 0.4
    live[:, :whole_columns // block[1]] = True
    blocks = live * rng.choice([1.0, 2.0, -0.5], grid)
    element = np.repeat(np.repeat(blocks, block[0], 0), block[1], 1)[:k, :n]
    if level == "element":
        element = element * (rng.random((k, n)) < 0.8)
    mask = (element if level == "element" else blocks).astype(np.float32)
    x, dy = rng.standard_normal((m, k)).astype(np.float16), rng.standard_normal((m, n)).astype(np.float16)
    emulator.lib.emu_reset_stats()
    dw = emulator.matmul("grad_weight", x, dy, mask, level, block, shape, np.full((k, n), np.nan, np.float16), True)
    block_live = np.repeat(np.repeat(live, block[0], 0), block[1], 1)[:k, :n]
    cols = min(block[1], n)
    run = 8 if cols >= n else max(p for p in (1, 2, 4, 8) if cols % (16 * p) == 0)
    columns = products = 0
    for row0 in range(0, k, 128):
        for col0 in range(0, n, 128):
            halves = [[any(block_live[r, c] for r in range(row0 + 64 * half, min(k, row0 + 64 * half + 64), 16))
                       for c in range(col0, min(n, col0 + 128), 16)] for half in range(2)]
            if run < 8 and all(len(strips) == 8 and all(strips) for strips in halves):
                products, columns = products + 2, columns + 2 * 128
                continue
            for strips in halves:
                runs = sum(any(strips[r:r + run]) for r in range(0, len(strips), run))
                products, columns = products + runs, columns + runs * run * 16
    stats = emulator.stats()
    assert stats["mma_syncs"] == 0
    assert stats["warpgroup_mmas"] == math.ceil(m / 32) * 2 * products
    assert stats["warpgroup_mma_columns"] == math.ceil(m / 32) * 2 * columns
    expected, bound, _ = _matmul(MATMUL_OPS["grad_weight"], x.astype(np.float64), dy.astype(np.float64),
                                 mask.astype(np.float64), {"block_rows": block[0], "block_cols": block[1]})
    check(dw, expected, bound, m, "float16", True, "grad_weight float16")
    assert (dw[element == 0] == 0).all()


def test_warpgroup_switch_and_rule(emulator):
    """On a device without the warpgroup tile every product keeps mma.sync;
    on one with it the forward product takes it by default and dx and dW
    once all three are chosen; half types only: float32 (TF32 cannot take W
    N-major) keeps mma.sync."""
    rng = np.random.default_rng(2)
    m, k, n, block = 64, 64, 64, (16, 16)
    mask = np.ones((4, 4), np.float32)
    for product, dtype, setting, uses_warpgroup in (("forward", "float16", WARPGROUP_NONE, False),
                                                    ("forward", "float16", WARPGROUP_FORWARD, True),
                                                    ("grad_input", "bfloat16", WARPGROUP_FORWARD, False),
                                                    ("grad_weight", "float16", WARPGROUP_FORWARD, False),
                                                    ("grad_input", "bfloat16", WARPGROUP_ALL, True),
                                                    ("grad_weight", "float16", WARPGROUP_ALL, True),
                                                    ("forward", "float32", WARPGROUP_ALL, False)):
        emulator.lib.emu_set_warpgroup_mma(setting)
        a, b = (rng.standard_normal(s).astype(np_dtype(dtype)) for s in ((m, k), (k, n)))
        emulator.lib.emu_reset_stats()
        emulator.matmul(product, a, b, mask, "block", block, (m, k, n), np.full((m, n), np.nan, a.dtype), True)
        stats = emulator.stats()
        assert (stats["warpgroup_mma_columns"] > 0) == uses_warpgroup, (product, dtype, setting)
        assert (stats["mma_syncs"] > 0) != uses_warpgroup, (product, dtype, setting)


def test_matmul_without_tensor_cores_on_the_device(emulator):
    """On a device below compute capability 8.0 every product runs on CUDA cores."""
    emulator.lib.emu_set_device_tensor_cores(0)
    assert not emulator.matmul_uses_tensor_cores("forward", "float16", (8, 64, 64), (16, 16))
    m, k, n = 50, 64, 64
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((m, k)).astype(np.float16), rng.standard_normal((k, n)).astype(np.float16)
    mask = np.ones((4, 4), np.float32)
    y = emulator.matmul("forward", x, w, mask, "block", (16, 16), (m, k, n), np.full((m, n), np.nan, np.float16), True)
    assert emulator.stats()["mma_syncs"] == 0
    expected = x.astype(np.float64) @ w.astype(np.float64)
    check(y, expected, np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)), k, "float16", False, "forward")


# -- masked_conv2d --------------------------------------------------------------------------------------

# (batch, h, w, cin, cout, (kh, kw), stride, dilation, (top, bottom, left, right))
CONV_GEOMETRIES = [
    (1, 7, 7, 3, 17, (3, 3), 1, 1, (1, 1, 1, 1)),
    (2, 9, 8, 17, 32, (3, 3), 2, 1, (1, 1, 1, 1)),
    (1, 10, 9, 16, 24, (3, 2), 1, 2, (0, 0, 0, 0)),
    (1, 8, 9, 20, 33, (1, 5), 1, 1, (0, 0, 2, 2)),
    (1, 6, 7, 8, 8, (3, 3), 2, 1, (2, 0, 0, 3)),
    (2, 12, 11, 32, 136, (3, 3), 1, 1, (1, 1, 1, 1)),  # pipelined forward: 3 row tiles, 2 channel tiles
    (1, 13, 14, 24, 40, (3, 3), 2, 2, (2, 1, 1, 2)),   # pipelined forward: strided, dilated, a short input block
]
# (filter block (in, out), output tile (h, w)): channel blocks on multiples of
# 16 take the tensor cores; 15-pixel tiles make 16-row strips straddle tiles.
CONV_BLOCKS = [((16, 8), (4, 8)), ((16, 16), (3, 5)), ((32, 48), (8, 8))]
CONV_NUMERICS = [("float64", False), ("float32", False), ("float32", True), ("float16", True), ("bfloat16", True),
                 ("bfloat16", False)]


def conv_out_size(size, k, stride, dilation, before, after):
    return (size + before + after - (k - 1) * dilation - 1) // stride + 1


def conv_case(geometry, block, tile, dtype, level, with_output_mask, seed=0):
    """(mask, element-level filter factors, output mask or None, Conv2DGeometry fields, reference attrs,
    [(product, a, b, out shape, depth)]) of one case."""
    batch, h, w, cin, cout, (kh, kw), stride, dilation, pads = geometry
    rng = np.random.default_rng([batch, h, w, cin, cout, kh, *block, *tile, seed, DTYPE_CODES[dtype]])
    t = np_dtype(dtype)
    out_h = conv_out_size(h, kh, stride, dilation, pads[0], pads[1])
    out_w = conv_out_size(w, kw, stride, dilation, pads[2], pads[3])
    blocks, per_tap = make_masks(rng, cin, cout, block, 0.6, "block", values=(1.0, 2.0))
    element = np.broadcast_to(per_tap, (kh, kw, cin, cout)).copy()
    if level == "element":
        element = element * (rng.random(element.shape) < 0.8)
    mask = np.ascontiguousarray(element if level == "element" else blocks, dtype=np.float32)
    output_mask = None
    if with_output_mask:
        tiles = rng.random((batch, math.ceil(out_h / tile[0]), math.ceil(out_w / tile[1]))) < 0.5
        output_mask = np.ascontiguousarray(np.repeat(np.repeat(tiles, tile[0], 1), tile[1], 2)[:, :out_h, :out_w]
                                           * rng.choice([1.0, 2.5], (batch, out_h, out_w)), dtype=np.float32)
    x = rng.standard_normal((batch, h, w, cin)).astype(t)
    filters = rng.standard_normal((kh, kw, cin, cout))
    f_nan = np.where(element == 0, np.nan, filters).astype(t)  # masked-out filters never leak
    dy = rng.standard_normal((batch, out_h, out_w, cout))
    if output_mask is not None:  # nor does dy where the output mask is zero
        dy = np.where(output_mask[..., None] == 0, np.nan, dy)
    dy = dy.astype(t)
    fields = (batch, h, w, cin, kh, kw, cout, stride, stride, dilation, dilation, pads[0], pads[2], out_h, out_w,
              *block, *tile)
    attrs = {"strides": [stride, stride], "dilations": [dilation, dilation], "padding": "EXPLICIT",
             "explicit_paddings": list(pads), "in_channel_block": block[0], "out_channel_block": block[1],
             "use_output_mask": with_output_mask}
    return mask, element, output_mask, fields, attrs, [
        ("forward", x, f_nan, dy.shape, kh * kw * cin), ("grad_input", dy, f_nan, x.shape, kh * kw * cout),
        ("grad_weight", x, dy, f_nan.shape, batch * out_h * out_w)]


def run_conv(emulator, geometry, block, tile, dtype, tensor_cores, level, with_output_mask, seed=0):
    """The three products of one case, checked against the reference."""
    cin, cout = geometry[3], geometry[4]
    t = np_dtype(dtype)
    mask, element, output_mask, fields, attrs, products = conv_case(geometry, block, tile, dtype, level,
                                                                    with_output_mask, seed)
    aligned = lambda size, channels: size % 16 == 0 or size >= channels  # noqa: E731
    pipelined = (tensor_cores and dtype in ("float16", "bfloat16", "float32") and cin % 8 == 0 and cout % 8 == 0
                 and aligned(block[0], cin) and aligned(block[1], cout))
    rule = {"forward": aligned(block[1], cout), "grad_input": aligned(block[0], cin),
            "grad_weight": aligned(block[0], cin) and aligned(block[1], cout)}
    x, f_nan, dy = products[0][1], products[0][2], products[1][1]
    x64, f64, dy64 = x.astype(np.float64), f_nan.astype(np.float64), dy.astype(np.float64)
    om64 = np.zeros((0,)) if output_mask is None else output_mask.astype(np.float64)
    outputs = {}
    for product, a, b, out_shape, depth in products:
        emulator.lib.emu_reset_stats()
        out = emulator.conv2d(product, a, b, mask, level, fields, np.full(out_shape, np.nan, t), output_mask,
                              tensor_cores)
        tensor_path = tensor_cores and rule[product] and dtype != "float64"
        assert emulator.conv2d_uses_tensor_cores(product, dtype, fields, tensor_cores) == tensor_path
        assert emulator.conv2d_uses_pipeline(product, dtype, fields, level, tensor_cores) == (
            pipelined and (product == "grad_weight" or level == "block"))
        if not tensor_path:
            assert emulator.stats()["mma_syncs"] == 0, f"{product}: a tensor-core kernel ran"
        expected, bound, _ = _conv(CONV_OPS[product], x64, f64, mask.astype(np.float64), om64, dy64, attrs)
        check(out, expected, bound, depth, dtype, tensor_path, f"{product} {dtype}")
        outputs[product] = out
    assert (outputs["grad_weight"][element == 0] == 0).all(), "dfilters not zero where the mask is"
    return outputs


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES,
                         ids=lambda g: f"{g[0]}x{g[1]}x{g[2]}x{g[3]}-{g[5][0]}x{g[5][1]}x{g[4]}-s{g[6]}-d{g[7]}")
@pytest.mark.parametrize("block_and_tile", CONV_BLOCKS, ids=lambda b: f"b{b[0][0]}x{b[0][1]}-t{b[1][0]}x{b[1][1]}")
@pytest.mark.parametrize("dtype, tensor_cores", CONV_NUMERICS,
                         ids=[f"{d}-{'tc' if t else 'cc'}" for d, t in CONV_NUMERICS])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
def test_conv_products(emulator, geometry, block_and_tile, dtype, tensor_cores, with_output_mask):
    level = "element" if (CONV_GEOMETRIES.index(geometry) + CONV_BLOCKS.index(block_and_tile)) % 2 else "block"
    run_conv(emulator, geometry, *block_and_tile, dtype, tensor_cores, level, with_output_mask)


def stage_mmas(block, channels, dtype):
    """The mma.sync depth steps of a segment `block` deep (stages of 32 where
    blocks are multiples of 32 or whole, else 16; TF32: stages of 16, a step
    per 8 of depth)."""
    if dtype == "float32":
        return math.ceil(block / 16) * 2
    stage = 32 if block % 32 == 0 or block >= channels else 16
    return math.ceil(block / stage) * stage // 16


def tiled_pixels(batch, h, w, tile_h, tile_w):
    """A batch's pixels tile by tile (TiledPixel): per tile (n, tile row,
    tile column) its tile_h x tile_w places in raster order, each an (n, y,
    x), or None past the image's bottom or right edge."""
    tiles_h, tiles_w = math.ceil(h / tile_h), math.ceil(w / tile_w)
    pixels = []
    for tile in range(batch * tiles_h * tiles_w):
        n, ty, tx = tile // (tiles_h * tiles_w), tile // tiles_w % tiles_h, tile % tiles_w
        for q in range(tile_h * tile_w):
            y, x = ty * tile_h + q // tile_w, tx * tile_w + q % tile_w
            pixels.append((n, y, x) if y < h and x < w else None)
    return pixels


def tile_order_pixels(fields):
    """The output pixels tile by tile (tiled_pixels), the order of the
    forward conv's rows (and of dfilters' depth under an output mask)."""
    batch, *_, out_h, out_w, _, _, tile_h, tile_w = fields
    return tiled_pixels(batch, out_h, out_w, min(tile_h, out_h), min(tile_w, out_w))


def dx_row_pixels(fields, output_mask):
    """The input pixels of the pipelined dx's rows: in raster order, or under
    an output mask tile by tile over the input tiles the output tiles step
    over (InputTiles: tile x stride, at most the input's extent)."""
    batch, h, w, _, _, _, _, stride_h, stride_w, *_, out_h, out_w, _, _, tile_h, tile_w = fields
    if output_mask is None:
        return [(n, y, x) for n in range(batch) for y in range(h) for x in range(w)]
    return tiled_pixels(batch, h, w, min(min(tile_h, out_h) * stride_h, h), min(min(tile_w, out_w) * stride_w, w))


def conv_row_activity(fields, output_mask):
    """Whether each row of the forward conv's implicit GEMM is an output
    pixel of an active tile: rows are output pixels tile by tile
    (tile_order_pixels; a tile of the output mask with no live pixel is
    inactive), padded to 128s."""
    *_, out_h, out_w, _, _, tile_h, tile_w = fields
    tile_h, tile_w = min(tile_h, out_h), min(tile_w, out_w)

    def tile_on(n, oy, ox):
        ty, tx = oy // tile_h * tile_h, ox // tile_w * tile_w
        return output_mask is None or (output_mask[n, ty:ty + tile_h, tx:tx + tile_w] != 0).any()
    active = [pixel is not None and tile_on(*pixel) for pixel in tile_order_pixels(fields)]
    return active + [False] * (-len(active) % 128)


def forward_conv_lists_work(fields, live, output_mask, entry_work):
    """The forward conv's busy pairs of a 128-row tile (conv_row_activity)
    and a 128-channel tile, each as the tensor-core work of its list's
    entries in order, restated: the (tap, input block) segments with a live
    block in the tile's channels, taps outermost; entry_work(rows, strips,
    input_block) is one entry's work, given the tile's 128 row activities
    and its 8 16-channel strips' liveness (False past the channels)."""
    *_, cin, kh, kw, cout, _, _, _, _, _, _, _, _, in_block, out_block, _, _ = fields
    out_block = min(out_block, cout)
    active = conv_row_activity(fields, output_mask)
    pairs = []
    for row0 in range(0, len(active), 128):
        rows = active[row0:row0 + 128]
        if not any(rows):
            continue
        for col0 in range(0, cout, 128):
            work = []
            for _ in range(kh * kw):
                for i in range(live.shape[0]):
                    strips = [c < cout and bool(live[i, c // out_block]) for c in range(col0, col0 + 128, 16)]
                    if any(strips):
                        work.append(entry_work(rows, strips, i))
            pairs.append(work)
    return pairs


def busiest_split(lists_work, splits):
    """The most work one thread block takes where each list (of the work of
    its entries or stages) splits into runs of ceil(entries / splits)
    (pl::SplitRun)."""
    most = 0
    for work in lists_work:
        run = max(1, math.ceil(len(work) / splits))
        most = max([most] + [sum(work[first:first + run]) for first in range(0, len(work), run)])
    return most


def pipelined_conv_entry_mmas(fields, dtype):
    """A pipelined forward conv list entry's mma.sync calls (per warp): each
    depth step (stage_mmas) multiplies every live 16-channel strip in every
    16-row strip holding an active row, in 2 halves."""
    *_, cin, _, _, _, _, _, _, _, _, _, _, _, in_block, _, _, _ = fields
    per_segment = stage_mmas(min(in_block, cin), cin, dtype)
    return lambda rows, strips, _: per_segment * sum(any(rows[s:s + 16]) for s in range(0, 128, 16)) * sum(strips) * 2


def pipelined_conv_mma_count(fields, live, output_mask, dtype="bfloat16"):
    """The mma.sync calls (per warp) of the pipelined forward conv, restated
    over its lists (forward_conv_lists_work)."""
    return sum(map(sum, forward_conv_lists_work(fields, live, output_mask, pipelined_conv_entry_mmas(fields, dtype))))


def dx_rows_meeting_live_output(fields, output_mask):
    """For each tap (ky, kx), in order, whether each row of the pipelined dx
    (dx_row_pixels) meets a live output pixel of the output mask there."""
    *_, kh, kw, _, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, out_h, out_w, _, _, _, _ = fields

    def meets(pixel, ky, kx):
        if pixel is None:
            return False
        n, iy, ix = pixel
        sy, sx = iy + pad_top - ky * dilation_h, ix + pad_left - kx * dilation_w
        oy, ox = sy // stride_h, sx // stride_w
        return (sy % stride_h == 0 and sx % stride_w == 0 and 0 <= oy < out_h and 0 <= ox < out_w
                and output_mask[n, oy, ox] != 0)
    rows = dx_row_pixels(fields, output_mask)
    return [[meets(p, ky, kx) for p in rows] for ky in range(kh) for kx in range(kw)]


def pipelined_conv_dx_mma_count(fields, live, output_mask, dtype="bfloat16"):
    """The mma.sync calls (per warp) of the pipelined conv dx, restated: for
    every 128-row, 128-channel tile (rows: dx_row_pixels), every (tap, output
    block) segment with a live block in the tile's input channels
    multiplies, each depth step, every live 16-channel strip in the row
    strips of 16 where, under an output mask, a pixel meets a live output
    pixel at the segment's tap (dx_rows_meeting_live_output; all 8 without
    one), in 2 halves."""
    *_, cin, kh, kw, cout, _, _, _, _, _, _, _, _, in_block, out_block, _, _ = fields
    in_block, out_block = min(in_block, cin), min(out_block, cout)
    per_segment = stage_mmas(out_block, cout, dtype)
    rows = len(dx_row_pixels(fields, output_mask))
    meets = None if output_mask is None else dx_rows_meeting_live_output(fields, output_mask)
    total = 0
    for row0 in range(0, rows, 128):
        for tap in range(kh * kw):
            row_strips = 8 if meets is None else sum(any(meets[tap][row0 + 16 * s:row0 + 16 * s + 16])
                                                     for s in range(8))
            for col0 in range(0, cin, 128):
                for j in range(live.shape[1]):
                    strips = sum(c < cin and bool(live[c // in_block, j]) for c in range(col0, col0 + 128, 16))
                    total += per_segment * strips * row_strips * 2
    return total


@pytest.mark.parametrize("geometry, block, tile", [(CONV_GEOMETRIES[5], (16, 16), (3, 5)),
                                                   (CONV_GEOMETRIES[6], (32, 48), (4, 4))], ids=["b16x16", "b32x48"])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pipelined_conv_multiplies_live_fragments_only(emulator, geometry, block, tile, with_output_mask, dtype):
    """The pipelined forward conv's and dx's tensor-core work is what the live
    filter blocks (and, forward, active output tiles) need: their mma.sync
    counts match the counts restated from the masks (float32 as TF32)."""
    mask, _, output_mask, fields, _, products = conv_case(geometry, block, tile, dtype, "block", with_output_mask)
    _, x, f_nan, out_shape, _ = products[0]
    assert emulator.conv2d_uses_pipeline("forward", dtype, fields, "block")
    emulator.lib.emu_reset_stats()
    emulator.conv2d("forward", x, f_nan, mask, "block", fields, np.full(out_shape, np.nan, x.dtype), output_mask, True)
    assert emulator.stats()["mma_syncs"] == pipelined_conv_mma_count(fields, mask != 0, output_mask, dtype)
    _, dy, _, dx_shape, _ = products[1]
    assert emulator.conv2d_uses_pipeline("grad_input", dtype, fields, "block")
    emulator.lib.emu_reset_stats()
    emulator.conv2d("grad_input", dy, f_nan, mask, "block", fields, np.full(dx_shape, np.nan, x.dtype), output_mask,
                    True)
    assert emulator.stats()["mma_syncs"] == pipelined_conv_dx_mma_count(fields, mask != 0, output_mask, dtype)


def dx_live_tiles_and_taps(fields, output_mask):
    """For each 128-row tile of the pipelined dx (rows: dx_row_pixels),
    whether some row of it meets a live output pixel at each tap."""
    meets = dx_rows_meeting_live_output(fields, output_mask)
    return [[any(by_row[r:r + 128]) for by_row in meets] for r in range(0, len(meets[0]), 128)]


@pytest.mark.parametrize("geometry", [(2, 32, 32, 16, 24, (3, 3), 1, 1, (1, 1, 1, 1)),
                                      (2, 31, 30, 16, 24, (3, 3), 2, 1, (1, 1, 1, 1))], ids=["stride-1", "stride-2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pipelined_conv_dx_skips_dead_row_tiles(emulator, geometry, dtype):
    """Under a sparse output mask (three active 4 x 4 output tiles, factors
    0, 1 and 2) the pipelined dx takes its rows tile by tile over the input
    tiles the output tiles step over, and a 128-row tile walks only the list
    entries of the taps at which some row of it meets a live output pixel
    (none: it copies nothing, multiplies nothing and stores zeros): copies
    in proportion to those (row tile, tap) pairs (an output mask of ones
    leaves none dead), mma.sync calls restated, the reference's result (dy
    NaN wherever the output mask is zero)."""
    mask, _, output_mask, fields, attrs, products = conv_case(geometry, (16, 16), (4, 4), dtype, "block", True)
    _, dy, f_nan, dx_shape, depth = products[1]
    sparse = np.zeros_like(output_mask)
    for n, ty, tx in ((0, 0, 3), (1, 2, 1), (1, 3, 3)):
        window = sparse[n, ty * 4:ty * 4 + 4, tx * 4:tx * 4 + 4]  # a view: 4 x 3 at a 15-wide output's edge
        window[...] = (np.arange(16, dtype=np.float32).reshape(4, 4) % 3)[:, :window.shape[1]]
    dy = np.where(sparse[..., None] == 0, np.nan, np.nan_to_num(dy.astype(np.float64), nan=0.5)).astype(dy.dtype)
    live_taps = dx_live_tiles_and_taps(fields, sparse)
    pairs, live_pairs = len(live_taps) * 9, sum(map(sum, live_taps))
    assert sum(not any(taps) for taps in live_taps) > len(live_taps) // 2  # row tiles with no live tap
    assert any(0 < sum(taps) < 9 for taps in live_taps)  # and row tiles with some
    assert sum(map(sum, dx_live_tiles_and_taps(fields, np.ones_like(sparse)))) == pairs
    assert emulator.conv2d_uses_pipeline("grad_input", dtype, fields, "block")
    emulator.lib.emu_reset_stats()
    out = emulator.conv2d("grad_input", dy, f_nan, mask, "block", fields, np.full(dx_shape, np.nan, dy.dtype), sparse,
                          True)
    stats = emulator.stats()
    assert stats["mma_syncs"] == pipelined_conv_dx_mma_count(fields, mask != 0, sparse, dtype)
    emulator.lib.emu_reset_stats()
    emulator.conv2d("grad_input", np.nan_to_num(dy), f_nan, mask, "block", fields, np.full(dx_shape, np.nan, dy.dtype),
                    np.ones_like(sparse), True)
    assert stats["async_copies"] * pairs == emulator.stats()["async_copies"] * live_pairs
    expected, bound, _ = _conv(CONV_OPS["grad_input"], products[0][1].astype(np.float64), f_nan.astype(np.float64),
                               mask.astype(np.float64), sparse.astype(np.float64), dy.astype(np.float64), attrs)
    check(out, expected, bound, depth, dtype, True, f"grad_input {dtype}")


@pytest.mark.parametrize("geometry, block", [
    ((1, 16, 16, 16, 2048, (3, 3), 1, 1, (1, 1, 1, 1)), (16, 16)),  # 9 taps x 128 output blocks: 1152 entries
    ((1, 20, 20, 16, 16, (17, 17), 1, 1, (8, 8, 8, 8)), (16, 16)),  # 289 taps
], ids=["1152-entries", "289-taps"])
def test_pipelined_conv_dx_long_lists_walk_every_tap(emulator, geometry, block):
    """Where a dx tile's list is longer than 1024 entries or the filter has
    more than 256 taps (every filter block live here), the list is not cut
    to the live taps (its shared
    memory would not hold them): a row tile with a live tap walks it whole,
    one with none still walks nothing; the reference's result and the
    mma.sync calls restated (a dead tap's strips are still not
    multiplied)."""
    mask, _, output_mask, fields, attrs, products = conv_case(geometry, block, (4, 4), "bfloat16", "block", True)
    _, dy, f_nan, dx_shape, depth = products[1]
    mask = np.ones_like(mask)  # every block live: the lists are taps x output blocks long
    f_nan = np.nan_to_num(f_nan.astype(np.float32)).astype(f_nan.dtype)
    sparse = np.zeros_like(output_mask)
    sparse[0, 8, 5] = 1.0  # one live pixel, met from both sides of a row tile boundary: some taps of each
    dy = np.where(sparse[..., None] == 0, np.nan, np.nan_to_num(dy.astype(np.float64), nan=0.5)).astype(dy.dtype)
    live_taps = dx_live_tiles_and_taps(fields, sparse)
    walked = sum(map(any, live_taps))
    assert any(0 < sum(taps) < len(taps) for taps in live_taps)
    emulator.lib.emu_reset_stats()
    out = emulator.conv2d("grad_input", dy, f_nan, mask, "block", fields, np.full(dx_shape, np.nan, dy.dtype), sparse,
                          True)
    stats = emulator.stats()
    assert stats["mma_syncs"] == pipelined_conv_dx_mma_count(fields, mask != 0, sparse)
    emulator.lib.emu_reset_stats()
    emulator.conv2d("grad_input", np.nan_to_num(dy), f_nan, mask, "block", fields,
                    np.full(dx_shape, np.nan, dy.dtype), np.ones_like(sparse), True)
    assert stats["async_copies"] * len(live_taps) == emulator.stats()["async_copies"] * walked
    expected, bound, _ = _conv(CONV_OPS["grad_input"], products[0][1].astype(np.float64), f_nan.astype(np.float64),
                               mask.astype(np.float64), sparse.astype(np.float64), dy.astype(np.float64), attrs)
    check(out, expected, bound, depth, "bfloat16", True, "grad_input bfloat16")


@pytest.mark.parametrize("field, value", [(11, 1 << 30), (7, 1 << 30), (9, 1 << 29), (0, 1 << 30), (14, 1 << 30)],
                         ids=["pad-top", "stride", "tap-reach", "batch", "output-width"])
def test_pipelined_conv_needs_coordinates_under_2_30(emulator, field, value):
    """The pipelined conv kernels form pixel coordinates, a tap's reach and
    the batch index in 32 bits: a geometry with any of them at 2^30 or more
    (a dilation of 2^29 over 3 taps reaches past it) takes other kernels."""
    fields = [1, 8, 8, 16, 3, 3, 16, 1, 1, 1, 1, 1, 1, 8, 8, 16, 16, 4, 4]
    for product in ("forward", "grad_input", "grad_weight"):
        assert emulator.conv2d_uses_pipeline(product, "bfloat16", fields, "block")
        huge = list(fields)
        huge[field] = value
        assert not emulator.conv2d_uses_pipeline(product, "bfloat16", huge, "block")


def warpgroup_conv_entry_columns(fields):
    """The columns a warpgroup forward conv list entry's wgmma products span
    (summed per warpgroup): every 16 of the segment's depth in stages (32,
    or 16 for input blocks not on 32s), each 64-row half holding an active
    row multiplies each run of the tile's 16-channel strips that has a live
    strip; a run is as many strips (8, 4, 2 or 1) as lie in one block."""
    *_, cin, _, _, cout, _, _, _, _, _, _, _, _, in_block, out_block, _, _ = fields
    in_block, out_block = min(in_block, cin), min(out_block, cout)
    run = 8 if out_block >= cout else max(p for p in (1, 2, 4, 8) if out_block % (16 * p) == 0)
    stage = 32 if in_block % 32 == 0 or in_block >= cin else 16
    steps = math.ceil(in_block / stage) * stage // 16

    def columns(rows, strips, _):
        halves = sum(any(rows[h:h + 64]) for h in (0, 64))
        return steps * halves * sum(any(strips[r:r + run]) for r in range(0, 8, run)) * run * 16
    return columns


def warpgroup_conv_columns(fields, live, output_mask):
    """The columns the warpgroup forward conv's wgmma products span, restated
    over its lists (forward_conv_lists_work)."""
    return sum(map(sum, forward_conv_lists_work(fields, live, output_mask, warpgroup_conv_entry_columns(fields))))


def checked_forward_conv(emulator, x, filters, mask, output_mask, fields, attrs, dy, depth, dtype, warpgroup):
    """The emulated forward conv (block mask, on the pipelined kernels or,
    where `warpgroup`, the warpgroup tile, as the emulator was set), its
    output poisoned with NaN first, checked against the reference, and its
    tensor-core work against its lists' (forward_conv_lists_work): the
    whole, on the chosen tile only, and the busiest thread block's, the
    lists split as forward_conv_splits says. Returns the output."""
    assert emulator.conv2d_uses_pipeline("forward", dtype, fields, "block")
    emulator.lib.emu_reset_stats()
    out = emulator.conv2d("forward", x, filters, mask, "block", fields, np.full(dy.shape, np.nan, x.dtype),
                          output_mask, True)
    stats = emulator.stats()
    om64 = np.zeros((0,)) if output_mask is None else output_mask.astype(np.float64)
    expected, bound, _ = _conv(CONV_OPS["forward"], x.astype(np.float64), filters.astype(np.float64),
                               mask.astype(np.float64), om64, dy.astype(np.float64), attrs)
    check(out, expected, bound, depth, dtype, True, f"forward {dtype}")
    entry_work = warpgroup_conv_entry_columns(fields) if warpgroup else pipelined_conv_entry_mmas(fields, dtype)
    lists_work = forward_conv_lists_work(fields, mask != 0, output_mask, entry_work)
    work, other_work = ("warpgroup_mma_columns", "mma_syncs") if warpgroup else ("mma_syncs", "warpgroup_mma_columns")
    assert stats[other_work] == 0
    assert stats[work] == sum(map(sum, lists_work))
    assert stats["busiest_block_tensor_work"] == busiest_split(lists_work, forward_conv_splits(fields, output_mask))
    return out


@pytest.mark.parametrize("geometry, block, tile", [
    (CONV_GEOMETRIES[5], (16, 16), (3, 5)),    # stages of 16, runs of 1 strip, a second channel tile 8 wide
    (CONV_GEOMETRIES[6], (32, 48), (4, 4)),    # strided and dilated, one short input block, runs of 1
    (CONV_GEOMETRIES[5], (32, 128), (2, 8)),   # runs of 8: whole tiles and (the 8-wide tile) partly live ones
    (CONV_GEOMETRIES[5], (16, 64), (8, 8)),    # runs of 4
    ((2, 12, 11, 32, 64, (3, 3), 1, 1, (1, 1, 1, 1)), (16, 64), (8, 8)),  # one block across: 64-row halves guarded
], ids=["b16x16", "b32x48", "b32x128", "b16x64", "one-block"])
@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "output-mask"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("schedule", [0, 2], ids=["in-order", "shuffled"])
def test_warpgroup_conv_forward(emulator, geometry, block, tile, with_output_mask, dtype, schedule):
    """With all products on the warpgroup tile, the forward conv runs as
    wgmma products from the swizzled layouts (A gathered per tap, B the
    tap's filters N-major): the reference's result (block factors 1 and 2:
    0/1 stages and stages rescaled in shared memory; NaN in dead filter
    blocks; output tiles inactive, and 64-row halves without an active
    pixel, skipped), no mma.sync, and the wgmma columns restated from the
    masks."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    emulator.lib.emu_set_schedule(schedule, 7)
    mask, _, output_mask, fields, attrs, products = conv_case(geometry, block, tile, dtype, "block",
                                                              with_output_mask)
    _, x, f_nan, _, depth = products[0]
    checked_forward_conv(emulator, x, f_nan, mask, output_mask, fields, attrs, products[1][1], depth, dtype, True)


def forward_conv_splits(fields, output_mask):
    """How many ways the pipelined forward conv splits the lists of its busy
    (row tile, channel tile) pairs, restated: a 128-row tile is busy where
    an output tile overlapping its rows is active; fewer than 264 busy pairs
    split into at least 264 thread blocks, at most one split per 16 stages
    of 32 of the depth (and 32)."""
    batch, *_, cin, kh, kw, cout, _, _, _, _, _, _, out_h, out_w, _, _, tile_h, tile_w = fields
    tile_h, tile_w = min(tile_h, out_h), min(tile_w, out_w)
    tiles_h, tiles_w = math.ceil(out_h / tile_h), math.ceil(out_w / tile_w)
    tiles = batch * tiles_h * tiles_w
    per_tile = tile_h * tile_w
    active = [True] * tiles
    if output_mask is not None:
        active = [(output_mask[t // (tiles_h * tiles_w), t // tiles_w % tiles_h * tile_h:][:tile_h,
                   t % tiles_w * tile_w:][:, :tile_w] != 0).any() for t in range(tiles)]
    row_tiles = math.ceil(tiles * per_tile / 128)
    busy = sum(any(active[r * 128 // per_tile:min(tiles - 1, (r * 128 + 127) // per_tile) + 1])
               for r in range(row_tiles))
    most = min(32, max(1, math.ceil(kh * kw * cin / 32) // 16))
    pairs = busy * math.ceil(cout / 128)
    return 1 if pairs >= 264 else min(most, math.ceil(264 / max(1, pairs)))


@pytest.mark.parametrize("with_output_mask", [False, True], ids=["dense-output", "two-active-tiles"])
@pytest.mark.parametrize("products", [WARPGROUP_NONE, WARPGROUP_ALL], ids=["pipelined", "warpgroup"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_forward_conv_splits_its_lists(emulator, with_output_mask, products, dtype):
    """Few output tiles over a deep list (3 x 3 taps of 256 channels; four
    128-row tiles, or two busy ones among them under an output mask with two
    active 8 x 8 tiles, the second row tile idle between them): each busy
    tile's list is split four ways and the splits' partial sums added by a
    second kernel: the reference's result everywhere (the idle tiles written
    as zeros, output factors applied once), with the tensor-core work of the
    unsplit lists, and no thread block doing more than its quarter of a list
    (float32 as TF32 on the pipelined tile only)."""
    if products == WARPGROUP_ALL and dtype == "float32":
        pytest.skip("the warpgroup tile takes 16-bit operands only")
    emulator.lib.emu_set_warpgroup_mma(products)
    geometry = (2, 16, 16, 256, 40, (3, 3), 1, 1, (1, 1, 1, 1))
    mask, _, output_mask, fields, attrs, case_products = conv_case(geometry, (32, 16), (8, 8), dtype, "block",
                                                                   with_output_mask)
    if with_output_mask:
        rng = np.random.default_rng(5)
        output_mask = np.zeros((2, 16, 16), np.float32)
        for n, ty, tx in ((0, 0, 1), (1, 1, 0)):  # tiles 1 and 6: row tiles 0 and 3
            output_mask[n, ty * 8:ty * 8 + 8, tx * 8:tx * 8 + 8] = rng.choice([0.0, 1.0, 2.5], (8, 8))
    assert forward_conv_splits(fields, output_mask) == 4
    _, x, f_nan, _, depth = case_products[0]
    out = checked_forward_conv(emulator, x, f_nan, mask, output_mask, fields, attrs, case_products[1][1], depth, dtype,
                               products == WARPGROUP_ALL)
    if output_mask is not None:
        assert (out[output_mask == 0] == 0).all()


@pytest.mark.parametrize("products", [WARPGROUP_NONE, WARPGROUP_ALL], ids=["pipelined", "warpgroup"])
def test_forward_conv_orders_row_tiles_across_chunks(emulator, products):
    """More row tiles than one ordering block takes (272 of 128 output
    pixels: two chunks of 256), three of them busy, in either chunk: the
    chunks' counts and the order built from them send the thread blocks to
    the busy row tiles (the reference's result, the idle tiles zeros) and
    each busy tile's list to one block (its work restated)."""
    emulator.lib.emu_set_warpgroup_mma(products)
    geometry = (2, 136, 128, 16, 16, (3, 3), 1, 1, (1, 1, 1, 1))
    mask, _, _, fields, attrs, case_products = conv_case(geometry, (16, 16), (8, 8), "bfloat16", "block", True)
    output_mask = np.zeros((2, 136, 128), np.float32)
    for n, ty, tx in ((0, 0, 0), (1, 8, 3), (1, 16, 15)):  # tiles 0, 403 and 543: row tiles 0, 201 and 271
        output_mask[n, ty * 8:ty * 8 + 8, tx * 8:tx * 8 + 8] = 1.0 + (np.arange(64).reshape(8, 8) % 2)
    active = conv_row_activity(fields, output_mask)
    busy = [r // 128 for r in range(0, len(active), 128) if any(active[r:r + 128])]
    assert len(active) // 128 == 272 and busy == [0, 201, 271]
    _, x, f_nan, _, depth = case_products[0]
    dy = np.nan_to_num(case_products[1][1].astype(np.float32)).astype(case_products[1][1].dtype)
    out = checked_forward_conv(emulator, x, f_nan, mask, output_mask, fields, attrs, dy, depth, "bfloat16",
                               products == WARPGROUP_ALL)
    assert (out[output_mask == 0] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warpgroup_conv_forward_skips_inactive_halves(emulator, seed):
    """Every filter block live and output tiles of 64 pixels, so that a tile
    of 128 rows is live across its first 128 channels and holds an active
    pixel in none, one or both of its 64-row halves: only tiles active in
    both take the unguarded whole-tile products, and a half without an
    active pixel never multiplies (the wgmma columns restated)."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    _, _, output_mask, fields, attrs, products = conv_case(CONV_GEOMETRIES[5], (16, 64), (8, 8), "bfloat16", "block",
                                                           True, seed)
    _, x, f_nan, out_shape, depth = products[0]
    filters = np.nan_to_num(f_nan.astype(np.float32)).astype(f_nan.dtype)  # every block live
    mask = np.ones((2, 3), np.float32)
    emulator.lib.emu_reset_stats()
    out = emulator.conv2d("forward", x, filters, mask, "block", fields, np.full(out_shape, np.nan, x.dtype),
                          output_mask, True)
    assert emulator.stats()["warpgroup_mma_columns"] == warpgroup_conv_columns(fields, mask != 0, output_mask)
    active = conv_row_activity(fields, output_mask)
    assert any(sum(any(active[r:r + 64]) for r in (row0, row0 + 64)) == 1 for row0 in range(0, len(active), 128))
    expected, bound, _ = _conv(CONV_OPS["forward"], x.astype(np.float64), filters.astype(np.float64),
                               mask.astype(np.float64), output_mask.astype(np.float64),
                               products[1][1].astype(np.float64), attrs)
    check(out, expected, bound, depth, "bfloat16", True, "forward")


def test_warpgroup_conv_forward_copies_are_whole_lines(emulator):
    """The warpgroup forward conv's copies (A gathered pixel by pixel, B the
    filters) read whole 32-byte sectors into one 128-byte line of shared
    memory a quarter warp at a time, where the channels make rows of whole
    sectors (as test_warpgroup_copies_are_whole_lines)."""
    emulator.lib.emu_set_warpgroup_mma(WARPGROUP_ALL)
    emulator.lib.emu_set_copy_line_check(1)
    geometry = (2, 12, 11, 32, 128, (3, 3), 1, 1, (1, 1, 1, 1))
    mask, _, output_mask, fields, _, products = conv_case(geometry, (16, 32), (4, 4), "bfloat16", "block", True)
    _, x, f_nan, out_shape, _ = products[0]
    emulator.lib.emu_reset_stats()
    emulator.conv2d("forward", x, f_nan, mask, "block", fields, np.full(out_shape, np.nan, x.dtype), output_mask,
                    True)
    assert emulator.stats()["warpgroup_mma_columns"] > 0


def depth_stage_liveness(fields, output_mask, stage):
    """Whether each stage of `stage` rows of the pipelined dfilters' depth
    holds a live output pixel: without an output mask, the output pixels in
    raster order, all live; with one, tile by tile (tile_order_pixels), so
    that an inactive tile's stages are dead."""
    batch, *_, out_h, out_w, _, _, _, _ = fields
    if output_mask is None:
        return [True] * math.ceil(batch * out_h * out_w / stage)
    pixels = tile_order_pixels(fields)
    return [any(p is not None and output_mask[p] != 0 for p in pixels[s:s + stage]) for s in range(0, len(pixels), stage)]


@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("output_mask_kind", ["dense-output", "output-mask", "sparse-output-mask"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("size, tile", [((32, 32), (8, 8)), ((30, 29), (5, 3))], ids=["whole-tiles", "edge-tiles"])
def test_pipelined_conv_filter_gradient_over_splits(emulator, level, output_mask_kind, dtype, size, tile):
    """dfilters with its depth (2048 output pixels, or 1740 of a 30 x 29
    output; under an output mask in tile order, which 5 x 3 tiles, each less
    than a stage, pad to 1800 rows) split four ways (30 x 29: three), summed
    by a second kernel: the reference's result, with
    the mma.sync count of the live fragments over the depth's stages that
    hold a live output pixel (all without an output mask; float32 as TF32:
    stages of 16, 8 deep an mma; a sparse output mask of three 8 x 8 tiles
    leaves all stages but theirs dead), no thread block multiplying more than
    its split's stages."""
    if output_mask_kind == "sparse-output-mask" and tile != (8, 8):
        pytest.skip("the sparse output mask is laid out in 8 x 8 tiles")
    geometry = (2, *size, 16, 24, (3, 3), 1, 1, (1, 1, 1, 1))
    mask, element, output_mask, fields, attrs, products = conv_case(geometry, (16, 16), tile, dtype, level,
                                                                    output_mask_kind != "dense-output")
    _, x, dy, out_shape, depth = products[2]
    if output_mask_kind == "sparse-output-mask":
        sparse = np.zeros_like(output_mask)
        for n, ty, tx in ((0, 0, 3), (1, 2, 1), (1, 3, 3)):
            sparse[n, ty * 8:ty * 8 + 8, tx * 8:tx * 8 + 8] = output_mask[n, ty * 8:ty * 8 + 8, tx * 8:tx * 8 + 8] + 1
        output_mask = sparse
        finite = np.random.default_rng(7).standard_normal(dy.shape)  # the case's dy is NaN off its own mask
        dy = np.where(output_mask[..., None] == 0, np.nan, finite).astype(dy.dtype)
    assert emulator.conv2d_uses_pipeline("grad_weight", dtype, fields, level)
    emulator.lib.emu_reset_stats()
    out = emulator.conv2d("grad_weight", x, dy, mask, level, fields, np.full(out_shape, np.nan, x.dtype), output_mask,
                          True)
    stats = emulator.stats()
    live_taps = [(element[ky, kx] != 0) for ky in range(3) for kx in range(3)]
    tap_fragments = [sum(int(live[:, j:j + 16].any()) for j in range(0, 24, 16)) for live in live_taps]
    stage, mma_depth = (16, 8) if dtype == "float32" else (32, 16)
    stage_live = depth_stage_liveness(fields, output_mask, stage)
    stages = sum(stage_live)
    assert stats["mma_syncs"] == stages * (stage // mma_depth) * sum(tap_fragments) * 2
    # A thread block per (split, tap), each with its split's run of stages.
    depth_rows = 2 * size[0] * size[1] if output_mask is None else len(tile_order_pixels(fields))
    splits = depth_splits(9, depth_rows)
    assert splits == (4 if size == (32, 32) else 3)
    most_stages = busiest_split([stage_live], splits)
    assert stats["busiest_block_tensor_work"] == most_stages * (stage // mma_depth) * max(tap_fragments) * 2
    # (the output mask's factors,) the filter factors, liveness, (the live
    # stages,) the split products, their sum
    assert stats["launches"] == 4 + 2 * (output_mask is not None)
    if output_mask_kind == "sparse-output-mask":
        assert stages == 3 * 64 // stage  # the three tiles' 64 pixels, in stages of their own
        # Every stage copies as much as any other: dead ones copy nothing.
        emulator.lib.emu_reset_stats()
        emulator.conv2d("grad_weight", x, np.nan_to_num(dy), mask, level, fields, np.full(out_shape, np.nan, x.dtype),
                        np.ones_like(output_mask), True)
        assert stats["async_copies"] * len(stage_live) == emulator.stats()["async_copies"] * stages
    om64 = np.zeros((0,)) if output_mask is None else output_mask.astype(np.float64)
    expected, bound, _ = _conv(CONV_OPS["grad_weight"], x.astype(np.float64), products[0][2].astype(np.float64),
                               mask.astype(np.float64), om64, dy.astype(np.float64), attrs)
    check(out, expected, bound, depth, dtype, True, f"grad_weight {dtype}")
    assert (out[element == 0] == 0).all()


@pytest.mark.parametrize("dtype, tensor_cores", [("bfloat16", True), ("float32", False)], ids=["pipelined", "cc"])
def test_conv_filter_gradient_with_no_output_pixels(emulator, dtype, tensor_cores):
    """An empty input height, so no output pixels (SAME padding): dfilters is
    zeros, a sum over nothing, with no division by the empty output plane."""
    t = np_dtype(dtype)
    fields = (1, 0, 5, 16, 3, 3, 16, 1, 1, 1, 1, 1, 1, 0, 5, 16, 16, 4, 4)
    assert emulator.conv2d_uses_pipeline("grad_weight", dtype, fields, "block", tensor_cores) == tensor_cores
    out = emulator.conv2d("grad_weight", np.zeros((1, 0, 5, 16), t), np.zeros((1, 0, 5, 16), t),
                          np.ones((1, 1), np.float32), "block", fields, np.full((3, 3, 16, 16), np.nan, t), None,
                          tensor_cores)
    assert (out.astype(np.float64) == 0).all()


# -- schedules: the kernels' barriers ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [1, 2], ids=["reverse", "shuffled"])
def test_results_do_not_depend_on_the_thread_order(emulator, schedule):
    """Every kernel gives the same bits whatever order its threads run in
    between barriers: no thread reads shared memory another writes without a
    __syncthreads between them."""
    cases = [lambda: run_matmul(emulator, (130, 100, 90), (32, 48), "float32", True, "element"),
             lambda: run_matmul(emulator, (70, 40, 53), (16, 8), "float32", False, "block"),
             lambda: run_matmul(emulator, (70, 48, 40), (16, 16), "float16", True, "block"),
             lambda: run_matmul(emulator, (150, 200, 136), (64, 32), "bfloat16", True, "block"),
             lambda: run_conv(emulator, CONV_GEOMETRIES[6], (32, 48), (4, 4), "bfloat16", True, "block", True),
             lambda: run_conv(emulator, CONV_GEOMETRIES[1], (16, 16), (3, 5), "float32", True, "element", True),
             lambda: run_conv(emulator, CONV_GEOMETRIES[0], (16, 8), (4, 8), "float32", False, "block", True)]
    for case in cases:
        emulator.lib.emu_set_schedule(0, 0)
        forward = case()
        emulator.lib.emu_set_schedule(schedule, 12345)
        other = case()
        for product in forward:
            np.testing.assert_array_equal(other[product].view(np.uint8), forward[product].view(np.uint8),
                                          err_msg=product)


# -- elementwise ops ------------------------------------------------------------------------------------

ELEMENTWISE_SHAPES = [((3, 37, 29), (16, 8)), ((2, 40, 48), (64, 64)), ((1, 1, 33), (1, 16))]


def elementwise_masks(rng, shape, block, level, values=(1.0, 0.5, 2.0)):
    """(mask, live [outer, k, n], factors [outer, k, n]) for stacked matrices."""
    outer, k, n = shape
    blocks, element = make_masks(rng, k, n, block, 0.6, "block", values)
    if level == "block":
        live = np.broadcast_to(element != 0, shape)
        return blocks.astype(np.float32), live, np.broadcast_to(element, shape)
    element = np.stack([make_masks(rng, k, n, block, 0.6, "element", values)[1] for _ in range(outer)])
    return element.astype(np.float32), element != 0, element


@pytest.mark.parametrize("shape_and_block", ELEMENTWISE_SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("level", ["block", "element"])
def test_mask_gradient(emulator, shape_and_block, dtype, level):
    """out = grad * mask (the mask rounded to T) where live, 0 elsewhere,
    rounded once: bit for bit. A NaN gradient under a dead entry never shows."""
    shape, block = shape_and_block
    rng = np.random.default_rng([*shape, *block, DTYPE_CODES[dtype]])
    t = np_dtype(dtype)
    mask, live, factors = elementwise_masks(rng, shape, block, level, values=(1.0, 0.3, -2.0))
    grad = np.where(live, rng.standard_normal(shape), np.nan).astype(t)
    out = np.full(shape, np.nan, t)
    emulator.elementwise(0, grad, mask, level, block, out)
    rounded = factors.astype(np.float32).astype(t).astype(np.float64)
    expected = np.where(live, grad.astype(np.float64) * rounded, 0.0).astype(t)
    np.testing.assert_array_equal(out.view(np.uint8), expected.view(np.uint8))


def adam_reference(var, m, v, v_hat, grad, scalars, amsgrad):
    alpha, one_minus_beta_1, one_minus_beta_2, epsilon, learning_rate, weight_decay = scalars
    w = var - var * weight_decay * learning_rate
    m_new = m + (grad - m) * one_minus_beta_1
    v_new = v + (grad * grad - v) * one_minus_beta_2
    second = np.maximum(v_hat, v_new) if amsgrad else v_new
    return w - (m_new * alpha) / (np.sqrt(second) + epsilon), m_new, v_new, second


@pytest.mark.parametrize("shape_and_block", ELEMENTWISE_SHAPES[:2], ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("level", ["block", "element"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_step(emulator, shape_and_block, dtype, level, amsgrad):
    """One fused Adam step on the live entries; frozen entries (variable and
    state) keep their exact bits, whatever their gradient."""
    shape, block = shape_and_block
    rng = np.random.default_rng([*shape, DTYPE_CODES[dtype], int(amsgrad)])
    mask, live, _ = elementwise_masks(rng, shape, block, level)
    var, m = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    v, v_hat = (rng.random(shape).astype(dtype) for _ in range(2))
    grad = np.where(live, rng.standard_normal(shape), np.nan).astype(dtype)
    scalars = (1e-3 * math.sqrt(1 - 0.999**3) / (1 - 0.9**3), 0.1, 0.001, 1e-7, 1e-3, 0.04)
    before = [a.copy() for a in (var, m, v, v_hat)]
    emulator.elementwise(4, grad, mask, level, block, var, state=(m, v, v_hat), scalars=scalars, flag=amsgrad)
    expected = adam_reference(*(a.astype(np.float64) for a in before), grad.astype(np.float64),
                              np.asarray(scalars, dtype).astype(np.float64), amsgrad)
    tolerance = 1e-12 if dtype == "float64" else 1e-6
    for name, actual, old, reference in zip(("var", "m", "v", "v_hat"), (var, m, v, v_hat), before, expected):
        np.testing.assert_array_equal(actual[~live].view(np.uint8), old[~live].view(np.uint8), err_msg=name)
        if name == "v_hat" and not amsgrad:
            np.testing.assert_array_equal(actual.view(np.uint8), old.view(np.uint8), err_msg=name)
        else:
            np.testing.assert_allclose(actual[live], reference[live], rtol=tolerance, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_step(emulator, dtype, nesterov):
    shape, block = (2, 24, 40), (8, 16)
    rng = np.random.default_rng([3, int(nesterov), DTYPE_CODES[dtype]])
    t = np_dtype(dtype)
    mask, live, _ = elementwise_masks(rng, shape, block, "element")
    var, momentum = (rng.standard_normal(shape).astype(t) for _ in range(2))
    grad = np.where(live, rng.standard_normal(shape), np.nan).astype(t)
    before_var, before_momentum = var.copy(), momentum.copy()
    emulator.elementwise(5, grad, mask, "element", block, var, state=(momentum,), scalars=(0.1, 0.9, 0.0),
                         flag=nesterov)
    # The scalars are values of the op's type, as the optimizer's inputs are.
    learning_rate, mu = np.array([0.1, 0.9]).astype(t).astype(np.float32)
    g, w0, m0 = (a.astype(np.float32) for a in (grad, before_var, before_momentum))
    scaled = g * learning_rate
    m_new = m0 * mu - scaled  # in float; the variable's update takes it unrounded
    var_new = (w0 + (m_new * mu - scaled if nesterov else m_new)).astype(t)
    for actual, old, reference in ((var, before_var, var_new), (momentum, before_momentum, m_new.astype(t))):
        np.testing.assert_array_equal(actual[~live].view(np.uint16 if dtype == "float16" else np.uint32),
                                      old[~live].view(np.uint16 if dtype == "float16" else np.uint32))
        np.testing.assert_allclose(actual[live].astype(np.float64), reference[live].astype(np.float64),
                                   rtol=2e-3 if dtype == "float16" else 1e-6)
