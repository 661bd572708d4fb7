// A probe of the tensor copies (TMA) on their own, for the GPU harness and
// the CUDA emulation alike: one box of a 16-bit array, copied by
// ptx::TensorCopy2D on a map from the launch policy's EncodeTensorMap, the
// way the warpgroup kernels stage their operands, and what then lies in
// shared memory copied out as it lies there. tests/gpu compares a GPU's
// landing with the layout that the emulation lands (and that the warpgroup
// kernels' descriptors read); a mismatch there, or a phase that never
// completes, tells a tensor-copy fault apart from a product's.
#ifndef MASKED_OPS_CC_BINDINGS_TENSOR_COPY_PROBE_CUH_
#define MASKED_OPS_CC_BINDINGS_TENSOR_COPY_PROBE_CUH_

#include <cstdint>

#include "cc/kernels/cuda/ptx_primitives.cuh"

namespace masked_ops {
namespace gpu {
namespace probe {

// The box lands on a multiple of 1024 bytes of the shared window, the
// repeat of the widest swizzle, as every stage of the warpgroup kernels
// does; the dynamic shared memory has room for the shift.
constexpr uint32_t kLandingAlignment = 1024;
constexpr int kThreads = 128;
// try_wait answers false after a time limit of the hardware's; this many
// answers (seconds at most) and the probe reports the phase incomplete
// instead of hanging the process.
constexpr int kWaitAttempts = 1 << 20;

// Shared memory is first filled with 0xffff (a NaN in both 16-bit float
// types) so that what no copy wrote shows. completed: 1 where the phase,
// armed with `bytes`, completed within kWaitAttempts; landed then holds
// bytes / 2 elements.
__global__ void LandTensorCopy(const __grid_constant__ ptx::TensorMap map, int32_t inner, int32_t outer,
                               uint32_t bytes, uint16_t* landed, int32_t* completed) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // tensor copies need compute capability 9.0; the harness refuses older devices
#else
  __shared__ uint64_t arrival;
  unsigned char* dynamic = ptx::DynamicShared();
  auto* staged = reinterpret_cast<uint16_t*>(dynamic + ((0u - ptx::SharedAddress(dynamic)) & (kLandingAlignment - 1)));
  if (threadIdx.x == 0) {
    ptx::MbarrierInit(&arrival, 1);
    ptx::FenceMbarrierInit();
  }
  for (uint32_t i = threadIdx.x; i < bytes / 2; i += blockDim.x) staged[i] = 0xffff;
  // The fill's stores (generic proxy) ordered before the copy's (async proxy).
  ptx::FenceProxyAsync();
  __syncthreads();
  if (threadIdx.x == 0) {
    ptx::MbarrierArriveExpectTx(&arrival, bytes);
    ptx::TensorCopy2D(staged, &map, inner, outer, &arrival);
  }
  bool done = false;
  for (int attempt = 0; attempt < kWaitAttempts && !done; ++attempt) done = ptx::MbarrierTryWait(&arrival, 0);
  if (threadIdx.x == 0) *completed = done ? 1 : 0;
  if (!done) return;
  for (uint32_t i = threadIdx.x; i < bytes / 2; i += blockDim.x) landed[i] = staged[i];
#endif
}

// The box of box_inner x box_outer elements at (inner, outer) of an array
// of `outer_size` rows of `inner_size` 16-bit elements, through the tensor
// map launch.EncodeTensorMap makes (the swizzle of a box row), into
// `landed` (box_inner * box_outer elements) and `completed` (one int32),
// both device memory. Returns the launch's status, or -1 where the map
// cannot be made.
template <typename Launch>
int RunTensorCopyProbe(const Launch& launch, const uint16_t* array, int64_t inner_size, int64_t outer_size,
                       int box_inner, int box_outer, int32_t inner, int32_t outer, uint16_t* landed,
                       int32_t* completed) {
  ptx::TensorMap map{};
  if (!launch.EncodeTensorMap(&map, array, inner_size, outer_size, box_inner, box_outer)) return -1;
  const uint32_t bytes = uint32_t(box_inner) * uint32_t(box_outer) * 2;
  launch.WithSharedMemory(bytes + kLandingAlignment)(LandTensorCopy, 1, kThreads, map, inner, outer, bytes, landed,
                                                     completed);
  return launch.Status();
}

}  // namespace probe
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_BINDINGS_TENSOR_COPY_PROBE_CUH_
