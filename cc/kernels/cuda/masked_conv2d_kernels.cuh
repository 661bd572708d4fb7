// Device code of the masked_conv2d kernels (see masked_conv2d_gpu.cu for the
// launchers and masked_conv2d_launch.cuh for the launch sequences): the
// kernels and the device view of the geometry, in an anonymous namespace.
// Device code only, so that a host compiler with the CUDA emulation of
// tests/cuda_emulation compiles it too. Include it from one translation unit
// of a program.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_KERNELS_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/pipelined_gemm.cuh"
#include "cc/kernels/cuda/ptx_primitives.cuh"
#include "cc/kernels/cuda/tensor_core_tile.cuh"
#include "cc/kernels/cuda/warpgroup_gemm.cuh"

namespace masked_ops {
namespace gpu {
namespace {

// Conv2DGeometry as the device reads it.
struct ConvDims {
  int64_t batch, in_h, in_w, in_channels, filter_h, filter_w, out_channels;
  int64_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, out_h, out_w;
  int64_t in_block, out_block, tile_h, tile_w;
  bool element_level;
  __host__ __device__ int64_t taps() const { return filter_h * filter_w; }
  __host__ __device__ int64_t in_blocks() const { return CeilDiv(in_channels, in_block); }
  __host__ __device__ int64_t out_blocks() const { return CeilDiv(out_channels, out_block); }
  __host__ __device__ int64_t tiles_h() const { return CeilDiv(out_h, tile_h); }
  __host__ __device__ int64_t tiles_w() const { return CeilDiv(out_w, tile_w); }
  // The filter factor of (tap, ci, co).
  template <typename F>
  __device__ F factor(const F* factors, int64_t tap, int64_t ci, int64_t co) const {
    return element_level ? factors[(tap * in_channels + ci) * out_channels + co]
                         : factors[(ci / in_block) * out_blocks() + co / out_block];
  }
};

// live[(tap * in_blocks + i) * out_blocks + j]: block (i, j) at the tap holds
// a live factor.
template <typename F>
__global__ void FilterLiveness(const F* factors, ConvDims d, uint8_t* live) {
  const int64_t count = d.taps() * d.in_blocks() * d.out_blocks();
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < count;
       b += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = b % d.out_blocks();
    const int64_t i = (b / d.out_blocks()) % d.in_blocks();
    const int64_t tap = b / (d.out_blocks() * d.in_blocks());
    bool any = false;
    if (!d.element_level) {
      any = Live(factors[i * d.out_blocks() + j]);
    } else {
      const int64_t ci_end = min(d.in_channels, (i + 1) * d.in_block);
      const int64_t co_end = min(d.out_channels, (j + 1) * d.out_block);
      for (int64_t ci = i * d.in_block; ci < ci_end && !any; ++ci) {
        for (int64_t co = j * d.out_block; co < co_end && !any; ++co) any = Live(d.factor(factors, tap, ci, co));
      }
    }
    live[b] = any ? 1 : 0;
  }
}

// by_output: per output block j, the live (tap * in_blocks + i); else per
// input block i, the live (tap * out_blocks + j).
__global__ void FilterLists(const uint8_t* live, ConvDims d, bool by_output, int32_t* lists, int32_t* counts) {
  const int64_t groups = by_output ? d.out_blocks() : d.in_blocks();
  const int64_t capacity = d.taps() * (by_output ? d.in_blocks() : d.out_blocks());
  for (int64_t group = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; group < groups;
       group += int64_t(gridDim.x) * blockDim.x) {
    int32_t count = 0;
    for (int64_t tap = 0; tap < d.taps(); ++tap) {
      const int64_t others = by_output ? d.in_blocks() : d.out_blocks();
      for (int64_t o = 0; o < others; ++o) {
        const int64_t i = by_output ? o : group;
        const int64_t j = by_output ? group : o;
        if (live[(tap * d.in_blocks() + i) * d.out_blocks() + j]) {
          lists[group * capacity + count++] = static_cast<int32_t>(tap * others + o);
        }
      }
    }
    counts[group] = count;
  }
}

// active[t] for output tile t (n, tile row, tile column): some output factor
// in it is live; all tiles without an output mask.
template <typename F>
__global__ void TileActivity(const F* output_factors, ConvDims d, uint8_t* active) {
  const int64_t tiles = d.batch * d.tiles_h() * d.tiles_w();
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < tiles;
       t += int64_t(gridDim.x) * blockDim.x) {
    if (output_factors == nullptr) {
      active[t] = 1;
      continue;
    }
    const int64_t n = t / (d.tiles_h() * d.tiles_w());
    const int64_t oy0 = ((t / d.tiles_w()) % d.tiles_h()) * d.tile_h;
    const int64_t ox0 = (t % d.tiles_w()) * d.tile_w;
    bool any = false;
    for (int64_t oy = oy0; oy < min(d.out_h, oy0 + d.tile_h) && !any; ++oy) {
      for (int64_t ox = ox0; ox < min(d.out_w, ox0 + d.tile_w) && !any; ++ox) {
        any = Live(output_factors[(n * d.out_h + oy) * d.out_w + ox]);
      }
    }
    active[t] = any ? 1 : 0;
  }
}

// The output pixel (sy / stride_h, sx / stride_w) of image n, where (sy, sx)
// is an input pixel's place in the padded input less a tap's reach, or -1
// where that is no output pixel (negative, between strides, or past the
// output). In Int arithmetic: int64_t, or int32_t where the pipelined rule
// keeps the coordinates under 2^30 (32-bit divisions, not the subroutine a
// 64-bit one is).
template <typename Int>
__device__ inline int64_t OutputPixelOfShift(const ConvDims& d, int64_t n, Int sy, Int sx) {
  using Unsigned = std::make_unsigned_t<Int>;
  if (sy < 0 || sx < 0) return -1;
  const Unsigned stride_h = static_cast<Unsigned>(d.stride_h);
  const Unsigned stride_w = static_cast<Unsigned>(d.stride_w);
  if (static_cast<Unsigned>(sy) % stride_h != 0 || static_cast<Unsigned>(sx) % stride_w != 0) return -1;
  const int64_t oy = static_cast<int64_t>(static_cast<Unsigned>(sy) / stride_h);
  const int64_t ox = static_cast<int64_t>(static_cast<Unsigned>(sx) / stride_w);
  if (oy >= d.out_h || ox >= d.out_w) return -1;
  return (n * d.out_h + oy) * d.out_w + ox;
}

// The output pixel that input pixel (iy, ix) meets at tap (ky, kx), or -1.
__device__ inline int64_t OutputPixelAt(const ConvDims& d, int64_t n, int64_t iy, int64_t ix, int64_t ky,
                                        int64_t kx) {
  return OutputPixelOfShift(d, n, iy + d.pad_top - ky * d.dilation_h, ix + d.pad_left - kx * d.dilation_w);
}

template <typename C>
__device__ inline C OutputScaled(const C* output_factors, int64_t pixel, C value) {
  if (output_factors == nullptr) return value;
  const C factor = output_factors[pixel];
  return Live(factor) ? value * factor : C(0);
}

// blockIdx.x: output tile (n, tile row, tile column) and a chunk of 64 of its
// pixels; blockIdx.y: output block; blockIdx.z: 64 of its channels.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ConvForward(const T* x, const T* filters, const Compute<T>* factors, const Compute<T>* output_factors,
                const uint8_t* active, ConvDims d, const int32_t* lists, const int32_t* counts, T* y) {
  __shared__ Compute<T> a_tile[kDepthStep][kTile + 1];
  __shared__ Compute<T> b_tile[kDepthStep][kTile + 1];
  const int64_t chunks = (d.tile_h * d.tile_w + kTile - 1) / kTile;
  const int64_t tile = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int64_t n = tile / (d.tiles_h() * d.tiles_w());
  const int64_t oy0 = ((tile / d.tiles_w()) % d.tiles_h()) * d.tile_h;
  const int64_t ox0 = (tile % d.tiles_w()) * d.tile_w;
  const int64_t tile_w = min(d.tile_w, d.out_w - ox0);
  const int64_t tile_pixels = min(d.tile_h, d.out_h - oy0) * tile_w;
  const int64_t j = blockIdx.y;
  const int64_t col0 = j * d.out_block + int64_t(blockIdx.z) * kTile;
  const int64_t col_end = min(d.out_channels, (j + 1) * d.out_block);
  const int64_t q0 = chunk * kTile;
  if (q0 >= tile_pixels || col0 >= col_end) return;
  auto pixel_of = [&](int64_t q) { return (n * d.out_h + oy0 + q / tile_w) * d.out_w + ox0 + q % tile_w; };
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  Compute<T> acc[kPerThread][kPerThread] = {};
  const bool tile_active = active[tile] != 0;
  if (tile_active) {
    const int64_t capacity = d.taps() * d.in_blocks();
    for (int p = 0; p < counts[j]; ++p) {
      const int64_t entry = lists[j * capacity + p];
      const int64_t tap = entry / d.in_blocks();
      const int64_t i = entry % d.in_blocks();
      const int64_t ky = tap / d.filter_w;
      const int64_t kx = tap % d.filter_w;
      const int64_t ci_end = min(d.in_channels, (i + 1) * d.in_block);
      for (int64_t c0 = i * d.in_block; c0 < ci_end; c0 += kDepthStep) {
        for (int e = threadIdx.x; e < kDepthStep * kTile; e += kThreads) {
          const int dd = e / kTile;
          const int rr = e % kTile;
          const int64_t ci = c0 + dd;
          const int64_t q = q0 + rr;
          Compute<T> a = 0;
          if (ci < ci_end && q < tile_pixels) {
            const int64_t iy = (oy0 + q / tile_w) * d.stride_h - d.pad_top + ky * d.dilation_h;
            const int64_t ix = (ox0 + q % tile_w) * d.stride_w - d.pad_left + kx * d.dilation_w;
            if (iy >= 0 && iy < d.in_h && ix >= 0 && ix < d.in_w) {
              a = ToCompute(x[((n * d.in_h + iy) * d.in_w + ix) * d.in_channels + ci]);
            }
          }
          a_tile[dd][rr] = a;
          const int64_t co = col0 + rr;
          b_tile[dd][rr] = (ci < ci_end && co < col_end)
                               ? Masked(ToCompute(filters[(tap * d.in_channels + ci) * d.out_channels + co]),
                                        d.factor(factors, tap, ci, co))
                               : 0.0f;
        }
        __syncthreads();
        AccumulateStage(a_tile, b_tile, acc, tx, ty);
        __syncthreads();
      }
    }
  }
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t q = q0 + ty + 16 * r;
    if (q >= tile_pixels) continue;
    const int64_t pixel = pixel_of(q);
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t co = col0 + tx + 16 * c;
      if (co >= col_end) continue;
      y[pixel * d.out_channels + co] =
          FromCompute<T>(tile_active ? OutputScaled(output_factors, pixel, acc[r][c]) : 0.0f);
    }
  }
}

