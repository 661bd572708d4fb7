// The TensorFlow-free harness over the CUDA kernels: plain C functions taking
// device pointers as integers (from CuPy or PyTorch arrays), loaded with
// ctypes by tests/gpu and bench/gpu.py on a machine that has a GPU but no
// TensorFlow.
#include <cstdint>
#include <cstring>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/block_elementwise_gpu.h"
#include "cc/kernels/cuda/masked_conv2d_gpu.h"
#include "cc/kernels/cuda/masked_matmul_gpu.h"

namespace masked_ops {
namespace gpu {
namespace {

constexpr int kUnknownType = -1000;

template <typename T>
struct Tag {
  using type = T;
};

// Calls run(Tag<T>{}, Tag<TMask>{}) for the named element and mask types.
template <typename Run>
int WithMaskType(const char* mask_type, const Run& run) {
#define MASKED_OPS_MASK_CASE(NAME, TMask) \
  if (std::strcmp(mask_type, NAME) == 0) return run(Tag<TMask>{});
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

// Calls run(Tag<T>{}) for the named element type; `unknown` otherwise.
template <typename Result, typename Run>
Result WithElementType(const char* dtype, Result unknown, const Run& run) {
  if (std::strcmp(dtype, "float32") == 0) return run(Tag<float>{});
  if (std::strcmp(dtype, "float64") == 0) return run(Tag<double>{});
  if (std::strcmp(dtype, "float16") == 0) return run(Tag<Float16Bits>{});
  if (std::strcmp(dtype, "bfloat16") == 0) return run(Tag<BFloat16Bits>{});
  return unknown;
}

template <typename Run>
int WithTypes(const char* dtype, const char* mask_type, const Run& run) {
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    return WithMaskType(mask_type, [&](auto mask) { return run(element, mask); });
  });
}

template <typename T>
T* Ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

MaskLevel LevelOf(int level) { return level == 0 ? MaskLevel::kElement : MaskLevel::kBlock; }

// The harness's product codes are Product's values, 0 to 2 (an enum class
// holds any int, so a switch over an unknown code takes its default).
bool KnownProduct(int product) { return product >= 0 && product <= 2; }
Product ProductOf(int product) { return static_cast<Product>(product); }

GpuMath MathOf(int tensor_cores) { return tensor_cores != 0 ? GpuMath::kTensorCores : GpuMath::kCudaCores; }

// A Conv2DGeometry from its 19 fields, in declaration order.
Conv2DGeometry GeometryOf(const int64_t* f) {
  return Conv2DGeometry{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9],
                        f[10], f[11], f[12], f[13], f[14], f[15], f[16], f[17], f[18]};
}

int64_t AlignUp(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// The conv kernels' own workspace for `product`, rounded up to where the
// output mask's factors start.
template <typename T>
int64_t KernelsWorkspace(const Conv2DGeometry& g, int level, int product, bool output_masked) {
  return AlignUp(
      static_cast<int64_t>(Conv2DWorkspaceBytes<T>(g, LevelOf(level), ProductOf(product), output_masked)));
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

extern "C" {

// Bytes of device workspace `product` (0, 1, 2 as for masked_ops_gpu_matmul)
// over m rows and a k x n weight of dtype needs; level 0 is an element mask,
// 1 a block mask. Every workspace query returns 0 for an unknown dtype or
// product.
size_t masked_ops_gpu_workspace_bytes(int product, const char* dtype, int64_t m, int64_t k, int64_t n,
                                      int64_t block_rows, int64_t block_cols, int level) {
  using namespace masked_ops::gpu;
  if (!KnownProduct(product)) return 0;
  return WithElementType(dtype, size_t{0}, [&](auto element) {
    using T = typename decltype(element)::type;
    return GpuWorkspaceBytes<T>(masked_ops::MatmulShape{m, k, n, block_rows, block_cols}, LevelOf(level),
                                ProductOf(product));
  });
}

// product 0: out = a @ W (a = x [m, k]); 1: out = a @ W^T (a = dy [m, n]);
// 2: out = dW from a = x, b = dy. b is w for products 0 and 1. tensor_cores:
// 1 for GpuMath::kTensorCores (TF32 for float32), 0 for the CUDA cores. Every
// entry point returns the cudaError_t of its launches, or -1000 for an
// unknown type or product.
int masked_ops_gpu_matmul(int product, const char* dtype, const char* mask_dtype, int64_t m, int64_t k,
                          int64_t n, int64_t block_rows, int64_t block_cols, uintptr_t a, uintptr_t b,
                          uintptr_t mask, int level, uintptr_t out, uintptr_t workspace, int tensor_cores,
                          uintptr_t stream) {
  using namespace masked_ops;
  using namespace masked_ops::gpu;
  const MatmulShape shape{m, k, n, block_rows, block_cols};
  return WithTypes(dtype, mask_dtype, [&](auto element, auto mask_tag) {
    using T = typename decltype(element)::type;
    using TMask = typename decltype(mask_tag)::type;
    const MaskView<TMask> view{Ptr<const TMask>(mask), LevelOf(level)};
    void* space = Ptr<void>(workspace);
    Stream s = Ptr<CUstream_st>(stream);
    const GpuMath math = MathOf(tensor_cores);
    switch (ProductOf(product)) {
      case Product::kForward:
        return MaskedMatmul<T, TMask>(shape, Ptr<const T>(a), Ptr<const T>(b), view, Ptr<T>(out), space, math, s);
      case Product::kGradInput:
        return MaskedMatmulGradInput<T, TMask>(shape, Ptr<const T>(a), Ptr<const T>(b), view, Ptr<T>(out),
                                               space, math, s);
      case Product::kGradWeight:
        return MaskedMatmulGradWeight<T, TMask>(shape, Ptr<const T>(a), Ptr<const T>(b), view, Ptr<T>(out),
                                                space, math, s);
      default:
        return kUnknownType;
    }
  });
}

// 1 when product (0, 1, 2 as above) over a k x n weight of dtype runs on
// tensor cores on the current device with tensor_cores set, else 0 (-1000:
// unknown product or dtype).
int masked_ops_gpu_matmul_uses_tensor_cores(int product, const char* dtype, int64_t k, int64_t n,
                                            int64_t block_rows, int64_t block_cols, int tensor_cores) {
  using namespace masked_ops::gpu;
  if (!KnownProduct(product)) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return MatmulUsesTensorCores<T>(masked_ops::BlockGrid{k, n, block_rows, block_cols}, ProductOf(product),
                                    MathOf(tensor_cores))
               ? 1
               : 0;
  });
}

// 1 when product (0, 1, 2 as above) over a k x n weight of dtype with a mask
// of `level` (0 element, 1 block) takes the pipelined tensor-core kernels on
// the current device, given 16-byte aligned arrays, else 0 (-1000: unknown
// product or dtype).
int masked_ops_gpu_matmul_uses_pipeline(int product, const char* dtype, int64_t k, int64_t n, int64_t block_rows,
                                        int64_t block_cols, int level, int tensor_cores) {
  using namespace masked_ops::gpu;
  if (!KnownProduct(product)) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return MatmulUsesPipeline<T>(masked_ops::BlockGrid{k, n, block_rows, block_cols}, ProductOf(product),
                                 MathOf(tensor_cores), LevelOf(level))
               ? 1
               : 0;
  });
}

