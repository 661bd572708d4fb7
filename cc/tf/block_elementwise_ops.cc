// Op registrations for the block-masked elementwise ops: mask_gradients'
// fused masking and the optimizer wrapper's masked variable update.
#include "cc/tf/shape_support.h"
#include "tensorflow/core/framework/common_shape_fns.h"
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
    .Attr("T: {float, double, half, bfloat16}")
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

REGISTER_OP("MaskedOps>MaskedUpdateVariable")
    .Input("resource: resource")
    .Input("value: T")
    .Input("mask: Tmask")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .Attr("mode: {'assign', 'add', 'sub'}")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Where mask != 0, the variable becomes value, or gets value added or subtracted;
elsewhere it is left untouched, and blocks whose mask is zero throughout are
neither read nor written. value has the variable's shape; mask is element- or
block-level as for MaskGradient.
)doc");

REGISTER_OP("MaskedOps>MaskedAdamStep")
    .Input("variable: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("v_hat: resource")
    .Input("grad: T")
    .Input("mask: Tmask")
    .Input("alpha: T")
    .Input("one_minus_beta_1: T")
    .Input("one_minus_beta_2: T")
    .Input("epsilon: T")
    .Input("learning_rate: T")
    .Input("weight_decay: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .Attr("amsgrad: bool")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Keras 3's Adam / AdamW step on the entries where mask != 0, in place, in one
pass; frozen entries of the variable and of m, v, v_hat are left untouched and
frozen blocks are never read. v_hat is read only with amsgrad.
)doc");

REGISTER_OP("MaskedOps>MaskedSgdStep")
    .Input("variable: resource")
    .Input("momentum: resource")
    .Input("grad: T")
    .Input("mask: Tmask")
    .Input("learning_rate: T")
    .Input("momentum_factor: T")
    .Input("weight_decay: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .Attr("use_momentum: bool")
    .Attr("nesterov: bool")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Keras 3's SGD step (momentum, Nesterov) on the entries where mask != 0, in
place, in one pass; frozen entries are left untouched and frozen blocks are
never read. The momentum variable is read only with use_momentum.
)doc");

REGISTER_OP("MaskedOps>MaskedRmspropStep")
    .Input("variable: resource")
    .Input("velocity: resource")
    .Input("momentum: resource")
    .Input("average_grad: resource")
    .Input("grad: T")
    .Input("mask: Tmask")
    .Input("learning_rate: T")
    .Input("rho: T")
    .Input("one_minus_rho: T")
    .Input("momentum_factor: T")
    .Input("epsilon: T")
    .Input("weight_decay: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr(kMaskTypes)
    .Attr("block_rows: int >= 1")
    .Attr("block_cols: int >= 1")
    .Attr("use_momentum: bool")
    .Attr("centered: bool")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Keras 3's RMSprop step (momentum, centred) on the entries where mask != 0, in
place, in one pass; frozen entries are left untouched and frozen blocks are
never read. momentum and average_grad are read only when used.
)doc");

}  // namespace masked_ops
