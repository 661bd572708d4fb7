// Block geometry and live-block indexing of a weight mask. Framework-free.
#ifndef MASKED_OPS_CC_KERNELS_BLOCK_MASK_H_
#define MASKED_OPS_CC_KERNELS_BLOCK_MASK_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace masked_ops {

// Runs work(begin, end) over [0, units) split in shards, possibly concurrently.
// cost_per_unit is a rough count of scalar operations per unit, which lets the
// scheduler pick a shard size. Every caller writes disjoint outputs per unit, so
// results never depend on how units are sharded.
using ParallelFor = std::function<void(int64_t units, int64_t cost_per_unit,
                                       const std::function<void(int64_t, int64_t)>& work)>;

// The CUDA kernels share the block geometry below.
#if defined(__CUDACC__)
#define MASKED_OPS_HOST_DEVICE __host__ __device__
#else
#define MASKED_OPS_HOST_DEVICE
#endif

// ceil(a / b) for a >= 0 and b >= 1, for any b: (a + b - 1) / b would
// overflow for the block sizes near 2^63 that a raw op call may pass.
MASKED_OPS_HOST_DEVICE inline int64_t CeilDiv(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }
// A block (or tile) size no larger than the extent it cuts, at least 1: a
// block larger than the matrix covers all of it, so the grid and its mask are
// unchanged, and products such as block_rows * cols stay in range for any
// size a raw op call passes (up to 2^63 - 1).
inline int64_t ClampBlock(int64_t block, int64_t extent) { return block < extent ? block : (extent > 1 ? extent : 1); }
inline int64_t RoundUp(int64_t value, int64_t multiple) { return CeilDiv(value, multiple) * multiple; }

// Bit patterns of the 16-bit float mask dtypes. The kernels only need "is it
// zero" and "its value", so they carry the bits instead of a framework type.
struct Float16Bits {
  uint16_t bits;
};
struct BFloat16Bits {
  uint16_t bits;
};

