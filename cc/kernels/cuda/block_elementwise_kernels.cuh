// Device code of the block-masked elementwise kernels (see
// block_elementwise_gpu.cu for the launchers and block_elementwise_launch.cuh
// for the launch sequences), in an anonymous namespace. Device code only, so
// that a host compiler with the CUDA emulation of tests/cuda_emulation
// compiles it too. Include it from one translation unit of a program.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_KERNELS_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_KERNELS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "cc/kernels/block_elementwise.h"
#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/mask_factors.cuh"

namespace masked_ops {
namespace gpu {
namespace {

struct StackDims {
  int64_t outer, rows, cols, block_rows, block_cols, grid_rows, grid_cols;
  bool element_level;
  __host__ __device__ int64_t blocks_per_matrix() const { return grid_rows * grid_cols; }
};

// live[(o * grid_rows + i) * grid_cols + j] for element masks (each matrix
// has its own), live[i * grid_cols + j] for block masks (shared).
template <typename F>
__global__ void StackLiveness(const F* factors, StackDims d, uint8_t* live) {
  const int64_t count = d.element_level ? d.outer * d.blocks_per_matrix() : d.blocks_per_matrix();
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < count;
       b += int64_t(gridDim.x) * blockDim.x) {
    bool any = false;
    if (!d.element_level) {
      any = Live(factors[b]);
    } else {
      const int64_t o = b / d.blocks_per_matrix();
      const int64_t i = (b % d.blocks_per_matrix()) / d.grid_cols;
      const int64_t j = b % d.grid_cols;
      const int64_t r_end = min(d.rows, (i + 1) * d.block_rows);
      const int64_t c_end = min(d.cols, (j + 1) * d.block_cols);
      for (int64_t r = i * d.block_rows; r < r_end && !any; ++r) {
        const F* row = factors + (o * d.rows + r) * d.cols;
        for (int64_t c = j * d.block_cols; c < c_end && !any; ++c) any = Live(row[c]);
      }
    }
    live[b] = any ? 1 : 0;
  }
}

// Calls op(offset, factor) for every entry of the weight block this thread
// block owns (blockIdx.x = (o * grid_rows + i) * grid_cols + j): where the
// mask is live when `live_only` (a dead block then does nothing), else
// everywhere, dead entries with factor +0.
template <typename F, typename Op>
__device__ void ForBlock(const F* factors, const uint8_t* live, StackDims d, bool live_only,
                         const Op& op) {
  const int64_t b = blockIdx.x;
  const int64_t o = b / d.blocks_per_matrix();
  const int64_t block = b % d.blocks_per_matrix();
  const int64_t i = block / d.grid_cols;
  const int64_t j = block % d.grid_cols;
  const bool block_live = live[d.element_level ? b : block] != 0;
  if (live_only && !block_live) return;
  const int64_t r0 = i * d.block_rows;
  const int64_t c0 = j * d.block_cols;
  const int64_t rows = min(d.rows - r0, d.block_rows);
  const int64_t cols = min(d.cols - c0, d.block_cols);
  for (int64_t e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int64_t offset = (o * d.rows + r0 + e / cols) * d.cols + c0 + e % cols;
    const F factor = !block_live ? F(0) : d.element_level ? factors[offset] : factors[block];
    if (live_only && !Live(factor)) continue;
    op(offset, factor);
  }
}

template <typename T>
__global__ void MaskGradientKernel(const Compute<T>* factors, const uint8_t* live, StackDims d, const T* grad,
                                   T* out) {
  ForBlock(factors, live, d, /*live_only=*/false, [&](int64_t i, Compute<T> factor) {
    // A dead entry is written without its gradient being read; a live one is
    // scaled by its factor rounded to T, as tf.cast(mask, T) rounds it.
    out[i] = FromCompute<T>(Live(factor) ? ToCompute(grad[i]) * ToCompute(FromCompute<T>(factor)) : Compute<T>(0));
  });
}

template <typename T>
__global__ void MaskedUpdateKernel(const Compute<T>* factors, const uint8_t* live, StackDims d,
                                   UpdateMode mode, const T* value, T* var) {
  ForBlock(factors, live, d, /*live_only=*/true, [&](int64_t i, Compute<T>) {
    const Compute<T> v = ToCompute(value[i]);
    const Compute<T> w = ToCompute(var[i]);
    var[i] = FromCompute<T>(mode == UpdateMode::kAssign ? v : mode == UpdateMode::kAdd ? w + v : w - v);
  });
}

// A step's scalars, read from device memory (every thread reads the same
// few words), as the kernels compute them.
template <typename T, template <typename> class Step>
__device__ Step<Compute<T>> ReadScalars(const Step<const T*>& scalars) {
  return MapScalars<Compute<T>>(scalars, [](const T* scalar) { return ToCompute(*scalar); });
}

template <typename T>
__global__ void AdamKernel(const Compute<T>* factors, const uint8_t* live, StackDims d, const T* grad,
                           AdamStep<const T*> scalars, T* var, T* m, T* v, T* v_hat) {
  const auto step = ReadScalars(scalars);
  ForBlock(factors, live, d, /*live_only=*/true, [&](int64_t i, Compute<T>) {
    Compute<T> w = ToCompute(var[i]);
    if (step.weight_decay != Compute<T>(0)) w -= w * step.weight_decay * step.learning_rate;
    const Compute<T> g = ToCompute(grad[i]);
    const Compute<T> m_new = ToCompute(m[i]) + (g - ToCompute(m[i])) * step.one_minus_beta_1;
    const Compute<T> v_new = ToCompute(v[i]) + (g * g - ToCompute(v[i])) * step.one_minus_beta_2;
    Compute<T> second = v_new;
    if (step.amsgrad) {
      // Keeps a NaN of either side, as Keras's ops.maximum does (fmaxf drops it).
      const Compute<T> previous = ToCompute(v_hat[i]);
      second = v_new < previous || isnan(previous) ? previous : v_new;
      v_hat[i] = FromCompute<T>(second);
    }
    m[i] = FromCompute<T>(m_new);
    v[i] = FromCompute<T>(v_new);
    var[i] = FromCompute<T>(w - (m_new * step.alpha) / (sqrt(second) + step.epsilon));
  });
}

template <typename T>
__global__ void SgdKernel(const Compute<T>* factors, const uint8_t* live, StackDims d, const T* grad,
                          SgdStep<const T*> scalars, T* var, T* momentum) {
  const auto step = ReadScalars(scalars);
  ForBlock(factors, live, d, /*live_only=*/true, [&](int64_t i, Compute<T>) {
    Compute<T> w = ToCompute(var[i]);
    if (step.weight_decay != Compute<T>(0)) w -= w * step.weight_decay * step.learning_rate;
    const Compute<T> scaled = ToCompute(grad[i]) * step.learning_rate;
    if (momentum == nullptr) {
      var[i] = FromCompute<T>(w - scaled);
      return;
    }
    const Compute<T> m_new = ToCompute(momentum[i]) * step.momentum - scaled;
    momentum[i] = FromCompute<T>(m_new);
    var[i] = FromCompute<T>(w + (step.nesterov ? m_new * step.momentum - scaled : m_new));
  });
}

template <typename T>
__global__ void RmspropKernel(const Compute<T>* factors, const uint8_t* live, StackDims d, const T* grad,
                              RmspropStep<const T*> scalars, T* var, T* velocity, T* momentum, T* average_grad) {
  const auto step = ReadScalars(scalars);
  ForBlock(factors, live, d, /*live_only=*/true, [&](int64_t i, Compute<T>) {
    Compute<T> w = ToCompute(var[i]);
    if (step.weight_decay != Compute<T>(0)) w -= w * step.weight_decay * step.learning_rate;
    const Compute<T> g = ToCompute(grad[i]);
    const Compute<T> velocity_new = step.rho * ToCompute(velocity[i]) + step.one_minus_rho * (g * g);
    Compute<T> denominator = velocity_new + step.epsilon;
    if (step.centered) {
      const Compute<T> average_new = step.rho * ToCompute(average_grad[i]) + step.one_minus_rho * g;
      denominator = velocity_new - average_new * average_new + step.epsilon;
      average_grad[i] = FromCompute<T>(average_new);
    }
    velocity[i] = FromCompute<T>(velocity_new);
    const Compute<T> increment = (step.learning_rate * g) / sqrt(denominator);
    if (momentum == nullptr) {
      var[i] = FromCompute<T>(w - increment);
      return;
    }
    const Compute<T> momentum_new = step.momentum * ToCompute(momentum[i]) + increment;
    momentum[i] = FromCompute<T>(momentum_new);
    var[i] = FromCompute<T>(w - momentum_new);
  });
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_BLOCK_ELEMENTWISE_KERNELS_CUH_
