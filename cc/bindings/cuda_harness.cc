// The TensorFlow-free harness over the CUDA kernels: plain C functions taking
// device pointers as integers (from CuPy or PyTorch arrays), loaded with
// ctypes by tests/gpu and bench/gpu.py on a machine that has a GPU but no
// TensorFlow.
#include <cstdint>
#include <cstring>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/masked_matmul_gpu.h"

namespace masked_ops {
namespace gpu {
namespace {

enum Product { kForward = 0, kGradInput = 1, kGradWeight = 2 };
constexpr int kUnknownType = -1000;

template <typename T, typename TMask>
int Run(int product, const MatmulShape& shape, uintptr_t a, uintptr_t b, uintptr_t mask, int level,
        uintptr_t out, uintptr_t workspace, uintptr_t stream) {
  const MaskView<TMask> view{reinterpret_cast<const TMask*>(mask),
                             level == 0 ? MaskLevel::kElement : MaskLevel::kBlock};
  const T* first = reinterpret_cast<const T*>(a);
  const T* second = reinterpret_cast<const T*>(b);
  T* result = reinterpret_cast<T*>(out);
  void* space = reinterpret_cast<void*>(workspace);
  Stream s = reinterpret_cast<Stream>(stream);
  switch (product) {
    case kForward:
      return MaskedMatmul<T, TMask>(shape, first, second, view, result, space, s);
    case kGradInput:
      return MaskedMatmulGradInput<T, TMask>(shape, first, second, view, result, space, s);
    case kGradWeight:
      return MaskedMatmulGradWeight<T, TMask>(shape, first, second, view, result, space, s);
    default:
      return kUnknownType;
  }
}

template <typename T>
int RunWithMask(const char* mask_type, int product, const MatmulShape& shape, uintptr_t a, uintptr_t b,
                uintptr_t mask, int level, uintptr_t out, uintptr_t workspace, uintptr_t stream) {
#define MASKED_OPS_MASK_CASE(NAME, TMask) \
  if (std::strcmp(mask_type, NAME) == 0) return Run<T, TMask>(product, shape, a, b, mask, level, out, workspace, stream);
  MASKED_OPS_MASK_CASE("bool", bool)
  MASKED_OPS_MASK_CASE("int8", int8_t)
  MASKED_OPS_MASK_CASE("uint8", uint8_t)
  MASKED_OPS_MASK_CASE("int16", int16_t)
  MASKED_OPS_MASK_CASE("int32", int32_t)
  MASKED_OPS_MASK_CASE("int64", int64_t)
  MASKED_OPS_MASK_CASE("float16", Float16Bits)
  MASKED_OPS_MASK_CASE("bfloat16", BFloat16Bits)
  MASKED_OPS_MASK_CASE("float32", float)
  MASKED_OPS_MASK_CASE("float64", double)
#undef MASKED_OPS_MASK_CASE
  return kUnknownType;
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

extern "C" {

// Bytes of device workspace a product over a k x n weight needs; level 0 is
// an element mask, 1 a block mask.
size_t masked_ops_gpu_workspace_bytes(int64_t k, int64_t n, int64_t block_rows, int64_t block_cols,
                                      int level) {
  return masked_ops::gpu::GpuWorkspaceBytes(masked_ops::BlockGrid{k, n, block_rows, block_cols},
                                            level == 0 ? masked_ops::MaskLevel::kElement
                                                       : masked_ops::MaskLevel::kBlock);
}

// product 0: out = a @ W (a = x [m, k]); 1: out = a @ W^T (a = dy [m, n]);
// 2: out = dW from a = x, b = dy. b is w for products 0 and 1. Returns the
// cudaError_t of the launches, or -1000 for an unknown type or product.
int masked_ops_gpu_matmul(int product, const char* dtype, const char* mask_dtype, int64_t m, int64_t k,
                          int64_t n, int64_t block_rows, int64_t block_cols, uintptr_t a, uintptr_t b,
                          uintptr_t mask, int level, uintptr_t out, uintptr_t workspace, uintptr_t stream) {
  using namespace masked_ops;
  const MatmulShape shape{m, k, n, block_rows, block_cols};
  if (std::strcmp(dtype, "float32") == 0)
    return gpu::RunWithMask<float>(mask_dtype, product, shape, a, b, mask, level, out, workspace, stream);
  if (std::strcmp(dtype, "float16") == 0)
    return gpu::RunWithMask<Float16Bits>(mask_dtype, product, shape, a, b, mask, level, out, workspace, stream);
  if (std::strcmp(dtype, "bfloat16") == 0)
    return gpu::RunWithMask<BFloat16Bits>(mask_dtype, product, shape, a, b, mask, level, out, workspace, stream);
  return gpu::kUnknownType;
}

}  // extern "C"
