#include "cc/kernels/masked_conv2d.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <new>
#include <vector>

#include "cc/kernels/gemm.h"
#include "cc/kernels/masked_matmul.h"
#include "cc/kernels/panels.h"
#include "cc/kernels/scratch.h"

// Every product here is a PanelGemm (gemm.h) whose `a` is gathered on the fly:
//   forward  rows = output pixels, depth = (tap, input-channel block) slices
//            of the receptive field (im2col), groups = output-channel blocks;
//   dx       rows = input pixels, depth = (tap, output-channel block) slices
//            of dy at the output pixels that read this input pixel, groups =
//            input-channel blocks, panels from the transposed filter blocks;
//   dfilter  one OuterGemm per live filter block over the output pixels.
// The gathered depth holds only the (tap, block) slices that some live filter
// block multiplies, so dead blocks are neither gathered nor multiplied. Rows
// are packed a chunk at a time into per-thread buffers sized for L2, never as
// a whole im2col matrix.

namespace masked_ops {
namespace {

// Units of parallel work to aim for: when a small image has fewer chunks
// than this, each chunk's output groups are split among several units (each
// gathering the chunk itself).
constexpr int64_t kMinUnits = 8;
// Rows per dfilter pass: a pass's rows of x (with the filter's reach) and of
// dy stay in L2 while every live block multiplies them.
constexpr int64_t kGradFilterPixels = 256;
// Units of dfilter work (ranges of rows): each but the first keeps partial
// sums of every live block, so more units cost memory and a longer final sum.
constexpr int64_t kGradFilterUnits = 8;

// A filter block row is one tap and one input-channel block: row index
// tap * in_blocks + input block. Block columns are output-channel blocks.
int64_t FilterBlockRows(const Conv2DGeometry& g) { return g.taps() * g.in_blocks(); }

// Offset of block (block_row, out_block)'s first value in the filters (and
// in an element mask, laid out alike).
int64_t FilterBlockOffset(const Conv2DGeometry& g, int64_t block_row, int64_t out_block) {
  const int64_t tap = block_row / g.in_blocks();
  const int64_t first_in = (block_row % g.in_blocks()) * g.in_block;
  return (tap * g.in_channels + first_in) * g.out_channels + out_block * g.out_block;
}

int64_t FilterBlockInChannels(const Conv2DGeometry& g, int64_t block_row) {
  const int64_t first_in = (block_row % g.in_blocks()) * g.in_block;
  return std::min(g.in_block, g.in_channels - first_in);
}

int64_t FilterBlockOutChannels(const Conv2DGeometry& g, int64_t out_block) {
  return std::min(g.out_block, g.out_channels - out_block * g.out_block);
}

template <typename T, typename TMask>
BlockSource<T, TMask> FilterBlock(const Conv2DGeometry& g, const T* filters,
                                  MaskView<TMask> mask, int64_t block_row, int64_t out_block) {
  const int64_t in_block = block_row % g.in_blocks();
  const int64_t offset = FilterBlockOffset(g, block_row, out_block);
  const bool block_level = mask.level == MaskLevel::kBlock;
  return BlockSource<T, TMask>{
      filters + offset,
      block_level ? nullptr : mask.data + offset,
      block_level ? MaskFactor<T>(mask.data[in_block * g.out_blocks() + out_block]) : T(0),
      g.out_channels,
      FilterBlockInChannels(g, block_row),
      FilterBlockOutChannels(g, out_block)};
}

// live[block_row * out_blocks + out_block] != 0 when the block holds a live
// mask entry at its tap.
template <typename TMask>
std::vector<uint8_t> FindLiveFilterBlocks(const Conv2DGeometry& g, MaskView<TMask> mask,
                                          const ParallelFor& parallel_for) {
  const int64_t block_rows = FilterBlockRows(g);
  const int64_t out_blocks = g.out_blocks();
  std::vector<uint8_t> live(static_cast<size_t>(block_rows * out_blocks), 0);
  if (mask.level == MaskLevel::kBlock) {
    for (int64_t b = 0; b < block_rows; ++b) {
      for (int64_t j = 0; j < out_blocks; ++j) {
        live[b * out_blocks + j] = IsLive(mask.data[(b % g.in_blocks()) * out_blocks + j]);
      }
    }
    return live;
  }
  parallel_for(block_rows, g.in_block * g.out_channels, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < out_blocks; ++j) {
        live[b * out_blocks + j] =
            AnyLive(mask.data + FilterBlockOffset(g, b, j), g.out_channels,
                    FilterBlockInChannels(g, b), FilterBlockOutChannels(g, j));
      }
    }
  });
  return live;
}

// The rows of a gathered product: pixels, all of them in order or a list.
struct PixelRows {
  bool all;
  int64_t count;
  std::vector<int64_t> pixels;
  int64_t at(int64_t row) const { return all ? row : pixels[row]; }
};

PixelRows AllPixels(int64_t count) { return PixelRows{true, count, {}}; }

// Calls visit(n, oy_begin, oy_end, ox_begin, ox_end, active) for every output
// tile; a tile is active when some factor in it is nonzero.
template <typename T, typename Visit>
void ForEachOutputTile(const Conv2DGeometry& g, const T* output_factors, const Visit& visit) {
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += g.tile_h) {
      const int64_t oy1 = std::min(g.out_h, oy0 + g.tile_h);
      for (int64_t ox0 = 0; ox0 < g.out_w; ox0 += g.tile_w) {
        const int64_t ox1 = std::min(g.out_w, ox0 + g.tile_w);
        bool active = false;
        for (int64_t oy = oy0; oy < oy1 && !active; ++oy) {
          const T* row = output_factors + (n * g.out_h + oy) * g.out_w;
          for (int64_t ox = ox0; ox < ox1; ++ox) active |= row[ox] != T(0);
        }
        visit(n, oy0, oy1, ox0, ox1, active);
      }
    }
  }
}

// Output pixels of active tiles, tile by tile (nearby pixels share input rows).
template <typename T>
PixelRows ActiveOutputPixels(const Conv2DGeometry& g, const T* output_factors) {
  if (output_factors == nullptr) return AllPixels(g.out_pixels());
  PixelRows rows{false, 0, {}};
  ForEachOutputTile(g, output_factors, [&](int64_t n, int64_t oy0, int64_t oy1, int64_t ox0,
                                           int64_t ox1, bool active) {
    if (!active) return;
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      for (int64_t ox = ox0; ox < ox1; ++ox) rows.pixels.push_back((n * g.out_h + oy) * g.out_w + ox);
    }
  });
  rows.count = static_cast<int64_t>(rows.pixels.size());
  return rows;
}

