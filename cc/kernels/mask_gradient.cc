#include "cc/kernels/mask_gradient.h"

#include <algorithm>

#include "cc/kernels/masked_matmul.h"

namespace masked_ops {

template <typename T, typename TMask>
void MaskGradient(int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask,
                  T* out, const ParallelFor& parallel_for) {
  const int64_t matrix = grid.rows * grid.cols;
  const bool in_place = out == grad;
  // A unit is one block row of one matrix.
  parallel_for(outer * grid.grid_rows(), grid.block_rows * grid.cols, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t o = unit / grid.grid_rows();
      const int64_t i = unit % grid.grid_rows();
      const int64_t r0 = grid.row_begin(i);
      for (int64_t j = 0; j < grid.grid_cols(); ++j) {
        const int64_t c0 = grid.col_begin(j);
        const int64_t offset = o * matrix + r0 * grid.cols + c0;
        const TMask* element = mask.level == MaskLevel::kElement ? mask.data + offset : nullptr;
        const bool live = element == nullptr ? IsLive(mask.data[i * grid.grid_cols() + j])
                                             : AnyLive(element, grid.cols, grid.rows_in(i), grid.cols_in(j));
        const T factor = element == nullptr && live ? MaskFactor<T>(mask.data[i * grid.grid_cols() + j]) : T(0);
        if (in_place && live && element == nullptr && factor == T(1)) continue;
        for (int64_t r = 0; r < grid.rows_in(i); ++r) {
          T* to = out + offset + r * grid.cols;
          const int64_t cols = grid.cols_in(j);
          if (!live) {
            std::fill_n(to, cols, T(0));
            continue;
          }
          const T* from = grad + offset + r * grid.cols;
          if (element == nullptr) {
            for (int64_t c = 0; c < cols; ++c) to[c] = from[c] * factor;
          } else {
            const TMask* m = element + r * grid.cols;
            for (int64_t c = 0; c < cols; ++c) to[c] = IsLive(m[c]) ? from[c] * MaskFactor<T>(m[c]) : T(0);
          }
        }
      }
    }
  });
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                    \
  template void MaskGradient<T, TMask>(int64_t, const BlockGrid&, const T*, MaskView<TMask>, \
                                       T*, const ParallelFor&);

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace masked_ops