// blockIdx.x: 64 input pixels in raster order; blockIdx.y: input block;
// blockIdx.z: 64 of its channels.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ConvGradInput(const T* dy, const T* filters, const Compute<T>* factors, const Compute<T>* output_factors, ConvDims d,
                  const int32_t* lists, const int32_t* counts, T* dx) {
  __shared__ Compute<T> a_tile[kDepthStep][kTile + 1];
  __shared__ Compute<T> b_tile[kDepthStep][kTile + 1];
  const int64_t pixels = d.batch * d.in_h * d.in_w;
  const int64_t p0 = int64_t(blockIdx.x) * kTile;
  const int64_t i = blockIdx.y;
  const int64_t col0 = i * d.in_block + int64_t(blockIdx.z) * kTile;
  const int64_t col_end = min(d.in_channels, (i + 1) * d.in_block);
  if (col0 >= col_end) return;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  Compute<T> acc[kPerThread][kPerThread] = {};
  const int64_t capacity = d.taps() * d.out_blocks();
  for (int p = 0; p < counts[i]; ++p) {
    const int64_t entry = lists[i * capacity + p];
    const int64_t tap = entry / d.out_blocks();
    const int64_t j = entry % d.out_blocks();
    const int64_t ky = tap / d.filter_w;
    const int64_t kx = tap % d.filter_w;
    const int64_t co_end = min(d.out_channels, (j + 1) * d.out_block);
    for (int64_t c0 = j * d.out_block; c0 < co_end; c0 += kDepthStep) {
      for (int e = threadIdx.x; e < kDepthStep * kTile; e += kThreads) {
        const int dd = e / kTile;
        const int rr = e % kTile;
        const int64_t co = c0 + dd;
        const int64_t pixel = p0 + rr;
        Compute<T> a = 0;
        if (co < co_end && pixel < pixels) {
          const int64_t n = pixel / (d.in_h * d.in_w);
          const int64_t at = OutputPixelAt(d, n, (pixel / d.in_w) % d.in_h, pixel % d.in_w, ky, kx);
          if (at >= 0) a = OutputScaled(output_factors, at, ToCompute(dy[at * d.out_channels + co]));
        }
        a_tile[dd][rr] = a;
        const int64_t ci = col0 + rr;
        b_tile[dd][rr] = (co < co_end && ci < col_end)
                             ? Masked(ToCompute(filters[(tap * d.in_channels + ci) * d.out_channels + co]),
                                      d.factor(factors, tap, ci, co))
                             : 0.0f;
      }
      __syncthreads();
      AccumulateStage(a_tile, b_tile, acc, tx, ty);
      __syncthreads();
    }
  }
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t pixel = p0 + ty + 16 * r;
    if (pixel >= pixels) continue;
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t ci = col0 + tx + 16 * c;
      if (ci < col_end) dx[pixel * d.in_channels + ci] = FromCompute<T>(acc[r][c]);
    }
  }
}

// blockIdx.x: filter block (tap, i, j) (x allows far more blocks than y);
// blockIdx.y: 64 x 64 of it. A dead block is written as zeros, unread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ConvGradFilter(const T* x, const T* dy, const Compute<T>* factors, const Compute<T>* output_factors,
                   const uint8_t* live, ConvDims d, T* dfilters) {
  __shared__ Compute<T> x_tile[kDepthStep][kTile + 1];
  __shared__ Compute<T> dy_tile[kDepthStep][kTile + 1];
  const int64_t block = blockIdx.x;
  const int64_t j = block % d.out_blocks();
  const int64_t i = (block / d.out_blocks()) % d.in_blocks();
  const int64_t tap = block / (d.out_blocks() * d.in_blocks());
  const int64_t ky = tap / d.filter_w;
  const int64_t kx = tap % d.filter_w;
  const int64_t across = (min(d.out_block, d.out_channels) + kTile - 1) / kTile;
  const int64_t ci0 = i * d.in_block + int64_t(blockIdx.y / across) * kTile;
  const int64_t co0 = j * d.out_block + int64_t(blockIdx.y % across) * kTile;
  const int64_t ci_end = min(d.in_channels, (i + 1) * d.in_block);
  const int64_t co_end = min(d.out_channels, (j + 1) * d.out_block);
  if (ci0 >= ci_end || co0 >= co_end) return;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  Compute<T> acc[kPerThread][kPerThread] = {};
  const bool block_live = live[block] != 0;
  const int64_t pixels = d.batch * d.out_h * d.out_w;
  if (block_live) {
    for (int64_t p0 = 0; p0 < pixels; p0 += kDepthStep) {
      for (int e = threadIdx.x; e < kDepthStep * kTile; e += kThreads) {
        const int dd = e / kTile;
        const int rr = e % kTile;
        const int64_t pixel = p0 + dd;
        Compute<T> xv = 0;
        Compute<T> dv = 0;
        if (pixel < pixels) {
          const int64_t n = pixel / (d.out_h * d.out_w);
          const int64_t iy = ((pixel / d.out_w) % d.out_h) * d.stride_h - d.pad_top + ky * d.dilation_h;
          const int64_t ix = (pixel % d.out_w) * d.stride_w - d.pad_left + kx * d.dilation_w;
          if (ci0 + rr < ci_end && iy >= 0 && iy < d.in_h && ix >= 0 && ix < d.in_w) {
            xv = ToCompute(x[((n * d.in_h + iy) * d.in_w + ix) * d.in_channels + ci0 + rr]);
          }
          if (co0 + rr < co_end) {
            dv = OutputScaled(output_factors, pixel, ToCompute(dy[pixel * d.out_channels + co0 + rr]));
          }
        }
        x_tile[dd][rr] = xv;
        dy_tile[dd][rr] = dv;
      }
      __syncthreads();
      AccumulateStage(x_tile, dy_tile, acc, tx, ty);
      __syncthreads();
    }
  }
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t ci = ci0 + ty + 16 * r;
    if (ci >= ci_end) continue;
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t co = co0 + tx + 16 * c;
      if (co >= co_end) continue;
      const Compute<T> value = block_live ? Masked(acc[r][c], d.factor(factors, tap, ci, co)) : Compute<T>(0);
      dfilters[(tap * d.in_channels + ci) * d.out_channels + co] = FromCompute<T>(value);
    }
  }
}

namespace tc = tensor_core;

// The input pixel (as an offset into x, in pixels) that output pixel
// `pixel` reads at tap (ky, kx), or -1 in the padding.
__device__ inline int64_t InputPixelAt(const ConvDims& d, int64_t pixel, int64_t ky, int64_t kx) {
  const int64_t n = pixel / (d.out_h * d.out_w);
  const int64_t iy = ((pixel / d.out_w) % d.out_h) * d.stride_h - d.pad_top + ky * d.dilation_h;
  const int64_t ix = (pixel % d.out_w) * d.stride_w - d.pad_left + kx * d.dilation_w;
  if (iy < 0 || iy >= d.in_h || ix < 0 || ix >= d.in_w) return -1;
  return (n * d.in_h + iy) * d.in_w + ix;
}

// The fragments of this warp whose 16-row strips hold a row for which
// row_on(row) is true (rows are the tile's, 0 .. kTileRows - 1).
template <typename RowOn>
__device__ inline unsigned WarpRowFragments(const RowOn& row_on) {
  const int warp_row = tc::ThisWarp().row;
  unsigned fragments = 0;
  for (int i = 0; i < 2; ++i) {
    bool any = false;
    for (int r = 0; r < tc::kFragment && !any; ++r) any = row_on((warp_row * 2 + i) * tc::kFragment + r);
    if (any) fragments |= 3u << (i * 2);
  }
  return fragments;
}

// The forward conv on tensor cores, an implicit GEMM: rows are output pixels
// grouped by output tile (row t * P + q is pixel q, in raster order, of tile
// t, P = tile_h * tile_w; rows past a partial tile's pixels are empty),
// columns output channels, and the depth runs over the (tap, input block)
// segments. blockIdx.x walks the kTileRows x kTileCols tiles, columns
// fastest. A segment is staged only when one of the tile's 16-channel strips
// lies in a live filter block of it, and a warp multiplies only its strips in
// live blocks and its 16-row strips holding a pixel of an active output tile.
template <typename T>
__global__ void __launch_bounds__(tc::kThreads)
    TensorCoreConvForward(const T* x, const T* filters, const Compute<T>* factors, const Compute<T>* output_factors,
                          const uint8_t* live, const uint8_t* active, ConvDims d, T* y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  using Smem = typename tc::Traits<T>::Smem;
  __shared__ __align__(128) unsigned char shared[tc::kSharedBytes<T>];
  __shared__ int64_t row_pixel[tc::kTileRows];  // output pixel of each row, or -1
  Smem* a_tile = reinterpret_cast<Smem*>(shared);
  Smem* b_tile = reinterpret_cast<Smem*>(shared + tc::kABytes<T>);
  constexpr int kAStride = tc::kRowMajorAStride<T>;
  const int64_t per_tile = d.tile_h * d.tile_w;
  const int64_t tiles = d.batch * d.tiles_h() * d.tiles_w();
  const int64_t col_tiles = CeilDiv(d.out_channels, tc::kTileCols);
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles * tc::kTileRows;
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * tc::kTileCols;
  for (int r = threadIdx.x; r < tc::kTileRows; r += tc::kThreads) {
    const int64_t tile = (row0 + r) / per_tile;
    const int64_t q = (row0 + r) % per_tile;
    int64_t pixel = -1;
    if (tile < tiles && active[tile]) {
      const int64_t oy = ((tile / d.tiles_w()) % d.tiles_h()) * d.tile_h + q / d.tile_w;
      const int64_t ox = (tile % d.tiles_w()) * d.tile_w + q % d.tile_w;
      if (oy < d.out_h && ox < d.out_w) pixel = (tile / (d.tiles_h() * d.tiles_w()) * d.out_h + oy) * d.out_w + ox;
    }
    row_pixel[r] = pixel;
  }
  __syncthreads();
  const unsigned active_rows = WarpRowFragments([&](int r) { return row_pixel[r] >= 0; });
  bool any_row = false;
  for (int r = 0; r < tc::kTileRows && !any_row; ++r) any_row = row_pixel[r] >= 0;
  tc::Accumulator<T> acc[2][2];
  tc::ZeroAccumulators<T>(acc);
  for (int64_t segment = 0; any_row && segment < d.taps() * d.in_blocks(); ++segment) {
    const int64_t tap = segment / d.in_blocks();
    const int64_t i = segment % d.in_blocks();
    unsigned live_columns = 0;
    for (int f = 0; f < tc::kFragmentColumns && col0 + f * tc::kFragment < d.out_channels; ++f) {
      const int64_t j = (col0 + f * tc::kFragment) / d.out_block;
      if (live[(tap * d.in_blocks() + i) * d.out_blocks() + j]) live_columns |= 1u << f;
    }
    if (live_columns == 0) continue;
    const int64_t ky = tap / d.filter_w;
    const int64_t kx = tap % d.filter_w;
    const int64_t ci_end = min(d.in_channels, (i + 1) * d.in_block);
    for (int64_t c0 = i * d.in_block; c0 < ci_end; c0 += tc::kStageDepth) {
      for (int e = threadIdx.x; e < tc::kTileRows * tc::kStageDepth; e += tc::kThreads) {
        const int r = e / tc::kStageDepth;
        const int64_t ci = c0 + e % tc::kStageDepth;
        const int64_t in_pixel = row_pixel[r] >= 0 && ci < ci_end ? InputPixelAt(d, row_pixel[r], ky, kx) : -1;
        a_tile[r * kAStride + e % tc::kStageDepth] =
            in_pixel >= 0 ? x[in_pixel * d.in_channels + ci] : tc::ToSmem<T>(0.0f);
      }
      for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileCols; e += tc::kThreads) {
        const int c = e % tc::kTileCols;
        const int64_t ci = c0 + e / tc::kTileCols;
        const int64_t co = col0 + c;
        float b = 0.0f;
        if (ci < ci_end && co < d.out_channels && ((live_columns >> (c / tc::kFragment)) & 1u) != 0) {
          b = Masked(ToCompute(filters[(tap * d.in_channels + ci) * d.out_channels + co]), d.factor(factors, tap, ci, co));
        }
        b_tile[(e / tc::kTileCols) * tc::kBStride<T> + c] = tc::ToSmem<T>(b);
      }
      __syncthreads();
      tc::MultiplyStage<T, tc::wmma::row_major>(a_tile, kAStride, b_tile,
                                                static_cast<int>(min(int64_t{tc::kStageDepth}, ci_end - c0)),
                                                tc::WarpFragments(live_columns) & active_rows, acc);
      __syncthreads();
    }
  }
  // Every pixel of the tile's rows is written: inactive ones as zeros.
  tc::WriteTile<T>(acc, shared, [&](int r, int c, float v) {
    const int64_t tile = (row0 + r) / per_tile;
    const int64_t q = (row0 + r) % per_tile;
    const int64_t co = col0 + c;
    if (tile >= tiles || co >= d.out_channels) return;
    const int64_t oy = ((tile / d.tiles_w()) % d.tiles_h()) * d.tile_h + q / d.tile_w;
    const int64_t ox = (tile % d.tiles_w()) * d.tile_w + q % d.tile_w;
    if (oy >= d.out_h || ox >= d.out_w) return;
    const int64_t pixel = (tile / (d.tiles_h() * d.tiles_w()) * d.out_h + oy) * d.out_w + ox;
    y[pixel * d.out_channels + co] = FromCompute<T>(row_pixel[r] >= 0 ? OutputScaled(output_factors, pixel, v) : 0.0f);
  });