// Input pixels inside the receptive field of some active output tile, in
// raster order; the gradient of every other input pixel is zero.
template <typename T>
PixelRows ActiveInputPixels(const Conv2DGeometry& g, const T* output_factors) {
  if (output_factors == nullptr) return AllPixels(g.in_pixels());
  std::vector<uint8_t> reached(static_cast<size_t>(g.in_pixels()), 0);
  const int64_t reach_h = (g.filter_h - 1) * g.dilation_h;
  const int64_t reach_w = (g.filter_w - 1) * g.dilation_w;
  ForEachOutputTile(g, output_factors, [&](int64_t n, int64_t oy0, int64_t oy1, int64_t ox0,
                                           int64_t ox1, bool active) {
    if (!active) return;
    const int64_t iy0 = std::max<int64_t>(0, oy0 * g.stride_h - g.pad_top);
    const int64_t iy1 = std::min(g.in_h, (oy1 - 1) * g.stride_h - g.pad_top + reach_h + 1);
    const int64_t ix0 = std::max<int64_t>(0, ox0 * g.stride_w - g.pad_left);
    const int64_t ix1 = std::min(g.in_w, (ox1 - 1) * g.stride_w - g.pad_left + reach_w + 1);
    for (int64_t iy = iy0; iy < iy1; ++iy) {
      const auto row = reached.begin() + (n * g.in_h + iy) * g.in_w;
      if (ix1 > ix0) std::fill(row + ix0, row + ix1, 1);
    }
  });
  PixelRows rows{false, 0, {}};
  for (int64_t p = 0; p < g.in_pixels(); ++p) {
    if (reached[p]) rows.pixels.push_back(p);
  }
  rows.count = static_cast<int64_t>(rows.pixels.size());
  return rows;
}

// The gathered depth: every (tap, channel block) slice that a live filter
// block multiplies gets a slot, segment_len deep, in order of first use.
struct DepthSlots {
  std::vector<int64_t> slot_of;  // per slice: its slot, or -1
  std::vector<int64_t> slices;   // per slot: its slice
};

DepthSlots AssignDepthSlots(const LiveBlockList& list, int64_t slices) {
  DepthSlots depth{std::vector<int64_t>(static_cast<size_t>(slices), -1), {}};
  for (const int64_t slice : list.minor) {
    if (depth.slot_of[slice] >= 0) continue;
    depth.slot_of[slice] = static_cast<int64_t>(depth.slices.size());
    depth.slices.push_back(slice);
  }
  return depth;
}

