// The host side of the masked_conv2d kernels: the workspace layout, the
// tensor-core rule, and each product's launch sequence (grid sizes, the
// kernels in order), written against a launch policy as in
// masked_matmul_launch.cuh (launch(kernel, grid, block, args...) per kernel,
// launch.Status() for the status returned), so that the same sequences run on
// a GPU (masked_conv2d_gpu.cu) and under the CUDA emulation of
// tests/cuda_emulation.
//
// Host code only; it includes the device code (masked_conv2d_kernels.cuh),
// whose anonymous namespace it shares: include it from one translation unit
// of a program.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_LAUNCH_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/masked_conv2d_gpu.h"
#include "cc/kernels/cuda/masked_conv2d_kernels.cuh"
#include "cc/kernels/cuda/pipelined_gemm.cuh"
#include "cc/kernels/cuda/tensor_core_tile.cuh"

namespace masked_ops {
namespace gpu {
namespace {

// Block and tile sizes clamped to the extents they cut (the same blocks and
// tiles), so that tile counts and row numbers stay in range for a raw
// caller's sizes near 2^63.
ConvDims DimsOf(const Conv2DGeometry& g, MaskLevel level) {
  return ConvDims{g.batch, g.in_h, g.in_w, g.in_channels, g.filter_h, g.filter_w, g.out_channels,
                  g.stride_h, g.stride_w, g.dilation_h, g.dilation_w, g.pad_top, g.pad_left, g.out_h,
                  g.out_w, ClampBlock(g.in_block, g.in_channels), ClampBlock(g.out_block, g.out_channels),
                  ClampBlock(g.tile_h, g.out_h), ClampBlock(g.tile_w, g.out_w), level == MaskLevel::kElement};
}

template <typename F>
struct Workspace {
  F* factors;
  uint8_t* live;
  int32_t* lists;
  int32_t* counts;
  uint8_t* active;
  int32_t* order;   // the pipelined forward conv's row tiles, busy first,
  int32_t* busy;    // their busy count,
  int32_t* chunk_busy;  // and the busy count of each chunk of them (ForwardRowTileCounts)
  uint8_t* stage_live;  // the pipelined dfilters' depth stages holding a live output pixel
  uint32_t* tile_taps;  // the pipelined dx's live taps per row tile under an output mask (DxRowTileTaps)
  float* partials;  // the pipelined forward conv's and dfilters' split sums
};

int64_t AlignUp(int64_t bytes) { return (bytes + 255) / 256 * 256; }

int64_t FactorCount(const ConvDims& d) {
  return d.element_level ? d.taps() * d.in_channels * d.out_channels : d.in_blocks() * d.out_blocks();
}

int64_t FilterBlocks(const ConvDims& d) { return d.taps() * d.in_blocks() * d.out_blocks(); }

int64_t Tiles(const ConvDims& d) { return d.batch * d.tiles_h() * d.tiles_w(); }

// Entries of the live lists: per block of the other side (the CUDA-core
// products) or per segment of each pipelined output-channel tile, and of
// their counts.
int64_t ListEntries(const ConvDims& d) {
  return std::max({FilterBlocks(d), CeilDiv(d.out_channels, pl::kTileCols) * d.taps() * d.in_blocks(),
                   CeilDiv(d.in_channels, pl::kTileCols) * d.taps() * d.out_blocks()});
}
int64_t CountEntries(const ConvDims& d) {
  return std::max({d.in_blocks(), d.out_blocks(), CeilDiv(d.out_channels, pl::kTileCols),
                   CeilDiv(d.in_channels, pl::kTileCols)});
}

// Stages of the pipelined dfilters' depth under an output mask (the output
// pixels tile by tile), in the narrowest stages any type takes.
int64_t DepthStages(const ConvDims& d) { return CeilDiv(OutputTiles(d).Rows(), int64_t{pl::kNarrowStage}); }

// The pipelined dfilters' split of its depth (GradFilterDepth).
int64_t GradFilterSplits(const ConvDims& d, bool output_masked) {
  return pl::DepthSplits(d.taps() * pl::TileCount(d.in_channels, d.out_channels), GradFilterDepth(d, output_masked));
}

// Whether the batch and every coordinate a pipelined kernel forms (pixel
// positions, paddings, a tap's reach, strides) stay under 2^30, so that
// 32-bit arithmetic holds them with room for their sums (PixelRows).
bool CoordinatesFit32(const ConvDims& d) {
  constexpr int64_t kLimit = int64_t{1} << 30;
  return std::max({d.batch, d.in_h, d.in_w, d.out_h, d.out_w, d.pad_top, d.pad_left, d.stride_h, d.stride_w}) <
             kLimit &&
         d.filter_h < kLimit / std::max(d.dilation_h, int64_t{1}) &&
         d.filter_w < kLimit / std::max(d.dilation_w, int64_t{1});
}

// Whether the geometry suits the pipelined kernels for T (16-bit, or float
// as TF32; the rest of the rule, Conv2DUsesPipeline, is about the call).
template <typename T>
bool PipelineGeometry(const ConvDims& d) {
  return pl::kHasPipeline<typename Device<T>::type> && CoordinatesFit32(d) && d.in_channels % pl::kPerChunk == 0 &&
         d.out_channels % pl::kPerChunk == 0 && pl::StripAligned(d.in_block, d.in_channels) &&
         pl::StripAligned(d.out_block, d.out_channels) &&
         d.taps() * std::max(d.in_blocks(), d.out_blocks()) < pl::kMaxSegments;
}

// The pipelined forward conv's (row tile, column tile) pairs.
int64_t ForwardPairs(const ConvDims& d) { return ForwardRowTiles(d) * CeilDiv(d.out_channels, pl::kTileCols); }

// The most ways the pipelined forward conv may split a list (1: it never
// does), by the depth as for the weight gradients, and by the fewest busy
// (row tile, column tile) pairs it can have (ForwardSplits): every row
// tile's without an output mask, one row tile's with one.
int64_t ForwardMostSplits(const ConvDims& d, bool output_masked) {
  const int64_t fewest_busy = output_masked ? CeilDiv(d.out_channels, pl::kTileCols) : ForwardPairs(d);
  return ForwardSplits(fewest_busy, pl::MostDepthSplits(d.taps() * d.in_channels));
}

// The pipelined forward conv's partial-sum slots (ForwardTile): the splits
// of the busy pairs, which split only while there are fewer than
// pl::kTargetBlocks of them, into fewer than pl::kTargetBlocks more thread
// blocks than pairs (ForwardSplits); and those more blocks.
int64_t ForwardSplitSlots(const ConvDims& d, int64_t most_splits) {
  return most_splits > 1 ? std::min(2 * pl::kTargetBlocks, ForwardPairs(d) * most_splits) : 0;
}
int64_t ForwardSplitBlocks(const ConvDims& d, int64_t most_splits) {
  return std::min(pl::kTargetBlocks, ForwardPairs(d) * (most_splits - 1));
}

// Bytes of the pipelined products' partial sums (none for one split).
template <typename T>
int64_t PartialBytes(const ConvDims& d, Product product, bool output_masked) {
  if (!PipelineGeometry<T>(d)) return 0;
  if (product == Product::kForward) {
    return ForwardSplitSlots(d, ForwardMostSplits(d, output_masked)) * pl::kTileRows * pl::kTileCols *
           int64_t(sizeof(float));
  }
  const int64_t splits = GradFilterSplits(d, output_masked);
  return product == Product::kGradWeight && splits > 1
             ? splits * d.taps() * d.in_channels * d.out_channels * int64_t(sizeof(float))
             : 0;
}

template <typename F>
Workspace<F> Carve(void* base, const ConvDims& d) {
  char* p = static_cast<char*>(base);
  Workspace<F> ws;
  ws.factors = reinterpret_cast<F*>(p);
  p += AlignUp(FactorCount(d) * int64_t(sizeof(F)));
  ws.live = reinterpret_cast<uint8_t*>(p);
  p += AlignUp(FilterBlocks(d));
  ws.lists = reinterpret_cast<int32_t*>(p);
  p += AlignUp(ListEntries(d) * int64_t(sizeof(int32_t)));
  ws.counts = reinterpret_cast<int32_t*>(p);
  p += AlignUp(CountEntries(d) * int64_t(sizeof(int32_t)));
  ws.active = reinterpret_cast<uint8_t*>(p);
  p += AlignUp(Tiles(d));
  ws.order = reinterpret_cast<int32_t*>(p);
  p += AlignUp(ForwardRowTiles(d) * int64_t(sizeof(int32_t)));
  ws.busy = reinterpret_cast<int32_t*>(p);
  p += AlignUp(sizeof(int32_t));
  ws.chunk_busy = reinterpret_cast<int32_t*>(p);
  p += AlignUp(ForwardRowTileChunks(d) * int64_t(sizeof(int32_t)));
  ws.stage_live = reinterpret_cast<uint8_t*>(p);
  p += AlignUp(DepthStages(d));
  ws.tile_taps = reinterpret_cast<uint32_t*>(p);
  p += AlignUp(DxRowTiles(d) * kTapWords * int64_t(sizeof(uint32_t)));
  ws.partials = reinterpret_cast<float*>(p);
  return ws;
}

unsigned BlocksFor(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, 65535));
}

template <typename F, typename TMask, typename Launch>
Workspace<F> IndexFilters(const Launch& launch, const ConvDims& d, MaskView<TMask> mask, void* workspace) {
  const Workspace<F> ws = Carve<F>(workspace, d);
  launch(CanonicalFactors<TMask, F>, BlocksFor(FactorCount(d)), kThreads, mask.data, FactorCount(d), ws.factors);
  launch(FilterLiveness<F>, BlocksFor(FilterBlocks(d)), kThreads, ws.factors, d, ws.live);
  return ws;
}

template <typename T>
using D = typename Device<T>::type;

template <typename T>
const D<T>* Dev(const T* p) {
  return reinterpret_cast<const D<T>*>(p);
}
template <typename T>
D<T>* Dev(T* p) {
  return reinterpret_cast<D<T>*>(p);
}


}  // namespace

