// Op registrations and shape functions for masked_conv2d and its gradients.
#include <cstdint>

#include "cc/tf/conv_validation.h"
#include "cc/tf/shape_support.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace masked_ops {
namespace {

constexpr char kOutputMaskTypes[] =
    "Toutput_mask: {bool, int8, uint8, int16, int32, int64, half, bfloat16, float, double}";

// The known dimensions of a rank-4 shape, or false when any is unknown.
bool KnownDims4(InferenceContext* c, ShapeHandle shape, int64_t dims[4]) {
  for (int d = 0; d < 4; ++d) {
    const DimensionHandle dim = c->Dim(shape, d);
    if (!c->ValueKnown(dim)) return false;
    dims[d] = c->Value(dim);
  }
  return true;
}

bool KnownDims(InferenceContext* c, ShapeHandle shape, int64_t* dims) {
  if (!c->RankKnown(shape)) return false;
  for (int d = 0; d < c->Rank(shape); ++d) {
    const DimensionHandle dim = c->Dim(shape, d);
    if (!c->ValueKnown(dim)) return false;
    dims[d] = c->Value(dim);
  }
  return true;
}

// Checks x, filters and both masks as far as the shapes are known, and sets
// *y to the forward output's shape (unknown dims where they cannot be
// computed). x is input 0, filters 1, mask 2, output_mask 3.
absl::Status CheckConvInputs(InferenceContext* c, ShapeHandle* y) {
  Conv2DOptions options;
  TF_RETURN_IF_ERROR(ReadConv2DOptions(c, &options));
  ShapeHandle x;
  ShapeHandle filters;
  TF_RETURN_IF_ERROR(RequireRank(c, 0, "x", "[batch, height, width, channels]", 4, false, &x));
  TF_RETURN_IF_ERROR(RequireRank(c, 1, "filters", "[height, width, in_channels, out_channels]", 4,
                                 false, &filters));
  int64_t x_dims[4];
  int64_t filter_dims[4];
  if (!KnownDims4(c, x, x_dims) || !KnownDims4(c, filters, filter_dims)) {
    *y = c->MakeShape({c->Dim(x, 0), c->UnknownDim(), c->UnknownDim(), c->Dim(filters, 3)});
    return absl::OkStatus();
  }
  Conv2DGeometry g;
  TF_RETURN_IF_ERROR(MakeConv2DGeometry(options, x_dims, filter_dims, c->DebugString(x),
                                        c->DebugString(filters), &g));
  int64_t mask_dims[4];
  const ShapeHandle mask = c->input(2);
  if (c->RankKnown(mask) && c->Rank(mask) != 2 && c->Rank(mask) != 4) {
    MaskLevel level;
    return ResolveConvMaskLevel(c->DebugString(mask), c->Rank(mask), mask_dims, g, &level);
  }
  if (KnownDims(c, mask, mask_dims)) {
    MaskLevel level;
    TF_RETURN_IF_ERROR(ResolveConvMaskLevel(c->DebugString(mask), c->Rank(mask), mask_dims, g, &level));
  }
  const ShapeHandle output_mask = c->input(3);
  int64_t output_mask_dims[4];
  if (c->RankKnown(output_mask) && c->Rank(output_mask) <= 4 &&
      KnownDims(c, output_mask, output_mask_dims)) {
    // Static dimensions need not describe a tensor that can exist: saturate.
    int64_t elements = 1;
    for (int d = 0; d < c->Rank(output_mask); ++d) {
      if (__builtin_mul_overflow(elements, output_mask_dims[d], &elements)) elements = INT64_MAX;
    }
    TF_RETURN_IF_ERROR(CheckOutputMaskShape(c->DebugString(output_mask), c->Rank(output_mask),
                                            output_mask_dims, elements, g,
                                            options.use_output_mask));
  }
  *y = c->MakeShape({g.batch, g.out_h, g.out_w, g.out_channels});
  return absl::OkStatus();
}

absl::Status MaskedConv2DShape(InferenceContext* c) {
  ShapeHandle y;
  TF_RETURN_IF_ERROR(CheckConvInputs(c, &y));
  c->set_output(0, y);
  return absl::OkStatus();
}

// dy (input 4) must have the forward output's shape; the output has the
// shape of input `like`.
absl::Status ConvGradShape(InferenceContext* c, int like) {
  ShapeHandle y;
  TF_RETURN_IF_ERROR(CheckConvInputs(c, &y));
  ShapeHandle dy;
  TF_RETURN_IF_ERROR(RequireRank(c, 4, "dy", "[batch, out_height, out_width, out_channels]", 4,
                                 false, &dy));
  if (!c->Merge(dy, y, &dy).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("dy must have the output's shape ",
                                                   c->DebugString(y), ", but has shape ",
                                                   c->DebugString(c->input(4))));
  }
  c->set_output(0, c->input(like));
  return absl::OkStatus();
}

}  // namespace