// parallel_for for work that allocates its own scratch per shard: a failed
// allocation in a worker comes back as bad_alloc on the calling thread (which
// the glue reports as an error) instead of escaping the worker.
template <typename Work>
void ParallelForWithScratch(const ParallelFor& parallel_for, int64_t units, int64_t cost_per_unit,
                            const Work& work) {
  std::atomic<bool> out_of_memory{false};
  parallel_for(units, cost_per_unit, [&](int64_t begin, int64_t end) {
    try {
      work(begin, end);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  });
  if (out_of_memory) throw std::bad_alloc();
}

// A PanelGemm product whose `a` rows come a chunk at a time: gathered into
// packed tiles, or, when rows_in_place is set, read where they lie.
template <typename T>
struct GatheredProduct {
  int64_t rows;
  int64_t rows_per_image;  // chunks never straddle two images (= rows for one)
  int64_t depth;           // gathered depth: slots x segment_len; 0 in place
  int64_t segment_len;
  const LiveBlockList* list;
  const std::vector<int64_t>* segment_begin;  // per live block: into the depth, or the row
  const T* panels;
  GemmTiling tiling;
  int64_t padded_width;
  int64_t width;
  int64_t out_cols;
  // In place: row r of image i starts at rows_in_place + i * image_stride +
  // r * row_stride; rows_per_image is a multiple of the row tile.
  const T* rows_in_place;
  int64_t image_stride;
  int64_t row_stride;
};

// gather(tile, first_row, rows) packs rows [first_row, first_row + rows) of a,
// rows <= a_tile, as one PackedRows tile (zero rows past `rows`).
// When `direct` is non-null, the product of row r goes straight to
// direct + r * out_cols; otherwise store(out, first_row, rows, col_begin,
// col_end) receives each chunk's product, out_cols apart.
template <typename T, typename Gather, typename Store>
void RunGatheredProduct(const GemmBackend<T>& backend, const GatheredProduct<T>& product,
                        const Gather& gather, T* direct, const Store& store,
                        const ParallelFor& parallel_for) {
  const LiveBlockList& list = *product.list;
  const bool in_place = product.rows_in_place != nullptr;
  const int64_t tile_rows = product.tiling.a_tile;
  const int64_t tile_size = std::max<int64_t>(product.depth, 1) * tile_rows;
  const int64_t chunk_tiles = std::clamp<int64_t>(
      kChunkBytes / (tile_size * static_cast<int64_t>(sizeof(T))), 1, kMaxChunkTiles);
  const int64_t rows_per_chunk = chunk_tiles * tile_rows;
  const int64_t images = product.rows_per_image == 0 ? 0 : product.rows / product.rows_per_image;
  const int64_t chunks_per_image = CeilDiv(product.rows_per_image, rows_per_chunk);
  const int64_t chunks = images * chunks_per_image;
  const int64_t groups = static_cast<int64_t>(list.offsets.size()) - 1;
  const int64_t splits = std::clamp<int64_t>(CeilDiv(kMinUnits, std::max<int64_t>(chunks, 1)), 1, groups);
  const int64_t groups_per_split = CeilDiv(groups, splits);

  PanelGemmArgs<T> args;
  args.a = PackedRows<T>{nullptr, 0, tile_rows, product.depth};
  args.groups = groups;
  args.group_offsets = list.offsets.data();
  args.segment_begin = product.segment_begin->data();
  args.segment_len = product.segment_len;
  args.panels = product.panels;
  args.b_in_place = false;
  args.strip_width = product.tiling.strip_width;
  args.padded_width = product.padded_width;
  args.width = product.width;
  args.out_cols = product.out_cols;
  args.out = nullptr;
  args.a_rows = nullptr;
  args.a_rows_stride = product.row_stride;
  args.rows_per_chunk = rows_per_chunk;
  args.blocks_per_run = std::max<int64_t>(
      1, kRunStripBytes / (product.segment_len * product.tiling.strip_width *
                           static_cast<int64_t>(sizeof(T))));
  const int64_t mean_blocks = list.size() / std::max<int64_t>(groups, 1) + 1;
  ParallelForWithScratch(
      parallel_for, chunks * splits,
      rows_per_chunk * (product.depth + mean_blocks * product.segment_len * product.width * 2 *
                                            groups_per_split),
      [&](int64_t begin, int64_t end) {
        const ScratchBuffer packed(in_place ? 0 : BytesOf<T>(chunk_tiles * tile_size));
        const ScratchBuffer out(direct != nullptr ? 0 : BytesOf<T>(rows_per_chunk * product.out_cols));
        for (int64_t u = begin; u < end; ++u) {
          const int64_t image = (u / splits) / chunks_per_image;
          const int64_t image_row = ((u / splits) % chunks_per_image) * rows_per_chunk;
          const int64_t first_row = image * product.rows_per_image + image_row;
          const int64_t rows = std::min(rows_per_chunk, product.rows_per_image - image_row);
          const int64_t group_begin = (u % splits) * groups_per_split;
          const int64_t group_end = std::min(groups, group_begin + groups_per_split);
          if (group_begin >= group_end) continue;
          PanelGemmArgs<T> chunk_args = args;
          if (in_place) {
            chunk_args.a_rows = product.rows_in_place + image * product.image_stride +
                                image_row * product.row_stride;
          } else {
            for (int64_t t = 0; t * tile_rows < rows; ++t) {
              gather(packed.as<T>() + t * tile_size, first_row + t * tile_rows,
                     std::min(tile_rows, rows - t * tile_rows));
            }
            chunk_args.a.data = packed.as<T>();
          }
          chunk_args.a.rows = rows;
          chunk_args.out = direct != nullptr ? direct + first_row * product.out_cols : out.as<T>();
          for (int64_t group = group_begin; group < group_end; ++group) {
            backend.panel_gemm_unit(chunk_args, 0, group);
          }
          if (direct == nullptr) {
            store(out.as<T>(), first_row, rows, group_begin * product.width,
                  std::min(product.out_cols, group_end * product.width));
          }
        }
      });
}

// Copies count values of src, times factor (exact copy for 1), into dst with
// a stride, and zeros up to segment_len.
template <typename T>
void GatherSlice(const T* src, int64_t count, T factor, int64_t segment_len, T* dst,
                 int64_t stride) {
  if (src == nullptr || factor == T(0)) count = 0;
  if (factor == T(1)) {
    for (int64_t c = 0; c < count; ++c) dst[c * stride] = src[c];
  } else {
    for (int64_t c = 0; c < count; ++c) dst[c * stride] = src[c] * factor;
  }
  for (int64_t c = count; c < segment_len; ++c) dst[c * stride] = T(0);
}

// Writes y or dx rows of a chunk to their pixels, times the pixel's factor
// (zero where it is zero). Without factors, a plain copy.
template <typename T>
void StoreRows(const PixelRows& rows, const T* factors, int64_t channels, const T* out,
               int64_t first_row, int64_t count, int64_t col_begin, int64_t col_end, T* dst) {
  for (int64_t r = 0; r < count; ++r) {
    const int64_t pixel = rows.at(first_row + r);
    const T factor = factors == nullptr ? T(1) : factors[pixel];
    const T* src = out + r * channels;
    T* to = dst + pixel * channels;
    for (int64_t c = col_begin; c < col_end; ++c) to[c] = factor == T(0) ? T(0) : src[c] * factor;
  }
}

// Depth (or width) of a packed block: never more than the channels.
int64_t SegmentLen(int64_t block, int64_t channels) { return std::min(block, channels); }

template <typename T, typename TMask>
void PackFilterPanels(const Conv2DGeometry& g, const T* filters, MaskView<TMask> mask,
                      const LiveBlockList& list, bool transposed, int64_t segment_len,
                      const GemmTiling& tiling, int64_t padded_width, T* panels,
                      const ParallelFor& parallel_for) {
  const int64_t groups = static_cast<int64_t>(list.offsets.size()) - 1;
  const int64_t out_blocks = g.out_blocks();
  parallel_for(groups, (list.size() / std::max<int64_t>(groups, 1) + 1) * segment_len * padded_width,
               [&](int64_t begin, int64_t end) {
                 for (int64_t group = begin; group < end; ++group) {
                   const int64_t first = list.offsets[group];
                   const int64_t depth = (list.offsets[group + 1] - first) * segment_len;
                   for (int64_t p = first; p < list.offsets[group + 1]; ++p) {
                     // Forward: group = output block, minor = filter block row.
                     // dx: group = input block, minor = tap * out_blocks + output block.
                     const int64_t block_row =
                         transposed ? (list.minor[p] / out_blocks) * g.in_blocks() + group
                                    : list.minor[p];
                     const int64_t out_block = transposed ? list.minor[p] % out_blocks : group;
                     PackBlock(FilterBlock(g, filters, mask, block_row, out_block), transposed,
                               PanelSlot<T>{panels + first * segment_len * padded_width, depth,
                                            (p - first) * segment_len, segment_len,
                                            tiling.strip_width, padded_width});
                   }
                 }
               });
}

std::vector<int64_t> SegmentBegins(const LiveBlockList& list, const DepthSlots& depth,
                                   int64_t segment_len) {
  std::vector<int64_t> begins(list.minor.size());
  for (size_t p = 0; p < begins.size(); ++p) begins[p] = depth.slot_of[list.minor[p]] * segment_len;
  return begins;
}

// The live filter blocks of `list` packed as PanelGemm panels, and the
// gathered depth they read: what the forward and dx products share.
template <typename T>
struct FilterPanels {
  template <typename TMask>
  FilterPanels(const GemmBackend<T>& backend, const Conv2DGeometry& g, const T* filters,
               MaskView<TMask> mask, const LiveBlockList& list, bool transposed, int64_t width,
               int64_t segment_len, int64_t slices, const ParallelFor& parallel_for)
      : tiling(backend.tiling(width)),
        padded_width(RoundUp(width, tiling.strip_width)),
        panels(BytesOf<T>(list.size() * segment_len * padded_width)),
        depth(AssignDepthSlots(list, slices)),
        segment_begin(SegmentBegins(list, depth, segment_len)) {
    PackFilterPanels(g, filters, mask, list, transposed, segment_len, tiling, padded_width,
                     panels.as<T>(), parallel_for);
  }

  int64_t slots() const { return static_cast<int64_t>(depth.slices.size()); }
  const T* data() const { return panels.as<T>(); }

  GemmTiling tiling;
  int64_t padded_width;
  ScratchBuffer panels;
  DepthSlots depth;
  std::vector<int64_t> segment_begin;
};

// Rows [first, first + count) of x's im2col for one (tap, input block): the
// input pixel each listed output pixel sees at that tap, ld apart, zero
// outside the image and beyond `channels`.
template <typename T>
void GatherReceptiveSlice(const Conv2DGeometry& g, const T* x, const PixelRows& pixels,
                          int64_t first, int64_t count, int64_t tap, int64_t first_in,
                          int64_t channels, int64_t ld, T* slice) {
  for (int64_t r = 0; r < count; ++r) {
    const int64_t pixel = pixels.at(first + r);
    const int64_t n = pixel / (g.out_h * g.out_w);
    const int64_t iy = ((pixel / g.out_w) % g.out_h) * g.stride_h - g.pad_top +
                       (tap / g.filter_w) * g.dilation_h;
    const int64_t ix = (pixel % g.out_w) * g.stride_w - g.pad_left + (tap % g.filter_w) * g.dilation_w;
    const bool inside = iy >= 0 && iy < g.in_h && ix >= 0 && ix < g.in_w;
    GatherSlice(inside ? x + ((n * g.in_h + iy) * g.in_w + ix) * g.in_channels + first_in : nullptr,
                channels, T(1), ld, slice + r * ld, 1);
  }
}

// With stride 1, a tile of consecutive output pixels can read its receptive
// fields in place (no im2col): over images copied into a zero border of
// out_h + reach_h by out_w + reach_w pixels, output pixel (oy, ox) taken as
// row oy * padded_w + ox finds tap (ky, kx) at padded pixel row + ky * dh *
// padded_w + kx * dw, one fixed offset per tap for every row. The reach_w
// extra rows per image row are computed and dropped.
struct PaddedRows {
  int64_t padded_h;
  int64_t padded_w;
  int64_t rows_per_image;  // whole row tiles over out_h rows of padded_w
  int64_t out_h;
  int64_t out_w;
  int64_t slack_pixels;  // zero pixels after the last image for tiles that run past it

  // The output pixel of row `row`, or -1 for a dropped row.
  int64_t pixel(int64_t row) const {
    const int64_t image = row / rows_per_image;
    const int64_t oy = (row % rows_per_image) / padded_w;
    const int64_t ox = (row % rows_per_image) % padded_w;
    if (oy >= out_h || ox >= out_w) return -1;
    return (image * out_h + oy) * out_w + ox;
  }
  int64_t image_pixels() const { return padded_h * padded_w; }
};

PaddedRows PaddedRowsFor(int64_t out_h, int64_t out_w, int64_t reach_h, int64_t reach_w,
                         int64_t tile_rows) {
  const int64_t padded_w = out_w + reach_w;
  return PaddedRows{out_h + reach_h, padded_w, RoundUp(out_h * padded_w, tile_rows), out_h,
                    out_w, reach_w + tile_rows};
}

int64_t ReachH(const Conv2DGeometry& g) { return (g.filter_h - 1) * g.dilation_h; }
int64_t ReachW(const Conv2DGeometry& g) { return (g.filter_w - 1) * g.dilation_w; }

// Copies images [batch, src_h, src_w, channels] into `padded` (batch padded
// images and the slack after them): source pixel (sy, sx) lands on (sy + top,
// sx + left) when that is inside; everything else is zero. top and left may
// be negative (source rows that fall outside are left out).
template <typename T>
void PadImages(const T* src, int64_t batch, int64_t src_h, int64_t src_w, int64_t channels,
               int64_t top, int64_t left, const PaddedRows& layout, T* padded,
               const ParallelFor& parallel_for) {
  const int64_t row_values = layout.padded_w * channels;
  const int64_t x_begin = std::clamp<int64_t>(left, 0, layout.padded_w);
  const int64_t x_end = std::clamp<int64_t>(src_w + left, x_begin, layout.padded_w);
  parallel_for(batch * layout.padded_h, row_values, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t image = row / layout.padded_h;
      const int64_t sy = row % layout.padded_h - top;
      T* dst = padded + row * row_values;
      if (sy < 0 || sy >= src_h || x_begin == x_end) {
        std::fill_n(dst, row_values, T(0));
        continue;
      }
      std::fill_n(dst, x_begin * channels, T(0));
      std::copy_n(src + ((image * src_h + sy) * src_w + x_begin - left) * channels,
                  (x_end - x_begin) * channels, dst + x_begin * channels);
      std::fill(dst + x_end * channels, dst + row_values, T(0));
    }
  });
  std::fill_n(padded + batch * layout.image_pixels() * channels, layout.slack_pixels * channels,
              T(0));
}

