// Device helpers shared by the CUDA kernels: storage types, conversions to
// and from float, masks turned into canonical float factors (dead: +0; live:
// the value, with -0 for a live value that is zero in float), so that every
// kernel tells live from dead by "any bit set", whatever the mask dtype, and
// the shared-memory GEMM tile the products are built from.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASK_FACTORS_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_MASK_FACTORS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

__device__ inline float ToFloat(float v) { return v; }
__device__ inline float ToFloat(__half v) { return __half2float(v); }
__device__ inline float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ inline T FromFloat(float v);
template <>
__device__ inline float FromFloat<float>(float v) { return v; }
template <>
__device__ inline __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A mask entry's canonical factor: +0 when dead (0 or -0), else its value in
// float, with a live value that is zero in float kept live as -0.
template <typename TMask>
__device__ inline float CanonicalFactor(TMask v) {
  if (!(v != TMask(0))) return 0.0f;
  const float f = static_cast<float>(v);
  return f == 0.0f ? -0.0f : f;
}
__device__ inline float CanonicalFactor(bool v) { return v ? 1.0f : 0.0f; }
__device__ inline float CanonicalFactor(Float16Bits v) {
  if ((v.bits & 0x7fffu) == 0) return 0.0f;
  const float f = __half2float(__ushort_as_half(v.bits));
  return f == 0.0f ? -0.0f : f;
}
__device__ inline float CanonicalFactor(BFloat16Bits v) {
  if ((v.bits & 0x7fffu) == 0) return 0.0f;
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}

__device__ inline bool Live(float factor) { return __float_as_uint(factor) != 0u; }

// where(factor is live, w * factor, 0): a dead entry never touches w's value.
__device__ inline float Masked(float w, float factor) { return Live(factor) ? w * factor : 0.0f; }

// The GEMM tile: a thread block of kThreads (16 x 16) threads computes a
// kTile x kTile output tile, kPerThread x kPerThread outputs per thread,
// staging kDepthStep of depth at a time in shared memory.
constexpr int kTile = 64;
constexpr int kDepthStep = 16;
constexpr int kThreads = 256;
constexpr int kPerThread = kTile / 16;

// One shared-memory stage, [depth][kTile + 1] each (the pad keeps the column
// reads of a stage off one bank).
using StageTile = float[kDepthStep][kTile + 1];

// acc[i][j] += sum over the stage's depth of a[d][ty + 16 i] * b[d][tx + 16 j]:
// this thread's outputs of the tile, for thread (tx, ty) of the 16 x 16.
__device__ inline void AccumulateStage(const StageTile& a, const StageTile& b, float (&acc)[kPerThread][kPerThread],
                                       int tx, int ty) {
#pragma unroll
  for (int d = 0; d < kDepthStep; ++d) {
    float a_values[kPerThread];
    float b_values[kPerThread];
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

template <typename TMask>
__global__ void CanonicalFactors(const TMask* mask, int64_t count, float* factors) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    factors[i] = CanonicalFactor(mask[i]);
  }
}

}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASK_FACTORS_CUH_
