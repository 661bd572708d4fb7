// The masked_conv2d OpKernels, device-generic: they validate every input,
// allocate outputs and hand the products to a Backend (the CPU kernels in
// masked_conv2d_kernels.cc, the CUDA kernels in masked_conv2d_gpu_kernels.cc).
#ifndef MASKED_OPS_CC_TF_MASKED_CONV2D_KERNELS_H_
#define MASKED_OPS_CC_TF_MASKED_CONV2D_KERNELS_H_

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cc/kernels/masked_conv2d.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/tf/conv_validation.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"

namespace masked_ops {
namespace conv_kernels {

inline void Dims4(const Tensor& t, int64_t dims[4]) {
  for (int d = 0; d < 4; ++d) dims[d] = t.dim_size(d);
}

// Shared by the three ops: attributes, and x, filters and both masks checked
// against each other. Inputs: x 0, filters 1, mask 2, output_mask 3 (dy 4).
// Backend runs the products on its device:
//   Backend::Factor<T>: the element type of output-mask factors it takes;
//   Backend::ConvertOutputMask<T>(ctx, output_mask, storage, &factors);
//   Backend::Forward / GradInput / GradFilter<T, Mask>(ctx, geometry, first,
//   second, mask view, factors, out).
template <typename Backend, typename T, typename Mask>
class MaskedConv2DKernelBase : public OpKernel {
 protected:
  using TfMask = typename TfMaskType<Mask>::type;

  explicit MaskedConv2DKernelBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadConv2DOptions(ctx, &options_));
  }

  // Everything a kernel call needs, valid once Prepare returns OK.
  struct Prepared {
    Conv2DGeometry geometry;
    MaskView<Mask> mask;
    Tensor output_factors_tensor;
    // See OutputMaskFactors; null without an output mask.
    const typename Backend::template Factor<T>* output_factors = nullptr;
  };

  absl::Status Prepare(OpKernelContext* ctx, Prepared* prepared) const {
    const Tensor& x = ctx->input(0);
    const Tensor& filters = ctx->input(1);
    const Tensor& mask = ctx->input(2);
    const Tensor& output_mask = ctx->input(3);
    TF_RETURN_IF_ERROR(RequireRank(x, "x", "[batch, height, width, channels]", 4, false));
    TF_RETURN_IF_ERROR(RequireRank(filters, "filters",
                                   "[height, width, in_channels, out_channels]", 4, false));
    int64_t x_dims[4];
    int64_t filter_dims[4];
    Dims4(x, x_dims);
    Dims4(filters, filter_dims);
    Conv2DGeometry& g = prepared->geometry;
    TF_RETURN_IF_ERROR(MakeConv2DGeometry(options_, x_dims, filter_dims, x.shape().DebugString(),
                                          filters.shape().DebugString(), &g));
    MaskLevel level;
    // dim_sizes() is a copy: begin and end must come from the same one.
    const auto mask_dims = mask.shape().dim_sizes();
    TF_RETURN_IF_ERROR(ResolveConvMaskLevel(mask.shape().DebugString(), mask.dims(),
                                            mask_dims.data(), g, &level));
    prepared->mask = MaskView<Mask>{reinterpret_cast<const Mask*>(mask.flat<TfMask>().data()), level};
    const auto output_mask_dims = output_mask.shape().dim_sizes();
    TF_RETURN_IF_ERROR(CheckOutputMaskShape(output_mask.shape().DebugString(), output_mask.dims(),
                                            output_mask_dims.data(), output_mask.NumElements(),
                                            g, options_.use_output_mask));
    g.in_block = ClampBlock(g.in_block, g.in_channels);
    g.out_block = ClampBlock(g.out_block, g.out_channels);
    g.tile_h = ClampBlock(g.tile_h, g.out_h);
    g.tile_w = ClampBlock(g.tile_w, g.out_w);
    if (options_.use_output_mask) {
      TF_RETURN_IF_ERROR(Backend::template ConvertOutputMask<T>(ctx, output_mask, &prepared->output_factors_tensor,
                                                                &prepared->output_factors));
    }
    return absl::OkStatus();
  }

  // dy (input 4) must have the forward output's shape.
  static absl::Status CheckDy(const Tensor& dy, const Conv2DGeometry& g) {
    const bool matches = dy.dims() == 4 && dy.dim_size(0) == g.batch && dy.dim_size(1) == g.out_h &&
                         dy.dim_size(2) == g.out_w && dy.dim_size(3) == g.out_channels;
    if (matches) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "dy must have the output's shape [", g.batch, ", ", g.out_h, ", ", g.out_w, ", ",
        g.out_channels, "], but has shape ", dy.shape().DebugString()));
  }

 private:
  Conv2DOptions options_;
};

