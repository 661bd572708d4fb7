// CUDA kernels for masked_matmul (see masked_matmul_gpu.h).
//
// Each call first turns the mask into canonical factors (dead: +0;
// live: its value, -0 for a live value that rounds to zero, so that liveness
// is "any bit set"), marks the live blocks, and lists, per output block
// column (forward) or block row (dx), the live blocks to multiply. The
// products then run over those lists only: a dead block is never read. Two
// kinds of product: on tensor cores (tensor_core_tile.cuh; the half types,
// and float32 as TF32 when allowed) where the output's block edges fall on
// multiples of 16 (MatmulUsesTensorCores), else plain shared-memory tiles of
// float FMAs (mask_factors.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/kernels/cuda/tensor_core_tile.cuh"

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

// Block sizes clamped to the extents they cut (the same grid), so that no
// index arithmetic meets a raw caller's block size near 2^63.
GridDims DimsOf(const BlockGrid& unclamped) {
  const BlockGrid grid = unclamped.Clamped();
  return GridDims{grid.rows, grid.cols, grid.block_rows, grid.block_cols, grid.grid_rows(),
                  grid.grid_cols()};
}

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
    const int64_t d_end = min(depth_total, (segment + 1) * depth_block);
    for (int64_t d0 = segment * depth_block; d0 < d_end; d0 += tc::kStageDepth) {
      for (int e = threadIdx.x; e < tc::kTileRows * tc::kStageDepth; e += tc::kThreads) {
        const int64_t row = row0 + e / tc::kStageDepth;
        const int64_t d = d0 + e % tc::kStageDepth;
        a_tile[(e / tc::kStageDepth) * kAStride + e % tc::kStageDepth] =
            (row < m && d < d_end) ? a[row * depth_total + d] : tc::ToSmem<T>(0.0f);
      }
      for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileCols; e += tc::kThreads) {
        // Consecutive threads read consecutive entries of W.
        const int dd = kTransposed ? e % tc::kStageDepth : e / tc::kTileCols;
        const int c = kTransposed ? e / tc::kStageDepth : e % tc::kTileCols;
        const int64_t d = d0 + dd;
        const int64_t col = col0 + c;
        float b = 0.0f;
        if (d < d_end && col < out_cols && ((live_columns >> (c / tc::kFragment)) & 1u) != 0) {
          const int64_t wr = kTransposed ? col : d;
          const int64_t wc = kTransposed ? d : col;
          b = Masked(ToCompute(w[wr * g.cols + wc]), g.factor(factors, element_level, wr, wc));
        }
        b_tile[dd * tc::kBStride<T> + c] = tc::ToSmem<T>(b);
      }
      __syncthreads();
      tc::MultiplyStage<T, tc::wmma::row_major>(a_tile, kAStride, b_tile,
                                                static_cast<int>(min(int64_t{tc::kStageDepth}, d_end - d0)),
                                                tc::WarpFragments(live_columns), acc);
      __syncthreads();
    }
  }
  float* staged = reinterpret_cast<float*>(shared);
  tc::StoreAccumulators<T>(acc, staged);
  __syncthreads();
  tc::ForEachStaged(staged, [&](int r, int c, float v) {
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
  bool tile_live = false;
  for (int f = 0; f < tc::kFragmentRows * tc::kFragmentColumns && !tile_live; ++f) {
    tile_live = fragment_live(f / tc::kFragmentColumns, f % tc::kFragmentColumns);
  }
  const tc::WarpPlace warp = tc::ThisWarp();
  unsigned fragments = 0;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      if (fragment_live(warp.row * 2 + i, warp.col * 2 + j)) fragments |= 1u << (i * 2 + j);
    }
  }
  tc::Accumulator<T> acc[2][2];
  tc::ZeroAccumulators<T>(acc);
  for (int64_t m0 = 0; tile_live && m0 < m; m0 += tc::kStageDepth) {
    // A = x^T, staged column-major: consecutive threads read along x's rows.
    for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileRows; e += tc::kThreads) {
      const int64_t d = m0 + e / tc::kTileRows;
      const int64_t row = row0 + e % tc::kTileRows;
      a_tile[(e / tc::kTileRows) * kAStride + e % tc::kTileRows] =
          (d < m && row < g.rows) ? x[d * g.rows + row] : tc::ToSmem<T>(0.0f);
    }
    for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileCols; e += tc::kThreads) {
      const int64_t d = m0 + e / tc::kTileCols;
      const int64_t col = col0 + e % tc::kTileCols;
      b_tile[(e / tc::kTileCols) * tc::kBStride<T> + e % tc::kTileCols] =
          (d < m && col < g.cols) ? dy[d * g.cols + col] : tc::ToSmem<T>(0.0f);
    }
    __syncthreads();
    tc::MultiplyStage<T, tc::wmma::col_major>(a_tile, kAStride, b_tile,
                                              static_cast<int>(min(int64_t{tc::kStageDepth}, m - m0)), fragments, acc);
    __syncthreads();
  }
  float* staged = reinterpret_cast<float*>(shared);
  tc::StoreAccumulators<T>(acc, staged);
  __syncthreads();
  tc::ForEachStaged(staged, [&](int r, int c, float v) {
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row < g.rows && col < g.cols) dw[row * g.cols + col] = FromCompute<T>(Masked(v, g.factor(factors, element_level, row, col)));
  });
