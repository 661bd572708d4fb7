// The warpgroup tile (Hopper, sm_90a) of the matmul products for 16-bit
// operands (the forward product, B = W N-major; dx, B = W^T K-major; dW,
// A = x^T M-major and B = dy N-major): one warpgroup (4 warps) computes a 128 x 128 output tile as two
// halves of 64 rows (the forward product and dx can take tall tiles too:
// two warpgroups, 256 x 128, sharing B), each an asynchronous wgmma m64nNk16 per 16 of depth
// that reads both operands from shared memory, so that the warps issue a
// few instructions per stage for the products (against 64 mma.sync and 16
// ldmatrix per warp on the pipelined tile, pipelined_gemm.cuh) and spend the
// rest on the copies of the stages ahead while the tensor cores work.
//
// Lists and zero fills are the pipelined tile's: kStages stages of kDepth
// come into shared memory ahead of their use, the segments from
// TileSegmentLists, and chunks of W in dead strips are zero fills that read
// nothing. The forward product and dx bring A and W's live runs, and dW
// its whole tiles, by tensor copies (the TMA: one thread issues a few per
// stage, an mbarrier counts their bytes); the rest comes by every thread's
// cp.async. A stage's products cover only its live
// blocks: one wgmma per run of 128, 64, 32 or 16 columns (the widest that
// W's block width divides) in a live block, whose accumulators are the
// matching slice of the full-width product's: no dead block is multiplied.
// Where a live block's factor is not 1, the threads rescale the stage's W in
// shared memory before the product.
//
// Shared memory holds each operand in one of wgmma's swizzled layouts
// (SwizzledLayout): rows of 32, 64 or 128 bytes whose 16-byte chunks are
// permuted by the row, so that a quarter warp's copy of 128 contiguous
// bytes of global memory lands in one 128-byte line of shared memory, in
// distinct banks. (The unswizzled core-matrix layout, 8 rows of one 16-byte
// chunk each, could not do both: with either the global reads or the
// shared-memory writes of a quarter warp scattered, each L2 request carried
// one sector, half of it used, and L2 throughput bound the tile on the
// H100.)
#ifndef MASKED_OPS_CC_KERNELS_CUDA_WARPGROUP_GEMM_CUH_
#define MASKED_OPS_CC_KERNELS_CUDA_WARPGROUP_GEMM_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cc/kernels/cuda/mask_factors.cuh"
#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/kernels/cuda/pipelined_gemm.cuh"
#include "cc/kernels/cuda/ptx_primitives.cuh"

namespace masked_ops {
namespace gpu {
namespace warpgroup {

namespace pl = pipelined;

constexpr int kThreads = 128;  // one warpgroup
// Operand stages in shared memory: the one multiplied, the one before it
// (its products may still run: RunPipeline) and kStages - 2 in flight
// ahead, so that the copies are issued four steps before their products.
// At stages of 32, 6 x 16 KB: two thread blocks per SM, whose 255
// registers hold the accumulators and the copies' state with no spill (at
// three blocks, capped at 168, they spilled, and the copies led by two
// steps only).
constexpr int kStages = 6;
constexpr int kBlocksPerSm = 2;
constexpr int kHalfRows = 64;  // the rows of one wgmma
constexpr int kChunkElements = 8;     // of a 16-bit type in a 16-byte chunk
constexpr int kSwizzleRepeat = 1024;  // bytes: the alignment every layout's pattern needs

// The 16-bit types (TF32 wgmma cannot take B N-major).
template <typename D>
constexpr bool kHasWarpgroupPath = std::is_same_v<D, __half> || std::is_same_v<D, __nv_bfloat16>;

// An operand stage of a 16-bit type: kLines lines of kChunks 16-byte
// chunks, a line being a row of A or a column of B along the depth
// (K-major: 128 lines of kDepth) or one depth along the rows or columns
// (kDepthLines, M- or N-major: kDepth lines of 128). wgmma's swizzled
// layouts: lines of kRowBytes (K-major: the whole line, 32, 64 or 128
// bytes; otherwise kLineRowBytes / 2 of its rows or columns, 128, 64 or 32
// bytes, the next group of as many after all the first's lines), one after
// the other, each line's chunks
// permuted by XOR with bits 7 .. of its address (the 32-, 64- and 128-byte
// swizzles of the PTX ISA, which act on shared addresses: stages start on
// kSwizzleRepeat bytes). Logical offsets (chunks in order) are what the
// descriptors take; the hardware applies the permutation.
template <int kDepth, bool kDepthLines, int kLineRowBytes = 128>
struct SwizzledLayout {
  static_assert(pl::kTileRows == pl::kTileCols, "a K-major operand has 128 lines, A's or B's");
  static_assert(kDepth == 16 || kDepth == 32 || kDepth == 64, "a K-major line is one swizzle row");
  static_assert(kLineRowBytes == 32 || kLineRowBytes == 64 || kLineRowBytes == 128, "a swizzle's row");
  static constexpr bool kDepthLinesLayout = kDepthLines;
  static constexpr int kLines = kDepthLines ? kDepth : pl::kTileRows;
  static constexpr int kChunks = kDepthLines ? pl::kTileCols / kChunkElements : kDepth / kChunkElements;
  static constexpr int kRowBytes = kDepthLines ? kLineRowBytes : 2 * kDepth;
  static constexpr int kRowChunks = kRowBytes / 16;
  static constexpr int kRowElements = kRowBytes / 2;
  // M/N-major: where the next group of kRowElements rows or columns starts.
  static constexpr int kGroupElements = kLines * kRowElements;
  // The descriptor's fields: the swizzle (1: 128 bytes, 2: 64, 3: 32); the
  // byte offsets between 8-line groups (stride) and, M/N-major, between
  // the groups of rows or columns (leading; unused K-major).
  static constexpr uint64_t kSwizzleMode = kRowBytes == 128 ? 1 : kRowBytes == 64 ? 2 : 3;
  static constexpr uint32_t kStrideBytes = 8 * kRowBytes;
  static constexpr uint32_t kLeadingBytes = kDepthLines ? 2 * kGroupElements : 16;