template <typename Backend, typename T, typename Mask>
class MaskedConv2DOp : public MaskedConv2DKernelBase<Backend, T, Mask> {
 public:
  using Base = MaskedConv2DKernelBase<Backend, T, Mask>;
  explicit MaskedConv2DOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    typename Base::Prepared prepared;
    OP_REQUIRES_OK(ctx, this->Prepare(ctx, &prepared));
    const Conv2DGeometry& g = prepared.geometry;
    TensorShape y_shape;
    OP_REQUIRES_OK(ctx, OutputShape("y", {g.batch, g.out_h, g.out_w, g.out_channels}, &y_shape));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape, &y));
    Backend::template Forward<T, Mask>(ctx, g, ctx->input(0).flat<T>().data(), ctx->input(1).flat<T>().data(),
                                       prepared.mask, prepared.output_factors, y->flat<T>().data());
  }
};

template <typename Backend, typename T, typename Mask>
class MaskedConv2DGradInputOp : public MaskedConv2DKernelBase<Backend, T, Mask> {
 public:
  using Base = MaskedConv2DKernelBase<Backend, T, Mask>;
  explicit MaskedConv2DGradInputOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    typename Base::Prepared prepared;
    OP_REQUIRES_OK(ctx, this->Prepare(ctx, &prepared));
    const Tensor& dy = ctx->input(4);
    OP_REQUIRES_OK(ctx, Base::CheckDy(dy, prepared.geometry));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dx));
    Backend::template GradInput<T, Mask>(ctx, prepared.geometry, dy.flat<T>().data(),
                                         ctx->input(1).flat<T>().data(), prepared.mask,
                                         prepared.output_factors, dx->flat<T>().data());
  }
};

template <typename Backend, typename T, typename Mask>
class MaskedConv2DGradFilterOp : public MaskedConv2DKernelBase<Backend, T, Mask> {
 public:
  using Base = MaskedConv2DKernelBase<Backend, T, Mask>;
  explicit MaskedConv2DGradFilterOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    typename Base::Prepared prepared;
    OP_REQUIRES_OK(ctx, this->Prepare(ctx, &prepared));
    const Tensor& dy = ctx->input(4);
    OP_REQUIRES_OK(ctx, Base::CheckDy(dy, prepared.geometry));
    Tensor* dfilters = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(1).shape(), &dfilters));
    Backend::template GradFilter<T, Mask>(ctx, prepared.geometry, ctx->input(0).flat<T>().data(),
                                          dy.flat<T>().data(), prepared.mask, prepared.output_factors,
                                          dfilters->flat<T>().data());
  }
};

}  // namespace conv_kernels

// Registers the three ops for DEVICE, element type T and mask type Mask, run
// by BACKEND; Toutput_mask is left unconstrained (the backend dispatches on
// it). The including file says `using ::tensorflow::register_kernel::Name;`
// (REGISTER_KERNEL_BUILDER needs the builder spelled `Name(...)`).
#define MASKED_OPS_REGISTER_CONV2D(DEVICE, BACKEND, T, Mask)                                      \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskedConv2D")                                            \
                              .Device(DEVICE)                                                        \
                              .TypeConstraint<T>("T")                                                \
                              .TypeConstraint<::masked_ops::TfMaskType<Mask>::type>("Tmask"),        \
                          ::masked_ops::conv_kernels::MaskedConv2DOp<BACKEND, T, Mask>);             \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskedConv2DGradInput")                                   \
                              .Device(DEVICE)                                                        \
                              .TypeConstraint<T>("T")                                                \
                              .TypeConstraint<::masked_ops::TfMaskType<Mask>::type>("Tmask"),        \
                          ::masked_ops::conv_kernels::MaskedConv2DGradInputOp<BACKEND, T, Mask>);    \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskedConv2DGradFilter")                                  \
                              .Device(DEVICE)                                                        \
                              .TypeConstraint<T>("T")                                                \
                              .TypeConstraint<::masked_ops::TfMaskType<Mask>::type>("Tmask"),        \
                          ::masked_ops::conv_kernels::MaskedConv2DGradFilterOp<BACKEND, T, Mask>);

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_MASKED_CONV2D_KERNELS_H_
