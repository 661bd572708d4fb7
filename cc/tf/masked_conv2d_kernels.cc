// CPU OpKernels for masked_conv2d and its gradients: the device-generic
// OpKernels of masked_conv2d_kernels.h over the CPU kernels.
#include "cc/tf/masked_conv2d_kernels.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cc/kernels/masked_conv2d.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/types.h"

namespace masked_ops {
namespace {

struct CpuBackend {
  template <typename T>
  using Factor = T;

  // Output-mask factors (see OutputMaskFactors) from a mask of any supported
  // dtype: the op leaves Toutput_mask open, so it is dispatched here.
  template <typename T>
  static absl::Status ConvertOutputMask(OpKernelContext* ctx, const Tensor& output_mask, Tensor* storage,
                                        const T** factors) {
    const int64_t pixels = output_mask.NumElements();
    TF_RETURN_IF_ERROR(
        ctx->allocate_temp(::tensorflow::DataTypeToEnum<T>::value, TensorShape({pixels}), storage));
    T* out = storage->template flat<T>().data();
    *factors = out;
    switch (output_mask.dtype()) {
#define MASKED_OPS_CONVERT(Value, Mask)                                                           \
  case ::tensorflow::DataTypeToEnum<TfMaskType<Mask>::type>::value:                               \
    OutputMaskFactors<Value>(                                                                     \
        reinterpret_cast<const Mask*>(output_mask.flat<TfMaskType<Mask>::type>().data()), pixels, out); \
    return absl::OkStatus();
      MASKED_OPS_FOR_EACH_MASK_TYPE(MASKED_OPS_CONVERT, T)
#undef MASKED_OPS_CONVERT
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            "output_mask has unsupported dtype ", ::tensorflow::DataTypeString(output_mask.dtype())));
    }
  }

  template <typename T, typename Mask>
  static void Forward(OpKernelContext* ctx, const Conv2DGeometry& g, const T* x, const T* filters,
                      MaskView<Mask> mask, const T* factors, T* y) {
    RunKernel(ctx, [&] { MaskedConv2D<T>(g, x, filters, mask, factors, y, IntraOpParallelFor(ctx)); });
  }
  template <typename T, typename Mask>
  static void GradInput(OpKernelContext* ctx, const Conv2DGeometry& g, const T* dy, const T* filters,
                        MaskView<Mask> mask, const T* factors, T* dx) {
    RunKernel(ctx, [&] { MaskedConv2DGradInput<T>(g, dy, filters, mask, factors, dx, IntraOpParallelFor(ctx)); });
  }
  template <typename T, typename Mask>
  static void GradFilter(OpKernelContext* ctx, const Conv2DGeometry& g, const T* x, const T* dy,
                         MaskView<Mask> mask, const T* factors, T* dfilters) {
    RunKernel(ctx, [&] { MaskedConv2DGradFilter<T>(g, x, dy, mask, factors, dfilters, IntraOpParallelFor(ctx)); });
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER_CPU(T, Mask) MASKED_OPS_REGISTER_CONV2D(::tensorflow::DEVICE_CPU, CpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_REGISTER_CPU)

#undef MASKED_OPS_REGISTER_CPU

}  // namespace masked_ops