  __host__ __device__ static constexpr int LogicalOffset(int line, int chunk) {
    return RowStart(line, chunk) + chunk % kRowChunks * kChunkElements;
  }
  // Where the chunk lies: its place in the row XOR the row's address bits
  // 7 .. (a half's offset is a multiple of 8 rows: no change there).
  __host__ __device__ static constexpr int Offset(int line, int chunk) {
    const int row_bits = (line * kRowBytes >> 7) & (kRowChunks - 1);
    return RowStart(line, chunk) + ((chunk % kRowChunks) ^ row_bits) * kChunkElements;
  }

 private:
  __host__ __device__ static constexpr int RowStart(int line, int chunk) {
    return chunk / kRowChunks * kGroupElements + line * kRowElements;
  }
};

// The stage buffer after `slot`, in turn.
__device__ inline int NextSlot(int slot) { return slot + 1 == kStages ? 0 : slot + 1; }

// Elements of one operand stage (128 lines), and the bytes of dynamic
// shared memory for stages of kRowGroups such A operands and one B (with
// room to align the stages).
template <int kDepth>
constexpr int kOperandElements = pl::kTileRows * kDepth;
template <typename D, int kDepth, int kRowGroups = 1>
constexpr int kSharedBytes = kStages * (kRowGroups + 1) * kOperandElements<kDepth> * int(sizeof(D)) + kSwizzleRepeat;
static_assert(kOperandElements<16> * 2 % kSwizzleRepeat == 0, "operand stages keep the swizzle alignment");

// A matrix descriptor for an operand laid out as Layout whose logical start
// is at shared address `address`.
template <typename Layout>
__device__ inline uint64_t Descriptor(uint32_t address) {
  return (Layout::kSwizzleMode << 62) | (uint64_t{Layout::kStrideBytes >> 4} << 32) |
         (uint64_t{Layout::kLeadingBytes >> 4} << 16) | ((address & 0x3ffffu) >> 4);
}

// `elements` of D as a move of a descriptor's start address (16-byte units).
template <typename D>
__host__ __device__ constexpr uint64_t DescriptorUnits(int elements) {
  return uint64_t(elements) * sizeof(D) / 16;
}

// The threads' places in a stage of SwizzledLayout (lines by chunks of D),
// for copies into it and rewrites of it: thread t holds chunk t % kChunks
// of lines t / kChunks + i kLinesPerPass (copy i), so that a quarter warp's
// 128 bytes are contiguous along one line or consecutive ones in global
// memory and land in one 128-byte line of shared memory.
template <typename D, int kDepth, bool kDepthLines, int kLineRowBytes = 128>
class SwizzledLanes {
 public:
  using Layout = SwizzledLayout<kDepth, kDepthLines, kLineRowBytes>;
  static constexpr int kPerChunk = kChunkElements;
  static constexpr int kLinesPerPass = kThreads / Layout::kChunks;
  static constexpr int kCopies = Layout::kLines / kLinesPerPass;
  static_assert(kCopies * kLinesPerPass == Layout::kLines, "every thread copies as many chunks");
  // Copy i lies this far after copy 0: the permutation repeats every 8 lines.
  static constexpr int kCopyStride = kLinesPerPass * Layout::kRowElements;
  static_assert(kLinesPerPass % 8 == 0, "every copy of a thread has the same permutation");