// Whether a forward or dx product reads its rows in place from padded images
// rather than gathering them: stride 1 (one offset per tap); no output mask
// (the gather skips inactive tiles); no ragged channel block (its segment
// would read live values of the next pixel); full-width strips (the narrow
// kernel needs packed rows); and, as in the matmul, few uses per value.
bool ReadsRowsInPlace(const Conv2DGeometry& g, const void* output_factors,
                      const GemmTiling& tiling, int64_t channels, int64_t segment_len,
                      int64_t live_blocks) {
  return g.stride_h == 1 && g.stride_w == 1 && output_factors == nullptr &&
         channels % segment_len == 0 && tiling.strip_width >= tiling.vector_lanes &&
         live_blocks > 0 && live_blocks < kPackAtUses * (channels / segment_len);
}

// Writes the rows of a chunk of an in-place product to their pixels,
// dropping the rows that are no pixel.
template <typename T>
void StorePaddedRows(const PaddedRows& layout, int64_t channels, const T* out,
                     int64_t first_row, int64_t count, int64_t col_begin, int64_t col_end,
                     T* dst) {
  for (int64_t r = 0; r < count; ++r) {
    const int64_t pixel = layout.pixel(first_row + r);
    if (pixel < 0) continue;
    std::copy(out + r * channels + col_begin, out + r * channels + col_end,
              dst + pixel * channels + col_begin);
  }
}

// The product of an in-place row layout: `source` ([batch, source_h,
// source_w, channels]) copied into zero-bordered images of out_h x out_w
// rows plus the filter's reach, source pixel (0, 0) landing at (top, left);
// segment_offset(minor, padded_w) is the offset, in values, of a live block's
// depth segment from the row it multiplies. Rows are stored to `out` as
// [pixels, out_channels].
template <typename T, typename SegmentOffset>
void RunPaddedProduct(const GemmBackend<T>& backend, const Conv2DGeometry& g, const FilterPanels<T>& panels,
                      const LiveBlockList& list, const T* source, int64_t source_h, int64_t source_w,
                      int64_t channels, int64_t top, int64_t left, int64_t out_h, int64_t out_w,
                      int64_t out_channels, int64_t segment_len, int64_t width,
                      const SegmentOffset& segment_offset, T* out, const ParallelFor& parallel_for) {
  const GemmTiling& tiling = panels.tiling;
  const PaddedRows layout = PaddedRowsFor(out_h, out_w, ReachH(g), ReachW(g), tiling.a_tile);
  const ScratchBuffer padded(BytesOf<T>((g.batch * layout.image_pixels() + layout.slack_pixels) * channels));
  PadImages(source, g.batch, source_h, source_w, channels, top, left, layout, padded.as<T>(), parallel_for);
  std::vector<int64_t> segment_begin(list.minor.size());
  for (size_t p = 0; p < segment_begin.size(); ++p) {
    segment_begin[p] = segment_offset(list.minor[p], layout.padded_w);
  }
  const GatheredProduct<T> product{g.batch * layout.rows_per_image, layout.rows_per_image, 0, segment_len,
                                   &list, &segment_begin, panels.data(), tiling, panels.padded_width, width,
                                   out_channels, padded.as<T>(), layout.image_pixels() * channels, channels};
  RunGatheredProduct(
      backend, product, [](T*, int64_t, int64_t) {}, static_cast<T*>(nullptr),
      [&](const T* rows, int64_t first_row, int64_t count, int64_t col_begin, int64_t col_end) {
        StorePaddedRows(layout, out_channels, rows, first_row, count, col_begin, col_end, out);
      },
      parallel_for);
}

