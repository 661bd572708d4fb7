// GPU OpKernels for the block-masked elementwise ops: the device-generic
// OpKernels of block_elementwise_kernels.h over the CUDA kernels
// (gpu_support.h). The optimizer steps' scalars stay in device memory, where
// the kernels read them. Compiled with GOOGLE_CUDA=1 and TensorFlow's CUDA
// headers (CMakeLists.txt).
#include <cstdint>

#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/cuda/block_elementwise_gpu.h"
#include "cc/tf/block_elementwise_kernels.h"
#include "cc/tf/gpu_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace masked_ops {
namespace {

using elementwise_kernels::MatrixStack;

// A step's scalar pointers (into device memory) as the kernels' storage types.
template <typename T, template <typename> class Step>
Step<const typename KernelStorage<T>::type*> StorageScalars(const Step<const T*>& scalars) {
  return MapScalars<const typename KernelStorage<T>::type*>(scalars,
                                                            [](const T* scalar) { return Storage(scalar); });
}

struct GpuBackend {
  static absl::Status CopyBytes(OpKernelContext* ctx, const void* from, void* to, size_t bytes) {
    return LaunchStatus(ctx, gpu::CopyDeviceBytes(from, to, bytes, OpStream(ctx)));
  }

  template <typename T, typename Mask>
  static void MaskGradient(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad, T* out) {
    Launch<T>(ctx, stack, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskGradient(stack.outer, stack.grid, Storage(grad), stack.mask, Storage(out), workspace, stream);
    });
  }
  template <typename T, typename Mask>
  static void MaskedUpdate(OpKernelContext* ctx, const MatrixStack<Mask>& stack, UpdateMode mode, const T* value,
                           T* var) {
    Launch<T>(ctx, stack, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedUpdate(stack.outer, stack.grid, stack.mask, mode, Storage(value), Storage(var), workspace,
                               stream);
    });
  }
  template <typename T, typename Mask>
  static void AdamStep(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad,
                       const masked_ops::AdamStep<const T*>& scalars, T* var, T* m, T* v, T* v_hat) {
    Launch<T>(ctx, stack, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedAdamStep(stack.outer, stack.grid, stack.mask, Storage(grad), StorageScalars(scalars),
                                 Storage(var), Storage(m), Storage(v), Storage(v_hat), workspace, stream);
    });
  }
  template <typename T, typename Mask>
  static void SgdStep(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad,
                      const masked_ops::SgdStep<const T*>& scalars, T* var, T* momentum) {
    Launch<T>(ctx, stack, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedSgdStep(stack.outer, stack.grid, stack.mask, Storage(grad), StorageScalars(scalars),
                                Storage(var), Storage(momentum), workspace, stream);
    });
  }
  template <typename T, typename Mask>
  static void RmspropStep(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const T* grad,
                          const masked_ops::RmspropStep<const T*>& scalars, T* var, T* velocity, T* momentum,
                          T* average_grad) {
    Launch<T>(ctx, stack, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedRmspropStep(stack.outer, stack.grid, stack.mask, Storage(grad), StorageScalars(scalars),
                                    Storage(var), Storage(velocity), Storage(momentum), Storage(average_grad),
                                    workspace, stream);
    });
  }

  template <typename T, typename Mask, typename Run>
  static void Launch(OpKernelContext* ctx, const MatrixStack<Mask>& stack, const Run& run) {
    LaunchWithWorkspace(ctx,
                        static_cast<int64_t>(gpu::ElementwiseWorkspaceBytes<typename KernelStorage<T>::type>(
                            stack.outer, stack.grid, stack.mask.level)),
                        run);
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER(T, Mask) MASKED_OPS_REGISTER_ELEMENTWISE(::tensorflow::DEVICE_GPU, GpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_GPU_TF_TYPE_PAIR(MASKED_OPS_REGISTER)

#undef MASKED_OPS_REGISTER

}  // namespace masked_ops
