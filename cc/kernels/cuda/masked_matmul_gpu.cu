// CUDA kernels for masked_matmul (see masked_matmul_gpu.h).
//
// Each call first turns the mask into canonical factors (dead: +0;
// live: its value, -0 for a live value that rounds to zero, so that liveness
// is "any bit set"), marks the live blocks, and lists, per output block
// column (forward) or block row (dx), the live blocks to multiply. The
// products then run over those lists only: a dead block is never read. Three
// kinds of product: the pipelined tensor-core tile for float16 / bfloat16
// where MatmulUsesPipeline says so (pipelined_gemm.cuh: per 128-column tile
// lists of live segments, cp.async stages, ldmatrix + mma.sync); the WMMA
// tile (tensor_core_tile.cuh; the half types elsewhere, and float32 as TF32
// when allowed) where the output's block edges fall on multiples of 16
// (MatmulUsesTensorCores); else plain shared-memory tiles of float FMAs
// (mask_factors.cuh).
//
// The kernels are in masked_matmul_kernels.cuh and their launch sequences in
// masked_matmul_launch.cuh; this file launches them on a stream.
#include <cuda_runtime.h>

#include <atomic>

#include "cc/kernels/cuda/cuda_launch.cuh"
#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/kernels/cuda/masked_matmul_launch.cuh"
#include "cc/kernels/cuda/tensor_core_tile.cuh"

namespace masked_ops {
namespace gpu {

namespace {
// The current device's compute capability as 10 major + minor, 0 where the
// runtime cannot say.
int ComputeCapability() {
  int device = 0;
  int major = 0;
  int minor = 0;
  const bool known = cudaGetDevice(&device) == cudaSuccess &&
                     cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                     cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
  return known ? 10 * major + minor : 0;
}
}  // namespace

namespace tensor_core {
bool DeviceSupportsTensorCores() { return ComputeCapability() >= 80; }
}  // namespace tensor_core

namespace warpgroup {
namespace {
std::atomic<Products> chosen_products{Products::kForward};
std::atomic<int64_t> tensor_map_refusals{0};
std::atomic<bool> tall_tiles{false};
}  // namespace

void SetProducts(Products products) { chosen_products = products; }
Products ChosenProducts() { return chosen_products; }
void CountTensorMapRefusal() { ++tensor_map_refusals; }
int64_t TensorMapRefusals() { return tensor_map_refusals; }
void SetTallTiles(bool on) { tall_tiles = on; }
bool TallTiles() { return tall_tiles; }

bool DeviceRunsWarpgroupMma() {
#if defined(MASKED_OPS_SM90A_CODE)
  return ComputeCapability() == 90;
#else
  return false;
#endif
}
}  // namespace warpgroup

template <typename T, typename TMask>
int MaskedMatmul(const MatmulShape& shape, const T* x, const T* w, MaskView<TMask> mask, T* y,
                 void* workspace, GpuMath math, Stream stream) {
  return RunProduct<T, false>(OnStream(stream), shape, x, w, mask, y, workspace, math);
}

template <typename T, typename TMask>
int MaskedMatmulGradInput(const MatmulShape& shape, const T* dy, const T* w, MaskView<TMask> mask,
                          T* dx, void* workspace, GpuMath math, Stream stream) {
  return RunProduct<T, true>(OnStream(stream), shape, dy, w, mask, dx, workspace, math);
}

template <typename T, typename TMask>
int MaskedMatmulGradWeight(const MatmulShape& shape, const T* x, const T* dy, MaskView<TMask> mask,
                           T* dw, void* workspace, GpuMath math, Stream stream) {
  return RunGradWeight<T>(OnStream(stream), shape, x, dy, mask, dw, workspace, math);
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                        \
  template int MaskedMatmul<T, TMask>(const MatmulShape&, const T*, const T*, MaskView<TMask>,   \
                                      T*, void*, GpuMath, Stream);                               \
  template int MaskedMatmulGradInput<T, TMask>(const MatmulShape&, const T*, const T*,           \
                                               MaskView<TMask>, T*, void*, GpuMath, Stream);     \
  template int MaskedMatmulGradWeight<T, TMask>(const MatmulShape&, const T*, const T*,          \
                                                MaskView<TMask>, T*, void*, GpuMath, Stream);

MASKED_OPS_FOR_EACH_GPU_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

#define MASKED_OPS_INSTANTIATE(T)                                                         \
  template size_t GpuWorkspaceBytes<T>(const MatmulShape&, MaskLevel, Product);            \
  template bool MatmulUsesTensorCores<T>(const BlockGrid&, Product, GpuMath);                 \
  template bool MatmulUsesPipeline<T>(const BlockGrid&, Product, GpuMath, MaskLevel);

MASKED_OPS_FOR_EACH_GPU_TYPE(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace gpu
}  // namespace masked_ops
