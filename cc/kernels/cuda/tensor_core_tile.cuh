// The tensor-core tile the products share (WMMA, sm_80 and later): a thread
// block of 8 warps computes a kTileRows x kTileCols output tile, each warp a
// 32 x 32 quarter-column of it as 2 x 2 fragments of 16 x 16 with float
// accumulators, from operand tiles staged kStageDepth deep in shared memory.
// float16 / bfloat16 operands go to the tensor cores as they are; float32
// operands are rounded to TF32 (10-bit mantissa) in the fragments.
//
// Fragments are 16 x 16 outputs, and a warp skips the fragments a stage
// leaves dead: the products use that to skip dead blocks exactly, which is
// why they take this path only where the blocks cut the output's columns
// (and, for the weight gradients, its rows) on multiples of 16
// (FragmentAligned).
#ifndef MASKED_OPS_CC_KERNELS_CUDA_TENSOR_CORE_TILE_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_TENSOR_CORE_TILE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/masked_matmul_gpu.h"

namespace masked_ops {
namespace gpu {
namespace tensor_core {

namespace wmma = nvcuda::wmma;

// float64 has no tensor-core path (its products run on CUDA cores).
template <typename D>
constexpr bool kHasTensorCorePath = !std::is_same_v<D, double>;

constexpr int kTileRows = 128;
constexpr int kTileCols = 64;
constexpr int kStageDepth = 32;
constexpr int kThreads = 256;
constexpr int kFragment = 16;
constexpr int kWarpTile = 32;
constexpr int kWarpCols = kTileCols / kWarpTile;        // 2 warps across, 4 down
constexpr int kFragmentColumns = kTileCols / kFragment;  // 4 live bits per stage
constexpr int kFragmentRows = kTileRows / kFragment;

// Smem: how T sits in shared memory; Element: the WMMA operand type; kDepth:
// the fragment's depth; kPad: elements added to a shared-memory row so that
// fragment rows start on different banks while every fragment pointer stays
// 32-byte aligned and every leading dimension a multiple of 16 bytes.
template <typename T>
struct Traits {
  using Smem = T;
  using Element = T;
  static constexpr int kDepth = 16;
  static constexpr int kPad = 8;
};
template <>
struct Traits<float> {
  using Smem = float;
  using Element = wmma::precision::tf32;
  static constexpr int kDepth = 8;
  static constexpr int kPad = 8;  // 8 words: a row starts 8 banks on, so fragment rows do not collide
};

template <typename T, typename Layout>
using FragmentA =
    wmma::fragment<wmma::matrix_a, kFragment, kFragment, Traits<T>::kDepth, typename Traits<T>::Element, Layout>;
template <typename T>
using FragmentB = wmma::fragment<wmma::matrix_b, kFragment, kFragment, Traits<T>::kDepth,
                                 typename Traits<T>::Element, wmma::row_major>;
template <typename T>
using Accumulator = wmma::fragment<wmma::accumulator, kFragment, kFragment, Traits<T>::kDepth, float>;

// Rounds a float32 fragment's operands to TF32, as WMMA requires before the
// product; the half types are used as loaded.
template <typename T, typename Fragment>
__device__ inline void PrepareOperands(Fragment& fragment) {
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int t = 0; t < fragment.num_elements; ++t) fragment.x[t] = wmma::__float_to_tf32(fragment.x[t]);
  }
}

template <typename T>
__device__ inline typename Traits<T>::Smem ToSmem(float v) {
  return FromCompute<T>(v);
}

// Leading dimensions (in elements) of the staged operands: A as
// [kTileRows][kStageDepth] (row-major) or [kStageDepth][kTileRows]
// (column-major), B as [kStageDepth][kTileCols], the output as
// [kTileRows][kTileCols] floats.
template <typename T>
constexpr int kRowMajorAStride = kStageDepth + Traits<T>::kPad;
template <typename T>
constexpr int kColMajorAStride = kTileRows + Traits<T>::kPad;
template <typename T>
constexpr int kBStride = kTileCols + Traits<T>::kPad;
constexpr int kOutputStride = kTileCols + 4;

// Bytes of the A stage, either layout (the row-major one is the larger).
template <typename T>
constexpr int kABytes = kTileRows * kRowMajorAStride<T> * int(sizeof(typename Traits<T>::Smem));
template <typename T>
constexpr bool kColumnMajorAFits = kStageDepth * kColMajorAStride<T> <= kTileRows * kRowMajorAStride<T>;
static_assert(kColumnMajorAFits<float> && kColumnMajorAFits<__half> && kColumnMajorAFits<__nv_bfloat16>,
              "the column-major A stage must fit the row-major one's bytes");
template <typename T>
constexpr int kBBytes = kStageDepth * kBStride<T> * int(sizeof(typename Traits<T>::Smem));
constexpr int kOutputBytes = kTileRows * kOutputStride * int(sizeof(float));
// One buffer serves the operand stages and, after the last stage, the output.
template <typename T>
constexpr int kSharedBytes = kABytes<T> + kBBytes<T> > kOutputBytes ? kABytes<T> + kBBytes<T> : kOutputBytes;

// Thread blocks of a rows x cols output, one per kTileRows x kTileCols tile.
inline int64_t TileCount(int64_t rows, int64_t cols) { return CeilDiv(rows, kTileRows) * CeilDiv(cols, kTileCols); }

// The warp's place in the tile: rows warp_row * 32 .., columns warp_col * 32 ..
struct WarpPlace {
  int row, col;
};
__device__ inline WarpPlace ThisWarp() {
  const int warp = threadIdx.x / 32;
  return WarpPlace{warp / kWarpCols, warp % kWarpCols};
}

// Bit i * 2 + j of a warp's fragment set: its fragment (i, j), rows
// warp.row * 32 + 16 i, columns warp.col * 32 + 16 j of the tile.
// WarpFragments(live_columns): the warp's fragments whose column strip has
// its bit set in live_columns (bit f: tile columns 16 f ..).
__device__ inline unsigned WarpFragments(unsigned live_columns) {
  const unsigned columns = (live_columns >> (ThisWarp().col * 2)) & 3u;
  return columns | (columns << 2);
}

// acc += A(stage) B(stage) over `depth` (<= kStageDepth) of the stage, for
// the warp's fragments in `fragments` (WarpFragments' bits). a_tile is
// [kTileRows][a_stride] (LayoutA = row_major) or [depth][a_stride]
// (col_major); b_tile is [depth][kBStride].
template <typename T, typename LayoutA>
__device__ inline void MultiplyStage(const typename Traits<T>::Smem* a_tile, int a_stride,
                                     const typename Traits<T>::Smem* b_tile, int depth, unsigned fragments,
                                     Accumulator<T> (&acc)[2][2]) {
  if (fragments == 0) return;
  const WarpPlace warp = ThisWarp();
  const auto live = [&](int i, int j) { return ((fragments >> (i * 2 + j)) & 1u) != 0; };
  for (int k = 0; k < depth; k += Traits<T>::kDepth) {
    FragmentA<T, LayoutA> a[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!live(i, 0) && !live(i, 1)) continue;
      const int row = warp.row * kWarpTile + i * kFragment;
      constexpr bool kRowMajor = std::is_same_v<LayoutA, wmma::row_major>;
      const typename Traits<T>::Smem* at = kRowMajor ? a_tile + row * a_stride + k : a_tile + k * a_stride + row;
      wmma::load_matrix_sync(a[i], at, a_stride);
      PrepareOperands<T>(a[i]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (!live(0, j) && !live(1, j)) continue;
      FragmentB<T> b;
      wmma::load_matrix_sync(b, b_tile + k * kBStride<T> + warp.col * kWarpTile + j * kFragment, kBStride<T>);
      PrepareOperands<T>(b);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (live(i, j)) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
      }
    }
  }
}

