// Masking a gradient before the optimizer sees it, skipping zero blocks.
// Framework-free: raw pointers, sizes and a ParallelFor.
//
// grad is `outer` stacked k x n matrices (a Dense kernel: outer = 1; a conv
// kernel [kh, kw, k, n]: outer = kh * kw). out = where(mask != 0, grad * mask,
// 0), with the mask element-level (grad's shape) or block-level
// [ceil(k / block_rows), ceil(n / block_cols)], the same for every matrix.
// A block whose mask is zero throughout is written as zeros without reading
// grad. When out == grad (the buffer was handed over), blocks whose factor is
// exactly 1 are not touched at all.
#ifndef MASKED_OPS_CC_KERNELS_MASK_GRADIENT_H_
#define MASKED_OPS_CC_KERNELS_MASK_GRADIENT_H_

#include <cstdint>

#include "cc/kernels/block_mask.h"

namespace masked_ops {

template <typename T, typename TMask>
void MaskGradient(int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask,
                  T* out, const ParallelFor& parallel_for);

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_MASK_GRADIENT_H_
