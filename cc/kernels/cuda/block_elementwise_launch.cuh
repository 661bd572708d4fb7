// The host side of the block-masked elementwise kernels: the workspace
// layout and each op's launch sequence, written against a launch policy as in
// masked_matmul_launch.cuh (launch(kernel, grid, block, args...) per kernel,
// launch.Status() for the status returned), so that the same sequences run on
// a GPU (block_elementwise_gpu.cu) and under the CUDA emulation of
// tests/cuda_emulation.
//
// Host code only; it includes the device code (block_elementwise_kernels.cuh),
// whose anonymous namespace it shares: include it from one translation unit
// of a program.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_LAUNCH_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/block_elementwise_gpu.h"
#include "cc/kernels/cuda/block_elementwise_kernels.cuh"
#include "cc/kernels/cuda/mask_factors.cuh"

namespace masked_ops {
namespace gpu {
namespace {

int64_t AlignUp(int64_t bytes) { return (bytes + 255) / 256 * 256; }

StackDims DimsOf(int64_t outer, const BlockGrid& grid, MaskLevel level) {
  return StackDims{outer, grid.rows, grid.cols, grid.block_rows, grid.block_cols, grid.grid_rows(),
                   grid.grid_cols(), level == MaskLevel::kElement};
}

int64_t FactorCount(const StackDims& d) {
  return d.element_level ? d.outer * d.rows * d.cols : d.blocks_per_matrix();
}

int64_t LiveCount(const StackDims& d) {
  return d.element_level ? d.outer * d.blocks_per_matrix() : d.blocks_per_matrix();
}

unsigned BlocksFor(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, 65535));
}

// Indexes the mask into the workspace as factors in F, then runs
// body(factors, live, dims, grid of one thread block per weight block), which
// launches the op's kernel.
template <typename F, typename TMask, typename Launch, typename Body>
int Run(const Launch& launch, int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, void* workspace,
        const Body& body) {
  const StackDims d = DimsOf(outer, grid, mask.level);
  const int64_t blocks = outer * d.blocks_per_matrix();
  if (blocks == 0) return 0;
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  F* factors = static_cast<F*>(workspace);
  uint8_t* live = static_cast<uint8_t*>(workspace) + AlignUp(FactorCount(d) * int64_t(sizeof(F)));
  launch(CanonicalFactors<TMask, F>, BlocksFor(FactorCount(d)), kThreads, mask.data, FactorCount(d), factors);
  launch(StackLiveness<F>, BlocksFor(LiveCount(d)), kThreads, factors, d, live);
  body(factors, live, d, dim3(static_cast<unsigned>(blocks)));
  return launch.Status();
}

template <typename T>
using D = typename Device<T>::type;

template <typename T>
D<T>* Dev(T* p) {
  return reinterpret_cast<D<T>*>(p);
}
template <typename T>
const D<T>* Dev(const T* p) {
  return reinterpret_cast<const D<T>*>(p);
}

// A step's scalar pointers as the kernels' device types (a functor, not a
// lambda, since MapScalars is a host and device function).
template <typename T>
struct DevicePointer {
  MASKED_OPS_HOST_DEVICE const D<T>* operator()(const T* scalar) const {
    return reinterpret_cast<const D<T>*>(scalar);
  }
};

template <typename T, template <typename> class Step>
Step<const D<T>*> DeviceScalars(const Step<const T*>& step) {
  return MapScalars<const D<T>*>(step, DevicePointer<T>{});
}

}  // namespace

template <typename T>
size_t ElementwiseWorkspaceBytes(int64_t outer, const BlockGrid& grid, MaskLevel level) {
  const StackDims d = DimsOf(outer, grid, level);
  return static_cast<size_t>(AlignUp(FactorCount(d) * int64_t(sizeof(ComputeOf<T>))) + AlignUp(LiveCount(d)));
}

namespace {

template <typename T, typename TMask, typename Launch>
int RunMaskGradient(const Launch& launch, int64_t outer, const BlockGrid& grid, const T* grad, MaskView<TMask> mask,
                    T* out, void* workspace) {
  return Run<ComputeOf<T>>(launch, outer, grid, mask, workspace,
                           [&](const auto* f, const uint8_t* l, StackDims d, dim3 blocks) {
                             launch(MaskGradientKernel<D<T>>, blocks, kThreads, f, l, d, Dev(grad), Dev(out));
                           });
}

template <typename T, typename TMask, typename Launch>
int RunMaskedUpdate(const Launch& launch, int64_t outer, const BlockGrid& grid, MaskView<TMask> mask,
                    UpdateMode mode, const T* value, T* var, void* workspace) {
  return Run<ComputeOf<T>>(launch, outer, grid, mask, workspace,
                           [&](const auto* f, const uint8_t* l, StackDims d, dim3 blocks) {
                             launch(MaskedUpdateKernel<D<T>>, blocks, kThreads, f, l, d, mode, Dev(value), Dev(var));
                           });
}

template <typename T, typename TMask, typename Launch>
int RunAdamStep(const Launch& launch, int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                const AdamStep<const T*>& step, T* var, T* m, T* v, T* v_hat, void* workspace) {
  return Run<ComputeOf<T>>(launch, outer, grid, mask, workspace,
                           [&](const auto* f, const uint8_t* l, StackDims d, dim3 blocks) {
                             launch(AdamKernel<D<T>>, blocks, kThreads, f, l, d, Dev(grad), DeviceScalars(step),
                                    Dev(var), Dev(m), Dev(v), Dev(v_hat));
                           });
}

template <typename T, typename TMask, typename Launch>
int RunSgdStep(const Launch& launch, int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
               const SgdStep<const T*>& step, T* var, T* momentum, void* workspace) {
  return Run<ComputeOf<T>>(launch, outer, grid, mask, workspace,
                           [&](const auto* f, const uint8_t* l, StackDims d, dim3 blocks) {
                             launch(SgdKernel<D<T>>, blocks, kThreads, f, l, d, Dev(grad), DeviceScalars(step),
                                    Dev(var), Dev(momentum));
                           });
}

template <typename T, typename TMask, typename Launch>
int RunRmspropStep(const Launch& launch, int64_t outer, const BlockGrid& grid, MaskView<TMask> mask, const T* grad,
                   const RmspropStep<const T*>& step, T* var, T* velocity, T* momentum, T* average_grad,
                   void* workspace) {
  return Run<ComputeOf<T>>(launch, outer, grid, mask, workspace,
                           [&](const auto* f, const uint8_t* l, StackDims d, dim3 blocks) {
                             launch(RmspropKernel<D<T>>, blocks, kThreads, f, l, d, Dev(grad), DeviceScalars(step),
                                    Dev(var), Dev(velocity), Dev(momentum), Dev(average_grad));
                           });
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_LAUNCH_CUH_