#endif
}

// dx on tensor cores: rows are input pixels in raster order, columns input
// channels, and the depth runs over the (tap, output block) segments; dy is
// read through the output mask. Dead filter blocks are skipped as in the
// forward product.
template <typename T>
__global__ void __launch_bounds__(tc::kThreads)
    TensorCoreConvGradInput(const T* dy, const T* filters, const Compute<T>* factors, const Compute<T>* output_factors,
                            const uint8_t* live, ConvDims d, T* dx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  using Smem = typename tc::Traits<T>::Smem;
  __shared__ __align__(128) unsigned char shared[tc::kSharedBytes<T>];
  __shared__ int64_t row_output[tc::kTileRows];  // output pixel each row meets at the segment's tap, or -1
  Smem* a_tile = reinterpret_cast<Smem*>(shared);
  Smem* b_tile = reinterpret_cast<Smem*>(shared + tc::kABytes<T>);
  constexpr int kAStride = tc::kRowMajorAStride<T>;
  const int64_t pixels = d.batch * d.in_h * d.in_w;
  const int64_t col_tiles = CeilDiv(d.in_channels, tc::kTileCols);
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles * tc::kTileRows;
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * tc::kTileCols;
  tc::Accumulator<T> acc[2][2];
  tc::ZeroAccumulators<T>(acc);
  int64_t staged_tap = -1;
  for (int64_t segment = 0; segment < d.taps() * d.out_blocks(); ++segment) {
    const int64_t tap = segment / d.out_blocks();
    const int64_t j = segment % d.out_blocks();
    unsigned live_columns = 0;
    for (int f = 0; f < tc::kFragmentColumns && col0 + f * tc::kFragment < d.in_channels; ++f) {
      const int64_t i = (col0 + f * tc::kFragment) / d.in_block;
      if (live[(tap * d.in_blocks() + i) * d.out_blocks() + j]) live_columns |= 1u << f;
    }
    if (live_columns == 0) continue;
    if (tap != staged_tap) {  // the previous stage's __syncthreads has retired every reader
      for (int r = threadIdx.x; r < tc::kTileRows; r += tc::kThreads) {
        const int64_t pixel = row0 + r;
        row_output[r] = pixel < pixels ? OutputPixelAt(d, pixel / (d.in_h * d.in_w), (pixel / d.in_w) % d.in_h,
                                                       pixel % d.in_w, tap / d.filter_w, tap % d.filter_w)
                                       : -1;
      }
      staged_tap = tap;
      __syncthreads();
    }
    const int64_t co_end = min(d.out_channels, (j + 1) * d.out_block);
    for (int64_t c0 = j * d.out_block; c0 < co_end; c0 += tc::kStageDepth) {
      for (int e = threadIdx.x; e < tc::kTileRows * tc::kStageDepth; e += tc::kThreads) {
        const int r = e / tc::kStageDepth;
        const int64_t co = c0 + e % tc::kStageDepth;
        const int64_t at = row_output[r];
        const float a = at >= 0 && co < co_end ? OutputScaled(output_factors, at, ToCompute(dy[at * d.out_channels + co])) : 0.0f;
        a_tile[r * kAStride + e % tc::kStageDepth] = tc::ToSmem<T>(a);
      }
      for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileCols; e += tc::kThreads) {
        // Consecutive threads read consecutive output channels of a filter row.
        const int dd = e % tc::kStageDepth;
        const int c = e / tc::kStageDepth;
        const int64_t co = c0 + dd;
        const int64_t ci = col0 + c;
        float b = 0.0f;
        if (co < co_end && ci < d.in_channels && ((live_columns >> (c / tc::kFragment)) & 1u) != 0) {
          b = Masked(ToCompute(filters[(tap * d.in_channels + ci) * d.out_channels + co]), d.factor(factors, tap, ci, co));
        }
        b_tile[dd * tc::kBStride<T> + c] = tc::ToSmem<T>(b);
      }
      __syncthreads();
      tc::MultiplyStage<T, tc::wmma::row_major>(a_tile, kAStride, b_tile,
                                                static_cast<int>(min(int64_t{tc::kStageDepth}, co_end - c0)),
                                                tc::WarpFragments(live_columns), acc);
      __syncthreads();
    }
  }
  tc::WriteTile<T>(acc, shared, [&](int r, int c, float v) {
    if (row0 + r < pixels && col0 + c < d.in_channels) dx[(row0 + r) * d.in_channels + col0 + c] = FromCompute<T>(v);
  });
#endif
}

// dfilters on tensor cores: blockIdx.x walks, tap by tap, the kTileRows x
// kTileCols tiles of the tap's in_channels x out_channels filter (columns
// fastest); the depth is the output pixels (x at the tap's input pixel, dy
// through the output mask). A warp multiplies only its fragments in live
// blocks; a tile without any is written as zeros without reading x or dy.
template <typename T>
__global__ void __launch_bounds__(tc::kThreads)
    TensorCoreConvGradFilter(const T* x, const T* dy, const Compute<T>* factors, const Compute<T>* output_factors,
                             const uint8_t* live, ConvDims d, T* dfilters) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  using Smem = typename tc::Traits<T>::Smem;
  __shared__ __align__(128) unsigned char shared[tc::kSharedBytes<T>];
  __shared__ int64_t stage_input[tc::kStageDepth];  // input pixel of each staged output pixel, or -1
  Smem* a_tile = reinterpret_cast<Smem*>(shared);
  Smem* b_tile = reinterpret_cast<Smem*>(shared + tc::kABytes<T>);
  constexpr int kAStride = tc::kColMajorAStride<T>;
  const int64_t row_tiles = CeilDiv(d.in_channels, tc::kTileRows);
  const int64_t col_tiles = CeilDiv(d.out_channels, tc::kTileCols);
  const int64_t tap = int64_t(blockIdx.x) / (row_tiles * col_tiles);
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles % row_tiles * tc::kTileRows;
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * tc::kTileCols;
  const int64_t ky = tap / d.filter_w;
  const int64_t kx = tap % d.filter_w;
  const auto fragment_live = [&](int fragment_row, int fragment_col) {
    const int64_t ci = row0 + fragment_row * tc::kFragment;
    const int64_t co = col0 + fragment_col * tc::kFragment;
    return ci < d.in_channels && co < d.out_channels &&
           live[(tap * d.in_blocks() + ci / d.in_block) * d.out_blocks() + co / d.out_block] != 0;
  };
  const tc::LiveFragments live_fragments = tc::FindLiveFragments(fragment_live);
  tc::Accumulator<T> acc[2][2];
  tc::ZeroAccumulators<T>(acc);
  const int64_t pixels = d.batch * d.out_h * d.out_w;
  for (int64_t p0 = 0; live_fragments.any && p0 < pixels; p0 += tc::kStageDepth) {
    for (int dd = threadIdx.x; dd < tc::kStageDepth; dd += tc::kThreads) {
      stage_input[dd] = p0 + dd < pixels ? InputPixelAt(d, p0 + dd, ky, kx) : -1;
    }
    __syncthreads();
    // A = x^T at the tap, staged column-major: consecutive threads read consecutive channels.
    for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileRows; e += tc::kThreads) {
      const int dd = e / tc::kTileRows;
      const int64_t ci = row0 + e % tc::kTileRows;
      const int64_t in_pixel = stage_input[dd];
      a_tile[dd * kAStride + e % tc::kTileRows] =
          in_pixel >= 0 && ci < d.in_channels ? x[in_pixel * d.in_channels + ci] : tc::ToSmem<T>(0.0f);
    }
    for (int e = threadIdx.x; e < tc::kStageDepth * tc::kTileCols; e += tc::kThreads) {
      const int64_t pixel = p0 + e / tc::kTileCols;
      const int64_t co = col0 + e % tc::kTileCols;
      const float v = pixel < pixels && co < d.out_channels
                          ? OutputScaled(output_factors, pixel, ToCompute(dy[pixel * d.out_channels + co]))
                          : 0.0f;
      b_tile[(e / tc::kTileCols) * tc::kBStride<T> + e % tc::kTileCols] = tc::ToSmem<T>(v);
    }
    __syncthreads();
    tc::MultiplyStage<T, tc::wmma::col_major>(a_tile, kAStride, b_tile,
                                              static_cast<int>(min(int64_t{tc::kStageDepth}, pixels - p0)),
                                              live_fragments.warp, acc);
    __syncthreads();
  }
  tc::WriteTile<T>(acc, shared, [&](int r, int c, float v) {
    const int64_t ci = row0 + r;
    const int64_t co = col0 + c;
    if (ci < d.in_channels && co < d.out_channels) {
      dfilters[(tap * d.in_channels + ci) * d.out_channels + co] = FromCompute<T>(Masked(v, d.factor(factors, tap, ci, co)));
    }
  });
#endif
}

