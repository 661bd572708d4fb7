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

// Runs the products on TensorFlow's intra-op thread pool, 16-bit floats
// through float copies.
struct CpuBackend {
  template <typename T>
  using Factor = ComputeT<T>;

  // Output-mask factors (see OutputMaskFactors) from a mask of any supported
  // dtype: the op leaves Toutput_mask open, so it is dispatched here.
  template <typename T>
  static absl::Status ConvertOutputMask(OpKernelContext* ctx, const Tensor& output_mask, Tensor* storage,
                                        const ComputeT<T>** factors) {
    using C = ComputeT<T>;
    const int64_t pixels = output_mask.NumElements();
    TF_RETURN_IF_ERROR(
        ctx->allocate_temp(::tensorflow::DataTypeToEnum<C>::value, TensorShape({pixels}), storage));
    C* out = storage->template flat<C>().data();
    *factors = out;
    switch (output_mask.dtype()) {
#define MASKED_OPS_CONVERT(Value, Mask)                                                           \
  case ::tensorflow::DataTypeToEnum<TfMaskType<Mask>::type>::value:                               \
    OutputMaskFactors<Value>(                                                                     \
        reinterpret_cast<const Mask*>(output_mask.flat<TfMaskType<Mask>::type>().data()), pixels, out); \
    return absl::OkStatus();
      MASKED_OPS_FOR_EACH_MASK_TYPE(MASKED_OPS_CONVERT, C)
#undef MASKED_OPS_CONVERT
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            "output_mask has unsupported dtype ", ::tensorflow::DataTypeString(output_mask.dtype())));
    }
  }

  template <typename T, typename Mask>
  static void Forward(OpKernelContext* ctx, const Conv2DGeometry& g, const T* x, const T* filters,
                      MaskView<Mask> mask, const ComputeT<T>* factors, T* y) {
    RunOnComputeTypes(ctx, x, g.in_pixels() * g.in_channels, filters, FilterCount(g), y, g.out_pixels() * g.out_channels,
        [&](const auto* a, const auto* b, auto* out) {
          MaskedConv2D(g, a, b, mask, factors, out, IntraOpParallelFor(ctx));
        });
  }
  template <typename T, typename Mask>
  static void GradInput(OpKernelContext* ctx, const Conv2DGeometry& g, const T* dy, const T* filters,
                        MaskView<Mask> mask, const ComputeT<T>* factors, T* dx) {
    RunOnComputeTypes(ctx, dy, g.out_pixels() * g.out_channels, filters, FilterCount(g), dx, g.in_pixels() * g.in_channels,
        [&](const auto* a, const auto* b, auto* out) {
          MaskedConv2DGradInput(g, a, b, mask, factors, out, IntraOpParallelFor(ctx));
        });
  }
  template <typename T, typename Mask>
  static void GradFilter(OpKernelContext* ctx, const Conv2DGeometry& g, const T* x, const T* dy,
                         MaskView<Mask> mask, const ComputeT<T>* factors, T* dfilters) {
    RunOnComputeTypes(ctx, x, g.in_pixels() * g.in_channels, dy, g.out_pixels() * g.out_channels, dfilters, FilterCount(g),
        [&](const auto* a, const auto* b, auto* out) {
          MaskedConv2DGradFilter(g, a, b, mask, factors, out, IntraOpParallelFor(ctx));
        });
  }

  static int64_t FilterCount(const Conv2DGeometry& g) { return g.taps() * g.in_channels * g.out_channels; }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER_CPU(T, Mask) MASKED_OPS_REGISTER_CONV2D(::tensorflow::DEVICE_CPU, CpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_TF_TYPE_PAIR(MASKED_OPS_REGISTER_CPU)

#undef MASKED_OPS_REGISTER_CPU

}  // namespace masked_ops
