#include "cc/kernels/masked_matmul.h"

#include <algorithm>
#include <vector>

#include "cc/kernels/gemm.h"
#include "cc/kernels/panels.h"
#include "cc/kernels/scratch.h"

namespace masked_ops {
namespace {

// Depth (in elements) dw multiplies per pass over a region's tiles, sized so
// that the a and b slices of a pass stay in L1.
constexpr int64_t kRunDepth = 256;
// Rows and columns of dw (at least one block) that one dw unit covers.
constexpr int64_t kRegionSpan = 128;

// Packs where(mask != 0, w * mask, 0) of every listed block into PanelGemm
// panels. Group g of the list is one output block column; its live blocks are
// stacked in depth, segment_len rows each, and the stack is cut into strips of
// strip_width columns, zero-padded. Without `transposed` a block keeps its
// orientation (forward: depth = rows of w); with it, block (i, j) enters as
// its transpose (dx: depth = columns of w). Only live blocks are read.
template <typename T, typename TMask>
void PackPanels(const BlockGrid& grid, const T* w, MaskView<TMask> mask, const LiveBlockList& list,
                bool transposed, int64_t strip_width, int64_t padded_width, T* panels,
                const ParallelFor& parallel_for) {
  const int64_t segment_len = transposed ? grid.packed_cols() : grid.packed_rows();
  const int64_t groups = static_cast<int64_t>(list.offsets.size()) - 1;
  const int64_t mean_blocks = list.size() / std::max<int64_t>(groups, 1) + 1;
  const bool block_level = mask.level == MaskLevel::kBlock;
  parallel_for(groups, mean_blocks * segment_len * padded_width, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = list.offsets[g];
      const int64_t depth = (list.offsets[g + 1] - first) * segment_len;
      for (int64_t p = first; p < list.offsets[g + 1]; ++p) {
        const int64_t i = transposed ? g : list.minor[p];
        const int64_t j = transposed ? list.minor[p] : g;
        const int64_t offset = grid.row_begin(i) * grid.cols + grid.col_begin(j);
        // Element masks line up with w; a block mask has one factor per block.
        const BlockSource<T, TMask> block{
            w + offset, block_level ? nullptr : mask.data + offset,
            block_level ? MaskFactor<T>(mask.data[i * grid.grid_cols() + j]) : T(0),
            grid.cols, grid.rows_in(i), grid.cols_in(j)};
        PackBlock(block, transposed,
                  PanelSlot<T>{panels + first * segment_len * padded_width, depth,
                               (p - first) * segment_len, segment_len, strip_width,
                               padded_width});
      }
    }
  });
}

// out[m, out_cols] = a[m, depth] @ (the block-sparse matrix whose live blocks
// the panels hold), through the backend's PanelGemm.
template <typename T>
struct PanelProduct {
  const T* a;
  int64_t m;
  int64_t depth;
  int64_t depth_padded;     // blocks along depth x segment_len
  int64_t block_depth;      // depth between consecutive block segments
  int64_t segment_len;
  const LiveBlockList* list;
  const T* panels;
  bool b_in_place;
  GemmTiling tiling;
  int64_t padded_width;
  int64_t width;
  int64_t out_cols;
  T* out;
};