namespace pl = pipelined;

// A conv segment's tap and its channels [begin, end), for segments of
// `blocks` blocks of `block` out of `channels` channels a tap (the forward
// product's input blocks, dx's output blocks). The pipelined kernels count
// fewer than pl::kMaxSegments (2^23) segments, so a 32-bit division splits
// one (a 64-bit one is a subroutine call of ~70 instructions, here once a
// step where blocks are one stage deep).
struct ConvSegment {
  int64_t tap, begin, end;
};
__device__ inline ConvSegment SegmentAt(uint32_t entry, int64_t blocks, int64_t block, int64_t channels) {
  const uint32_t segment = pl::SegmentOf(entry);
  const uint32_t per_tap = static_cast<uint32_t>(blocks);
  const int64_t begin = int64_t{segment % per_tap} * block;
  return ConvSegment{int64_t{segment / per_tap}, begin, min(channels, begin + block)};
}

// A conv product's segments for the pipelined lists: the forward conv's
// (tap, input block) pairs, tap * in_blocks + i, against output-channel
// blocks (groups j); dx's (kGradInput) (tap, output block) pairs, tap *
// out_blocks + j, against input-channel blocks (groups i).
template <bool kGradInput>
struct ConvSegments {
  ConvDims d;
  const uint8_t* live;
  const float* factors;  // per (input block, output block): the same at every tap
  // d's block counts, worked out once: each is a 64-bit division, which the
  // scaled segments' factor lookups in the product loop would otherwise repeat.
  int64_t in_blocks, out_blocks;
  __host__ __device__ ConvSegments(const ConvDims& dims, const uint8_t* live_blocks, const float* block_factors)
      : d(dims), live(live_blocks), factors(block_factors), in_blocks(dims.in_blocks()),
        out_blocks(dims.out_blocks()) {}
  __host__ __device__ int64_t segment_blocks() const { return kGradInput ? out_blocks : in_blocks; }
  __host__ __device__ int64_t segments() const { return d.taps() * segment_blocks(); }
  __host__ __device__ int64_t out_cols() const { return kGradInput ? d.in_channels : d.out_channels; }
  __host__ __device__ int64_t out_block() const { return kGradInput ? d.in_block : d.out_block; }
  // The (input block, output block) pair of a segment and group, flattened.
  __device__ int64_t pair(int64_t segment, int64_t group) const {
    const int64_t block = static_cast<uint32_t>(segment) % static_cast<uint32_t>(segment_blocks());  // as SegmentAt
    return kGradInput ? group * out_blocks + block : block * out_blocks + group;
  }
  __device__ bool live_block(int64_t segment, int64_t group) const {
    const int64_t tap = segment / segment_blocks();
    return live[tap * in_blocks * out_blocks + pair(segment, group)] != 0;
  }
  __device__ float factor(int64_t segment, int64_t group) const { return factors[pair(segment, group)]; }
};

// How far tap `tap` reaches from the pixel its tap (0, 0) reads, in input
// rows and columns (32-bit division, as SegmentAt: a pipelined conv has fewer
// than pl::kMaxSegments taps).
struct TapOffset {
  int64_t y, x;
  __device__ TapOffset(const ConvDims& d, int64_t tap) {
    const uint32_t index = static_cast<uint32_t>(tap);
    const uint32_t width = static_cast<uint32_t>(d.filter_w);
    y = int64_t{index / width} * d.dilation_h;
    x = int64_t{index % width} * d.dilation_w;
  }
};

// Pixels of an image batch (batch x h x w) in tiles of tile_h x tile_w.
struct PixelTiles {
  int64_t batch, h, w, tile_h, tile_w;
  __host__ __device__ int64_t tiles_h() const { return CeilDiv(h, tile_h); }
  __host__ __device__ int64_t tiles_w() const { return CeilDiv(w, tile_w); }
  // The rows of an implicit GEMM over the pixels ordered tile by tile
  // (TiledPixel), edge tiles padded to whole ones.
  __host__ __device__ int64_t Rows() const { return batch * tiles_h() * tiles_w() * tile_h * tile_w; }
};

// The output's tiles (the output mask's).
__host__ __device__ inline PixelTiles OutputTiles(const ConvDims& d) {
  return PixelTiles{d.batch, d.out_h, d.out_w, d.tile_h, d.tile_w};
}

// The input's tiles that the output tiles step over, tile_h stride_h x
// tile_w stride_w (at most the input's extent): for a conv whose padding
// centres its filter, the pixels an input tile meets at any tap lie in the
// output tile at the same place but for a border of them.
__host__ __device__ inline PixelTiles InputTiles(const ConvDims& d) {
  const auto clamp = [](int64_t tile, int64_t extent) { return tile < extent ? tile : (extent > 1 ? extent : 1); };
  return PixelTiles{d.batch, d.in_h, d.in_w, clamp(d.tile_h * d.stride_h, d.in_h),
                    clamp(d.tile_w * d.stride_w, d.in_w)};
}

// Tiles of whole images: tile by tile, their pixels are in raster order.
__host__ __device__ inline PixelTiles WholeImages(int64_t batch, int64_t h, int64_t w) {
  return PixelTiles{batch, h, w, h > 1 ? h : 1, w > 1 ? w : 1};
}

// Pixels ordered tile by tile (the forward conv's rows; dfilters' depth and
// dx's rows under an output mask): row `row` is place row % (tile_h tile_w)
// of tile row / (tile_h tile_w) = (n, tile_y, tile_x), its places in raster
// order. A tile at the bottom or right edge keeps all its places; those past
// the image are no pixel (inside false), and rows past the last tile have the
// batch for their image.
struct TiledPixel {
  int64_t tile, n, tile_y, tile_x, y, x;
  bool inside;
  __host__ __device__ TiledPixel(const PixelTiles& t, int64_t row) {
    const int64_t per_tile = t.tile_h * t.tile_w;
    const int64_t per_image = t.tiles_h() * t.tiles_w();
    tile = row / per_tile;
    const int64_t q = row % per_tile;
    n = per_image > 0 ? min(tile / per_image, t.batch) : t.batch;
    tile_y = per_image > 0 ? tile / t.tiles_w() % t.tiles_h() : 0;
    tile_x = per_image > 0 ? tile % t.tiles_w() : 0;
    y = tile_y * t.tile_h + q / t.tile_w;
    x = tile_x * t.tile_w + q % t.tile_w;
    inside = n < t.batch && y < t.h && x < t.w;
  }
};

// The input pixels of a pipelined dx tile's rows (128 from a tile's first,
// in raster order or, kTiled, tile by tile as InputTiles and TiledPixel
// order them), set by a thread per row, as (image, y, x), image -1 for a row
// that is no pixel; and the output pixel each meets at a tap, in 32-bit
// arithmetic (PipelineGeometry keeps the coordinates and the batch under
// 2^30).
struct PixelRows {
  int32_t image[pl::kTileRows];
  int32_t y[pl::kTileRows];
  int32_t x[pl::kTileRows];

  template <bool kTiled>
  __device__ void Set(const ConvDims& d, int64_t row, int r) {
    const TiledPixel at(kTiled ? InputTiles(d) : WholeImages(d.batch, d.in_h, d.in_w), row);
    image[r] = at.inside ? static_cast<int32_t>(at.n) : -1;
    // A row that is no pixel keeps 0: an edge tile's places past the input
    // reach up to twice its extent, where the 32-bit tap arithmetic could
    // overflow.
    y[r] = at.inside ? static_cast<int32_t>(at.y) : 0;
    x[r] = at.inside ? static_cast<int32_t>(at.x) : 0;
  }
  // Row r's input pixel (its index in raster order), or -1.
  __device__ int64_t InputPixel(const ConvDims& d, int r) const {
    return image[r] < 0 ? -1 : (int64_t{image[r]} * d.in_h + y[r]) * d.in_w + x[r];
  }
  // OutputPixelAt for row r at a tap reaching `reach`, or -1 (none, or past
  // the last pixel).
  __device__ int64_t OutputPixelAt(const ConvDims& d, int r, const TapOffset& reach) const {
    // A row that is no pixel (image -1) is shifted off the output.
    const int32_t sy = image[r] < 0 ? -1 : y[r] + static_cast<int32_t>(d.pad_top - reach.y);
    return OutputPixelOfShift(d, image[r], sy, x[r] + static_cast<int32_t>(d.pad_left - reach.x));
  }
};

// The depth of the pipelined dfilters: the output pixels, in raster order,
// or tile by tile (edge tiles padded to whole tiles) under an output mask.
__host__ __device__ inline int64_t GradFilterDepth(const ConvDims& d, bool tile_order) {
  return tile_order ? OutputTiles(d).Rows() : d.batch * d.out_h * d.out_w;
}

// The rows of a forward conv tile (the implicit GEMM's 128 output pixels,
// grouped by output tile as in TensorCoreConvForward), set up by a thread
// per row: each row's output pixel (-1: none) and, for a row of an active
// output tile, the input pixel its tap (0, 0) reads, as (image, y, x),
// image -1 for an inactive row; and where the tile's sums go: y, or, for a
// split list, `partial` (kTileRows x kTileCols floats).
struct ForwardTileRows {
  int64_t pixel[pl::kTileRows];
  int64_t image[pl::kTileRows];
  int64_t iy[pl::kTileRows];
  int64_t ix[pl::kTileRows];
  float* partial;

  __device__ void Set(const ConvDims& d, const uint8_t* active, int64_t row0, float* partial_sums) {
    const int r = threadIdx.x;
    if (r == 0) partial = partial_sums;
    const TiledPixel at(OutputTiles(d), row0 + r);
    pixel[r] = at.inside ? (at.n * d.out_h + at.y) * d.out_w + at.x : -1;
    image[r] = at.inside && active[at.tile] ? at.n * d.in_h * d.in_w : -1;
    iy[r] = at.y * d.stride_h - d.pad_top;
    ix[r] = at.x * d.stride_w - d.pad_left;
  }
  // x's element offset of row r's input pixel at `tap`, or -1 (in the
  // padding, or an inactive row).
  __device__ int64_t InputOffset(const ConvDims& d, int r, const TapOffset& tap) const {
    const int64_t y = iy[r] + tap.y;
    const int64_t x = ix[r] + tap.x;
    const bool inside = image[r] >= 0 && y >= 0 && y < d.in_h && x >= 0 && x < d.in_w;
    return inside ? (image[r] + y * d.in_w + x) * d.in_channels : -1;
  }
  // Output entries (r, c) and (r, c + 1) of the tile at channel col0: every
  // pixel is written, an inactive one as zeros (a split's partial sums as
  // they are).
  template <typename D>
  __device__ void Store(const ConvDims& d, const float* output_factors, int64_t col0, int r, int c, float v0, float v1,
                        D* y) const {
    if (partial != nullptr) {
      pl::StorePair(partial + r * pl::kTileCols + c, v0, v1);
      return;
    }
    const int64_t co = col0 + c;
    if (pixel[r] < 0 || co >= d.out_channels) return;
    const bool on = image[r] >= 0;
    pl::StorePair(y + pixel[r] * d.out_channels + co, on ? OutputScaled(output_factors, pixel[r], v0) : 0.0f,
                  on ? OutputScaled(output_factors, pixel[r], v1) : 0.0f);
  }
};

