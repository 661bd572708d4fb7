"""Loads the op library once, from beside this file."""

import ctypes
import functools
import os

import tensorflow as tf

from masked_ops import _build_info


def check_tensorflow_version(running: str, built: str) -> None:
    """Raises ImportError unless both versions share major.minor.

    TensorFlow keeps no C++ ABI across minor releases, so an op library built
    for one may crash another.
    """
    if running.split(".")[:2] != built.split(".")[:2]:
        raise ImportError(
            f"masked_ops was built against TensorFlow {built} but TensorFlow {running} is "
            f"installed; install TensorFlow {'.'.join(built.split('.')[:2])}.x or rebuild "
            "masked_ops against this TensorFlow"
        )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_PATH = os.path.join(_PACKAGE_DIR, "_masked_ops.so")
GPU_KERNEL_LIBRARY_PATH = os.path.join(_PACKAGE_DIR, "_masked_ops_gpu.so")
GPU_KERNELS_VARIABLE = "MASKED_OPS_GPU_KERNELS"


def gpu_kernels_requested() -> bool:
    """Whether MASKED_OPS_GPU_KERNELS asks for the GPU kernels ("1"; unset, empty or "0": not)."""
    value = os.environ.get(GPU_KERNELS_VARIABLE) or "0"
    if value not in ("0", "1"):
        raise ImportError(f"{GPU_KERNELS_VARIABLE}={value!r}: expected 0 or 1")
    return value == "1"


@functools.lru_cache(maxsize=None)
def _load_libraries():
    """Loads the op library and, when requested, the GPU kernel library after it.

    The GPU kernels (`_masked_ops_gpu.so`, a kernel library for the op
    library's ops) are opt-in because their TensorFlow glue has not yet run on
    a GPU: without them TensorFlow places these ops on the CPU, also on a
    machine with a GPU. Returns the op module and whether the GPU kernels
    were loaded.
    """
    check_tensorflow_version(tf.__version__, _build_info.TENSORFLOW_VERSION)
    requested = gpu_kernels_requested()
    if requested and not os.path.exists(GPU_KERNEL_LIBRARY_PATH):
        raise ImportError(
            f"{GPU_KERNELS_VARIABLE}=1, but this build of masked_ops has no GPU kernels "
            "(it was built without nvcc); rebuild it where the CUDA toolkit is installed"
        )
    library = tf.load_op_library(_LIBRARY_PATH)
    if not requested:
        return library, False
    try:
        tf.load_library(GPU_KERNEL_LIBRARY_PATH)
    except tf.errors.NotFoundError as error:
        # E.g. a TensorFlow built without CUDA (tensorflow-cpu), which lacks
        # the GPU symbols the kernels link against.
        raise ImportError(
            f"{GPU_KERNELS_VARIABLE}=1, but this TensorFlow cannot load masked_ops' GPU kernels: {error}"
        ) from error
    return library, True


def op_library():
    """The loaded `_masked_ops.so` module of generated op wrappers."""
    return _load_libraries()[0]


def gpu_kernels_loaded() -> bool:
    """Whether the ops' GPU kernels are registered (MASKED_OPS_GPU_KERNELS=1 at import)."""
    return _load_libraries()[1]


@functools.lru_cache(maxsize=None)
def cpu_backend():
    """The instruction set the CPU kernels run with: "avx512", "avx2" or "generic".

    The fastest one this CPU supports, unless the environment variable
    MASKED_OPS_CPU_ISA (read once, at the first op call) names a slower one.
    """
    op_library()
    # The same file, already loaded: dlopen hands back TensorFlow's handle.
    entry = ctypes.CDLL(_LIBRARY_PATH).MaskedOpsCpuBackend
    entry.restype = ctypes.c_char_p
    return entry().decode()
