// Device code of the masked_matmul kernels (see masked_matmul_gpu.cu for the
// launchers and masked_matmul_launch.cuh for the launch sequences): the
// kernels and the device view of the block grid, in an anonymous namespace.
// Device code only, so that a host compiler with the CUDA emulation of
// tests/cuda_emulation compiles it too. Include it from one translation unit
// of a program.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_KERNELS_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/pipelined_gemm.cuh"
#include "cc/kernels/cuda/tensor_core_tile.cuh"
#include "cc/kernels/cuda/warpgroup_gemm.cuh"

namespace masked_ops {
namespace gpu {
namespace {

struct GridDims {
  int64_t rows, cols, block_rows, block_cols, grid_rows, grid_cols;
  __host__ __device__ int64_t rows_in(int64_t i) const {
    return rows - i * block_rows < block_rows ? rows - i * block_rows : block_rows;
  }
  __host__ __device__ int64_t cols_in(int64_t j) const {
    return cols - j * block_cols < block_cols ? cols - j * block_cols : block_cols;
  }
  // The canonical factor of W's entry (r, c).
  template <typename F>
  __device__ F factor(const F* factors, bool element_level, int64_t r, int64_t c) const {
    return element_level ? factors[r * cols + c] : factors[(r / block_rows) * grid_cols + c / block_cols];
  }
  __device__ bool block_live(const uint8_t* live, int64_t r, int64_t c) const {
    return live[(r / block_rows) * grid_cols + c / block_cols] != 0;
  }
};

// live[b] = 1 when block b holds a live factor.
template <typename F>
__global__ void BlockLiveness(const F* factors, bool element_level, GridDims g, uint8_t* live) {
  const int64_t blocks = g.grid_rows * g.grid_cols;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = b / g.grid_cols;
    const int64_t j = b % g.grid_cols;
    bool any = false;
    if (!element_level) {
      any = Live(factors[b]);
    } else {
      for (int64_t r = 0; r < g.rows_in(i) && !any; ++r) {
        const F* row = factors + (i * g.block_rows + r) * g.cols + j * g.block_cols;
        for (int64_t c = 0; c < g.cols_in(j) && !any; ++c) any = Live(row[c]);
      }
    }
    live[b] = any ? 1 : 0;
  }
}

// lists[group * capacity + n] for n < counts[group]: the live blocks of each
// block column (by_column: their block rows) or block row (their columns).
__global__ void LiveLists(const uint8_t* live, GridDims g, bool by_column, int32_t* lists,
                          int32_t* counts) {
  const int64_t groups = by_column ? g.grid_cols : g.grid_rows;
  const int64_t capacity = by_column ? g.grid_rows : g.grid_cols;
  for (int64_t group = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; group < groups;
       group += int64_t(gridDim.x) * blockDim.x) {
    int32_t count = 0;
    for (int64_t n = 0; n < capacity; ++n) {
      const int64_t block = by_column ? n * g.grid_cols + group : group * g.grid_cols + n;
      if (live[block]) lists[group * capacity + count++] = static_cast<int32_t>(n);
    }
    counts[group] = count;
  }
}

// out[m, out_cols] = a[m, depth] @ B for one output group, whose
// columns are one block column of W (forward: B = masked W) or one block row
// (transposed, dx: B = masked W^T), summing only over the group's live
// blocks. blockIdx.x walks (64 rows, group, 64 of the group's columns), the
// last fastest, over `chunks` 64-column chunks per group.
template <typename T, bool kTransposed>
__global__ void __launch_bounds__(kThreads)
    BlockSparseProduct(const T* a, int64_t m, const T* w, const Compute<T>* factors, bool element_level,
                       GridDims g, const int32_t* lists, const int32_t* counts, int64_t chunks, T* out) {
  using C = Compute<T>;
  __shared__ C a_tile[kDepthStep][kTile + 1];
  __shared__ C b_tile[kDepthStep][kTile + 1];
  const int64_t groups = kTransposed ? g.grid_rows : g.grid_cols;
  const int64_t chunk = int64_t(blockIdx.x) % chunks;
  const int64_t group = int64_t(blockIdx.x) / chunks % groups;
  // Forward: depth runs down W's rows, output columns along W's columns.
  const int64_t depth_total = kTransposed ? g.cols : g.rows;
  const int64_t out_cols = kTransposed ? g.rows : g.cols;
  const int64_t depth_block = kTransposed ? g.block_cols : g.block_rows;
  const int64_t group_width = kTransposed ? g.block_rows : g.block_cols;
  const int64_t col0 = group * group_width + chunk * kTile;
  const int64_t group_end = min(out_cols, (group + 1) * group_width);
  const int64_t row0 = int64_t(blockIdx.x) / (chunks * groups) * kTile;
  if (col0 >= group_end) return;
  const int capacity = static_cast<int>(kTransposed ? g.grid_cols : g.grid_rows);
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  C acc[kPerThread][kPerThread] = {};

  for (int p = 0; p < counts[group]; ++p) {
    const int64_t segment = lists[group * capacity + p];
    const int64_t d_begin = segment * depth_block;
    const int64_t d_end = min(depth_total, d_begin + depth_block);
    for (int64_t d0 = d_begin; d0 < d_end; d0 += kDepthStep) {
      for (int e = threadIdx.x; e < kDepthStep * kTile; e += kThreads) {
        const int dd = e / kTile;
        const int rr = e % kTile;
        const int64_t d = d0 + dd;
        const int64_t row = row0 + rr;
        a_tile[dd][rr] = (d < d_end && row < m) ? ToCompute(a[row * depth_total + d]) : C(0);
        const int64_t col = col0 + rr;
        C b = 0;
        if (d < d_end && col < group_end) {
          // W's entry (wr, wc) and its factor.
          const int64_t wr = kTransposed ? col : d;
          const int64_t wc = kTransposed ? d : col;
          b = Masked(ToCompute(w[wr * g.cols + wc]), g.factor(factors, element_level, wr, wc));
        }
        b_tile[dd][rr] = b;
      }
      __syncthreads();
      AccumulateStage(a_tile, b_tile, acc, tx, ty);
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < group_end) out[row * out_cols + col] = FromCompute<T>(acc[i][j]);
    }
  }
}

// dw for block (b / grid_cols, b % grid_cols), 64 x 64 of it per thread
// block: blockIdx.x walks (block b, tile of it), the tile fastest, over
// `tiles` tiles per block: x^T dy over all m rows, masked entry by entry; a dead
// block is written as zeros unread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    BlockOuterProducts(const T* x, const T* dy, int64_t m, const Compute<T>* factors, bool element_level,
                       GridDims g, const uint8_t* live, int64_t tiles, T* dw) {
  using C = Compute<T>;
  __shared__ C x_tile[kDepthStep][kTile + 1];
  __shared__ C dy_tile[kDepthStep][kTile + 1];
  const int64_t block = int64_t(blockIdx.x) / tiles;
  const int64_t tile = int64_t(blockIdx.x) % tiles;
  const int64_t bi = block / g.grid_cols;
  const int64_t bj = block % g.grid_cols;
  // Tiles of the block as launched: a block never extends past the matrix.
  const int64_t tiles_across = (min(g.cols, g.block_cols) + kTile - 1) / kTile;
  const int64_t r0 = bi * g.block_rows + tile / tiles_across * kTile;
  const int64_t c0 = bj * g.block_cols + tile % tiles_across * kTile;
  const int64_t r_end = min(g.rows, bi * g.block_rows + g.rows_in(bi));
  const int64_t c_end = min(g.cols, bj * g.block_cols + g.cols_in(bj));
  if (r0 >= r_end || c0 >= c_end) return;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  C acc[kPerThread][kPerThread] = {};
  const bool block_live = live[block] != 0;
  if (block_live) {
    for (int64_t m0 = 0; m0 < m; m0 += kDepthStep) {
      for (int e = threadIdx.x; e < kDepthStep * kTile; e += kThreads) {
        const int dd = e / kTile;
        const int rr = e % kTile;
        const int64_t row = m0 + dd;
        x_tile[dd][rr] = (row < m && r0 + rr < r_end) ? ToCompute(x[row * g.rows + r0 + rr]) : 0.0f;
        dy_tile[dd][rr] = (row < m && c0 + rr < c_end) ? ToCompute(dy[row * g.cols + c0 + rr]) : 0.0f;
      }
      __syncthreads();
      AccumulateStage(x_tile, dy_tile, acc, tx, ty);
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = r0 + ty + 16 * i;
    if (row >= r_end) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t col = c0 + tx + 16 * j;
      if (col >= c_end) continue;
      dw[row * g.cols + col] =
          FromCompute<T>(block_live ? Masked(acc[i][j], g.factor(factors, element_level, row, col)) : 0.0f);
    }
  }
}