  __device__ SwizzledLanes() : chunk_(ThreadChunk()), line0_(ThreadLine()) {}

  // This thread's chunk, and its first line (copy i's is kLinesPerPass i
  // further), for gathers that follow the same lane mapping.
  __device__ static int ThreadChunk() { return threadIdx.x % Layout::kChunks; }
  __device__ static int ThreadLine() { return threadIdx.x / Layout::kChunks; }
  __device__ int Line(int i) const { return line0_ + i * kLinesPerPass; }
  // The tile's strip (16 rows or columns across the depth) holding copy i.
  __device__ int Strip(int i) const { return (kDepthLines ? chunk_ * kPerChunk : Line(i)) / pl::kStrip; }

  // rewrite(i, values) on the 8 D of this thread's chunk of copy i in
  // `stage`, in place, for each copy.
  template <typename Rewrite>
  __device__ void RewriteChunks(D* stage, const Rewrite& rewrite) const {
    D* dst = stage + Layout::Offset(Line(0), chunk_);
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      uint4 bits = *reinterpret_cast<const uint4*>(dst + i * kCopyStride);
      D values[kPerChunk];
      static_assert(sizeof(values) == sizeof(bits), "a chunk is 16 bytes");
      memcpy(values, &bits, sizeof(bits));
      rewrite(i, values);
      memcpy(&bits, values, sizeof(bits));
      ptx::StoreShared16(dst + i * kCopyStride, bits);
    }
  }

 protected:
  int chunk_, line0_;
};

// Copies operand tiles whose lines run along the depth (SwizzledLayout with
// kDepthLines: dW's x and dy, the conv's filters, whose rows are the
// depth) from a row-major global matrix by cp.async, stage after stage, the
// tile's columns fixed; in SwizzledLanes' places. (The K-major operands come
// by tensor copies or, the conv's input, by its own gather.)
template <typename D, int kDepth>
class SwizzledCopier : public SwizzledLanes<D, kDepth, true> {
  using Lanes = SwizzledLanes<D, kDepth, true>;

 public:
  using typename Lanes::Layout;
  using Lanes::kCopies;
  using Lanes::kLinesPerPass;
  using Lanes::kPerChunk;

  // src: the matrix, ld its leading dimension; fixed0 and fixed_end: the
  // tile's first column and the matrix's columns.
  __device__ SwizzledCopier(const D* src, int64_t ld, int64_t fixed0, int64_t fixed_end)
      : matrix_(src),
        base_(src + fixed0 + this->chunk_ * kPerChunk + this->Line(0) * ld),
        ld_(ld),
        fixed_ok_(fixed0 + this->chunk_ * kPerChunk < fixed_end) {}

  // Bit i: copy i lies in a strip set in `strips`.
  __device__ unsigned CopiesIn(unsigned strips) const {
    unsigned copies = 0;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) copies |= ((strips >> this->Strip(i)) & 1u) << i;
    return copies;
  }

  // Stages the tile whose depth starts at d0 into `stage`: copy i is read
  // where bit i of `live` is set and it lies inside the matrix and before
  // the depth's end d_end; the others are zero fills that read nothing.
  __device__ void Issue(D* stage, int64_t d0, int64_t d_end, unsigned live) const {
    const D* src = base_ + d0 * ld_;
    const int64_t step = int64_t{kLinesPerPass} * ld_;
    D* dst = stage + Layout::Offset(this->Line(0), this->chunk_);
    const int depth_left = static_cast<int>(max(int64_t{0}, min(d_end - d0, int64_t{kDepth})));
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const bool read = fixed_ok_ && ((live >> i) & 1u) != 0 && this->Line(i) < depth_left;
      ptx::CopyAsync16(dst + i * Lanes::kCopyStride, read ? src : matrix_, read);
      src += step;
    }
  }

