// The masked_matmul launchers under the CUDA emulation: the launch sequences
// of cc/kernels/cuda/masked_matmul_launch.cuh (the GPU launchers' own) run
// with EmulatedLaunch on host arrays.
#include <cuda_runtime.h>

#include <cstdint>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/masked_matmul_launch.cuh"
#include "tests/cuda_emulation/emulator.h"

using masked_ops::emulation::Arena;
using masked_ops::emulation::CheckNoCopyReads;
using masked_ops::emulation::EmulatedLaunch;


extern "C" {

// product 0: out[m, n] = a[m, k] @ W (b = W [k, n]); 1: out[m, k] = a[m, n] @
// W^T (b = W); 2: out[k, n] = dW from a = x [m, k], b = dy [m, n]. level 0:
// element mask [k, n]; 1: block mask [ceil(k / block_rows), ceil(n /
// block_cols)]. Returns the launchers' status (0, a cudaError_t), -1000 for
// an unknown type or product, -1001 for a write out of bounds / to an input.
int emu_matmul(int product, int dtype, int mask_dtype, int64_t m, int64_t k, int64_t n, int64_t block_rows,
               int64_t block_cols, const void* a, const void* b, const void* mask, int level, void* out,
               int tensor_cores) {
  using namespace masked_ops;
  using namespace masked_ops::emulation;
  const MatmulShape shape{m, k, n, block_rows, block_cols};
  const BlockGrid grid = shape.weight_grid();
  return WithTypes(dtype, mask_dtype, [&](auto element, auto mask_tag) {
    using T = typename decltype(element)::type;
    using TMask = typename decltype(mask_tag)::type;
    Arena arena;
    const int64_t mask_count = level == 0 ? k * n : grid.grid_rows() * grid.grid_cols();
    const MaskView<TMask> view{arena.In(static_cast<const TMask*>(mask), mask_count, "mask"), LevelOf(level)};
    const int64_t workspace_bytes = product >= 0 && product <= 2 ? static_cast<int64_t>(gpu::GpuWorkspaceBytes<T>(
                                                                       shape, view.level, static_cast<gpu::Product>(product)))
                                                                 : 0;
    void* workspace = arena.Scratch(workspace_bytes, "workspace");
    const gpu::GpuMath math = MathOf(tensor_cores);
    int status = kUnknownType;
    cuda_emulation::Engine::Get().TakeCopyReads();
    // W's entry `index` lies in a dead block of the block mask.
    const auto check_no_read_of_dead_blocks = [&](const T* w) {
      if (level != 1) return;
      CheckNoCopyReads(w, k * n, "a product staged W in a dead block", [&](int64_t index) {
        return static_cast<double>(view.data[index / n / grid.block_rows * grid.grid_cols() +
                                             index % n / grid.block_cols]) == 0.0;
      });
    };
    switch (product) {
      case 0: {
        const T* w = arena.In(static_cast<const T*>(b), k * n, "w");
        status = gpu::RunProduct<T, false>(EmulatedLaunch{}, shape, arena.In(static_cast<const T*>(a), m * k, "x"),
                                           w, view, arena.InOut(static_cast<T*>(out), m * n, "y"), workspace, math);
        check_no_read_of_dead_blocks(w);
        break;
      }
      case 1: {
        const T* w = arena.In(static_cast<const T*>(b), k * n, "w");
        status = gpu::RunProduct<T, true>(EmulatedLaunch{}, shape, arena.In(static_cast<const T*>(a), m * n, "dy"), w,
                                          view, arena.InOut(static_cast<T*>(out), m * k, "dx"), workspace, math);
        check_no_read_of_dead_blocks(w);
        break;
      }
      case 2:
        status = gpu::RunGradWeight<T>(EmulatedLaunch{}, shape, arena.In(static_cast<const T*>(a), m * k, "x"),
                                       arena.In(static_cast<const T*>(b), m * n, "dy"), view,
                                       arena.InOut(static_cast<T*>(out), k * n, "dw"), workspace, math);
        break;
      default:
        break;
    }
    return arena.Finish(status);
  });
}

// 1 when `product` over a k x n weight of dtype takes the tensor-core kernels
// (MatmulUsesTensorCores, with the emulated device's capability), else 0.
int emu_matmul_uses_tensor_cores(int product, int dtype, int64_t k, int64_t n, int64_t block_rows,
                                 int64_t block_cols, int tensor_cores) {
  using namespace masked_ops;
  using namespace masked_ops::emulation;
  if (product < 0 || product > 2) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return gpu::MatmulUsesTensorCores<T>(BlockGrid{k, n, block_rows, block_cols}, static_cast<gpu::Product>(product),
                                         MathOf(tensor_cores))
               ? 1
               : 0;
  });
}

// 1 when `product` over a k x n weight of dtype takes the pipelined
// tensor-core kernels (MatmulUsesPipeline) for a mask of `level` (0 element,
// 1 block), else 0.
int emu_matmul_uses_pipeline(int product, int dtype, int64_t k, int64_t n, int64_t block_rows, int64_t block_cols,
                             int level, int tensor_cores) {
  using namespace masked_ops;
  using namespace masked_ops::emulation;
  if (product < 0 || product > 2) return kUnknownType;
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    using T = typename decltype(element)::type;
    return gpu::MatmulUsesPipeline<T>(BlockGrid{k, n, block_rows, block_cols}, static_cast<gpu::Product>(product),
                                      MathOf(tensor_cores), LevelOf(level))
               ? 1
               : 0;
  });
}

}  // extern "C"
