// masked_conv2d on NVIDIA GPUs: the three products of masked_conv2d.h (NHWC),
// with the same semantics, launched on a caller's stream. T is float,
// double or the storage types Float16Bits / BFloat16Bits (float
// accumulators; double for double); GpuMath as for masked_matmul
// (Conv2DUsesTensorCores). The output mask comes as canonical factors in
// ComputeOf<T> (CanonicalOutputFactors), or null for none. Every launcher
// needs a device workspace of Conv2DWorkspaceBytes<T>(...) bytes, returns its
// launches' cudaError_t as an int (0 on success) and does not synchronize.
// Framework-free and CUDA-header-free.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_GPU_H_
#define MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_GPU_H_

#include <cstddef>
#include <cstdint>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/kernels/masked_conv2d.h"

namespace masked_ops {
namespace gpu {

// factors[p] = +0 where output_mask[p] is 0 (-0 included), else its value in
// F, float or double (-0 for a live value that is zero in F), for `pixels`
// entries.
template <typename TOut, typename F>
int CanonicalOutputFactors(const TOut* output_mask, int64_t pixels, F* factors, Stream stream);

// Device workspace bytes of `product`, with or without an output mask (the
// pipelined forward product and dfilters keep partial sums of a split depth
// there; the forward product splits more where an output mask leaves few
// output tiles busy).
template <typename T>
size_t Conv2DWorkspaceBytes(const Conv2DGeometry& g, MaskLevel level, Product product, bool output_masked);

// Whether `product` runs on tensor cores under `math` on the current device:
// the forward product needs the output-channel blocks cut on multiples of 16
// (or not at all), dx the input-channel blocks, dfilters both.
template <typename T>
bool Conv2DUsesTensorCores(const Conv2DGeometry& g, Product product, GpuMath math);

// Whether `product` takes the pipelined tensor-core kernels (cp.async
// stages, mma.sync), given 16-byte aligned arrays (the output factors too):
// float16 / bfloat16 under kTensorCores on a device with tensor cores,
// channel counts multiples of 8, channel blocks cutting them on multiples of
// 16 (or not at all), the batch and every coordinate (sizes, paddings,
// strides, a tap's reach) under 2^30, and for the forward product and dx a
// block mask.
// Elsewhere Conv2DUsesTensorCores decides.
template <typename T>
bool Conv2DUsesPipeline(const Conv2DGeometry& g, Product product, GpuMath math, MaskLevel level);

template <typename T, typename TMask>
int MaskedConv2D(const Conv2DGeometry& g, const T* x, const T* filters, MaskView<TMask> mask,
                 const ComputeOf<T>* output_factors, T* y, void* workspace, GpuMath math, Stream stream);

template <typename T, typename TMask>
int MaskedConv2DGradInput(const Conv2DGeometry& g, const T* dy, const T* filters, MaskView<TMask> mask,
                          const ComputeOf<T>* output_factors, T* dx, void* workspace, GpuMath math, Stream stream);

template <typename T, typename TMask>
int MaskedConv2DGradFilter(const Conv2DGeometry& g, const T* x, const T* dy, MaskView<TMask> mask,
                           const ComputeOf<T>* output_factors, T* dfilters, void* workspace, GpuMath math,
                           Stream stream);

}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_GPU_H_