// A 1x1 convolution with stride 1, no padding and no output mask is the
// matrix product of the pixels [pixels, in_channels] with the filter
// [in_channels, out_channels], in the same memory layout (an element mask
// too): the matmul kernels read x in place, without an im2col gather.
bool IsPlainPointwise(const Conv2DGeometry& g, const void* output_factors) {
  return g.taps() == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_top == 0 &&
         g.pad_left == 0 && g.in_h == g.out_h && g.in_w == g.out_w && output_factors == nullptr;
}

MatmulShape PointwiseShape(const Conv2DGeometry& g) {
  return MatmulShape{g.out_pixels(), g.in_channels, g.out_channels, g.in_block, g.out_block};
}

}  // namespace

template <typename T, typename TMask>
void MaskedConv2D(const Conv2DGeometry& g, const T* x, const T* filters, MaskView<TMask> mask,
                  const T* output_factors, T* y, const ParallelFor& parallel_for) {
  if (g.out_pixels() == 0 || g.out_channels == 0) return;
  if (g.in_channels == 0) {
    // Nothing to sum over (and no channel blocks to index by).
    std::fill_n(y, g.out_pixels() * g.out_channels, T(0));
    return;
  }
  if (IsPlainPointwise(g, output_factors)) {
    MaskedMatmul(PointwiseShape(g), x, filters, mask, y, parallel_for);
    return;
  }
  const PixelRows rows = ActiveOutputPixels(g, output_factors);
  if (output_factors != nullptr) {
    ForEachOutputTile(g, output_factors, [&](int64_t n, int64_t oy0, int64_t oy1, int64_t ox0,
                                             int64_t ox1, bool active) {
      if (active) return;
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        std::fill_n(y + ((n * g.out_h + oy) * g.out_w + ox0) * g.out_channels,
                    (ox1 - ox0) * g.out_channels, T(0));
      }
    });
  }
  const BlockGrid grid{FilterBlockRows(g) * g.in_block, g.out_channels, g.in_block, g.out_block};
  const LiveBlockList list =
      GroupLiveBlocksByColumn(grid, FindLiveFilterBlocks(g, mask, parallel_for));
  const GemmBackend<T>& backend = SelectedGemmBackend<T>();
  const int64_t width = SegmentLen(g.out_block, g.out_channels);
  const int64_t segment_len = SegmentLen(g.in_block, g.in_channels);
  const FilterPanels<T> panels(backend, g, filters, mask, list, /*transposed=*/false, width,
                               segment_len, FilterBlockRows(g), parallel_for);
  const GemmTiling& tiling = panels.tiling;
  if (ReadsRowsInPlace(g, output_factors, tiling, g.in_channels, segment_len, list.size())) {
    RunPaddedProduct(
        backend, g, panels, list, x, g.in_h, g.in_w, g.in_channels, g.pad_top, g.pad_left, g.out_h, g.out_w,
        g.out_channels, segment_len, width,
        [&](int64_t minor, int64_t padded_w) {
          const int64_t tap = minor / g.in_blocks();
          return ((tap / g.filter_w) * g.dilation_h * padded_w + (tap % g.filter_w) * g.dilation_w) *
                     g.in_channels +
                 (minor % g.in_blocks()) * g.in_block;
        },
        y, parallel_for);
    return;
  }
  const DepthSlots& depth = panels.depth;
  const int64_t slots = panels.slots();

  // im2col of one tile of output pixels, only the slots' slices.
  auto gather = [&](T* tile, int64_t first_row, int64_t count) {
    const int64_t tile_rows = tiling.a_tile;
    for (int64_t r = 0; r < tile_rows; ++r) {
      const int64_t pixel = r < count ? rows.at(first_row + r) : -1;
      const int64_t n = pixel / (g.out_h * g.out_w);
      const int64_t oy = (pixel / g.out_w) % g.out_h;
      const int64_t ox = pixel % g.out_w;
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t tap = depth.slices[s] / g.in_blocks();
        const int64_t first_in = (depth.slices[s] % g.in_blocks()) * g.in_block;
        const int64_t iy = oy * g.stride_h - g.pad_top + (tap / g.filter_w) * g.dilation_h;
        const int64_t ix = ox * g.stride_w - g.pad_left + (tap % g.filter_w) * g.dilation_w;
        const bool inside = pixel >= 0 && iy >= 0 && iy < g.in_h && ix >= 0 && ix < g.in_w;
        const T* src = inside ? x + ((n * g.in_h + iy) * g.in_w + ix) * g.in_channels + first_in
                              : nullptr;
        GatherSlice(src, std::min(g.in_block, g.in_channels - first_in), T(1), segment_len,
                    tile + s * segment_len * tile_rows + r, tile_rows);
      }
    }
  };
  auto store = [&](const T* out, int64_t first_row, int64_t count, int64_t col_begin,
                   int64_t col_end) {
    StoreRows(rows, output_factors, g.out_channels, out, first_row, count, col_begin, col_end, y);
  };
  const GatheredProduct<T> product{rows.count, rows.count, slots * segment_len, segment_len,
                                   &list, &panels.segment_begin, panels.data(), tiling,
                                   panels.padded_width, width, g.out_channels, nullptr, 0, 0};
  RunGatheredProduct(backend, product, gather, rows.all && output_factors == nullptr ? y : nullptr,
                     store, parallel_for);
}

// The factor of filter entry (tap, ci, co) under the mask, 0 where it is dead.
template <typename T, typename TMask>
T FilterFactor(const Conv2DGeometry& g, MaskView<TMask> mask, int64_t tap, int64_t ci, int64_t co) {
  const TMask entry = mask.level == MaskLevel::kElement
                          ? mask.data[(tap * g.in_channels + ci) * g.out_channels + co]
                          : mask.data[(ci / g.in_block) * g.out_blocks() + co / g.out_block];
  return IsLive(entry) ? MaskFactor<T>(entry) : T(0);
}

