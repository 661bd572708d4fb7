// mma.h of the CUDA emulation (see cuda_emulation.h): nvcuda::wmma for the
// shapes sm_80 has for these types (m16n16k16 for __half / __nv_bfloat16,
// m16n16k8 for precision::tf32) with float accumulators.
//
// A WMMA operation is warp-collective and spreads a fragment's elements over
// the warp's lanes in a layout CUDA leaves unspecified. Here every thread
// holds a whole private copy of the fragment (num_elements = rows x cols,
// x[r * cols + c]) and every lane does the whole operation: loads, fills and
// per-element code act on the copy, and the copies of a warp stay equal. So
// code that uses fragments whole (or converts every element, as TF32 needs)
// behaves as on a GPU. A store writes from lane 0 only, so that the lanes'
// copies do not race; mma_sync is computed by every lane (only lane 0's
// result is ever stored, but each lane's copy stays right).
//
// Precision: matrix products take exact products of the operands and add them
// in float, in k order, onto the accumulator. A tf32 operand's low 13
// mantissa bits are ignored, as the tensor cores ignore them: a kernel that
// forgets __float_to_tf32 gets truncated operands, as on hardware.
//
// Checked (as diagnostics, see cuda_emulation.h): every load / store pointer
// is 256-bit aligned and every leading dimension a multiple of 16 bytes, as
// the PTX ISA requires.
#ifndef MASKED_OPS_TESTS_CUDA_EMULATION_MMA_H_
#define MASKED_OPS_TESTS_CUDA_EMULATION_MMA_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_emulation.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <typename T>
constexpr bool kSupportedShape(int m, int n, int k) {
  if (m != 16 || n != 16) return false;
  if constexpr (std::is_same_v<T, precision::tf32>) return k == 8;
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) return k == 16;
  return false;
}

inline float ToFloat(float v) { return v; }
inline float ToFloat(__half v) { return __half2float(v); }
inline float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

// What the tensor cores read of a tf32 operand: its upper 19 bits (a NaN
// stays NaN).
inline float Tf32Operand(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits & 0x7fffffffu) > 0x7f800000u ? bits | 0x7fffe000u : bits & 0xffffe000u;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename E>
void CheckMemory(const E* pointer, unsigned ldm, const char* what) {
  auto& engine = cuda_emulation::Engine::Get();
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) {
    engine.Report(std::string("wmma::") + what + ": pointer not 256-bit aligned");
  }
  if ((ldm * sizeof(E)) % 16 != 0) {
    engine.Report(std::string("wmma::") + what + ": leading dimension " + std::to_string(ldm) +
                  " not a multiple of 16 bytes");
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float> && std::is_void_v<Layout>
                                                 : detail::kSupportedShape<T>(M, N, K) &&
                                                       (std::is_same_v<Layout, row_major> ||
                                                        std::is_same_v<Layout, col_major>),
                "a WMMA fragment CUDA does not have (for these types)");
  using element_type = typename detail::Storage<T>::type;
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  enum { num_elements = rows * cols };
  element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
__device__ inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f,
                                     const typename fragment<Use, M, N, K, T, Layout>::element_type& value) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

// matrix_a / matrix_b: element (r, c) at p[r * ldm + c] (row_major) or
// p[c * ldm + r] (col_major).
template <typename Use, int M, int N, int K, typename T, typename Layout>
__device__ inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                                        const typename fragment<Use, M, N, K, T, Layout>::element_type* p,
                                        unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  detail::CheckMemory(p, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool kRowMajor = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = kRowMajor ? p[r * ldm + c] : p[c * ldm + r];
  }
}

template <int M, int N, int K>
__device__ inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                                        layout_t layout) {
  detail::CheckMemory(p, ldm, "load_matrix_sync");
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

// Lane 0 of the warp writes the fragment (the other lanes hold the same copy).
template <int M, int N, int K>
__device__ inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                                         layout_t layout) {
  detail::CheckMemory(p, ldm, "store_matrix_sync");
  if (cuda_emulation::Engine::Lane() != 0) return;
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
    }
  }
}

// d = a b + c.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
__device__ inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                                const fragment<matrix_a, M, N, K, T, LayoutA>& a,
                                const fragment<matrix_b, M, N, K, T, LayoutB>& b,
                                const fragment<accumulator, M, N, K, float>& c) {
  if (cuda_emulation::Engine::Lane() == 0) ++cuda_emulation::Engine::Get().stats().mma_syncs;
  constexpr bool kTf32 = std::is_same_v<T, precision::tf32>;
  float av[M][K];
  float bv[K][N];
  for (int i = 0; i < M; ++i) {
    for (int k = 0; k < K; ++k) {
      const float v = detail::ToFloat(a.x[i * K + k]);
      av[i][k] = kTf32 ? detail::Tf32Operand(v) : v;
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < N; ++j) {
      const float v = detail::ToFloat(b.x[k * N + j]);
      bv[k][j] = kTf32 ? detail::Tf32Operand(v) : v;
    }
  }
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += av[i][k] * bv[k][j];  // each product exact in float
      out[i * N + j] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof(out));  // d may be c
}

// cvt.rna.tf32.f32: round to a 10-bit mantissa, to nearest, ties away from
// zero (a carry bumps the exponent, up to Inf); Inf kept, NaN a quiet NaN.
// The result is a float with the low 13 bits clear.
__device__ inline float __float_to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    bits = (bits | 0x7fffe000u) & 0xffffe000u;
  } else if ((bits & 0x7f800000u) != 0x7f800000u) {
    bits = (bits + 0x1000u) & 0xffffe000u;  // the magnitude bits: half a tf32 unit, away from zero
  }
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // MASKED_OPS_TESTS_CUDA_EMULATION_MMA_H_
