// The pipelined tensor-core tile (sm_80 and later) for 16-bit operands (and
// float32 as TF32): a thread block of 4 warps
// computes a 128 x 128 output tile, each warp a 64 x 64 quarter of it as
// 4 x 8 mma.sync m16n8k16 (TF32: m16n8k8) products with float accumulators,
// over stages of kDepth (32 or 16; TF32: 16 floats) of the depth that
// cp.async brings into shared memory kStages deep, so that the next stages'
// loads are in flight while the tensor cores work on the current one.
//
// Sparsity: a stage carries, per warp, which of its 16 x 16 fragments are
// live (bit 4 mt + s: 16-row strip mt, 16-column strip s of the warp's
// quarter); dead fragments are never multiplied (they are read from shared
// memory with the live ones, so that all the loads overlap), and the callers
// stage dead operand chunks as zero fills that read nothing from global
// memory.
// Masked weights with a factor other than 1 are scaled in registers, the
// product taken in float and rounded to the operand type (the reference
// rounds m to the type first: the same wherever m is exact in it).
//
// The operands sit in shared memory either depth-inner ([rows][kDepth]: a
// row-major A, or B as [columns][kDepth]) or depth-outer ([kDepth][rows]),
// rows padded (kPadOf) so that the 8 rows an ldmatrix reads, or the
// elements a TF32 depth-outer load reads, fall on different banks.
#ifndef MASKED_OPS_CC_KERNELS_CUDA_PIPELINED_GEMM_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_PIPELINED_GEMM_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
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
static_assert((kStages & (kStages - 1)) == 0, "a step's buffers are step & (kStages - 1)");
// What the rules ask of channel counts and weight dimensions: multiples of a
// 16-byte copy of 16-bit elements (two of floats).
constexpr int kPerChunk = 8;

// The device types with this path: the 16-bit ones, and float32 as TF32
// (mma.sync m16n8k8).
template <typename D>
constexpr bool kIsTf32 = std::is_same_v<D, float>;
template <typename D>
constexpr bool kHasPipeline = std::is_same_v<D, __half> || std::is_same_v<D, __nv_bfloat16> || kIsTf32<D>;

// Elements of D in a 16-byte copy, and added to each shared-memory row so
// that the rows one ldmatrix (or, for TF32 depth-outer operands, one column
// of scalar loads) reads fall on different banks: 16 bytes for 16-bit rows
// and TF32 depth-inner rows (strides of an odd number of 16-byte units), 32
// for TF32 depth-outer rows (strides of 8 banks mod 32).
template <typename D>
constexpr int kChunkOf = 16 / int(sizeof(D));
template <typename D, bool kDepthInner>
constexpr int kPadOf = kIsTf32<D> && !kDepthInner ? 8 : kChunkOf<D>;

// Elements of one operand stage: 128 rows (or columns) by kDepth.
template <typename D, int kDepth, bool kDepthInner>
constexpr int kOperandStride = kDepthInner ? kDepth + kPadOf<D, true> : kTileRows + kPadOf<D, false>;
template <typename D, int kDepth, bool kDepthInner>
constexpr int kOperandElements = (kDepthInner ? kTileRows : kDepth) * kOperandStride<D, kDepth, kDepthInner>;

template <typename D, int kDepth, bool kADepthInner, bool kBDepthInner>
constexpr int kStageElements =
    kOperandElements<D, kDepth, kADepthInner> + kOperandElements<D, kDepth, kBDepthInner>;

// Dynamic shared memory of a kernel built on this tile.
template <typename D, int kDepth, bool kADepthInner, bool kBDepthInner>
constexpr int kSharedBytes = kStages * kStageElements<D, kDepth, kADepthInner, kBDepthInner> * int(sizeof(D));

// The pipelined kernels' 16-byte copies and 4-byte stores need aligned arrays
// (TensorFlow's allocations are 64-byte aligned).
template <typename... Pointers>
bool Aligned16(const Pointers*... pointers) {
  return ((reinterpret_cast<uintptr_t>(pointers) % 16 == 0) && ...);
}

// Stages of 32 where the depth's blocks are multiples of 32 (or one block),
// else of 16. TF32 stages are always 16 floats deep: 64-byte rows, as the
// 16-bit types' 32, so that four stages fit the same shared memory.
constexpr int kWideStage = 32;
constexpr int kNarrowStage = 16;
// The stage depth of the weight gradients, whose depth has no blocks.
template <typename D>
constexpr int kUnblockedStage = kIsTf32<D> ? kNarrowStage : kWideStage;

// run(std::integral_constant<int, kDepth>{}) for the stage depth of a
// blocked depth: a launcher written once for both instantiations.
template <typename D, typename Run>
void WithStageDepth(int64_t depth_block, int64_t depth, const Run& run) {
  if constexpr (kIsTf32<D>) {
    run(std::integral_constant<int, kNarrowStage>{});
  } else if (depth_block % kWideStage == 0 || depth_block >= depth) {
    run(std::integral_constant<int, kWideStage>{});
  } else {
    run(std::integral_constant<int, kNarrowStage>{});
  }
}

