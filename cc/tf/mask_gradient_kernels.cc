// CPU OpKernel for MaskGradient: validate, reuse grad's buffer when it may,
// dispatch to the framework-free kernel.
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/mask_gradient.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace masked_ops {
namespace {

template <typename T, typename Mask>
class MaskGradientOp : public OpKernel {
 public:
  using TfMask = typename TfMaskType<Mask>::type;

  explicit MaskGradientOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_rows", &block_rows_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_cols", &block_cols_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& mask = ctx->input(1);
    OP_REQUIRES_OK(ctx, RequireRank(grad, "grad", "[..., k, n] or [n]", 1, true));
    const int dims = grad.dims();
    const int64_t n = grad.dim_size(dims - 1);
    const int64_t k = dims >= 2 ? grad.dim_size(dims - 2) : 1;
    const BlockGrid grid{k, n, block_rows_, block_cols_};
    MaskLevel level;
    if (mask.shape() == grad.shape()) {
      level = MaskLevel::kElement;
    } else if (mask.dims() == 2 && mask.dim_size(0) == grid.grid_rows() &&
               mask.dim_size(1) == grid.grid_cols()) {
      level = MaskLevel::kBlock;
    } else {
      ctx->CtxFailure(absl::InvalidArgumentError(absl::StrCat(
          "mask must be element-level (grad's shape ", grad.shape().DebugString(),
          ") or block-level [ceil(", k, "/", block_rows_, "), ceil(", n, "/", block_cols_,
          ")] = [", grid.grid_rows(), ", ", grid.grid_cols(), "], but mask has shape ",
          mask.shape().DebugString())));
      return;
    }
    Tensor* masked = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, grad.shape(), &masked));
    const int64_t outer = k * n == 0 ? 0 : grad.NumElements() / (k * n);
    RunKernel(ctx, [&] {
      MaskGradient<T>(outer, grid, grad.flat<T>().data(),
                      MaskView<Mask>{reinterpret_cast<const Mask*>(mask.flat<TfMask>().data()), level},
                      masked->flat<T>().data(), IntraOpParallelFor(ctx));
    });
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER(T, Mask)                                            \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskGradient")                        \
                              .Device(::tensorflow::DEVICE_CPU)                 \
                              .TypeConstraint<T>("T")                           \
                              .TypeConstraint<TfMaskType<Mask>::type>("Tmask"), \
                          MaskGradientOp<T, Mask>);

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_REGISTER)

#undef MASKED_OPS_REGISTER

}  // namespace masked_ops
