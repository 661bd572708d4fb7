// The OpKernels of the block-masked elementwise ops, device-generic: they
// validate, lock and unshare resource variables, point at the scalar inputs
// where they are stored and hand the work to a Backend (CPU: block_elementwise_kernels.cc; GPU:
// block_elementwise_gpu_kernels.cc). A Backend provides
//   CopyBytes(ctx, from, to, bytes) -> Status         device memory copy;
//   MaskGradient / MaskedUpdate / AdamStep / SgdStep / RmspropStep<T, Mask>
//   (ctx, MatrixStack, ...)                           the kernels.
#ifndef MASKED_OPS_CC_TF_BLOCK_ELEMENTWISE_KERNELS_H_
#define MASKED_OPS_CC_TF_BLOCK_ELEMENTWISE_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/block_mask.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace masked_ops {
namespace elementwise_kernels {

// A tensor as stacked k x n matrices with its mask checked against it.
template <typename Mask>
struct MatrixStack {
  int64_t outer = 0;
  BlockGrid grid{0, 0, 1, 1};
  MaskView<Mask> mask{nullptr, MaskLevel::kElement};
};

template <typename Mask>
inline absl::Status ViewMaskedStack(const Tensor& mask, const TensorShape& target, absl::string_view target_name,
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
  stack->grid = stack->grid.Clamped();
  // An empty target may have dimensions whose product overflows ([0, 2^40, 2^40]).
  stack->outer = target.num_elements() == 0 ? 0 : target.num_elements() / (k * n);
  stack->mask = MaskView<Mask>{reinterpret_cast<const Mask*>(mask.flat<TfMask>().data()), level};
  return absl::OkStatus();
}

template <typename Backend, typename T, typename Mask>
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
    Backend::template MaskGradient<T, Mask>(ctx, stack, grad.flat<T>().data(), masked->flat<T>().data());
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
};

// Resource variables updated in place by one op: looked up, locked (each
// mutex once, in address order, so two ops never wait on each other), checked
// against the gradient, and given buffers no earlier read still shares.
template <typename Backend>
class LockedVariables {
 public:
  // inputs[i] is the op input of the variable called names[i]; each must
  // have the dtype and shape of `grad` (called grad_name).
  absl::Status Lock(OpKernelContext* ctx, const std::vector<int>& inputs,
                    const std::vector<absl::string_view>& names, const Tensor& grad,
                    absl::string_view grad_name = "grad") {
    for (const int input : inputs) {
      tensorflow::core::RefCountPtr<tensorflow::Var> variable;
      TF_RETURN_IF_ERROR(tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, input), &variable));
      variables_.push_back(std::move(variable));
    }
    std::vector<tensorflow::mutex*> mutexes;
    for (const auto& variable : variables_) mutexes.push_back(variable->mu());
    std::sort(mutexes.begin(), mutexes.end());
    mutexes.erase(std::unique(mutexes.begin(), mutexes.end()), mutexes.end());
    for (tensorflow::mutex* mu : mutexes) locks_.emplace_back(*mu);
    for (size_t index = 0; index < variables_.size(); ++index) {
      Tensor* tensor = variables_[index]->tensor();
      const absl::string_view name = names[index];
      if (!tensor->IsInitialized()) {
        return absl::FailedPreconditionError(absl::StrCat(name, " is not initialized"));
      }
      if (tensor->dtype() != grad.dtype() || tensor->shape() != grad.shape()) {
        return absl::InvalidArgumentError(absl::StrCat(
            name, " must have ", grad_name, "'s dtype and shape ", tensorflow::DataTypeString(grad.dtype()),
            " ", grad.shape().DebugString(), ", got ", tensorflow::DataTypeString(tensor->dtype()), " ",
            tensor->shape().DebugString()));
      }
      TF_RETURN_IF_ERROR(Unshare(ctx, variables_[index].get()));
    }
    return absl::OkStatus();
  }

  template <typename T>
  T* data(size_t index) const {
    return variables_[index]->tensor()->template flat<T>().data();
  }

 private:
  static absl::Status Unshare(OpKernelContext* ctx, tensorflow::Var* variable) {
    Tensor* tensor = variable->tensor();
    if (!variable->copy_on_read_mode.load() && tensor->RefCountIsOne()) return absl::OkStatus();
    Tensor copy;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensor->dtype(), tensor->shape(), &copy));
    if (tensor->TotalBytes() > 0) {
      TF_RETURN_IF_ERROR(Backend::CopyBytes(ctx, tensor->data(), copy.data(), tensor->TotalBytes()));
    }
    *tensor = copy;
    return absl::OkStatus();
  }

  std::vector<tensorflow::core::RefCountPtr<tensorflow::Var>> variables_;
  std::vector<tensorflow::mutex_lock> locks_;
};

