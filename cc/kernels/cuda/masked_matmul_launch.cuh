// The host side of the masked_matmul kernels: the workspace layout, the
// tensor-core rule, and each product's launch sequence (grid sizes, the
// kernels in order), written against a launch policy so that the same
// sequence runs on a GPU (CudaLaunch, cuda_launch.cuh, from
// masked_matmul_gpu.cu) and under the CUDA emulation of tests/cuda_emulation.
//
// A policy `launch` is called as launch(kernel, grid, block, args...) for
// each kernel, in stream order, and launch.Status() gives the int status the
// launchers return (cudaGetLastError's on a GPU).
//
// Host code only; it includes the device code (masked_matmul_kernels.cuh),
// whose anonymous namespace it shares: include it from one translation unit
// of a program.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_LAUNCH_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/kernels/cuda/masked_matmul_kernels.cuh"
#include "cc/kernels/cuda/pipelined_gemm.cuh"
#include "cc/kernels/cuda/tensor_core_tile.cuh"

namespace masked_ops {
namespace gpu {
namespace {

// Block sizes clamped to the extents they cut (the same grid), so that no
// index arithmetic meets a raw caller's block size near 2^63.
GridDims DimsOf(const BlockGrid& unclamped) {
  const BlockGrid grid = unclamped.Clamped();
  return GridDims{grid.rows, grid.cols, grid.block_rows, grid.block_cols, grid.grid_rows(),
                  grid.grid_cols()};
}

// The workspace: canonical factors (in F), block liveness, lists and counts,
// and the partial sums of a split pipelined product.
template <typename F>
struct Workspace {
  F* factors;
  uint8_t* live;
  int32_t* lists;
  int32_t* counts;
  float* partials;
};

int64_t AlignUp(int64_t bytes) { return (bytes + 255) / 256 * 256; }

int64_t FactorCount(const BlockGrid& grid, MaskLevel level) {
  return level == MaskLevel::kElement ? grid.rows * grid.cols : grid.grid_rows() * grid.grid_cols();
}

// Entries of the live lists: per block column or row (the CUDA-core
// products) or per segment of each pipelined output column tile (forward:
// tiles of W's columns by block rows; dx: tiles of W's rows by block columns),
// and of their counts.
int64_t ListEntries(const BlockGrid& grid) {
  return std::max({grid.grid_rows() * grid.grid_cols(), CeilDiv(grid.cols, pl::kTileCols) * grid.grid_rows(),
                   CeilDiv(grid.rows, pl::kTileCols) * grid.grid_cols()});
}
int64_t CountEntries(const BlockGrid& grid) {
  return std::max({grid.grid_rows(), grid.grid_cols(), CeilDiv(grid.cols, pl::kTileCols),
                   CeilDiv(grid.rows, pl::kTileCols)});
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
  p += AlignUp(ListEntries(grid) * int64_t(sizeof(int32_t)));
  ws.counts = reinterpret_cast<int32_t*>(p);
  p += AlignUp(CountEntries(grid) * int64_t(sizeof(int32_t)));
  ws.partials = reinterpret_cast<float*>(p);
  return ws;
}

unsigned BlocksFor(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, 65535));
}

// Which live-block lists a product walks: none (the tensor-core products and
// dW read the liveness flags), per block column (forward) or per block row (dx).
enum class Lists { kNone, kByColumn, kByRow };

template <typename F, typename TMask, typename Launch>
Workspace<F> IndexMask(const Launch& launch, const BlockGrid& grid, MaskView<TMask> mask, void* workspace,
                       Lists lists) {
  const Workspace<F> ws = Carve<F>(workspace, grid, mask.level);
  const int64_t count = FactorCount(grid, mask.level);
  const GridDims dims = DimsOf(grid);
  launch(CanonicalFactors<TMask, F>, BlocksFor(count), kThreads, mask.data, count, ws.factors);
  launch(BlockLiveness<F>, BlocksFor(dims.grid_rows * dims.grid_cols), kThreads, ws.factors,
         mask.level == MaskLevel::kElement, dims, ws.live);
  if (lists != Lists::kNone) {
    const bool by_column = lists == Lists::kByColumn;
    launch(LiveLists, BlocksFor(by_column ? dims.grid_cols : dims.grid_rows), kThreads, ws.live, dims, by_column,
           ws.lists, ws.counts);
  }
  return ws;
}


}  // namespace