 private:
  const D* matrix_;  // what a zero fill names: no byte of it is read
  const D* base_;    // chunk 0 at depth 0
  int64_t ld_;
  bool fixed_ok_;  // this thread's chunk lies inside the matrix's columns
};

// Rescales the staged B of an entry marked scaled (pl::ScaledOf): every
// thread rewrites its own chunks of B (in the places `lanes` gives, a
// SwizzledLanes) in live strips as Masked(value, factor) rounded to D,
// factor_of(strip) giving a strip's factor (looked up once per run of
// copies in one strip: an N-major B's copies of a thread all lie in one).
// Every thread, after a barrier; the caller fences and synchronizes after.
template <typename D, typename Lanes, typename FactorOf>
__device__ inline void RescaleStage(const Lanes& lanes, D* b_stage, uint32_t entry, const FactorOf& factor_of) {
  int factor_strip = -1;
  float factor = 0.0f;
  lanes.RewriteChunks(b_stage, [&](int i, D(&values)[Lanes::kPerChunk]) {
    const int strip = lanes.Strip(i);
    if (((pl::StripsOf(entry) >> strip) & 1u) == 0) return;  // zero fills, never multiplied
    if (strip != factor_strip) {
      factor_strip = strip;
      factor = factor_of(strip);
    }
    for (D& value : values) value = FromCompute<D>(Masked(ToCompute(value), factor));
  });
}

// Which thread blocks of a launch of the warpgroup products multiply: all,
// those whose list entries have every strip of their tile live, or the
// others.
enum class Tiles : int { kAll, kWhole, kPartlyLive };

// The widest run of strips (1, 2, 4 or 8 of 16 columns, aligned in the
// tile) that lies in one block of `block` output columns (of `cols`): all
// its strips live or all dead.
inline int RunStrips(int64_t block, int64_t cols) {
  if (block >= cols) return pl::kTileStrips;
  int run = 1;
  while (run < pl::kTileStrips && block % (2 * run * pl::kStrip) == 0) run *= 2;
  return run;
}

// The columns of the boxes in which the forward product (B N-major) or dx
// (kTransposed: B K-major) with runs of run_strips strips brings W's stages
// by tensor copies, one box per run holding a live strip: dx, a run's (its
// lines, W's rows, follow one another); forward, a run's up to 64, the
// N-major layout's rows being as wide (ForwardLineRowBytes).
__host__ __device__ constexpr int BoxColumns(bool transposed, int run_strips) {
  return transposed || run_strips * pl::kStrip < kHalfRows ? run_strips * pl::kStrip : kHalfRows;
}
// The bytes of a row of the forward product's N-major W stage with runs of
// run_strips strips: a box's columns.
__host__ __device__ constexpr int ForwardLineRowBytes(int run_strips) {
  return BoxColumns(false, run_strips) * 2;
}

// run(run_strips, taken) for each launch of a warpgroup kernel over output
// columns cut into blocks of `block` (of `cols`), both integral_constants:
// one launch of whole-tile products where runs are whole tiles, else one for
// the tiles that are all live and one, with run_strips from RunStrips, for
// the others.
template <typename Run>
void WithRunStrips(int64_t block, int64_t cols, const Run& run) {
  const std::integral_constant<int, pl::kTileStrips> whole;
  const int run_strips = RunStrips(block, cols);
  if (run_strips == pl::kTileStrips) return run(whole, std::integral_constant<Tiles, Tiles::kAll>{});
  run(whole, std::integral_constant<Tiles, Tiles::kWhole>{});
  const std::integral_constant<Tiles, Tiles::kPartlyLive> partly_live;
  switch (run_strips) {
    case 4:
      return run(std::integral_constant<int, 4>{}, partly_live);
    case 2:
      return run(std::integral_constant<int, 2>{}, partly_live);
    default:
      return run(std::integral_constant<int, 1>{}, partly_live);
  }
}

