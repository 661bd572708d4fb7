// Small kernels that check the CUDA emulation itself: that barriers order
// shared memory, that the schedules expose a missing barrier, that the
// emulation reports what it promises to report, that WMMA computes the
// product of its fragments in every layout, that ldmatrix and mma.sync
// compose into a product as the PTX ISA lays out their fragments, and that
// cp.async data lands only when waited for; and the tensor-copy probe of the
// GPU harness (cc/bindings/tensor_copy_probe.cuh) under the emulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cc/bindings/tensor_copy_probe.cuh"
#include "cc/kernels/cuda/ptx_primitives.cuh"
#include "cc/kernels/cuda/warpgroup_gemm.cuh"
#include "tests/cuda_emulation/emulator.h"

namespace {

using masked_ops::emulation::Arena;
using masked_ops::emulation::EmulatedLaunch;
namespace wmma = nvcuda::wmma;
namespace ptx = masked_ops::gpu::ptx;

constexpr int kThreads = 256;

// out[b] = the sum of block b's 256 inputs, staged in shared memory.
template <bool kBarrier>
__global__ void BlockSums(const float* in, float* out) {
  __shared__ float values[kThreads];
  values[threadIdx.x] = in[blockIdx.x * kThreads + threadIdx.x];
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int i = 0; i < kThreads; ++i) sum += values[i];
    out[blockIdx.x] = sum;
  }
}

__global__ void BarrierAfterExit(float* out) {
  if (threadIdx.x < 128) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void BarriersAtTwoSites(float* out) {
  // Different code around the two calls, so that the compiler keeps them apart.
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x + 256] = 3.0f;
  } else {
    out[threadIdx.x] = 2.0f;
    __syncthreads();
    out[threadIdx.x + 256] = 4.0f;
  }
}