template <typename T>
__device__ inline void ZeroAccumulators(Accumulator<T> (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
}

// Every warp's accumulators into `out` ([kTileRows][kOutputStride] floats).
// The caller synchronizes the block before reusing the operand buffer as
// `out` and again before reading it.
template <typename T>
__device__ inline void StoreAccumulators(Accumulator<T> (&acc)[2][2], float* out) {
  const WarpPlace warp = ThisWarp();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float* at = out + (warp.row * kWarpTile + i * kFragment) * kOutputStride + warp.col * kWarpTile + j * kFragment;
      wmma::store_matrix_sync(at, acc[i][j], kOutputStride, wmma::mem_row_major);
    }
  }
}

// 16 bytes, the widest load and store: a stage moves whole chunks of
// kPerChunk<T> elements where the rows it reads start 16-byte aligned and its
// chunks cut no block, and single elements elsewhere.
struct alignas(16) Chunk {
  uint32_t words[4];
};
template <typename T>
constexpr int kPerChunk = 16 / int(sizeof(T));

__device__ inline bool ChunkAligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
template <typename T>
__device__ inline Chunk LoadChunk(const T* p) {
  return *reinterpret_cast<const Chunk*>(p);
}
template <typename T>
__device__ inline void StoreChunk(T* p, const Chunk& chunk) {
  *reinterpret_cast<Chunk*>(p) = chunk;
}

