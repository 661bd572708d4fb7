// GPU OpKernels for masked_conv2d and its gradients: the device-generic
// OpKernels of masked_conv2d_kernels.h over the CUDA kernels (gpu_support.h).
// Compiled with GOOGLE_CUDA=1 and TensorFlow's CUDA headers (CMakeLists.txt).
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cc/kernels/cuda/masked_conv2d_gpu.h"
#include "cc/tf/gpu_support.h"
#include "cc/tf/masked_conv2d_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/types.h"

namespace masked_ops {
namespace {

struct GpuBackend {
  // The CUDA kernels take canonical factors in T's compute type (float, or
  // double for double).
  template <typename T>
  using Factor = ComputeT<T>;

  template <typename T>
  static absl::Status ConvertOutputMask(OpKernelContext* ctx, const Tensor& output_mask, Tensor* storage,
                                        const Factor<T>** factors) {
    const int64_t pixels = output_mask.NumElements();
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DataTypeToEnum<Factor<T>>::value, TensorShape({pixels}),
                                          storage));
    Factor<T>* out = storage->flat<Factor<T>>().data();
    *factors = out;
    switch (output_mask.dtype()) {
#define MASKED_OPS_CONVERT(unused, Mask)                                                            \
  case ::tensorflow::DataTypeToEnum<TfMaskType<Mask>::type>::value:                                 \
    return LaunchStatus(ctx, gpu::CanonicalOutputFactors<Mask, Factor<T>>(                          \
                                 reinterpret_cast<const Mask*>(                                     \
                                     output_mask.flat<TfMaskType<Mask>::type>().data()),            \
                                 pixels, out, OpStream(ctx)));
      MASKED_OPS_FOR_EACH_MASK_TYPE(MASKED_OPS_CONVERT, float)
#undef MASKED_OPS_CONVERT
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            "output_mask has unsupported dtype ", ::tensorflow::DataTypeString(output_mask.dtype())));
    }
  }

  template <typename T, typename Mask>
  static void Forward(OpKernelContext* ctx, const Conv2DGeometry& g, const T* x, const T* filters,
                      MaskView<Mask> mask, const Factor<T>* factors, T* y) {
    LaunchWithWorkspace(ctx, WorkspaceBytes<T>(g, mask.level, gpu::Product::kForward, factors != nullptr), [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedConv2D(g, Storage(x), Storage(filters), mask, factors, Storage(y), workspace, GpuMathFor<T>(), stream);
    });
  }
  template <typename T, typename Mask>
  static void GradInput(OpKernelContext* ctx, const Conv2DGeometry& g, const T* dy, const T* filters,
                        MaskView<Mask> mask, const Factor<T>* factors, T* dx) {
    LaunchWithWorkspace(ctx, WorkspaceBytes<T>(g, mask.level, gpu::Product::kGradInput, factors != nullptr), [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedConv2DGradInput(g, Storage(dy), Storage(filters), mask, factors, Storage(dx), workspace, GpuMathFor<T>(), stream);
    });
  }
  template <typename T, typename Mask>
  static void GradFilter(OpKernelContext* ctx, const Conv2DGeometry& g, const T* x, const T* dy,
                         MaskView<Mask> mask, const Factor<T>* factors, T* dfilters) {
    LaunchWithWorkspace(ctx, WorkspaceBytes<T>(g, mask.level, gpu::Product::kGradWeight, factors != nullptr), [&](void* workspace, gpu::Stream stream) {
      return gpu::MaskedConv2DGradFilter(g, Storage(x), Storage(dy), mask, factors, Storage(dfilters), workspace, GpuMathFor<T>(),
                                         stream);
    });
  }

  template <typename T>
  static int64_t WorkspaceBytes(const Conv2DGeometry& g, MaskLevel level, gpu::Product product, bool output_masked) {
    return static_cast<int64_t>(
        gpu::Conv2DWorkspaceBytes<typename KernelStorage<T>::type>(g, level, product, output_masked));
  }
};

}  // namespace

using ::tensorflow::register_kernel::Name;

#define MASKED_OPS_REGISTER_GPU(T, Mask) MASKED_OPS_REGISTER_CONV2D(::tensorflow::DEVICE_GPU, GpuBackend, T, Mask)

MASKED_OPS_FOR_EACH_GPU_TF_TYPE_PAIR(MASKED_OPS_REGISTER_GPU)

#undef MASKED_OPS_REGISTER_GPU

}  // namespace masked_ops