template <typename T>
void RunPanelProduct(const GemmBackend<T>& backend, const PanelProduct<T>& product,
                     const ParallelFor& parallel_for) {
  const LiveBlockList& list = *product.list;
  const int64_t tile_rows = product.tiling.a_tile;
  // With no live block, every output group is zero-filled and a is not read.
  const int64_t tiles = list.size() == 0 ? 0 : CeilDiv(product.m, tile_rows);
  const int64_t tile_size = product.depth_padded * tile_rows;
  // Packing a costs a pass over all of it, repaid only when its values are
  // used by many live blocks. Below kPackAtUses uses per value (a sparse
  // mask), whole row tiles read a in place; a last partial tile, and narrow
  // strips (whose kernel needs rows side by side), still come packed.
  const int64_t depth_blocks = std::max<int64_t>(1, product.depth_padded / std::max<int64_t>(product.segment_len, 1));
  const bool rows_in_place = list.size() > 0 && product.depth_padded == product.depth &&
                             product.tiling.strip_width >= product.tiling.vector_lanes &&
                             list.size() < kPackAtUses * depth_blocks;
  const int64_t first_packed = rows_in_place ? product.m / tile_rows : 0;
  const ScratchBuffer packed_a(BytesOf<T>((tiles - first_packed) * tile_size));
  parallel_for(tiles - first_packed, tile_size, [&](int64_t begin, int64_t end) {
    for (int64_t t = first_packed + begin; t < first_packed + end; ++t) {
      backend.pack_tile(product.a + t * tile_rows * product.depth, product.depth, 1,
                        std::min(tile_rows, product.m - t * tile_rows), product.depth, tile_rows,
                        product.depth_padded, packed_a.as<T>() + (t - first_packed) * tile_size);
    }
  });

  std::vector<int64_t> segment_begin(list.minor.size());
  for (size_t p = 0; p < segment_begin.size(); ++p) {
    segment_begin[p] = list.minor[p] * product.block_depth;
  }
  const int64_t chunk_tiles = std::clamp<int64_t>(
      kChunkBytes / std::max<int64_t>(tile_size * static_cast<int64_t>(sizeof(T)), 1), 1,
      kMaxChunkTiles);
  PanelGemmArgs<T> args;
  args.a = PackedRows<T>{packed_a.as<T>(), product.m, tile_rows, product.depth_padded};
  args.groups = static_cast<int64_t>(list.offsets.size()) - 1;
  args.group_offsets = list.offsets.data();
  args.segment_begin = segment_begin.data();
  args.segment_len = product.segment_len;
  args.panels = product.panels;
  args.b_in_place = product.b_in_place;
  args.strip_width = product.tiling.strip_width;
  args.padded_width = product.padded_width;
  args.width = product.width;
  args.out_cols = product.out_cols;
  args.out = product.out;
  args.a_rows = rows_in_place ? product.a : nullptr;
  args.a_rows_stride = product.depth;
  args.rows_per_chunk = chunk_tiles * tile_rows;
  args.blocks_per_run = std::max<int64_t>(
      1, kRunStripBytes / (std::max<int64_t>(product.segment_len, 1) *
                           product.tiling.strip_width * static_cast<int64_t>(sizeof(T))));
  const int64_t chunks = CeilDiv(product.m, args.rows_per_chunk);
  const int64_t mean_blocks = list.size() / std::max<int64_t>(args.groups, 1) + 1;
  // Units run chunk-major, so the units of one shard share their chunk of a.
  parallel_for(chunks * args.groups,
               args.rows_per_chunk * mean_blocks * product.segment_len * product.width * 2,
               [&](int64_t begin, int64_t end) {
                 for (int64_t u = begin; u < end; ++u) {
                   backend.panel_gemm_unit(args, u / args.groups, u % args.groups);
                 }
               });
}

// Rows of x up to which the forward product reads w in place rather than
// packing it, when it may: packing costs a pass over the live weights, which
// only pays off once several row tiles reuse the packed strips.
constexpr int64_t kInPlaceMaxRowTiles = 2;

// Whether w's live blocks can serve as panels as they are: nothing to mask
// (block-level mask, every live factor exactly 1), no ragged block, and
// blocks a whole number of strips wide.
template <typename T, typename TMask>
bool WeightsUsableInPlace(const BlockGrid& grid, MaskView<TMask> mask, const GemmTiling& tiling,
                          int64_t m) {
  if (CeilDiv(m, tiling.a_tile) > kInPlaceMaxRowTiles || mask.level != MaskLevel::kBlock ||
      grid.rows % grid.block_rows != 0 || grid.cols % grid.block_cols != 0 ||
      grid.block_cols % tiling.strip_width != 0) {
    return false;
  }
  for (int64_t b = 0; b < grid.grid_rows() * grid.grid_cols(); ++b) {
    if (IsLive(mask.data[b]) && MaskFactor<T>(mask.data[b]) != T(1)) return false;
  }
  return true;
}

}  // namespace