// acc += A B over the runs of kRunStrips strips from run kRun on that have
// a live strip in `strips`; a and b: the operands' descriptors (b at column
// 0), A M-major (kAMMajor) or K-major, B laid out as BLayout (a
// SwizzledLayout: N-major where its lines are the depth's, else K-major).
// kWholeLive: a run of all 8 strips is live whenever the stage is
// multiplied (the listed products), so that product needs no guard.
template <typename D, int kRunStrips, bool kAMMajor, typename BLayout, bool kWholeLive, int kRun = 0>
__device__ inline void MultiplyRuns(float (&acc)[64], uint64_t a, uint64_t b, unsigned strips) {
  if constexpr (kRun < pl::kTileStrips / kRunStrips) {
    constexpr bool kBNMajor = BLayout::kDepthLinesLayout;
    constexpr unsigned kRunMask = (1u << kRunStrips) - 1;
    // The run's first column along B, in the descriptor's 16-byte units.
    constexpr int kColumn = kRun * kRunStrips * pl::kStrip;
    constexpr uint64_t kRunStart = DescriptorUnits<D>(
        kBNMajor ? BLayout::LogicalOffset(0, kColumn / kChunkElements) : BLayout::LogicalOffset(kColumn, 0));
    ptx::WarpgroupMma<D, kRunStrips * pl::kStrip, kRun * kRunStrips * pl::kStrip / 2,
                      (kRunStrips < pl::kTileStrips || !kWholeLive), kAMMajor, kBNMajor>(
        acc, a, b + kRunStart, ((strips >> (kRun * kRunStrips)) & kRunMask) != 0);
    MultiplyRuns<D, kRunStrips, kAMMajor, BLayout, kWholeLive, kRun + 1>(acc, a, b, strips);
  }
}

// The live strips (bit s: columns 16 s ..) of each 64-row half of a stage.
struct HalfStrips {
  unsigned half[2];
};

// acc[half] += A B over one stage (a_stage, b_stage: the descriptors of the
// operands' logical starts) for each half's live strips; issued, not waited
// for: one product per run of kRunStrips strips (RunStrips: 16 kRunStrips
// columns, all in one block) that has a live strip. (A run's strips past the
// output's last column are zero fills whose products are never stored.) The
// products are predicated, none branched over, and never a whole-tile
// product mixed with narrower ones over the same accumulators: ptxas then
// waits for each. A descriptor of a place inside the stage is the stage's
// plus its offset in 16-byte units (addresses stay inside the 256 KB the
// address field spans), a constant here.
template <typename D, int kDepth, int kRunStrips, bool kAMMajor, typename BLayout, bool kWholeLive>
__device__ inline void MultiplyStage(uint64_t a_stage, uint64_t b_stage, const HalfStrips& strips,
                                     float (&acc)[2][64]) {
  using ALayout = SwizzledLayout<kDepth, kAMMajor>;
  constexpr bool kBNMajor = BLayout::kDepthLinesLayout;
#pragma unroll
  for (int k0 = 0; k0 < kDepth; k0 += 16) {
    const int b_offset = kBNMajor ? BLayout::LogicalOffset(k0, 0) : BLayout::LogicalOffset(0, k0 / kChunkElements);
    const uint64_t b = b_stage + DescriptorUnits<D>(b_offset);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int a_offset = kAMMajor ? ALayout::LogicalOffset(k0, half * kHalfRows / kChunkElements)
                                    : ALayout::LogicalOffset(half * kHalfRows, k0 / kChunkElements);
      MultiplyRuns<D, kRunStrips, kAMMajor, BLayout, kWholeLive>(acc[half], a_stage + DescriptorUnits<D>(a_offset), b,
                                                                 strips.half[half]);
    }
  }
}

// The main loop over `steps` stages: issue(step, slot, a_stage, b_stage,
// arrival) stages a step's operands (every thread, steps 0, 1, ... in
// order) into buffer `slot` (of kStages, in turn), by cp.async or, where
// kTensorCopies, also by tensor copies on the mbarrier `arrival`, which one
// thread arms with their bytes (each step one arrival); prepare(step, slot,
// b_stage) gives the step's HalfStrips after the step's barrier (every
// thread, in order; it may rewrite the stage, and then fences and
// synchronizes itself). A step's products run on while the warps issue the
// copies of a stage ahead, wait for the step before's products
// (wait_group 1) and pass the next step's barrier, so that the next products
// queue behind them with no gap at the barrier. A buffer is refilled once
// every warp has waited for the products reading it and passed a barrier
// since: the copies run kStages - 2 steps ahead (the step multiplied and the
// one before it hold two buffers). The other thread block on the SM (in
// tall tiles, the other warpgroup) fills the gaps that remain. BLayout and
// kWholeLive as for MultiplyRuns.
// kRowGroups warpgroups (the block's threads) share each stage's B, each
// multiplying its own 128 rows of A, which follow one another in the stage
// (K-major A only: a_stage holds them all).
template <typename D, int kDepth, int kRunStrips, bool kAMMajor, typename BLayout, bool kWholeLive, bool kTensorCopies,
          int kRowGroups, typename Issue, typename Prepare>
