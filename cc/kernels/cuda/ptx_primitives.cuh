// The PTX instructions the pipelined tensor-core kernels (pipelined_gemm.cuh)
// are built from, one function each: asynchronous 16- and 4-byte copies from
// global to shared memory (cp.async, sm_80), warp-collective loads of 8 x 8 matrices
// from shared memory (ldmatrix), the m16n8k16 tensor-core product with float
// accumulators (mma.sync), Hopper's asynchronous warpgroup product (wgmma,
// sm_90a) with its fences, its tensor copies (cp.async.bulk.tensor, the TMA)
// and the mbarriers they complete on, plus the kernel's dynamic shared memory.
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

#if defined(__CUDACC__)
#include <cuda.h>  // CUtensorMap (the type only: no driver call here)
#else
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

// 4 bytes to shared `dst` from global `src`, both 4-byte aligned (through
// L1: cp.async.cg takes 16 bytes only), landing as CopyAsync16's; when
// !read, dst is zero-filled and src not read.
__device__ inline void CopyAsync4(void* dst, const void* src, bool read) {
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared), "l"(src), "r"(read ? 4 : 0) : "memory");
}

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

// v, which every lane of the warp holds alike, as lane 0 holds it: the same
// value, but one the compiler knows to be uniform, so that the warpgroup
// products branched on it are not serialized (ptxas C7520).
__device__ inline uint32_t WarpUniform(uint32_t v) { return __shfl_sync(0xffffffffu, v, 0); }

// Bit l: lane l's predicate, for every lane of the warp (all reach it).
__device__ inline uint32_t WarpBallot(bool predicate) { return __ballot_sync(0xffffffffu, predicate); }

// The set bits of v.
__device__ inline int PopCount(uint32_t v) { return __popc(v); }

// The address of `p` (in shared memory) in the shared window, as the
// warpgroup matrix descriptors take it.
__device__ inline uint32_t SharedAddress(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Orders this thread's earlier writes to shared memory (its landed cp.async
// copies, its stores) before later reads through the async proxy (wgmma's
// operand reads), once a barrier has passed them on to the other threads.
__device__ inline void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// 16 bytes stored to shared `dst` (16-byte aligned) by the thread: a write
// through the generic proxy, which wgmma and the tensor copies see only
// after the thread's FenceProxyAsync (the emulation checks that).
__device__ inline void StoreShared16(void* dst, const uint4& bits) { *static_cast<uint4*>(dst) = bits; }

// wgmma.fence: the accumulator registers' earlier accesses are ordered before
// the warpgroup products that follow.
__device__ inline void WarpgroupFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Keeps the compiler's hands off the accumulators (an empty asm that reads and
// writes each register) at the edges of a pipeline of warpgroup products:
// ptxas keeps products in flight across a wait only when no other
// instruction defines or reads their accumulators in between, and without
// this it moved or initialized them there in some kernels (C7515) and
// serialized every product.
template <int kN>
__device__ inline void PinAccumulators(float (&acc)[2][kN]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(acc[half][i])::"memory");
  }
}

// The warpgroup products issued since the last commit form a group.
__device__ inline void WarpgroupCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups of warpgroup
// products are still running; the accumulators of the others are final and
// their shared-memory operands no longer read.
template <int kPending>
__device__ inline void WarpgroupWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The accumulator operands and their register list of an m64nNk16 product:
// N / 2 floats of d from kOffset.
#define MASKED_OPS_WGMMA_REGISTERS16 \
  "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define MASKED_OPS_WGMMA_REGISTERS32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define MASKED_OPS_WGMMA_REGISTERS64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21," \
  " %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MASKED_OPS_WGMMA_REGISTERS128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21," \
  " %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41," \
  " %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61," \
  " %62, %63}"
#define MASKED_OPS_WGMMA_ACCUMULATORS8(FIRST)                                                         \
  "+f"(d[kOffset + FIRST]), "+f"(d[kOffset + FIRST + 1]), "+f"(d[kOffset + FIRST + 2]),               \
      "+f"(d[kOffset + FIRST + 3]), "+f"(d[kOffset + FIRST + 4]), "+f"(d[kOffset + FIRST + 5]),       \
      "+f"(d[kOffset + FIRST + 6]), "+f"(d[kOffset + FIRST + 7])
#define MASKED_OPS_WGMMA_ACCUMULATORS16 MASKED_OPS_WGMMA_ACCUMULATORS8(0)
#define MASKED_OPS_WGMMA_ACCUMULATORS32 MASKED_OPS_WGMMA_ACCUMULATORS16, MASKED_OPS_WGMMA_ACCUMULATORS8(8)
#define MASKED_OPS_WGMMA_ACCUMULATORS64 \
  MASKED_OPS_WGMMA_ACCUMULATORS32, MASKED_OPS_WGMMA_ACCUMULATORS8(16), MASKED_OPS_WGMMA_ACCUMULATORS8(24)
