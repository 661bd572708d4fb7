// What the GPU OpKernels share: a launch on the op's stream with a device
// workspace from TensorFlow's allocator. Only for files compiled with
// GOOGLE_CUDA=1 and TensorFlow's CUDA headers.
#ifndef MASKED_OPS_CC_TF_GPU_SUPPORT_H_
#define MASKED_OPS_CC_TF_GPU_SUPPORT_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tsl/platform/tensor_float_32_utils.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace masked_ops {

// The element types the GPU OpKernels are registered for.
#define MASKED_OPS_FOR_EACH_GPU_TF_TYPE_PAIR(MACRO)    \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, float)          \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, double)         \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, ::Eigen::half)  \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, ::tensorflow::bfloat16)

// Tensor cores for the half types, and for float32 as TF32 when TensorFlow's
// own matmuls and convolutions may
// (tf.config.experimental.enable_tensor_float_32_execution, on by default);
// double always on CUDA cores.
template <typename T>
gpu::GpuMath GpuMathFor() {
  if (std::is_same_v<T, double>) return gpu::GpuMath::kCudaCores;
  if (std::is_same_v<T, float> && !tsl::tensor_float_32_execution_enabled()) return gpu::GpuMath::kCudaCores;
  return gpu::GpuMath::kTensorCores;
}

inline gpu::Stream OpStream(OpKernelContext* ctx) {
  return reinterpret_cast<gpu::Stream>(ctx->eigen_device<Eigen::GpuDevice>().stream());
}

// A launcher's cudaError_t as the op's status: sizes past one launch's grid
// are the caller's arguments, no memory is exhaustion, no kernel image is a
// GPU older than the kernels' architectures (sm_80 code, sm_90a, PTX of
// compute_90 for newer); the rest are internal.
inline absl::Status LaunchStatus(OpKernelContext* ctx, int status) {
  if (status == 0) return absl::OkStatus();
  const std::string op = ctx->op_kernel().type_string();
  switch (status) {
    case cudaErrorInvalidConfiguration:
      return absl::InvalidArgumentError(absl::StrCat(op, ": the tensors' sizes need more CUDA thread blocks than one "
                                                         "launch can have (cudaErrorInvalidConfiguration)"));
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(absl::StrCat(op, ": out of GPU memory (cudaErrorMemoryAllocation)"));
    case cudaErrorNoKernelImageForDevice:
      return absl::UnimplementedError(absl::StrCat(op, ": the library's GPU kernels need compute capability 8.0 or "
                                                       "newer (A100, RTX 30 series, H100 ...); this GPU is older "
                                                       "(cudaErrorNoKernelImageForDevice)"));
    default:
      return absl::InternalError(absl::StrCat(op, ": CUDA launch failed with cudaError_t ", status));
  }
}

// run(workspace, stream) with `bytes` of device workspace; its status becomes
// the op's.
template <typename Run>
void LaunchWithWorkspace(OpKernelContext* ctx, int64_t bytes, const Run& run) {
  Tensor workspace;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_UINT8, TensorShape({bytes}), &workspace));
  OP_REQUIRES_OK(ctx, LaunchStatus(ctx, run(workspace.data(), OpStream(ctx))));
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_GPU_SUPPORT_H_
