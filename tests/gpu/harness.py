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
WARPGROUP_PRODUCTS = {"none": 0, "forward": 1, "all": 2}
ELEMENTWISE = {"mask_gradient": 0, "assign": 1, "add": 2, "sub": 3, "adam": 4, "sgd": 5, "rmsprop": 6}


def for_tests():
    """(torch, Harness) for a test module, or the module skipped cleanly when
    PyTorch, a CUDA GPU or the harness library is missing."""
    import pytest

    torch = pytest.importorskip("torch", reason="the GPU tests drive the kernels with PyTorch CUDA tensors")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU", allow_module_level=True)
    if not library_path().exists():
        pytest.skip(f"no CUDA harness at {library_path()} (run `make gpu-test`)", allow_module_level=True)
    return torch, Harness(torch)


def library_path():
    return pathlib.Path(os.environ.get("MASKED_OPS_CUDA_HARNESS", ROOT / "build" / "gpu" / "libmasked_ops_cuda_harness.so"))


def load(path=None):
    library = ctypes.CDLL(str(path or library_path()))
    library.masked_ops_gpu_workspace_bytes.restype = ctypes.c_size_t
    library.masked_ops_gpu_workspace_bytes.argtypes = ([ctypes.c_int, ctypes.c_char_p] + [ctypes.c_int64] * 5
                                                       + [ctypes.c_int])
    library.masked_ops_gpu_elementwise_workspace_bytes.restype = ctypes.c_size_t
    library.masked_ops_gpu_elementwise_workspace_bytes.argtypes = [ctypes.c_char_p] + [ctypes.c_int64] * 5 + [ctypes.c_int]
    library.masked_ops_gpu_elementwise.restype = ctypes.c_int
    library.masked_ops_gpu_elementwise.argtypes = (
        [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p] + [ctypes.c_int64] * 5
        + [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    )
    library.masked_ops_gpu_conv2d_workspace_bytes.restype = ctypes.c_size_t
    library.masked_ops_gpu_conv2d_workspace_bytes.argtypes = [ctypes.c_int, ctypes.c_char_p,
                                                              ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                                                              ctypes.c_int]
    library.masked_ops_gpu_conv2d.restype = ctypes.c_int
    library.masked_ops_gpu_conv2d.argtypes = (
        [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64)]
        + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p]
    )
    library.masked_ops_gpu_matmul_uses_tensor_cores.restype = ctypes.c_int
    library.masked_ops_gpu_matmul_uses_tensor_cores.argtypes = ([ctypes.c_int, ctypes.c_char_p] + [ctypes.c_int64] * 4
                                                                + [ctypes.c_int])
    library.masked_ops_gpu_matmul_uses_pipeline.restype = ctypes.c_int
    library.masked_ops_gpu_matmul_uses_pipeline.argtypes = ([ctypes.c_int, ctypes.c_char_p] + [ctypes.c_int64] * 4
                                                            + [ctypes.c_int] * 2)
    library.masked_ops_gpu_conv2d_uses_tensor_cores.restype = ctypes.c_int
    library.masked_ops_gpu_conv2d_uses_tensor_cores.argtypes = [ctypes.c_int, ctypes.c_char_p,
                                                                ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    library.masked_ops_gpu_conv2d_uses_pipeline.restype = ctypes.c_int
    library.masked_ops_gpu_conv2d_uses_pipeline.argtypes = [ctypes.c_int, ctypes.c_char_p,
                                                            ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_int]
    if hasattr(library, "masked_ops_gpu_set_warpgroup_mma"):  # harnesses built before session 8 lack it
        library.masked_ops_gpu_set_warpgroup_mma.restype = ctypes.c_int
        library.masked_ops_gpu_set_warpgroup_mma.argtypes = [ctypes.c_int]
    if hasattr(library, "masked_ops_gpu_set_warpgroup_tall_tiles"):  # harnesses built before session 11 lack it
        library.masked_ops_gpu_set_warpgroup_tall_tiles.restype = None
        library.masked_ops_gpu_set_warpgroup_tall_tiles.argtypes = [ctypes.c_int]
    if hasattr(library, "masked_ops_gpu_tensor_map_refusals"):
        library.masked_ops_gpu_tensor_map_refusals.restype = ctypes.c_int64
        library.masked_ops_gpu_tensor_map_refusals.argtypes = []
    if hasattr(library, "masked_ops_gpu_tensor_copy_probe"):
        library.masked_ops_gpu_tensor_copy_probe.restype = ctypes.c_int
        library.masked_ops_gpu_tensor_copy_probe.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 2
                                                             + [ctypes.c_int] * 2 + [ctypes.c_int32] * 2
                                                             + [ctypes.c_void_p] * 3)
    library.masked_ops_gpu_matmul.restype = ctypes.c_int
    library.masked_ops_gpu_matmul.argtypes = (
        [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p] + [ctypes.c_int64] * 5
        + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_void_p]
    )
    return library


