// Device helpers shared by the CUDA kernels: storage types, the type each is
// computed in (float, double for double) and conversions to and from it,
// masks turned into canonical factors of that type (dead: +0; live: the
// value, with -0 for a live value that is zero in it), so that every kernel
// tells live from dead by "any bit set", whatever the mask dtype, and the
// shared-memory GEMM tile the CUDA-core products are built from.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASK_FACTORS_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_MASK_FACTORS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cc/kernels/block_mask.h"

namespace masked_ops {
namespace gpu {

// Storage types as the device sees them.
template <typename T>
struct Device {
  using type = T;
};
template <>
struct Device<Float16Bits> {
  using type = __half;
};
template <>
struct Device<BFloat16Bits> {
  using type = __nv_bfloat16;
};

// CUDA's largest grid: 2^31 - 1 thread blocks along x, 65535 along y and z.
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

// The type a device type is computed (and its mask factors held) in.
template <typename D>
using Compute = std::conditional_t<std::is_same_v<D, double>, double, float>;

__device__ inline float ToCompute(float v) { return v; }
__device__ inline double ToCompute(double v) { return v; }
__device__ inline float ToCompute(__half v) { return __half2float(v); }
__device__ inline float ToCompute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename D>
__device__ inline D FromCompute(Compute<D> v);
template <>
__device__ inline float FromCompute<float>(float v) { return v; }
template <>
__device__ inline double FromCompute<double>(double v) { return v; }
template <>
__device__ inline __half FromCompute<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 FromCompute<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A mask entry's canonical factor in F (float or double): +0 when dead (0 or
// -0), else its value, with a live value that is zero in F kept live as -0.
template <typename F, typename TMask>
__device__ inline F CanonicalFactor(TMask v) {
  if (!(v != TMask(0))) return F(0);
  const F f = static_cast<F>(v);
  return f == F(0) ? -F(0) : f;
}
template <typename F>
__device__ inline F CanonicalFactor(bool v) {
  return v ? F(1) : F(0);
}
template <typename F>
__device__ inline F CanonicalFactor(Float16Bits v) {
  if ((v.bits & 0x7fffu) == 0) return F(0);
  return static_cast<F>(__half2float(__ushort_as_half(v.bits)));  // a live float16 is not zero in F
}
template <typename F>
__device__ inline F CanonicalFactor(BFloat16Bits v) {
  if ((v.bits & 0x7fffu) == 0) return F(0);
  return static_cast<F>(__uint_as_float(static_cast<uint32_t>(v.bits) << 16));
}

__device__ inline bool Live(float factor) { return __float_as_uint(factor) != 0u; }
__device__ inline bool Live(double factor) { return __double_as_longlong(factor) != 0; }

// where(factor is live, w * factor, 0): a dead entry never touches w's value.
template <typename C>
__device__ inline C Masked(C w, C factor) {
  return Live(factor) ? w * factor : C(0);
}

// The GEMM tile: a thread block of kThreads (16 x 16) threads computes a
// kTile x kTile output tile, kPerThread x kPerThread outputs per thread,
// staging kDepthStep of depth at a time in shared memory.
constexpr int kTile = 64;
constexpr int kDepthStep = 16;
constexpr int kThreads = 256;
constexpr int kPerThread = kTile / 16;

// One shared-memory stage, [depth][kTile + 1] each (the pad keeps the column
// reads of a stage off one bank).
template <typename C>
using StageTile = C[kDepthStep][kTile + 1];

// acc[i][j] += sum over the stage's depth of a[d][ty + 16 i] * b[d][tx + 16 j]:
// this thread's outputs of the tile, for thread (tx, ty) of the 16 x 16.
template <typename C>
__device__ inline void AccumulateStage(const StageTile<C>& a, const StageTile<C>& b,
                                       C (&acc)[kPerThread][kPerThread], int tx, int ty) {
#pragma unroll
  for (int d = 0; d < kDepthStep; ++d) {
    C a_values[kPerThread];
    C b_values[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      a_values[i] = a[d][ty + 16 * i];
      b_values[i] = b[d][tx + 16 * i];
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[i][j] += a_values[i] * b_values[j];
    }
  }
}

template <typename TMask, typename F>
__global__ void CanonicalFactors(const TMask* mask, int64_t count, F* factors) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    factors[i] = CanonicalFactor<F>(mask[i]);
  }
}

}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASK_FACTORS_CUH_
