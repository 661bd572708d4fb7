// The masked_matmul OpKernels, device-generic: they validate every input,
// allocate outputs and hand the products to a Backend (the CPU kernels in
// masked_matmul_kernels.cc, the CUDA kernels in masked_matmul_gpu_kernels.cc).
#ifndef MASKED_OPS_CC_TF_MASKED_MATMUL_KERNELS_H_
#define MASKED_OPS_CC_TF_MASKED_MATMUL_KERNELS_H_

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "cc/tf/validation.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace masked_ops {
namespace matmul_kernels {


inline int64_t LastDim(const Tensor& t) { return t.dim_size(t.dims() - 1); }

// Product of all dimensions but the last. It fits in int64: TensorShape keeps
// every prefix product of a live tensor's dimensions in range.
inline int64_t LeadingRows(const TensorShape& shape) {
  int64_t rows = 1;
  for (int d = 0; d + 1 < shape.dims(); ++d) rows *= shape.dim_size(d);
  return rows;
}

// `shape` with its last dimension replaced: the output called `name`.
inline absl::Status WithLastDim(absl::string_view name, const TensorShape& shape, int64_t last, TensorShape* out) {
  const auto sizes = shape.dim_sizes();
  std::vector<int64_t> dims(sizes.begin(), sizes.end());
  dims.back() = last;
  return OutputShape(name, dims, out);
}

// Shared by the three ops: the block attrs, and the mask checked against the
// weight's [k, n]. Backend runs the products on its device:
//   Backend::Forward / GradInput / GradWeight<T, Mask>(ctx, shape, first,
//   second, mask view, out), with the pointers of the op's tensors.
template <typename Backend, typename T, typename Mask>
class MaskedMatmulKernelBase : public OpKernel {
 protected:
  using TfMask = typename TfMaskType<Mask>::type;

  explicit MaskedMatmulKernelBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_rows", &block_rows_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_cols", &block_cols_));
  }

  absl::Status ViewMask(const Tensor& mask, int64_t k, int64_t n, MaskView<Mask>* view) const {
    MaskLevel level;
    TF_RETURN_IF_ERROR(ResolveMaskLevel("mask", mask.shape().DebugString(), mask.dims(),
                                        mask.dims() == 2 ? mask.dim_size(0) : 0,
                                        mask.dims() == 2 ? mask.dim_size(1) : 0,
                                        BlockGrid{k, n, block_rows_, block_cols_}, &level));
    *view = MaskView<Mask>{reinterpret_cast<const Mask*>(mask.flat<TfMask>().data()), level};
    return absl::OkStatus();
  }

  MatmulShape Shape(int64_t m, int64_t k, int64_t n) const {
    const BlockGrid grid = BlockGrid{k, n, block_rows_, block_cols_}.Clamped();
    return MatmulShape{m, k, n, grid.block_rows, grid.block_cols};
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
};

template <typename Backend, typename T, typename Mask>
class MaskedMatmulOp : public MaskedMatmulKernelBase<Backend, T, Mask> {
 public:
  using Base = MaskedMatmulKernelBase<Backend, T, Mask>;
  explicit MaskedMatmulOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& mask = ctx->input(2);
    OP_REQUIRES_OK(ctx, RequireRank(x, "x", "[..., k]", 1, true));
    OP_REQUIRES_OK(ctx, RequireRank(w, "w", "[k, n]", 2, false));
    const int64_t k = w.dim_size(0);
    const int64_t n = w.dim_size(1);
    OP_REQUIRES_OK(ctx, CheckDimsEqual("x's last dimension must equal w's first", LastDim(x), k,
                                       x.shape().DebugString(), w.shape().DebugString()));
    MaskView<Mask> mask_view;
    OP_REQUIRES_OK(ctx, this->ViewMask(mask, k, n, &mask_view));
    TensorShape y_shape;
    OP_REQUIRES_OK(ctx, WithLastDim("y", x.shape(), n, &y_shape));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape, &y));
    Backend::template Forward<T, Mask>(ctx, this->Shape(LeadingRows(x.shape()), k, n), x.flat<T>().data(),
                                       w.flat<T>().data(), mask_view, y->flat<T>().data());
  }
};

