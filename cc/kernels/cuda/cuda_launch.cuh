// The launch policy the *_launch.cuh launch sequences run with on a GPU:
// launch(kernel, grid, block, args...) is kernel<<<grid, block,
// shared_bytes, stream>>>(args...), launch.WithSharedMemory(bytes) the same
// policy with `bytes` of dynamic shared memory, and Status() is
// cudaGetLastError() as an int. (The CUDA emulation of tests/cuda_emulation
// runs the same sequences with its own policy.) nvcc only.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_CUDA_LAUNCH_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_CUDA_LAUNCH_CUH_

#include <cuda_runtime.h>

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
};

template <typename StreamHandle>
CudaLaunch OnStream(StreamHandle stream) {
  return CudaLaunch{reinterpret_cast<cudaStream_t>(stream)};
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_CUDA_LAUNCH_CUH_
