// The warp-collective PTX instructions of cc/kernels/cuda/ptx_primitives.cuh
// under the CUDA emulation (see cuda_emulation.h): ldmatrix .x4 and
// mma.sync m16n8k16 (16-bit) and m16n8k8 (TF32) with float accumulators, computed from the operands every
// lane of the warp deposits, in the layouts of the PTX ISA; and wgmma
// m64nNk16 (16-bit, B N-major), queued per thread until its wait_group.
// (cp.async is the engine's: Engine::CopyAsync, CommitCopies, WaitCopies.)
//
// Precision: products of the 16-bit and TF32 operands are exact in float and are
// added in k order onto the accumulator, as in the emulated wmma::mma_sync.
// Checked: every ldmatrix row address is 16-byte aligned.
#ifndef MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_EMULATION_PTX_H_
#define MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_EMULATION_PTX_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_emulation.h"
#include "cuda_fp16.h"
#include "mma.h"

namespace cuda_emulation {

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address
// of row l % 8 of matrix l / 8; register j of lane l receives matrix j's
// elements (l / 4, 2 (l % 4) + {0, 1}), transposed: (2 (l % 4) + {0, 1}, l / 4),
// the lower-indexed element in the low 16 bits.
__attribute__((noinline)) inline void LoadMatrices(uint32_t (&r)[4], const void* row, bool transposed) {
  Engine& engine = Engine::Get();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) engine.Report("ldmatrix: a row address not 16-byte aligned");
  const unsigned char* exchange = engine.WarpExchange(&row, sizeof(row), __builtin_return_address(0));
  const auto row_of = [&](int lane) {
    const unsigned char* address;
    std::memcpy(&address, exchange + lane * 64, sizeof(address));
    return address;
  };
  const auto element = [&](int lane, int column) {
    uint16_t value;
    std::memcpy(&value, row_of(lane) + 2 * column, sizeof(value));
    return static_cast<uint32_t>(value);
  };
  const int lane = static_cast<int>(Engine::Lane());
  for (int j = 0; j < 4; ++j) {
    if (!transposed) {
      r[j] = element(j * 8 + lane / 4, 2 * (lane % 4)) | element(j * 8 + lane / 4, 2 * (lane % 4) + 1) << 16;
    } else {
      r[j] = element(j * 8 + 2 * (lane % 4), lane / 4) | element(j * 8 + 2 * (lane % 4) + 1, lane / 4) << 16;
    }
  }
}

namespace ptx_detail {

inline float Widen(uint16_t bits, __half) { return __half2float(__ushort_as_half(bits)); }
inline float Widen(uint16_t bits, __nv_bfloat16) { return __bfloat162float(__ushort_as_bfloat16(bits)); }

// A lane's operands of one mma.sync.
struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

// d = A B + d of one m16n8k<kDepth> mma.sync of the current lane (g = lane /
// 4, t = lane % 4), from the operands every lane deposits at `site`. A
// register holds kDepth / 8 operands along k (decode(word, i) gives the i-th
// as a float): A's register i covers rows g + 8 (i % 2) and k from 4 (i / 2)
// operand pairs on, B's register i k from 4 i pairs on at column g, so that
// lane 4 g + t holds k = 4 (kDepth / 8) r + (kDepth / 8) t + .. of register
// group r; d[i] is the accumulator (g + 8 (i / 2), 2 t + i % 2).
template <int kDepth, typename Decode>
inline void WarpMma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const void* site,
                    const Decode& decode) {
  constexpr int kPerRegister = kDepth / 8;
  constexpr int kGroup = 4 * kPerRegister;  // k covered by one register of each of the 4 lanes of a row
  Engine& engine = Engine::Get();
  const int lane = static_cast<int>(Engine::Lane());
  if (lane == 0) ++engine.stats().mma_syncs;
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, d, sizeof(mine.c));
  const unsigned char* exchange = engine.WarpExchange(&mine, sizeof(mine), site);
  const auto operands = [&](int from) {
    MmaOperands theirs;
    std::memcpy(&theirs, exchange + from * 64, sizeof(theirs));
    return theirs;
  };
  const auto a_at = [&](int row, int k) {
    return decode(operands((row % 8) * 4 + k % kGroup / kPerRegister).a[row / 8 + 2 * (k / kGroup)], k % kPerRegister);
  };
  const auto b_at = [&](int k, int column) {
    return decode(operands(column * 4 + k % kGroup / kPerRegister).b[k / kGroup], k % kPerRegister);
  };
  const int g = lane / 4;
  const int t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2);
    const int column = 2 * t + i % 2;
    float sum = mine.c[i];
    for (int k = 0; k < kDepth; ++k) sum += a_at(row, k) * b_at(k, column);  // each product exact in float
    d[i] = sum;
  }
}

}  // namespace ptx_detail

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d = A B + d, with (g =
// lane / 4, t = lane % 4) A's register i holding (g + 8 (i % 2), 2 t + 8 (i /
// 2) + {0, 1}), B's register i (2 t + 8 i + {0, 1}, g) and d[i] the
// accumulator (g + 8 (i / 2), 2 t + i % 2); the lower k in the low 16 bits.
template <typename E>
__attribute__((noinline)) void Mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<E, __half> || std::is_same_v<E, __nv_bfloat16>, "mma.sync m16n8k16 of 16-bit types");
  ptx_detail::WarpMma<16>(d, a, b, __builtin_return_address(0), [](uint32_t word, int half) {
    return ptx_detail::Widen(static_cast<uint16_t>(half == 0 ? word : word >> 16), E{});
  });
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d = A B + d, with A's
// register i holding (g + 8 (i % 2), t + 4 (i / 2)), B's register i (t + 4 i,
// g) and d as for m16n8k16; the operands' low 13 mantissa bits ignored, as
// the tensor cores ignore them (mma.h's Tf32Operand).
__attribute__((noinline)) inline void Mma1688Tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ptx_detail::WarpMma<8>(d, a, b, __builtin_return_address(0), [](uint32_t word, int) {
    float value;
    std::memcpy(&value, &word, sizeof(value));
    return nvcuda::wmma::detail::Tf32Operand(value);
  });
}

