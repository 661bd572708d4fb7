// The launch policy the *_launch.cuh launch sequences run with on a GPU:
// launch(kernel, grid, block, args...) is kernel<<<grid, block,
// shared_bytes, stream>>>(args...), launch.WithSharedMemory(bytes) the same
// policy with `bytes` of dynamic shared memory, Status() is
// cudaGetLastError() as an int, and EncodeTensorMap makes a TMA descriptor
// through the driver's cuTensorMapEncodeTiled. (The CUDA emulation of tests/cuda_emulation
// runs the same sequences with its own policy.) nvcc only.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_CUDA_LAUNCH_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_CUDA_LAUNCH_CUH_

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace masked_ops {
namespace gpu {
namespace {

struct CudaLaunch {
  cudaStream_t stream;
  size_t shared_bytes = 0;

  CudaLaunch WithSharedMemory(size_t bytes) const { return CudaLaunch{stream, bytes}; }

  // The arguments convert to the kernel's parameter types as in a direct
  // kernel<<<...>>>(args...) launch.
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) const {
    static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch with the wrong number of arguments");
    // Past 48 KB of static and dynamic shared memory together a kernel needs
    // its dynamic limit raised. The kernel's static part is not known here
    // (the pipelined kernels have a few words of it beside 48 KB of stages,
    // which failed to launch on an H200), so the limit is raised for every
    // launch with dynamic shared memory; a failure shows as the launch's
    // error.
    if (shared_bytes > 0) {
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    }
    kernel<<<grid, block, shared_bytes, stream>>>(args...);
  }

  int Status() const { return static_cast<int>(cudaGetLastError()); }

  // A tensor map of a contiguous row-major array of 16-bit elements at
  // `base` (16-byte aligned): `outer` rows of `inner` elements (a multiple
  // of 8); boxes of box_inner x box_outer elements land in shared memory in
  // the swizzle whose row is a box's row (box_inner 16, 32 or 64: the 32-,
  // 64- or 128-byte swizzle), zeros outside the array. False where a tensor
  // copy's 32-bit coordinates cannot reach the whole array, or the driver
  // refuses the map (or has no cuTensorMapEncodeTiled: before CUDA 12).
  bool EncodeTensorMap(CUtensorMap* map, const void* base, int64_t inner, int64_t outer, int box_inner,
                       int box_outer) const {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
      void* function = nullptr;
      cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
      const cudaError_t status =
          cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found);
      return status == cudaSuccess && found == cudaDriverEntryPointSuccess
                 ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function)
                 : nullptr;
    }();
    constexpr int64_t kCoordinates = int64_t{1} << 31;
    if (encode == nullptr || inner >= kCoordinates || outer >= kCoordinates) return false;
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer)};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(inner * 2)};
    const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_inner), static_cast<cuuint32_t>(box_outer)};
    const cuuint32_t element_strides[2] = {1, 1};
    const CUtensorMapSwizzle swizzle = box_inner == 64   ? CU_TENSOR_MAP_SWIZZLE_128B
                                       : box_inner == 32 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                         : CU_TENSOR_MAP_SWIZZLE_32B;
    return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(base), dims, strides, box,
                  element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  }
};

template <typename StreamHandle>
CudaLaunch OnStream(StreamHandle stream) {
  return CudaLaunch{reinterpret_cast<cudaStream_t>(stream)};
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_CUDA_LAUNCH_CUH_