// Whether a live filter entry is NaN or Inf. The GEMM paths of dx multiply
// every live filter entry by the zero border of dy, which is no term of the
// gradient but gives NaN for 0 * Inf; such filters take DirectGradInput.
template <typename T, typename TMask>
bool HasNonFiniteLiveFilter(const Conv2DGeometry& g, const T* filters, MaskView<TMask> mask) {
  for (int64_t tap = 0; tap < g.taps(); ++tap) {
    for (int64_t ci = 0; ci < g.in_channels; ++ci) {
      for (int64_t co = 0; co < g.out_channels; ++co) {
        const T value = filters[(tap * g.in_channels + ci) * g.out_channels + co];
        if (!std::isfinite(value) && FilterFactor<T>(g, mask, tap, ci, co) != T(0)) return true;
      }
    }
  }
  return false;
}

// dx summed over the terms that exist only, one image per unit: slow, and
// only for filters that HasNonFiniteLiveFilter (a diverged training step).
template <typename T, typename TMask>
void DirectGradInput(const Conv2DGeometry& g, const T* dy, const T* filters, MaskView<TMask> mask,
                     const T* output_factors, T* dx, const ParallelFor& parallel_for) {
  const int64_t image = g.in_h * g.in_w * g.in_channels;
  // A scheduling hint, computed in double: the product may exceed int64.
  const double cost = static_cast<double>(g.out_h) * g.out_w * g.taps() * g.in_channels * g.out_channels;
  parallel_for(g.batch, static_cast<int64_t>(std::min(cost, 1e15)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      std::fill_n(dx + n * image, image, T(0));
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        for (int64_t ox = 0; ox < g.out_w; ++ox) {
          const int64_t pixel = (n * g.out_h + oy) * g.out_w + ox;
          const T factor = output_factors == nullptr ? T(1) : output_factors[pixel];
          if (factor == T(0)) continue;
          for (int64_t tap = 0; tap < g.taps(); ++tap) {
            const int64_t iy = oy * g.stride_h - g.pad_top + (tap / g.filter_w) * g.dilation_h;
            const int64_t ix = ox * g.stride_w - g.pad_left + (tap % g.filter_w) * g.dilation_w;
            if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) continue;
            T* to = dx + ((n * g.in_h + iy) * g.in_w + ix) * g.in_channels;
            for (int64_t ci = 0; ci < g.in_channels; ++ci) {
              for (int64_t co = 0; co < g.out_channels; ++co) {
                const T scale = FilterFactor<T>(g, mask, tap, ci, co);
                if (scale == T(0)) continue;
                to[ci] += dy[pixel * g.out_channels + co] * factor *
                          (filters[(tap * g.in_channels + ci) * g.out_channels + co] * scale);
              }
            }
          }
        }
      }
    }
  });
}

template <typename T, typename TMask>
void MaskedConv2DGradInput(const Conv2DGeometry& g, const T* dy, const T* filters,
                           MaskView<TMask> mask, const T* output_factors, T* dx,
                           const ParallelFor& parallel_for) {
  if (g.in_pixels() == 0 || g.in_channels == 0) return;
  if (g.out_channels == 0) {
    std::fill_n(dx, g.in_pixels() * g.in_channels, T(0));
    return;
  }
  if (IsPlainPointwise(g, output_factors)) {
    MaskedMatmulGradInput(PointwiseShape(g), dy, filters, mask, dx, parallel_for);
    return;
  }
  if (HasNonFiniteLiveFilter(g, filters, mask)) {
    DirectGradInput(g, dy, filters, mask, output_factors, dx, parallel_for);
    return;
  }
  const PixelRows rows = ActiveInputPixels(g, output_factors);
  if (!rows.all) {
    // Unreached input pixels get zero; rows lists the reached ones in order.
    int64_t next = 0;
    for (int64_t p = 0; p < g.in_pixels(); ++p) {
      if (next < rows.count && rows.pixels[next] == p) {
        ++next;
        continue;
      }
      std::fill_n(dx + p * g.in_channels, g.in_channels, T(0));
    }
  }
  // Group = input block; its live blocks, tap by tap, are the (tap, output
  // block) slices of dy it multiplies.
  const std::vector<uint8_t> live = FindLiveFilterBlocks(g, mask, parallel_for);
  const int64_t in_blocks = g.in_blocks();
  const int64_t out_blocks = g.out_blocks();
  LiveBlockList list;
  list.offsets.push_back(0);
  for (int64_t i = 0; i < in_blocks; ++i) {
    for (int64_t tap = 0; tap < g.taps(); ++tap) {
      for (int64_t j = 0; j < out_blocks; ++j) {
        if (live[(tap * in_blocks + i) * out_blocks + j]) list.minor.push_back(tap * out_blocks + j);
      }
    }
    list.offsets.push_back(list.size());
  }
  const GemmBackend<T>& backend = SelectedGemmBackend<T>();
  const int64_t width = SegmentLen(g.in_block, g.in_channels);
  const int64_t segment_len = SegmentLen(g.out_block, g.out_channels);
  const FilterPanels<T> panels(backend, g, filters, mask, list, /*transposed=*/true, width,
                               segment_len, g.taps() * out_blocks, parallel_for);
  const GemmTiling& tiling = panels.tiling;
  if (ReadsRowsInPlace(g, output_factors, tiling, g.out_channels, segment_len, list.size())) {
    // dy padded so that input pixel (iy, ix) finds tap (ky, kx)'s output
    // pixel at padded pixel (iy + reach_h - ky * dh, ix + reach_w - kx * dw).
    const int64_t reach_h = ReachH(g);
    const int64_t reach_w = ReachW(g);
    RunPaddedProduct(
        backend, g, panels, list, dy, g.out_h, g.out_w, g.out_channels, reach_h - g.pad_top, reach_w - g.pad_left,
        g.in_h, g.in_w, g.in_channels, segment_len, width,
        [&](int64_t minor, int64_t padded_w) {
          const int64_t tap = minor / out_blocks;
          return ((reach_h - (tap / g.filter_w) * g.dilation_h) * padded_w + reach_w -
                  (tap % g.filter_w) * g.dilation_w) *
                     g.out_channels +
                 (minor % out_blocks) * g.out_block;
        },
        dx, parallel_for);
    return;
  }
  const DepthSlots& depth = panels.depth;
  const int64_t slots = panels.slots();

  // Input pixel (iy, ix) meets tap (ky, kx) at the output pixel whose window
  // puts that tap on it, if the strides land there exactly.
  auto output_pixel_at = [&](int64_t n, int64_t iy, int64_t ix, int64_t tap) -> int64_t {
    const int64_t sy = iy + g.pad_top - (tap / g.filter_w) * g.dilation_h;
    const int64_t sx = ix + g.pad_left - (tap % g.filter_w) * g.dilation_w;
    if (sy < 0 || sx < 0 || sy % g.stride_h != 0 || sx % g.stride_w != 0) return -1;
    const int64_t oy = sy / g.stride_h;
    const int64_t ox = sx / g.stride_w;
    if (oy >= g.out_h || ox >= g.out_w) return -1;
    return (n * g.out_h + oy) * g.out_w + ox;
  };
  auto gather = [&](T* tile, int64_t first_row, int64_t count) {
    const int64_t tile_rows = tiling.a_tile;
    for (int64_t r = 0; r < tile_rows; ++r) {
      const int64_t pixel = r < count ? rows.at(first_row + r) : -1;
      const int64_t n = pixel / (g.in_h * g.in_w);
      const int64_t iy = (pixel / g.in_w) % g.in_h;
      const int64_t ix = pixel % g.in_w;
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t tap = depth.slices[s] / out_blocks;
        const int64_t first_out = (depth.slices[s] % out_blocks) * g.out_block;
        const int64_t at = pixel >= 0 ? output_pixel_at(n, iy, ix, tap) : -1;
        const T factor = at < 0 ? T(0) : output_factors == nullptr ? T(1) : output_factors[at];
        GatherSlice(at < 0 ? nullptr : dy + at * g.out_channels + first_out,
                    std::min(g.out_block, g.out_channels - first_out), factor, segment_len,
                    tile + s * segment_len * tile_rows + r, tile_rows);
      }
    }
  };
  auto store = [&](const T* out, int64_t first_row, int64_t count, int64_t col_begin,
                   int64_t col_end) {
    StoreRows<T>(rows, nullptr, g.in_channels, out, first_row, count, col_begin, col_end, dx);
  };
  const GatheredProduct<T> product{rows.count, rows.count, slots * segment_len, segment_len,
                                   &list, &panels.segment_begin, panels.data(), tiling,
                                   panels.padded_width, width, g.in_channels, nullptr, 0, 0};
  RunGatheredProduct(backend, product, gather, rows.all ? dx : nullptr, store, parallel_for);
}