// __shfl_sync(~0u, v, 0), where the caller claims every lane holds v: a
// lane that holds another value is reported.
__attribute__((noinline)) inline uint32_t WarpUniform(uint32_t v) {
  Engine& engine = Engine::Get();
  const unsigned char* exchange = engine.WarpExchange(&v, sizeof(v), __builtin_return_address(0));
  uint32_t first;
  std::memcpy(&first, exchange, sizeof(first));
  if (first != v) engine.Report("a value taken as warp-uniform differs between lanes");
  return first;
}

// __ballot_sync(~0u, predicate): bit l the predicate of lane l.
__attribute__((noinline)) inline uint32_t WarpBallot(bool predicate) {
  const unsigned char* exchange =
      Engine::Get().WarpExchange(&predicate, sizeof(predicate), __builtin_return_address(0));
  uint32_t bits = 0;
  for (unsigned lane = 0; lane < warpSize; ++lane) {
    bits |= static_cast<uint32_t>(exchange[lane * 64] != 0) << lane;
  }
  return bits;
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.E.E with A M-major (a_m_major:
// imm-trans-a 1) or K-major and B N-major (b_n_major: imm-trans-b 1) or
// K-major in shared memory, scale-d 1:
// queued for the current
// thread and run by the wgmma.wait_group that retires it (the engine's
// WaitWarpgroupMmas), with float i of thread 32 w + l accumulating (16 w + l /
// 4 + 8 ((i / 2) % 2), 8 (i / 4) + 2 (l % 4) + i % 2).
// Where `issue` is false the product is skipped (a predicated-off wgmma);
// `issue` must be alike in the warp.
template <typename E>
__attribute__((noinline)) void WarpgroupMma(float* d, int n, uint64_t a, uint64_t b, bool a_m_major, bool b_n_major,
                                            bool issue) {
  static_assert(std::is_same_v<E, __half> || std::is_same_v<E, __nv_bfloat16>, "wgmma of 16-bit types");
  Engine& engine = Engine::Get();
  const unsigned char* exchange = engine.WarpExchange(&issue, sizeof(issue), __builtin_return_address(0));
  for (unsigned lane = 0; lane < warpSize; ++lane) {
    if (static_cast<bool>(exchange[lane * 64]) != issue) engine.Report("wgmma: a predicate that differs between lanes");
  }
  if (!issue) return;
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  engine.IssueWarpgroupMma(
      PendingWarpgroupMma{d, n, a, b, a_m_major, b_n_major, [](uint16_t bits) { return ptx_detail::Widen(bits, E{}); }, thread});
}

}  // namespace cuda_emulation

#endif  // MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_EMULATION_PTX_H_
