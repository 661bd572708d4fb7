// Block-skipping masked matrix products on the CPU. Framework-free: raw
// row-major pointers, sizes and a ParallelFor.
//
// With W = where(mask != 0, w * mask, 0) (a block mask expanded to its blocks):
//   MaskedMatmul:           y  = x @ W                      x: [m, k]  w: [k, n]
//   MaskedMatmulGradInput:  dx = dy @ W^T                   dy: [m, n]
//   MaskedMatmulGradWeight: dw = where(mask != 0, (x^T @ dy) * mask, 0)
// A block whose mask is entirely zero is never read from w, x^T dy is never
// formed for it, and its dw is written as exact zeros.
#ifndef MASKED_OPS_CC_KERNELS_MASKED_MATMUL_H_
#define MASKED_OPS_CC_KERNELS_MASKED_MATMUL_H_

#include <cstdint>

#include "cc/kernels/block_mask.h"

namespace masked_ops {

struct MatmulShape {
  int64_t m;
  int64_t k;
  int64_t n;
  int64_t block_k;
  int64_t block_n;

  BlockGrid weight_grid() const { return BlockGrid{k, n, block_k, block_n}; }
};

template <typename T, typename TMask>
void MaskedMatmul(const MatmulShape& shape, const T* x, const T* w, MaskView<TMask> mask, T* y,
                  const ParallelFor& parallel_for);

template <typename T, typename TMask>
void MaskedMatmulGradInput(const MatmulShape& shape, const T* dy, const T* w,
                           MaskView<TMask> mask, T* dx, const ParallelFor& parallel_for);

template <typename T, typename TMask>
void MaskedMatmulGradWeight(const MatmulShape& shape, const T* x, const T* dy,
                            MaskView<TMask> mask, T* dw, const ParallelFor& parallel_for);

// Every (T, TMask) pair the kernels are compiled for; the TensorFlow glue
// registers exactly these.
#define MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, T) \
  MACRO(T, bool)                                \
  MACRO(T, int8_t)                              \
  MACRO(T, uint8_t)                             \
  MACRO(T, int16_t)                             \
  MACRO(T, int32_t)                             \
  MACRO(T, int64_t)                             \
  MACRO(T, ::masked_ops::Float16Bits)           \
  MACRO(T, ::masked_ops::BFloat16Bits)          \
  MACRO(T, float)                               \
  MACRO(T, double)

#define MASKED_OPS_FOR_EACH_TYPE_PAIR(MACRO)  \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, float) \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, double)

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_MASKED_MATMUL_H_
