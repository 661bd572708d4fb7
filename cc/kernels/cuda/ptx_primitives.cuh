// The PTX instructions the pipelined tensor-core kernels (pipelined_gemm.cuh)
// are built from, one function each: asynchronous 16-byte copies from global
// to shared memory (cp.async, sm_80), warp-collective loads of 8 x 8 matrices
// from shared memory (ldmatrix) and the m16n8k16 tensor-core product with
// float accumulators (mma.sync), plus the kernel's dynamic shared memory.
//
// nvcc compiles them to the instructions; a host compiler (the CUDA
// emulation of tests/cuda_emulation) gets the emulation's versions, which
// exchange operands between the lanes of a warp as the hardware does, so
// that the lane arithmetic of the callers is what the emulated tests check.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_PTX_PRIMITIVES_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_PTX_PRIMITIVES_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if !defined(__CUDACC__)
#include <cuda_emulation_ptx.h>
#endif

namespace masked_ops {
namespace gpu {
namespace ptx {

#if defined(__CUDACC__)

// 16 bytes to shared `dst` from global `src`, both 16-byte aligned, landing
// by a later WaitCopies: the first `bytes` (0 .. 16) read from src, the rest
// zero-filled.
__device__ inline void CopyAsyncHead(void* dst, const void* src, int bytes) {
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(src), "r"(bytes) : "memory");
}

// The same for all 16 bytes or none: when !read, dst is zero-filled and src
// not read.
__device__ inline void CopyAsync16(void* dst, const void* src, bool read) { CopyAsyncHead(dst, src, read ? 16 : 0); }

// The copies issued since the last commit form a group.
__device__ inline void CommitCopies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until every committed group of this thread but the newest kPending
// has landed. Other threads see the data after a __syncthreads.
template <int kPending>
__device__ inline void WaitCopies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ldmatrix .x4 (.trans when kTransposed): lane l gives the shared-memory
// address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned); register
// j receives matrix j's elements (l / 4, 2 (l % 4) + {0, 1}), or transposed
// (2 (l % 4) + {0, 1}, l / 4).
template <bool kTransposed>
__device__ inline void LoadMatrices(uint32_t (&r)[4], const void* row) {
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTransposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared)
                 : "memory");
  }
}

// d += a b for a 16 x 16 A (row-major fragment), a 16 x 8 B (column-major
// fragment) of E (__half or __nv_bfloat16) and float accumulators, in the
// mma.sync m16n8k16 fragment layouts.
template <typename E>
__device__ inline void Mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<E, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<E, __half>, "mma.sync m16n8k16 takes __half or __nv_bfloat16 here");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// d += a b for a 16 x 8 A, an 8 x 8 B of TF32 (float bits, low 13 ignored)
// and float accumulators, in the mma.sync m16n8k8 .tf32 fragment layouts:
// A's register i holds (g + 8 (i % 2), t + 4 (i / 2)), B's (t + 4 i, g), d as
// for m16n8k16 (g = lane / 4, t = lane % 4).
__device__ inline void Mma1688Tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The launch's dynamic shared memory.
__device__ inline unsigned char* DynamicShared() {
  extern __shared__ __align__(128) unsigned char dynamic_shared[];
  return dynamic_shared;
}

#else  // a host compiler: the CUDA emulation's instructions

__device__ inline void CopyAsyncHead(void* dst, const void* src, int bytes) {
  cuda_emulation::Engine::Get().CopyAsync(dst, src, bytes);
}
__device__ inline void CopyAsync16(void* dst, const void* src, bool read) { CopyAsyncHead(dst, src, read ? 16 : 0); }
__device__ inline void CommitCopies() { cuda_emulation::Engine::Get().CommitCopies(); }
template <int kPending>
__device__ inline void WaitCopies() {
  cuda_emulation::Engine::Get().WaitCopies(kPending);
}
template <bool kTransposed>
__device__ inline void LoadMatrices(uint32_t (&r)[4], const void* row) {
  cuda_emulation::LoadMatrices(r, row, kTransposed);
}
template <typename E>
__device__ inline void Mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  cuda_emulation::Mma16816<E>(d, a, b);
}
__device__ inline void Mma1688Tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  cuda_emulation::Mma1688Tf32(d, a, b);
}
__device__ inline unsigned char* DynamicShared() { return cuda_emulation::Engine::Get().DynamicShared(); }

#endif

}  // namespace ptx
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_PTX_PRIMITIVES_CUH_
