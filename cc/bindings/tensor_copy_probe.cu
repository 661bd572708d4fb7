// The harness's entry point for the tensor-copy probe (tensor_copy_probe.cuh),
// on the GPU's own tensor maps and copies.
#include <cuda_runtime.h>

#include <cstdint>

#include "cc/bindings/tensor_copy_probe.cuh"
#include "cc/kernels/cuda/cuda_launch.cuh"

extern "C" {

// One box of box_inner x box_outer elements at (inner, outer) of a device
// array of outer_size rows of inner_size 16-bit elements, landed by a tensor
// copy and copied out as it lies in shared memory into `landed` (device,
// box_inner * box_outer elements); `completed` (device, one int32) is 1
// where the copy's mbarrier phase completed. Returns the cudaError_t of the
// launch, cudaErrorNotSupported on a device older than compute capability
// 9.0 (no tensor copies), or -1 where the driver refuses the tensor map.
int masked_ops_gpu_tensor_copy_probe(uintptr_t array, int64_t inner_size, int64_t outer_size, int box_inner,
                                     int box_outer, int32_t inner, int32_t outer, uintptr_t landed,
                                     uintptr_t completed, uintptr_t stream) {
  using namespace masked_ops::gpu;
  int device = 0;
  int major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return static_cast<int>(cudaGetLastError());
  }
  if (major < 9) return static_cast<int>(cudaErrorNotSupported);
  return probe::RunTensorCopyProbe(OnStream(stream), reinterpret_cast<const uint16_t*>(array), inner_size,
                                   outer_size, box_inner, box_outer, inner, outer,
                                   reinterpret_cast<uint16_t*>(landed), reinterpret_cast<int32_t*>(completed));
}

}  // extern "C"
