// CUDA kernels for the block-masked elementwise ops (see
// block_elementwise_gpu.h). The mask becomes canonical factors and a liveness
// flag per block of each matrix; then one thread block per weight block does
// the block's work, or, for a dead block, nothing at all (gradient masking
// writes its zeros without reading the gradient).
//
// The kernels are in block_elementwise_kernels.cuh and their launch sequences
// in block_elementwise_launch.cuh; this file launches them on a stream.
#include <cuda_runtime.h>

#include "cc/kernels/cuda/block_elementwise_gpu.h"
#include "cc/kernels/cuda/block_elementwise_launch.cuh"
#include "cc/kernels/cuda/cuda_launch.cuh"

namespace masked_ops {
namespace gpu {

int CopyDeviceBytes(const void* from, void* to, size_t bytes, Stream stream) {
  return static_cast<int>(
      cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, reinterpret_cast<cudaStream_t>(stream)));
}

template <typename T, typename TMask>
int MaskGradient(int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask, T* out,
                 void* workspace, Stream stream) {
  return RunMaskGradient(OnStream(stream), outer, grid, grad, mask, out, workspace);
}

template <typename T, typename TMask>
int MaskedUpdate(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, UpdateMode mode,
                 const T* value, T* var, void* workspace, Stream stream) {
  return RunMaskedUpdate(OnStream(stream), outer, grid, mask, mode, value, var, workspace);
}

template <typename T, typename TMask>
int MaskedAdamStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                   const AdamStep<const T*>& step, T* var, T* m, T* v, T* v_hat, void* workspace,
                   Stream stream) {
  return RunAdamStep(OnStream(stream), outer, grid, mask, grad, step, var, m, v, v_hat, workspace);
}

template <typename T, typename TMask>
int MaskedSgdStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                  const SgdStep<const T*>& step, T* var, T* momentum, void* workspace, Stream stream) {
  return RunSgdStep(OnStream(stream), outer, grid, mask, grad, step, var, momentum, workspace);
}

template <typename T, typename TMask>
int MaskedRmspropStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                      const RmspropStep<const T*>& step, T* var, T* velocity, T* momentum,
                      T* average_grad, void* workspace, Stream stream) {
  return RunRmspropStep(OnStream(stream), outer, grid, mask, grad, step, var, velocity, momentum, average_grad,
                        workspace);
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                                 \
  template int MaskGradient<T, TMask>(int64_t, const BlockGrid&, const T*, MaskView<TMask>, T*,          \
                                      void*, Stream);                                                    \
  template int MaskedUpdate<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, UpdateMode,            \
                                      const T*, T*, void*, Stream);                                      \
  template int MaskedAdamStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, const T*,            \
                                        const AdamStep<const T*>&, T*, T*, T*, T*, void*, Stream);       \
  template int MaskedSgdStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, const T*,             \
                                       const SgdStep<const T*>&, T*, T*, void*, Stream);                 \
  template int MaskedRmspropStep<T, TMask>(int64_t, const BlockGrid&, MaskView<TMask>, const T*,         \
                                           const RmspropStep<const T*>&, T*, T*, T*, T*, void*, Stream);

MASKED_OPS_FOR_EACH_GPU_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

#define MASKED_OPS_INSTANTIATE(T) template size_t ElementwiseWorkspaceBytes<T>(int64_t, const BlockGrid&, MaskLevel);

MASKED_OPS_FOR_EACH_GPU_TYPE(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace gpu
}  // namespace masked_ops
