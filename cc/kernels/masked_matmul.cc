#include "cc/kernels/masked_matmul.h"

#include <algorithm>
#include <vector>

namespace masked_ops {
namespace {

// Rows of x (or dy) one work unit handles; its accumulator is
// kRowTile x block width, small enough to stay in L1 for blocks up to 64 wide.
constexpr int64_t kRowTile = 32;

// Copies the effective weights where(mask != 0, w * mask, 0) of every listed
// block into one contiguous buffer: slot p of the list holds a
// packed_rows x packed_cols row-major block (packed_cols x packed_rows when
// transposed), zero-padded at ragged edges. Only live blocks are read.
template <typename T, typename TMask>
std::vector<T> PackLiveBlocks(const BlockGrid& grid, const T* w, MaskView<TMask> mask,
                              const LiveBlockList& list, bool grouped_by_column, bool transpose,
                              const ParallelFor& parallel_for) {
  const int64_t pr = grid.packed_rows();
  const int64_t pc = grid.packed_cols();
  const int64_t block_size = pr * pc;
  std::vector<T> packed(static_cast<size_t>(list.size() * block_size), T(0));
  const int64_t groups = static_cast<int64_t>(list.offsets.size()) - 1;
  const int64_t mean_blocks = list.size() / std::max<int64_t>(groups, 1) + 1;
  parallel_for(groups, mean_blocks * block_size * 2, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t p = list.offsets[g]; p < list.offsets[g + 1]; ++p) {
        const int64_t i = grouped_by_column ? list.minor[p] : g;
        const int64_t j = grouped_by_column ? g : list.minor[p];
        const int64_t r0 = grid.row_begin(i);
        const int64_t c0 = grid.col_begin(j);
        const int64_t nr = grid.rows_in(i);
        const int64_t nc = grid.cols_in(j);
        T* dst = packed.data() + p * block_size;
        const int64_t row_stride = transpose ? 1 : pc;
        const int64_t col_stride = transpose ? pr : 1;
        if (mask.level == MaskLevel::kBlock) {
          const T factor = MaskFactor<T>(mask.data[i * grid.grid_cols() + j]);
          for (int64_t r = 0; r < nr; ++r) {
            const T* src = w + (r0 + r) * grid.cols + c0;
            for (int64_t c = 0; c < nc; ++c) dst[r * row_stride + c * col_stride] = src[c] * factor;
          }
        } else {
          for (int64_t r = 0; r < nr; ++r) {
            const T* src = w + (r0 + r) * grid.cols + c0;
            const TMask* m = mask.data + (r0 + r) * grid.cols + c0;
            for (int64_t c = 0; c < nc; ++c) {
              dst[r * row_stride + c * col_stride] =
                  IsLive(m[c]) ? src[c] * MaskFactor<T>(m[c]) : T(0);
            }
          }
        }
      }
    }
  });
  return packed;
}

}  // namespace

template <typename T, typename TMask>
void MaskedMatmul(const MatmulShape& shape, const T* x, const T* w, MaskView<TMask> mask, T* y,
                  const ParallelFor& parallel_for) {
  if (shape.m == 0 || shape.n == 0) return;
  const BlockGrid grid = shape.weight_grid();
  const LiveBlockList list = GroupLiveBlocksByColumn(grid, FindLiveBlocks(grid, mask, parallel_for));
  const std::vector<T> packed = PackLiveBlocks(grid, w, mask, list, /*grouped_by_column=*/true,
                                               /*transpose=*/false, parallel_for);
  const int64_t pr = grid.packed_rows();
  const int64_t pc = grid.packed_cols();
  const int64_t grid_cols = grid.grid_cols();
  const int64_t row_tiles = CeilDiv(shape.m, kRowTile);
  const int64_t mean_blocks = list.size() / grid_cols + 1;
  // Unit u computes rows [t * kRowTile, ...) of block column j of y from the
  // live blocks of that column only.
  parallel_for(row_tiles * grid_cols, kRowTile * mean_blocks * pr * pc * 2,
               [&](int64_t begin, int64_t end) {
                 std::vector<T> acc(static_cast<size_t>(kRowTile * pc));
                 for (int64_t u = begin; u < end; ++u) {
                   const int64_t t = u / grid_cols;
                   const int64_t j = u % grid_cols;
                   const int64_t m0 = t * kRowTile;
                   const int64_t rows = std::min(kRowTile, shape.m - m0);
                   std::fill(acc.begin(), acc.end(), T(0));
                   for (int64_t p = list.offsets[j]; p < list.offsets[j + 1]; ++p) {
                     const int64_t i = list.minor[p];
                     const int64_t k0 = grid.row_begin(i);
                     const int64_t depth = grid.rows_in(i);
                     const T* block = packed.data() + p * pr * pc;
                     for (int64_t r = 0; r < rows; ++r) {
                       const T* x_row = x + (m0 + r) * shape.k + k0;
                       T* acc_row = acc.data() + r * pc;
                       for (int64_t kk = 0; kk < depth; ++kk) {
                         const T a = x_row[kk];
                         const T* w_row = block + kk * pc;
                         for (int64_t c = 0; c < pc; ++c) acc_row[c] += a * w_row[c];
                       }
                     }
                   }
                   const int64_t n0 = grid.col_begin(j);
                   const int64_t width = grid.cols_in(j);
                   for (int64_t r = 0; r < rows; ++r) {
                     std::copy_n(acc.data() + r * pc, width, y + (m0 + r) * shape.n + n0);
                   }
                 }
               });
}

