"""Loads the TensorFlow-free CUDA harness (libmasked_ops_cuda_harness.so) and
calls its kernels on PyTorch CUDA tensors. Used by tests/gpu and bench/gpu.py
on a machine with a GPU; it needs neither TensorFlow nor masked_ops installed.

The library comes from $MASKED_OPS_CUDA_HARNESS, else build/gpu/ (what `make
gpu-test` builds).
"""

import ctypes
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRODUCTS = {"forward": 0, "grad_input": 1, "grad_weight": 2}


def library_path():
    return pathlib.Path(os.environ.get("MASKED_OPS_CUDA_HARNESS", ROOT / "build" / "gpu" / "libmasked_ops_cuda_harness.so"))


def load():
    library = ctypes.CDLL(str(library_path()))
    library.masked_ops_gpu_workspace_bytes.restype = ctypes.c_size_t
    library.masked_ops_gpu_workspace_bytes.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int]
    library.masked_ops_gpu_matmul.restype = ctypes.c_int
    library.masked_ops_gpu_matmul.argtypes = (
        [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p] + [ctypes.c_int64] * 5
        + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3
    )
    return library


def dtype_name(tensor):
    return str(tensor.dtype).replace("torch.", "")


class Harness:
    def __init__(self, torch):
        self.torch = torch
        self.library = load()

    def run(self, product, a, b, mask, level, block_size, shape, out):
        """out <- the product (see cc/bindings/cuda_harness.cc) on the current stream."""
        m, k, n = shape
        rows, cols = block_size
        level_code = 0 if level == "element" else 1
        workspace = self.torch.empty(
            self.library.masked_ops_gpu_workspace_bytes(k, n, rows, cols, level_code),
            dtype=self.torch.uint8, device=a.device)
        status = self.library.masked_ops_gpu_matmul(
            PRODUCTS[product], dtype_name(a).encode(), dtype_name(mask).encode(), m, k, n, rows, cols,
            a.data_ptr(), b.data_ptr(), mask.data_ptr(), level_code, out.data_ptr(), workspace.data_ptr(),
            self.torch.cuda.current_stream().cuda_stream)
        if status != 0:
            raise RuntimeError(f"masked_ops_gpu_matmul({product}) failed with status {status}")
        return out