#endif
}

// The workspace: canonical factors (in F), block liveness, lists and counts.
template <typename F>
struct Workspace {
  F* factors;
  uint8_t* live;
  int32_t* lists;
  int32_t* counts;
};

int64_t AlignUp(int64_t bytes) { return (bytes + 255) / 256 * 256; }

int64_t FactorCount(const BlockGrid& grid, MaskLevel level) {
  return level == MaskLevel::kElement ? grid.rows * grid.cols : grid.grid_rows() * grid.grid_cols();
}

template <typename F>
Workspace<F> Carve(void* base, const BlockGrid& grid, MaskLevel level) {
  char* p = static_cast<char*>(base);
  const int64_t blocks = grid.grid_rows() * grid.grid_cols();
  Workspace<F> ws;
  ws.factors = reinterpret_cast<F*>(p);
  p += AlignUp(FactorCount(grid, level) * int64_t(sizeof(F)));
  ws.live = reinterpret_cast<uint8_t*>(p);
  p += AlignUp(blocks);
  ws.lists = reinterpret_cast<int32_t*>(p);
  p += AlignUp(blocks * int64_t(sizeof(int32_t)));
  ws.counts = reinterpret_cast<int32_t*>(p);
  return ws;
}

unsigned BlocksFor(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, 65535));
}

// Which live-block lists a product walks: none (the tensor-core products and
// dW read the liveness flags), per block column (forward) or per block row (dx).
enum class Lists { kNone, kByColumn, kByRow };

template <typename F, typename TMask>
Workspace<F> IndexMask(const BlockGrid& grid, MaskView<TMask> mask, void* workspace, Lists lists,
                       cudaStream_t stream) {
  const Workspace<F> ws = Carve<F>(workspace, grid, mask.level);
  const int64_t count = FactorCount(grid, mask.level);
  const GridDims dims = DimsOf(grid);
  CanonicalFactors<<<BlocksFor(count), kThreads, 0, stream>>>(mask.data, count, ws.factors);
  BlockLiveness<<<BlocksFor(dims.grid_rows * dims.grid_cols), kThreads, 0, stream>>>(
      ws.factors, mask.level == MaskLevel::kElement, dims, ws.live);
  if (lists != Lists::kNone) {
    const bool by_column = lists == Lists::kByColumn;
    LiveLists<<<BlocksFor(by_column ? dims.grid_cols : dims.grid_rows), kThreads, 0, stream>>>(
        ws.live, dims, by_column, ws.lists, ws.counts);
  }
  return ws;
}

// One thread block per kTileRows x kTileCols tile of a rows x cols output.
int64_t TensorCoreTiles(int64_t rows, int64_t cols) {
  return CeilDiv(rows, tc::kTileRows) * CeilDiv(cols, tc::kTileCols);
}

constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

