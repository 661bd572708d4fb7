// What every CPU OpKernel of this library shares: the mask dtype mapping,
// TensorFlow's intra-op thread pool as a ParallelFor, and the error handling
// around a kernel call.
#ifndef MASKED_OPS_CC_TF_KERNEL_SUPPORT_H_
#define MASKED_OPS_CC_TF_KERNEL_SUPPORT_H_

#include <cstdint>
#include <functional>
#include <new>
#include <stdexcept>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/masked_matmul.h"
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

// TensorFlow's element types as the framework-free kernels take them (the
// 16-bit floats as their bits), and pointers cast to them.
template <typename T>
struct KernelStorage {
  using type = T;
};
template <>
struct KernelStorage<Eigen::half> {
  using type = Float16Bits;
};
template <>
struct KernelStorage<tensorflow::bfloat16> {
  using type = BFloat16Bits;
};

template <typename T>
const typename KernelStorage<T>::type* Storage(const T* p) {
  return reinterpret_cast<const typename KernelStorage<T>::type*>(p);
}
template <typename T>
typename KernelStorage<T>::type* Storage(T* p) {
  return reinterpret_cast<typename KernelStorage<T>::type*>(p);
}

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

// The CPU kernels compute in float or double; float16 and bfloat16 tensors
// go through them as float copies (no gain in speed, the same numbers as
// computing in float and rounding the result).
template <typename T>
using ComputeT = ComputeOf<typename KernelStorage<T>::type>;

// `count` values as ComputeT<T>: the values themselves, or a converted copy
// held by `storage`.
template <typename T>
absl::Status AsCompute(OpKernelContext* ctx, const T* values, int64_t count, Tensor* storage,
                       const ComputeT<T>** out) {
  if constexpr (std::is_same_v<T, ComputeT<T>>) {
    *out = values;
  } else {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({count}), storage));
    float* copy = storage->flat<float>().data();
    for (int64_t i = 0; i < count; ++i) copy[i] = static_cast<float>(values[i]);
    *out = copy;
  }
  return absl::OkStatus();
}

// Where a kernel writes an output of `count` values: the output itself, or a
// float buffer held by `storage` for StoreOutput to round into it.
template <typename T>
absl::Status OutputBuffer(OpKernelContext* ctx, T* output, int64_t count, Tensor* storage,
                          ComputeT<T>** out) {
  if constexpr (std::is_same_v<T, ComputeT<T>>) {
    *out = output;
  } else {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({count}), storage));
    *out = storage->flat<float>().data();
  }
  return absl::OkStatus();
}

template <typename T>
void StoreOutput(const ComputeT<T>* buffer, T* output, int64_t count) {
  if constexpr (!std::is_same_v<T, ComputeT<T>>) {
    for (int64_t i = 0; i < count; ++i) output[i] = static_cast<T>(buffer[i]);
  }
}

// kernel(a, b, out) run on ComputeT<T> views of two inputs (a_count and
// b_count values) and an output (out_count values).
template <typename T, typename Kernel>
void RunOnComputeTypes(OpKernelContext* ctx, const T* a, int64_t a_count, const T* b, int64_t b_count, T* out,
                       int64_t out_count, const Kernel& kernel) {
  Tensor a_storage, b_storage, out_storage;
  const ComputeT<T>* a_values = nullptr;
  const ComputeT<T>* b_values = nullptr;
  ComputeT<T>* out_values = nullptr;
  OP_REQUIRES_OK(ctx, AsCompute(ctx, a, a_count, &a_storage, &a_values));
  OP_REQUIRES_OK(ctx, AsCompute(ctx, b, b_count, &b_storage, &b_values));
  OP_REQUIRES_OK(ctx, OutputBuffer(ctx, out, out_count, &out_storage, &out_values));
  RunKernel(ctx, [&] { kernel(a_values, b_values, out_values); });
  StoreOutput(out_values, out, out_count);
}

// Every (T, Mask) pair the OpKernels are registered for: the kernels' own
// types and the 16-bit floats computed through them.
#define MASKED_OPS_FOR_EACH_TF_TYPE_PAIR(MACRO)              \
  MASKED_OPS_FOR_EACH_TYPE_PAIR(MACRO)                       \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, ::Eigen::half)        \
  MASKED_OPS_FOR_EACH_MASK_TYPE(MACRO, ::tensorflow::bfloat16)

// An output's shape from its dimensions, or an InvalidArgumentError naming
// the output when its size does not fit in int64: empty inputs can have huge
// dimensions (x [0, 2^40] and dy [0, 2^40] ask for dw [2^40, 2^40]), and
// TensorShape's constructor would abort the process on them.
inline absl::Status OutputShape(absl::string_view name, absl::Span<const int64_t> dims, TensorShape* shape) {
  if (TensorShape::BuildTensorShape(dims, shape).ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " would have shape [", absl::StrJoin(dims, ", "),
                                                 "], more elements than a tensor can hold (2^63 - 1)"));
}

inline absl::Status RequireRank(const Tensor& t, absl::string_view name, absl::string_view expected,
                         int rank, bool at_least) {
  return CheckRank(name, expected, t.shape().DebugString(), t.dims(), rank, at_least);
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_KERNEL_SUPPORT_H_
