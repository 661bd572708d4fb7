#include "cc/kernels/block_elementwise.h"

#include <algorithm>
#include <cmath>

#include "cc/kernels/masked_matmul.h"

namespace masked_ops {
namespace {

// One block of one matrix: where it starts in the tensor, its extent, and its
// mask: `element` rows (grid.cols apart) for an element mask, else its
// block-level entry `block_value`.
template <typename TMask>
struct MaskedBlock {
  int64_t offset;
  int64_t rows;
  int64_t cols;
  bool live;
  const TMask* element;
  TMask block_value;
};

// Calls visit(block) for every block of every matrix, in parallel over block
// rows; a block is live when some mask entry in it is.
template <typename TMask, typename Visit>
void ForEachMaskBlock(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask,
                      const ParallelFor& parallel_for, const Visit& visit) {
  const int64_t matrix = grid.rows * grid.cols;
  parallel_for(outer * grid.grid_rows(), grid.block_rows * grid.cols, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t i = unit % grid.grid_rows();
      for (int64_t j = 0; j < grid.grid_cols(); ++j) {
        MaskedBlock<TMask> block;
        block.offset = (unit / grid.grid_rows()) * matrix + grid.row_begin(i) * grid.cols + grid.col_begin(j);
        block.rows = grid.rows_in(i);
        block.cols = grid.cols_in(j);
        if (mask.level == MaskLevel::kElement) {
          block.element = mask.data + block.offset;
          block.block_value = TMask{};
          block.live = AnyLive(block.element, grid.cols, block.rows, block.cols);
        } else {
          block.element = nullptr;
          block.block_value = mask.data[i * grid.grid_cols() + j];
          block.live = IsLive(block.block_value);
        }
        visit(block);
      }
    }
  });
}

}  // namespace

template <typename T, typename TMask>
void MaskGradient(int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask,
                  T* out, const ParallelFor& parallel_for) {
  const bool in_place = out == grad;
  ForEachMaskBlock(outer, grid, mask, parallel_for, [&](const MaskedBlock<TMask>& block) {
    const T factor = block.live && block.element == nullptr ? MaskFactor<T>(block.block_value) : T(0);
    if (in_place && block.live && block.element == nullptr && factor == T(1)) return;
    for (int64_t r = 0; r < block.rows; ++r) {
      T* to = out + block.offset + r * grid.cols;
      if (!block.live) {
        std::fill_n(to, block.cols, T(0));
        continue;
      }
      const T* from = grad + block.offset + r * grid.cols;
      if (block.element == nullptr) {
        for (int64_t c = 0; c < block.cols; ++c) to[c] = from[c] * factor;
      } else {
        const TMask* m = block.element + r * grid.cols;
        for (int64_t c = 0; c < block.cols; ++c) to[c] = IsLive(m[c]) ? from[c] * MaskFactor<T>(m[c]) : T(0);
      }
    }
  });
}

template <typename T, typename TMask>
void MaskedUpdate(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, UpdateMode mode,
                  const T* value, T* var, const ParallelFor& parallel_for) {
  ForEachMaskBlock(outer, grid, mask, parallel_for, [&](const MaskedBlock<TMask>& block) {
    if (!block.live) return;
    for (int64_t r = 0; r < block.rows; ++r) {
      T* to = var + block.offset + r * grid.cols;
      const T* from = value + block.offset + r * grid.cols;
      const TMask* m = block.element == nullptr ? nullptr : block.element + r * grid.cols;
      for (int64_t c = 0; c < block.cols; ++c) {
        if (m != nullptr && !IsLive(m[c])) continue;
        switch (mode) {
          case UpdateMode::kAssign:
            to[c] = from[c];
            break;
          case UpdateMode::kAdd:
            to[c] += from[c];
            break;
          case UpdateMode::kSub:
            to[c] -= from[c];
            break;
        }
      }
    }
  });
}

namespace {

// Calls update(offset) for every live entry: all of a live block's entries
// for a block mask, the live ones for an element mask.
template <typename TMask, typename Update>
void ForEachLiveEntry(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask,
                      const ParallelFor& parallel_for, const Update& update) {
  ForEachMaskBlock(outer, grid, mask, parallel_for, [&](const MaskedBlock<TMask>& block) {
    if (!block.live) return;
    for (int64_t r = 0; r < block.rows; ++r) {
      const int64_t row = block.offset + r * grid.cols;
      const TMask* m = block.element == nullptr ? nullptr : block.element + r * grid.cols;
      for (int64_t c = 0; c < block.cols; ++c) {
        if (m == nullptr || IsLive(m[c])) update(row + c);
      }
    }
  });
}

}  // namespace

template <typename T, typename TMask>
void MaskedAdamStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                    const AdamStep<T>& step, T* var, T* m, T* v, T* v_hat,
                    const ParallelFor& parallel_for) {
  ForEachLiveEntry(outer, grid, mask, parallel_for, [&](int64_t i) {
    if (step.weight_decay != T(0)) var[i] -= var[i] * step.weight_decay * step.learning_rate;
    const T g = grad[i];
    m[i] += (g - m[i]) * step.one_minus_beta_1;
    v[i] += (g * g - v[i]) * step.one_minus_beta_2;
    T second = v[i];
    if (step.amsgrad) {
      v_hat[i] = std::max(v_hat[i], v[i]);
      second = v_hat[i];
    }
    var[i] -= (m[i] * step.alpha) / (std::sqrt(second) + step.epsilon);
  });
}

template <typename T, typename TMask>
void MaskedSgdStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                   const SgdStep<T>& step, T* var, T* momentum, const ParallelFor& parallel_for) {
  ForEachLiveEntry(outer, grid, mask, parallel_for, [&](int64_t i) {
    if (step.weight_decay != T(0)) var[i] -= var[i] * step.weight_decay * step.learning_rate;
    const T scaled = grad[i] * step.learning_rate;
    if (momentum == nullptr) {
      var[i] -= scaled;
      return;
    }
    momentum[i] = momentum[i] * step.momentum - scaled;
    var[i] += step.nesterov ? momentum[i] * step.momentum - scaled : momentum[i];
  });
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                       \
  template void MaskGradient<T, TMask>(int64_t, const BlockGrid&, const T*, MaskView<TMask>,    \
                                       T*, const ParallelFor&);                                 \
  template void MaskedUpdate<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, UpdateMode, \
                                       const T*, T*, const ParallelFor&);                       \
  template void MaskedAdamStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, const T*,  \
                                         const AdamStep<T>&, T*, T*, T*, T*,                    \
                                         const ParallelFor&);                                   \
  template void MaskedSgdStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, const T*,   \
                                        const SgdStep<T>&, T*, T*, const ParallelFor&);

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace masked_ops