template <typename T, bool kTransposed, typename TMask>
int RunProduct(const MatmulShape& shape, const T* a, const T* w, MaskView<TMask> mask, T* out,
               void* workspace, GpuMath math, Stream stream) {
  using D = typename Device<T>::type;
  const BlockGrid grid = shape.weight_grid();
  const int64_t out_cols = kTransposed ? shape.k : shape.n;
  if (shape.m == 0 || out_cols == 0) return 0;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const GridDims dims = DimsOf(grid);
  const bool element_level = mask.level == MaskLevel::kElement;
  if constexpr (tc::kHasTensorCorePath<D>) {
    if (MatmulUsesTensorCores<T>(grid, kTransposed ? Product::kGradInput : Product::kForward, math)) {
      const int64_t tiles = TensorCoreTiles(shape.m, out_cols);
      if (tiles > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      const auto ws = IndexMask<Compute<D>>(grid, mask, workspace, Lists::kNone, s);
      TensorCoreProduct<D, kTransposed><<<static_cast<unsigned>(tiles), tc::kThreads, 0, s>>>(
          reinterpret_cast<const D*>(a), shape.m, reinterpret_cast<const D*>(w), ws.factors, element_level, dims,
          ws.live, reinterpret_cast<D*>(out));
      return static_cast<int>(cudaGetLastError());
    }
  }
  const int64_t groups = kTransposed ? dims.grid_rows : dims.grid_cols;
  const int64_t group_width = kTransposed ? grid.block_rows : grid.block_cols;
  const int64_t chunks = CeilDiv(std::min(group_width, out_cols), kTile);
  const int64_t blocks = CeilDiv(shape.m, kTile) * groups * chunks;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const auto ws = IndexMask<Compute<D>>(grid, mask, workspace, kTransposed ? Lists::kByRow : Lists::kByColumn, s);
  BlockSparseProduct<D, kTransposed><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      reinterpret_cast<const D*>(a), shape.m, reinterpret_cast<const D*>(w), ws.factors, element_level, dims,
      ws.lists, ws.counts, chunks, reinterpret_cast<D*>(out));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

namespace tensor_core {
bool DeviceSupportsTensorCores() {
  int device = 0;
  int major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8;
}
}  // namespace tensor_core

template <typename T>
bool MatmulUsesTensorCores(const BlockGrid& grid, Product product, GpuMath math) {
  const bool rows = tc::FragmentAligned(grid.block_rows, grid.rows);
  const bool cols = tc::FragmentAligned(grid.block_cols, grid.cols);
  const bool aligned = product == Product::kForward ? cols : product == Product::kGradInput ? rows : rows && cols;
  return tc::kHasTensorCorePath<typename Device<T>::type> && math == GpuMath::kTensorCores && aligned &&
         tc::DeviceSupportsTensorCores();
}

template <typename T>
size_t GpuWorkspaceBytes(const BlockGrid& grid, MaskLevel level) {
  const int64_t blocks = grid.grid_rows() * grid.grid_cols();
  return static_cast<size_t>(AlignUp(FactorCount(grid, level) * int64_t(sizeof(ComputeOf<T>))) + AlignUp(blocks) +
                             AlignUp(blocks * int64_t(sizeof(int32_t))) +
                             AlignUp(std::max(grid.grid_rows(), grid.grid_cols()) * int64_t(sizeof(int32_t))));
}

template <typename T, typename TMask>
int MaskedMatmul(const MatmulShape& shape, const T* x, const T* w, MaskView<TMask> mask, T* y,
                 void* workspace, GpuMath math, Stream stream) {
  return RunProduct<T, false>(shape, x, w, mask, y, workspace, math, stream);
}

template <typename T, typename TMask>
int MaskedMatmulGradInput(const MatmulShape& shape, const T* dy, const T* w, MaskView<TMask> mask,
                          T* dx, void* workspace, GpuMath math, Stream stream) {
  return RunProduct<T, true>(shape, dy, w, mask, dx, workspace, math, stream);
}

template <typename T, typename TMask>
int MaskedMatmulGradWeight(const MatmulShape& shape, const T* x, const T* dy, MaskView<TMask> mask,
                           T* dw, void* workspace, GpuMath math, Stream stream) {
  using D = typename Device<T>::type;
  const BlockGrid grid = shape.weight_grid();
  if (shape.k == 0 || shape.n == 0) return 0;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const auto ws = IndexMask<Compute<D>>(grid, mask, workspace, Lists::kNone, s);
  const GridDims dims = DimsOf(grid);
  if constexpr (tc::kHasTensorCorePath<D>) {
    if (MatmulUsesTensorCores<T>(grid, Product::kGradWeight, math)) {
      const int64_t tiles = TensorCoreTiles(shape.k, shape.n);
      if (tiles > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      TensorCoreOuterProducts<D><<<static_cast<unsigned>(tiles), tc::kThreads, 0, s>>>(
          reinterpret_cast<const D*>(x), reinterpret_cast<const D*>(dy), shape.m, ws.factors,
          mask.level == MaskLevel::kElement, dims, ws.live, reinterpret_cast<D*>(dw));
      return static_cast<int>(cudaGetLastError());
    }
  }
  const int64_t tiles = CeilDiv(grid.packed_rows(), kTile) * CeilDiv(grid.packed_cols(), kTile);
  const int64_t blocks = dims.grid_rows * dims.grid_cols * tiles;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  BlockOuterProducts<D><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      reinterpret_cast<const D*>(x), reinterpret_cast<const D*>(dy), shape.m, ws.factors,
      mask.level == MaskLevel::kElement, dims, ws.live, tiles, reinterpret_cast<D*>(dw));
  return static_cast<int>(cudaGetLastError());
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                        \
  template int MaskedMatmul<T, TMask>(const MatmulShape&, const T*, const T*, MaskView<TMask>,   \
                                      T*, void*, GpuMath, Stream);                               \
  template int MaskedMatmulGradInput<T, TMask>(const MatmulShape&, const T*, const T*,           \
                                               MaskView<TMask>, T*, void*, GpuMath, Stream);     \
  template int MaskedMatmulGradWeight<T, TMask>(const MatmulShape&, const T*, const T*,          \
                                                MaskView<TMask>, T*, void*, GpuMath, Stream);

MASKED_OPS_FOR_EACH_GPU_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

#define MASKED_OPS_INSTANTIATE(T)                                                         \
  template size_t GpuWorkspaceBytes<T>(const BlockGrid&, MaskLevel);                       \
  template bool MatmulUsesTensorCores<T>(const BlockGrid&, Product, GpuMath);

MASKED_OPS_FOR_EACH_GPU_TYPE(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace gpu
}  // namespace masked_ops