def dtype_name(tensor):
    return str(tensor.dtype).replace("torch.", "")


def address(tensor):
    """The device address of a tensor that the kernels read or write as a
    dense row-major array: a strided view (a transpose, say) would be read
    as if it were one, so it is refused."""
    if not tensor.is_contiguous():
        raise ValueError(f"the harness takes contiguous tensors; got shape {tuple(tensor.shape)} "
                         f"with strides {tensor.stride()}")
    return tensor.data_ptr()


class Harness:
    def __init__(self, torch, path=None):
        """The harness library at `path` (default: library_path())."""
        self.torch = torch
        self.library = load(path)

    def run(self, product, a, b, mask, level, block_size, shape, out, tensor_cores=True):
        """out <- the product (see cc/bindings/cuda_harness.cc) on the current
        stream; tensor_cores=False keeps it on the CUDA cores (exact float32)."""
        m, k, n = shape
        rows, cols = block_size
        level_code = 0 if level == "element" else 1
        workspace = self.torch.empty(
            self.library.masked_ops_gpu_workspace_bytes(PRODUCTS[product], dtype_name(a).encode(), m, k, n, rows, cols,
                                                        level_code),
            dtype=self.torch.uint8, device=a.device)
        status = self.library.masked_ops_gpu_matmul(
            PRODUCTS[product], dtype_name(a).encode(), dtype_name(mask).encode(), m, k, n, rows, cols,
            address(a), address(b), address(mask), level_code, address(out), workspace.data_ptr(),
            int(tensor_cores), self.torch.cuda.current_stream().cuda_stream)
        if status != 0:
            raise RuntimeError(f"masked_ops_gpu_matmul({product}) failed with status {status}")
        return out

    def set_warpgroup_products(self, products):
        """Which of the half types' matmul products take the warpgroup
        (wgmma) tile: "none" (the pipelined tile), "forward" (the kernels'
        default) or "all"; True when the current device then runs it for
        some product (a compute capability 9.0 GPU and a build with sm_90a
        code); False for a harness without the tile. (Harnesses built
        before the default took the forward product read "forward" as
        "all".)"""
        if not hasattr(self.library, "masked_ops_gpu_set_warpgroup_mma"):
            return False
        return self.library.masked_ops_gpu_set_warpgroup_mma(WARPGROUP_PRODUCTS[products]) == 1

    def set_warpgroup_tall_tiles(self, on):
        """Whether the forward product and dx on the warpgroup tile take tall
        tiles (256 x 128, two warpgroups sharing W's stages) where they
        apply; False for a harness without them (then nothing changes)."""
        if not hasattr(self.library, "masked_ops_gpu_set_warpgroup_tall_tiles"):
            return False
        self.library.masked_ops_gpu_set_warpgroup_tall_tiles(int(on))
        return True

    def tensor_map_refusals(self):
        """How many launches chosen for the warpgroup tile took the pipelined
        one because a tensor map could not be made (0 for a harness older
        than the count)."""
        if not hasattr(self.library, "masked_ops_gpu_tensor_map_refusals"):
            return 0
        return self.library.masked_ops_gpu_tensor_map_refusals()

    def tensor_copy_probe(self, array, inner, outer, box_inner, box_outer):
        """(status, completed, landed): one tensor copy of the box_outer x
        box_inner box at element (row outer, column inner) of `array` (a 2-D
        int16 CUDA tensor), as it lies in shared memory afterwards (see
        cc/bindings/tensor_copy_probe.cuh); status is the harness's (0, -1
        where the driver refused the tensor map, or a cudaError_t)."""
        landed = self.torch.empty(box_inner * box_outer, dtype=self.torch.int16, device=array.device)
        completed = self.torch.zeros(1, dtype=self.torch.int32, device=array.device)
        status = self.library.masked_ops_gpu_tensor_copy_probe(
            address(array), array.shape[1], array.shape[0], box_inner, box_outer, inner, outer, address(landed),
            address(completed), self.torch.cuda.current_stream().cuda_stream)
        self.torch.cuda.synchronize()
        return status, int(completed.item()) == 1, landed.cpu().numpy().view("uint16")

    def uses_tensor_cores(self, product, dtype, shape, block_size, tensor_cores=True):
        """Whether run(product, ...) on dtype tensors of this shape takes the tensor-core kernels."""
        _, k, n = shape
        return self.library.masked_ops_gpu_matmul_uses_tensor_cores(
            PRODUCTS[product], str(dtype).replace("torch.", "").encode(), k, n, *block_size, int(tensor_cores)) == 1

    def uses_pipeline(self, product, dtype, shape, block_size, level, tensor_cores=True):
        """Whether run(product, ...) on dtype tensors of this shape takes the pipelined tensor-core kernels."""
        _, k, n = shape
        return self.library.masked_ops_gpu_matmul_uses_pipeline(
            PRODUCTS[product], str(dtype).replace("torch.", "").encode(), k, n, *block_size,
            0 if level == "element" else 1, int(tensor_cores)) == 1

    def conv2d_uses_tensor_cores(self, product, dtype, geometry, tensor_cores=True):
        """Whether conv2d(product, ...) on dtype tensors with this geometry takes the tensor-core kernels."""
        fields = (ctypes.c_int64 * 19)(*geometry)
        return self.library.masked_ops_gpu_conv2d_uses_tensor_cores(
            PRODUCTS[product], str(dtype).replace("torch.", "").encode(), fields, int(tensor_cores)) == 1

    def conv2d_uses_pipeline(self, product, dtype, geometry, level, tensor_cores=True):
        """Whether conv2d(product, ...) on dtype tensors with this geometry takes the pipelined kernels."""
        fields = (ctypes.c_int64 * 19)(*geometry)
        return self.library.masked_ops_gpu_conv2d_uses_pipeline(
            PRODUCTS[product], str(dtype).replace("torch.", "").encode(), fields, 0 if level == "element" else 1,
            int(tensor_cores)) == 1

    def elementwise(self, op, a, mask, level, block_size, out, state=(), scalars=(), flag=False):
        """An elementwise op over a as [outer, k, n] (see cc/bindings/cuda_harness.cc);
        state tensors may be None. Updates out (and state) in place."""
        k, n = (1, a.shape[-1]) if a.dim() == 1 else a.shape[-2:]
        outer = a.numel() // max(k * n, 1) if k * n else 0
        rows, cols = block_size
        level_code = 0 if level == "element" else 1
        workspace = self.torch.empty(
            self.library.masked_ops_gpu_elementwise_workspace_bytes(dtype_name(a).encode(), outer, k, n, rows, cols,
                                                                    level_code),
            dtype=self.torch.uint8, device=a.device)
        pointers = [0 if t is None else address(t) for t in state] + [0] * (3 - len(state))
        state_array = (ctypes.c_void_p * 3)(*pointers)
        scalar_array = self.torch.tensor(list(scalars) + [0.0] * (6 - len(scalars)), dtype=a.dtype,
                                         device=a.device)
        status = self.library.masked_ops_gpu_elementwise(
            ELEMENTWISE[op], dtype_name(a).encode(), dtype_name(mask).encode(), outer, k, n, rows, cols,
            address(a), address(mask), level_code, address(out), state_array, address(scalar_array), int(flag),
            workspace.data_ptr(), self.torch.cuda.current_stream().cuda_stream)
        if status != 0:
            raise RuntimeError(f"masked_ops_gpu_elementwise({op}) failed with status {status}")
        return out

    def conv2d(self, product, a, b, mask, level, geometry, out, output_mask=None, tensor_cores=True):
        """A masked_conv2d product (see cc/bindings/cuda_harness.cc); geometry
        holds Conv2DGeometry's 19 fields in order."""
        fields = (ctypes.c_int64 * 19)(*geometry)
        level_code = 0 if level == "element" else 1
        workspace = self.torch.empty(self.library.masked_ops_gpu_conv2d_workspace_bytes(
            PRODUCTS[product], dtype_name(a).encode(), fields, level_code, int(output_mask is not None)),
            dtype=self.torch.uint8, device=a.device)
        status = self.library.masked_ops_gpu_conv2d(
            PRODUCTS[product], dtype_name(a).encode(), dtype_name(mask).encode(),
            None if output_mask is None else dtype_name(output_mask).encode(), fields, address(a), address(b),
            address(mask), level_code, 0 if output_mask is None else address(output_mask), address(out),
            workspace.data_ptr(), int(tensor_cores), self.torch.cuda.current_stream().cuda_stream)
        if status != 0:
            raise RuntimeError(f"masked_ops_gpu_conv2d({product}) failed with status {status}")
        return out