template <typename T>
bool Conv2DUsesTensorCores(const Conv2DGeometry& g, Product product, GpuMath math) {
  // The filters of a tap are an in_channels x out_channels weight.
  return tc::UseTensorCores<D<T>>(math, product, tc::FragmentAligned(g.in_block, g.in_channels),
                                  tc::FragmentAligned(g.out_block, g.out_channels));
}

template <typename T>
bool Conv2DUsesPipeline(const Conv2DGeometry& g, Product product, GpuMath math, MaskLevel level) {
  return PipelineGeometry<T>(DimsOf(g, level)) && math == GpuMath::kTensorCores &&
         (product == Product::kGradWeight || level == MaskLevel::kBlock) && tc::DeviceSupportsTensorCores();
}

template <typename T>
size_t Conv2DWorkspaceBytes(const Conv2DGeometry& g, MaskLevel level, Product product, bool output_masked) {
  const ConvDims d = DimsOf(g, level);
  return static_cast<size_t>(AlignUp(FactorCount(d) * int64_t(sizeof(ComputeOf<T>))) + AlignUp(FilterBlocks(d)) +
                             AlignUp(ListEntries(d) * int64_t(sizeof(int32_t))) +
                             AlignUp(CountEntries(d) * int64_t(sizeof(int32_t))) + AlignUp(Tiles(d)) +
                             AlignUp(ForwardRowTiles(d) * int64_t(sizeof(int32_t))) + AlignUp(sizeof(int32_t)) +
                             AlignUp(ForwardRowTileChunks(d) * int64_t(sizeof(int32_t))) +
                             AlignUp(DepthStages(d)) +
                             AlignUp(DxRowTiles(d) * kTapWords * int64_t(sizeof(uint32_t))) +
                             PartialBytes<T>(d, product, output_masked));
}

