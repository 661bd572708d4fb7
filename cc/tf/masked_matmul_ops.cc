// Op registrations and shape functions for masked_matmul and its gradients.
#include <cstdint>

#include "cc/kernels/block_mask.h"
#include "cc/tf/shape_support.h"
#include "cc/tf/validation.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace masked_ops {
namespace {

// Checks the mask against the weight's [k, n] when everything is known
// statically; the kernel checks again at run time.
absl::Status CheckMaskShape(InferenceContext* c, int mask_input, DimensionHandle k,
                            DimensionHandle n) {
  const ShapeHandle mask = c->input(mask_input);
  int64_t block_rows = 0;
  int64_t block_cols = 0;
  TF_RETURN_IF_ERROR(c->GetAttr("block_rows", &block_rows));
  TF_RETURN_IF_ERROR(c->GetAttr("block_cols", &block_cols));
  if (!c->RankKnown(mask) || !c->ValueKnown(k) || !c->ValueKnown(n)) return absl::OkStatus();
  const BlockGrid grid{c->Value(k), c->Value(n), block_rows, block_cols};
  MaskLevel level;
  if (c->Rank(mask) != 2) {
    return ResolveMaskLevel("mask", c->DebugString(mask), c->Rank(mask), 0, 0, grid, &level);
  }
  const DimensionHandle mask_rows = c->Dim(mask, 0);
  const DimensionHandle mask_cols = c->Dim(mask, 1);
  if (!c->ValueKnown(mask_rows) || !c->ValueKnown(mask_cols)) return absl::OkStatus();
  return ResolveMaskLevel("mask", c->DebugString(mask), 2, c->Value(mask_rows),
                          c->Value(mask_cols), grid, &level);
}

// x: [..., k], w: [k, n] -> [..., n].
absl::Status MaskedMatmulShape(InferenceContext* c) {
  ShapeHandle x;
  ShapeHandle w;
  TF_RETURN_IF_ERROR(RequireRank(c, 0, "x", "[..., k]", 1, true, &x));
  TF_RETURN_IF_ERROR(RequireRank(c, 1, "w", "[k, n]", 2, false, &w));
  DimensionHandle k;
  TF_RETURN_IF_ERROR(
      MergeDims(c, c->Dim(x, -1), c->Dim(w, 0), "x's last dimension must equal w's first", x, w, &k));
  TF_RETURN_IF_ERROR(CheckMaskShape(c, 2, k, c->Dim(w, 1)));
  ShapeHandle batch;
  TF_RETURN_IF_ERROR(c->Subshape(x, 0, -1, &batch));
  ShapeHandle y;
  TF_RETURN_IF_ERROR(c->Concatenate(batch, c->Vector(c->Dim(w, 1)), &y));
  c->set_output(0, y);
  return absl::OkStatus();
}

// dy: [..., n], w: [k, n] -> dx: [..., k].
absl::Status MaskedMatmulGradInputShape(InferenceContext* c) {
  ShapeHandle dy;
  ShapeHandle w;
  TF_RETURN_IF_ERROR(RequireRank(c, 0, "dy", "[..., n]", 1, true, &dy));
  TF_RETURN_IF_ERROR(RequireRank(c, 1, "w", "[k, n]", 2, false, &w));
  DimensionHandle n;
  TF_RETURN_IF_ERROR(MergeDims(c, c->Dim(dy, -1), c->Dim(w, 1),
                               "dy's last dimension must equal w's second", dy, w, &n));
  TF_RETURN_IF_ERROR(CheckMaskShape(c, 2, c->Dim(w, 0), n));
  ShapeHandle batch;
  TF_RETURN_IF_ERROR(c->Subshape(dy, 0, -1, &batch));
  ShapeHandle dx;
  TF_RETURN_IF_ERROR(c->Concatenate(batch, c->Vector(c->Dim(w, 0)), &dx));
  c->set_output(0, dx);
  return absl::OkStatus();
}

// x: [..., k], dy: [..., n] with the same leading dims -> dw: [k, n].
absl::Status MaskedMatmulGradWeightShape(InferenceContext* c) {
  ShapeHandle x;
  ShapeHandle dy;
  TF_RETURN_IF_ERROR(RequireRank(c, 0, "x", "[..., k]", 1, true, &x));
  TF_RETURN_IF_ERROR(RequireRank(c, 1, "dy", "[..., n]", 1, true, &dy));
  ShapeHandle x_batch;
  ShapeHandle dy_batch;
  ShapeHandle batch;
  TF_RETURN_IF_ERROR(c->Subshape(x, 0, -1, &x_batch));
  TF_RETURN_IF_ERROR(c->Subshape(dy, 0, -1, &dy_batch));
  if (!c->Merge(x_batch, dy_batch, &batch).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("x and dy must have the same leading dimensions, got shapes ",
                                                   c->DebugString(x), " and ", c->DebugString(dy)));
  }
  TF_RETURN_IF_ERROR(CheckMaskShape(c, 2, c->Dim(x, -1), c->Dim(dy, -1)));
  c->set_output(0, c->Matrix(c->Dim(x, -1), c->Dim(dy, -1)));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("MaskedOps>MaskedMatmul")
    .Input("x: T")
    .Input("w: T")
    .Input("mask: Tmask")
    .Output("y: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .SetShapeFn(MaskedMatmulShape)
    .Doc(R"doc(
y = x @ where(mask != 0, w * mask, 0), skipping all-zero mask blocks.

x: [..., k].
w: [k, n].
mask: element-level [k, n] or block-level [ceil(k/block_rows), ceil(n/block_cols)].
y: [..., n].
)doc");

REGISTER_OP("MaskedOps>MaskedMatmulGradInput")
    .Input("dy: T")
    .Input("w: T")
    .Input("mask: Tmask")
    .Output("dx: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .SetShapeFn(MaskedMatmulGradInputShape)
    .Doc(R"doc(
dx = dy @ where(mask != 0, w * mask, 0)^T, skipping all-zero mask blocks.
)doc");

REGISTER_OP("MaskedOps>MaskedMatmulGradWeight")
    .Input("x: T")
    .Input("dy: T")
    .Input("mask: Tmask")
    .Output("dw: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .SetShapeFn(MaskedMatmulGradWeightShape)
    .Doc(R"doc(
dw = where(mask != 0, (x^T @ dy) * mask, 0), formed only for live mask blocks.
)doc");

}  // namespace masked_ops