// Output tiles of a rows x cols output (tiles of tile_rows rows: the
// warpgroup tile's may be taller).
inline int64_t TileCount(int64_t rows, int64_t cols, int64_t tile_rows = kTileRows) {
  return CeilDiv(rows, tile_rows) * CeilDiv(cols, kTileCols);
}

// How many ways a weight gradient of `tiles` output tiles splits its depth
// (a batch, or a conv's output pixels) of `depth` rows, counted in stages
// of kWideStage: enough thread blocks to fill a large GPU twice over, each
// split at least kMinSplitStages such stages deep (TF32 steps 16 rows at a
// time, so its splits take twice as many of its own stages). The partial sums of several splits
// are added up by a second kernel.
constexpr int64_t kTargetBlocks = 264;
constexpr int64_t kMaxSplits = 32;
constexpr int64_t kMinSplitStages = 16;
inline int64_t MostDepthSplits(int64_t depth) {
  return std::clamp(CeilDiv(depth, int64_t{kWideStage}) / kMinSplitStages, int64_t{1}, kMaxSplits);
}
inline int64_t DepthSplits(int64_t tiles, int64_t depth) {
  return std::min(CeilDiv(kTargetBlocks, std::max(tiles, int64_t{1})), MostDepthSplits(depth));
}

// The entries of a listed tile's list each split takes (the last may take
// fewer), and the splits that take any (at least one, for an empty list).
__host__ __device__ inline int64_t SplitRun(int64_t listed, int64_t splits) { return CeilDiv(listed, splits); }
__host__ __device__ inline int64_t UsedSplits(int64_t listed, int64_t splits) {
  return listed == 0 ? 1 : CeilDiv(listed, SplitRun(listed, splits));
}

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
// row_factor, where not null: a factor for each of the tile's rows (in
// shared memory), by which the A operand is masked and rounded to D before
// the product, as the reference rounds dy * o (o exact in D); depth_factor
// likewise for each of the stage's kDepth depth rows of the B operand.
struct WarpStage {
  unsigned fragments;
  bool scaled;
  float factor[kStrips];
  const float* row_factor;
  const float* depth_factor;
};

// Copies operand tiles of kRows x kCols of D from a row-major global
// matrix into shared [kRows][kCols + pad], stage after stage, 16 bytes per
// cp.async. The tile moves along one dimension, the depth: down the rows
// (kDepthRows: a depth-outer operand) or along the columns; its place in the
// other dimension is fixed. Each thread copies the same chunks of every stage
// (chunk i: tile row Row(i), columns Col() .. Col() + 7), so that their
// addresses and bounds are worked out once.
template <typename D, int kRows, int kCols, bool kDepthRows>
class StageCopier {
 public:
  static constexpr int kPerChunk = kChunkOf<D>;
  static constexpr int kStride = kCols + kPadOf<D, !kDepthRows>;
  static constexpr int kChunksPerRow = kCols / kPerChunk;
  static_assert(kThreads % kChunksPerRow == 0, "every thread copies chunks of one column");
  static constexpr int kRowStep = kThreads / kChunksPerRow;
  static_assert(kRows % kRowStep == 0, "every thread copies as many chunks");
  static constexpr int kChunks = kRows / kRowStep;
  static constexpr unsigned kAllChunks = (1u << kChunks) - 1;

  // src: the matrix, ld its leading dimension; fixed0 and fixed_end: the
  // tile's first column (kDepthRows) or row and the matrix's extent there.
  __device__ StageCopier(const D* src, int64_t ld, int64_t fixed0, int64_t fixed_end)
      : matrix_(src), ld_(ld), row_(threadIdx.x / kChunksPerRow), col_(threadIdx.x % kChunksPerRow * kPerChunk) {
    if constexpr (kDepthRows) {
      base_ = src + fixed0 + col_ + row_ * ld;
      fixed_ok_ = fixed0 + col_ < fixed_end ? kAllChunks : 0u;
    } else {
      base_ = src + (fixed0 + row_) * ld + col_;
      fixed_ok_ = 0;
#pragma unroll
      for (int i = 0; i < kChunks; ++i) fixed_ok_ |= (fixed0 + Row(i) < fixed_end ? 1u : 0u) << i;
    }
  }

  __device__ int Row(int i) const { return row_ + i * kRowStep; }
  __device__ int Col() const { return col_; }

