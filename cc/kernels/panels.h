// Packing live weight blocks into PanelGemm panels (see gemm.h), shared by the
// matmul and conv2d kernels. Framework-free, baseline instruction set.
#ifndef MASKED_OPS_CC_KERNELS_PANELS_H_
#define MASKED_OPS_CC_KERNELS_PANELS_H_

#include <algorithm>
#include <cstdint>

#include "cc/kernels/block_mask.h"

namespace masked_ops {

// PanelGemm tuning shared by the matmul and conv2d drivers.
// Bytes of packed `a` that consecutive PanelGemm units share, sized for L2.
constexpr int64_t kChunkBytes = 384 * 1024;
constexpr int64_t kMaxChunkTiles = 16;
// Mean uses of each value of a (live blocks per block of depth) from which
// PanelGemm packs a rather than reading its rows in place (measured here:
// in place wins clearly at 13 uses, breaks even at 32-64, loses at 128).
constexpr int64_t kPackAtUses = 64;
// Bytes of a panel strip one PanelGemm pass multiplies into every row tile of
// a chunk before moving on: a run of live blocks whose strip fits in L1. A
// narrow strip gets a deeper run, which also means fewer passes loading and
// storing the output tiles.
constexpr int64_t kRunStripBytes = 32 * 1024;

// One live block of a row-major weight matrix: rows x cols values from w,
// rows ld apart. With an element mask (laid out like w), each value enters as
// where(mask != 0, w * mask, 0); without one (block-level mask), as w * factor.
template <typename T, typename TMask>
struct BlockSource {
  const T* w;
  const TMask* element_mask;
  T factor;
  int64_t ld;
  int64_t rows;
  int64_t cols;
};

// Where a block goes in its group's panel: the group's stack of live blocks
// is `depth` deep, this block starts at depth_pos and takes segment_len of
// it, and the stack is cut into strips of strip_width columns, padded_width
// in all.
template <typename T>
struct PanelSlot {
  T* panel;
  int64_t depth;
  int64_t depth_pos;
  int64_t segment_len;
  int64_t strip_width;
  int64_t padded_width;
};

// Writes the block into its slot, zero-padded to segment_len x padded_width.
// With `transposed`, the block enters as its transpose: its columns run down
// the depth (the products that multiply by W^T).
template <typename T, typename TMask>
void PackBlock(const BlockSource<T, TMask>& block, bool transposed, const PanelSlot<T>& slot) {
  const int64_t block_depth = transposed ? block.cols : block.rows;
  const int64_t block_width = transposed ? block.rows : block.cols;
  const int64_t strip_stride = slot.depth * slot.strip_width;
  T* const origin = slot.panel + slot.depth_pos * slot.strip_width;
  if (block_depth < slot.segment_len || block_width < slot.padded_width) {
    for (int64_t s = 0; s * slot.strip_width < slot.padded_width; ++s) {
      std::fill_n(origin + s * strip_stride, slot.segment_len * slot.strip_width, T(0));
    }
  }
  auto masked = [&](const T* src, const TMask* mask, int64_t c) {
    if (mask == nullptr) return src[c] * block.factor;
    return IsLive(mask[c]) ? src[c] * MaskFactor<T>(mask[c]) : T(0);
  };
  for (int64_t r = 0; r < block.rows; ++r) {
    const T* src = block.w + r * block.ld;
    const TMask* mask = block.element_mask == nullptr ? nullptr : block.element_mask + r * block.ld;
    if (transposed) {
      // Row r of the block is column r of its transpose.
      T* dst = origin + (r / slot.strip_width) * strip_stride + r % slot.strip_width;
      for (int64_t c = 0; c < block.cols; ++c) dst[c * slot.strip_width] = masked(src, mask, c);
      continue;
    }
    for (int64_t s = 0; s * slot.strip_width < block.cols; ++s) {
      T* dst = origin + s * strip_stride + r * slot.strip_width;
      const int64_t offset = s * slot.strip_width;
      const int64_t count = std::min(slot.strip_width, block.cols - offset);
      if (mask == nullptr && block.factor == T(1)) {
        std::copy_n(src + offset, count, dst);
      } else {
        for (int64_t c = 0; c < count; ++c) dst[c] = masked(src, mask, offset + c);
      }
    }
  }
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_PANELS_H_