// A forward conv thread's view of the list entry it stages: the entry's
// segment, and the input offsets of the thread's kCopies gathered rows at
// the segment's tap (x's element offset of each row's pixel, or -1), worked
// out once per entry and once per tap.
template <int kCopies>
struct GatheredSegment {
  int64_t in_blocks;
  uint32_t entry = ~0u;
  ConvSegment segment{};
  int64_t tap = -1;
  int64_t offset[kCopies];

  __device__ explicit GatheredSegment(const ConvDims& d) : in_blocks(d.in_blocks()) {}
  // row_of(i): the tile row of copy i.
  template <typename RowOf>
  __device__ void Update(uint32_t new_entry, const ConvDims& d, const ForwardTileRows& rows, const RowOf& row_of) {
    if (new_entry != entry) {
      entry = new_entry;
      segment = SegmentAt(entry, in_blocks, d.in_block, d.in_channels);
    }
    if (segment.tap != tap) {
      tap = segment.tap;
      const TapOffset reach(d, tap);
#pragma unroll
      for (int i = 0; i < kCopies; ++i) offset[i] = rows.InputOffset(d, row_of(i), reach);
    }
  }
};

// The forward conv's 128-row tiles (of output pixels grouped by output tile,
// as ForwardTileRows).
__host__ __device__ inline int64_t ForwardRowTiles(const ConvDims& d) {
  return CeilDiv(OutputTiles(d).Rows(), int64_t{pl::kTileRows});
}

// How many ways the forward conv splits the list of each of its `busy`
// (row tile, column tile) pairs: fewer pairs than pl::kTargetBlocks thread
// blocks split into at least that many blocks, at most `most` ways (a
// block's list, not the work, sets a pass's time there: on an H100 ~75 busy
// blocks took as long as ~170, of 264 places).
__host__ __device__ inline int64_t ForwardSplits(int64_t busy, int64_t most) {
  if (busy >= pl::kTargetBlocks) return 1;
  const int64_t filling = CeilDiv(pl::kTargetBlocks, busy > 1 ? busy : int64_t{1});
  return filling < most ? filling : most;
}

// Whether the forward conv's row tile holds a row of an active output tile.
__device__ inline bool ForwardRowTileBusy(const uint8_t* active, const ConvDims& d, int64_t row_tile) {
  const int64_t tiles = d.batch * d.tiles_h() * d.tiles_w();
  const int64_t per_tile = d.tile_h * d.tile_w;
  const int64_t last = min(tiles - 1, (row_tile * pl::kTileRows + pl::kTileRows - 1) / per_tile);
  bool busy = false;
  for (int64_t t = row_tile * pl::kTileRows / per_tile; t <= last && !busy; ++t) busy = active[t] != 0;
  return busy;
}

// The forward conv's row tiles in chunks of pl::kScanThreads, a thread
// block each (a thread per row tile), for ForwardRowTileOrder.
__host__ __device__ inline int64_t ForwardRowTileChunks(const ConvDims& d) {
  return CeilDiv(ForwardRowTiles(d), int64_t{pl::kScanThreads});
}

// chunk_busy[c]: the busy row tiles of chunk c.
__global__ void __launch_bounds__(pl::kScanThreads)
    ForwardRowTileCounts(const uint8_t* active, ConvDims d, int32_t* chunk_busy) {
  __shared__ int32_t scan[pl::kScanThreads];
  const int64_t row_tile = int64_t(blockIdx.x) * pl::kScanThreads + threadIdx.x;
  scan[threadIdx.x] = row_tile < ForwardRowTiles(d) && ForwardRowTileBusy(active, d, row_tile) ? 1 : 0;
  pl::InclusiveScan(scan);
  if (threadIdx.x == 0) chunk_busy[blockIdx.x] = scan[pl::kScanThreads - 1];
}

// The order in which the forward conv's thread blocks take its row tiles:
// order[0 .. *busy) the row tiles holding a row of an active output tile,
// in row order, then the others. A thread block per chunk (after
// ForwardRowTileCounts), which adds up the chunks before its own and
// compacts its row tiles with a scan.
__global__ void __launch_bounds__(pl::kScanThreads)
    ForwardRowTileOrder(const uint8_t* active, ConvDims d, const int32_t* chunk_busy, int32_t* order,
                        int32_t* busy) {
  __shared__ int32_t scan[pl::kScanThreads];
  const int64_t chunks = ForwardRowTileChunks(d);
  // The busy row tiles before this chunk, and in all.
  int32_t before = 0;
  int32_t total = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += pl::kScanThreads) {
    before += c < blockIdx.x ? chunk_busy[c] : 0;
    total += chunk_busy[c];
  }
  scan[threadIdx.x] = before;
  pl::InclusiveScan(scan);
  before = scan[pl::kScanThreads - 1];
  __syncthreads();
  scan[threadIdx.x] = total;
  pl::InclusiveScan(scan);
  total = scan[pl::kScanThreads - 1];
  __syncthreads();
  const int64_t row_tiles = ForwardRowTiles(d);
  const int64_t row_tile = int64_t(blockIdx.x) * pl::kScanThreads + threadIdx.x;
  const bool is_busy = row_tile < row_tiles && ForwardRowTileBusy(active, d, row_tile);
  scan[threadIdx.x] = is_busy ? 1 : 0;
  pl::InclusiveScan(scan);
  if (row_tile < row_tiles) {
    const int64_t busy_before = before + scan[threadIdx.x] - (is_busy ? 1 : 0);
    // Idle row tiles fill the order from its end.
    order[is_busy ? busy_before : row_tiles - 1 - (row_tile - busy_before)] = static_cast<int32_t>(row_tile);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *busy = total;
}

// Where the forward conv's thread blocks find their work: ForwardRowTileOrder's
// order and busy count, the most ways a list may split (1: it never does),
// and the partial sums of split lists (kTileRows x kTileCols floats a slot).
struct ForwardSchedule {
  const int32_t* order;
  const int32_t* busy;
  int64_t most_splits;
  float* partials;
  // The busy (row tile, column tile) pairs of `col_tiles` column tiles.
  __device__ int64_t BusyPairs(int64_t col_tiles) const { return int64_t{*busy} * col_tiles; }
};

// A forward conv thread block's work. blockIdx.x walks first the splits of
// the busy row tiles' (row tile, column tile) pairs (split, pair; columns
// fastest), then the other row tiles' pairs, which have no active pixel and
// take no list entries; blocks past those have no work. A split takes the
// split-th run of pl::SplitRun(count, splits) entries of its column tile's
// list, from `first`; a split past the list's end, split 0 aside, has no
// work. With one split the tile is stored as D; else as float partial sums,
// in slot (split, pair) (`partial`), which ForwardSplitSums adds up.
struct ForwardTile {
  int64_t row0 = 0, col_tile = 0, col0 = 0, first = 0;
  float* partial = nullptr;
  int count = 0;
  bool none = false;
  __device__ ForwardTile(const ConvDims& d, const ForwardSchedule& s, const int32_t* counts) {
    const int64_t col_tiles = CeilDiv(d.out_channels, pl::kTileCols);
    const int64_t busy_pairs = s.BusyPairs(col_tiles);
    const int64_t splits = ForwardSplits(busy_pairs, s.most_splits);
    int64_t pair = blockIdx.x;
    int64_t split = 0;
    if (pair < busy_pairs * splits) {
      split = pair / busy_pairs;
      pair %= busy_pairs;
    } else {
      pair -= busy_pairs * (splits - 1);
      if (pair >= ForwardRowTiles(d) * col_tiles) {
        none = true;
        return;
      }
    }
    row0 = int64_t{s.order[pair / col_tiles]} * pl::kTileRows;
    // The same as pair % col_tiles (the pairs skipped are whole row tiles'),
    // but from blockIdx alone, which the compiler can recompute rather than
    // keep in a register through the pipeline.
    col_tile = int64_t(blockIdx.x) % col_tiles;
    col0 = col_tile * pl::kTileCols;
    if (pair >= busy_pairs) return;
    const int64_t listed = counts[col_tile];
    const int64_t per_split = pl::SplitRun(listed, splits);
    first = split * per_split;
    count = static_cast<int>(max(int64_t{0}, min(listed - first, per_split)));
    none = split > 0 && count == 0;
    if (splits > 1) partial = s.partials + (split * busy_pairs + pair) * pl::kTileRows * pl::kTileCols;
  }
};

// y over the busy row tiles of a forward conv whose lists were split: per
// (row tile, column tile) pair (a thread block each, pl::kTileRows threads),
// the sum of the partial sums of the splits that took entries, stored as the
// unsplit kernels store theirs. Blocks past the pairs, or all where the lists
// were not split, return at once.
template <typename D>
__global__ void __launch_bounds__(pl::kTileRows)
    ForwardSplitSums(const float* output_factors, const uint8_t* active, ConvDims d, ForwardSchedule s,
                     const int32_t* counts, D* y) {
  __shared__ ForwardTileRows rows;
  const int64_t col_tiles = CeilDiv(d.out_channels, pl::kTileCols);
  const int64_t busy_pairs = s.BusyPairs(col_tiles);
  const int64_t splits = ForwardSplits(busy_pairs, s.most_splits);
  const int64_t pair = blockIdx.x;
  if (splits == 1 || pair >= busy_pairs) return;
  const int64_t col_tile = pair % col_tiles;
  rows.Set(d, active, int64_t{s.order[pair / col_tiles]} * pl::kTileRows, nullptr);
  __syncthreads();
  const int64_t used = pl::UsedSplits(counts[col_tile], splits);
  constexpr int kEntries = pl::kTileRows * pl::kTileCols;
  for (int e = 2 * threadIdx.x; e < kEntries; e += 2 * pl::kTileRows) {
    float v0 = 0.0f;
    float v1 = 0.0f;
    for (int64_t split = 0; split < used; ++split) {
      const float* partial = s.partials + (split * busy_pairs + pair) * kEntries + e;
      v0 += partial[0];
      v1 += partial[1];
    }
    rows.Store(d, output_factors, col_tile * pl::kTileCols, e / pl::kTileCols, e % pl::kTileCols, v0, v1, y);
  }
}