  // Stages the tile whose depth starts at d0 into `stage`. Chunk i is read
  // where bit i of `chunks` is set and it lies inside the matrix and before
  // the depth's end d_end; the others are zero fills that read nothing.
  // `shift` moves the matrix by that many elements (a tap's filters).
  __device__ void Issue(D* stage, int64_t d0, int64_t d_end, unsigned chunks, int64_t shift = 0) const {
    const D* src = base_ + shift + (kDepthRows ? d0 * ld_ : d0);
    const int64_t step = kRowStep * ld_;
    D* dst = stage + row_ * kStride + col_;
    // The depth left from d0, clamped to [0, the tile's extent] so that the
    // per-chunk tests are 32-bit whatever the distance.
    const int depth_left = static_cast<int>(max(int64_t{0}, min(d_end - d0, int64_t{kDepthRows ? kRows : kCols})));
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const bool in_depth = (kDepthRows ? Row(i) : col_) < depth_left;
      const bool read = ((fixed_ok_ & chunks) >> i & 1u) != 0 && in_depth;
      ptx::CopyAsync16(dst + i * kRowStep * kStride, read ? src : matrix_, read);
      src += step;
    }
  }

 private:
  const D* matrix_;  // what a zero fill names: no byte of it is read
  const D* base_;    // chunk 0 at depth 0
  int64_t ld_;
  int row_, col_;
  unsigned fixed_ok_;  // bit i: chunk i lies inside the matrix in the fixed dimension
};

// Sparse products list, per 128-column output tile, the segments of their
// depth (a block row of W, a (tap, input block) of a filter, ...) in which
// some block of the tile's columns is live. An entry: the segment in the low
// 23 bits; bit 23 set where a live block of it (in the tile's columns) has a
// factor other than 1, so that the kernels load factors only for those (a
// 0/1 mask never loads one); and which of the tile's 16-column strips lie in
// a live block of it in the top 8 (so no entry is ~0u while segments <
// kMaxSegments).
constexpr int kEntrySegmentBits = 23;
constexpr int kEntryScaledBit = 23;
constexpr int kEntryStripShift = 24;
static_assert(kTileStrips <= 32 - kEntryStripShift, "a tile's strips fit an entry's top bits");
constexpr int64_t kMaxSegments = (int64_t{1} << kEntrySegmentBits) - 1;
__host__ __device__ inline uint32_t SegmentOf(uint32_t entry) { return entry & ((1u << kEntrySegmentBits) - 1); }
__host__ __device__ inline bool ScaledOf(uint32_t entry) { return ((entry >> kEntryScaledBit) & 1u) != 0; }
__host__ __device__ inline unsigned StripsOf(uint32_t entry) { return entry >> kEntryStripShift; }

// lists[tile * segments + n] for n < counts[tile]: the entries of output
// column tile `tile`, in segment order, for a product whose Dims give
// segments(), out_cols(), out_block() (the output columns a block spans),
// live_block(segment, group) and factor(segment, group) (group: a block of
// the output's columns; the factor as a float, read for live blocks). One
// thread block (kScanThreads) per tile; the threads look at segments in
// parallel and compact them with a scan.
constexpr int kScanThreads = 256;

// scan[t] += scan[0 .. t) for the kScanThreads threads t of the block, each
// having set its own entry: an inclusive prefix sum, visible to every thread
// on return.
__device__ inline void InclusiveScan(int32_t* scan) {
  __syncthreads();
  for (int stride = 1; stride < kScanThreads; stride *= 2) {
    const int32_t below = int(threadIdx.x) >= stride ? scan[threadIdx.x - stride] : 0;
    __syncthreads();
    scan[threadIdx.x] += below;
    __syncthreads();
  }
}