template <typename T, typename TMask>
void MaskedConv2DGradFilter(const Conv2DGeometry& g, const T* x, const T* dy,
                            MaskView<TMask> mask, const T* output_factors, T* dfilters,
                            const ParallelFor& parallel_for) {
  const int64_t block_rows = FilterBlockRows(g);
  const int64_t out_blocks = g.out_blocks();
  if (block_rows == 0 || g.out_channels == 0) return;
  if (g.out_pixels() == 0) {
    // Nothing to sum over: the gradient is zero everywhere.
    std::fill_n(dfilters, g.taps() * g.in_channels * g.out_channels, T(0));
    return;
  }
  if (IsPlainPointwise(g, output_factors)) {
    MaskedMatmulGradWeight(PointwiseShape(g), x, dy, mask, dfilters, parallel_for);
    return;
  }
  const std::vector<uint8_t> live = FindLiveFilterBlocks(g, mask, parallel_for);
  std::vector<int64_t> live_blocks;  // block_row * out_blocks + out_block
  for (int64_t b = 0; b < block_rows * out_blocks; ++b) {
    if (live[b]) live_blocks.push_back(b);
  }
  const GemmBackend<T>& backend = SelectedGemmBackend<T>();
  const int64_t in_width = SegmentLen(g.in_block, g.in_channels);
  const int64_t out_width = SegmentLen(g.out_block, g.out_channels);
  const GemmTiling tiling = backend.tiling(out_width);
  // OuterGemm reads whole tiles of rows and whole strips of columns.
  const int64_t x_ld = RoundUp(in_width, tiling.outer_tile);
  const int64_t dy_ld = (out_blocks - 1) * g.out_block + RoundUp(out_width, tiling.strip_width);

  // The sum runs over lines of output pixels. With stride 1 and no output
  // mask, a line is an output row of an image, whose receptive fields at a
  // tap are consecutive pixels of x padded (read in place, one offset per
  // tap, the rows of a pass as segments). Otherwise a line is one active
  // output pixel, its receptive field gathered a pass at a time.
  const bool in_place = g.stride_h == 1 && g.stride_w == 1 && output_factors == nullptr;
  // The slack covers OuterGemm reading a whole tile of channels at the last pixel.
  const PaddedRows layout =
      in_place ? PaddedRowsFor(g.out_h, g.out_w, ReachH(g), ReachW(g),
                               CeilDiv(tiling.outer_tile, g.in_channels))
               : PaddedRows{};
  const PixelRows pixels = in_place ? AllPixels(g.out_pixels()) : ActiveOutputPixels(g, output_factors);
  const int64_t line_pixels = in_place ? g.out_w : 1;
  const int64_t lines = pixels.count / line_pixels;
  const int64_t lines_per_image = in_place ? g.out_h : lines;
  const int64_t pass_lines = std::max<int64_t>(1, kGradFilterPixels / line_pixels);
  const ScratchBuffer padded(
      in_place ? BytesOf<T>((g.batch * layout.image_pixels() + layout.slack_pixels) * g.in_channels)
               : 0);
  if (in_place) {
    PadImages(x, g.batch, g.in_h, g.in_w, g.in_channels, g.pad_top, g.pad_left, layout,
              padded.as<T>(), parallel_for);
  }
  std::vector<int64_t> line_begin(static_cast<size_t>(pass_lines));
  for (int64_t l = 0; l < pass_lines; ++l) line_begin[l] = l * layout.padded_w;

  // dy at the listed pixels, times their factors, each row dy_ld wide (whole
  // strips are read): dy itself when that is what it already is.
  const bool dy_as_is = pixels.all && output_factors == nullptr && g.out_channels == dy_ld;
  const ScratchBuffer dy_copy(dy_as_is ? 0 : BytesOf<T>(pixels.count * dy_ld));
  if (!dy_as_is) {
    parallel_for(pixels.count, dy_ld, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t pixel = pixels.at(r);
        GatherSlice(dy + pixel * g.out_channels, g.out_channels,
                    output_factors == nullptr ? T(1) : output_factors[pixel], dy_ld,
                    dy_copy.as<T>() + r * dy_ld, 1);
      }
    });
  }
  const T* dy_rows = dy_as_is ? dy : dy_copy.as<T>();

  // Units are ranges of lines, so that one pass's rows of x and dy are read
  // once from memory for every live block. Unit 0 sums into dfilters, the
  // others into their own partial blocks, added in unit order afterwards:
  // the same sums whatever the thread count.
  const int64_t lines_per_unit = std::max<int64_t>(
      1, CeilDiv(lines, std::clamp<int64_t>(std::min(CeilDiv(pixels.count, kGradFilterPixels), lines),
                                            1, kGradFilterUnits)));
  // Every unit gets lines (its partials are all written).
  const int64_t units = std::max<int64_t>(1, CeilDiv(lines, lines_per_unit));
  const int64_t block_values = g.in_block * g.out_block;
  const int64_t live_count = static_cast<int64_t>(live_blocks.size());
  const ScratchBuffer partials(BytesOf<T>((units - 1) * live_count * block_values));
  auto block_out = [&](int64_t unit, int64_t index, int64_t* ldo) -> T* {
    if (unit == 0) {
      *ldo = g.out_channels;
      return dfilters + FilterBlockOffset(g, live_blocks[index] / out_blocks,
                                          live_blocks[index] % out_blocks);
    }
    *ldo = g.out_block;
    return partials.as<T>() + ((unit - 1) * live_count + index) * block_values;
  };
  ParallelForWithScratch(
      parallel_for, live_count == 0 ? 0 : units,
      lines_per_unit * line_pixels * live_count * block_values * 2, [&](int64_t begin, int64_t end) {
        const ScratchBuffer x_slice(in_place ? 0 : BytesOf<T>(pass_lines * x_ld));
        for (int64_t u = begin; u < end; ++u) {
          const int64_t unit_end = std::min(lines, (u + 1) * lines_per_unit);
          for (int64_t l0 = u * lines_per_unit; l0 < unit_end;) {
            const int64_t image = l0 / lines_per_image;
            const int64_t count =
                std::min({pass_lines, unit_end - l0, (image + 1) * lines_per_image - l0});
            const bool first_pass = l0 == u * lines_per_unit;
            int64_t gathered_row = -1;
            for (int64_t index = 0; index < live_count; ++index) {
              const int64_t b = live_blocks[index] / out_blocks;
              const int64_t j = live_blocks[index] % out_blocks;
              const int64_t tap = b / g.in_blocks();
              const int64_t first_in = (b % g.in_blocks()) * g.in_block;
              const int64_t channels = std::min(g.in_block, g.in_channels - first_in);
              OuterGemmArgs<T> args;
              if (in_place) {
                const int64_t oy = l0 - image * lines_per_image;
                const int64_t first = (oy + (tap / g.filter_w) * g.dilation_h) * layout.padded_w +
                                      (tap % g.filter_w) * g.dilation_w;
                args.a = padded.as<T>() + (image * layout.image_pixels() + first) * g.in_channels +
                         first_in;
                args.lda = g.in_channels;
                args.segment_begin = line_begin.data();
                args.segments = count;
                args.depth = g.out_w;
              } else {
                if (gathered_row != b) {
                  GatherReceptiveSlice(g, x, pixels, l0, count, tap, first_in, channels, x_ld,
                                       x_slice.as<T>());
                  gathered_row = b;
                }
                args.a = x_slice.as<T>();
                args.lda = x_ld;
                args.depth = count;
              }
              const int64_t first_out = j * g.out_block;
              const int64_t cols = std::min(g.out_block, g.out_channels - first_out);
              int64_t ldo;
              T* out = block_out(u, index, &ldo);
              const T* a = args.a;
              for (int64_t t = 0; t * tiling.outer_tile < channels; ++t) {
                for (int64_t s = 0; s * tiling.strip_width < cols; ++s) {
                  args.a = a + t * tiling.outer_tile;
                  args.b = dy_rows + l0 * line_pixels * dy_ld + first_out + s * tiling.strip_width;
                  args.ldb = dy_ld;
                  args.block_width = out_width;
                  args.out = out + t * tiling.outer_tile * ldo + s * tiling.strip_width;
                  args.ldo = ldo;
                  args.rows = std::min(tiling.outer_tile, channels - t * tiling.outer_tile);
                  args.cols = std::min(tiling.strip_width, cols - s * tiling.strip_width);
                  args.accumulate = !first_pass;
                  backend.outer_gemm(args);
                }
              }
            }
            l0 += count;
          }
        }
      });

  // Sum the partials into dfilters, then df = where(mask != 0, gradient *
  // mask, 0); dead blocks (and every block when there are no rows) are exact
  // zeros.
  parallel_for(block_rows, (units + 1) * g.in_block * g.out_channels, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < out_blocks; ++j) {
        const BlockSource<T, TMask> block = FilterBlock(g, dfilters, mask, b, j);
        T* out = dfilters + FilterBlockOffset(g, b, j);
        const bool block_live = live[b * out_blocks + j] && lines > 0;
        const int64_t index = block_live ? std::lower_bound(live_blocks.begin(), live_blocks.end(),
                                                            b * out_blocks + j) - live_blocks.begin()
                                         : -1;
        for (int64_t r = 0; r < block.rows; ++r) {
          T* row = out + r * block.ld;
          if (!block_live) {
            std::fill_n(row, block.cols, T(0));
            continue;
          }
          for (int64_t u = 1; u < units; ++u) {
            const T* partial = partials.as<T>() + ((u - 1) * live_count + index) * block_values +
                               r * g.out_block;
            for (int64_t c = 0; c < block.cols; ++c) row[c] += partial[c];
          }
          if (block.element_mask == nullptr) {
            for (int64_t c = 0; c < block.cols; ++c) row[c] *= block.factor;
          } else {
            const TMask* m = block.element_mask + r * block.ld;
            for (int64_t c = 0; c < block.cols; ++c) {
              row[c] = IsLive(m[c]) ? row[c] * MaskFactor<T>(m[c]) : T(0);
            }
          }
        }
      }
    }
  });
}

#define MASKED_OPS_INSTANTIATE(T, TMask)                                                      \
  template void MaskedConv2D<T, TMask>(const Conv2DGeometry&, const T*, const T*,            \
                                       MaskView<TMask>, const T*, T*, const ParallelFor&);   \
  template void MaskedConv2DGradInput<T, TMask>(const Conv2DGeometry&, const T*, const T*,   \
                                                MaskView<TMask>, const T*, T*,               \
                                                const ParallelFor&);                         \
  template void MaskedConv2DGradFilter<T, TMask>(const Conv2DGeometry&, const T*, const T*,  \
                                                 MaskView<TMask>, const T*, T*,              \
                                                 const ParallelFor&);

MASKED_OPS_FOR_EACH_TYPE_PAIR(MASKED_OPS_INSTANTIATE)

#undef MASKED_OPS_INSTANTIATE

}  // namespace masked_ops