// The elementwise ops over `outer` stacked k x n matrices (see
// block_elementwise_gpu.h).
size_t masked_ops_gpu_elementwise_workspace_bytes(const char* dtype, int64_t outer, int64_t k, int64_t n,
                                                  int64_t block_rows, int64_t block_cols, int level) {
  using namespace masked_ops::gpu;
  return WithElementType(dtype, size_t{0}, [&](auto element) {
    using T = typename decltype(element)::type;
    return ElementwiseWorkspaceBytes<T>(outer, masked_ops::BlockGrid{k, n, block_rows, block_cols}, LevelOf(level));
  });
}

// op: 0 mask_gradient(a = grad, out); 1/2/3 masked_update assign/add/sub
// (a = value, out = var); 4 adam (a = grad; state = m, v, v_hat; scalars =
// alpha, 1 - beta_1, 1 - beta_2, epsilon, learning_rate, weight_decay;
// flag = amsgrad); 5 sgd (state = momentum or 0; scalars = learning_rate,
// momentum, weight_decay; flag = nesterov); 6 rmsprop (state = velocity,
// momentum or 0, average_grad or 0; scalars = learning_rate, rho, 1 - rho,
// momentum, epsilon, weight_decay; flag = centered). scalars: a device
// array of those values in dtype. out is the variable for ops 1-6.
int masked_ops_gpu_elementwise(int op, const char* dtype, const char* mask_dtype, int64_t outer, int64_t k,
                               int64_t n, int64_t block_rows, int64_t block_cols, uintptr_t a, uintptr_t mask,
                               int level, uintptr_t out, const uintptr_t* state, uintptr_t scalars,
                               int flag, uintptr_t workspace, uintptr_t stream) {
  using namespace masked_ops;
  using namespace masked_ops::gpu;
  const BlockGrid grid{k, n, block_rows, block_cols};
  return WithTypes(dtype, mask_dtype, [&](auto element, auto mask_tag) {
    using T = typename decltype(element)::type;
    using TMask = typename decltype(mask_tag)::type;
    const MaskView<TMask> view{Ptr<const TMask>(mask), LevelOf(level)};
    const T* p = Ptr<const T>(scalars);
    void* space = Ptr<void>(workspace);
    Stream s = Ptr<CUstream_st>(stream);
    switch (op) {
      case 0:
        return MaskGradient<T, TMask>(outer, grid, Ptr<const T>(a), view, Ptr<T>(out), space, s);
      case 1:
      case 2:
      case 3: {
        const UpdateMode mode = op == 1 ? UpdateMode::kAssign : op == 2 ? UpdateMode::kAdd : UpdateMode::kSub;
        return MaskedUpdate<T, TMask>(outer, grid, view, mode, Ptr<const T>(a), Ptr<T>(out), space, s);
      }
      case 4: {
        const AdamStep<const T*> step{p, p + 1, p + 2, p + 3, p + 4, p + 5, flag != 0};
        return MaskedAdamStep<T, TMask>(outer, grid, view, Ptr<const T>(a), step, Ptr<T>(out), Ptr<T>(state[0]),
                                        Ptr<T>(state[1]), Ptr<T>(state[2]), space, s);
      }
      case 5: {
        const SgdStep<const T*> step{p, p + 1, flag != 0, p + 2};
        return MaskedSgdStep<T, TMask>(outer, grid, view, Ptr<const T>(a), step, Ptr<T>(out), Ptr<T>(state[0]),
                                       space, s);
      }
      case 6: {
        const RmspropStep<const T*> step{p, p + 1, p + 2, p + 3, p + 4, flag != 0, p + 5};
        return MaskedRmspropStep<T, TMask>(outer, grid, view, Ptr<const T>(a), step, Ptr<T>(out),
                                           Ptr<T>(state[0]), Ptr<T>(state[1]), Ptr<T>(state[2]), space, s);
      }
      default:
        return kUnknownType;
    }
  });
}