namespace tc = tensor_core;

// The forward product (out = a @ masked W) and dx (out = a @ masked W^T) on
// tensor cores. blockIdx.x walks the output's kTileRows x kTileCols tiles,
// columns fastest. The depth runs one block row of W at a time (forward;
// block columns for dx): a block row is staged only when one of the tile's
// 16-column strips lies in a live block of it, its dead blocks are staged as
// zeros unread, and each warp multiplies only its strips in live blocks. So
// a dead block is neither read nor multiplied, and a NaN in `a` reaches
// outputs through live blocks only, as on the CUDA cores.
template <typename T, bool kTransposed>
__global__ void __launch_bounds__(tc::kThreads)
    TensorCoreProduct(const T* a, int64_t m, const T* w, const Compute<T>* factors, bool element_level, GridDims g,
                      const uint8_t* live, T* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  using Smem = typename tc::Traits<T>::Smem;
  __shared__ __align__(128) unsigned char shared[tc::kSharedBytes<T>];
  Smem* a_tile = reinterpret_cast<Smem*>(shared);
  Smem* b_tile = reinterpret_cast<Smem*>(shared + tc::kABytes<T>);
  constexpr int kAStride = tc::kRowMajorAStride<T>;
  const int64_t depth_total = kTransposed ? g.cols : g.rows;
  const int64_t out_cols = kTransposed ? g.rows : g.cols;
  const int64_t depth_block = kTransposed ? g.block_cols : g.block_rows;
  const int64_t out_block = kTransposed ? g.block_rows : g.block_cols;
  const int64_t segments = kTransposed ? g.grid_cols : g.grid_rows;
  const int64_t col_tiles = CeilDiv(out_cols, tc::kTileCols);
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles * tc::kTileRows;
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * tc::kTileCols;
  constexpr int kPerChunk = tc::kPerChunk<T>;
  // Whole chunks where a's rows, W's rows and the depth blocks fall on 16
  // bytes (the chunks of a stage then never straddle a segment's end).
  const bool chunked = tc::ChunkAligned(a) && tc::ChunkAligned(w) && depth_total % kPerChunk == 0 &&
                       g.cols % kPerChunk == 0 && depth_block % kPerChunk == 0;
  // A block mask's factor for each of the tile's columns in the current
  // segment (a block mask has one factor per block: no per-entry lookup).
  __shared__ Compute<T> column_factor[tc::kTileCols];
  tc::Accumulator<T> acc[2][2];
  tc::ZeroAccumulators<T>(acc);
  for (int64_t segment = 0; segment < segments; ++segment) {
    // Bit f: the tile's columns 16 f .. lie in a live block of the segment.
    unsigned live_columns = 0;
    for (int f = 0; f < tc::kFragmentColumns && col0 + f * tc::kFragment < out_cols; ++f) {
      const int64_t group = (col0 + f * tc::kFragment) / out_block;
      if (live[kTransposed ? group * g.grid_cols + segment : segment * g.grid_cols + group]) live_columns |= 1u << f;
    }
    if (live_columns == 0) continue;
    if (!element_level) {  // the previous stage's last __syncthreads retired every reader
      for (int c = threadIdx.x; c < tc::kTileCols; c += tc::kThreads) {
        const int64_t group = min(col0 + c, out_cols - 1) / out_block;
        column_factor[c] = factors[kTransposed ? group * g.grid_cols + segment : segment * g.grid_cols + group];
      }
      __syncthreads();
    }
    // W's entry (wr, wc) masked by its factor; c: its column in the tile.
    const auto masked_w = [&](int64_t wr, int64_t wc, int c) {
      return Masked(ToCompute(w[wr * g.cols + wc]), element_level ? factors[wr * g.cols + wc] : column_factor[c]);
    };
    const auto strip_live = [&](int c) { return ((live_columns >> (c / tc::kFragment)) & 1u) != 0; };
    const int64_t d_end = min(depth_total, (segment + 1) * depth_block);
    for (int64_t d0 = segment * depth_block; d0 < d_end; d0 += tc::kStageDepth) {
      const bool full_depth = d0 + tc::kStageDepth <= d_end;
      if (chunked && full_depth) {
        constexpr int kChunksPerRow = tc::kStageDepth / kPerChunk;
        for (int e = threadIdx.x; e < tc::kTileRows * kChunksPerRow; e += tc::kThreads) {
          const int r = e / kChunksPerRow;
          const int k = e % kChunksPerRow * kPerChunk;
          tc::Chunk chunk = {};
          if (row0 + r < m) chunk = tc::LoadChunk(a + (row0 + r) * depth_total + d0 + k);
          tc::StoreChunk(a_tile + r * kAStride + k, chunk);
        }
      } else {
        for (int e = threadIdx.x; e < tc::kTileRows * tc::kStageDepth; e += tc::kThreads) {
          const int64_t row = row0 + e / tc::kStageDepth;
          const int64_t d = d0 + e % tc::kStageDepth;
          a_tile[(e / tc::kStageDepth) * kAStride + e % tc::kStageDepth] =
              (row < m && d < d_end) ? a[row * depth_total + d] : tc::ToSmem<T>(0.0f);
        }
      }
      if (chunked && !kTransposed && col0 + tc::kTileCols <= out_cols) {
        // A chunk of W's row d: kPerChunk columns of one 16-column strip.
        constexpr int kChunksPerRow = tc::kTileCols / kPerChunk;
        for (int e = threadIdx.x; e < tc::kStageDepth * kChunksPerRow; e += tc::kThreads) {
          const int dd = e / kChunksPerRow;
          const int c = e % kChunksPerRow * kPerChunk;
          const int64_t d = d0 + dd;
          alignas(16) Smem staged[kPerChunk] = {};
          if (d < d_end && strip_live(c)) {
            const tc::Chunk chunk = tc::LoadChunk(w + d * g.cols + col0 + c);
            const T* values = reinterpret_cast<const T*>(&chunk);
#pragma unroll
            for (int i = 0; i < kPerChunk; ++i) {
              const Compute<T> factor = element_level ? factors[d * g.cols + col0 + c + i] : column_factor[c + i];
              staged[i] = tc::ToSmem<T>(Masked(ToCompute(values[i]), factor));
            }
          }
          tc::StoreChunk(b_tile + dd * tc::kBStride<T> + c, *reinterpret_cast<const tc::Chunk*>(staged));
        }
      } else if (chunked && kTransposed && full_depth) {
        // A chunk of W's row col0 + c along the depth: kPerChunk entries of
        // one B column.
        constexpr int kChunksPerColumn = tc::kStageDepth / kPerChunk;
        for (int e = threadIdx.x; e < tc::kTileCols * kChunksPerColumn; e += tc::kThreads) {
          const int c = e / kChunksPerColumn;
          const int dd = e % kChunksPerColumn * kPerChunk;
          const int64_t col = col0 + c;
          alignas(16) Smem staged[kPerChunk] = {};
          if (col < out_cols && strip_live(c)) {
            const tc::Chunk chunk = tc::LoadChunk(w + col * g.cols + d0 + dd);
            const T* values = reinterpret_cast<const T*>(&chunk);
#pragma unroll
            for (int i = 0; i < kPerChunk; ++i) {
              const Compute<T> factor = element_level ? factors[col * g.cols + d0 + dd + i] : column_factor[c];
              staged[i] = tc::ToSmem<T>(Masked(ToCompute(values[i]), factor));
            }
          }
#pragma unroll
          for (int i = 0; i < kPerChunk; ++i) b_tile[(dd + i) * tc::kBStride<T> + c] = staged[i];
        }
      } else {
        for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileCols; e += tc::kThreads) {
          // Consecutive threads read consecutive entries of W.
          const int dd = kTransposed ? e % tc::kStageDepth : e / tc::kTileCols;
          const int c = kTransposed ? e / tc::kStageDepth : e % tc::kTileCols;
          const int64_t d = d0 + dd;
          const int64_t col = col0 + c;
          float b = 0.0f;
          if (d < d_end && col < out_cols && strip_live(c)) b = kTransposed ? masked_w(col, d, c) : masked_w(d, col, c);
          b_tile[dd * tc::kBStride<T> + c] = tc::ToSmem<T>(b);
        }
      }
      __syncthreads();
      tc::MultiplyStage<T, tc::wmma::row_major>(a_tile, kAStride, b_tile,
                                                static_cast<int>(min(int64_t{tc::kStageDepth}, d_end - d0)),
                                                tc::WarpFragments(live_columns), acc);
      __syncthreads();
    }
  }
  tc::WriteTile<T>(acc, shared, [&](int r, int c, float v) {
    if (row0 + r < m && col0 + c < out_cols) out[(row0 + r) * out_cols + col0 + c] = FromCompute<T>(v);
  });
