// The pipelined tensor-core tile (sm_80 and later) for 16-bit operands: a
// thread block of 4 warps computes a 128 x 128 output tile, each warp a
// 64 x 64 quarter of it as 4 x 8 mma.sync m16n8k16 products with float
// accumulators, over stages of kDepth (32 or 16) of the depth that cp.async
// brings into shared memory kStages deep, so that the next stages' loads are
// in flight while the tensor cores work on the current one.
//
// Sparsity: a stage carries, per warp, which of its 16 x 16 fragments are
// live (bit 4 mt + s: 16-row strip mt, 16-column strip s of the warp's
// quarter); dead fragments are neither loaded into registers nor multiplied,
// and the callers stage dead operand chunks as zero fills that read nothing.
// Masked weights with a factor other than 1 are rounded to the operand type
// after scaling (w * m rounded as the reference rounds it), in registers.
//
// The operands sit in shared memory either depth-inner ([rows][kDepth]: a
// row-major A, or B as [columns][kDepth]) or depth-outer ([kDepth][rows]),
// rows padded by 16 bytes so that the 8 rows an ldmatrix reads fall on
// different banks.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_PIPELINED_GEMM_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_PIPELINED_GEMM_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/ptx_primitives.cuh"

namespace masked_ops {
namespace gpu {
namespace pipelined {

constexpr int kTileRows = 128;
constexpr int kTileCols = 128;
constexpr int kThreads = 128;
constexpr int kWarpTile = 64;
constexpr int kStrip = 16;                         // a fragment's rows and columns
constexpr int kStrips = kWarpTile / kStrip;        // a warp's strips each way
constexpr int kTileStrips = kTileCols / kStrip;    // the tile's column strips
constexpr int kStages = 4;
constexpr int kPerChunk = 8;  // 16-bit elements in a 16-byte copy
constexpr int kPad = 8;       // elements added to every shared-memory row

// The device types with this path.
template <typename D>
constexpr bool kHasPipeline = std::is_same_v<D, __half> || std::is_same_v<D, __nv_bfloat16>;

// Elements of one operand stage: 128 rows (or columns) by kDepth.
template <int kDepth, bool kDepthInner>
constexpr int kOperandElements = kDepthInner ? kTileRows * (kDepth + kPad) : kDepth * (kTileRows + kPad);
template <int kDepth, bool kDepthInner>
constexpr int kOperandStride = kDepthInner ? kDepth + kPad : kTileRows + kPad;

template <int kDepth, bool kADepthInner, bool kBDepthInner>
constexpr int kStageElements = kOperandElements<kDepth, kADepthInner> + kOperandElements<kDepth, kBDepthInner>;

// Dynamic shared memory of a kernel built on this tile.
template <int kDepth, bool kADepthInner, bool kBDepthInner>
constexpr int kSharedBytes = kStages * kStageElements<kDepth, kADepthInner, kBDepthInner> * 2;

// Output tiles of a rows x cols output.
inline int64_t TileCount(int64_t rows, int64_t cols) { return CeilDiv(rows, kTileRows) * CeilDiv(cols, kTileCols); }

// Whether a block size cuts an extent on multiples of a fragment, or not at
// all.
__host__ __device__ inline bool StripAligned(int64_t block, int64_t extent) {
  return block % kStrip == 0 || block >= extent;
}

// A warp's place in the tile: rows row * 64 .., columns col * 64 ..
struct WarpPlace {
  int row, col;
};
__device__ inline WarpPlace ThisWarp() {
  const int warp = threadIdx.x / 32;
  return WarpPlace{warp / 2, warp % 2};
}

// What a warp multiplies in a stage: its live fragments (bit 4 mt + s) and,
// when `scaled`, each column strip's factor for the B operand.
struct WarpStage {
  unsigned fragments;
  bool scaled;
  float factor[kStrips];
};

// Every fragment of column strips `columns` (bit s).
__device__ inline unsigned ColumnFragments(unsigned columns) {
  unsigned fragments = 0;
#pragma unroll
  for (int mt = 0; mt < kStrips; ++mt) fragments |= (columns & 0xfu) << (4 * mt);
  return fragments;
}

// Stages rows x (kCols elements) of a row-major global matrix `src` (leading
// dimension ld) at (row0, col0) into shared [rows][kCols + kPad], 16 bytes
// per copy: read(r, c) says whether the chunk at tile row r, columns c ..
// c + 7 is read (else zero-filled). src, ld and col0 keep chunks 16-byte
// aligned.
template <int kRows, int kCols, typename D, typename Read>
__device__ inline void StageOperand(D* shared, const D* src, int64_t ld, int64_t row0, int64_t col0,
                                    const Read& read) {
  constexpr int kChunksPerRow = kCols / kPerChunk;
  for (int e = threadIdx.x; e < kRows * kChunksPerRow; e += kThreads) {
    const int r = e / kChunksPerRow;
    const int c = e % kChunksPerRow * kPerChunk;
    const bool live = read(r, c);
    ptx::CopyAsync16(shared + r * (kCols + kPad) + c, live ? src + (row0 + r) * ld + col0 + c : src, live);
  }
}

// w * factor rounded to D, for the two D of a fragment register.
template <typename D>
__device__ inline uint32_t ScalePair(uint32_t pair, float factor) {
  D halves[2];
  static_assert(sizeof(halves) == sizeof(pair), "two 16-bit values to a register");
  memcpy(halves, &pair, sizeof(pair));
#pragma unroll
  for (int i = 0; i < 2; ++i) halves[i] = FromCompute<D>(ToCompute(halves[i]) * factor);
  memcpy(&pair, halves, sizeof(pair));
  return pair;
}

// acc += A B over one stage for the warp's live fragments. a_stage and
// b_stage are the stage's operands in the layouts kADepthInner /
// kBDepthInner name; B's columns are the tile's.
template <typename D, int kDepth, bool kADepthInner, bool kBDepthInner>
__device__ inline void MultiplyStage(const D* a_stage, const D* b_stage, const WarpStage& stage,
                                     float (&acc)[kStrips][2 * kStrips][4]) {
  constexpr int kAStride = kOperandStride<kDepth, kADepthInner>;
  constexpr int kBStride = kOperandStride<kDepth, kBDepthInner>;
  const WarpPlace warp = ThisWarp();
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8;
#pragma unroll
  for (int k0 = 0; k0 < kDepth; k0 += kStrip) {
    uint32_t a[kStrips][4];
#pragma unroll
    for (int mt = 0; mt < kStrips; ++mt) {
      if (((stage.fragments >> (4 * mt)) & 0xfu) == 0) continue;
      const int row = warp.row * kWarpTile + mt * kStrip;
      const D* at = kADepthInner ? a_stage + (row + lane % 16) * kAStride + k0 + lane / 16 * 8
                                 : a_stage + (k0 + matrix / 2 * 8 + lane % 8) * kAStride + row + matrix % 2 * 8;
      ptx::LoadMatrices<!kADepthInner>(a[mt], at);
    }
#pragma unroll
    for (int s = 0; s < kStrips; ++s) {
      const unsigned column = 0x1111u << s;
      if ((stage.fragments & column) == 0) continue;
      const int col = warp.col * kWarpTile + s * kStrip;
      const D* bt = kBDepthInner ? b_stage + (col + matrix / 2 * 8 + lane % 8) * kBStride + k0 + matrix % 2 * 8
                                 : b_stage + (k0 + matrix % 2 * 8 + lane % 8) * kBStride + col + matrix / 2 * 8;
      uint32_t b[4];
      ptx::LoadMatrices<!kBDepthInner>(b, bt);
      if (stage.scaled) {
#pragma unroll
        for (int i = 0; i < 4; ++i) b[i] = ScalePair<D>(b[i], stage.factor[s]);
      }
      const uint32_t left[2] = {b[0], b[1]};
      const uint32_t right[2] = {b[2], b[3]};
#pragma unroll
      for (int mt = 0; mt < kStrips; ++mt) {
        if (((stage.fragments >> (4 * mt + s)) & 1u) == 0) continue;
        ptx::Mma16816<D>(acc[mt][2 * s], a[mt], left);
        ptx::Mma16816<D>(acc[mt][2 * s + 1], a[mt], right);
      }
    }
  }
}

// The main loop over `steps` stages. issue(step, a_stage, b_stage) stages
// step's operands (every thread calls it, for step 0, 1, ... in order, with
// CopyAsync16 only); warp_stage(step) gives the warp's WarpStage of a step
// (called for 0, 1, ... in order). While step s is multiplied, steps s + 1
// .. s + kStages - 1 are in flight.
template <typename D, int kDepth, bool kADepthInner, bool kBDepthInner, typename Issue, typename Stage>
__device__ inline void RunPipeline(int64_t steps, const Issue& issue, const Stage& warp_stage,
                                   float (&acc)[kStrips][2 * kStrips][4]) {
  constexpr int kAElements = kOperandElements<kDepth, kADepthInner>;
  constexpr int kStageSize = kStageElements<kDepth, kADepthInner, kBDepthInner>;
  D* shared = reinterpret_cast<D*>(ptx::DynamicShared());
  const auto a_of = [&](int64_t step) { return shared + step % kStages * kStageSize; };
  const auto b_of = [&](int64_t step) { return shared + step % kStages * kStageSize + kAElements; };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) issue(int64_t{s}, a_of(s), b_of(s));
    ptx::CommitCopies();  // possibly empty: the group count stays one per step
  }
  for (int64_t step = 0; step < steps; ++step) {
    ptx::WaitCopies<kStages - 2>();
    // Step's operands are visible to every thread, and every thread is done
    // with step - 1's buffers, which the next issue refills.
    __syncthreads();
    const int64_t next = step + kStages - 1;
    if (next < steps) issue(next, a_of(next), b_of(next));
    ptx::CommitCopies();
    const WarpStage stage = warp_stage(step);
    if (stage.fragments != 0) MultiplyStage<D, kDepth, kADepthInner, kBDepthInner>(a_of(step), b_of(step), stage, acc);
  }
  // The groups still pending here are the empty ones committed past the last step.
}

// write(row, col, v0, v1) for every accumulator pair of the warp: tile row
// `row`, tile columns col and col + 1.
template <typename Write>
__device__ inline void ForEachAccumulatorPair(const float (&acc)[kStrips][2 * kStrips][4], const Write& write) {
  const WarpPlace warp = ThisWarp();
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < kStrips; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 2 * kStrips; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        write(warp.row * kWarpTile + mt * kStrip + lane / 4 + 8 * h, warp.col * kWarpTile + nt * 8 + lane % 4 * 2,
              acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
      }
    }
  }
}

// Two D at `out` (4-byte aligned).
template <typename D>
__device__ inline void StorePair(D* out, float v0, float v1) {
  D pair[2] = {FromCompute<D>(v0), FromCompute<D>(v1)};
  uint32_t word;
  memcpy(&word, pair, sizeof(word));
  *reinterpret_cast<uint32_t*>(out) = word;
}

}  // namespace pipelined
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_PIPELINED_GEMM_CUH_
