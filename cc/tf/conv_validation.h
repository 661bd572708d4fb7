// masked_conv2d's attributes and shape checks, shared by the shape functions
// and the kernels so that both reject the same inputs with the same message.
#ifndef MASKED_OPS_CC_TF_CONV_VALIDATION_H_
#define MASKED_OPS_CC_TF_CONV_VALIDATION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "cc/kernels/masked_conv2d.h"
#include "tensorflow/core/platform/errors.h"

namespace masked_ops {

// Attributes of the three conv ops, read from an OpKernelConstruction or an
// InferenceContext (both have GetAttr).
struct Conv2DOptions {
  std::vector<int64_t> strides;            // [h, w]
  std::vector<int64_t> dilations;          // [h, w]
  std::string padding;                     // SAME, VALID or EXPLICIT
  std::vector<int64_t> explicit_paddings;  // [top, bottom, left, right] for EXPLICIT
  int64_t in_channel_block = 0;
  int64_t out_channel_block = 0;
  int64_t tile_height = 0;
  int64_t tile_width = 0;
  bool use_output_mask = false;
};

template <typename AttrSource>
absl::Status ReadConv2DOptions(AttrSource* source, Conv2DOptions* options) {
  TF_RETURN_IF_ERROR(source->GetAttr("strides", &options->strides));
  TF_RETURN_IF_ERROR(source->GetAttr("dilations", &options->dilations));
  TF_RETURN_IF_ERROR(source->GetAttr("padding", &options->padding));
  TF_RETURN_IF_ERROR(source->GetAttr("explicit_paddings", &options->explicit_paddings));
  TF_RETURN_IF_ERROR(source->GetAttr("in_channel_block", &options->in_channel_block));
  TF_RETURN_IF_ERROR(source->GetAttr("out_channel_block", &options->out_channel_block));
  TF_RETURN_IF_ERROR(source->GetAttr("tile_height", &options->tile_height));
  TF_RETURN_IF_ERROR(source->GetAttr("tile_width", &options->tile_width));
  TF_RETURN_IF_ERROR(source->GetAttr("use_output_mask", &options->use_output_mask));
  auto positive_pair = [](absl::string_view name, const std::vector<int64_t>& values) {
    if (values.size() == 2 && values[0] >= 1 && values[1] >= 1) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        name, " must be two positive integers [height, width], got [", absl::StrJoin(values, ", "), "]"));
  };
  TF_RETURN_IF_ERROR(positive_pair("strides", options->strides));
  TF_RETURN_IF_ERROR(positive_pair("dilations", options->dilations));
  const std::vector<int64_t>& pads = options->explicit_paddings;
  if (options->padding == "EXPLICIT") {
    bool valid = pads.size() == 4;
    for (const int64_t pad : pads) valid = valid && pad >= 0;
    if (!valid) {
      return absl::InvalidArgumentError(absl::StrCat(
          "explicit_paddings must be four non-negative integers [top, bottom, left, right] "
          "with padding EXPLICIT, got [", absl::StrJoin(pads, ", "), "]"));
    }
  } else if (!pads.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "explicit_paddings must be empty unless padding is EXPLICIT, got [",
        absl::StrJoin(pads, ", "), "] with padding ", options->padding));
  }
  return absl::OkStatus();
}

// Bound on a dilated filter's or padded input's extent, so that the window
// arithmetic (products of an extent with a stride or an index) stays in range.
inline constexpr int64_t kMaxExtent = int64_t{1} << 40;

// One spatial dimension: the output size and the padding before the first
// input value, as tf.nn.conv2d computes them.
inline absl::Status ConvOutputSize(absl::string_view dimension, int64_t input, int64_t filter,
                                   int64_t stride, int64_t dilation, const Conv2DOptions& options,
                                   int64_t pad_before, int64_t pad_after, int64_t* output,
                                   int64_t* padding) {
  int64_t reach = 0;
  int64_t padded = 0;
  if (filter < 1 || __builtin_mul_overflow(filter - 1, dilation, &reach) ||
      __builtin_add_overflow(input, pad_before, &padded) ||
      __builtin_add_overflow(padded, pad_after, &padded) || reach > kMaxExtent ||
      padded > kMaxExtent) {
    return absl::InvalidArgumentError(absl::StrCat(
        "filters' ", dimension, " must be at least 1 and the dilated filter and padded input ",
        "must each span at most 2^40, got input ", dimension, " ", input, ", filter ", dimension, " ",
        filter, ", dilation ", dilation));
  }
  if (options.padding == "SAME") {
    *output = CeilDiv(input, stride);
    const int64_t needed = (*output - 1) * stride + reach + 1 - input;
    *padding = needed > 0 ? needed / 2 : 0;
    return absl::OkStatus();
  }
  const int64_t before = options.padding == "EXPLICIT" ? pad_before : 0;
  const int64_t span = options.padding == "EXPLICIT" ? padded : input;
  if (span < reach + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the ", dimension, " of the ", options.padding == "EXPLICIT" ? "padded " : "", "input (",
        span, ") is smaller than the dilated filter (", reach + 1, ") with padding ",
        options.padding, ": the output would be empty"));
  }
  *output = (span - reach - 1) / stride + 1;
  *padding = before;
  return absl::OkStatus();
}

