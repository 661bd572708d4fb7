// Elementwise work on weights (or their gradients and optimizer state) that
// skips the blocks a mask switches off. Framework-free: raw pointers, sizes and
// a ParallelFor.
//
// A tensor is `outer` stacked k x n matrices (a Dense kernel: outer = 1; a
// conv kernel [kh, kw, k, n]: outer = kh * kw; a vector: k = 1). Its mask is
// element-level (the tensor's shape) or block-level [ceil(k / block_rows),
// ceil(n / block_cols)], the same for every matrix. T is float, double or the
// 16-bit storage types Float16Bits / BFloat16Bits, which are computed in float
// (ComputeOf<T>) and rounded once per stored value.
#ifndef MASKED_OPS_CC_KERNELS_BLOCK_ELEMENTWISE_H_
#define MASKED_OPS_CC_KERNELS_BLOCK_ELEMENTWISE_H_

#include <cstdint>

#include "cc/kernels/block_mask.h"

namespace masked_ops {

// out = where(mask != 0, grad * mask, 0). A block whose mask is zero
// throughout is written as zeros without reading grad. When out == grad (the
// buffer was handed over), blocks whose factor is exactly 1 are not touched.
template <typename T, typename TMask>
void MaskGradient(int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask,
                  T* out, const ParallelFor& parallel_for);

enum class UpdateMode { kAssign, kAdd, kSub };

// Where the mask is live (its value does not matter), var = value, var +=
// value or var -= value; everywhere else var is left as it is, and a block
// whose mask is zero throughout is neither read nor written, in var or value.
template <typename T, typename TMask>
void MaskedUpdate(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, UpdateMode mode,
                  const T* value, T* var, const ParallelFor& parallel_for);

// One optimizer step on the live entries only, in one pass over the live
// blocks of the variable, its state and the gradient; frozen entries of all of
// them keep their exact bits (inside a live block of an element mask they are
// stored back unchanged, so that the loops vectorize), and frozen blocks are
// never read. The
// arithmetic is Keras 3's, step for step (decoupled weight decay first,
// `var -= var * weight_decay * learning_rate`, when weight_decay != 0).
template <typename T>
struct AdamStep {
  T alpha;             // learning_rate * sqrt(1 - beta_2^t) / (1 - beta_1^t)
  T one_minus_beta_1;
  T one_minus_beta_2;
  T epsilon;
  T learning_rate;     // for the weight decay
  T weight_decay;
  bool amsgrad;        // v_hat = max(v_hat, v) divides instead of v
};

template <typename T, typename TMask>
void MaskedAdamStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                    const AdamStep<ComputeOf<T>>& step, T* var, T* m, T* v, T* v_hat,
                    const ParallelFor& parallel_for);

template <typename T>
struct SgdStep {
  T learning_rate;
  T momentum;  // 0: plain SGD, no momentum state
  bool nesterov;
  T weight_decay;
};

template <typename T, typename TMask>
void MaskedSgdStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                   const SgdStep<ComputeOf<T>>& step, T* var, T* momentum, const ParallelFor& parallel_for);

template <typename T>
struct RmspropStep {
  T learning_rate;
  T rho;
  T one_minus_rho;
  T momentum;  // 0: no momentum state
  T epsilon;
  bool centered;  // keeps average_grad and divides by the centred variance
  T weight_decay;
};

template <typename T, typename TMask>
void MaskedRmspropStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                       const RmspropStep<ComputeOf<T>>& step, T* var, T* velocity, T* momentum,
                       T* average_grad, const ParallelFor& parallel_for);

// The same step with each scalar passed through `scalar`. The GPU kernels
// take their steps as pointers to scalars in device memory (a step's learning
// rate is computed on the device, and reading it on the host would wait for
// the device) and read the values with it; the TensorFlow glue builds every
// step from its scalar inputs so.
template <typename To, typename From, typename Scalar>
MASKED_OPS_HOST_DEVICE AdamStep<To> MapScalars(const AdamStep<From>& step, const Scalar& scalar) {
  return {scalar(step.alpha),         scalar(step.one_minus_beta_1), scalar(step.one_minus_beta_2),
          scalar(step.epsilon),       scalar(step.learning_rate),    scalar(step.weight_decay),
          step.amsgrad};
}

template <typename To, typename From, typename Scalar>
MASKED_OPS_HOST_DEVICE SgdStep<To> MapScalars(const SgdStep<From>& step, const Scalar& scalar) {
  return {scalar(step.learning_rate), scalar(step.momentum), step.nesterov, scalar(step.weight_decay)};
}

template <typename To, typename From, typename Scalar>
MASKED_OPS_HOST_DEVICE RmspropStep<To> MapScalars(const RmspropStep<From>& step, const Scalar& scalar) {
  return {scalar(step.learning_rate), scalar(step.rho),     scalar(step.one_minus_rho), scalar(step.momentum),
          scalar(step.epsilon),       step.centered,        scalar(step.weight_decay)};
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_BLOCK_ELEMENTWISE_H_