template <typename T, typename TMask>
void MaskedMatmulGradInput(const MatmulShape& shape, const T* dy, const T* w,
                           MaskView<TMask> mask, T* dx, const ParallelFor& parallel_for) {
  if (shape.m == 0 || shape.k == 0) return;
  const BlockGrid grid = shape.weight_grid();
  const LiveBlockList list = GroupLiveBlocksByRow(grid, FindLiveBlocks(grid, mask, parallel_for));
  // Transposed packing makes the innermost loop run along k, contiguous in
  // both the packed block and dx.
  const std::vector<T> packed = PackLiveBlocks(grid, w, mask, list, /*grouped_by_column=*/false,
                                               /*transpose=*/true, parallel_for);
  const int64_t pr = grid.packed_rows();
  const int64_t pc = grid.packed_cols();
  const int64_t grid_rows = grid.grid_rows();
  const int64_t row_tiles = CeilDiv(shape.m, kRowTile);
  const int64_t mean_blocks = list.size() / grid_rows + 1;
  // Unit u computes rows [t * kRowTile, ...) of block column i of dx from the
  // live blocks of block row i of w.
  parallel_for(row_tiles * grid_rows, kRowTile * mean_blocks * pr * pc * 2,
               [&](int64_t begin, int64_t end) {
                 std::vector<T> acc(static_cast<size_t>(kRowTile * pr));
                 for (int64_t u = begin; u < end; ++u) {
                   const int64_t t = u / grid_rows;
                   const int64_t i = u % grid_rows;
                   const int64_t m0 = t * kRowTile;
                   const int64_t rows = std::min(kRowTile, shape.m - m0);
                   std::fill(acc.begin(), acc.end(), T(0));
                   for (int64_t p = list.offsets[i]; p < list.offsets[i + 1]; ++p) {
                     const int64_t j = list.minor[p];
                     const int64_t n0 = grid.col_begin(j);
                     const int64_t width = grid.cols_in(j);
                     const T* block = packed.data() + p * pr * pc;
                     for (int64_t r = 0; r < rows; ++r) {
                       const T* dy_row = dy + (m0 + r) * shape.n + n0;
                       T* acc_row = acc.data() + r * pr;
                       for (int64_t c = 0; c < width; ++c) {
                         const T g = dy_row[c];
                         const T* wt_row = block + c * pr;
                         for (int64_t kk = 0; kk < pr; ++kk) acc_row[kk] += g * wt_row[kk];
                       }
                     }
                   }
                   const int64_t k0 = grid.row_begin(i);
                   const int64_t depth = grid.rows_in(i);
                   for (int64_t r = 0; r < rows; ++r) {
                     std::copy_n(acc.data() + r * pr, depth, dx + (m0 + r) * shape.k + k0);
                   }
                 }
               });
}

template <typename T, typename TMask>
void MaskedMatmulGradWeight(const MatmulShape& shape, const T* x, const T* dy,
                            MaskView<TMask> mask, T* dw, const ParallelFor& parallel_for) {
  if (shape.k == 0 || shape.n == 0) return;
  const BlockGrid grid = shape.weight_grid();
  const std::vector<uint8_t> live = FindLiveBlocks(grid, mask, parallel_for);
  const int64_t grid_cols = grid.grid_cols();
  const int64_t blocks = grid.grid_rows() * grid_cols;
  std::vector<int64_t> live_blocks;
  for (int64_t b = 0; b < blocks; ++b) {
    if (live[b]) live_blocks.push_back(b);
  }
  const int64_t pc = grid.packed_cols();
  const int64_t pr = grid.packed_rows();

  parallel_for(blocks, pr * pc, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (live[b]) continue;
      const int64_t i = b / grid_cols;
      const int64_t j = b % grid_cols;
      for (int64_t r = 0; r < grid.rows_in(i); ++r) {
        std::fill_n(dw + (grid.row_begin(i) + r) * shape.n + grid.col_begin(j), grid.cols_in(j),
                    T(0));
      }
    }
  });

  // Unit p forms the block (x^T dy) restricted to live block p, summing over
  // all m rows in order, then applies the mask entry by entry.
  parallel_for(static_cast<int64_t>(live_blocks.size()), shape.m * pr * pc * 2,
               [&](int64_t begin, int64_t end) {
                 std::vector<T> acc(static_cast<size_t>(pr * pc));
                 for (int64_t p = begin; p < end; ++p) {
                   const int64_t i = live_blocks[p] / grid_cols;
                   const int64_t j = live_blocks[p] % grid_cols;
                   const int64_t k0 = grid.row_begin(i);
                   const int64_t n0 = grid.col_begin(j);
                   const int64_t depth = grid.rows_in(i);
                   const int64_t width = grid.cols_in(j);
                   std::fill(acc.begin(), acc.end(), T(0));
                   for (int64_t mm = 0; mm < shape.m; ++mm) {
                     const T* x_row = x + mm * shape.k + k0;
                     const T* dy_row = dy + mm * shape.n + n0;
                     for (int64_t kk = 0; kk < depth; ++kk) {
                       const T a = x_row[kk];
                       T* acc_row = acc.data() + kk * pc;
                       for (int64_t c = 0; c < width; ++c) acc_row[c] += a * dy_row[c];
                     }
                   }
                   for (int64_t kk = 0; kk < depth; ++kk) {
                     T* out = dw + (k0 + kk) * shape.n + n0;
                     const T* acc_row = acc.data() + kk * pc;
                     if (mask.level == MaskLevel::kBlock) {
                       const T factor = MaskFactor<T>(mask.data[live_blocks[p]]);
                       for (int64_t c = 0; c < width; ++c) out[c] = acc_row[c] * factor;
                     } else {
                       const TMask* m = mask.data + (k0 + kk) * shape.n + n0;
                       for (int64_t c = 0; c < width; ++c) {
                         out[c] = IsLive(m[c]) ? acc_row[c] * MaskFactor<T>(m[c]) : T(0);
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
