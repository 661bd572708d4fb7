// CUDA kernels for masked_conv2d (see masked_conv2d_gpu.h): implicit GEMMs
// over shared-memory tiles, no im2col. The filter mask becomes canonical
// factors and a liveness flag per (tap, input block, output block); the
// forward product lists, per output block, the live (tap, input block)
// slices, dx lists per input block the live (tap, output block) slices, and
// dfilters computes live blocks only. The forward product works tile by
// output tile: a tile whose output mask is zero throughout is written as
// zeros and never computed. Where the filter blocks' channel edges fall on
// multiples of 16 and tensor cores are asked for, the three products run on
// them, with the same skipping: float16 / bfloat16 on the pipelined tile
// where Conv2DUsesPipeline says so (pipelined_gemm.cuh: per-tile lists of
// live segments, cp.async stages, mma.sync; dfilters split over the output
// pixels), else on the WMMA tile (tensor_core_tile.cuh); else on CUDA cores.
//
// The kernels are in masked_conv2d_kernels.cuh and their launch sequences in
// masked_conv2d_launch.cuh; this file launches them on a stream.
#include <cuda_runtime.h>

#include "cc/kernels/cuda/cuda_launch.cuh"
#include "cc/kernels/cuda/masked_conv2d_gpu.h"
#include "cc/kernels/cuda/masked_conv2d_launch.cuh"

namespace masked_ops {
namespace gpu {

template <typename TOut, typename F>
int CanonicalOutputFactors(const TOut* output_mask, int64_t pixels, F* factors, Stream stream) {
  return RunCanonicalOutputFactors(OnStream(stream), output_mask, pixels, factors);
}

template <typename T, typename TMask>
int MaskedConv2D(const Conv2DGeometry& g, const T* x, const T* filters, MaskView<TMask> mask,
                 const ComputeOf<T>* output_factors, T* y, void* workspace, GpuMath math, Stream stream) {
  return RunForward(OnStream(stream), g, x, filters, mask, output_factors, y, workspace, math);
}

template <typename T, typename TMask>
int MaskedConv2DGradInput(const Conv2DGeometry& g, const T* dy, const T* filters, MaskView<TMask> mask,
                          const ComputeOf<T>* output_factors, T* dx, void* workspace, GpuMath math, Stream stream) {
  return RunGradInput(OnStream(stream), g, dy, filters, mask, output_factors, dx, workspace, math);
}

template <typename T, typename TMask>
int MaskedConv2DGradFilter(const Conv2DGeometry& g, const T* x, const T* dy, MaskView<TMask> mask,
                           const ComputeOf<T>* output_factors, T* dfilters, void* workspace, GpuMath math,
                           Stream stream) {
  return RunGradFilter(OnStream(stream), g, x, dy, mask, output_factors, dfilters, workspace, math);
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                             \
  template int MaskedConv2D<T, TMask>(const Conv2DGeometry&, const T*, const T*, MaskView<TMask>,     \
                                      const ComputeOf<T>*, T*, void*, GpuMath, Stream);                      \
  template int MaskedConv2DGradInput<T, TMask>(const Conv2DGeometry&, const T*, const T*,             \
                                               MaskView<TMask>, const ComputeOf<T>*, T*, void*, GpuMath,     \
                                               Stream);                                               \
  template int MaskedConv2DGradFilter<T, TMask>(const Conv2DGeometry&, const T*, const T*,            \
                                                MaskView<TMask>, const ComputeOf<T>*, T*, void*, GpuMath,    \
                                                Stream);

MASKED_OPS_FOR_EACH_GPU_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

#define MASKED_OPS_INSTANTIATE(Unused, TOut)                                             \
  template int CanonicalOutputFactors<TOut, float>(const TOut*, int64_t, float*, Stream);  \
  template int CanonicalOutputFactors<TOut, double>(const TOut*, int64_t, double*, Stream);

MASKED_OPS_FOR_EACH_MASK_TYPE(MASKED_OPS_INSTANTIATE, void)

#undef MASKED_OPS_INSTANTIATE

#define MASKED_OPS_INSTANTIATE(T)                                                             \
  template size_t Conv2DWorkspaceBytes<T>(const Conv2DGeometry&, MaskLevel, Product, bool);   \
  template bool Conv2DUsesTensorCores<T>(const Conv2DGeometry&, Product, GpuMath);            \
  template bool Conv2DUsesPipeline<T>(const Conv2DGeometry&, Product, GpuMath, MaskLevel);

MASKED_OPS_FOR_EACH_GPU_TYPE(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace gpu
}  // namespace masked_ops
