// cuda_bf16.h of the CUDA emulation (see cuda_emulation.h): __nv_bfloat16 as
// its 16 bits, with the conversions the kernels use (no arithmetic, no
// implicit conversions; see cuda_fp16.h).
#ifndef MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_BF16_H_
#define MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_BF16_H_

#include <cstdint>
#include <cstring>

#include "cuda_emulation.h"

struct __nv_bfloat16 {
  unsigned short __x;
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 is 16 bits");

__host__ __device__ inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
__host__ __device__ inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }

// Exact: the upper 16 bits of a float.
__host__ __device__ inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.__x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Round to nearest, ties to even; overflow to Inf; NaN stays NaN (quiet).
__host__ __device__ inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((bits >> 16) | 0x40u)};
  return __nv_bfloat16{static_cast<unsigned short>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}

__host__ __device__ inline __nv_bfloat16 __float2bfloat16(float value) { return __float2bfloat16_rn(value); }

#endif  // MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_BF16_H_
