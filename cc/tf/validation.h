// Input checks shared by shape functions and kernels, so that graph
// construction and execution reject the same inputs with the same message.
// Each takes shapes as the framework prints them, for the message.
#ifndef MASKED_OPS_CC_TF_VALIDATION_H_
#define MASKED_OPS_CC_TF_VALIDATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "cc/kernels/block_mask.h"

namespace masked_ops {

// rank == required, or rank >= required when at_least.
inline absl::Status CheckRank(absl::string_view name, absl::string_view expected,
                              absl::string_view shape_text, int64_t rank, int64_t required,
                              bool at_least) {
  if (at_least ? rank >= required : rank == required) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(name, " must have shape ", expected, ", but has shape ", shape_text));
}

inline absl::Status CheckDimsEqual(absl::string_view what, int64_t a, int64_t b,
                                   absl::string_view a_shape_text,
                                   absl::string_view b_shape_text) {
  if (a == b) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, " (", a, " vs ", b, "): shapes ",
                                                 a_shape_text, " and ", b_shape_text));
}

// Resolves whether a [mask_rows, mask_cols] mask of the weight grid is
// element-level or block-level. When both readings fit (every block dimension
// is 1 or covers a single row/column) they mean the same thing, and the
// element reading is taken.
// mask_shape_text is the mask's shape as the framework prints it, for the
// message; rows and cols are its two dimensions when mask_rank is 2.
inline absl::Status ResolveMaskLevel(absl::string_view mask_name, absl::string_view mask_shape_text,
                                     int64_t mask_rank, int64_t mask_rows, int64_t mask_cols,
                                     const BlockGrid& grid, MaskLevel* level) {
  if (mask_rank == 2 && mask_rows == grid.rows && mask_cols == grid.cols) {
    *level = MaskLevel::kElement;
    return absl::OkStatus();
  }
  if (mask_rank == 2 && mask_rows == grid.grid_rows() && mask_cols == grid.grid_cols()) {
    *level = MaskLevel::kBlock;
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      mask_name, " must be element-level [", grid.rows, ", ", grid.cols,
      "] or block-level [ceil(", grid.rows, "/", grid.block_rows, "), ceil(", grid.cols, "/",
      grid.block_cols, ")] = [", grid.grid_rows(), ", ", grid.grid_cols(),
      "] for a weight of shape [", grid.rows, ", ", grid.cols, "] with block size ",
      grid.block_rows, "x", grid.block_cols, ", but ", mask_name, " has shape ",
      mask_shape_text));
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_VALIDATION_H_
