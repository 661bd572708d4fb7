// CPU OpKernels for masked_matmul and its gradients: the device-generic
// OpKernels of masked_matmul_kernels.h over the CPU kernels.
#include "cc/tf/masked_matmul_kernels.h"

#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace masked_ops {
namespace {

// Runs the products on TensorFlow's intra-op thread pool.
struct CpuBackend {
  template <typename T, typename Mask>
  static void Forward(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* w,
                      MaskView<Mask> mask, T* y) {
    RunKernel(ctx, [&] { MaskedMatmul<T>(shape, x, w, mask, y, IntraOpParallelFor(ctx)); });
  }
  template <typename T, typename Mask>
  static void GradInput(OpKernelContext* ctx, const MatmulShape& shape, const T* dy, const T* w,
                        MaskView<Mask> mask, T* dx) {
    RunKernel(ctx, [&] { MaskedMatmulGradInput<T>(shape, dy, w, mask, dx, IntraOpParallelFor(ctx)); });
  }
  template <typename T, typename Mask>
  static void GradWeight(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* dy,
                         MaskView<Mask> mask, T* dw) {
    RunKernel(ctx, [&] { MaskedMatmulGradWeight<T>(shape, x, dy, mask, dw, IntraOpParallelFor(ctx)); });
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER_CPU(T, Mask) MASKED_OPS_REGISTER_MATMUL(::tensorflow::DEVICE_CPU, CpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_REGISTER_CPU)

#undef MASKED_OPS_REGISTER_CPU

}  // namespace masked_ops