#endif
}

// dW = mask(x^T dy) on tensor cores: blockIdx.x walks dW's kTileRows x
// kTileCols tiles, columns fastest; the depth is the m rows of x and dy. A
// warp multiplies only its fragments in live blocks, a tile without any is
// written as zeros without reading x or dy.
template <typename T>
__global__ void __launch_bounds__(tc::kThreads)
    TensorCoreOuterProducts(const T* x, const T* dy, int64_t m, const Compute<T>* factors, bool element_level,
                            GridDims g, const uint8_t* live, T* dw) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  using Smem = typename tc::Traits<T>::Smem;
  __shared__ __align__(128) unsigned char shared[tc::kSharedBytes<T>];
  Smem* a_tile = reinterpret_cast<Smem*>(shared);
  Smem* b_tile = reinterpret_cast<Smem*>(shared + tc::kABytes<T>);
  constexpr int kAStride = tc::kColMajorAStride<T>;
  const int64_t col_tiles = CeilDiv(g.cols, tc::kTileCols);
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles * tc::kTileRows;
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * tc::kTileCols;
  const auto fragment_live = [&](int fragment_row, int fragment_col) {
    const int64_t row = row0 + fragment_row * tc::kFragment;
    const int64_t col = col0 + fragment_col * tc::kFragment;
    return row < g.rows && col < g.cols && g.block_live(live, row, col);
  };
  const tc::LiveFragments live_fragments = tc::FindLiveFragments(fragment_live);
  tc::Accumulator<T> acc[2][2];
  tc::ZeroAccumulators<T>(acc);
  constexpr int kPerChunk = tc::kPerChunk<T>;
  // Whole chunks where x's and dy's rows start 16-byte aligned and the tile
  // lies inside the matrix.
  const bool x_chunked = tc::ChunkAligned(x) && g.rows % kPerChunk == 0 && row0 + tc::kTileRows <= g.rows;
  const bool dy_chunked = tc::ChunkAligned(dy) && g.cols % kPerChunk == 0 && col0 + tc::kTileCols <= g.cols;
  for (int64_t m0 = 0; live_fragments.any && m0 < m; m0 += tc::kStageDepth) {
    // A = x^T, staged column-major: consecutive threads read along x's rows.
    if (x_chunked) {
      constexpr int kChunksPerRow = tc::kTileRows / kPerChunk;
      for (int e = threadIdx.x; e < tc::kStageDepth * kChunksPerRow; e += tc::kThreads) {
        const int dd = e / kChunksPerRow;
        const int r = e % kChunksPerRow * kPerChunk;
        tc::Chunk chunk = {};
        if (m0 + dd < m) chunk = tc::LoadChunk(x + (m0 + dd) * g.rows + row0 + r);
        tc::StoreChunk(a_tile + dd * kAStride + r, chunk);
      }
    } else {
      for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileRows; e += tc::kThreads) {
        const int64_t d = m0 + e / tc::kTileRows;
        const int64_t row = row0 + e % tc::kTileRows;
        a_tile[(e / tc::kTileRows) * kAStride + e % tc::kTileRows] =
            (d < m && row < g.rows) ? x[d * g.rows + row] : tc::ToSmem<T>(0.0f);
      }
    }
    if (dy_chunked) {
      constexpr int kChunksPerRow = tc::kTileCols / kPerChunk;
      for (int e = threadIdx.x; e < tc::kStageDepth * kChunksPerRow; e += tc::kThreads) {
        const int dd = e / kChunksPerRow;
        const int c = e % kChunksPerRow * kPerChunk;
        tc::Chunk chunk = {};
        if (m0 + dd < m) chunk = tc::LoadChunk(dy + (m0 + dd) * g.cols + col0 + c);
        tc::StoreChunk(b_tile + dd * tc::kBStride<T> + c, chunk);
      }
    } else {
      for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileCols; e += tc::kThreads) {
        const int64_t d = m0 + e / tc::kTileCols;
        const int64_t col = col0 + e % tc::kTileCols;
        b_tile[(e / tc::kTileCols) * tc::kBStride<T> + e % tc::kTileCols] =
            (d < m && col < g.cols) ? dy[d * g.cols + col] : tc::ToSmem<T>(0.0f);
      }
    }
    __syncthreads();
    tc::MultiplyStage<T, tc::wmma::col_major>(a_tile, kAStride, b_tile,
                                              static_cast<int>(min(int64_t{tc::kStageDepth}, m - m0)), live_fragments.warp, acc);
    __syncthreads();
  }
  tc::WriteTile<T>(acc, shared, [&](int r, int c, float v) {
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row < g.rows && col < g.cols) dw[row * g.cols + col] = FromCompute<T>(Masked(v, g.factor(factors, element_level, row, col)));
  });