template <typename Dims>
__global__ void __launch_bounds__(kScanThreads) TileSegmentLists(Dims dims, uint32_t* lists, int32_t* counts) {
  __shared__ int32_t scan[kScanThreads];
  __shared__ int32_t listed;
  const int64_t tile = blockIdx.x;
  const int64_t col0 = tile * kTileCols;
  if (threadIdx.x == 0) listed = 0;
  for (int64_t segment0 = 0; segment0 < dims.segments(); segment0 += kScanThreads) {
    const int64_t segment = segment0 + threadIdx.x;
    unsigned strips = 0;
    bool scaled = false;
    for (int f = 0; segment < dims.segments() && f < kTileStrips && col0 + f * kStrip < dims.out_cols(); ++f) {
      const int64_t group = (col0 + f * kStrip) / dims.out_block();
      if (dims.live_block(segment, group)) {
        strips |= 1u << f;
        scaled = scaled || dims.factor(segment, group) != 1.0f;
      }
    }
    scan[threadIdx.x] = strips != 0 ? 1 : 0;
    InclusiveScan(scan);
    if (strips != 0) {
      lists[tile * dims.segments() + listed + scan[threadIdx.x] - 1] =
          static_cast<uint32_t>(segment) | (scaled ? 1u : 0u) << kEntryScaledBit | strips << kEntryStripShift;
    }
    __syncthreads();
    if (threadIdx.x == kScanThreads - 1) listed += scan[threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[tile] = listed;
}

// Which of a B copier's chunks lie in each of the tile's column strips, as
// the strip number of chunk i in bits 4 i ..: the strip of a chunk is that
// of its row (kByRow: B staged [columns][depth]) or of its column.
template <bool kByRow, typename Copier>
__device__ inline unsigned ChunksOfStrips(const Copier& copier) {
  static_assert(Copier::kChunks * 4 <= 32 && kTileStrips <= 16, "a strip number per chunk in 4 bits");
  unsigned strips = 0;
#pragma unroll
  for (int i = 0; i < Copier::kChunks; ++i) {
    strips |= unsigned((kByRow ? copier.Row(i) : copier.Col()) / kStrip) << (4 * i);
  }
  return strips;
}
// The chunks (bit i) whose strip is live in `strips`.
template <typename Copier>
__device__ inline unsigned LiveChunks(unsigned chunk_strips, unsigned strips) {
  unsigned chunks = 0;
#pragma unroll
  for (int i = 0; i < Copier::kChunks; ++i) chunks |= ((strips >> ((chunk_strips >> (4 * i)) & 0xfu)) & 1u) << i;
  return chunks;
}

// The listed segments of a column tile, walked in step order: stage `sub` of
// the current one, per_segment stages a segment. Entries are loaded two
// segments ahead of their use: a load from L2 outlasts a step, and with one
// segment of lead (as first written) the next step's first instruction
// waited for it (ncu: the largest single stall of the H200 forward kernel).
class SegmentCursor {
 public:
  __device__ SegmentCursor(const uint32_t* list, int count, int per_segment)
      : list_(list), count_(count), per_segment_(per_segment) {
    now_ = count > 0 ? list[0] : 0u;
    next_ = count > 1 ? list[1] : 0u;
    after_next_ = count > 2 ? list[2] : 0u;
  }
  __device__ uint32_t entry() const { return now_; }
  __device__ int sub() const { return sub_; }
  __device__ void Advance() {
    if (++sub_ < per_segment_) return;
    sub_ = 0;
    ++index_;
    now_ = next_;
    next_ = after_next_;
    after_next_ = index_ + 2 < count_ ? list_[index_ + 2] : 0u;
  }

 private:
  const uint32_t* list_;
  int count_, per_segment_;
  int index_ = 0, sub_ = 0;
  uint32_t now_, next_, after_next_;
};

// Masked(v, factor) rounded to D (w * m, or 0 where m is dead, whatever w
// is) for the two D of a fragment register: the lower-indexed one with
// `low`, the other with `high`.
template <typename D>
__device__ inline uint32_t ScalePair(uint32_t pair, float low, float high) {
  D halves[2];
  static_assert(sizeof(halves) == sizeof(pair), "two 16-bit values to a register");
  memcpy(halves, &pair, sizeof(pair));
  halves[0] = FromCompute<D>(Masked(ToCompute(halves[0]), low));
  halves[1] = FromCompute<D>(Masked(ToCompute(halves[1]), high));
  memcpy(&pair, halves, sizeof(pair));
  return pair;
}

// Which of a weight gradient's 128 x 128 tile at (row0, col0) a thread block
// multiplies, from fragment_live(row, col) for the 16 x 16 fragment there:
// whether any fragment is live (else the tile is zeros, nothing read), and
// this warp's live fragments (bit 4 mt + s).
struct LiveTile {
  bool any;
  unsigned warp;
};
template <typename FragmentLive>
__device__ inline LiveTile FindLiveFragments(int64_t row0, int64_t col0, const FragmentLive& fragment_live) {
  LiveTile found{false, 0u};
  for (int f = 0; f < kTileStrips * kTileStrips && !found.any; ++f) {
    found.any = fragment_live(row0 + f / kTileStrips * kStrip, col0 + f % kTileStrips * kStrip);
  }
  const WarpPlace warp = ThisWarp();
  for (int mt = 0; mt < kStrips; ++mt) {
    for (int s = 0; s < kStrips; ++s) {
      if (fragment_live(row0 + warp.row * kWarpTile + mt * kStrip, col0 + warp.col * kWarpTile + s * kStrip)) {
        found.warp |= 1u << (4 * mt + s);
      }
    }
  }
  return found;
}

// Where this lane's ldmatrix rows (or TF32 elements) start in a stage's A
// and B operands (in elements from each operand's start), for fragment
// (0, 0) at depth 0; the other fragments and depths are compile-time offsets
// from there.
template <typename D, int kDepth, bool kADepthInner, bool kBDepthInner>
struct LaneOffsets {
  int a, b;
  __device__ LaneOffsets() {
    constexpr int kAStride = kOperandStride<D, kDepth, kADepthInner>;
    constexpr int kBStride = kOperandStride<D, kDepth, kBDepthInner>;
    const WarpPlace warp = ThisWarp();
    const int lane = threadIdx.x % 32;
    const int matrix = lane / 8;
    if constexpr (kIsTf32<D>) {
      // Depth-inner: ldmatrix rows as for 16 bits, a 16-byte row of an 8 x 8
      // b16 matrix being 4 floats. Depth-outer: element (k = lane % 4, row or
      // column lane / 4) of a k8 x 8 tile, loaded by itself.
      a = kADepthInner ? (warp.row * kWarpTile + lane % 16) * kAStride + lane / 16 * 4
                       : lane % 4 * kAStride + warp.row * kWarpTile + lane / 4;
      b = kBDepthInner ? (warp.col * kWarpTile + matrix / 2 * 8 + lane % 8) * kBStride + matrix % 2 * 4
                       : lane % 4 * kBStride + warp.col * kWarpTile + lane / 4;
    } else {
      a = kADepthInner ? (warp.row * kWarpTile + lane % 16) * kAStride + lane / 16 * 8
                       : (matrix / 2 * 8 + lane % 8) * kAStride + warp.row * kWarpTile + matrix % 2 * 8;
      b = kBDepthInner ? (warp.col * kWarpTile + matrix / 2 * 8 + lane % 8) * kBStride + matrix % 2 * 8
                       : (matrix % 2 * 8 + lane % 8) * kBStride + warp.col * kWarpTile + matrix / 2 * 8;
    }
  }
};

// TF32 operands as the tensor cores take them: rounded to nearest (away),
// 10 mantissa bits (cvt.rna.tf32.f32).
__device__ inline uint32_t Tf32Bits(float v) { return __float_as_uint(nvcuda::wmma::__float_to_tf32(v)); }

// acc += A B over one stage in TF32 (mma.sync m16n8k8) for the warp's live
// fragments. Depth-inner operands come by ldmatrix: an 8 x 8 b16 matrix is 8
// rows of 4 floats, lane l getting float l % 4 of row l / 4, which is the
// m16n8k8 layout of A's rows and of B's columns (a0..a3: rows +0/+8, depths
// +0/+4; b0, b1: depths +0/+4). Depth-outer operands are loaded element by
// element from rows 8 banks apart. The stage's factors (a strip's factor on
// B, row factors on A, depth factors on B) are applied in float (Masked)
// before both operands are rounded to nearest TF32. As in MultiplyStage,
// every fragment of a depth step is loaded before any is multiplied.
template <int kDepth, bool kADepthInner, bool kBDepthInner, bool kWholeColumns>
__device__ inline void MultiplyStageTf32(const float* a_lane, const float* b_lane, const WarpStage& stage,
                                         float (&acc)[kStrips][2 * kStrips][4]) {
  constexpr int kAStride = kOperandStride<float, kDepth, kADepthInner>;
  constexpr int kBStride = kOperandStride<float, kDepth, kBDepthInner>;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k0 = 0; k0 < kDepth; k0 += 8) {
    // Per row strip: a0..a3.
    float a[kStrips][4];
#pragma unroll
    for (int mt = 0; mt < kStrips; ++mt) {
      if constexpr (kADepthInner) {
        uint32_t bits[4];
        ptx::LoadMatrices<false>(bits, a_lane + mt * kStrip * kAStride + k0);
#pragma unroll
        for (int i = 0; i < 4; ++i) a[mt][i] = __uint_as_float(bits[i]);
      } else {
        const float* rows = a_lane + k0 * kAStride + mt * kStrip;
        a[mt][0] = rows[0];
        a[mt][1] = rows[8];
        a[mt][2] = rows[4 * kAStride];
        a[mt][3] = rows[4 * kAStride + 8];
      }
    }
    // Per strip: b0, b1 of its left 8 columns, then of its right 8.
    float b[kStrips][4];
#pragma unroll
    for (int s = 0; s < kStrips; ++s) {
      if constexpr (kBDepthInner) {
        uint32_t bits[4];
        ptx::LoadMatrices<false>(bits, b_lane + s * kStrip * kBStride + k0);
#pragma unroll
        for (int i = 0; i < 4; ++i) b[s][i] = __uint_as_float(bits[i]);
      } else {
        const float* columns = b_lane + k0 * kBStride + s * kStrip;
        b[s][0] = columns[0];
        b[s][1] = columns[4 * kBStride];
        b[s][2] = columns[8];
        b[s][3] = columns[4 * kBStride + 8];
      }
    }
    if (stage.row_factor != nullptr) {
      // a0 and a2 lie in row lane / 4 of the strip, a1 and a3 in that row + 8.
#pragma unroll
      for (int mt = 0; mt < kStrips; ++mt) {
        const float* factor = stage.row_factor + ThisWarp().row * kWarpTile + mt * kStrip + lane / 4;
#pragma unroll
        for (int i = 0; i < 4; ++i) a[mt][i] = Masked(a[mt][i], factor[i % 2 * 8]);
      }
    }
    if (stage.scaled) {
#pragma unroll
      for (int s = 0; s < kStrips; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) b[s][i] = Masked(b[s][i], stage.factor[s]);
      }
    }
    if (stage.depth_factor != nullptr) {
      // b0 lies at depth lane % 4 of the 8, b1 at that depth + 4.
      const float* factor = stage.depth_factor + k0 + lane % 4;
#pragma unroll
      for (int s = 0; s < kStrips; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) b[s][i] = Masked(b[s][i], factor[i % 2 * 4]);
      }
    }
    uint32_t a_bits[kStrips][4];
#pragma unroll
    for (int mt = 0; mt < kStrips; ++mt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a_bits[mt][i] = Tf32Bits(a[mt][i]);
    }
#pragma unroll
    for (int s = 0; s < kStrips; ++s) {
      if ((stage.fragments & (0x1111u << s)) == 0) continue;
      const uint32_t left[2] = {Tf32Bits(b[s][0]), Tf32Bits(b[s][1])};
      const uint32_t right[2] = {Tf32Bits(b[s][2]), Tf32Bits(b[s][3])};
#pragma unroll
      for (int mt = 0; mt < kStrips; ++mt) {
        if (!kWholeColumns && ((stage.fragments >> (4 * mt + s)) & 1u) == 0) continue;
        ptx::Mma1688Tf32(acc[mt][2 * s], a_bits[mt], left);
        ptx::Mma1688Tf32(acc[mt][2 * s + 1], a_bits[mt], right);
      }
    }
  }
}

