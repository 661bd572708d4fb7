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

// A live mask entry's factor as tf.cast(mask, T) makes it, in the compute
// type: a 16-bit T rounds it first, so that grad * factor is the product in T.
template <typename T, typename TMask>
ComputeOf<T> FactorIn(TMask m) {
  return Widen(Narrow<T>(MaskFactor<ComputeOf<T>>(m)));
}

}  // namespace

template <typename T, typename TMask>
void MaskGradient(int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask,
                  T* out, const ParallelFor& parallel_for) {
  using C = ComputeOf<T>;
  const bool in_place = out == grad;
  ForEachMaskBlock(outer, grid, mask, parallel_for, [&](const MaskedBlock<TMask>& block) {
    const C factor = block.live && block.element == nullptr ? FactorIn<T>(block.block_value) : C(0);
    if (in_place && block.live && block.element == nullptr && factor == C(1)) return;
    for (int64_t r = 0; r < block.rows; ++r) {
      T* to = out + block.offset + r * grid.cols;
      if (!block.live) {
        std::fill_n(to, block.cols, T{});
        continue;
      }
      const T* from = grad + block.offset + r * grid.cols;
      if (block.element == nullptr) {
        for (int64_t c = 0; c < block.cols; ++c) to[c] = Narrow<T>(Widen(from[c]) * factor);
      } else {
        const TMask* m = block.element + r * grid.cols;
        for (int64_t c = 0; c < block.cols; ++c) {
          to[c] = IsLive(m[c]) ? Narrow<T>(Widen(from[c]) * FactorIn<T>(m[c])) : T{};
        }
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
            to[c] = Narrow<T>(Widen(to[c]) + Widen(from[c]));
            break;
          case UpdateMode::kSub:
            to[c] = Narrow<T>(Widen(to[c]) - Widen(from[c]));
            break;
        }
      }
    }
  });
}

namespace {

// Calls step(first, count, element) for every row piece of every live block:
// entries [first, first + count), with `element` their element-mask entries
// (null for a block mask, where all of them are live).
template <typename TMask, typename Step>
void ForEachLiveRow(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask,
                    const ParallelFor& parallel_for, const Step& step) {
  ForEachMaskBlock(outer, grid, mask, parallel_for, [&](const MaskedBlock<TMask>& block) {
    if (!block.live) return;
    for (int64_t r = 0; r < block.rows; ++r) {
      step(block.offset + r * grid.cols, block.cols,
           block.element == nullptr ? nullptr : block.element + r * grid.cols);
    }
  });
}

// The new values are computed for every entry of a live row piece and stored
// only where the element mask is live (elsewhere the old value is stored back,
// bit for bit), so that the loops have no branches and vectorize.
template <typename T, typename TMask>
inline T KeepFrozen(const TMask* element, int64_t c, ComputeOf<T> updated, T old) {
  return element == nullptr || IsLive(element[c]) ? Narrow<T>(updated) : old;
}

}  // namespace

template <typename T, typename TMask>
void MaskedAdamStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                    const AdamStep<ComputeOf<T>>& step, T* var, T* m, T* v, T* v_hat,
                    const ParallelFor& parallel_for) {
  using C = ComputeOf<T>;
  const C decay = step.weight_decay;
  ForEachLiveRow(outer, grid, mask, parallel_for, [&](int64_t first, int64_t count, const TMask* element) {
    T* const w = var + first;
    T* const m_row = m + first;
    T* const v_row = v + first;
    T* const v_hat_row = step.amsgrad ? v_hat + first : nullptr;
    const T* const g_row = grad + first;
    for (int64_t c = 0; c < count; ++c) {
      const C weight = Widen(w[c]);
      const C g = Widen(g_row[c]);
      const C m_old = Widen(m_row[c]);
      const C v_old = Widen(v_row[c]);
      const C decayed = decay != C(0) ? weight - weight * decay * step.learning_rate : weight;
      const C m_new = m_old + (g - m_old) * step.one_minus_beta_1;
      const C v_new = v_old + (g * g - v_old) * step.one_minus_beta_2;
      // The maximum that keeps a NaN of either side, as Keras's ops.maximum
      // does (std::max would drop a NaN v_new).
      const C v_hat_old = step.amsgrad ? Widen(v_hat_row[c]) : C(0);
      const C v_hat_new = step.amsgrad && (v_new < v_hat_old || v_hat_old != v_hat_old) ? v_hat_old : v_new;
      const C w_new = decayed - (m_new * step.alpha) / (std::sqrt(v_hat_new) + step.epsilon);
      m_row[c] = KeepFrozen(element, c, m_new, m_row[c]);
      v_row[c] = KeepFrozen(element, c, v_new, v_row[c]);
      if (step.amsgrad) v_hat_row[c] = KeepFrozen(element, c, v_hat_new, v_hat_row[c]);
      w[c] = KeepFrozen(element, c, w_new, w[c]);
    }
  });
}