#endif
}

namespace pl = pipelined;
namespace wg = warpgroup;

// The output columns, depth and segments (block rows of W for the forward
// product, block columns for dx) of a product, and the block of W behind
// (segment, group), group being the block of the output's columns.
template <bool kTransposed>
struct ProductDims {
  GridDims g;
  __host__ __device__ int64_t out_cols() const { return kTransposed ? g.rows : g.cols; }
  __host__ __device__ int64_t out_block() const { return kTransposed ? g.block_rows : g.block_cols; }
  __host__ __device__ int64_t depth() const { return kTransposed ? g.cols : g.rows; }
  __host__ __device__ int64_t depth_block() const { return kTransposed ? g.block_cols : g.block_rows; }
  __host__ __device__ int64_t segments() const { return kTransposed ? g.grid_cols : g.grid_rows; }
  __host__ __device__ int64_t block(int64_t segment, int64_t group) const {
    return kTransposed ? group * g.grid_cols + segment : segment * g.grid_cols + group;
  }
  const uint8_t* live;
  const float* factors;
  __device__ bool live_block(int64_t segment, int64_t group) const { return live[block(segment, group)] != 0; }
  __device__ float factor(int64_t segment, int64_t group) const { return factors[block(segment, group)]; }
};

// A listed-segment product's thread block: blockIdx.x walks (split, output
// tile), columns fastest; the split takes the split-th run of
// SplitRun(count, splits) entries of its column tile's list (count of them
// here, from `first`). A split with no entries, split 0 aside, writes
// nothing; with one split the tile is written as D, else as float partial
// sums to partials[split] (rows x cols each).
struct ListedTile {
  int64_t rows, cols, split, row0, col_tile, col0, first;
  int count;
  // Tiles of tile_rows rows (the warpgroup tile's may be 256 tall).
  __device__ ListedTile(int64_t rows_, int64_t cols_, const int32_t* counts, int64_t splits,
                        int64_t tile_rows = pl::kTileRows)
      : rows(rows_), cols(cols_) {
    const int64_t col_tiles = CeilDiv(cols, int64_t{pl::kTileCols});
    const int64_t tiles = CeilDiv(rows, tile_rows) * col_tiles;
    split = int64_t(blockIdx.x) / tiles;
    row0 = int64_t(blockIdx.x) % tiles / col_tiles * tile_rows;
    col_tile = int64_t(blockIdx.x) % col_tiles;
    col0 = col_tile * pl::kTileCols;
    const int64_t per_split = pl::SplitRun(counts[col_tile], splits);
    first = split * per_split;
    count = static_cast<int>(max(int64_t{0}, min(int64_t{counts[col_tile]} - first, per_split)));
  }
  __device__ bool empty() const { return split > 0 && count == 0; }
  // Tile entries (r, c) and (r, c + 1).
  template <typename D>
  __device__ void Store(int r, int c, float v0, float v1, float* partials, D* out) const {
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row >= rows || col >= cols) return;
    if (partials == nullptr) {
      pl::StorePair(out + row * cols + col, v0, v1);
    } else {
      pl::StorePair(partials + split * rows * cols + row * cols + col, v0, v1);
    }
  }
};

