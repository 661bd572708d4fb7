#include "cc/kernels/block_mask.h"

namespace masked_ops {
namespace {

LiveBlockList GroupLiveBlocks(int64_t majors, int64_t minors, const std::vector<uint8_t>& live,
                              bool major_is_row) {
  LiveBlockList list;
  list.offsets.reserve(static_cast<size_t>(majors + 1));
  list.offsets.push_back(0);
  for (int64_t g = 0; g < majors; ++g) {
    for (int64_t h = 0; h < minors; ++h) {
      const int64_t block = major_is_row ? g * minors + h : h * majors + g;
      if (live[block]) list.minor.push_back(h);
    }
    list.offsets.push_back(list.size());
  }
  return list;
}

}  // namespace

LiveBlockList GroupLiveBlocksByColumn(const BlockGrid& grid, const std::vector<uint8_t>& live) {
  return GroupLiveBlocks(grid.grid_cols(), grid.grid_rows(), live, /*major_is_row=*/false);
}

LiveBlockList GroupLiveBlocksByRow(const BlockGrid& grid, const std::vector<uint8_t>& live) {
  return GroupLiveBlocks(grid.grid_rows(), grid.grid_cols(), live, /*major_is_row=*/true);
}

}  // namespace masked_ops