template <typename T, typename TMask>
void MaskedMatmul(const MatmulShape& shape, const T* x, const T* w, MaskView<TMask> mask, T* y,
                  const ParallelFor& parallel_for) {
  if (shape.m == 0 || shape.n == 0) return;
  const BlockGrid grid = shape.weight_grid();
  const LiveBlockList list = GroupLiveBlocksByColumn(grid, FindLiveBlocks(grid, mask, parallel_for));
  const GemmBackend<T>& backend = SelectedGemmBackend<T>();
  const GemmTiling tiling = backend.tiling(grid.packed_cols());
  const int64_t padded_width = RoundUp(grid.packed_cols(), tiling.strip_width);
  const bool in_place = WeightsUsableInPlace<T>(grid, mask, tiling, shape.m);
  const ScratchBuffer panels(
      in_place ? 0 : BytesOf<T>(list.size() * grid.packed_rows() * padded_width));
  if (!in_place) {
    PackPanels(grid, w, mask, list, /*transposed=*/false, tiling.strip_width, padded_width,
               panels.as<T>(), parallel_for);
  }
  RunPanelProduct(backend,
                  PanelProduct<T>{x, shape.m, shape.k, grid.grid_rows() * grid.packed_rows(),
                                  grid.block_rows, grid.packed_rows(), &list,
                                  in_place ? w : panels.as<T>(), in_place, tiling,
                                  padded_width, grid.packed_cols(), shape.n, y},
                  parallel_for);
}

// Rows of dy up to which dx takes dot products with w's rows in place
// (RowDot) instead of packing the transposed live blocks: with so few rows
// the strided transposing copy would cost more than the product.
constexpr int64_t kRowDotMaxRows = 24;

template <typename T, typename TMask>
void GradInputByRowDots(const GemmBackend<T>& backend, const MatmulShape& shape, const T* dy,
                        const T* w, MaskView<TMask> mask, const LiveBlockList& list, T* dx,
                        const ParallelFor& parallel_for) {
  const BlockGrid grid = shape.weight_grid();
  std::vector<int64_t> segment_begin(list.minor.size());
  std::vector<T> factors(list.minor.size());
  for (int64_t i = 0; i < grid.grid_rows(); ++i) {
    for (int64_t p = list.offsets[i]; p < list.offsets[i + 1]; ++p) {
      segment_begin[p] = list.minor[p] * grid.block_cols;
      factors[p] = MaskFactor<T>(mask.data[i * grid.grid_cols() + list.minor[p]]);
    }
  }
  const int64_t mean_blocks = list.size() / grid.grid_rows() + 1;
  parallel_for(grid.grid_rows(), shape.m * grid.block_rows * mean_blocks * grid.block_cols * 2,
               [&](int64_t begin, int64_t end) {
                 for (int64_t i = begin; i < end; ++i) {
                   RowDotArgs<T> args;
                   args.dy = dy;
                   args.rows = shape.m;
                   args.ldy = shape.n;
                   args.w = w;
                   args.ldw = shape.n;
                   args.k_begin = grid.row_begin(i);
                   args.k_end = grid.row_begin(i) + grid.rows_in(i);
                   args.segment_begin = segment_begin.data() + list.offsets[i];
                   args.factors = factors.data() + list.offsets[i];
                   args.segments = list.offsets[i + 1] - list.offsets[i];
                   args.segment_len = grid.block_cols;
                   args.out = dx;
                   args.ldo = shape.k;
                   backend.row_dot(args);
                 }
               });
}