// acc += A B over one stage for the warp's live fragments; a_lane and b_lane
// are the stage's operands plus LaneOffsets. kWholeColumns: a strip is live
// in all four row strips or none (the forward product and dx), so that rows
// need no test. Every fragment of a depth step is loaded before any is
// multiplied, so that the loads' latencies overlap instead of each standing
// between a branch and its mma (the warps are few: two per scheduler); a
// dead fragment is then read from shared memory but never multiplied.
template <typename D, int kDepth, bool kADepthInner, bool kBDepthInner, bool kWholeColumns>
__device__ inline void MultiplyStage(const D* a_lane, const D* b_lane, const WarpStage& stage,
                                     float (&acc)[kStrips][2 * kStrips][4]) {
  constexpr int kAStride = kOperandStride<D, kDepth, kADepthInner>;
  constexpr int kBStride = kOperandStride<D, kDepth, kBDepthInner>;
#pragma unroll
  for (int k0 = 0; k0 < kDepth; k0 += kStrip) {
    uint32_t a[kStrips][4];
    uint32_t b[kStrips][4];
#pragma unroll
    for (int mt = 0; mt < kStrips; ++mt) {
      ptx::LoadMatrices<!kADepthInner>(
          a[mt], a_lane + (kADepthInner ? mt * kStrip * kAStride + k0 : k0 * kAStride + mt * kStrip));
    }
#pragma unroll
    for (int s = 0; s < kStrips; ++s) {
      ptx::LoadMatrices<!kBDepthInner>(
          b[s], b_lane + (kBDepthInner ? s * kStrip * kBStride + k0 : k0 * kBStride + s * kStrip));
    }
    if (stage.row_factor != nullptr) {
      // Registers 0 and 2 hold row lane / 4 of the strip, 1 and 3 that row + 8.
#pragma unroll
      for (int mt = 0; mt < kStrips; ++mt) {
        const float* factor = stage.row_factor + ThisWarp().row * kWarpTile + mt * kStrip + threadIdx.x % 32 / 4;
#pragma unroll
        for (int i = 0; i < 4; ++i) a[mt][i] = ScalePair<D>(a[mt][i], factor[i % 2 * 8], factor[i % 2 * 8]);
      }
    }
    if (stage.scaled) {
#pragma unroll
      for (int s = 0; s < kStrips; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) b[s][i] = ScalePair<D>(b[s][i], stage.factor[s], stage.factor[s]);
      }
    }
    if (stage.depth_factor != nullptr) {
      // Registers 0 and 2 hold depth rows 2 (lane % 4) + {0, 1} of the 16, 1 and 3 those + 8.
      const float* factor = stage.depth_factor + k0 + threadIdx.x % 4 * 2;
#pragma unroll
      for (int s = 0; s < kStrips; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) b[s][i] = ScalePair<D>(b[s][i], factor[i % 2 * 8], factor[i % 2 * 8 + 1]);
      }
    }
