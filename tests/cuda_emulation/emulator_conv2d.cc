// The masked_conv2d launchers under the CUDA emulation: the launch sequences
// of cc/kernels/cuda/masked_conv2d_launch.cuh (the GPU launchers' own) run
// with EmulatedLaunch on host arrays.
#include <cuda_runtime.h>

#include <cstdint>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/masked_conv2d_launch.cuh"
#include "tests/cuda_emulation/emulator.h"

using masked_ops::emulation::Arena;
using masked_ops::emulation::CheckNoCopyReads;
using masked_ops::emulation::EmulatedLaunch;

namespace {

// A Conv2DGeometry from its 19 fields, in declaration order.
masked_ops::Conv2DGeometry GeometryOf(const int64_t* f) {
  return masked_ops::Conv2DGeometry{f[0],  f[1],  f[2],  f[3],  f[4],  f[5],  f[6],  f[7],  f[8], f[9],
                                    f[10], f[11], f[12], f[13], f[14], f[15], f[16], f[17], f[18]};
}

}  // namespace

extern "C" {

// product 0: out = y [n, out_h, out_w, cout] from a = x [n, h, w, cin], b =
// filters [kh, kw, cin, cout]; 1: out = dx from a = dy, b = filters; 2: out =
// dfilters from a = x, b = dy. level 0: element mask [kh, kw, cin, cout]; 1:
// block mask [ceil(cin / in_block), ceil(cout / out_block)]. output_mask:
// [n, out_h, out_w] of out_mask_dtype (a mask dtype code), or null (or
// out_mask_dtype < 0) for none; its canonical factors come from the
// launchers' CanonicalOutputFactors sequence, as the CUDA harness makes them.
// Returns as emu_matmul.
int emu_conv2d(int product, int dtype, int mask_dtype, int out_mask_dtype, const int64_t* geometry, const void* a,
               const void* b, const void* mask, int level, const void* output_mask, void* out, int tensor_cores) {
  using namespace masked_ops;
  using namespace masked_ops::emulation;
  const Conv2DGeometry g = GeometryOf(geometry);
  return WithTypes(dtype, mask_dtype, [&](auto element, auto mask_tag) {
    using T = typename decltype(element)::type;
    using TMask = typename decltype(mask_tag)::type;
    using F = ComputeOf<T>;
    Arena arena;
    const int64_t x_count = g.in_pixels() * g.in_channels;
    const int64_t filter_count = g.taps() * g.in_channels * g.out_channels;
    const int64_t dy_count = g.out_pixels() * g.out_channels;
    const int64_t mask_count = level == 0 ? filter_count : g.in_blocks() * g.out_blocks();
    const MaskView<TMask> view{arena.In(static_cast<const TMask*>(mask), mask_count, "mask"), LevelOf(level)};
    F* factors = nullptr;
    if (output_mask != nullptr && out_mask_dtype >= 0) {
      factors = static_cast<F*>(arena.Scratch(g.out_pixels() * int64_t(sizeof(F)), "output factors"));
      const int status = WithMaskType(out_mask_dtype, [&](auto tag) {
        using TOut = typename decltype(tag)::type;
        return gpu::RunCanonicalOutputFactors(
            EmulatedLaunch{}, arena.In(static_cast<const TOut*>(output_mask), g.out_pixels(), "output_mask"),
            g.out_pixels(), factors);
      });
      if (status != 0) return arena.Finish(status);
    }
    void* workspace =
        arena.Scratch(static_cast<int64_t>(gpu::Conv2DWorkspaceBytes<T>(
                          g, view.level, static_cast<gpu::Product>(product), factors != nullptr)),
                      "workspace");
    const gpu::GpuMath math = MathOf(tensor_cores);
    int status = kUnknownType;
    cuda_emulation::Engine::Get().TakeCopyReads();
    // The filters' entry `index` ([tap, cin, cout]) lies in a dead block.
    const auto check_no_read_of_dead_blocks = [&](const T* filters) {
      if (level != 1) return;
      CheckNoCopyReads(filters, filter_count, "a product staged filters in a dead block", [&](int64_t index) {
        const int64_t in = index / g.out_channels % g.in_channels;
        const int64_t out_channel = index % g.out_channels;
        return static_cast<double>(view.data[in / g.in_block * g.out_blocks() + out_channel / g.out_block]) == 0.0;
      });
    };
    switch (product) {
      case 0: {
        const T* filters = arena.In(static_cast<const T*>(b), filter_count, "filters");
        status = gpu::RunForward(EmulatedLaunch{}, g, arena.In(static_cast<const T*>(a), x_count, "x"), filters, view,
                                 factors, arena.InOut(static_cast<T*>(out), dy_count, "y"), workspace, math);
        check_no_read_of_dead_blocks(filters);
        break;
      }
      case 1: {
        const T* filters = arena.In(static_cast<const T*>(b), filter_count, "filters");
        status = gpu::RunGradInput(EmulatedLaunch{}, g, arena.In(static_cast<const T*>(a), dy_count, "dy"), filters,
                                   view, factors, arena.InOut(static_cast<T*>(out), x_count, "dx"), workspace, math);
        check_no_read_of_dead_blocks(filters);
        break;
      }
      case 2:
        status = gpu::RunGradFilter(EmulatedLaunch{}, g, arena.In(static_cast<const T*>(a), x_count, "x"),
                                    arena.In(static_cast<const T*>(b), dy_count, "dy"), view, factors,
                                    arena.InOut(static_cast<T*>(out), filter_count, "dfilters"), workspace, math);
        break;
      default:
        break;
    }
    return arena.Finish(status);
  });
}

// 1 when conv `product` of dtype with this geometry takes the tensor-core
// kernels (Conv2DUsesTensorCores), else 0.
int emu_conv2d_uses_tensor_cores(int product, int dtype, const int64_t* geometry, int tensor_cores) {
  using namespace masked_ops;
  using namespace masked_ops::emulation;
  if (product < 0 || product > 2) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return gpu::Conv2DUsesTensorCores<T>(GeometryOf(geometry), static_cast<gpu::Product>(product),
                                         MathOf(tensor_cores))
               ? 1
               : 0;
  });
}

// 1 when conv `product` of dtype with this geometry and a filter mask of
// `level` (0 element, 1 block) takes the pipelined kernels
// (Conv2DUsesPipeline), else 0.
int emu_conv2d_uses_pipeline(int product, int dtype, const int64_t* geometry, int level, int tensor_cores) {
  using namespace masked_ops;
  using namespace masked_ops::emulation;
  if (product < 0 || product > 2) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return gpu::Conv2DUsesPipeline<T>(GeometryOf(geometry), static_cast<gpu::Product>(product),
                                      MathOf(tensor_cores), LevelOf(level))
               ? 1
               : 0;
  });
}

}  // extern "C"
