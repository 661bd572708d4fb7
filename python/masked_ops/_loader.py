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


_LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_masked_ops.so")


@functools.lru_cache(maxsize=None)
def op_library():
    """The loaded `_masked_ops.so` module of generated op wrappers."""
    check_tensorflow_version(tf.__version__, _build_info.TENSORFLOW_VERSION)
    return tf.load_op_library(_LIBRARY_PATH)


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