#pragma unroll
    for (int s = 0; s < kStrips; ++s) {
      if ((stage.fragments & (0x1111u << s)) == 0) continue;
      const uint32_t left[2] = {b[s][0], b[s][1]};
      const uint32_t right[2] = {b[s][2], b[s][3]};
#pragma unroll
      for (int mt = 0; mt < kStrips; ++mt) {
        if (!kWholeColumns && ((stage.fragments >> (4 * mt + s)) & 1u) == 0) continue;
        ptx::Mma16816<D>(acc[mt][2 * s], a[mt], left);
        ptx::Mma16816<D>(acc[mt][2 * s + 1], a[mt], right);
      }
    }
  }
}

// The first kStages - 1 of `steps` stages, issued before a main loop:
// issue(step, a_of(step), b_of(step)), one commit group each (empty past the
// last step, so that the group count stays one per step).
template <typename Issue, typename AOf, typename BOf>
__device__ inline void IssueFirstStages(int64_t steps, const Issue& issue, const AOf& a_of, const BOf& b_of) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) issue(int64_t{s}, a_of(s), b_of(s));
    ptx::CommitCopies();
  }
}

// The main loop over `steps` stages. issue(step, a_stage, b_stage) stages
// step's operands (every thread calls it, for step 0, 1, ... in order, with
// cp.async only); warp_stage(step) gives the warp's WarpStage of a step
// (called for 0, 1, ... in order, after the step's barrier). While step s is
// multiplied, steps s + 1 and s + 2 are in flight; step s + 3 is issued
// after the multiplications, so that its address arithmetic (a long chain
// of integer operations) runs while the tensor cores work through them
// instead of standing between the barrier and the first mma.
template <typename D, int kDepth, bool kADepthInner, bool kBDepthInner, bool kWholeColumns, typename Issue,
          typename Stage>