inline float BitsToFloat(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float ToFloat(Float16Bits h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline float ToFloat(BFloat16Bits b) { return BitsToFloat(static_cast<uint32_t>(b.bits) << 16); }

inline uint32_t FloatToBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// float -> float16, rounded to nearest even (as Eigen::half and NumPy round);
// NaN stays NaN (quiet), overflow gives Inf.
inline Float16Bits ToFloat16(float value) {
  const uint32_t bits = FloatToBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return Float16Bits{static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu))};
  if (magnitude >= 0x477ff000u) return Float16Bits{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: Inf
  if (magnitude < 0x38800000u) {
    // Below 2^-14, float16 counts in units of 2^-24: the scaling is exact and
    // nearbyint rounds half to even (the default rounding mode).
    const float units = std::nearbyint(BitsToFloat(magnitude) * 16777216.0f);
    return Float16Bits{static_cast<uint16_t>(sign | static_cast<uint16_t>(units))};
  }
  // Rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits;
  // a carry out of the mantissa correctly bumps the exponent.
  const uint32_t rounded = magnitude - 0x38000000u + 0xfffu + ((magnitude >> 13) & 1u);
  return Float16Bits{static_cast<uint16_t>(sign | (rounded >> 13))};
}

// float -> bfloat16, rounded to nearest even; NaN stays NaN (quiet).
inline BFloat16Bits ToBFloat16(float value) {
  const uint32_t bits = FloatToBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return BFloat16Bits{static_cast<uint16_t>((bits >> 16) | 0x40u)};
  return BFloat16Bits{static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}

// The type the CPU kernels compute a storage type in (float for the 16-bit
// floats, the type itself otherwise), and the conversions between them.
template <typename T>
struct ComputeType {
  using type = T;
};
template <>
struct ComputeType<Float16Bits> {
  using type = float;
};
template <>
struct ComputeType<BFloat16Bits> {
  using type = float;
};
template <typename T>
using ComputeOf = typename ComputeType<T>::type;

template <typename T>
inline T Widen(T value) {
  return value;
}
inline float Widen(Float16Bits value) { return ToFloat(value); }
inline float Widen(BFloat16Bits value) { return ToFloat(value); }

template <typename T>
inline T Narrow(ComputeOf<T> value) {
  if constexpr (std::is_same_v<T, Float16Bits>) {
    return ToFloat16(value);
  } else if constexpr (std::is_same_v<T, BFloat16Bits>) {
    return ToBFloat16(value);
  } else {
    return value;
  }
}

// A mask entry is live when it compares unequal to zero: NaN is live, -0 is not.
template <typename TMask>
inline bool IsLive(TMask v) {
  return v != TMask(0);
}
inline bool IsLive(Float16Bits v) { return (v.bits & 0x7fffu) != 0; }
inline bool IsLive(BFloat16Bits v) { return (v.bits & 0x7fffu) != 0; }

// The factor a live entry scales its weight by, in the weight's dtype, exactly
// as tf.cast(mask, T) would produce it.
template <typename T, typename TMask>
inline T MaskFactor(TMask v) {
  return static_cast<T>(v);
}
template <typename T>
inline T MaskFactor(Float16Bits v) {
  return static_cast<T>(ToFloat(v));
}
template <typename T>
inline T MaskFactor(BFloat16Bits v) {
  return static_cast<T>(ToFloat(v));
}

// A rows x cols matrix cut into block_rows x block_cols blocks; the last block
// row and column may be ragged.
struct BlockGrid {
  int64_t rows;
  int64_t cols;
  int64_t block_rows;
  int64_t block_cols;

  // The same grid with ClampBlock'ed block sizes.
  BlockGrid Clamped() const {
    return BlockGrid{rows, cols, ClampBlock(block_rows, rows), ClampBlock(block_cols, cols)};
  }
  int64_t grid_rows() const { return CeilDiv(rows, block_rows); }
  int64_t grid_cols() const { return CeilDiv(cols, block_cols); }
  int64_t row_begin(int64_t block_row) const { return block_row * block_rows; }
  int64_t col_begin(int64_t block_col) const { return block_col * block_cols; }
  int64_t rows_in(int64_t block_row) const {
    const int64_t begin = row_begin(block_row);
    return rows - begin < block_rows ? rows - begin : block_rows;
  }
  int64_t cols_in(int64_t block_col) const {
    const int64_t begin = col_begin(block_col);
    return cols - begin < block_cols ? cols - begin : block_cols;
  }
  // Extent of a packed block: a block never needs to be larger than the matrix,
  // whatever block size the caller asked for.
  int64_t packed_rows() const { return rows < block_rows ? rows : block_rows; }
  int64_t packed_cols() const { return cols < block_cols ? cols : block_cols; }
};

enum class MaskLevel {
  kElement,  // one mask entry per weight: [rows, cols]
  kBlock,    // one mask entry per block: [grid_rows, grid_cols]
};

template <typename TMask>
struct MaskView {
  const TMask* data;
  MaskLevel level;
};

// Live blocks grouped by block column (major = column) or by block row
// (major = row): the blocks of group g are minor[offsets[g] .. offsets[g+1]),
// and position p in that range is also the block's slot in a packed buffer.
struct LiveBlockList {
  std::vector<int64_t> offsets;
  std::vector<int64_t> minor;
  int64_t size() const { return static_cast<int64_t>(minor.size()); }
};

// Whether any entry of a rows x cols piece of a mask (rows ld apart) is live.
template <typename TMask>
bool AnyLive(const TMask* mask, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      if (IsLive(mask[r * ld + c])) return true;
    }
  }
  return false;
}

// live[i * grid_cols + j] != 0 when block (i, j) holds at least one live entry.
template <typename TMask>
std::vector<uint8_t> FindLiveBlocks(const BlockGrid& grid, MaskView<TMask> mask,
                                    const ParallelFor& parallel_for) {
  const int64_t grid_rows = grid.grid_rows();
  const int64_t grid_cols = grid.grid_cols();
  std::vector<uint8_t> live(static_cast<size_t>(grid_rows * grid_cols), 0);
  if (mask.level == MaskLevel::kBlock) {
    for (int64_t b = 0; b < grid_rows * grid_cols; ++b) live[b] = IsLive(mask.data[b]);
    return live;
  }
  // Element masks: each block row scans its own rows of the mask, stopping a
  // block's scan at its first live entry.
  parallel_for(grid_rows, grid.block_rows * grid.cols, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = grid.row_begin(i);
      const int64_t nr = grid.rows_in(i);
      for (int64_t j = 0; j < grid_cols; ++j) {
        const int64_t c0 = grid.col_begin(j);
        const int64_t nc = grid.cols_in(j);
        live[i * grid_cols + j] = AnyLive(mask.data + r0 * grid.cols + c0, grid.cols, nr, nc);
      }
    }
  });
  return live;
}

LiveBlockList GroupLiveBlocksByColumn(const BlockGrid& grid, const std::vector<uint8_t>& live);
LiveBlockList GroupLiveBlocksByRow(const BlockGrid& grid, const std::vector<uint8_t>& live);

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_BLOCK_MASK_H_