#define MASKED_OPS_WGMMA_ACCUMULATORS128                                                                  \
  MASKED_OPS_WGMMA_ACCUMULATORS64, MASKED_OPS_WGMMA_ACCUMULATORS8(32), MASKED_OPS_WGMMA_ACCUMULATORS8(40), \
      MASKED_OPS_WGMMA_ACCUMULATORS8(48), MASKED_OPS_WGMMA_ACCUMULATORS8(56)
#define MASKED_OPS_WGMMA(GUARD, SHAPE, TYPE, REGISTERS, A, B, ONE, ISSUE, TRANSPOSE_A, TRANSPOSE_B, ...)        \
  asm volatile("{\n.reg .pred p, q;\nsetp.ne.b32 p, %" ONE ", 0;\nsetp.ne.b32 q, %" ISSUE ", 0;\n" GUARD          \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " REGISTERS ", %" A ", %" B ", p, 1, 1, " \
               "%" TRANSPOSE_A ", %" TRANSPOSE_B ";\n}\n"                                                     \
               : __VA_ARGS__                                                                                   \
               : "l"(a), "l"(b), "r"(1), "r"(issue ? 1 : 0), "n"(kAMMajor ? 1 : 0), "n"(kBNMajor ? 1 : 0))
// The four forms of one shape: bf16 or f16, guarded by `issue` or not; the
// accumulator operands last.
#define MASKED_OPS_WGMMA_FORMS(SHAPE, REGISTERS, A, B, ONE, ISSUE, TRANSPOSE_A, TRANSPOSE_B, ...)          \
  if constexpr (kBf16 && kGuarded) {                                                           \
    MASKED_OPS_WGMMA("@q ", SHAPE, "bf16", REGISTERS, A, B, ONE, ISSUE, TRANSPOSE_A, TRANSPOSE_B, __VA_ARGS__); \
  } else if constexpr (kBf16) {                                                                \
    MASKED_OPS_WGMMA("", SHAPE, "bf16", REGISTERS, A, B, ONE, ISSUE, TRANSPOSE_A, TRANSPOSE_B, __VA_ARGS__);    \
  } else if constexpr (kGuarded) {                                                             \
    MASKED_OPS_WGMMA("@q ", SHAPE, "f16", REGISTERS, A, B, ONE, ISSUE, TRANSPOSE_A, TRANSPOSE_B, __VA_ARGS__);  \
  } else {                                                                                     \
    MASKED_OPS_WGMMA("", SHAPE, "f16", REGISTERS, A, B, ONE, ISSUE, TRANSPOSE_A, TRANSPOSE_B, __VA_ARGS__);     \
  }

// d[kOffset ..] += A B for the warpgroup (sm_90a), where `issue` (the same in
// the whole warpgroup; kGuarded, else always): A 64 x 16 of E (__half or
// __nv_bfloat16) M-major (kAMMajor: transposed) or K-major and B 16 x kN
// N-major (kBNMajor: transposed) or K-major, both in shared memory as the descriptors a and b give them,
// accumulating in float in the
// m64nNk16 layout: float i of thread 32 w + l holds (16 w + l / 4 + 8 ((i /
// 2) % 2), 8 (i / 4) + 2 (l % 4) + i % 2). Asynchronous: the accumulators and
// the operands belong to the product until a WarpgroupWait says it is done.
// A conditional product is predicated rather than branched over, so that a
// run of them is one block of straight code (ptxas serializes products in
// branches: it waits for each and moves the accumulators between them); the
// guard still costs an injected warpgroup.arrive each (ptxas C7519), so the
// products that always run go unguarded.
template <typename E, int kN, int kOffset, bool kGuarded, bool kAMMajor, bool kBNMajor>
__device__ inline void WarpgroupMma(float (&d)[64], uint64_t a, uint64_t b, bool issue) {
  static_assert(std::is_same_v<E, __half> || std::is_same_v<E, __nv_bfloat16>, "wgmma of 16-bit types here");
  static_assert(kOffset % 2 == 0 && kOffset + kN / 2 <= 64, "the product's accumulators lie in d");
  constexpr bool kBf16 = std::is_same_v<E, __nv_bfloat16>;
  if constexpr (kN == 16) {
    MASKED_OPS_WGMMA_FORMS("m64n16k16", MASKED_OPS_WGMMA_REGISTERS16, "8", "9", "10", "11", "12", "13",
                           MASKED_OPS_WGMMA_ACCUMULATORS16)
  } else if constexpr (kN == 32) {
    MASKED_OPS_WGMMA_FORMS("m64n32k16", MASKED_OPS_WGMMA_REGISTERS32, "16", "17", "18", "19", "20", "21",
                           MASKED_OPS_WGMMA_ACCUMULATORS32)
  } else if constexpr (kN == 64) {
    MASKED_OPS_WGMMA_FORMS("m64n64k16", MASKED_OPS_WGMMA_REGISTERS64, "32", "33", "34", "35", "36", "37",
                           MASKED_OPS_WGMMA_ACCUMULATORS64)
  } else {
    static_assert(kN == 128, "products 16, 32, 64 or 128 columns wide");
    MASKED_OPS_WGMMA_FORMS("m64n128k16", MASKED_OPS_WGMMA_REGISTERS128, "64", "65", "66", "67", "68", "69",
                           MASKED_OPS_WGMMA_ACCUMULATORS128)
  }
}