// The forward conv for 16-bit D (or float as TF32) and a block mask on the
// pipelined tile, an implicit GEMM: rows are output pixels grouped by output
// tile (ForwardTileRows), columns output channels, and the depth runs over
// the (tap, input block) segments listed for the tile's channels, kDepth
// channels a stage. Each thread gathers the same rows of every stage: their
// input pixels are worked out once per tap, and a pixel in the padding, or a
// row without an active pixel, is a zero fill. A warp multiplies only its live
// 16-channel strips and its 16-row strips holding an active pixel. Thread
// blocks take their tiles, and runs of a split list, as ForwardTile says:
// where few tiles hold an active pixel (a small batch, or an output mask
// leaving most tiles inactive), their lists split so that more thread blocks
// share them.
template <typename D, int kDepth>
__global__ void __launch_bounds__(pl::kThreads)
    PipelinedConvForward(const D* x, const D* filters, const float* factors, const float* output_factors,
                         const uint8_t* live, const uint8_t* active, ConvDims d, const uint32_t* lists,
                         const int32_t* counts, ForwardSchedule schedule, D* y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  static_assert(pl::kTileRows == pl::kThreads, "a thread per tile row");
  __shared__ ForwardTileRows rows;
  const ForwardTile tile(d, schedule, counts);
  if (tile.none) return;  // the whole block, before any barrier
  rows.Set(d, active, tile.row0, tile.partial);
  __syncthreads();
  const pl::WarpPlace warp = pl::ThisWarp();
  unsigned active_rows = 0;  // bit mt: the warp's 16-row strip mt holds an active pixel
  bool any_active = false;
  for (int r = 0; r < pl::kTileRows; ++r) {
    if (rows.image[r] < 0) continue;
    any_active = true;
    if (r / pl::kWarpTile == warp.row) active_rows |= 1u << (r % pl::kWarpTile / pl::kStrip);
  }
  using ACopier = pl::StageCopier<D, pl::kTileRows, kDepth, false>;  // for its chunk placement only
  constexpr int kAChunks = ACopier::kChunks;
  const int a_row = threadIdx.x / ACopier::kChunksPerRow;
  const int a_col = threadIdx.x % ACopier::kChunksPerRow * ACopier::kPerChunk;
  GatheredSegment<kAChunks> gathered(d);
  // B = the filters as a [taps * in_channels][out_channels] matrix.
  using BCopier = pl::StageCopier<D, kDepth, pl::kTileCols, true>;
  const BCopier b_copier(filters, d.out_channels, tile.col0, d.out_channels);
  const unsigned b_strip_chunks = pl::ChunksOfStrips<false>(b_copier);
  const auto issue_segment = [&](D* a_stage, D* b_stage, uint32_t entry, int sub, int) {
    gathered.Update(entry, d, rows, [&](int c) { return a_row + c * ACopier::kRowStep; });
    const ConvSegment& issued = gathered.segment;
    const int64_t ci0 = issued.begin + int64_t{sub} * kDepth;
    const int64_t ci_end = issued.end;
#pragma unroll
    for (int c = 0; c < kAChunks; ++c) {
      const bool read = gathered.offset[c] >= 0 && ci0 + a_col < ci_end;
      ptx::CopyAsync16(a_stage + (a_row + c * ACopier::kRowStep) * ACopier::kStride + a_col,
                       read ? x + gathered.offset[c] + ci0 + a_col : x, read);
    }
    b_copier.Issue(b_stage, issued.tap * d.in_channels + ci0, issued.tap * d.in_channels + ci_end,
                   pl::LiveChunks<BCopier>(b_strip_chunks, pl::StripsOf(entry)));
  };
  float acc[pl::kStrips][2 * pl::kStrips][4] = {};
  const ConvSegments<false> segments{d, live, factors};
  pl::RunListedSegments<D, kDepth, false, false>(
      segments, tile.col0, lists + tile.col_tile * segments.segments() + tile.first, any_active ? tile.count : 0,
      min(d.in_block, d.in_channels), active_rows, issue_segment, nullptr, acc);
  pl::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int, int) {
    rows.Store(d, output_factors, tile.col0, r, c, v0, v1, y);
  });
#endif
}

namespace wg = warpgroup;

// PipelinedConvForward on the warpgroup tile (warpgroup_gemm.cuh; Hopper,
// built for sm_90a): the same tiles, splits, lists and gathers, A (the rows' input
// pixels at the segment's tap, kDepth channels) gathered into the swizzled
// K-major layout and B (the tap's filters) N-major as the matmul's W, one
// wgmma per live run of output channels and 64-row half holding an active
// pixel. Tiles whose every listed segment is live across the tile and whose
// two halves both hold active pixels take the kWhole launch (128-wide
// products, unguarded: kWholeLive), the others kPartlyLive (or kAll, where a
// half may hold none), as for WarpgroupProduct. A stage whose segment has a
// live block with a factor other than 1 is rescaled in shared memory. Two
// thread blocks per SM, as for the matmul's (under a three-block cap of 168
// registers the gather's per-row state spilled ~100 bytes).
template <typename D, int kDepth, int kRunStrips, bool kWholeLive>
__global__ void __launch_bounds__(wg::kThreads, wg::kBlocksPerSm)
    WarpgroupConvForward(const D* x, const D* filters, const float* factors, const float* output_factors,
                         const uint8_t* live, const uint8_t* active, ConvDims d, const uint32_t* lists,
                         const int32_t* counts, ForwardSchedule schedule, D* y, wg::Tiles taken) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // launched only where wg::DeviceRunsWarpgroupMma()
#else
  static_assert(pl::kTileRows == wg::kThreads, "a thread per tile row");
  __shared__ ForwardTileRows rows;
  const ForwardTile tile(d, schedule, counts);
  if (tile.none) return;  // the whole block, before any barrier
  rows.Set(d, active, tile.row0, tile.partial);
  const ConvSegments<false> segments{d, live, factors};
  const uint32_t* list = lists + tile.col_tile * segments.segments() + tile.first;
  const int listed = tile.count;
  bool partly = false;
  for (int i = threadIdx.x; i < listed; i += wg::kThreads) {
    partly = partly || pl::StripsOf(list[i]) != (1u << pl::kTileStrips) - 1;
  }
  const bool partly_live = __syncthreads_or(partly) != 0;
  unsigned halves = 0;  // bit h: 64-row half h holds an active pixel
  for (int r = 0; r < pl::kTileRows; ++r) {
    if (rows.image[r] >= 0) halves |= 1u << (r / wg::kHalfRows);
  }
  const bool whole = !partly_live && (halves == 0 || halves == 3u);
  if (taken != wg::Tiles::kAll && whole != (taken == wg::Tiles::kWhole)) return;  // the other launch's
  using ALayout = wg::SwizzledLayout<kDepth, false>;
  using ALanes = wg::SwizzledLanes<D, kDepth, false>;
  const int a_chunk = ALanes::ThreadChunk();
  const int a_line = ALanes::ThreadLine();
  GatheredSegment<ALanes::kCopies> gathered(d);
  using BCopier = wg::SwizzledCopier<D, kDepth>;
  const BCopier b_copier(filters, d.out_channels, tile.col0, d.out_channels);
  const auto issue_segment = [&](D* a_stage, D* b_stage, uint32_t entry, int sub, uint64_t*) {
    gathered.Update(entry, d, rows, [&](int i) { return a_line + i * ALanes::kLinesPerPass; });
    const ConvSegment& issued = gathered.segment;
    const int64_t ci0 = issued.begin + int64_t{sub} * kDepth + a_chunk * ALanes::kPerChunk;
    D* a_dst = a_stage + ALayout::Offset(a_line, a_chunk);
#pragma unroll
    for (int i = 0; i < ALanes::kCopies; ++i) {
      const bool read = gathered.offset[i] >= 0 && ci0 < issued.end;
      ptx::CopyAsync16(a_dst + i * ALanes::kCopyStride, read ? x + gathered.offset[i] + ci0 : x, read);
    }
    const int64_t d0 = issued.tap * d.in_channels + issued.begin + int64_t{sub} * kDepth;
    b_copier.Issue(b_stage, d0, issued.tap * d.in_channels + issued.end, b_copier.CopiesIn(pl::StripsOf(entry)));
  };
  const auto scale_stage = [&](D* b_stage, uint32_t entry) {
    wg::RescaleStage(b_copier, b_stage, entry, [&](int strip) {
      return segments.factor(int64_t{pl::SegmentOf(entry)},
                             min(tile.col0 + strip * pl::kStrip, d.out_channels - 1) / d.out_block);
    });
  };
  float acc[2][64] = {};
  wg::RunListedSegments<D, kDepth, kRunStrips, typename BCopier::Layout, kWholeLive, false, 1>(
      list, halves != 0 ? listed : 0, min(d.in_block, d.in_channels), halves, issue_segment, scale_stage, acc);
  wg::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int, int) {
    rows.Store(d, output_factors, tile.col0, r, c, v0, v1, y);
  });
#endif
}

// The pipelined dx's 128-row tiles under an output mask (rows: input pixels
// tile by tile, InputTiles), and the words of tap bits DxRowTileTaps marks
// for each: kTapWords words (32 taps each) for filters of up to kMostTaps
// taps; for larger filters every bit stands for "some tap".
__host__ __device__ inline int64_t DxRowTiles(const ConvDims& d) {
  return CeilDiv(InputTiles(d).Rows(), int64_t{pl::kTileRows});
}
constexpr int kTapWords = 8;
constexpr int kMostTaps = 32 * kTapWords;

// taps[row_tile * kTapWords ..]: the taps at which some row of the pipelined
// dx's row tile (a thread block of pl::kThreads, a thread per row) meets a
// live output pixel, as bits; all bits set, or none, where the filter has
// more than kMostTaps taps. A kernel of its own ahead of the dx (a barrier
// a tap): in the dx's own prologue its loop cost the main loop a spill, and
// every column tile would repeat it.
__global__ void __launch_bounds__(pl::kThreads)
    DxRowTileTaps(const float* output_factors, ConvDims d, uint32_t* taps) {
  __shared__ PixelRows rows;
  __shared__ uint32_t words[kTapWords];
  const int64_t row_tile = blockIdx.x;
  rows.Set<true>(d, row_tile * pl::kTileRows + threadIdx.x, threadIdx.x);
  if (threadIdx.x < kTapWords) words[threadIdx.x] = 0;
  __syncthreads();
  const int64_t taps_count = d.taps();
  const bool marked = taps_count <= kMostTaps;
  bool any = false;
  // kTapsAtOnce taps' factors loaded before any is looked at, so that their
  // loads overlap rather than each waiting out the one before.
  constexpr int kTapsAtOnce = 8;
  for (int64_t tap0 = 0; tap0 < taps_count && (marked || !any); tap0 += kTapsAtOnce) {
    bool meets[kTapsAtOnce];
#pragma unroll
    for (int k = 0; k < kTapsAtOnce; ++k) {
      const int64_t pixel = tap0 + k < taps_count ? rows.OutputPixelAt(d, threadIdx.x, TapOffset(d, tap0 + k)) : -1;
      meets[k] = pixel >= 0 && Live(output_factors[pixel]);
    }
#pragma unroll
    for (int k = 0; k < kTapsAtOnce; ++k) {
      const int64_t tap = tap0 + k;
      if (!marked) {
        any = any || meets[k];
      } else if (tap < taps_count && __syncthreads_or(meets[k]) != 0 && threadIdx.x == 0) {
        words[tap / 32] |= 1u << (tap % 32);
      }
    }
  }
  if (!marked) any = __syncthreads_or(any) != 0;
  __syncthreads();
  if (threadIdx.x < kTapWords) {
    taps[row_tile * kTapWords + threadIdx.x] = marked ? words[threadIdx.x] : any ? ~0u : 0u;
  }
}

