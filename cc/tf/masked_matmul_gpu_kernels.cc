// GPU OpKernels for masked_matmul and its gradients: the device-generic
// OpKernels of masked_matmul_kernels.h over the CUDA kernels (gpu_support.h).
// Compiled with GOOGLE_CUDA=1 and TensorFlow's CUDA headers (CMakeLists.txt).
#include <cstdint>

#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/tf/gpu_support.h"
#include "cc/tf/masked_matmul_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace masked_ops {
namespace {

struct GpuBackend {
  template <typename T, typename Mask>
  static void Forward(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* w,
                      MaskView<Mask> mask, T* y) {
    Launch<T>(ctx, shape, mask.level, gpu::Product::kForward, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedMatmul(shape, Storage(x), Storage(w), mask, Storage(y), workspace, GpuMathFor<T>(), stream);
    });
  }
  template <typename T, typename Mask>
  static void GradInput(OpKernelContext* ctx, const MatmulShape& shape, const T* dy, const T* w,
                        MaskView<Mask> mask, T* dx) {
    Launch<T>(ctx, shape, mask.level, gpu::Product::kGradInput, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedMatmulGradInput(shape, Storage(dy), Storage(w), mask, Storage(dx), workspace, GpuMathFor<T>(), stream);
    });
  }
  template <typename T, typename Mask>
  static void GradWeight(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* dy,
                         MaskView<Mask> mask, T* dw) {
    Launch<T>(ctx, shape, mask.level, gpu::Product::kGradWeight, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedMatmulGradWeight(shape, Storage(x), Storage(dy), mask, Storage(dw), workspace, GpuMathFor<T>(), stream);
    });
  }

  template <typename T, typename Run>
  static void Launch(OpKernelContext* ctx, const MatmulShape& shape, MaskLevel level, gpu::Product product,
                     const Run& run) {
    LaunchWithWorkspace(
        ctx, static_cast<int64_t>(gpu::GpuWorkspaceBytes<typename KernelStorage<T>::type>(shape, level, product)), run);
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER_GPU(T, Mask) \
  MASKED_OPS_REGISTER_MATMUL(::tensorflow::DEVICE_GPU, GpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_GPU_TF_TYPE_PAIR(MASKED_OPS_REGISTER_GPU)

#undef MASKED_OPS_REGISTER_GPU

}  // namespace masked_ops
