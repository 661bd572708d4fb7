// CPU OpKernels for the block-masked elementwise ops: the device-generic
// OpKernels of block_elementwise_kernels.h over the CPU kernels.
#include "cc/tf/block_elementwise_kernels.h"

#include <cstdint>
#include <cstring>

#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace masked_ops {
namespace {

using elementwise_kernels::MatrixStack;

// A step's scalars, inputs in host memory, as the kernels compute them.
template <typename T, template <typename> class Step>
Step<ComputeT<T>> HostScalarValues(const Step<const T*>& scalars) {
  return MapScalars<ComputeT<T>>(scalars, [](const T* scalar) { return static_cast<ComputeT<T>>(*scalar); });
}

struct CpuBackend {
  static absl::Status CopyBytes(OpKernelContext*, const void* from, void* to, size_t bytes) {
    std::memcpy(to, from, bytes);
    return absl::OkStatus();
  }

  template <typename T, typename Mask>
  static void MaskGradient(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad, T* out) {
    RunKernel(ctx, [&] {
      masked_ops::MaskGradient(stack.outer, stack.grid, Storage(grad), stack.mask, Storage(out),
                               IntraOpParallelFor(ctx));
    });
  }
  template <typename T, typename Mask>
  static void MaskedUpdate(OpKernelContext* ctx, const MatrixStack<Mask>& stack, UpdateMode mode, const T* value,
                           T* var) {
    RunKernel(ctx, [&] {
      masked_ops::MaskedUpdate(stack.outer, stack.grid, stack.mask, mode, Storage(value), Storage(var),
                               IntraOpParallelFor(ctx));
    });
  }
  template <typename T, typename Mask>
  static void AdamStep(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad,
                       const masked_ops::AdamStep<const T*>& scalars, T* var, T* m, T* v, T* v_hat) {
    RunKernel(ctx, [&] {
      MaskedAdamStep(stack.outer, stack.grid, stack.mask, Storage(grad), HostScalarValues(scalars), Storage(var),
                     Storage(m), Storage(v), Storage(v_hat), IntraOpParallelFor(ctx));
    });
  }
  template <typename T, typename Mask>
  static void SgdStep(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad,
                      const masked_ops::SgdStep<const T*>& scalars, T* var, T* momentum) {
    RunKernel(ctx, [&] {
      MaskedSgdStep(stack.outer, stack.grid, stack.mask, Storage(grad), HostScalarValues(scalars), Storage(var),
                    Storage(momentum), IntraOpParallelFor(ctx));
    });
  }
  template <typename T, typename Mask>
  static void RmspropStep(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad,
                          const masked_ops::RmspropStep<const T*>& scalars, T* var, T* velocity, T* momentum,
                          T* average_grad) {
    RunKernel(ctx, [&] {
      MaskedRmspropStep(stack.outer, stack.grid, stack.mask, Storage(grad), HostScalarValues(scalars), Storage(var),
                        Storage(velocity), Storage(momentum), Storage(average_grad), IntraOpParallelFor(ctx));
    });
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER(T, Mask) MASKED_OPS_REGISTER_ELEMENTWISE(::tensorflow::DEVICE_CPU, CpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_TF_TYPE_PAIR(MASKED_OPS_REGISTER)

#undef MASKED_OPS_REGISTER

}  // namespace masked_ops