template <typename Backend, typename T, typename Mask>
class MaskedMatmulGradInputOp : public MaskedMatmulKernelBase<Backend, T, Mask> {
 public:
  using Base = MaskedMatmulKernelBase<Backend, T, Mask>;
  explicit MaskedMatmulGradInputOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& mask = ctx->input(2);
    OP_REQUIRES_OK(ctx, RequireRank(dy, "dy", "[..., n]", 1, true));
    OP_REQUIRES_OK(ctx, RequireRank(w, "w", "[k, n]", 2, false));
    const int64_t k = w.dim_size(0);
    const int64_t n = w.dim_size(1);
    OP_REQUIRES_OK(ctx, CheckDimsEqual("dy's last dimension must equal w's second", LastDim(dy),
                                       n, dy.shape().DebugString(), w.shape().DebugString()));
    MaskView<Mask> mask_view;
    OP_REQUIRES_OK(ctx, this->ViewMask(mask, k, n, &mask_view));
    TensorShape dx_shape;
    OP_REQUIRES_OK(ctx, WithLastDim("dx", dy.shape(), k, &dx_shape));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dx_shape, &dx));
    Backend::template GradInput<T, Mask>(ctx, this->Shape(LeadingRows(dy.shape()), k, n),
                                         dy.flat<T>().data(), w.flat<T>().data(), mask_view,
                                         dx->flat<T>().data());
  }
};

template <typename Backend, typename T, typename Mask>
class MaskedMatmulGradWeightOp : public MaskedMatmulKernelBase<Backend, T, Mask> {
 public:
  using Base = MaskedMatmulKernelBase<Backend, T, Mask>;
  explicit MaskedMatmulGradWeightOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    const Tensor& mask = ctx->input(2);
    OP_REQUIRES_OK(ctx, RequireRank(x, "x", "[..., k]", 1, true));
    OP_REQUIRES_OK(ctx, RequireRank(dy, "dy", "[..., n]", 1, true));
    bool same_leading = x.dims() == dy.dims();
    for (int d = 0; same_leading && d + 1 < x.dims(); ++d) {
      same_leading = x.dim_size(d) == dy.dim_size(d);
    }
    OP_REQUIRES(ctx, same_leading,
                absl::InvalidArgumentError(absl::StrCat(
                    "x and dy must have the same leading dimensions, got shapes ",
                    x.shape().DebugString(), " and ", dy.shape().DebugString())));
    const int64_t k = LastDim(x);
    const int64_t n = LastDim(dy);
    MaskView<Mask> mask_view;
    OP_REQUIRES_OK(ctx, this->ViewMask(mask, k, n, &mask_view));
    TensorShape dw_shape;
    OP_REQUIRES_OK(ctx, OutputShape("dw", {k, n}, &dw_shape));
    Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dw_shape, &dw));
    Backend::template GradWeight<T, Mask>(ctx, this->Shape(LeadingRows(x.shape()), k, n),
                                          x.flat<T>().data(), dy.flat<T>().data(), mask_view,
                                          dw->flat<T>().data());
  }
};

}  // namespace matmul_kernels

// Registers the three ops for DEVICE, element type T and mask type Mask, run
// by BACKEND. REGISTER_KERNEL_BUILDER needs the builder spelled exactly
// `Name(...)`: the including file says `using
// ::tensorflow::register_kernel::Name;`.
#define MASKED_OPS_REGISTER_MATMUL(DEVICE, BACKEND, T, Mask)                                       \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskedMatmul")             \
                              .Device(DEVICE)                                                        \
                              .TypeConstraint<T>("T")                                                \
                              .TypeConstraint<::masked_ops::TfMaskType<Mask>::type>("Tmask"),        \
                          ::masked_ops::matmul_kernels::MaskedMatmulOp<BACKEND, T, Mask>);           \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskedMatmulGradInput")    \
                              .Device(DEVICE)                                                        \
                              .TypeConstraint<T>("T")                                                \
                              .TypeConstraint<::masked_ops::TfMaskType<Mask>::type>("Tmask"),        \
                          ::masked_ops::matmul_kernels::MaskedMatmulGradInputOp<BACKEND, T, Mask>);  \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskedMatmulGradWeight")   \
                              .Device(DEVICE)                                                        \
                              .TypeConstraint<T>("T")                                                \
                              .TypeConstraint<::masked_ops::TfMaskType<Mask>::type>("Tmask"),        \
                          ::masked_ops::matmul_kernels::MaskedMatmulGradWeightOp<BACKEND, T, Mask>);

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_MASKED_MATMUL_KERNELS_H_