__device__ inline void RunPipeline(int64_t steps, const Issue& issue, const Prepare& prepare, float (&acc)[2][64]) {
  static_assert(kRowGroups == 1 || !kAMMajor, "the row groups' A lie one after another, K-major");
  constexpr int kStageElements = (kRowGroups + 1) * kOperandElements<kDepth>;
  // The stages start on the swizzle's repeat in the shared window (kSharedBytes
  // has room for the shift).
  unsigned char* dynamic = ptx::DynamicShared();
  D* shared = reinterpret_cast<D*>(dynamic + ((0u - ptx::SharedAddress(dynamic)) & (kSwizzleRepeat - 1)));
  const auto a_of = [&](int slot) { return shared + slot * kStageElements; };
  const auto b_of = [&](int slot) { return a_of(slot) + kRowGroups * kOperandElements<kDepth>; };
  __shared__ uint64_t arrivals[kStages];
  if constexpr (kTensorCopies) {
    if (threadIdx.x == 0) {
      for (uint64_t& arrival : arrivals) ptx::MbarrierInit(&arrival, 1);
      ptx::FenceMbarrierInit();
    }
    __syncthreads();
  }
  // Slot 0's descriptors (A: this warpgroup's rows); a slot's lie that many
  // stages further.
  const uint32_t shared_address = ptx::SharedAddress(shared);
  const int row_group = kRowGroups > 1 ? static_cast<int>(threadIdx.x) / kThreads : 0;
  constexpr int kOperandBytes = kOperandElements<kDepth> * int(sizeof(D));
  const uint64_t a_first = Descriptor<SwizzledLayout<kDepth, kAMMajor>>(shared_address + row_group * kOperandBytes);
  const uint64_t b_first = Descriptor<BLayout>(shared_address + kRowGroups * kOperandBytes);
  constexpr int kAhead = kStages - 2;
  ptx::PinAccumulators(acc);
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < steps) issue(int64_t{s}, s, a_of(s), b_of(s), &arrivals[s]);
    ptx::CommitCopies();
  }
  int slot = 0;             // step's
  int issue_slot = kAhead;  // step + kAhead's
  uint32_t parity = 0;      // of the phase of arrivals[slot] that step's copies complete
  for (int64_t step = 0; step < steps; ++step) {
    ptx::WaitCopies<kAhead - 1>();
    if constexpr (kTensorCopies) ptx::MbarrierWait(&arrivals[slot], parity);
    // This thread's copies of the step are written; after the barrier every
    // thread's are, for the products' reads too.
    ptx::FenceProxyAsync();
    __syncthreads();
    const HalfStrips strips = prepare(step, slot, b_of(slot));
    const uint64_t stage = DescriptorUnits<D>(slot * kStageElements);
    ptx::WarpgroupFence();
    MultiplyStage<D, kDepth, kRunStrips, kAMMajor, BLayout, kWholeLive>(a_first + stage, b_first + stage, strips, acc);
    ptx::WarpgroupCommit();
    // Every warp waited for its share of step - 2's products before this
    // step's barrier (a wait covers the executing warp's products only), so
    // step - 2's buffers, which step + kAhead refills, are free.
    const int64_t next = step + kAhead;
    if (next < steps) issue(next, issue_slot, a_of(issue_slot), b_of(issue_slot), &arrivals[issue_slot]);
    ptx::CommitCopies();
    ptx::WarpgroupWait<1>();
    slot = NextSlot(slot);
    issue_slot = NextSlot(issue_slot);
    if (slot == 0) parity ^= 1u;
  }
  ptx::WarpgroupWait<0>();
  ptx::PinAccumulators(acc);
}

