// CPU OpKernels for masked_matmul and its gradients: validate every input,
// allocate outputs, dispatch to the framework-free kernels.
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "cc/tf/validation.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace masked_ops {
namespace {

int64_t LastDim(const Tensor& t) { return t.dim_size(t.dims() - 1); }

// Product of all dimensions but the last. It fits in int64: TensorShape keeps
// every prefix product of a live tensor's dimensions in range.
int64_t LeadingRows(const TensorShape& shape) {
  int64_t rows = 1;
  for (int d = 0; d + 1 < shape.dims(); ++d) rows *= shape.dim_size(d);
  return rows;
}

// `shape` with its last dimension replaced; fails instead of overflowing.
absl::Status WithLastDim(const TensorShape& shape, int64_t last, TensorShape* out) {
  *out = TensorShape();
  for (int d = 0; d + 1 < shape.dims(); ++d) TF_RETURN_IF_ERROR(out->AddDimWithStatus(shape.dim_size(d)));
  return out->AddDimWithStatus(last);
}

// Shared by the three ops: the block attrs, and the mask checked against the
// weight's [k, n].
template <typename T, typename Mask>
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
    return MatmulShape{m, k, n, block_rows_, block_cols_};
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
};

template <typename T, typename Mask>
class MaskedMatmulOp : public MaskedMatmulKernelBase<T, Mask> {
 public:
  using Base = MaskedMatmulKernelBase<T, Mask>;
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
    OP_REQUIRES_OK(ctx, WithLastDim(x.shape(), n, &y_shape));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape, &y));
    RunKernel(ctx, [&] {
      MaskedMatmul<T>(this->Shape(LeadingRows(x.shape()), k, n), x.flat<T>().data(),
                      w.flat<T>().data(), mask_view, y->flat<T>().data(), IntraOpParallelFor(ctx));
    });
  }
};

template <typename T, typename Mask>
class MaskedMatmulGradInputOp : public MaskedMatmulKernelBase<T, Mask> {
 public:
  using Base = MaskedMatmulKernelBase<T, Mask>;
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
    OP_REQUIRES_OK(ctx, WithLastDim(dy.shape(), k, &dx_shape));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dx_shape, &dx));
    RunKernel(ctx, [&] {
      MaskedMatmulGradInput<T>(this->Shape(LeadingRows(dy.shape()), k, n), dy.flat<T>().data(),
                               w.flat<T>().data(), mask_view, dx->flat<T>().data(),
                               IntraOpParallelFor(ctx));
    });
  }
};

template <typename T, typename Mask>
class MaskedMatmulGradWeightOp : public MaskedMatmulKernelBase<T, Mask> {
 public:
  using Base = MaskedMatmulKernelBase<T, Mask>;
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
    Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({k, n}), &dw));
    RunKernel(ctx, [&] {
      MaskedMatmulGradWeight<T>(this->Shape(LeadingRows(x.shape()), k, n), x.flat<T>().data(),
                                dy.flat<T>().data(), mask_view, dw->flat<T>().data(),
                                IntraOpParallelFor(ctx));
    });
  }
};

}  // namespace

// REGISTER_KERNEL_BUILDER needs the builder spelled exactly `Name(...)`.
using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER(OP_NAME, KERNEL, T, Mask)                                  \
  REGISTER_KERNEL_BUILDER(Name(OP_NAME)                                                \
                              .Device(::tensorflow::DEVICE_CPU)                        \
                              .TypeConstraint<T>("T")                                  \
                              .TypeConstraint<TfMaskType<Mask>::type>("Tmask"),        \
                          KERNEL<T, Mask>);

#define MASKED_OPS_REGISTER_ALL(T, Mask)                                                       \
  MASKED_OPS_REGISTER("MaskedOps>MaskedMatmul", MaskedMatmulOp, T, Mask)                       \
  MASKED_OPS_REGISTER("MaskedOps>MaskedMatmulGradInput", MaskedMatmulGradInputOp, T, Mask)     \
  MASKED_OPS_REGISTER("MaskedOps>MaskedMatmulGradWeight", MaskedMatmulGradWeightOp, T, Mask)

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_REGISTER_ALL)

#undef MASKED_OPS_REGISTER_ALL
#undef MASKED_OPS_REGISTER

}  // namespace masked_ops