// The forward product (out = a @ masked W) or dx (kTransposed: out = a @
// masked W^T) for 16-bit D (or float as TF32) and a block mask on the
// pipelined tile: blockIdx.x walks the output's 128 x 128 tiles, columns
// fastest, and the depth runs kDepth at a time over the segments listed for
// the tile's columns. In a stage, the chunks of W in dead blocks are zero
// fills that read nothing, and each warp multiplies only its 16-column strips
// in live blocks, scaled by their factor when it is not 1. Each listed segment takes
// depth_block / kDepth steps (the last segment's may run past the depth:
// those stages are zero fills). With few tiles (a small batch), the list is
// split: blockIdx.x walks (split, tile), and split s takes the s-th run of
// SplitRun(count, splits) entries of the tile's list, writing float partial
// sums to partials[split] (m x output columns each), which SplitSums adds up
// (a split with no entries, split 0 aside, writes nothing); with one split
// the tile is written as D.
template <typename D, bool kTransposed, int kDepth>
__global__ void __launch_bounds__(pl::kThreads)
    PipelinedProduct(const D* a, int64_t m, const D* w, const float* factors, GridDims g, const uint8_t* live,
                     const uint32_t* lists, const int32_t* counts, int64_t splits, float* partials, D* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  const ProductDims<kTransposed> p{g, live, factors};
  const ListedTile tile(m, p.out_cols(), counts, splits);
  const int64_t row0 = tile.row0;
  const int64_t col0 = tile.col0;
  const pl::StageCopier<D, pl::kTileRows, kDepth, false> a_copier(a, p.depth(), row0, m);
  // B = W as [depth][columns] (forward), W^T as [columns][depth] (dx: W's rows col0 .., along the depth).
  using BCopier =
      pl::StageCopier<D, kTransposed ? pl::kTileCols : kDepth, kTransposed ? kDepth : pl::kTileCols, !kTransposed>;
  const BCopier b_copier(w, g.cols, col0, p.out_cols());
  const unsigned b_strip_chunks = pl::ChunksOfStrips<kTransposed>(b_copier);
  const auto issue_segment = [&](D* a_stage, D* b_stage, uint32_t entry, int sub, int) {
    const int64_t segment = pl::SegmentOf(entry);
    const int64_t d0 = segment * p.depth_block() + int64_t{sub} * kDepth;
    const int64_t d_end = min(p.depth(), (segment + 1) * p.depth_block());
    a_copier.Issue(a_stage, d0, d_end, decltype(a_copier)::kAllChunks);
    b_copier.Issue(b_stage, d0, d_end, pl::LiveChunks<BCopier>(b_strip_chunks, pl::StripsOf(entry)));
  };
  if (tile.empty()) return;  // the whole block, before any barrier
  float acc[pl::kStrips][2 * pl::kStrips][4] = {};
  pl::RunListedSegments<D, kDepth, kTransposed, true>(
      p, col0, lists + tile.col_tile * p.segments() + tile.first, tile.count, min(p.depth_block(), p.depth()), 0xfu,
      issue_segment, nullptr, acc);
  pl::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int, int) {
    tile.Store(r, c, v0, v1, partials, out);
  });
#endif
}

