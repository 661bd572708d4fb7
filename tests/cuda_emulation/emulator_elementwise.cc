// The block-masked elementwise launchers under the CUDA emulation: the launch
// sequences of cc/kernels/cuda/block_elementwise_launch.cuh (the GPU
// launchers' own) run with EmulatedLaunch on host arrays.
#include <cuda_runtime.h>

#include <cstdint>

#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/block_elementwise_launch.cuh"
#include "tests/cuda_emulation/emulator.h"

using masked_ops::emulation::Arena;
using masked_ops::emulation::EmulatedLaunch;

extern "C" {

// Over `outer` stacked k x n matrices (element masks: one per matrix, [outer,
// k, n]; block masks: one [ceil(k / block_rows), ceil(n / block_cols)] for
// all). op 0: mask_gradient (a = grad, out); 1/2/3: masked_update assign /
// add / sub (a = value, out = var); 4: adam (a = grad, out = var, state = m,
// v, v_hat or null; scalars = alpha, 1 - beta_1, 1 - beta_2, epsilon,
// learning_rate, weight_decay; flag = amsgrad); 5: sgd (state = momentum or
// null; scalars = learning_rate, momentum, weight_decay; flag = nesterov); 6:
// rmsprop (state = velocity, momentum or null, average_grad or null; scalars
// = learning_rate, rho, 1 - rho, momentum, epsilon, weight_decay; flag =
// centered), as the CUDA harness numbers them; scalars: those values in
// dtype. Returns as emu_matmul.
int emu_elementwise(int op, int dtype, int mask_dtype, int64_t outer, int64_t k, int64_t n, int64_t block_rows,
                    int64_t block_cols, const void* a, const void* mask, int level, void* out, void* const* state,
                    const void* scalars, int flag) {
  using namespace masked_ops;
  using namespace masked_ops::emulation;
  const BlockGrid grid{k, n, block_rows, block_cols};
  return WithTypes(dtype, mask_dtype, [&](auto element, auto mask_tag) {
    using T = typename decltype(element)::type;
    using TMask = typename decltype(mask_tag)::type;
    Arena arena;
    const int64_t count = outer * k * n;
    const int64_t mask_count = level == 0 ? count : grid.grid_rows() * grid.grid_cols();
    const MaskView<TMask> view{arena.In(static_cast<const TMask*>(mask), mask_count, "mask"), LevelOf(level)};
    void* workspace =
        arena.Scratch(static_cast<int64_t>(gpu::ElementwiseWorkspaceBytes<T>(outer, grid, view.level)), "workspace");
    const T* in = arena.In(static_cast<const T*>(a), count, op >= 1 && op <= 3 ? "value" : "grad");
    T* var = arena.InOut(static_cast<T*>(out), count, op == 0 ? "out" : "var");
    T* s0 = arena.InOut(static_cast<T*>(state[0]), count, "state[0]");
    T* s1 = arena.InOut(static_cast<T*>(state[1]), count, "state[1]");
    T* s2 = arena.InOut(static_cast<T*>(state[2]), count, "state[2]");
    const T* p = arena.In(static_cast<const T*>(scalars), 6, "scalars");
    int status = kUnknownType;
    switch (op) {
      case 0:
        status = gpu::RunMaskGradient(EmulatedLaunch{}, outer, grid, in, view, var, workspace);
        break;
      case 1:
      case 2:
      case 3: {
        const UpdateMode mode = op == 1 ? UpdateMode::kAssign : op == 2 ? UpdateMode::kAdd : UpdateMode::kSub;
        status = gpu::RunMaskedUpdate(EmulatedLaunch{}, outer, grid, view, mode, in, var, workspace);
        break;
      }
      case 4: {
        const AdamStep<const T*> step{p, p + 1, p + 2, p + 3, p + 4, p + 5, flag != 0};
        status = gpu::RunAdamStep(EmulatedLaunch{}, outer, grid, view, in, step, var, s0, s1, s2, workspace);
        break;
      }
      case 5: {
        const SgdStep<const T*> step{p, p + 1, flag != 0, p + 2};
        status = gpu::RunSgdStep(EmulatedLaunch{}, outer, grid, view, in, step, var, s0, workspace);
        break;
      }
      case 6: {
        const RmspropStep<const T*> step{p, p + 1, p + 2, p + 3, p + 4, flag != 0, p + 5};
        status = gpu::RunRmspropStep(EmulatedLaunch{}, outer, grid, view, in, step, var, s0, s1, s2, workspace);
        break;
      }
      default:
        break;
    }
    return arena.Finish(status);
  });
}

}  // extern "C"
