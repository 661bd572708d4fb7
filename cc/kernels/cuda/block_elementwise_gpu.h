// The block-masked elementwise ops of block_elementwise.h on NVIDIA GPUs:
// gradient masking, masked variable updates and the fused optimizer steps,
// with the same semantics, over `outer` stacked k x n matrices. T is float,
// double or the storage types Float16Bits / BFloat16Bits (computed in
// ComputeOf<T>: float, double for double). Every launcher needs a device
// workspace of ElementwiseWorkspaceBytes<T>(...) bytes, returns its launches' cudaError_t as an int (0 on success) and does not
// synchronize. The optimizer steps' scalars are pointers to single values of
// type T in device memory (block_elementwise.h's MapScalars), read by the
// kernels, so that no launch waits for a value computed on the device.
// Framework-free and CUDA-header-free, like masked_matmul_gpu.h.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_GPU_H_
#define MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_GPU_H_

#include <cstddef>
#include <cstdint>

#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/masked_matmul_gpu.h"

namespace masked_ops {
namespace gpu {

template <typename T>
size_t ElementwiseWorkspaceBytes(int64_t outer, const BlockGrid& grid, MaskLevel level);

// `bytes` from device memory at `from` to `to`, on `stream` (not
// synchronized): the copy a variable shared with a reader is given before
// a masked update writes it.
int CopyDeviceBytes(const void* from, void* to, size_t bytes, Stream stream);

template <typename T, typename TMask>
int MaskGradient(int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask, T* out,
                 void* workspace, Stream stream);

template <typename T, typename TMask>
int MaskedUpdate(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, UpdateMode mode,
                 const T* value, T* var, void* workspace, Stream stream);

template <typename T, typename TMask>
int MaskedAdamStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                   const AdamStep<const T*>& step, T* var, T* m, T* v, T* v_hat, void* workspace,
                   Stream stream);

template <typename T, typename TMask>
int MaskedSgdStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                  const SgdStep<const T*>& step, T* var, T* momentum, void* workspace, Stream stream);

template <typename T, typename TMask>
int MaskedRmspropStep(int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                      const RmspropStep<const T*>& step, T* var, T* velocity, T* momentum,
                      T* average_grad, void* workspace, Stream stream);

}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_GPU_H_