// The forward product (out = a @ masked W) or dx (kTransposed: out = a @
// masked W^T) of PipelinedProduct on the warpgroup tile (warpgroup_gemm.cuh;
// Hopper, built for sm_90a): the same tiles, lists, splits and outputs; B is
// W staged N-major (forward) or W^T staged K-major (dx: W's rows are the
// output's columns, its columns the depth). Where W's blocks are narrower
// than a tile (across the output's columns), in two launches: a thread
// block whose entries all have all 8 strips of its tile live (a dense
// stretch of W) takes the one for kWhole, kRunStrips 8 (one product 128
// columns wide per step); the others the one for kPartlyLive, kRunStrips
// being wg::RunStrips of the blocks (a product per live run). One kernel
// cannot hold both widths: ptxas serializes products of different widths
// over the same accumulators. A stage whose segment has a live block with a
// factor other than 1 is rescaled in shared memory: each thread rewrites its
// own chunks of W as Masked(w, factor) rounded to D, a chunk lying in one
// strip.
//
// The stages come by tensor copies, which one thread issues (the others
// issue none; rows and depth past the arrays' ends land as zeros): A's
// (a_map: A's rows of `depth` elements, boxes of kDepth x 128) and W's in
// boxes of runs holding a live strip, dead runs left out, so that no dead
// block is read (b_map: W; dx, boxes of kDepth x the run's columns, which
// are W's rows; forward, boxes of the run's columns, up to 64, x kDepth,
// W's stage N-major in rows as wide: wg::ForwardLineRowBytes). (A
// segment's stages never cross into the next segment: its depth is a
// multiple of kDepth, or the whole depth: pl::WithStageDepth, and blocks
// on multiples of 16 for the pipelined shapes.)
//
// kRowGroups 2: tall tiles, 256 x 128, two warpgroups sharing each stage's
// W (A's box is 256 rows; a_map's boxes as tall), each multiplying its own
// 128 rows, so that W crosses from L2 once per 256 rows of the output
// instead of per 128 (a quarter less L2 traffic for a dense product), one
// block per SM; for one split only (blockIdx.x walks the tall tiles).
template <typename D, bool kTransposed, int kDepth, int kRunStrips, int kRowGroups>
__global__ void __launch_bounds__(wg::kThreads * kRowGroups, wg::kBlocksPerSm / kRowGroups)
    WarpgroupProduct(const __grid_constant__ ptx::TensorMap a_map, const __grid_constant__ ptx::TensorMap b_map,
                     int64_t m, const float* factors, GridDims g, const uint8_t* live,
                     const uint32_t* lists, const int32_t* counts, int64_t splits, float* partials, D* out,
                     wg::Tiles taken) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // launched only where wg::DeviceRunsWarpgroupMma()
#else
  constexpr int kBoxColumns = wg::BoxColumns(kTransposed, kRunStrips);
  constexpr int kBoxStrips = kBoxColumns / pl::kStrip;
  constexpr uint32_t kBoxBytes = uint32_t(kBoxColumns) * kDepth * uint32_t(sizeof(D));
  static_assert(kRowGroups == 1 || kRowGroups == 2, "tiles of 128 or 256 rows");
  const ProductDims<kTransposed> p{g, live, factors};
  const ListedTile tile(m, p.out_cols(), counts, splits, pl::kTileRows * kRowGroups);
  // Forward: W's rows d0 .. as depth lines of its columns col0 ..; dx: W's
  // rows col0 .. as lines, along the depth (its columns). (The tensor
  // copies bring the stages; these places rescale them.)
  using BLanes = std::conditional_t<kTransposed, wg::SwizzledLanes<D, kDepth, false>,
                                    wg::SwizzledLanes<D, kDepth, true, wg::ForwardLineRowBytes(kRunStrips)>>;
  const BLanes b_lanes;
  const auto issue_segment = [&](D* a_stage, D* b_stage, uint32_t entry, int sub, uint64_t* arrival) {
    const int64_t segment = pl::SegmentOf(entry);
    const int64_t d0 = segment * p.depth_block() + int64_t{sub} * kDepth;
    if (threadIdx.x == 0) {
      // Bit j: box j (columns j kBoxColumns ..) holds a live strip.
      unsigned boxes = 0;
      uint32_t bytes = kRowGroups * wg::kOperandElements<kDepth> * uint32_t(sizeof(D));
#pragma unroll
      for (int j = 0; j < pl::kTileStrips / kBoxStrips; ++j) {
        if (((pl::StripsOf(entry) >> (j * kBoxStrips)) & ((1u << kBoxStrips) - 1)) != 0) {
          boxes |= 1u << j;
          bytes += kBoxBytes;
        }
      }
      ptx::MbarrierArriveExpectTx(arrival, bytes);
      ptx::TensorCopy2D(a_stage, &a_map, int32_t(d0), int32_t(tile.row0), arrival);
#pragma unroll
      for (int j = 0; j < pl::kTileStrips / kBoxStrips; ++j) {
        if (((boxes >> j) & 1u) == 0) continue;
        const int64_t column = tile.col0 + j * kBoxColumns;
        if constexpr (kTransposed) {
          ptx::TensorCopy2D(b_stage + BLanes::Layout::LogicalOffset(j * kBoxColumns, 0), &b_map, int32_t(d0),
                            int32_t(column), arrival);
        } else {
          ptx::TensorCopy2D(b_stage + BLanes::Layout::LogicalOffset(0, j * kBoxColumns / wg::kChunkElements), &b_map,
                            int32_t(column), int32_t(d0), arrival);
        }
      }
    }
  };
  const auto scale_stage = [&](D* b_stage, uint32_t entry) {
    if (kRowGroups > 1 && threadIdx.x >= wg::kThreads) return;  // one warpgroup's lanes cover the stage
    wg::RescaleStage(b_lanes, b_stage, entry, [&](int strip) {
      return p.factor(int64_t{pl::SegmentOf(entry)}, min(tile.col0 + strip * pl::kStrip, p.out_cols() - 1) / p.out_block());
    });
  };
  if (tile.empty()) return;  // the whole block, before any barrier
  const uint32_t* list = lists + tile.col_tile * p.segments() + tile.first;
  bool partly = false;
  for (int i = threadIdx.x; i < tile.count; i += wg::kThreads * kRowGroups) {
    partly = partly || pl::StripsOf(list[i]) != (1u << pl::kTileStrips) - 1;
  }
  const bool partly_live = __syncthreads_or(partly) != 0;
  if (taken != wg::Tiles::kAll && partly_live == (taken == wg::Tiles::kWhole)) return;  // the other launch's
  float acc[2][64] = {};
  wg::RunListedSegments<D, kDepth, kRunStrips, typename BLanes::Layout, true, true, kRowGroups>(
      list, tile.count, min(p.depth_block(), p.depth()), 3u, issue_segment, scale_stage, acc);
  wg::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int, int) {
    tile.Store(r, c, v0, v1, partials, out);
  });
