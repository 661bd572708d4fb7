// Op registration and shape function for mask_gradients' fused masking op.
#include "cc/tf/shape_support.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace masked_ops {
namespace {

// The output has grad's shape; the kernel checks the mask against it.
absl::Status MaskGradientShape(InferenceContext* c) {
  ShapeHandle grad;
  TF_RETURN_IF_ERROR(RequireRank(c, 0, "grad", "[..., k, n] or [n]", 1, true, &grad));
  c->set_output(0, grad);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("MaskedOps>MaskGradient")
    .Input("grad: T")
    .Input("mask: Tmask")
    .Output("masked: T")
    .Attr("T: {float, double}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .SetShapeFn(MaskGradientShape)
    .Doc(R"doc(
masked = where(mask != 0, grad * mask, 0), writing zero blocks without reading grad.

grad is viewed as stacked [k, n] matrices (its last two dimensions; [1, n]
for rank 1). mask is element-level (grad's shape) or block-level
[ceil(k / block_rows), ceil(n / block_cols)], the same for every matrix.
)doc");

}  // namespace masked_ops