// A pipelined dx tile's list cut down to the entries of the taps at which
// one of its rows meets a live output pixel (DxRowTileTaps), in shared
// memory, for lists of up to kMostEntries entries.
struct LiveTapList {
  static constexpr int kMostEntries = 1024;
  uint32_t taps[kTapWords];
  uint32_t entries[kMostEntries];
  int warp_kept[pl::kThreads / 32];
  int kept;

  // The row tile's tap words from DxRowTileTaps, and whether any is set.
  __device__ bool Load(const uint32_t* row_tile_taps) {
    if (threadIdx.x < kTapWords) taps[threadIdx.x] = row_tile_taps[threadIdx.x];
    __syncthreads();
    uint32_t any = 0;
    for (int word = 0; word < kTapWords; ++word) any |= taps[word];
    return any != 0;
  }

  // The entries of `list` (count, of (tap, output block) segments) at the
  // live taps, in order, in `entries`, and their count: a block-wide
  // compaction, 128 entries a pass. Only where the filter has at most
  // kMostTaps taps and count <= kMostEntries.
  __device__ int Keep(const uint32_t* list, int count, int64_t out_blocks) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x == 0) kept = 0;
    __syncthreads();
    for (int first = 0; first < count; first += pl::kThreads) {
      const int i = first + threadIdx.x;
      const uint32_t entry = i < count ? list[i] : 0u;
      const uint32_t tap = pl::SegmentOf(entry) / static_cast<uint32_t>(out_blocks);
      const bool keep = i < count && ((taps[tap / 32] >> (tap % 32)) & 1u) != 0;
      const uint32_t ballot = ptx::WarpBallot(keep);
      if (lane == 0) warp_kept[warp] = ptx::PopCount(ballot);
      __syncthreads();
      int at = kept;
      for (int w = 0; w < warp; ++w) at += warp_kept[w];
      if (keep) entries[at + ptx::PopCount(ballot & ((1u << lane) - 1u))] = entry;
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int w = 0; w < pl::kThreads / 32; ++w) kept += warp_kept[w];
      }
      __syncthreads();
    }
    return kept;
  }
};

// dx for 16-bit D (or float as TF32) and a block mask on the pipelined tile:
// rows are input pixels, columns input channels, and the depth runs over the
// (tap, output block) segments listed for the tile's channels, kDepth output
// channels a stage. A gathers dy at the output pixel each row meets at the
// segment's tap (worked out once per tap; none, or a dead output-mask pixel,
// is a zero fill) and is scaled by that pixel's output factor in registers;
// B is the tap's filters as [input channels][output channels]. Without an
// output mask the rows are the input pixels in raster order. Under one
// (kOutputMasked: output_factors not null) they go tile by tile over the
// input tiles the output tiles step over (InputTiles), so that a 16-row
// strip lies in one input tile and meets mostly one output tile: a tile
// walks only the list entries of the taps at which one of its rows meets a
// live output pixel (row_tile_taps, from DxRowTileTaps; LiveTapList), none
// where there is no such tap (its dx stored as zeros), and a warp multiplies
// only its strips holding a row that meets a live output pixel at the step's
// tap. The two are kernels of their own: the row checks would cost the
// unmasked one ~4 % more instructions a step and more spills.
template <typename D, int kDepth, bool kOutputMasked>
__global__ void __launch_bounds__(pl::kThreads)
    PipelinedConvGradInput(const D* dy, const D* filters, const float* factors, const float* output_factors,
                           const uint8_t* live, const uint32_t* row_tile_taps, ConvDims d, const uint32_t* lists,
                           const int32_t* counts, D* dx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  // Each stage's output factor per tile row, for the A operand's scaling.
  __shared__ float row_factors[pl::kStages * pl::kTileRows];
  // Each tile row's input pixel, worked out once (64-bit divisions), so that
  // a new tap costs 32-bit arithmetic only (PixelRows).
  __shared__ PixelRows rows;
  const int64_t col_tiles = CeilDiv(d.in_channels, pl::kTileCols);
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles * pl::kTileRows;
  const int64_t col_tile = int64_t(blockIdx.x) % col_tiles;
  const int64_t col0 = col_tile * pl::kTileCols;
  static_assert(pl::kTileRows == pl::kThreads, "a thread per tile row");
  rows.Set<kOutputMasked>(d, row0 + threadIdx.x, threadIdx.x);
  __syncthreads();
  const ConvSegments<true> segments{d, live, factors};
  const uint32_t* list = lists + col_tile * segments.segments();
  int listed = counts[col_tile];
  if constexpr (kOutputMasked) {
    __shared__ LiveTapList live_taps;
    if (!live_taps.Load(row_tile_taps + row0 / pl::kTileRows * kTapWords)) {
      listed = 0;
    } else if (d.taps() <= kMostTaps && listed <= LiveTapList::kMostEntries) {
      listed = live_taps.Keep(list, listed, d.out_blocks());
      list = live_taps.entries;
    }
  }
  using ACopier = pl::StageCopier<D, pl::kTileRows, kDepth, false>;  // for its chunk placement only
  constexpr int kAChunks = ACopier::kChunks;
  const int a_row = threadIdx.x / ACopier::kChunksPerRow;
  const int a_col = threadIdx.x % ACopier::kChunksPerRow * ACopier::kPerChunk;
  int64_t gathered_tap = -1;
  int64_t a_pixel[kAChunks];  // the output pixel each A chunk's row meets at the gathered tap, or -1
  float a_factor[kAChunks];   // its output factor (1 without an output mask; +0: dead)
  // B = the filters as a [taps * in_channels][out_channels] matrix, rows col0 .. of the segment's tap.
  using BCopier = pl::StageCopier<D, pl::kTileCols, kDepth, false>;
  const BCopier b_copier(filters, d.out_channels, col0, d.in_channels);
  const unsigned b_strip_chunks = pl::ChunksOfStrips<true>(b_copier);
  const int64_t out_blocks = d.out_blocks();
  uint32_t issued_entry = ~0u;
  ConvSegment issued{};  // worked out once a segment
  const auto issue_segment = [&](D* a_stage, D* b_stage, uint32_t entry, int sub, int slot) {
    if (entry != issued_entry) {
      issued_entry = entry;
      issued = SegmentAt(entry, out_blocks, d.out_block, d.out_channels);
    }
    const int64_t tap = issued.tap;
    if (tap != gathered_tap) {
      gathered_tap = tap;
      const TapOffset reach(d, tap);
#pragma unroll
      for (int c = 0; c < kAChunks; ++c) {
        a_pixel[c] = rows.OutputPixelAt(d, a_row + c * ACopier::kRowStep, reach);
        a_factor[c] = kOutputMasked && a_pixel[c] >= 0 ? output_factors[a_pixel[c]] : 1.0f;
      }
    }
    const int64_t co0 = issued.begin + int64_t{sub} * kDepth;
    const int64_t co_end = issued.end;
#pragma unroll
    for (int c = 0; c < kAChunks; ++c) {
      const bool read = a_pixel[c] >= 0 && Live(a_factor[c]) && co0 + a_col < co_end;
      ptx::CopyAsync16(a_stage + (a_row + c * ACopier::kRowStep) * ACopier::kStride + a_col,
                       read ? dy + a_pixel[c] * d.out_channels + co0 + a_col : dy, read);
      if (kOutputMasked && a_col == 0) {
        // +0 for a row that meets no output pixel (its A is a zero fill) as
        // for a dead one: a strip of such rows is not multiplied.
        row_factors[slot * pl::kTileRows + a_row + c * ACopier::kRowStep] =
            a_pixel[c] >= 0 && Live(a_factor[c]) ? a_factor[c] : 0.0f;
      }
    }
    b_copier.Issue(b_stage, co0, co_end, pl::LiveChunks<BCopier>(b_strip_chunks, pl::StripsOf(entry)),
                   tap * d.in_channels * d.out_channels);
  };
  float acc[pl::kStrips][2 * pl::kStrips][4] = {};
  pl::RunListedSegments<D, kDepth, true, !kOutputMasked>(segments, col0, list, listed,
                                                          min(d.out_block, d.out_channels), 0xfu, issue_segment,
                                                          kOutputMasked ? row_factors : nullptr, acc);
  pl::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int, int) {
    const int64_t pixel = rows.InputPixel(d, r);
    const int64_t ci = col0 + c;
    if (pixel >= 0 && ci < d.in_channels) pl::StorePair(dx + pixel * d.in_channels + ci, v0, v1);
  });
#endif
}

// The output's extents and tiles in 32 bits (the pipelined rule keeps the
// batch and every coordinate under 2^30), the tile counts worked out once
// (each a 64-bit division from ConvDims).
struct OutputGrid32 {
  int32_t batch, out_h, out_w, tile_h, tile_w, tiles_h, tiles_w;
  __device__ explicit OutputGrid32(const ConvDims& d)
      : batch(static_cast<int32_t>(d.batch)), out_h(static_cast<int32_t>(d.out_h)),
        out_w(static_cast<int32_t>(d.out_w)), tile_h(static_cast<int32_t>(d.tile_h)),
        tile_w(static_cast<int32_t>(d.tile_w)), tiles_h(static_cast<int32_t>(d.tiles_h())),
        tiles_w(static_cast<int32_t>(d.tiles_w())) {}
  __device__ int64_t Pixel(int32_t n, int32_t y, int32_t x) const {
    return (int64_t{n} * out_h + y) * out_w + x;
  }
};

// A step of a DepthCursor, as whole rows (of the output, or of a tile) and
// the columns left over: worked out once, so that a step that crosses no
// tile or image costs no division.
struct CursorStep {
  int32_t rows, columns;
};

// (column, row) in rows `width` wide moved on by `step`.
__device__ inline void StepPlace(int32_t& column, int32_t& row, CursorStep step, int32_t width) {
  column += step.columns;
  row += step.rows;
  if (column >= width) {
    column -= width;
    ++row;
  }
}

// Carries `digit` of radix `radix` into the next one; whether it did.
__device__ inline bool Carry(int32_t& digit, int32_t& next, int32_t radix) {
  if (digit < radix) return false;
  next += digit / radix;
  digit %= radix;
  return true;
}

// A pipelined dfilters thread's place in the depth (the output pixels), moved
// along a stage at a time in 32 bits. kTileOrder: the depth runs tile by tile
// as TiledPixel orders it, as (image, tile row, tile column, row and column
// in the tile); else in raster order, as (image, y, x). Past the last row,
// the image is the batch. Seek(d, row) places it at a depth row (64-bit
// arithmetic, once); StepOf(g, rows) is the step that Advance(g, step) moves
// it `rows` rows on by.
template <bool kTileOrder>
struct DepthCursor;

template <>
struct DepthCursor<false> {
  int32_t n, y, x;
  __device__ void Seek(const ConvDims& d, int64_t row) {
    const TiledPixel at(WholeImages(d.batch, d.out_h, d.out_w), row);
    n = static_cast<int32_t>(at.n);
    y = static_cast<int32_t>(at.y);
    x = static_cast<int32_t>(at.x);
  }
  __device__ static CursorStep StepOf(const OutputGrid32& g, int32_t rows) {
    return g.out_w > 0 ? CursorStep{rows / g.out_w, rows % g.out_w} : CursorStep{0, 0};
  }
  __device__ void Advance(const OutputGrid32& g, CursorStep step) {
    StepPlace(x, y, step, g.out_w);
    if (Carry(y, n, g.out_h)) n = min(n, g.batch);
  }
  __device__ int32_t Y(const OutputGrid32&) const { return y; }
  __device__ int32_t X(const OutputGrid32&) const { return x; }
  __device__ bool Inside(const OutputGrid32& g) const { return n < g.batch; }
  __device__ int64_t Pixel(const OutputGrid32& g) const { return g.Pixel(n, y, x); }
};