// The epilogue: every warp's accumulators staged in `shared` (the operand
// buffer, free once the last stage's __syncthreads has passed), then
// write(r, c, value) for every entry of the tile (r, c: its row and column
// within the tile), spread over the block.
template <typename T, typename Write>
__device__ inline void WriteTile(Accumulator<T> (&acc)[2][2], unsigned char* shared, const Write& write) {
  float* staged = reinterpret_cast<float*>(shared);
  StoreAccumulators<T>(acc, staged);
  __syncthreads();
  for (int e = threadIdx.x; e < kTileRows * kTileCols; e += kThreads) {
    write(e / kTileCols, e % kTileCols, staged[(e / kTileCols) * kOutputStride + e % kTileCols]);
  }
}

// Which of a weight gradient's fragments a thread block multiplies, from
// fragment_live(fragment_row, fragment_col) over the tile's fragments: any
// (the tile is computed at all) and this warp's (WarpFragments' bits).
struct LiveFragments {
  bool any;
  unsigned warp;
};
template <typename FragmentLive>
__device__ inline LiveFragments FindLiveFragments(const FragmentLive& fragment_live) {
  LiveFragments found{false, 0u};
  for (int f = 0; f < kFragmentRows * kFragmentColumns && !found.any; ++f) {
    found.any = fragment_live(f / kFragmentColumns, f % kFragmentColumns);
  }
  const WarpPlace warp = ThisWarp();
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      if (fragment_live(warp.row * 2 + i, warp.col * 2 + j)) found.warp |= 1u << (i * 2 + j);
    }
  }
  return found;
}

// Whether a block size cuts an extent on multiples of a fragment, or not at
// all: what the tensor-core products need to skip dead blocks exactly.
__host__ __device__ inline bool FragmentAligned(int64_t block, int64_t extent) {
  return block % kFragment == 0 || block >= extent;
}

// Whether the current device has the tensor cores these kernels use
// (compute capability 8.0 or later).
bool DeviceSupportsTensorCores();

// Whether `product` runs on tensor cores for device type D under `math`:
// D has a tensor-core path, the weight's blocks cut the product's output on
// fragments (the forward product's columns, dx's rows, the weight
// gradient's both: rows_aligned / cols_aligned, FragmentAligned of each),
// and the device has them.
template <typename D>
bool UseTensorCores(GpuMath math, Product product, bool rows_aligned, bool cols_aligned) {
  const bool aligned = product == Product::kForward     ? cols_aligned
                       : product == Product::kGradInput ? rows_aligned
                                                        : rows_aligned && cols_aligned;
  return kHasTensorCorePath<D> && math == GpuMath::kTensorCores && aligned && DeviceSupportsTensorCores();
}

}  // namespace tensor_core
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_TENSOR_CORE_TILE_CUH_