// Device workspace of conv `product` (0, 1, 2 as below) of dtype, with an
// output mask where output_masked is not 0: the kernels' own, then room for
// the output mask's canonical factors (0 for an unknown product).
size_t masked_ops_gpu_conv2d_workspace_bytes(int product, const char* dtype, const int64_t* geometry, int level,
                                             int output_masked) {
  using namespace masked_ops::gpu;
  if (!KnownProduct(product)) return 0;
  const masked_ops::Conv2DGeometry g = GeometryOf(geometry);
  return WithElementType(dtype, size_t{0}, [&](auto element) {
    using T = typename decltype(element)::type;
    return static_cast<size_t>(KernelsWorkspace<T>(g, level, product, output_masked != 0) +
                               AlignUp(g.out_pixels() * int64_t(sizeof(masked_ops::ComputeOf<T>))));
  });
}

// product 0: out = y from a = x, b = filters; 1: out = dx from a = dy,
// b = filters; 2: out = dfilters from a = x, b = dy. output_mask_dtype null
// (or output_mask 0) for no output mask; geometry: Conv2DGeometry's 19 fields;
// tensor_cores as for masked_ops_gpu_matmul.
int masked_ops_gpu_conv2d(int product, const char* dtype, const char* mask_dtype, const char* output_mask_dtype,
                          const int64_t* geometry, uintptr_t a, uintptr_t b, uintptr_t mask, int level,
                          uintptr_t output_mask, uintptr_t out, uintptr_t workspace, int tensor_cores,
                          uintptr_t stream) {
  using namespace masked_ops;
  using namespace masked_ops::gpu;
  const Conv2DGeometry g = GeometryOf(geometry);
  Stream s = Ptr<CUstream_st>(stream);
  void* space = Ptr<void>(workspace);
  return WithTypes(dtype, mask_dtype, [&](auto element, auto mask_tag) {
    using T = typename decltype(element)::type;
    using TMask = typename decltype(mask_tag)::type;
    using F = ComputeOf<T>;
    F* factors = nullptr;
    if (output_mask != 0 && output_mask_dtype != nullptr) {
      factors = reinterpret_cast<F*>(static_cast<char*>(space) + KernelsWorkspace<T>(g, level, product, true));
      const int status = WithMaskType(output_mask_dtype, [&](auto tag) {
        using TOut = typename decltype(tag)::type;
        return CanonicalOutputFactors<TOut, F>(Ptr<const TOut>(output_mask), g.out_pixels(), factors, s);
      });
      if (status != 0) return status;
    }
    const MaskView<TMask> view{Ptr<const TMask>(mask), LevelOf(level)};
    const GpuMath math = MathOf(tensor_cores);
    switch (ProductOf(product)) {
      case Product::kForward:
        return MaskedConv2D<T, TMask>(g, Ptr<const T>(a), Ptr<const T>(b), view, factors, Ptr<T>(out), space, math,
                                      s);
      case Product::kGradInput:
        return MaskedConv2DGradInput<T, TMask>(g, Ptr<const T>(a), Ptr<const T>(b), view, factors, Ptr<T>(out),
                                               space, math, s);
      case Product::kGradWeight:
        return MaskedConv2DGradFilter<T, TMask>(g, Ptr<const T>(a), Ptr<const T>(b), view, factors, Ptr<T>(out),
                                                space, math, s);
      default:
        return kUnknownType;
    }
  });
}