// Inputs: the variable (resource), value, mask.
template <typename Backend, typename T, typename Mask>
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
    LockedVariables<Backend> variables;
    OP_REQUIRES_OK(ctx, variables.Lock(ctx, {0}, {"the variable"}, value, "value"));
    MatrixStack<Mask> stack;
    OP_REQUIRES_OK(ctx, ViewMaskedStack(ctx->input(2), value.shape(), "the variable", block_rows_, block_cols_,
                                        &stack));
    Backend::template MaskedUpdate<T, Mask>(ctx, stack, mode_, value.flat<T>().data(),
                                            variables.template data<T>(0));
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
  UpdateMode mode_ = UpdateMode::kAssign;
};

// Where the scalar input `input`, of the op's type T, is stored: in the
// memory of the op's device, where the backend's kernels read it (on a GPU,
// so that a step whose scalars were computed there waits for no copy).
template <typename T>
inline absl::Status ScalarInput(OpKernelContext* ctx, int input, absl::string_view name, const T** scalar) {
  const Tensor& tensor = ctx->input(input);
  if (!tensorflow::TensorShapeUtils::IsScalar(tensor.shape())) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be a scalar, got shape ", tensor.shape().DebugString()));
  }
  *scalar = tensor.scalar<T>().data();
  return absl::OkStatus();
}

// The scalar inputs from `first` on, in order, each named for its error.
template <typename T>
inline absl::Status ScalarInputs(OpKernelContext* ctx, int first,
                                 std::initializer_list<std::pair<absl::string_view, const T**>> scalars) {
  int input = first;
  for (const auto& [name, scalar] : scalars) TF_RETURN_IF_ERROR(ScalarInput<T>(ctx, input++, name, scalar));
  return absl::OkStatus();
}

// Shared by the optimizer steps: the block attrs, and the mask checked
// against the gradient.
template <typename Mask>
class MaskedStepKernel : public OpKernel {
 protected:
  explicit MaskedStepKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_rows", &block_rows_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_cols", &block_cols_));
  }

  absl::Status ViewGrad(OpKernelContext* ctx, int grad_input, MatrixStack<Mask>* stack) const {
    return ViewMaskedStack(ctx->input(grad_input + 1), ctx->input(grad_input).shape(), "grad", block_rows_,
                           block_cols_, stack);
  }

 private:
  int64_t block_rows_ = 0;
  int64_t block_cols_ = 0;
};

template <typename Backend, typename T, typename Mask>
class MaskedAdamStepOp : public MaskedStepKernel<Mask> {
 public:
  explicit MaskedAdamStepOp(OpKernelConstruction* ctx) : MaskedStepKernel<Mask>(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("amsgrad", &amsgrad_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(4);
    MatrixStack<Mask> stack;
    OP_REQUIRES_OK(ctx, this->ViewGrad(ctx, 4, &stack));
    AdamStep<const T*> step;
    step.amsgrad = amsgrad_;
    OP_REQUIRES_OK(ctx, ScalarInputs<T>(ctx, 6,
                                        {{"alpha", &step.alpha},
                                         {"one_minus_beta_1", &step.one_minus_beta_1},
                                         {"one_minus_beta_2", &step.one_minus_beta_2},
                                         {"epsilon", &step.epsilon},
                                         {"learning_rate", &step.learning_rate},
                                         {"weight_decay", &step.weight_decay}}));
    LockedVariables<Backend> variables;
    OP_REQUIRES_OK(ctx, amsgrad_ ? variables.Lock(ctx, {0, 1, 2, 3}, {"variable", "m", "v", "v_hat"}, grad)
                                 : variables.Lock(ctx, {0, 1, 2}, {"variable", "m", "v"}, grad));
    Backend::template AdamStep<T, Mask>(ctx, stack, grad.flat<T>().data(), step, variables.template data<T>(0),
                                        variables.template data<T>(1), variables.template data<T>(2),
                                        amsgrad_ ? variables.template data<T>(3) : nullptr);
  }

 private:
  bool amsgrad_ = false;
};

template <typename Backend, typename T, typename Mask>
class MaskedSgdStepOp : public MaskedStepKernel<Mask> {
 public:
  explicit MaskedSgdStepOp(OpKernelConstruction* ctx) : MaskedStepKernel<Mask>(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_momentum", &use_momentum_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(2);
    MatrixStack<Mask> stack;
    OP_REQUIRES_OK(ctx, this->ViewGrad(ctx, 2, &stack));
    SgdStep<const T*> step;
    step.nesterov = nesterov_;
    OP_REQUIRES_OK(ctx, ScalarInputs<T>(ctx, 4,
                                        {{"learning_rate", &step.learning_rate},
                                         {"momentum_factor", &step.momentum},
                                         {"weight_decay", &step.weight_decay}}));
    LockedVariables<Backend> variables;
    OP_REQUIRES_OK(ctx, use_momentum_ ? variables.Lock(ctx, {0, 1}, {"variable", "momentum"}, grad)
                                      : variables.Lock(ctx, {0}, {"variable"}, grad));
    Backend::template SgdStep<T, Mask>(ctx, stack, grad.flat<T>().data(), step, variables.template data<T>(0),
                                       use_momentum_ ? variables.template data<T>(1) : nullptr);
  }