template <typename T, typename TMask>
void MaskedSgdStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                   const SgdStep<ComputeOf<T>>& step, T* var, T* momentum, const ParallelFor& parallel_for) {
  using C = ComputeOf<T>;
  const C decay = step.weight_decay;
  ForEachLiveRow(outer, grid, mask, parallel_for, [&](int64_t first, int64_t count, const TMask* element) {
    T* const w = var + first;
    T* const m_row = momentum == nullptr ? nullptr : momentum + first;
    const T* const g = grad + first;
    for (int64_t c = 0; c < count; ++c) {
      const C weight = Widen(w[c]);
      const C decayed = decay != C(0) ? weight - weight * decay * step.learning_rate : weight;
      const C scaled = Widen(g[c]) * step.learning_rate;
      if (m_row == nullptr) {
        w[c] = KeepFrozen(element, c, decayed - scaled, w[c]);
        continue;
      }
      const C m_new = Widen(m_row[c]) * step.momentum - scaled;
      const C w_new = decayed + (step.nesterov ? m_new * step.momentum - scaled : m_new);
      m_row[c] = KeepFrozen(element, c, m_new, m_row[c]);
      w[c] = KeepFrozen(element, c, w_new, w[c]);
    }
  });
}

template <typename T, typename TMask>
void MaskedRmspropStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                       const RmspropStep<ComputeOf<T>>& step, T* var, T* velocity, T* momentum,
                       T* average_grad, const ParallelFor& parallel_for) {
  using C = ComputeOf<T>;
  const C decay = step.weight_decay;
  ForEachLiveRow(outer, grid, mask, parallel_for, [&](int64_t first, int64_t count, const TMask* element) {
    T* const w = var + first;
    T* const velocity_row = velocity + first;
    T* const momentum_row = momentum == nullptr ? nullptr : momentum + first;
    T* const average_row = step.centered ? average_grad + first : nullptr;
    const T* const g_row = grad + first;
    for (int64_t c = 0; c < count; ++c) {
      const C weight = Widen(w[c]);
      const C g = Widen(g_row[c]);
      const C decayed = decay != C(0) ? weight - weight * decay * step.learning_rate : weight;
      const C velocity_new = step.rho * Widen(velocity_row[c]) + step.one_minus_rho * (g * g);
      C denominator = velocity_new + step.epsilon;
      if (step.centered) {
        const C average_new = step.rho * Widen(average_row[c]) + step.one_minus_rho * g;
        denominator = velocity_new - average_new * average_new + step.epsilon;
        average_row[c] = KeepFrozen(element, c, average_new, average_row[c]);
      }
      const C increment = (step.learning_rate * g) / std::sqrt(denominator);
      velocity_row[c] = KeepFrozen(element, c, velocity_new, velocity_row[c]);
      if (momentum_row == nullptr) {
        w[c] = KeepFrozen(element, c, decayed - increment, w[c]);
        continue;
      }
      const C momentum_new = step.momentum * Widen(momentum_row[c]) + increment;
      momentum_row[c] = KeepFrozen(element, c, momentum_new, momentum_row[c]);
      w[c] = KeepFrozen(element, c, decayed - momentum_new, w[c]);
    }
  });
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                              \
  template void MaskGradient<T, TMask>(int64_t, const BlockGrid&, const T*, MaskView<TMask>,           \
                                       T*, const ParallelFor&);                                        \
  template void MaskedUpdate<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, UpdateMode,        \
                                       const T*, T*, const ParallelFor&);                              \
  template void MaskedAdamStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, const T*,         \
                                         const AdamStep<ComputeOf<T>>&, T*, T*, T*, T*,                \
                                         const ParallelFor&);                                          \
  template void MaskedSgdStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, const T*,          \
                                        const SgdStep<ComputeOf<T>>&, T*, T*, const ParallelFor&);     \
  template void MaskedRmspropStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>,                \
                                            const T*, const RmspropStep<ComputeOf<T>>&, T*, T*, T*, T*, \
                                            const ParallelFor&);

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_INSTANTIATE)
MASKED_OPS_FOR_EACH_MASK_TYPE(MASKED_OPS_INSTANTIATE, Float16Bits)
MASKED_OPS_FOR_EACH_MASK_TYPE(MASKED_OPS_INSTANTIATE, BFloat16Bits)

#undef MASKED_OPS_INSTANTIATE

}  // namespace masked_ops
