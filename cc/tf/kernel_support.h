// What every CPU OpKernel of this library shares: the mask dtype mapping,
// TensorFlow's intra-op thread pool as a ParallelFor, and the error handling
// around a kernel call.
#ifndef MASKED_OPS_CC_TF_KERNEL_SUPPORT_H_
#define MASKED_OPS_CC_TF_KERNEL_SUPPORT_H_

#include <cstdint>
#include <functional>
#include <new>
#include <stdexcept>

#include "absl/strings/str_cat.h"
#include "cc/kernels/block_mask.h"
#include "cc/tf/validation.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace masked_ops {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// TensorFlow's spelling of each kernel mask type; the 16-bit floats are
// passed to the kernels as their bits.
template <typename Mask>
struct TfMaskType {
  using type = Mask;
};
template <>
struct TfMaskType<Float16Bits> {
  using type = Eigen::half;
};
template <>
struct TfMaskType<BFloat16Bits> {
  using type = tensorflow::bfloat16;
};

static_assert(sizeof(Eigen::half) == sizeof(Float16Bits), "half is 16 bits");
static_assert(sizeof(tensorflow::bfloat16) == sizeof(BFloat16Bits), "bfloat16 is 16 bits");

inline ParallelFor IntraOpParallelFor(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t units, int64_t cost_per_unit,
                   const std::function<void(int64_t, int64_t)>& work) {
    workers->ParallelFor(
        units, tsl::thread::ThreadPool::SchedulingParams::Adaptive(cost_per_unit), work);
  };
}

// The kernels allocate their scratch on the calling thread, never inside
// parallel work, so running out of memory surfaces here: an error for this
// op, not an abort of the process.
template <typename Kernel>
void RunKernel(OpKernelContext* ctx, Kernel&& kernel) {
  try {
    kernel();
  } catch (const std::bad_alloc&) {
    ctx->SetStatus(absl::ResourceExhaustedError(
        absl::StrCat(ctx->op_kernel().type_string(), ": out of memory for packed operands")));
  } catch (const std::length_error&) {
    ctx->SetStatus(absl::ResourceExhaustedError(
        absl::StrCat(ctx->op_kernel().type_string(), ": packed operands too large")));
  }
}

inline absl::Status RequireRank(const Tensor& t, absl::string_view name, absl::string_view expected,
                         int rank, bool at_least) {
  return CheckRank(name, expected, t.shape().DebugString(), t.dims(), rank, at_least);
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_KERNEL_SUPPORT_H_
