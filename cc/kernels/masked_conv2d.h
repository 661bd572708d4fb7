// Block-skipping masked 2-D convolution on the CPU, NHWC. Framework-free:
// raw row-major pointers, sizes and a ParallelFor.
//
// With F = where(mask != 0, filters * mask, 0) and, when given, an output
// mask o over [n, out_h, out_w]:
//   MaskedConv2D:           y  = where(o != 0, conv2d(x, F) * o, 0)
//   MaskedConv2DGradInput:  dx = the gradient of y with respect to x
//   MaskedConv2DGradFilter: df = where(mask != 0, (gradient wrt F) * mask, 0)
// The filter is cut into blocks of in_block input x out_block output channels
// at each of its kh x kw taps. A block whose mask is zero at that tap is never
// read, multiplied or given a gradient (its df is exact zeros). The output is
// cut into tiles of tile_h x tile_w pixels; a tile whose output mask is zero
// throughout is never computed (y is 0 there) and passes no gradient back.
#ifndef MASKED_OPS_CC_KERNELS_MASKED_CONV2D_H_
#define MASKED_OPS_CC_KERNELS_MASKED_CONV2D_H_

#include <cstdint>

#include "cc/kernels/block_mask.h"

namespace masked_ops {

struct Conv2DGeometry {
  int64_t batch;
  int64_t in_h;
  int64_t in_w;
  int64_t in_channels;
  int64_t filter_h;
  int64_t filter_w;
  int64_t out_channels;
  int64_t stride_h;
  int64_t stride_w;
  int64_t dilation_h;
  int64_t dilation_w;
  int64_t pad_top;
  int64_t pad_left;
  int64_t out_h;
  int64_t out_w;
  int64_t in_block;   // input channels per filter block
  int64_t out_block;  // output channels per filter block
  int64_t tile_h;     // output pixels per output-mask tile
  int64_t tile_w;

  int64_t taps() const { return filter_h * filter_w; }
  int64_t in_blocks() const { return CeilDiv(in_channels, in_block); }
  int64_t out_blocks() const { return CeilDiv(out_channels, out_block); }
  int64_t out_pixels() const { return batch * out_h * out_w; }
  int64_t in_pixels() const { return batch * in_h * in_w; }
};

// An output mask after conversion: one factor of T per output pixel
// ([batch, out_h, out_w]), 0 where the mask is 0 (-0 included) and the mask's
// value in T elsewhere. Null means no output mask.
template <typename T, typename TMask>
void OutputMaskFactors(const TMask* output_mask, int64_t pixels, T* factors) {
  for (int64_t p = 0; p < pixels; ++p) {
    factors[p] = IsLive(output_mask[p]) ? MaskFactor<T>(output_mask[p]) : T(0);
  }
}

// mask is element-level [filter_h, filter_w, in_channels, out_channels] or
// block-level [in_blocks, out_blocks] (the same block mask at every tap).
// output_factors: see OutputMaskFactors; null for none.
template <typename T, typename TMask>
void MaskedConv2D(const Conv2DGeometry& geometry, const T* x, const T* filters,
                  MaskView<TMask> mask, const T* output_factors, T* y,
                  const ParallelFor& parallel_for);

template <typename T, typename TMask>
void MaskedConv2DGradInput(const Conv2DGeometry& geometry, const T* dy, const T* filters,
                           MaskView<TMask> mask, const T* output_factors, T* dx,
                           const ParallelFor& parallel_for);

template <typename T, typename TMask>
void MaskedConv2DGradFilter(const Conv2DGeometry& geometry, const T* x, const T* dy,
                            MaskView<TMask> mask, const T* output_factors, T* dfilters,
                            const ParallelFor& parallel_for);

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_MASKED_CONV2D_H_
