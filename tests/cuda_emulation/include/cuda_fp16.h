// cuda_fp16.h of the CUDA emulation (see cuda_emulation.h): __half as its
// 16 bits, with the conversions the kernels use. No arithmetic operators and
// no implicit conversions, so that a kernel doing half arithmetic (which
// CUDA would round per operation) fails to compile here instead of silently
// computing in float.
#ifndef MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_FP16_H_
#define MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_FP16_H_

#include <cstdint>
#include <cstring>

#include "cuda_emulation.h"

struct __half {
  unsigned short __x;
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 16 bits");

__host__ __device__ inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
__host__ __device__ inline unsigned short __half_as_ushort(__half h) { return h.__x; }

// Exact: every float16 is a float.
__host__ __device__ inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exponent = (h.__x >> 10) & 0x1fu;
  const uint32_t mantissa = h.__x & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // zero or subnormal, exact
    std::memcpy(&bits, &magnitude, sizeof(bits));
    bits |= sign;
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // Inf, NaN (payload kept)
  } else {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Round to nearest, ties to even; overflow to Inf; NaN stays NaN (quiet).
__host__ __device__ inline __half __float2half_rn(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {
    return __half{static_cast<unsigned short>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu))};
  }
  if (magnitude >= 0x477ff000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // >= 65520
  uint32_t quotient, remainder, half_unit;
  if (magnitude < 0x38800000u) {
    // Below 2^-14: a multiple of 2^-24 (subnormal or zero). 2^-25 and below round to zero.
    if (magnitude <= 0x33000000u) return __half{static_cast<unsigned short>(sign)};
    const uint32_t shift = 126u - (magnitude >> 23);  // 14 .. 24
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
    quotient = significand >> shift;
    remainder = significand & ((1u << shift) - 1u);
    half_unit = 1u << (shift - 1u);
  } else {
    const uint32_t rebiased = magnitude - 0x38000000u;  // exponent bias 127 -> 15
    quotient = rebiased >> 13;
    remainder = rebiased & 0x1fffu;
    half_unit = 0x1000u;
  }
  // To nearest, ties to even; a carry out of the mantissa bumps the exponent.
  if (remainder > half_unit || (remainder == half_unit && (quotient & 1u) != 0)) ++quotient;
  return __half{static_cast<unsigned short>(sign | quotient)};
}

__host__ __device__ inline __half __float2half(float value) { return __float2half_rn(value); }

#endif  // MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_FP16_H_