__device__ inline void RunPipeline(int64_t steps, const Issue& issue, const Stage& warp_stage,
                                   float (&acc)[kStrips][2 * kStrips][4]) {
  constexpr int kAElements = kOperandElements<D, kDepth, kADepthInner>;
  constexpr int kStageSize = kStageElements<D, kDepth, kADepthInner, kBDepthInner>;
  D* shared = reinterpret_cast<D*>(ptx::DynamicShared());
  const auto a_of = [&](int64_t step) { return shared + (step & (kStages - 1)) * kStageSize; };
  const auto b_of = [&](int64_t step) { return a_of(step) + kAElements; };
  const LaneOffsets<D, kDepth, kADepthInner, kBDepthInner> lane;
  IssueFirstStages(steps, issue, a_of, b_of);
  for (int64_t step = 0; step < steps; ++step) {
    ptx::WaitCopies<kStages - 2>();
    // Step's operands are visible to every thread, and every thread is done
    // with step - 1's buffers, which this step's issue refills.
    __syncthreads();
    const WarpStage stage = warp_stage(step);
    if (stage.fragments != 0) {
      if constexpr (kIsTf32<D>) {
        MultiplyStageTf32<kDepth, kADepthInner, kBDepthInner, kWholeColumns>(a_of(step) + lane.a,
                                                                               b_of(step) + lane.b, stage, acc);
      } else {
        MultiplyStage<D, kDepth, kADepthInner, kBDepthInner, kWholeColumns>(a_of(step) + lane.a,
                                                                            b_of(step) + lane.b, stage, acc);
      }
    }
    const int64_t next = step + kStages - 1;
    if (next < steps) issue(next, a_of(next), b_of(next));
    ptx::CommitCopies();
  }
  // The groups still pending here are the empty ones committed past the last step.
}

