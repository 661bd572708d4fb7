// The dense-arithmetic core of the masked kernels, compiled once per
// instruction set (cc/kernels/gemm_isa.inc) and picked at run time.
//
// Both block-sparse products reduce to two GEMM shapes:
//
// PanelGemm: out[:, group g] = a[:, segments of g] @ panel(g). Each output
//   block column g (of `width` columns) has a packed panel made of its live
//   blocks stacked in depth, and each live block p brings the depth segment
//   [segment_begin[p], segment_begin[p] + segment_len) of `a`. The forward
//   product is this with a = x and panels from w; dx is this with a = dy and
//   panels from w^T.
// OuterGemm: for one block, out = a[:, rows]^T @ b[:, cols] over all m; dw
//   of a live block.
//
// This header holds plain data only: the per-ISA translation units are
// compiled with different -m flags and must share no inline code with the
// rest of the library (the linker could keep their AVX copy for everyone).
#ifndef MASKED_OPS_CC_KERNELS_GEMM_H_
#define MASKED_OPS_CC_KERNELS_GEMM_H_

#include <cstdint>

namespace masked_ops {

// How a backend tiles the output: a_tile rows of `a` are packed together
// (interleaved, see PackedRows) for PanelGemm, OuterGemm covers outer_tile
// rows per call, and output columns are cut into strips of strip_width, the
// width of the packed panels.
struct GemmTiling {
  int64_t a_tile;
  int64_t outer_tile;
  int64_t strip_width;
  int64_t vector_lanes;  // T values per SIMD register, for RowDot's segments
};

// `a` packed for PanelGemm: rows in tiles of a_tile; tile t holds, for each
// depth index d in [0, depth_padded), the a_tile values a[t * a_tile + r, d]
// contiguously, zero beyond the matrix. Size: tiles * depth_padded * a_tile.
template <typename T>
struct PackedRows {
  const T* data;
  int64_t rows;
  int64_t tile_rows;  // GemmTiling::a_tile
  int64_t depth_padded;
};

template <typename T>
struct PanelGemmArgs {
  PackedRows<T> a;
  int64_t groups;
  const int64_t* group_offsets;  // groups + 1 entries into the live list
  const int64_t* segment_begin;  // per live block: its first depth index in a
  int64_t segment_len;           // depth rows per live block, padded
  // Panels of group g start at panels + group_offsets[g] * segment_len *
  // padded_width; in it, strip s (strip_width columns) is a
  // (live blocks * segment_len) x strip_width row-major matrix.
  // With b_in_place, `panels` is w itself, [depth, out_cols] row-major, read
  // where the live blocks lie: only when the blocks need no masking (all mask
  // factors 1), none is ragged, and every strip is full.
  const T* panels;
  bool b_in_place;
  int64_t strip_width;   // GemmTiling::strip_width for this width
  int64_t padded_width;  // width rounded up to the strip width
  int64_t width;         // output columns per group
  int64_t out_cols;      // output columns in all; the last group may be short
  T* out;                // [rows, out_cols] row-major
  // When set, whole row tiles read a in place from these rows ([rows,
  // a_rows_stride] row-major, every segment inside them); a.data then holds
  // only the last, partial tile, packed.
  const T* a_rows;
  int64_t a_rows_stride;
  int64_t rows_per_chunk;  // a multiple of a_tile
  // Live blocks per depth run: runs of this many blocks are multiplied in
  // turn so that a run's panel strip stays in L1 across all row tiles.
  int64_t blocks_per_run;
};

// For dw, one tile of one live block over a run of m: out (rows x cols,
// leading dimension ldo) gets a^T b over `depth` steps, added to what is
// there when accumulate. At depth step d, a holds the tile's outer_tile
// values of x^T at a[d * lda + r] and b the strip's values at b[d * ldb + c].
// With segment_begin, the steps are `segments` runs of `depth` steps, run s
// reading a from depth step segment_begin[s] on and b straight on.
// All outer_tile rows and strip_width columns are read, whatever rows and
// cols are stored.
template <typename T>
struct OuterGemmArgs {
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  int64_t depth;
  const int64_t* segment_begin = nullptr;
  int64_t segments = 1;
  int64_t block_width;  // the strip width is GemmTiling::strip_width of this
  T* out;
  int64_t ldo;
  int64_t rows;
  int64_t cols;
  bool accumulate;
};

// For dx of a short dy, reading w in place: for k in [k_begin, k_end) (rows
// of one block row of w), out[r * ldo + k] = sum over the live blocks p of
// factors[p] * (dy[r, seg] . w[k, seg]), seg = [segment_begin[p],
// segment_begin[p] + segment_len). w is streamed once, row by row, with no
// packing; segment_len must be a multiple of GemmTiling::vector_lanes.
template <typename T>
struct RowDotArgs {
  const T* dy;
  int64_t rows;
  int64_t ldy;
  const T* w;
  int64_t ldw;
  int64_t k_begin;
  int64_t k_end;
  const int64_t* segment_begin;
  const T* factors;
  int64_t segments;
  int64_t segment_len;
  T* out;
  int64_t ldo;
};

// The entry points each instruction-set backend provides.
template <typename T>
struct GemmBackend {
  const char* name;
  GemmTiling (*tiling)(int64_t width);
  // Packs `rows` (<= tile_rows) rows of a strided matrix, element (r, d) at
  // a[r * row_stride + d * depth_stride], as one tile of PackedRows:
  // packed[d * tile_rows + r], zero for r >= rows or d >= depth.
  void (*pack_tile)(const T* a, int64_t row_stride, int64_t depth_stride, int64_t rows,
                    int64_t depth, int64_t tile_rows, int64_t depth_padded, T* packed);
  // Rows [chunk * rows_per_chunk, ...) of output group g.
  void (*panel_gemm_unit)(const PanelGemmArgs<T>& args, int64_t chunk, int64_t group);
  void (*outer_gemm)(const OuterGemmArgs<T>& args);
  void (*row_dot)(const RowDotArgs<T>& args);
};

// The fastest backend this CPU runs, unless MASKED_OPS_CPU_ISA names a slower
// one ("generic", "avx2" or "avx512"); chosen once per process.
template <typename T>
const GemmBackend<T>& SelectedGemmBackend();

// Name of the backend SelectedGemmBackend picks, e.g. "avx512".
const char* SelectedGemmBackendName();

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_GEMM_H_