 private:
  bool use_momentum_ = false;
  bool nesterov_ = false;
};

template <typename Backend, typename T, typename Mask>
class MaskedRmspropStepOp : public MaskedStepKernel<Mask> {
 public:
  explicit MaskedRmspropStepOp(OpKernelConstruction* ctx) : MaskedStepKernel<Mask>(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_momentum", &use_momentum_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("centered", &centered_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(4);
    MatrixStack<Mask> stack;
    OP_REQUIRES_OK(ctx, this->ViewGrad(ctx, 4, &stack));
    RmspropStep<const T*> step;
    step.centered = centered_;
    OP_REQUIRES_OK(ctx, ScalarInputs<T>(ctx, 6,
                                        {{"learning_rate", &step.learning_rate},
                                         {"rho", &step.rho},
                                         {"one_minus_rho", &step.one_minus_rho},
                                         {"momentum_factor", &step.momentum},
                                         {"epsilon", &step.epsilon},
                                         {"weight_decay", &step.weight_decay}}));
    std::vector<int> inputs = {0, 1};
    std::vector<absl::string_view> names = {"variable", "velocity"};
    if (use_momentum_) {
      inputs.push_back(2);
      names.push_back("momentum");
    }
    if (centered_) {
      inputs.push_back(3);
      names.push_back("average_grad");
    }
    LockedVariables<Backend> variables;
    OP_REQUIRES_OK(ctx, variables.Lock(ctx, inputs, names, grad));
    T* momentum = use_momentum_ ? variables.template data<T>(2) : nullptr;
    T* average_grad = centered_ ? variables.template data<T>(use_momentum_ ? 3 : 2) : nullptr;
    Backend::template RmspropStep<T, Mask>(ctx, stack, grad.flat<T>().data(), step, variables.template data<T>(0),
                                           variables.template data<T>(1), momentum, average_grad);
  }

 private:
  bool use_momentum_ = false;
  bool centered_ = false;
};

}  // namespace elementwise_kernels
}  // namespace masked_ops

// The five ops' kernels on DEVICE over BACKEND, for T and Mask (use with
// `using ::tensorflow::register_kernel::Name;` in scope).
#define MASKED_OPS_REGISTER_ELEMENTWISE_ONE(OP, KERNEL, DEVICE, BACKEND, T, Mask)              \
  REGISTER_KERNEL_BUILDER(Name(OP)                                                             \
                              .Device(DEVICE)                                                  \
                              .TypeConstraint<T>("T")                                          \
                              .TypeConstraint<::masked_ops::TfMaskType<Mask>::type>("Tmask"),  \
                          ::masked_ops::elementwise_kernels::KERNEL<BACKEND, T, Mask>);

#define MASKED_OPS_REGISTER_ELEMENTWISE(DEVICE, BACKEND, T, Mask)                                                  \
  MASKED_OPS_REGISTER_ELEMENTWISE_ONE("MaskedOps>MaskGradient", MaskGradientOp, DEVICE, BACKEND, T, Mask)          \
  MASKED_OPS_REGISTER_ELEMENTWISE_ONE("MaskedOps>MaskedUpdateVariable", MaskedUpdateVariableOp, DEVICE, BACKEND, T, \
                                      Mask)                                                                      \
  MASKED_OPS_REGISTER_ELEMENTWISE_ONE("MaskedOps>MaskedAdamStep", MaskedAdamStepOp, DEVICE, BACKEND, T, Mask)      \
  MASKED_OPS_REGISTER_ELEMENTWISE_ONE("MaskedOps>MaskedSgdStep", MaskedSgdStepOp, DEVICE, BACKEND, T, Mask)        \
  MASKED_OPS_REGISTER_ELEMENTWISE_ONE("MaskedOps>MaskedRmspropStep", MaskedRmspropStepOp, DEVICE, BACKEND, T, Mask)

#endif  // MASKED_OPS_CC_TF_BLOCK_ELEMENTWISE_KERNELS_H_