template <typename T>
bool MatmulUsesTensorCores(const BlockGrid& grid, Product product, GpuMath math) {
  return tc::UseTensorCores<typename Device<T>::type>(math, product, tc::FragmentAligned(grid.block_rows, grid.rows),
                                                     tc::FragmentAligned(grid.block_cols, grid.cols));
}

namespace {

// Whether the types, mask and weight suit the pipelined kernels (the rest of
// the rule, MatmulUsesPipeline, is about the call and the device).
template <typename T>
bool PipelineShape(const BlockGrid& grid, Product product, MaskLevel level) {
  using D = typename Device<T>::type;
  return pl::kHasPipeline<D> &&
         (product == Product::kGradWeight || level == MaskLevel::kBlock) && grid.rows % pl::kPerChunk == 0 &&
         grid.cols % pl::kPerChunk == 0 && pl::StripAligned(grid.block_rows, grid.rows) &&
         pl::StripAligned(grid.block_cols, grid.cols) && grid.grid_rows() < pl::kMaxSegments &&
         grid.grid_cols() < pl::kMaxSegments;
}

}  // namespace

template <typename T>
bool MatmulUsesPipeline(const BlockGrid& grid, Product product, GpuMath math, MaskLevel level) {
  return PipelineShape<T>(grid, product, level) && math == GpuMath::kTensorCores && tc::DeviceSupportsTensorCores();
}

namespace {

// How many ways a pipelined product splits its depth (the forward product
// and dx: each tile's segment list; dW: the batch); 1: no partial sums.
template <typename T>
int64_t PipelineSplits(const MatmulShape& shape, Product product, MaskLevel level) {
  if (!PipelineShape<T>(shape.weight_grid(), product, level)) return 1;
  switch (product) {
    case Product::kForward:
      return pl::DepthSplits(pl::TileCount(shape.m, shape.n), shape.k);
    case Product::kGradInput:
      return pl::DepthSplits(pl::TileCount(shape.m, shape.k), shape.n);
    default:
      return pl::DepthSplits(pl::TileCount(shape.k, shape.n), shape.m);
  }
}

// Elements of a product's output.
int64_t OutputCount(const MatmulShape& shape, Product product) {
  return product == Product::kForward ? shape.m * shape.n : product == Product::kGradInput ? shape.m * shape.k
                                                                                            : shape.k * shape.n;
}

}  // namespace

template <typename T>
size_t GpuWorkspaceBytes(const MatmulShape& shape, MaskLevel level, Product product) {
  const BlockGrid grid = shape.weight_grid();
  const int64_t blocks = grid.grid_rows() * grid.grid_cols();
  const int64_t splits = PipelineSplits<T>(shape, product, level);
  return static_cast<size_t>(AlignUp(FactorCount(grid, level) * int64_t(sizeof(ComputeOf<T>))) + AlignUp(blocks) +
                             AlignUp(ListEntries(grid) * int64_t(sizeof(int32_t))) +
                             AlignUp(CountEntries(grid) * int64_t(sizeof(int32_t))) +
                             (splits > 1 ? splits * OutputCount(shape, product) * int64_t(sizeof(float)) : 0));
}

