// CPU OpKernels for the block-masked elementwise ops: validate, dispatch to
// the framework-free kernels.
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace masked_ops {
namespace {

// A tensor as stacked k x n matrices with its mask checked against it.
template <typename Mask>
struct MatrixStack {
  int64_t outer = 0;
  BlockGrid grid{0, 0, 1, 1};
  MaskView<Mask> mask{nullptr, MaskLevel::kElement};
};

template <typename Mask>
absl::Status ViewMaskedStack(const Tensor& mask, const TensorShape& target, absl::string_view target_name,
                             int64_t block_rows, int64_t block_cols, MatrixStack<Mask>* stack) {
  using TfMask = typename TfMaskType<Mask>::type;
  const int dims = target.dims();
  if (dims < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(target_name, " must have rank >= 1, got shape ", target.DebugString()));
  }
  const int64_t n = target.dim_size(dims - 1);
  const int64_t k = dims >= 2 ? target.dim_size(dims - 2) : 1;
  stack->grid = BlockGrid{k, n, block_rows, block_cols};
  MaskLevel level;
  if (mask.shape() == target) {
    level = MaskLevel::kElement;
  } else if (mask.dims() == 2 && mask.dim_size(0) == stack->grid.grid_rows() &&
             mask.dim_size(1) == stack->grid.grid_cols()) {
    level = MaskLevel::kBlock;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "mask must be element-level (", target_name, "'s shape ", target.DebugString(),
        ") or block-level [ceil(", k, "/", block_rows, "), ceil(", n, "/", block_cols, ")] = [",
        stack->grid.grid_rows(), ", ", stack->grid.grid_cols(), "], but mask has shape ",
        mask.shape().DebugString()));
  }
  stack->outer = k * n == 0 ? 0 : target.num_elements() / (k * n);
  stack->mask = MaskView<Mask>{reinterpret_cast<const Mask*>(mask.flat<TfMask>().data()), level};
  return absl::OkStatus();
}

template <typename T, typename Mask>
class MaskGradientOp : public OpKernel {
 public:
  explicit MaskGradientOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_rows", &block_rows_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_cols", &block_cols_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    MatrixStack<Mask> stack;
    OP_REQUIRES_OK(ctx, ViewMaskedStack(ctx->input(1), grad.shape(), "grad", block_rows_, block_cols_, &stack));
    Tensor* masked = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, grad.shape(), &masked));
    RunKernel(ctx, [&] {
      MaskGradient<T>(stack.outer, stack.grid, grad.flat<T>().data(), stack.mask,
                      masked->flat<T>().data(), IntraOpParallelFor(ctx));
    });
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
};

template <typename T, typename Mask>
class MaskedUpdateVariableOp : public OpKernel {
 public:
  explicit MaskedUpdateVariableOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_rows", &block_rows_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_cols", &block_cols_));
    std::string mode;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("mode", &mode));
    mode_ = mode == "assign" ? UpdateMode::kAssign : mode == "add" ? UpdateMode::kAdd : UpdateMode::kSub;
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& value = ctx->input(1);
    tensorflow::core::RefCountPtr<tensorflow::Var> variable;
    OP_REQUIRES_OK(ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0), &variable));
    tensorflow::mutex_lock lock(*variable->mu());
    Tensor* current = variable->tensor();
    OP_REQUIRES(ctx, current->IsInitialized(),
                absl::FailedPreconditionError("the variable is not initialized"));
    OP_REQUIRES(ctx, current->dtype() == value.dtype(),
                absl::InvalidArgumentError(absl::StrCat(
                    "value's dtype ", tensorflow::DataTypeString(value.dtype()),
                    " differs from the variable's ", tensorflow::DataTypeString(current->dtype()))));
    OP_REQUIRES(ctx, current->shape() == value.shape(),
                absl::InvalidArgumentError(absl::StrCat(
                    "value must have the variable's shape ", current->shape().DebugString(),
                    ", got ", value.shape().DebugString())));
    MatrixStack<Mask> stack;
    OP_REQUIRES_OK(ctx, ViewMaskedStack(ctx->input(2), current->shape(), "the variable", block_rows_,
                                        block_cols_, &stack));
    // A buffer that a read still shares is copied first, as TensorFlow's own
    // in-place updates do, so the update never shows through an earlier read.
    if (variable->copy_on_read_mode.load() || !current->RefCountIsOne()) {
      Tensor copy;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(current->dtype(), current->shape(), &copy));
      if (current->TotalBytes() > 0) {
        std::memcpy(copy.data(), current->data(), current->TotalBytes());
      }
      *current = copy;
    }
    RunKernel(ctx, [&] {
      MaskedUpdate<T>(stack.outer, stack.grid, stack.mask, mode_, value.flat<T>().data(),
                      current->flat<T>().data(), IntraOpParallelFor(ctx));
    });
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
  UpdateMode mode_ = UpdateMode::kAssign;
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER(T, Mask)                                                     \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskGradient")                                 \
                              .Device(::tensorflow::DEVICE_CPU)                          \
                              .TypeConstraint<T>("T")                                    \
                              .TypeConstraint<TfMaskType<Mask>::type>("Tmask"),          \
                          MaskGradientOp<T, Mask>);                                      \
  REGISTER_KERNEL_BUILDER(Name("MaskedOps>MaskedUpdateVariable")                         \
                              .Device(::tensorflow::DEVICE_CPU)                          \
                              .TypeConstraint<T>("T")                                    \
                              .TypeConstraint<TfMaskType<Mask>::type>("Tmask"),          \
                          MaskedUpdateVariableOp<T, Mask>);

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_REGISTER)

#undef MASKED_OPS_REGISTER

}  // namespace masked_ops