#endif
}

// out (rows x cols) = the sum of PipelinedProduct's partial products, as D:
// those of the splits that had entries of their column tile's list.
template <typename D>
__global__ void SplitSums(const float* partials, int64_t splits, const int32_t* counts, int64_t rows, int64_t cols,
                          D* out) {
  const int64_t count = rows * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t used = pl::UsedSplits(counts[e % cols / pl::kTileCols], splits);
    float sum = 0.0f;
    for (int64_t s = 0; s < used; ++s) sum += partials[s * count + e];
    out[e] = FromCompute<D>(sum);
  }
}

// A weight gradient's thread block: blockIdx.x walks (split, 128 x 128 tile
// of dW), columns fastest; the split multiplies `steps` stages of `depth`
// rows of the batch from stage `first` (per_split a split).
struct WeightTile {
  int64_t split, row0, col0, first, steps;
  __device__ WeightTile(const GridDims& g, int64_t m, int64_t depth, int64_t per_split) {
    const int64_t col_tiles = CeilDiv(g.cols, int64_t{pl::kTileCols});
    const int64_t tiles = CeilDiv(g.rows, int64_t{pl::kTileRows}) * col_tiles;
    split = int64_t(blockIdx.x) / tiles;
    row0 = int64_t(blockIdx.x) % tiles / col_tiles * pl::kTileRows;
    col0 = int64_t(blockIdx.x) % col_tiles * pl::kTileCols;
    first = split * per_split;
    steps = max(int64_t{0}, min(CeilDiv(m, depth), first + per_split) - first);
  }
  // Tile entries (r, c) and (r, c + 1) of dW: float partial sums where
  // partials, else masked by the factors factors_at(at, row, col) gives
  // (float2) for dW's entry `at` = (row, col) and the next.
  template <typename D, typename FactorsAt>
  __device__ void Store(const GridDims& g, int r, int c, float v0, float v1, float* partials, D* dw,
                        const FactorsAt& factors_at) const {
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row >= g.rows || col >= g.cols) return;
    const int64_t at = row * g.cols + col;
    if (partials != nullptr) {
      pl::StorePair(partials + split * g.rows * g.cols + at, v0, v1);
      return;
    }
    const float2 factor = factors_at(at, row, col);
    pl::StorePair(dw + at, Masked(v0, factor.x), Masked(v1, factor.y));
  }
};

// dW = mask(x^T dy) for 16-bit D (or float as TF32) on the pipelined tile,
// split over the depth: blockIdx.x walks (split, dW's 128 x 128 tile),
// columns fastest; the depth is the m rows of x and dy, kDepth at a time,
// split s taking stages [s per_split, (s + 1) per_split). A warp multiplies
// only its fragments in live blocks, and a tile without any reads neither x
// nor dy. With one split the tile is written masked, as D; with several, as
// float partial sums to partials[split] (k x n each), which SplitWeightSums
// adds up.
template <typename D, int kDepth>
__global__ void __launch_bounds__(pl::kThreads)
    PipelinedOuterProducts(const D* x, const D* dy, int64_t m, const float* factors, bool element_level, GridDims g,
                           const uint8_t* live, int64_t per_split, float* partials, D* dw) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  const WeightTile tile(g, m, kDepth, per_split);
  const int64_t row0 = tile.row0;
  const int64_t col0 = tile.col0;
  const int64_t first = tile.first;
  const int64_t steps = tile.steps;
  const auto fragment_live = [&](int64_t row, int64_t col) {
    return row < g.rows && col < g.cols && g.block_live(live, row, col);
  };
  const pl::LiveTile live_tile = pl::FindLiveFragments(row0, col0, fragment_live);
  pl::WarpStage stage{};
  stage.fragments = live_tile.warp;
  // A = x^T as [depth][rows]: x's rows m0 .., along dW's rows; B = dy's rows m0 ..
  const pl::StageCopier<D, kDepth, pl::kTileRows, true> x_copier(x, g.rows, row0, g.rows);
  const pl::StageCopier<D, kDepth, pl::kTileCols, true> dy_copier(dy, g.cols, col0, g.cols);
  const auto issue = [&](int64_t step, D* a_stage, D* b_stage) {
    x_copier.Issue(a_stage, (first + step) * kDepth, m, decltype(x_copier)::kAllChunks);
    dy_copier.Issue(b_stage, (first + step) * kDepth, m, decltype(dy_copier)::kAllChunks);
  };
  float acc[pl::kStrips][2 * pl::kStrips][4] = {};
  pl::RunPipeline<D, kDepth, false, false, false>(live_tile.any ? steps : 0, issue, [&](int64_t) { return stage; },
                                                  acc);
  const pl::FragmentBlocks blocks(
      row0, col0, [&](int64_t row) { return min(row, g.rows - 1) / g.block_rows * g.grid_cols; },
      [&](int64_t col) { return min(col, g.cols - 1) / g.block_cols; });
  pl::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int mt, int s) {
    tile.Store(g, r, c, v0, v1, partials, dw, [&](int64_t at, int64_t, int64_t) {
      return element_level ? make_float2(factors[at], factors[at + 1])
                           : make_float2(factors[blocks(mt, s)], factors[blocks(mt, s)]);
    });
  });