// A product over listed segments (the forward products and dx): `count`
// entries of `list` for the tile at output column col0, each segment
// segment_depth deep (stages of kDepth; a segment's last stages may lie past
// the depth's end, where the copiers zero-fill). issue_segment(a_stage,
// b_stage, entry, sub, slot) stages stage `sub` of an entry's segment into
// buffer `slot` (0 .. kStages - 1; where row_factors is not null, it also
// writes row_factors[slot * kTileRows + r] for the tile's rows r);
// dims.factor(segment, group) is the factor of the block at (segment, output
// column block group). A warp multiplies its live strips, in its row strips
// set in active_rows (bit mt; all four when kAllRows) that hold a row factor
// other than +0 in the step (where row_factors are given), and scales a strip's
// B by its factor where that is not 1. Step entries travel from the issuing
// threads to the multiplying warps through shared memory; each warp loads
// its strips' factors a step ahead of a new segment, and only for entries
// marked scaled (the others' live factors are 1).
template <typename D, int kDepth, bool kBDepthInner, bool kAllRows, typename Dims, typename IssueSegment>
__device__ inline void RunListedSegments(const Dims& dims, int64_t col0, const uint32_t* list, int count,
                                         int64_t segment_depth, unsigned active_rows,
                                         const IssueSegment& issue_segment, const float* row_factors,
                                         float (&acc)[kStrips][2 * kStrips][4]) {
  __shared__ uint32_t step_entry[kStages];
  const int per_segment = static_cast<int>(CeilDiv(segment_depth, int64_t{kDepth}));
  const int64_t steps = int64_t{count} * per_segment;
  SegmentCursor issuing(list, count, per_segment);
  const auto issue = [&](int64_t step, D* a_stage, D* b_stage) {
    const int slot = static_cast<int>(step & (kStages - 1));
    if (threadIdx.x == 0) step_entry[slot] = issuing.entry();
    issue_segment(a_stage, b_stage, issuing.entry(), issuing.sub(), slot);
    issuing.Advance();
  };
  const WarpPlace warp = ThisWarp();
  int64_t strip_group[kStrips];
#pragma unroll
  for (int s = 0; s < kStrips; ++s) {
    strip_group[s] = min(col0 + warp.col * kWarpTile + s * kStrip, dims.out_cols() - 1) / dims.out_block();
  }
  const auto load_factors = [&](uint32_t entry, float (&factor)[kStrips]) {
    const unsigned columns = StripsOf(entry) >> (warp.col * kStrips);
    if (ScaledOf(entry)) {
#pragma unroll
      for (int s = 0; s < kStrips; ++s) {
        factor[s] = ((columns >> s) & 1u) != 0 ? dims.factor(int64_t{SegmentOf(entry)}, strip_group[s]) : 0.0f;
      }
    } else {
#pragma unroll
      for (int s = 0; s < kStrips; ++s) factor[s] = ((columns >> s) & 1u) != 0 ? 1.0f : 0.0f;
    }
  };
  uint32_t staged_entry = ~0u;
  uint32_t upcoming_entry = ~0u;
  float upcoming_factor[kStrips] = {};
  WarpStage stage{};
  const auto warp_stage = [&](int64_t step) {
    const uint32_t entry = step_entry[step & (kStages - 1)];
    stage.row_factor = row_factors == nullptr ? nullptr : row_factors + (step & (kStages - 1)) * kTileRows;
    if (entry != staged_entry) {
      if (entry == upcoming_entry) {
#pragma unroll
        for (int s = 0; s < kStrips; ++s) stage.factor[s] = upcoming_factor[s];
      } else {
        load_factors(entry, stage.factor);
      }
      staged_entry = entry;
      const unsigned columns = (StripsOf(entry) >> (warp.col * kStrips)) & 0xfu;
      stage.fragments = 0;
#pragma unroll
      for (int mt = 0; mt < kStrips; ++mt) {
        if (kAllRows || ((active_rows >> mt) & 1u) != 0) stage.fragments |= columns << (4 * mt);
      }
      // An unmarked entry's live factors are all 1; a marked one's may be 1
      // in this warp's strips, which then need no scaling either.
      stage.scaled = false;
      if (ScaledOf(entry)) {
#pragma unroll
        for (int s = 0; s < kStrips; ++s) {
          stage.scaled = stage.scaled || (((columns >> s) & 1u) && stage.factor[s] != 1.0f);
        }
      }
    }
    // Step + 1's entry is in shared memory since this step's barrier.
    if (step + 1 < steps) {
      const uint32_t next = step_entry[(step + 1) & (kStages - 1)];
      if (next != staged_entry && next != upcoming_entry) {
        upcoming_entry = next;
        load_factors(next, upcoming_factor);
      }
    }
    if (row_factors == nullptr) return stage;
    // A row strip whose row factors are all +0 (dead; a live factor that is
    // zero in float is -0) adds nothing: each lane looks at two of the
    // warp's 64 rows, strip mt being lanes 8 mt ...
    const float* rows = stage.row_factor + warp.row * kWarpTile + 2 * (threadIdx.x % 32);
    const uint32_t live_rows = ptx::WarpBallot(Live(rows[0]) || Live(rows[1]));
    WarpStage rows_stage = stage;
#pragma unroll
    for (int mt = 0; mt < kStrips; ++mt) {
      if (((live_rows >> (8 * mt)) & 0xffu) == 0) rows_stage.fragments &= ~(0xfu << (4 * mt));
    }
    return rows_stage;
  };
  RunPipeline<D, kDepth, true, kBDepthInner, kAllRows>(steps, issue, warp_stage, acc);
}

// write(row, col, v0, v1, mt, s) for every accumulator pair of the warp:
// tile row `row`, tile columns col and col + 1, in the warp's fragment (mt,
// s) (compile-time indices once unrolled, for per-fragment arrays).
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
              acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1], mt, nt / 2);
      }
    }
  }
}

// The factors of a block-masked weight gradient's tile for this warp: one
// per fragment (a fragment lies in one block), the block index of each of
// its row and column strips worked out once. block_of(row, col) gives the
// flat index of the block holding tile entry (row, col), or -1 outside.
struct FragmentBlocks {
  int64_t row_part[kStrips];  // of the flat block index, per row strip
  int64_t col_part[kStrips];
  template <typename RowPart, typename ColPart>
  __device__ FragmentBlocks(int64_t row0, int64_t col0, const RowPart& row_part_of, const ColPart& col_part_of) {
    const WarpPlace warp = ThisWarp();
#pragma unroll
    for (int i = 0; i < kStrips; ++i) {
      row_part[i] = row_part_of(row0 + warp.row * kWarpTile + i * kStrip);
      col_part[i] = col_part_of(col0 + warp.col * kWarpTile + i * kStrip);
    }
  }
  __device__ int64_t operator()(int mt, int s) const { return row_part[mt] + col_part[s]; }
};

// Two D at `out`, aligned to two D, in one store.
template <typename D>
__device__ inline void StorePair(D* out, float v0, float v1) {
  if constexpr (kIsTf32<D>) {
    *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
  } else {
    D pair[2] = {FromCompute<D>(v0), FromCompute<D>(v1)};
    uint32_t word;
    memcpy(&word, pair, sizeof(word));
    *reinterpret_cast<uint32_t*>(out) = word;
  }
}

}  // namespace pipelined
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_PIPELINED_GEMM_CUH_