// A TMA descriptor of a 2-D global array, made on the host (the launch
// policies' EncodeTensorMap) and passed to a kernel as a __grid_constant__
// parameter.
using TensorMap = CUtensorMap;

// An mbarrier in shared memory: each phase completes once `arrivals`
// threads have arrived and every byte they announced has landed. Then
// FenceMbarrierInit and a barrier, before any use by another thread or the
// tensor copies.
__device__ inline void MbarrierInit(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SharedAddress(barrier)), "r"(arrivals) : "memory");
}
__device__ inline void FenceMbarrierInit() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// This thread arrives on `barrier`, announcing `bytes` that tensor copies
// will land in the phase under way.
__device__ inline void MbarrierArriveExpectTx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SharedAddress(barrier)), "r"(bytes)
               : "memory");
}

// True once the phase of `barrier` with this parity (0 for its first
// phase, 1 for the next, ...) has completed; the bytes landed in it are then
// visible to this thread, and to wgmma after a FenceProxyAsync. The hardware
// may suspend the thread for a while before it answers false.
__device__ inline bool MbarrierTryWait(uint64_t* barrier, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(SharedAddress(barrier)), "r"(parity)
      : "memory");
  return done != 0;
}

// Waits until MbarrierTryWait is true.
__device__ inline void MbarrierWait(uint64_t* barrier, uint32_t parity) {
  while (!MbarrierTryWait(barrier, parity)) {
  }
}

// The box of `map` whose first element is (inner, outer) (element
// coordinates; outside the array: zeros) to shared `dst` (128-byte aligned)
// in the map's swizzled layout, completing `bytes` of `barrier`'s phase (the
// whole box, zeros too). One thread issues it.
__device__ inline void TensorCopy2D(void* dst, const TensorMap* map, int32_t inner, int32_t outer, uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(SharedAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(SharedAddress(barrier))
      : "memory");
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
__device__ inline void CopyAsync4(void* dst, const void* src, bool read) {
  cuda_emulation::Engine::Get().CopyAsync(dst, src, read ? 4 : 0, 4);
}
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
__device__ inline uint32_t WarpUniform(uint32_t v) { return cuda_emulation::WarpUniform(v); }
__device__ inline uint32_t WarpBallot(bool predicate) { return cuda_emulation::WarpBallot(predicate); }
__device__ inline int PopCount(uint32_t v) { return __builtin_popcount(v); }
__device__ inline uint32_t SharedAddress(const void* p) { return cuda_emulation::Engine::Get().SharedAddress(p); }
__device__ inline void FenceProxyAsync() { cuda_emulation::Engine::Get().FenceProxyAsync(); }
__device__ inline void StoreShared16(void* dst, const uint4& bits) {
  *static_cast<uint4*>(dst) = bits;
  cuda_emulation::Engine::Get().NoteGenericWrite(dst, sizeof(bits));
}
using TensorMap = cuda_emulation::TensorMap;
__device__ inline void MbarrierInit(uint64_t* barrier, uint32_t arrivals) {
  cuda_emulation::Engine::Get().MbarrierInit(barrier, arrivals);
}
__device__ inline void FenceMbarrierInit() {}
__device__ inline void MbarrierArriveExpectTx(uint64_t* barrier, uint32_t bytes) {
  cuda_emulation::Engine::Get().MbarrierArriveExpectTx(barrier, bytes);
}
__device__ inline bool MbarrierTryWait(uint64_t* barrier, uint32_t parity) {
  return cuda_emulation::Engine::Get().MbarrierTryWait(barrier, parity);
}
__device__ inline void MbarrierWait(uint64_t* barrier, uint32_t parity) {
  cuda_emulation::Engine::Get().MbarrierWait(barrier, parity);
}
__device__ inline void TensorCopy2D(void* dst, const TensorMap* map, int32_t inner, int32_t outer, uint64_t* barrier) {
  cuda_emulation::Engine::Get().TensorCopy(dst, *map, inner, outer, barrier);
}
__device__ inline void WarpgroupFence() {}
template <int kN>
__device__ inline void PinAccumulators(float (&)[2][kN]) {}
__device__ inline void WarpgroupCommit() { cuda_emulation::Engine::Get().CommitWarpgroupMmas(); }
template <int kPending>
__device__ inline void WarpgroupWait() {
  cuda_emulation::Engine::Get().WaitWarpgroupMmas(kPending);
}
template <typename E, int kN, int kOffset, bool kGuarded, bool kAMMajor, bool kBNMajor>
__device__ inline void WarpgroupMma(float (&d)[64], uint64_t a, uint64_t b, bool issue) {
  static_assert(kOffset % 2 == 0 && kOffset + kN / 2 <= 64, "the product's accumulators lie in d");
  cuda_emulation::WarpgroupMma<E>(d + kOffset, kN, a, b, kAMMajor, kBNMajor, !kGuarded || issue);
}

#endif

}  // namespace ptx
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_PTX_PRIMITIVES_CUH_