template <typename T, typename TMask>
void MaskedMatmulGradInput(const MatmulShape& shape, const T* dy, const T* w,
                           MaskView<TMask> mask, T* dx, const ParallelFor& parallel_for) {
  if (shape.m == 0 || shape.k == 0) return;
  const BlockGrid grid = shape.weight_grid();
  const LiveBlockList list = GroupLiveBlocksByRow(grid, FindLiveBlocks(grid, mask, parallel_for));
  const GemmBackend<T>& backend = SelectedGemmBackend<T>();
  const GemmTiling tiling = backend.tiling(grid.packed_rows());
  // Block factors are applied per dot product; an element mask needs packing.
  if (shape.m <= kRowDotMaxRows && mask.level == MaskLevel::kBlock &&
      grid.rows % grid.block_rows == 0 && grid.cols % grid.block_cols == 0 &&
      grid.block_cols % tiling.vector_lanes == 0) {
    GradInputByRowDots(backend, shape, dy, w, mask, list, dx, parallel_for);
    return;
  }
  const int64_t padded_width = RoundUp(grid.packed_rows(), tiling.strip_width);
  const ScratchBuffer panels(BytesOf<T>(list.size() * grid.packed_cols() * padded_width));
  PackPanels(grid, w, mask, list, /*transposed=*/true, tiling.strip_width, padded_width,
             panels.as<T>(), parallel_for);
  RunPanelProduct(backend,
                  PanelProduct<T>{dy, shape.m, shape.n, grid.grid_cols() * grid.packed_cols(),
                                  grid.block_cols, grid.packed_cols(), &list, panels.as<T>(),
                                  /*b_in_place=*/false, tiling,
                                  padded_width, grid.packed_rows(), shape.k, dx},
                  parallel_for);
}