template <>
struct DepthCursor<true> {
  int32_t n, ty, tx, qy, qx;
  __device__ void Seek(const ConvDims& d, int64_t row) {
    const TiledPixel at(OutputTiles(d), row);
    n = static_cast<int32_t>(at.n);
    ty = static_cast<int32_t>(at.tile_y);
    tx = static_cast<int32_t>(at.tile_x);
    qy = static_cast<int32_t>(at.y - at.tile_y * d.tile_h);
    qx = static_cast<int32_t>(at.x - at.tile_x * d.tile_w);
  }
  __device__ static CursorStep StepOf(const OutputGrid32& g, int32_t rows) {
    return CursorStep{rows / g.tile_w, rows % g.tile_w};
  }
  __device__ void Advance(const OutputGrid32& g, CursorStep step) {
    StepPlace(qx, qy, step, g.tile_w);
    if (Carry(qy, tx, g.tile_h) && Carry(tx, ty, g.tiles_w) && Carry(ty, n, g.tiles_h)) n = min(n, g.batch);
  }
  __device__ int32_t Y(const OutputGrid32& g) const { return ty * g.tile_h + qy; }
  __device__ int32_t X(const OutputGrid32& g) const { return tx * g.tile_w + qx; }
  __device__ bool Inside(const OutputGrid32& g) const { return n < g.batch && Y(g) < g.out_h && X(g) < g.out_w; }
  __device__ int64_t Pixel(const OutputGrid32& g) const { return g.Pixel(n, Y(g), X(g)); }
};

// live[s] for stage s of `depth` rows of the pipelined dfilters' depth under
// an output mask (the output pixels tile by tile): some output factor of its
// pixels is live.
template <typename F>
__global__ void DepthStageActivity(const F* output_factors, ConvDims d, int64_t depth, uint8_t* live) {
  const int64_t rows = OutputTiles(d).Rows();
  const int64_t stages = CeilDiv(rows, depth);
  const OutputGrid32 grid(d);
  const CursorStep one_row = DepthCursor<true>::StepOf(grid, 1);
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < stages; s += int64_t(gridDim.x) * blockDim.x) {
    DepthCursor<true> at;
    at.Seek(d, s * depth);
    bool any = false;
    for (int64_t row = s * depth; row < min(rows, (s + 1) * depth) && !any; ++row, at.Advance(grid, one_row)) {
      any = at.Inside(grid) && Live(output_factors[at.Pixel(grid)]);
    }
    live[s] = any ? 1 : 0;
  }
}

// dfilters for 16-bit D (or float as TF32) on the pipelined tile, split over
// the depth: blockIdx.x walks (split, tap, 128-channel tile of in_channels, of
// out_channels), the last fastest; the depth is the output pixels (without an
// output mask in raster order; with one, tile by tile, kTileOrder, so that the
// stages of inactive output tiles are dead), kDepth a stage, and split s takes
// stages [s per_split, (s + 1) per_split). A = x^T gathered at the tap's input
// pixel of each depth row (padding: zero fills; each thread steps its rows'
// output pixels along stage by stage, DepthCursor), B = dy (in tile order
// gathered by the same rows), masked per depth row by the output factors
// (staged by cp.async with the operands; output_factors and stage_live are
// given with kTileOrder only). A warp multiplies only its fragments in live
// blocks; a tile without any reads nothing, and under an output mask a stage
// whose output pixels are all dead (stage_live) is neither read nor
// multiplied. With one split the tile is written masked, as D; with several,
// as float partial sums to partials[split] (taps x in_channels x
// out_channels each), which SplitFilterSums adds up.
template <typename D, int kDepth, bool kTileOrder>
__global__ void __launch_bounds__(pl::kThreads)
    PipelinedConvGradFilter(const D* x, const D* dy, const float* factors, const float* output_factors,
                            const uint8_t* live, const uint8_t* stage_live, ConvDims d, int64_t per_split,
                            float* partials, D* dfilters) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // launched only where DeviceSupportsTensorCores()
#else
  __shared__ __align__(16) float depth_factors[pl::kStages * kDepth];
  const int64_t row_tiles = CeilDiv(d.in_channels, pl::kTileRows);
  const int64_t col_tiles = CeilDiv(d.out_channels, pl::kTileCols);
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * pl::kTileCols;
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles % row_tiles * pl::kTileRows;
  const int64_t tap = int64_t(blockIdx.x) / (col_tiles * row_tiles) % d.taps();
  const int64_t split = int64_t(blockIdx.x) / (col_tiles * row_tiles * d.taps());
  const int64_t depth = GradFilterDepth(d, kTileOrder);
  const int64_t first = split * per_split;
  const int64_t steps = max(int64_t{0}, min(CeilDiv(depth, int64_t{kDepth}), first + per_split) - first);
  const auto fragment_live = [&](int64_t ci, int64_t co) {
    return ci < d.in_channels && co < d.out_channels &&
           live[(tap * d.in_blocks() + ci / d.in_block) * d.out_blocks() + co / d.out_block] != 0;
  };
  const pl::LiveTile live_tile = pl::FindLiveFragments(row0, col0, fragment_live);
  pl::WarpStage stage{};
  // A = x^T as [depth][in channels], B = dy as [depth][out channels]: each
  // thread's chunks of both sit in depth rows a_row + c kRowStep, columns
  // a_col ..; those rows' output pixels are its cursors.
  using ACopier = pl::StageCopier<D, kDepth, pl::kTileRows, true>;  // for its chunk placement only
  using BCopier = pl::StageCopier<D, kDepth, pl::kTileCols, true>;
  static_assert(ACopier::kChunksPerRow == BCopier::kChunksPerRow && ACopier::kStride == BCopier::kStride,
                "A's and B's chunks sit in the same places");
  constexpr int kAChunks = ACopier::kChunks;
  const int a_row = threadIdx.x / ACopier::kChunksPerRow;
  const int a_col = threadIdx.x % ACopier::kChunksPerRow * ACopier::kPerChunk;
  const OutputGrid32 grid(d);
  const CursorStep stage_step = DepthCursor<kTileOrder>::StepOf(grid, kDepth);
  DepthCursor<kTileOrder> cursor[kAChunks];
#pragma unroll
  for (int c = 0; c < kAChunks; ++c) cursor[c].Seek(d, first * kDepth + a_row + c * ACopier::kRowStep);
  const int64_t tap_y = tap / d.filter_w * d.dilation_h - d.pad_top;
  const int64_t tap_x = tap % d.filter_w * d.dilation_w - d.pad_left;
  const BCopier dy_copier(dy, d.out_channels, col0, d.out_channels);
  const auto live_stage = [&](int64_t step) { return !kTileOrder || stage_live[first + step] != 0; };
  const auto issue = [&](int64_t step, D* a_stage, D* b_stage) {
    const bool issued = live_stage(step);
    float* stage_factors = depth_factors + (step & (pl::kStages - 1)) * kDepth;
#pragma unroll
    for (int c = 0; c < kAChunks; ++c) {
      const int row = a_row + c * ACopier::kRowStep;
      const bool inside = cursor[c].Inside(grid);
      const int64_t pixel = cursor[c].Pixel(grid);
      const int64_t iy = int64_t{cursor[c].Y(grid)} * d.stride_h + tap_y;
      const int64_t ix = int64_t{cursor[c].X(grid)} * d.stride_w + tap_x;
      const bool read = inside && iy >= 0 && iy < d.in_h && ix >= 0 && ix < d.in_w && row0 + a_col < d.in_channels;
      if (issued) {
        ptx::CopyAsync16(a_stage + row * ACopier::kStride + a_col,
                         read ? x + ((int64_t{cursor[c].n} * d.in_h + iy) * d.in_w + ix) * d.in_channels + row0 + a_col
                              : x,
                         read);
        if constexpr (kTileOrder) {
          const bool read_dy = inside && col0 + a_col < d.out_channels;
          ptx::CopyAsync16(b_stage + row * BCopier::kStride + a_col,
                           read_dy ? dy + pixel * d.out_channels + col0 + a_col : dy, read_dy);
          if (a_col == 0) {
            ptx::CopyAsync4(stage_factors + row, inside ? output_factors + pixel : output_factors, inside);
          }
        }
      }
      cursor[c].Advance(grid, stage_step);
    }
    if (!kTileOrder && issued) dy_copier.Issue(b_stage, (first + step) * kDepth, depth, BCopier::kAllChunks);
  };
  float acc[pl::kStrips][2 * pl::kStrips][4] = {};
  pl::RunPipeline<D, kDepth, false, false, false>(live_tile.any ? steps : 0, issue, [&](int64_t step) {
    stage.fragments = live_stage(step) ? live_tile.warp : 0u;
    stage.depth_factor = kTileOrder ? depth_factors + (step & (pl::kStages - 1)) * kDepth : nullptr;
    return stage;
  }, acc);
  const pl::FragmentBlocks blocks(
      row0, col0, [&](int64_t ci) { return min(ci, d.in_channels - 1) / d.in_block * d.out_blocks(); },
      [&](int64_t co) { return min(co, d.out_channels - 1) / d.out_block; });
  pl::ForEachAccumulatorPair(acc, [&](int r, int c, float v0, float v1, int mt, int s) {
    const int64_t ci = row0 + r;
    const int64_t co = col0 + c;
    if (ci >= d.in_channels || co >= d.out_channels) return;
    const int64_t at = (tap * d.in_channels + ci) * d.out_channels + co;
    if (partials == nullptr) {
      const float f0 = d.element_level ? factors[at] : factors[blocks(mt, s)];
      const float f1 = d.element_level ? factors[at + 1] : f0;
      pl::StorePair(dfilters + at, Masked(v0, f0), Masked(v1, f1));
    } else {
      pl::StorePair(partials + split * d.taps() * d.in_channels * d.out_channels + at, v0, v1);
    }
  });
#endif
}

// dfilters from the `splits` partial sums of PipelinedConvGradFilter, masked.
template <typename D>
__global__ void SplitFilterSums(const float* partials, int64_t splits, const float* factors, ConvDims d,
                                D* dfilters) {
  const int64_t count = d.taps() * d.in_channels * d.out_channels;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t co = e % d.out_channels;
    const int64_t ci = e / d.out_channels % d.in_channels;
    const float factor = d.factor(factors, e / (d.out_channels * d.in_channels), ci, co);
    float sum = 0.0f;
    for (int64_t s = 0; Live(factor) && s < splits; ++s) sum += partials[s * count + e];
    dfilters[e] = FromCompute<D>(Masked(sum, factor));
  }
}

}  // namespace
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_MASKED_CONV2D_KERNELS_CUH_