namespace {

// factors = the output mask's canonical factors (see masked_conv2d_gpu.h).
template <typename TOut, typename F, typename Launch>
int RunCanonicalOutputFactors(const Launch& launch, const TOut* output_mask, int64_t pixels, F* factors) {
  if (pixels == 0) return 0;
  launch(CanonicalFactors<TOut, F>, BlocksFor(pixels), kThreads, output_mask, pixels, factors);
  return launch.Status();
}

template <typename T, typename TMask, typename Launch>
int RunForward(const Launch& launch, const Conv2DGeometry& g, const T* x, const T* filters, MaskView<TMask> mask,
               const ComputeOf<T>* output_factors, T* y, void* workspace, GpuMath math) {
  if (g.out_pixels() == 0 || g.out_channels == 0) return 0;
  const ConvDims d = DimsOf(g, mask.level);
  const auto ws = IndexFilters<ComputeOf<T>>(launch, d, mask, workspace);
  if constexpr (pl::kHasPipeline<D<T>>) {
    if (Conv2DUsesPipeline<T>(g, Product::kForward, math, mask.level) && pl::Aligned16(x, filters, y)) {
      const ForwardSchedule schedule{ws.order, ws.busy, ForwardMostSplits(d, output_factors != nullptr),
                                     ws.partials};
      const int64_t blocks = ForwardPairs(d) + ForwardSplitBlocks(d, schedule.most_splits);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      launch(TileActivity<float>, BlocksFor(Tiles(d)), kThreads, output_factors, d, ws.active);
      const auto chunks = static_cast<unsigned>(ForwardRowTileChunks(d));
      launch(ForwardRowTileCounts, chunks, pl::kScanThreads, ws.active, d, ws.chunk_busy);
      launch(ForwardRowTileOrder, chunks, pl::kScanThreads, ws.active, d, ws.chunk_busy, ws.order, ws.busy);
      const ConvSegments<false> segments{d, ws.live, ws.factors};
      auto* lists = reinterpret_cast<uint32_t*>(ws.lists);
      launch(pl::TileSegmentLists<ConvSegments<false>>, static_cast<unsigned>(CeilDiv(d.out_channels, pl::kTileCols)),
             pl::kScanThreads, segments, lists, ws.counts);
      pl::WithStageDepth<D<T>>(d.in_block, d.in_channels, [&](auto stage) {
        constexpr int kDepth = decltype(stage)::value;
        if constexpr (wg::kHasWarpgroupPath<D<T>>) {
          if (wg::ConvForwardUsesWarpgroupMma()) {
            wg::WithRunStrips(d.out_block, d.out_channels, [&](auto run_strips, auto taken) {
              launch.WithSharedMemory(wg::kSharedBytes<D<T>, kDepth>)(
                  WarpgroupConvForward<D<T>, kDepth, decltype(run_strips)::value,
                                       decltype(taken)::value == wg::Tiles::kWhole>,
                  static_cast<unsigned>(blocks),
                  wg::kThreads, Dev(x), Dev(filters), ws.factors, output_factors, ws.live, ws.active, d, lists,
                  ws.counts, schedule, Dev(y), decltype(taken)::value);
            });
            return;
          }
        }
        launch.WithSharedMemory(pl::kSharedBytes<D<T>, kDepth, true, false>)(
            PipelinedConvForward<D<T>, kDepth>, static_cast<unsigned>(blocks), pl::kThreads, Dev(x), Dev(filters),
            ws.factors, output_factors, ws.live, ws.active, d, lists, ws.counts, schedule, Dev(y));
      });
      if (schedule.most_splits > 1) {
        // A block per busy pair; pairs split only while fewer than kTargetBlocks.
        launch(ForwardSplitSums<D<T>>, static_cast<unsigned>(std::min(pl::kTargetBlocks, ForwardPairs(d))),
               pl::kTileRows, output_factors, ws.active, d, schedule, ws.counts, Dev(y));
      }
      return launch.Status();
    }
  }
  if constexpr (tc::kHasTensorCorePath<D<T>>) {
    if (Conv2DUsesTensorCores<T>(g, Product::kForward, math)) {
      const int64_t blocks = tc::TileCount(Tiles(d) * d.tile_h * d.tile_w, d.out_channels);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      launch(TileActivity<ComputeOf<T>>, BlocksFor(Tiles(d)), kThreads, output_factors, d, ws.active);
      launch(TensorCoreConvForward<D<T>>, static_cast<unsigned>(blocks), tc::kThreads, Dev(x), Dev(filters),
             ws.factors, output_factors, ws.live, ws.active, d, Dev(y));
      return launch.Status();
    }
  }
  launch(FilterLists, BlocksFor(d.out_blocks()), kThreads, ws.live, d, /*by_output=*/true, ws.lists, ws.counts);
  launch(TileActivity<ComputeOf<T>>, BlocksFor(Tiles(d)), kThreads, output_factors, d, ws.active);
  const int64_t chunks = (d.tile_h * d.tile_w + kTile - 1) / kTile;
  const int64_t across = CeilDiv(std::min(d.out_block, d.out_channels), kTile);
  if (Tiles(d) * chunks > kMaxGridX || d.out_blocks() > kMaxGridYZ || across > kMaxGridYZ) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  const dim3 blocks(static_cast<unsigned>(Tiles(d) * chunks), static_cast<unsigned>(d.out_blocks()),
                    static_cast<unsigned>(across));
  launch(ConvForward<D<T>>, blocks, kThreads, Dev(x), Dev(filters), ws.factors, output_factors, ws.active, d,
         ws.lists, ws.counts, Dev(y));
  return launch.Status();
}

template <typename T, typename TMask, typename Launch>
int RunGradInput(const Launch& launch, const Conv2DGeometry& g, const T* dy, const T* filters, MaskView<TMask> mask,
                 const ComputeOf<T>* output_factors, T* dx, void* workspace, GpuMath math) {
  if (g.in_pixels() == 0 || g.in_channels == 0) return 0;
  const ConvDims d = DimsOf(g, mask.level);
  const auto ws = IndexFilters<ComputeOf<T>>(launch, d, mask, workspace);
  if constexpr (pl::kHasPipeline<D<T>>) {
    if (Conv2DUsesPipeline<T>(g, Product::kGradInput, math, mask.level) && pl::Aligned16(dy, filters, dx)) {
      // Under an output mask the rows go tile by tile (PipelinedConvGradInput).
      const int64_t rows = output_factors != nullptr ? InputTiles(d).Rows() : g.in_pixels();
      const int64_t blocks = pl::TileCount(rows, d.in_channels);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      const ConvSegments<true> segments{d, ws.live, ws.factors};
      auto* lists = reinterpret_cast<uint32_t*>(ws.lists);
      launch(pl::TileSegmentLists<ConvSegments<true>>,
             static_cast<unsigned>(CeilDiv(d.in_channels, pl::kTileCols)), pl::kScanThreads, segments, lists,
             ws.counts);
      pl::WithStageDepth<D<T>>(d.out_block, d.out_channels, [&](auto stage) {
        constexpr int kDepth = decltype(stage)::value;
        const auto run = [&](auto kernel) {
          launch.WithSharedMemory(pl::kSharedBytes<D<T>, kDepth, true, true>)(
              kernel, static_cast<unsigned>(blocks), pl::kThreads, Dev(dy), Dev(filters), ws.factors, output_factors,
              ws.live, ws.tile_taps, d, lists, ws.counts, Dev(dx));
        };
        if (output_factors != nullptr) {
          launch(DxRowTileTaps, static_cast<unsigned>(DxRowTiles(d)), pl::kThreads, output_factors, d, ws.tile_taps);
          run(PipelinedConvGradInput<D<T>, kDepth, true>);
        } else {
          run(PipelinedConvGradInput<D<T>, kDepth, false>);
        }
      });
      return launch.Status();
    }
  }
  if constexpr (tc::kHasTensorCorePath<D<T>>) {
    if (Conv2DUsesTensorCores<T>(g, Product::kGradInput, math)) {
      const int64_t blocks = tc::TileCount(g.in_pixels(), d.in_channels);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      launch(TensorCoreConvGradInput<D<T>>, static_cast<unsigned>(blocks), tc::kThreads, Dev(dy), Dev(filters),
             ws.factors, output_factors, ws.live, d, Dev(dx));
      return launch.Status();
    }
  }
  launch(FilterLists, BlocksFor(d.in_blocks()), kThreads, ws.live, d, /*by_output=*/false, ws.lists, ws.counts);
  const int64_t across = CeilDiv(std::min(d.in_block, d.in_channels), kTile);
  if (CeilDiv(g.in_pixels(), kTile) > kMaxGridX || d.in_blocks() > kMaxGridYZ || across > kMaxGridYZ) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  const dim3 blocks(static_cast<unsigned>(CeilDiv(g.in_pixels(), kTile)), static_cast<unsigned>(d.in_blocks()),
                    static_cast<unsigned>(across));
  launch(ConvGradInput<D<T>>, blocks, kThreads, Dev(dy), Dev(filters), ws.factors, output_factors, d, ws.lists,
         ws.counts, Dev(dx));
  return launch.Status();
}

template <typename T, typename TMask, typename Launch>
int RunGradFilter(const Launch& launch, const Conv2DGeometry& g, const T* x, const T* dy, MaskView<TMask> mask,
                  const ComputeOf<T>* output_factors, T* dfilters, void* workspace, GpuMath math) {
  const ConvDims d = DimsOf(g, mask.level);
  if (FilterBlocks(d) == 0 || g.out_channels == 0) return 0;
  const auto ws = IndexFilters<ComputeOf<T>>(launch, d, mask, workspace);
  if constexpr (pl::kHasPipeline<D<T>>) {
    if (Conv2DUsesPipeline<T>(g, Product::kGradWeight, math, mask.level) && pl::Aligned16(x, dy, dfilters) &&
        pl::Aligned16(output_factors)) {
      const bool tile_order = output_factors != nullptr;
      const int64_t splits = GradFilterSplits(d, tile_order);
      const int64_t blocks = splits * d.taps() * pl::TileCount(d.in_channels, d.out_channels);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      constexpr int kDepth = pl::kUnblockedStage<D<T>>;
      const int64_t stages = CeilDiv(GradFilterDepth(d, tile_order), int64_t{kDepth});
      const int64_t per_split = CeilDiv(stages, splits);
      const auto run = [&](auto kernel, const uint8_t* stage_live) {
        launch.WithSharedMemory(pl::kSharedBytes<D<T>, kDepth, false, false>)(
            kernel, static_cast<unsigned>(blocks), pl::kThreads, Dev(x), Dev(dy), ws.factors, output_factors,
            ws.live, stage_live, d, per_split, splits > 1 ? ws.partials : nullptr, Dev(dfilters));
      };
      if (tile_order) {
        launch(DepthStageActivity<float>, BlocksFor(stages), kThreads, output_factors, d, int64_t{kDepth},
               ws.stage_live);
        run(PipelinedConvGradFilter<D<T>, kDepth, true>, ws.stage_live);
      } else {
        run(PipelinedConvGradFilter<D<T>, kDepth, false>, nullptr);
      }
      if (splits > 1) {
        launch(SplitFilterSums<D<T>>, BlocksFor(d.taps() * d.in_channels * d.out_channels), kThreads, ws.partials,
               splits, ws.factors, d, Dev(dfilters));
      }
      return launch.Status();
    }
  }
  if constexpr (tc::kHasTensorCorePath<D<T>>) {
    if (Conv2DUsesTensorCores<T>(g, Product::kGradWeight, math)) {
      const int64_t blocks = d.taps() * tc::TileCount(d.in_channels, d.out_channels);
      if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
      launch(TensorCoreConvGradFilter<D<T>>, static_cast<unsigned>(blocks), tc::kThreads, Dev(x), Dev(dy),
             ws.factors, output_factors, ws.live, d, Dev(dfilters));
      return launch.Status();
    }
  }
  const int64_t tiles = ((std::min(d.in_block, d.in_channels) + kTile - 1) / kTile) *
                        ((std::min(d.out_block, d.out_channels) + kTile - 1) / kTile);
  if (FilterBlocks(d) > kMaxGridX || tiles > kMaxGridYZ) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 blocks(static_cast<unsigned>(FilterBlocks(d)), static_cast<unsigned>(tiles));
  launch(ConvGradFilter<D<T>>, blocks, kThreads, Dev(x), Dev(dy), ws.factors, output_factors, ws.live, d,
         Dev(dfilters));
  return launch.Status();
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_LAUNCH_CUH_