template <typename T, typename TMask>
void MaskedMatmulGradWeight(const MatmulShape& shape, const T* x, const T* dy,
                            MaskView<TMask> mask, T* dw, const ParallelFor& parallel_for) {
  if (shape.k == 0 || shape.n == 0) return;
  const BlockGrid grid = shape.weight_grid();
  const std::vector<uint8_t> live = FindLiveBlocks(grid, mask, parallel_for);
  const int64_t grid_rows = grid.grid_rows();
  const int64_t grid_cols = grid.grid_cols();
  const int64_t pr = grid.packed_rows();
  const int64_t pc = grid.packed_cols();
  const int64_t m = shape.m;

  // Blocks half a SIMD register wide are multiplied two side by side, so that
  // dw's strips fill whole registers: the GEMM runs on a grid of block pairs,
  // recomputing a live block's dead neighbour, which the mask pass zeroes
  // again.
  const GemmBackend<T>& backend = SelectedGemmBackend<T>();
  const GemmTiling block_tiling = backend.tiling(pc);
  const int64_t pair =
      grid_cols > 1 && 2 * block_tiling.strip_width <= block_tiling.vector_lanes ? 2 : 1;
  const BlockGrid gemm_grid{grid.rows, grid.cols, grid.block_rows, grid.block_cols * pair};
  const int64_t gemm_cols = gemm_grid.grid_cols();
  std::vector<uint8_t> gemm_live(static_cast<size_t>(grid_rows * gemm_cols), 0);
  for (int64_t b = 0; b < grid_rows * grid_cols; ++b) {
    if (live[b]) gemm_live[(b / grid_cols) * gemm_cols + (b % grid_cols) / pair] = 1;
  }
  const int64_t gemm_pc = gemm_grid.packed_cols();

  // Blocks outside every computed pair are zero now; the others are zeroed,
  // if dead, by the mask pass.
  // Each row is filled a run of neighbouring such blocks at a time: at low
  // density that is most of dw, and one fill per block row piece would cost
  // more in calls than in stores.
  parallel_for(grid_rows, pr * shape.n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < grid_cols;) {
        if (gemm_live[i * gemm_cols + j / pair]) {
          ++j;
          continue;
        }
        int64_t run_end = j + 1;
        while (run_end < grid_cols && !gemm_live[i * gemm_cols + run_end / pair]) ++run_end;
        const int64_t first_col = grid.col_begin(j);
        const int64_t cols = grid.col_begin(run_end - 1) + grid.cols_in(run_end - 1) - first_col;
        for (int64_t r = 0; r < grid.rows_in(i); ++r) {
          std::fill_n(dw + (grid.row_begin(i) + r) * shape.n + first_col, cols, T(0));
        }
        j = run_end;
      }
    }
  });

  // Slots of the block rows and block columns that hold a live block: only
  // their slices of x^T and dy are packed, into contiguous tiles and strips
  // (read in place, their power-of-two strides would alias in every cache).
  std::vector<int64_t> row_slot(static_cast<size_t>(grid_rows), -1);
  std::vector<int64_t> col_slot(static_cast<size_t>(gemm_cols), -1);
  int64_t row_slots = 0;
  int64_t col_slots = 0;
  int64_t live_count = 0;
  for (int64_t b = 0; b < grid_rows * gemm_cols; ++b) {
    if (!gemm_live[b]) continue;
    ++live_count;
    if (row_slot[b / gemm_cols] < 0) row_slot[b / gemm_cols] = row_slots++;
    if (col_slot[b % gemm_cols] < 0) col_slot[b % gemm_cols] = col_slots++;
  }
  if (live_count == 0) return;

  const GemmTiling tiling = backend.tiling(gemm_pc);
  const int64_t tile_rows = tiling.outer_tile;
  const int64_t strip_width = tiling.strip_width;
  const int64_t tiles_per_block = CeilDiv(pr, tile_rows);
  const int64_t strips_per_block = CeilDiv(gemm_pc, strip_width);
  const int64_t tile_size = m * tile_rows;
  const int64_t strip_size = m * strip_width;
  const ScratchBuffer packed_x(BytesOf<T>(row_slots * tiles_per_block * tile_size));
  const ScratchBuffer packed_dy(BytesOf<T>(col_slots * strips_per_block * strip_size));
  auto x_tile = [&](int64_t i, int64_t t) {
    return packed_x.as<T>() + (row_slot[i] * tiles_per_block + t) * tile_size;
  };
  auto dy_strip = [&](int64_t j, int64_t s) {
    return packed_dy.as<T>() + (col_slot[j] * strips_per_block + s) * strip_size;
  };
  parallel_for(grid_rows * tiles_per_block + gemm_cols * strips_per_block, m * tile_rows,
               [&](int64_t begin, int64_t end) {
                 for (int64_t u = begin; u < end; ++u) {
                   if (u < grid_rows * tiles_per_block) {
                     const int64_t i = u / tiles_per_block;
                     const int64_t t = u % tiles_per_block;
                     if (row_slot[i] < 0) continue;
                     // x^T: rows are columns of x (stride 1), depth runs down x.
                     backend.pack_tile(
                         x + grid.row_begin(i) + t * tile_rows, 1, shape.k,
                         std::clamp<int64_t>(grid.rows_in(i) - t * tile_rows, 0, tile_rows), m,
                         tile_rows, m, x_tile(i, t));
                   } else {
                     const int64_t v = u - grid_rows * tiles_per_block;
                     const int64_t j = v / strips_per_block;
                     const int64_t s = v % strips_per_block;
                     if (col_slot[j] < 0) continue;
                     backend.pack_tile(
                         dy + gemm_grid.col_begin(j) + s * strip_width, 1, shape.n,
                         std::clamp<int64_t>(gemm_grid.cols_in(j) - s * strip_width, 0,
                                             strip_width),
                         m, strip_width, m, dy_strip(j, s));
                   }
                 }
               });

  // Unit u is a region of region_rows x region_cols blocks. Over each run of
  // m, the region's slices of x and dy and its blocks of dw stay in L2 while
  // every live block of the region takes its share, so x and dy are read from
  // memory once per region row or column, not once per block.
  const int64_t region_rows = std::max<int64_t>(1, kRegionSpan / grid.block_rows);
  const int64_t region_cols = std::max<int64_t>(1, kRegionSpan / gemm_grid.block_cols);
  const int64_t regions_down = CeilDiv(grid_rows, region_rows);
  const int64_t regions_across = CeilDiv(gemm_cols, region_cols);
  const int64_t mean_live = live_count / (regions_down * regions_across) + 1;
  parallel_for(
      regions_down * regions_across, mean_live * m * pr * pc * 2, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const int64_t i_begin = (u / regions_across) * region_rows;
          const int64_t j_begin = (u % regions_across) * region_cols;
          const int64_t i_end = std::min(grid_rows, i_begin + region_rows);
          const int64_t j_end = std::min(gemm_cols, j_begin + region_cols);
          for (int64_t m0 = 0; m0 < m; m0 += kRunDepth) {
            const int64_t depth = std::min(kRunDepth, m - m0);
            for (int64_t i = i_begin; i < i_end; ++i) {
              for (int64_t j = j_begin; j < j_end; ++j) {
                if (!gemm_live[i * gemm_cols + j]) continue;
                for (int64_t t = 0; t * tile_rows < grid.rows_in(i); ++t) {
                  const int64_t row = grid.row_begin(i) + t * tile_rows;
                  for (int64_t s = 0; s * strip_width < gemm_grid.cols_in(j); ++s) {
                    const int64_t col = gemm_grid.col_begin(j) + s * strip_width;
                    OuterGemmArgs<T> args;
                    args.a = x_tile(i, t) + m0 * tile_rows;
                    args.lda = tile_rows;
                    args.b = dy_strip(j, s) + m0 * strip_width;
                    args.ldb = strip_width;
                    args.depth = depth;
                    args.block_width = gemm_pc;
                    args.out = dw + row * shape.n + col;
                    args.ldo = shape.n;
                    args.rows = std::min(tile_rows, grid.rows_in(i) - t * tile_rows);
                    args.cols = std::min(strip_width, gemm_grid.cols_in(j) - s * strip_width);
                    args.accumulate = m0 > 0;
                    backend.outer_gemm(args);
                  }
                }
              }
            }
          }
          // dw = where(mask != 0, (x^T dy) * mask, 0) on the region's live
          // blocks; a dead block computed beside a live one is zeroed again.
          for (int64_t i = i_begin; i < i_end; ++i) {
            for (int64_t j = j_begin * pair; j < std::min(grid_cols, j_end * pair); ++j) {
              const int64_t block = i * grid_cols + j;
              if (!gemm_live[i * gemm_cols + j / pair]) continue;
              for (int64_t r = 0; r < grid.rows_in(i); ++r) {
                const int64_t row = grid.row_begin(i) + r;
                T* out = dw + row * shape.n + grid.col_begin(j);
                const int64_t width = grid.cols_in(j);
                if (m == 0 || !live[block]) {
                  std::fill_n(out, width, T(0));
                  if (!live[block]) continue;
                }
                if (mask.level == MaskLevel::kBlock) {
                  const T factor = MaskFactor<T>(mask.data[block]);
                  for (int64_t c = 0; c < width; ++c) out[c] *= factor;
                } else {
                  const TMask* mk = mask.data + row * shape.n + grid.col_begin(j);
                  for (int64_t c = 0; c < width; ++c) {
                    out[c] = IsLive(mk[c]) ? out[c] * MaskFactor<T>(mk[c]) : T(0);
                  }
                }
              }
            }
          }
        }
      });
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                  \
  template void MaskedMatmul<T, TMask>(const MatmulShape&, const T*, const T*,           \
                                       MaskView<TMask>, T*, const ParallelFor&);         \
  template void MaskedMatmulGradInput<T, TMask>(const MatmulShape&, const T*, const T*,  \
                                                MaskView<TMask>, T*, const ParallelFor&); \
  template void MaskedMatmulGradWeight<T, TMask>(const MatmulShape&, const T*, const T*, \
                                                 MaskView<TMask>, T*, const ParallelFor&);

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace masked_ops