#endif
}

// PipelinedOuterProducts on the warpgroup tile (warpgroup_gemm.cuh; Hopper,
// built for sm_90a): the same tiles, splits and outputs, A = x^T staged
// M-major (x's rows are the depth) and B = dy N-major. A 64-row half of the
// tile multiplies each run of its strips in which some 16 x 16 fragment is
// live (the half's dead fragments in such a run are multiplied and masked
// off when stored), and chunks of x and dy in strips with no live fragment
// are zero fills that read nothing. Tiles in which every strip of both
// halves holds a live fragment take the kWhole launch (128-wide products,
// kWholeLive: unguarded), the others kPartlyLive (or kAll, where a half may
// have no live strip), as for WarpgroupProduct. The whole tiles' stages come
// by tensor copies (x_map, dy_map: boxes of 64 columns by kDepth rows, two
// per operand and stage) issued by one thread, rows past the batch landing
// as zeros; the others' by cp.async.
template <typename D, int kDepth, int kRunStrips, bool kWholeLive>
__global__ void __launch_bounds__(wg::kThreads, wg::kBlocksPerSm)
    WarpgroupOuterProducts(const __grid_constant__ ptx::TensorMap x_map, const __grid_constant__ ptx::TensorMap dy_map,
                           const D* x, const D* dy, int64_t m, const float* factors, bool element_level, GridDims g,
                           const uint8_t* live, int64_t per_split, float* partials, D* dw, wg::Tiles taken) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // launched only where wg::DeviceRunsWarpgroupMma()
#else
  const WeightTile tile(g, m, kDepth, per_split);
  // Each half's strips with a live fragment, and the tile's row strips with one.
  wg::HalfStrips strips{{0u, 0u}};
  unsigned row_strips = 0;
  for (int r = 0; r < pl::kTileStrips; ++r) {
    for (int c = 0; c < pl::kTileStrips; ++c) {
      const int64_t row = tile.row0 + r * pl::kStrip;
      const int64_t col = tile.col0 + c * pl::kStrip;
      if (row < g.rows && col < g.cols && g.block_live(live, row, col)) {
        strips.half[r * pl::kStrip / wg::kHalfRows] |= 1u << c;
        row_strips |= 1u << r;
      }
    }
  }
  const bool whole = strips.half[0] == (1u << pl::kTileStrips) - 1 && strips.half[1] == strips.half[0];
  if (taken != wg::Tiles::kAll && whole != (taken == wg::Tiles::kWhole)) return;  // the other launch's
  strips.half[0] = ptx::WarpUniform(strips.half[0]);
  strips.half[1] = ptx::WarpUniform(strips.half[1]);
  // x's and dy's rows m0 .. as depth lines, along dW's rows and columns.
  using Copier = wg::SwizzledCopier<D, kDepth>;
  const Copier x_copier(x, g.rows, tile.row0, g.rows);
  const Copier dy_copier(dy, g.cols, tile.col0, g.cols);
  const unsigned x_copies = x_copier.CopiesIn(row_strips);
  const unsigned dy_copies = dy_copier.CopiesIn(strips.half[0] | strips.half[1]);
  const auto issue = [&](int64_t step, int, D* a_stage, D* b_stage, uint64_t* arrival) {
    const int64_t d0 = (tile.first + step) * kDepth;
    if constexpr (kWholeLive) {
      if (threadIdx.x == 0) {
        ptx::MbarrierArriveExpectTx(arrival, 2 * wg::kOperandElements<kDepth> * uint32_t(sizeof(D)));
        for (int half = 0; half < 2; ++half) {
          const int offset = half * Copier::Layout::kGroupElements;
          ptx::TensorCopy2D(a_stage + offset, &x_map, int32_t(tile.row0 + half * wg::kHalfRows), int32_t(d0), arrival);
          ptx::TensorCopy2D(b_stage + offset, &dy_map, int32_t(tile.col0 + half * wg::kHalfRows), int32_t(d0), arrival);
        }
      }
    } else {
      x_copier.Issue(a_stage, d0, m, x_copies);
      dy_copier.Issue(b_stage, d0, m, dy_copies);
    }
  };
  float acc[2][64] = {};
  wg::RunPipeline<D, kDepth, kRunStrips, true, typename Copier::Layout, kWholeLive, kWholeLive, 1>(
      strips.half[0] | strips.half[1] ? tile.steps : 0, issue, [&](int64_t, int, D*) { return strips; }, acc);
  const wg::AccumulatorBlocks blocks(
      tile.row0, tile.col0, [&](int64_t row) { return min(row, g.rows - 1) / g.block_rows * g.grid_cols; },
      [&](int64_t col) { return min(col, g.cols - 1) / g.block_cols; });
  wg::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int slot, int strip) {
    tile.Store(g, r, c, v0, v1, partials, dw, [&](int64_t at, int64_t, int64_t) {
      return element_level ? make_float2(factors[at], factors[at + 1])
                           : make_float2(factors[blocks(slot, strip)], factors[blocks(slot, strip)]);
    });
  });
#endif
}

// dW from the `splits` partial sums of PipelinedOuterProducts, masked.
template <typename D>
__global__ void SplitWeightSums(const float* partials, int64_t splits, const float* factors, bool element_level,
                                GridDims g, D* dw) {
  const int64_t count = g.rows * g.cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const float factor = g.factor(factors, element_level, e / g.cols, e % g.cols);
    float sum = 0.0f;
    for (int64_t s = 0; Live(factor) && s < splits; ++s) sum += partials[s * count + e];
    dw[e] = FromCompute<D>(Masked(sum, factor));
  }
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_KERNELS_CUH_
