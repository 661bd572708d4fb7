// CPU OpKernels for masked_matmul and its gradients: the device-generic
// OpKernels of masked_matmul_kernels.h over the CPU kernels.
#include "cc/tf/masked_matmul_kernels.h"

#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace masked_ops {
namespace {

// Runs the products on TensorFlow's intra-op thread pool, 16-bit floats
// through float copies.
struct CpuBackend {
  template <typename T, typename Mask>
  static void Forward(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* w,
                      MaskView<Mask> mask, T* y) {
    RunOnComputeTypes(ctx, x, shape.m * shape.k, w, shape.k * shape.n, y, shape.m * shape.n,
        [&](const auto* a, const auto* b, auto* out) {
          MaskedMatmul(shape, a, b, mask, out, IntraOpParallelFor(ctx));
        });
  }
  template <typename T, typename Mask>
  static void GradInput(OpKernelContext* ctx, const MatmulShape& shape, const T* dy, const T* w,
                        MaskView<Mask> mask, T* dx) {
    RunOnComputeTypes(ctx, dy, shape.m * shape.n, w, shape.k * shape.n, dx, shape.m * shape.k,
        [&](const auto* a, const auto* b, auto* out) {
          MaskedMatmulGradInput(shape, a, b, mask, out, IntraOpParallelFor(ctx));
        });
  }
  template <typename T, typename Mask>
  static void GradWeight(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* dy,
                         MaskView<Mask> mask, T* dw) {
    RunOnComputeTypes(ctx, x, shape.m * shape.k, dy, shape.m * shape.n, dw, shape.k * shape.n,
        [&](const auto* a, const auto* b, auto* out) {
          MaskedMatmulGradWeight(shape, a, b, mask, out, IntraOpParallelFor(ctx));
        });
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER_CPU(T, Mask) MASKED_OPS_REGISTER_MATMUL(::tensorflow::DEVICE_CPU, CpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_TF_TYPE_PAIR(MASKED_OPS_REGISTER_CPU)

#undef MASKED_OPS_REGISTER_CPU

}  // namespace masked_ops