// The geometry of x [batch, height, width, channels] convolved with filters
// [filter_h, filter_w, in_channels, out_channels].
inline absl::Status MakeConv2DGeometry(const Conv2DOptions& options, const int64_t x_dims[4],
                                       const int64_t filter_dims[4], absl::string_view x_text,
                                       absl::string_view filters_text, Conv2DGeometry* g) {
  if (x_dims[3] != filter_dims[2]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "x's channels must equal filters' input channels (", x_dims[3], " vs ", filter_dims[2],
        "): shapes ", x_text, " and ", filters_text));
  }
  const bool explicit_pads = options.padding == "EXPLICIT";
  const std::vector<int64_t>& pads = options.explicit_paddings;
  *g = Conv2DGeometry{};
  g->batch = x_dims[0];
  g->in_h = x_dims[1];
  g->in_w = x_dims[2];
  g->in_channels = x_dims[3];
  g->filter_h = filter_dims[0];
  g->filter_w = filter_dims[1];
  g->out_channels = filter_dims[3];
  g->stride_h = options.strides[0];
  g->stride_w = options.strides[1];
  g->dilation_h = options.dilations[0];
  g->dilation_w = options.dilations[1];
  g->in_block = options.in_channel_block;
  g->out_block = options.out_channel_block;
  g->tile_h = options.tile_height;
  g->tile_w = options.tile_width;
  TF_RETURN_IF_ERROR(ConvOutputSize("height", g->in_h, g->filter_h, g->stride_h, g->dilation_h,
                                    options, explicit_pads ? pads[0] : 0,
                                    explicit_pads ? pads[1] : 0, &g->out_h, &g->pad_top));
  TF_RETURN_IF_ERROR(ConvOutputSize("width", g->in_w, g->filter_w, g->stride_w, g->dilation_w,
                                    options, explicit_pads ? pads[2] : 0,
                                    explicit_pads ? pads[3] : 0, &g->out_w, &g->pad_left));
  return absl::OkStatus();
}

// The filter mask is element-level [filter_h, filter_w, in_channels,
// out_channels] or channel-block-level [in_blocks, out_blocks].
inline absl::Status ResolveConvMaskLevel(absl::string_view mask_text, int rank,
                                         const int64_t* dims, const Conv2DGeometry& g,
                                         MaskLevel* level) {
  if (rank == 4 && dims[0] == g.filter_h && dims[1] == g.filter_w && dims[2] == g.in_channels &&
      dims[3] == g.out_channels) {
    *level = MaskLevel::kElement;
    return absl::OkStatus();
  }
  if (rank == 2 && dims[0] == g.in_blocks() && dims[1] == g.out_blocks()) {
    *level = MaskLevel::kBlock;
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "mask must be element-level [", g.filter_h, ", ", g.filter_w, ", ", g.in_channels, ", ",
      g.out_channels, "] (the filters' shape) or channel-block-level [ceil(", g.in_channels, "/",
      g.in_block, "), ceil(", g.out_channels, "/", g.out_block, ")] = [", g.in_blocks(), ", ",
      g.out_blocks(), "], but mask has shape ", mask_text));
}

// The output mask is [batch, out_h, out_w] or [batch, out_h, out_w, 1]; with
// use_output_mask false, it must be empty (nothing to apply).
inline absl::Status CheckOutputMaskShape(absl::string_view text, int rank, const int64_t* dims,
                                         int64_t elements, const Conv2DGeometry& g,
                                         bool use_output_mask) {
  if (!use_output_mask) {
    if (elements == 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "output_mask must be empty when use_output_mask is false, but has shape ", text));
  }
  const bool leading_match =
      rank >= 3 && dims[0] == g.batch && dims[1] == g.out_h && dims[2] == g.out_w;
  if (leading_match && (rank == 3 || (rank == 4 && dims[3] == 1))) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "output_mask must have shape [batch, out_height, out_width] = [", g.batch, ", ", g.out_h,
      ", ", g.out_w, "] (or that with a trailing 1), but has shape ", text));
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_CONV_VALIDATION_H_