#define MASKED_OPS_CONV_ATTRS                                     \
  Attr("T: {float, double, half, bfloat16}")                                      \
      .Attr(kMaskTypes)                                           \
      .Attr(kOutputMaskTypes)                                     \
      .Attr("strides: list(int) = [1, 1]")                        \
      .Attr("dilations: list(int) = [1, 1]")                      \
      .Attr("padding: {'SAME', 'VALID', 'EXPLICIT'}")             \
      .Attr("explicit_paddings: list(int) = []")                  \
      .Attr("in_channel_block: int >= 1")                         \
      .Attr("out_channel_block: int >= 1")                        \
      .Attr("tile_height: int >= 1")                              \
      .Attr("tile_width: int >= 1")                               \
      .Attr("use_output_mask: bool")

REGISTER_OP("MaskedOps>MaskedConv2D")
    .Input("x: T")
    .Input("filters: T")
    .Input("mask: Tmask")
    .Input("output_mask: Toutput_mask")
    .Output("y: T")
    .MASKED_OPS_CONV_ATTRS
    .SetShapeFn(MaskedConv2DShape)
    .Doc(R"doc(
y = where(o != 0, conv2d(x, where(mask != 0, filters * mask, 0)) * o, 0), NHWC,
with o the output mask (when use_output_mask); filter blocks whose mask is
zero and output tiles whose mask is zero are skipped.

x: [batch, height, width, in_channels].
filters: [filter_height, filter_width, in_channels, out_channels].
mask: element-level (the filters' shape) or channel-block-level
  [ceil(in_channels/in_channel_block), ceil(out_channels/out_channel_block)].
output_mask: [batch, out_height, out_width] or with a trailing 1; empty when
  use_output_mask is false.
)doc");

REGISTER_OP("MaskedOps>MaskedConv2DGradInput")
    .Input("x: T")
    .Input("filters: T")
    .Input("mask: Tmask")
    .Input("output_mask: Toutput_mask")
    .Input("dy: T")
    .Output("dx: T")
    .MASKED_OPS_CONV_ATTRS
    .SetShapeFn([](InferenceContext* c) { return ConvGradShape(c, 0); })
    .Doc(R"doc(
The gradient of MaskedConv2D's y with respect to x, given dy; only x's shape
is read.
)doc");

REGISTER_OP("MaskedOps>MaskedConv2DGradFilter")
    .Input("x: T")
    .Input("filters: T")
    .Input("mask: Tmask")
    .Input("output_mask: Toutput_mask")
    .Input("dy: T")
    .Output("dfilters: T")
    .MASKED_OPS_CONV_ATTRS
    .SetShapeFn([](InferenceContext* c) { return ConvGradShape(c, 1); })
    .Doc(R"doc(
The gradient of MaskedConv2D's y with respect to the masked filters, times
the mask: exact zeros where the mask is zero; only filters' shape is read.
)doc");

#undef MASKED_OPS_CONV_ATTRS

}  // namespace masked_ops
