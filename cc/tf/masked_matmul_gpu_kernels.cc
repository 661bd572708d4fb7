// GPU OpKernels for masked_matmul and its gradients: the device-generic
// OpKernels of masked_matmul_kernels.h over the CUDA kernels, launched on the
// op's stream with a workspace from TensorFlow's allocator. Compiled with
// GOOGLE_CUDA=1 and TensorFlow's CUDA headers (see CMakeLists.txt).
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/tf/masked_matmul_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace masked_ops {
namespace {

struct GpuBackend {
  template <typename T, typename Mask>
  static void Forward(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* w,
                      MaskView<Mask> mask, T* y) {
    Launch(ctx, shape, mask.level, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedMatmul<T, Mask>(shape, x, w, mask, y, workspace, stream);
    });
  }
  template <typename T, typename Mask>
  static void GradInput(OpKernelContext* ctx, const MatmulShape& shape, const T* dy, const T* w,
                        MaskView<Mask> mask, T* dx) {
    Launch(ctx, shape, mask.level, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedMatmulGradInput<T, Mask>(shape, dy, w, mask, dx, workspace, stream);
    });
  }
  template <typename T, typename Mask>
  static void GradWeight(OpKernelContext* ctx, const MatmulShape& shape, const T* x, const T* dy,
                         MaskView<Mask> mask, T* dw) {
    Launch(ctx, shape, mask.level, [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedMatmulGradWeight<T, Mask>(shape, x, dy, mask, dw, workspace, stream);
    });
  }

  template <typename Run>
  static void Launch(OpKernelContext* ctx, const MatmulShape& shape, MaskLevel level, const Run& run) {
    Tensor workspace;
    const int64_t bytes = static_cast<int64_t>(gpu::GpuWorkspaceBytes(shape.weight_grid(), level));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_UINT8, TensorShape({bytes}), &workspace));
    const auto stream = ctx->eigen_device<Eigen::GpuDevice>().stream();
    const int status = run(workspace.data(), reinterpret_cast<gpu::Stream>(stream));
    OP_REQUIRES(ctx, status == 0,
                absl::InternalError(absl::StrCat(ctx->op_kernel().type_string(),
                                                 ": CUDA launch failed with cudaError_t ", status)));
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER_GPU(T, Mask) \
  MASKED_OPS_REGISTER_MATMUL(::tensorflow::DEVICE_GPU, GpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_MASK_TYPE(MASKED_OPS_REGISTER_GPU, float)

#undef MASKED_OPS_REGISTER_GPU

}  // namespace masked_ops