// A product over listed segments, as pl::RunListedSegments, B staged as
// BLayout (N-major: the forward's W; K-major: dx's W^T): `count` entries
// of `list`, each segment segment_depth deep; issue_segment(a_stage,
// b_stage, entry, sub, arrival) stages stage `sub` of an entry's segment
// (kTensorCopies: partly by tensor copies on `arrival`, as for
// RunPipeline); scale_stage(b_stage, entry) rescales a staged B whose entry
// is marked scaled (every thread, after a barrier). Only the 64-row halves
// set in `halves` (bit h) multiply; kWholeLive as for MultiplyRuns, which
// every half must then be; kRowGroups as for RunPipeline. Step entries
// travel from the issuing threads to the multiplying ones through shared
// memory.
template <typename D, int kDepth, int kRunStrips, typename BLayout, bool kWholeLive, bool kTensorCopies,
          int kRowGroups, typename IssueSegment, typename ScaleStage>
__device__ inline void RunListedSegments(const uint32_t* list, int count, int64_t segment_depth, unsigned halves,
                                         const IssueSegment& issue_segment, const ScaleStage& scale_stage,
                                         float (&acc)[2][64]) {
  __shared__ uint32_t slot_entry[kStages];
  const int per_segment = static_cast<int>(CeilDiv(segment_depth, int64_t{kDepth}));
  pl::SegmentCursor issuing(list, count, per_segment);
  const auto issue = [&](int64_t, int slot, D* a_stage, D* b_stage, uint64_t* arrival) {
    if (threadIdx.x == 0) slot_entry[slot] = issuing.entry();
    issue_segment(a_stage, b_stage, issuing.entry(), issuing.sub(), arrival);
    issuing.Advance();
  };
  const auto prepare = [&](int64_t, int slot, D* b_stage) {
    const uint32_t entry = slot_entry[slot];
    if (pl::ScaledOf(entry)) {
      scale_stage(b_stage, entry);
      ptx::FenceProxyAsync();
      __syncthreads();
    }
    const unsigned strips = ptx::WarpUniform(pl::StripsOf(entry));
    return HalfStrips{{(halves & 1u) != 0 ? strips : 0u, (halves & 2u) != 0 ? strips : 0u}};
  };
  RunPipeline<D, kDepth, kRunStrips, false, BLayout, kWholeLive, kTensorCopies, kRowGroups>(
      int64_t{count} * per_segment, issue, prepare, acc);
}

// The tile row of this thread's accumulator row `slot` (0 .. 3: the 64-row
// half slot / 2, a fragment's first or second 8 rows slot % 2; warpgroup
// g's rows from 128 g).
__device__ inline int AccumulatorRow(int slot) {
  return threadIdx.x / kThreads * pl::kTileRows + slot / 2 * kHalfRows + 16 * (threadIdx.x % kThreads / 32) +
         threadIdx.x % 32 / 4 + 8 * (slot % 2);
}

// write(row, col, v0, v1, slot, strip) for every accumulator pair of the
// thread: tile row `row` (AccumulatorRow(slot)), tile columns col and col +
// 1, in 16-column strip `strip` (slot and strip compile-time indices once
// unrolled, for per-thread arrays).
template <typename Write>
__device__ inline void ForEachAccumulatorPair(const float (&acc)[2][64], const Write& write) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int i = 0; i < 64; i += 2) {
      const int slot = half * 2 + i / 2 % 2;
      write(AccumulatorRow(slot), 8 * (i / 4) + 2 * (lane % 4), acc[half][i], acc[half][i + 1], slot, i / 8);
    }
  }
}

// The flat block index of each of a thread's accumulators, as
// pl::FragmentBlocks: one part per accumulator row slot and per column
// strip, worked out once (a 64-bit division per entry is a subroutine call
// of ~70 instructions). row_part_of(row), col_part_of(col) give the parts
// for a row and a column of the output.
struct AccumulatorBlocks {
  int64_t row_part[4];
  int64_t col_part[pl::kTileStrips];
  template <typename RowPart, typename ColPart>
  __device__ AccumulatorBlocks(int64_t row0, int64_t col0, const RowPart& row_part_of, const ColPart& col_part_of) {
#pragma unroll
    for (int slot = 0; slot < 4; ++slot) row_part[slot] = row_part_of(row0 + AccumulatorRow(slot));
#pragma unroll
    for (int strip = 0; strip < pl::kTileStrips; ++strip) col_part[strip] = col_part_of(col0 + strip * pl::kStrip);
  }
  __device__ int64_t operator()(int slot, int strip) const { return row_part[slot] + col_part[strip]; }
};

}  // namespace warpgroup
}  // namespace gpu
}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_CUDA_WARPGROUP_GEMM_CUH_