// 1 when conv product (0, 1, 2 as above) runs on tensor cores on the current
// device with tensor_cores set, else 0 (-1000: unknown product).
int masked_ops_gpu_conv2d_uses_tensor_cores(int product, const char* dtype, const int64_t* geometry,
                                            int tensor_cores) {
  using namespace masked_ops::gpu;
  if (!KnownProduct(product)) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return Conv2DUsesTensorCores<T>(GeometryOf(geometry), ProductOf(product), MathOf(tensor_cores)) ? 1 : 0;
  });
}

// 1 when conv product (0, 1, 2) of dtype with this geometry and a filter mask
// of `level` (0 element, 1 block) takes the pipelined tensor-core kernels on
// the current device, given 16-byte aligned arrays, else 0.
int masked_ops_gpu_conv2d_uses_pipeline(int product, const char* dtype, const int64_t* geometry, int level,
                                        int tensor_cores) {
  using namespace masked_ops::gpu;
  if (!KnownProduct(product)) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return Conv2DUsesPipeline<T>(GeometryOf(geometry), ProductOf(product), MathOf(tensor_cores), LevelOf(level))
               ? 1
               : 0;
  });
}

// Which matmul products of float16 / bfloat16 take the warpgroup (wgmma)
// tile where the device and build have it: products 0 none (the pipelined
// tile), 1 the forward product (the default), 2 all three. Returns 1 when
// the current device then runs the warpgroup tile for some product, else 0.
int masked_ops_gpu_set_warpgroup_mma(int products) {
  namespace wg = masked_ops::gpu::warpgroup;
  if (products < 0 || products > 2) return 0;
  wg::SetProducts(static_cast<wg::Products>(products));
  return products != 0 && wg::DeviceRunsWarpgroupMma() ? 1 : 0;
}

// on 1: the forward product and dx on the warpgroup tile take tall tiles
// (256 x 128) where they apply (warpgroup::SetTallTiles; off by default).
void masked_ops_gpu_set_warpgroup_tall_tiles(int on) { masked_ops::gpu::warpgroup::SetTallTiles(on != 0); }

// How many launches chosen for the warpgroup tile took the pipelined one
// because a tensor map could not be made, since the library was loaded.
int64_t masked_ops_gpu_tensor_map_refusals() { return masked_ops::gpu::warpgroup::TensorMapRefusals(); }

}  // extern "C"