namespace {

// The forward product and dx of 16-bit types take the warpgroup tile where
// it is chosen for them and the device runs it (and its tensor maps can be
// made), the rest the pipelined tile (same grid, lists and splits; the
// warpgroup tile's tall tiles a grid of their own); so does dW
// (RunGradWeight).
template <typename D, bool kTransposed, int kDepth, typename Launch>
void LaunchPipelinedProduct(const Launch& launch, int64_t blocks, const D* a, int64_t m, const D* w,
                            const Workspace<float>& ws, const GridDims& dims, int64_t splits, D* out) {
  if constexpr (wg::kHasWarpgroupPath<D>) {
    // A: m rows of the depth (W's rows, or its columns for dx); W: rows x cols,
    // in boxes of wg::BoxColumns (whole tiles' and the other tiles' runs).
    const int64_t depth = kTransposed ? dims.cols : dims.rows;
    const int64_t block = kTransposed ? dims.block_rows : dims.block_cols;
    const int64_t out_cols = kTransposed ? dims.rows : dims.cols;
    const auto encode_w = [&](ptx::TensorMap* map, int run_strips) {
      const int box = wg::BoxColumns(kTransposed, run_strips);
      return kTransposed ? launch.EncodeTensorMap(map, w, dims.cols, dims.rows, kDepth, box)
                         : launch.EncodeTensorMap(map, w, dims.cols, dims.rows, box, kDepth);
    };
    ptx::TensorMap a_map{};
    ptx::TensorMap w_whole_map{};
    ptx::TensorMap w_runs_map{};
    // (No depth: nothing to copy, and no tensor map of an empty array.)
    if (wg::UsesWarpgroupMma(kTransposed ? Product::kGradInput : Product::kForward) && depth > 0) {
      const auto run = [&](auto row_groups) {
        constexpr int kRowGroups = decltype(row_groups)::value;
        const int64_t tile_rows = int64_t{pl::kTileRows} * kRowGroups;
        if (!launch.EncodeTensorMap(&a_map, a, depth, m, kDepth, static_cast<int>(tile_rows)) ||
            !encode_w(&w_whole_map, pl::kTileStrips) || !encode_w(&w_runs_map, wg::RunStrips(block, out_cols))) {
          return false;
        }
        const int64_t tile_blocks = kRowGroups == 1 ? blocks : pl::TileCount(m, out_cols, tile_rows);
        wg::WithRunStrips(block, out_cols, [&](auto run_strips, auto taken) {
          constexpr int kRunStrips = decltype(run_strips)::value;
          launch.WithSharedMemory(wg::kSharedBytes<D, kDepth, kRowGroups>)(
              WarpgroupProduct<D, kTransposed, kDepth, kRunStrips, kRowGroups>, static_cast<unsigned>(tile_blocks),
              wg::kThreads * kRowGroups, a_map, kRunStrips == pl::kTileStrips ? w_whole_map : w_runs_map, m,
              ws.factors, dims, ws.live, reinterpret_cast<const uint32_t*>(ws.lists), ws.counts, splits,
              splits > 1 ? ws.partials : nullptr, out, decltype(taken)::value);
        });
        return true;
      };
      if constexpr (kDepth == pl::kWideStage) {
        // Tall tiles (two warpgroups, 256 rows) where chosen, for a product
        // of one split over more than one tile's rows, in stages of 32 (the
        // dense products'; stages of 16 stay on 128 rows, which halves the
        // kernels to compile).
        const bool tall = wg::TallTiles() && splits == 1 && m > pl::kTileRows;
        if (tall ? run(std::integral_constant<int, 2>{}) : run(std::integral_constant<int, 1>{})) return;
      } else {
        if (run(std::integral_constant<int, 1>{})) return;
      }
      wg::CountTensorMapRefusal();
    }
  }
  launch.WithSharedMemory(pl::kSharedBytes<D, kDepth, true, kTransposed>)(
      PipelinedProduct<D, kTransposed, kDepth>, static_cast<unsigned>(blocks), pl::kThreads, a, m, w, ws.factors,
      dims, ws.live, reinterpret_cast<const uint32_t*>(ws.lists), ws.counts, splits,
      splits > 1 ? ws.partials : nullptr, out);
}

// The forward product (kTransposed false: out = a @ masked W) or dx (true:
// out = a @ masked W^T).
template <typename T, bool kTransposed, typename TMask, typename Launch>
int RunProduct(const Launch& launch, const MatmulShape& shape, const T* a, const T* w, MaskView<TMask> mask, T* out,
               void* workspace, GpuMath math) {
  using D = typename Device<T>::type;
  const BlockGrid grid = shape.weight_grid();
  const int64_t out_cols = kTransposed ? shape.k : shape.n;
  if (shape.m == 0 || out_cols == 0) return 0;
  const GridDims dims = DimsOf(grid);
  const bool element_level = mask.level == MaskLevel::kElement;
  const Product product = kTransposed ? Product::kGradInput : Product::kForward;
  if constexpr (pl::kHasPipeline<D>) {
    if (MatmulUsesPipeline<T>(grid, product, math, mask.level) && pl::Aligned16(a, w, out)) {
      const int64_t splits = PipelineSplits<T>(shape, product, mask.level);
      const int64_t blocks = splits * pl::TileCount(shape.m, out_cols);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      const auto ws = IndexMask<float>(launch, grid, mask, workspace, Lists::kNone);
      launch(pl::TileSegmentLists<ProductDims<kTransposed>>, static_cast<unsigned>(CeilDiv(out_cols, pl::kTileCols)),
             pl::kScanThreads, ProductDims<kTransposed>{dims, ws.live, ws.factors}, reinterpret_cast<uint32_t*>(ws.lists),
             ws.counts);
      const auto* da = reinterpret_cast<const D*>(a);
      const auto* dw = reinterpret_cast<const D*>(w);
      auto* dout = reinterpret_cast<D*>(out);
      pl::WithStageDepth<D>(kTransposed ? dims.block_cols : dims.block_rows, kTransposed ? shape.n : shape.k,
                            [&](auto stage) {
                              LaunchPipelinedProduct<D, kTransposed, decltype(stage)::value>(
                                  launch, blocks, da, shape.m, dw, ws, dims, splits, dout);
                            });
      if (splits > 1) {
        launch(SplitSums<D>, BlocksFor(shape.m * out_cols), kThreads, ws.partials, splits, ws.counts, shape.m,
               out_cols, dout);
      }
      return launch.Status();
    }
  }
  if constexpr (tc::kHasTensorCorePath<D>) {
    if (MatmulUsesTensorCores<T>(grid, product, math)) {
      const int64_t tiles = tc::TileCount(shape.m, out_cols);
      if (tiles > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      const auto ws = IndexMask<Compute<D>>(launch, grid, mask, workspace, Lists::kNone);
      launch(TensorCoreProduct<D, kTransposed>, static_cast<unsigned>(tiles), tc::kThreads,
             reinterpret_cast<const D*>(a), shape.m, reinterpret_cast<const D*>(w), ws.factors, element_level, dims,
             ws.live, reinterpret_cast<D*>(out));
      return launch.Status();
    }
  }
  const int64_t groups = kTransposed ? dims.grid_rows : dims.grid_cols;
  const int64_t group_width = kTransposed ? grid.block_rows : grid.block_cols;
  const int64_t chunks = CeilDiv(std::min(group_width, out_cols), kTile);
  const int64_t blocks = CeilDiv(shape.m, kTile) * groups * chunks;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const auto ws =
      IndexMask<Compute<D>>(launch, grid, mask, workspace, kTransposed ? Lists::kByRow : Lists::kByColumn);
  launch(BlockSparseProduct<D, kTransposed>, static_cast<unsigned>(blocks), kThreads, reinterpret_cast<const D*>(a),
         shape.m, reinterpret_cast<const D*>(w), ws.factors, element_level, dims, ws.lists, ws.counts, chunks,
         reinterpret_cast<D*>(out));
  return launch.Status();
}

// dW = mask(x^T dy).
template <typename T, typename TMask, typename Launch>
int RunGradWeight(const Launch& launch, const MatmulShape& shape, const T* x, const T* dy, MaskView<TMask> mask,
                  T* dw, void* workspace, GpuMath math) {
  using D = typename Device<T>::type;
  const BlockGrid grid = shape.weight_grid();
  if (shape.k == 0 || shape.n == 0) return 0;
  const auto ws = IndexMask<Compute<D>>(launch, grid, mask, workspace, Lists::kNone);
  const GridDims dims = DimsOf(grid);
  if constexpr (pl::kHasPipeline<D>) {
    if (MatmulUsesPipeline<T>(grid, Product::kGradWeight, math, mask.level) && pl::Aligned16(x, dy, dw)) {
      constexpr int kDepth = pl::kUnblockedStage<D>;
      const int64_t splits = PipelineSplits<T>(shape, Product::kGradWeight, mask.level);
      const int64_t blocks = splits * pl::TileCount(shape.k, shape.n);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      const int64_t per_split = CeilDiv(CeilDiv(shape.m, int64_t{kDepth}), splits);
      const bool element_level = mask.level == MaskLevel::kElement;
      const auto* device_x = reinterpret_cast<const D*>(x);
      const auto* device_dy = reinterpret_cast<const D*>(dy);
      auto* device_dw = reinterpret_cast<D*>(dw);
      float* partials = splits > 1 ? ws.partials : nullptr;
      bool warpgroup = false;
      if constexpr (wg::kHasWarpgroupPath<D>) {
        // x and dy as depth lines of 64 columns (two boxes per stage), for
        // the whole tiles' tensor copies.
        ptx::TensorMap x_map{};
        ptx::TensorMap dy_map{};
        if (wg::UsesWarpgroupMma(Product::kGradWeight) && shape.m > 0) {
          warpgroup = launch.EncodeTensorMap(&x_map, x, shape.k, shape.m, wg::kHalfRows, kDepth) &&
                      launch.EncodeTensorMap(&dy_map, dy, shape.n, shape.m, wg::kHalfRows, kDepth);
          if (!warpgroup) wg::CountTensorMapRefusal();
        }
        if (warpgroup) {
          wg::WithRunStrips(dims.block_cols, dims.cols, [&](auto run_strips, auto taken) {
            launch.WithSharedMemory(wg::kSharedBytes<D, kDepth>)(
                WarpgroupOuterProducts<D, kDepth, decltype(run_strips)::value,
                                       decltype(taken)::value == wg::Tiles::kWhole>,
                static_cast<unsigned>(blocks), wg::kThreads, x_map, dy_map, device_x, device_dy, shape.m, ws.factors,
                element_level, dims, ws.live, per_split, partials, device_dw, decltype(taken)::value);
          });
        }
      }
      if (!warpgroup) {
        launch.WithSharedMemory(pl::kSharedBytes<D, kDepth, false, false>)(
            PipelinedOuterProducts<D, kDepth>, static_cast<unsigned>(blocks), pl::kThreads, device_x, device_dy,
            shape.m, ws.factors, element_level, dims, ws.live, per_split, partials, device_dw);
      }
      if (splits > 1) {
        launch(SplitWeightSums<D>, BlocksFor(shape.k * shape.n), kThreads, ws.partials, splits, ws.factors,
               element_level, dims, reinterpret_cast<D*>(dw));
      }
      return launch.Status();
    }
  }
  if constexpr (tc::kHasTensorCorePath<D>) {
    if (MatmulUsesTensorCores<T>(grid, Product::kGradWeight, math)) {
      const int64_t tiles = tc::TileCount(shape.k, shape.n);
      if (tiles > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      launch(TensorCoreOuterProducts<D>, static_cast<unsigned>(tiles), tc::kThreads, reinterpret_cast<const D*>(x),
             reinterpret_cast<const D*>(dy), shape.m, ws.factors, mask.level == MaskLevel::kElement, dims, ws.live,
             reinterpret_cast<D*>(dw));
      return launch.Status();
    }
  }
  const int64_t tiles = CeilDiv(grid.packed_rows(), kTile) * CeilDiv(grid.packed_cols(), kTile);
  const int64_t blocks = dims.grid_rows * dims.grid_cols * tiles;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  launch(BlockOuterProducts<D>, static_cast<unsigned>(blocks), kThreads, reinterpret_cast<const D*>(x),
         reinterpret_cast<const D*>(dy), shape.m, ws.factors, mask.level == MaskLevel::kElement, dims, ws.live, tiles,
         reinterpret_cast<D*>(dw));
  return launch.Status();
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_LAUNCH_CUH_