__global__ void Traps(float* out) {
  if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

__global__ void WritesOnePast(float* out, int64_t n) {
  if (threadIdx.x == 0) out[n] = 1.0f;
}

__global__ void MisalignedLoad(const float* in, float* out) {
  __shared__ __align__(128) float tile[16 * 20];
  for (int e = threadIdx.x; e < 16 * 20; e += blockDim.x) tile[e] = in[e % 256];
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  const __half* base = reinterpret_cast<const __half*>(tile);
  wmma::load_matrix_sync(a, base + 4, 20);  // 8 bytes past an aligned pointer; 40-byte rows
  out[threadIdx.x] = 0.0f;
}

// d = a b + c for 16 x 16 float matrices (row-major in memory), on one warp:
// A staged column-major (kColA) or row-major, B the other way, operands
// as T (__half, __nv_bfloat16) or TF32 (T = float).
template <typename T, bool kColA>
__global__ void WarpProduct(const float* a, const float* b, const float* c, float* d) {
  constexpr int kK = std::is_same_v<T, float> ? 8 : 16;
  using Element = std::conditional_t<std::is_same_v<T, float>, wmma::precision::tf32, T>;
  using LayoutA = std::conditional_t<kColA, wmma::col_major, wmma::row_major>;
  using LayoutB = std::conditional_t<kColA, wmma::row_major, wmma::col_major>;
  __shared__ __align__(128) T a_tile[16 * 16];
  __shared__ __align__(128) T b_tile[16 * 16];
  __shared__ __align__(128) float out[16 * 16];
  for (int e = threadIdx.x; e < 256; e += blockDim.x) {
    const int r = e / 16;
    const int k = e % 16;
    T av, bv;
    if constexpr (std::is_same_v<T, __half>) {
      av = __float2half_rn(a[e]);
      bv = __float2half_rn(b[e]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      av = __float2bfloat16_rn(a[e]);
      bv = __float2bfloat16_rn(b[e]);
    } else {
      av = a[e];
      bv = b[e];
    }
    a_tile[kColA ? k * 16 + r : r * 16 + k] = av;  // A(r, k)
    b_tile[kColA ? r * 16 + k : k * 16 + r] = bv;  // B(r, k) at (row r, col k): row-major r * 16 + k
  }
  __syncthreads();
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc;
  wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
  for (int k0 = 0; k0 < 16; k0 += kK) {
    wmma::fragment<wmma::matrix_a, 16, 16, kK, Element, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, kK, Element, LayoutB> fb;
    wmma::load_matrix_sync(fa, a_tile + (kColA ? k0 * 16 : k0), 16);
    wmma::load_matrix_sync(fb, b_tile + (kColA ? k0 * 16 : k0), 16);
    if constexpr (std::is_same_v<T, float>) {
      for (int t = 0; t < fa.num_elements; ++t) fa.x[t] = wmma::__float_to_tf32(fa.x[t]);
      for (int t = 0; t < fb.num_elements; ++t) fb.x[t] = wmma::__float_to_tf32(fb.x[t]);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < 256; e += blockDim.x) d[e] = out[e];
}

// ldmatrix on half of a warp: undefined on a GPU.
__global__ void HalfWarpLoadsMatrices(float* out) {
  __shared__ __align__(16) __nv_bfloat16 tile[32 * 8];
  for (int e = threadIdx.x; e < 32 * 8; e += blockDim.x) tile[e] = __float2bfloat16_rn(1.0f);
  __syncthreads();
  uint32_t r[4] = {};
  if (threadIdx.x < 16) ptx::LoadMatrices<false>(r, tile + threadIdx.x * 8);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// out = in (64 x 4 floats), through shared memory by cp.async, waiting for the
// copies before the barrier (kWait) or not.
template <bool kWait>
__global__ void CopiesThroughShared(const float* in, float* out) {
  __shared__ __align__(16) float staged[256];
  ptx::CopyAsync16(staged + threadIdx.x * 4, in + threadIdx.x * 4, true);
  ptx::CommitCopies();
  if (kWait) ptx::WaitCopies<0>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = staged[(threadIdx.x * 4 + 32 + i) % 256];
}

// A tensor copy of the box at (4, 5) of 16 x 8 16-bit elements, 32-byte
// swizzle, into dynamic shared memory: before (staged before the wait on the
// mbarrier) and after (the landed box), 256 bytes each, as they lie there.
__global__ void TensorCopyThroughShared(const __grid_constant__ ptx::TensorMap map, float* before, float* after) {
  __shared__ uint64_t arrival;
  auto* staged = reinterpret_cast<float*>(ptx::DynamicShared());
  if (threadIdx.x == 0) {
    ptx::MbarrierInit(&arrival, 1);
    ptx::FenceMbarrierInit();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ptx::MbarrierArriveExpectTx(&arrival, 16 * 8 * 2);
    ptx::TensorCopy2D(staged, &map, 4, 5, &arrival);
  }
  __syncthreads();
  before[threadIdx.x] = staged[threadIdx.x];
  __syncthreads();
  ptx::MbarrierWait(&arrival, 0);
  after[threadIdx.x] = staged[threadIdx.x];
}

// One m64n16k16 product (A 64 x 16 and B 16 x 16 of ones, K-major, 32-byte
// swizzle) of a stage that the warpgroup fills with stores, fenced by each
// storing thread (kFence) or not before the barrier: out[t] = the thread's
// first accumulator, 16.
template <bool kFence>
__global__ void ProductOfStoredStage(float* out) {
  namespace wg = masked_ops::gpu::warpgroup;
  using Layout = wg::SwizzledLayout<16, false>;
  unsigned char* dynamic = ptx::DynamicShared();
  auto* stage = reinterpret_cast<__nv_bfloat16*>(dynamic + ((0u - ptx::SharedAddress(dynamic)) & 1023u));
  constexpr uint32_t kOnes = 0x3f803f80u;  // two bfloat16 1.0
  constexpr int kChunks = (64 + 16) * 16 / 8;
  for (int c = threadIdx.x; c < kChunks; c += blockDim.x) {
    ptx::StoreShared16(stage + c * 8, uint4{kOnes, kOnes, kOnes, kOnes});
  }
  if (kFence) ptx::FenceProxyAsync();
  __syncthreads();
  const uint32_t address = ptx::SharedAddress(stage);
  float d[64] = {};
  ptx::WarpgroupFence();
  ptx::WarpgroupMma<__nv_bfloat16, 16, 0, false, false, false>(d, wg::Descriptor<Layout>(address),
                                                               wg::Descriptor<Layout>(address + 64 * 32), true);
  ptx::WarpgroupCommit();
  ptx::WarpgroupWait<0>();
  out[threadIdx.x] = d[0];
}

// Every thread waits for the first phase of an mbarrier on which no thread
// arrives: a hang on a GPU.
__global__ void WaitsForNoArrival(float* out) {
  __shared__ uint64_t arrival;
  if (threadIdx.x == 0) ptx::MbarrierInit(&arrival, 1);
  __syncthreads();
  ptx::MbarrierWait(&arrival, 0);
  out[threadIdx.x] = 1.0f;
}

// d = a b + c for 16 x 16 float matrices (row-major in memory) on one warp
// with ldmatrix and mma.sync m16n8k16 (two 8-column halves), the operands as
// __nv_bfloat16: A staged row-major, B as [k][n] (kBDepthOuter: loaded
// transposed) or [n][k]; the lane addresses as the pipelined kernels give them.
template <bool kBDepthOuter>
__global__ void MmaProduct(const float* a, const float* b, const float* c, float* d) {
  __shared__ __align__(16) __nv_bfloat16 a_tile[16 * 16];
  __shared__ __align__(16) __nv_bfloat16 b_tile[16 * 16];
  for (int e = threadIdx.x; e < 256; e += blockDim.x) {
    const int r = e / 16;
    const int k = e % 16;
    a_tile[e] = __float2bfloat16_rn(a[e]);                                     // A(r, k)
    b_tile[kBDepthOuter ? e : k * 16 + r] = __float2bfloat16_rn(b[e]);         // B(r, k) as row r of [k][n], or [n][k]
  }
  __syncthreads();
  const int lane = threadIdx.x;
  const int matrix = lane / 8;
  uint32_t fa[4];
  uint32_t fb[4];
  ptx::LoadMatrices<false>(fa, a_tile + (lane % 16) * 16 + lane / 16 * 8);
  if (kBDepthOuter) {
    ptx::LoadMatrices<true>(fb, b_tile + (matrix % 2 * 8 + lane % 8) * 16 + matrix / 2 * 8);
  } else {
    ptx::LoadMatrices<false>(fb, b_tile + (matrix / 2 * 8 + lane % 8) * 16 + matrix % 2 * 8);
  }
  for (int half = 0; half < 2; ++half) {
    const int row = lane / 4;
    const int col = half * 8 + lane % 4 * 2;
    float acc[4] = {c[row * 16 + col], c[row * 16 + col + 1], c[(row + 8) * 16 + col], c[(row + 8) * 16 + col + 1]};
    const uint32_t fb_half[2] = {fb[2 * half], fb[2 * half + 1]};
    ptx::Mma16816<__nv_bfloat16>(acc, fa, fb_half);
    d[row * 16 + col] = acc[0];
    d[row * 16 + col + 1] = acc[1];
    d[(row + 8) * 16 + col] = acc[2];
    d[(row + 8) * 16 + col + 1] = acc[3];
  }
}

}  // namespace

extern "C" {

// Runs self-test kernel `which` on data (its layout per case below); returns
// the launch status, or -1001 for a write out of bounds.
//   0 / 1: data[0:512] inputs, data[512:514] = the sums of its two halves,
//          with / without the barrier;
//   2: a barrier after some threads exited; 3: barriers at two sites;
//   4: a misaligned WMMA load; 5: a trap; 6: a block of 2048 threads;
//   7: a write one past data[0:n];
//   8..13: data[768:1024] = A B + C from A = data[0:256], B = data[256:512],
//          C = data[512:768] (16 x 16, row-major): __half, __nv_bfloat16,
//          TF32, each with A column-major and B row-major (8, 10, 12) or
//          the other way (9, 11, 13);
//   14: ldmatrix on half a warp;
//   15 / 16: data[256:512] = data[0:256] rotated by 32, through cp.async
//            with / without waiting for the copies;
//   17 / 18: data[768:1024] = A B + C as in 8..13 with ldmatrix and mma.sync
//            (__nv_bfloat16), B staged [k][n] / [n][k];
//   19: data[0:80] as 10 rows of 16 16-bit elements, by a
//       tensor copy (TensorCopyThroughShared) into data[256:320] (before
//       the wait) and data[320:384] (after);
//   20: a wait for an mbarrier phase that no thread arrives on;
//   21 / 22: data[0:128] = 16 from a warpgroup product of a stage written
//            by stores, with / without fence.proxy.async after them.
int emu_self_test(int which, float* data, int64_t n) {
  const EmulatedLaunch launch;
  Arena arena;
  float* d = arena.InOut(data, n, "data");
  switch (which) {
    case 0:
      launch(BlockSums<true>, 2, kThreads, d, d + 512);
      break;
    case 1:
      launch(BlockSums<false>, 2, kThreads, d, d + 512);
      break;
    case 2:
      launch(BarrierAfterExit, 1, kThreads, d);
      break;
    case 3:
      launch(BarriersAtTwoSites, 1, kThreads, d);
      break;
    case 4:
      launch(MisalignedLoad, 1, 32, d, d + 256);
      break;
    case 5:
      launch(Traps, 3, 64, d);
      break;
    case 6:
      launch(Traps, 1, 2048, d);
      break;
    case 7:
      launch(WritesOnePast, 1, 32, d, n);
      break;
    case 8:
      launch(WarpProduct<__half, true>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 9:
      launch(WarpProduct<__half, false>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 10:
      launch(WarpProduct<__nv_bfloat16, true>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 11:
      launch(WarpProduct<__nv_bfloat16, false>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 12:
      launch(WarpProduct<float, true>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 13:
      launch(WarpProduct<float, false>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 14:
      launch(HalfWarpLoadsMatrices, 1, 32, d);
      break;
    case 15:
      launch(CopiesThroughShared<true>, 1, 64, d, d + 256);
      break;
    case 16:
      launch(CopiesThroughShared<false>, 1, 64, d, d + 256);
      break;
    case 17:
      launch(MmaProduct<true>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 18:
      launch(MmaProduct<false>, 1, 32, d, d + 256, d + 512, d + 768);
      break;
    case 19: {
      ptx::TensorMap map;
      if (!launch.EncodeTensorMap(&map, d, 16, 10, 16, 8)) return cudaErrorInvalidValue;
      launch.WithSharedMemory(256)(TensorCopyThroughShared, 1, 64, map, d + 256, d + 320);
      break;
    }
    case 20:
      launch(WaitsForNoArrival, 1, 64, d);
      break;
    case 21:
      launch.WithSharedMemory(4096)(ProductOfStoredStage<true>, 1, 128, d);
      break;
    case 22:
      launch.WithSharedMemory(4096)(ProductOfStoredStage<false>, 1, 128, d);
      break;
    default:
      return masked_ops::emulation::kUnknownType;
  }
  return arena.Finish(launch.Status());
}

// masked_ops_gpu_tensor_copy_probe of the GPU harness, on host arrays.
int emu_tensor_copy_probe(const uint16_t* array, int64_t inner_size, int64_t outer_size, int box_inner,
                          int box_outer, int32_t inner, int32_t outer, uint16_t* landed, int32_t* completed) {
  Arena arena;
  const int status = masked_ops::gpu::probe::RunTensorCopyProbe(
      EmulatedLaunch{}, arena.In(array, inner_size * outer_size, "array"), inner_size, outer_size, box_inner,
      box_outer, inner, outer, arena.InOut(landed, int64_t{box_inner} * box_outer, "landed"),
      arena.InOut(completed, 1, "completed"));
  return arena.Finish(status);
}

}  // extern "C"
