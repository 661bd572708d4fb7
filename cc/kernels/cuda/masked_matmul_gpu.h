// masked_matmul on NVIDIA GPUs: the same three products as the CPU kernels
// (masked_matmul.h), launched on a caller's stream. Framework-free: this
// header needs no CUDA headers, so the TensorFlow glue and the TF-free
// harness include it with a plain C++ compiler.
//
// T is float, double or the storage types Float16Bits / BFloat16Bits (half
// and bfloat16, accumulated in float; double in double). The mask is any of the CPU kernels' mask
// types, element-level or block-level. Every launcher needs a device
// workspace of GpuWorkspaceBytes<T>(...) bytes (the live-block index), returns
// the cudaError_t of its launches as an int (0 on success) and does not
// synchronize.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_GPU_H_
#define MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_GPU_H_

#include <cstddef>
#include <cstdint>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/masked_matmul.h"

struct CUstream_st;

namespace masked_ops {
namespace gpu {

using Stream = CUstream_st*;

// Which units multiply. kTensorCores: float16 / bfloat16 operands on tensor
// cores with float accumulators (a masked weight rounded to T first, as the
// reference's w * m is) and float32 operands rounded to TF32, a 10-bit
// mantissa: what TensorFlow's own float32 matmul does on Ampere and later
// unless tf.config.experimental.enable_tensor_float_32_execution(False).
// Taken where the device has them (compute capability 8.0+) and the mask's
// block edges fall on multiples of 16; elsewhere, and for kCudaCores, float
// FMAs on the CUDA cores (float32: exact up to summation order).
enum class GpuMath { kCudaCores, kTensorCores };

// The three products of an op: y, dx and the weight's (filters') gradient.
enum class Product { kForward, kGradInput, kGradWeight };

// Whether `product` over a T weight of `grid` runs on tensor cores under
// `math` on the current device: never for double; the forward product needs
// the block columns cut on multiples of 16 (or not at all), dx the block
// rows, dW both.
template <typename T>
bool MatmulUsesTensorCores(const BlockGrid& grid, Product product, GpuMath math);

// Whether `product` takes the pipelined tensor-core kernels (cp.async stages,
// mma.sync; pipelined_gemm.cuh), given 16-byte aligned arrays: float16 /
// bfloat16 (and float32 as TF32 for the forward product) under kTensorCores
// on a device with tensor cores, W's dimensions multiples of 8, its blocks
// cutting them on multiples of 16 (or not at all), and for the forward
// product and dx a block-level mask. Elsewhere MatmulUsesTensorCores decides.
template <typename T>
bool MatmulUsesPipeline(const BlockGrid& grid, Product product, GpuMath math, MaskLevel level);

namespace warpgroup {
// Which products of float16 / bfloat16 take the warpgroup (wgmma) tile
// instead of the pipelined one where it applies (MatmulUsesPipeline,
// Conv2DUsesPipeline) and the device runs it: none; the matmul forward
// product, the default (on an H100 it beat the pipelined tile in every
// forward row of bench/gpu.py, while dx and dW on it were faster only where
// every tile is whole: bench/GPU_NOTES.md, session 9); or all, the three
// matmul products and the conv forward (not yet timed on a GPU).
enum class Products : int { kNone = 0, kForward = 1, kAll = 2 };
void SetProducts(Products products);
Products ChosenProducts();
// A compute capability 9.0 device, in a build with sm_90a code
// (CMAKE_CUDA_ARCHITECTURES naming 90a).
bool DeviceRunsWarpgroupMma();

inline bool UsesWarpgroupMma(Product product) {
  const Products chosen = ChosenProducts();
  const bool chosen_product =
      chosen == Products::kAll || (chosen == Products::kForward && product == Product::kForward);
  return chosen_product && DeviceRunsWarpgroupMma();
}
inline bool ConvForwardUsesWarpgroupMma() { return ChosenProducts() == Products::kAll && DeviceRunsWarpgroupMma(); }
// A launch for the warpgroup tile whose tensor maps cannot be made (the
// driver refuses one, or an array lies past the tensor copies' 32-bit
// coordinates) takes the pipelined tile instead, and is counted, so that
// the GPU tests can tell that the warpgroup tile really ran.
void CountTensorMapRefusal();
int64_t TensorMapRefusals();
// Whether the forward product and dx on the warpgroup tile take tall tiles
// (256 x 128: two warpgroups sharing each stage of W, a quarter less L2
// traffic at density 1) where a product has one split and more than 128
// rows. Off by default: not yet timed on a GPU (bench/GPU_NOTES.md).
void SetTallTiles(bool on);
bool TallTiles();
}  // namespace warpgroup

// Device bytes of `product`'s workspace for a T weight with a mask of
// `level`: the live-block index, and for the pipelined dW the partial sums
// of a split batch.
template <typename T>
size_t GpuWorkspaceBytes(const MatmulShape& shape, MaskLevel level, Product product);

template <typename T, typename TMask>
int MaskedMatmul(const MatmulShape& shape, const T* x, const T* w, MaskView<TMask> mask, T* y,
                 void* workspace, GpuMath math, Stream stream);

template <typename T, typename TMask>
int MaskedMatmulGradInput(const MatmulShape& shape, const T* dy, const T* w, MaskView<TMask> mask,
                          T* dx, void* workspace, GpuMath math, Stream stream);

template <typename T, typename TMask>
int MaskedMatmulGradWeight(const MatmulShape& shape, const T* x, const T* dy, MaskView<TMask> mask,
                           T* dw, void* workspace, GpuMath math, Stream stream);

// Every element type the GPU kernels are compiled for.
#define MASKED_OPS_FOR_EACH_GPU_TYPE(MACRO) \
  MACRO(float)                              \
  MACRO(double)                             \
  MACRO(::masked_ops::Float16Bits)          \
  MACRO(::masked_ops::BFloat16Bits)

// Every (T, TMask) pair the GPU kernels are compiled for.
#define MASKED_OPS_FOR_EACH_GPU_TYPE_PAIR(MACRO)                 \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, float)                    \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, double)                   \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, ::masked_ops::Float16Bits) \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, ::masked_ops::BFloat16Bits)

}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASKED_MATMUL_GPU_H_
