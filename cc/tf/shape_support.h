// Shape-function helpers shared by the op registrations.
#ifndef MASKED_OPS_CC_TF_SHAPE_SUPPORT_H_
#define MASKED_OPS_CC_TF_SHAPE_SUPPORT_H_

#include <cstdint>

#include "cc/tf/validation.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace masked_ops {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

inline constexpr char kMaskTypes[] =
    "Tmask: {bool, int8, uint8, int16, int32, int64, half, bfloat16, float, double}";

// WithRank / WithRankAtLeast with a message that names the argument.
inline absl::Status RequireRank(InferenceContext* c, int input, absl::string_view name,
                         absl::string_view expected, int64_t rank, bool at_least,
                         ShapeHandle* out) {
  const ShapeHandle shape = c->input(input);
  if (c->RankKnown(shape)) {
    TF_RETURN_IF_ERROR(
        CheckRank(name, expected, c->DebugString(shape), c->Rank(shape), rank, at_least));
  }
  return at_least ? c->WithRankAtLeast(shape, rank, out) : c->WithRank(shape, rank, out);
}

// Merges two dimensions that must agree, naming both sides when they do not.
inline absl::Status MergeDims(InferenceContext* c, DimensionHandle a, DimensionHandle b,
                       absl::string_view what, ShapeHandle a_shape, ShapeHandle b_shape,
                       DimensionHandle* out) {
  if (c->ValueKnown(a) && c->ValueKnown(b)) {
    TF_RETURN_IF_ERROR(CheckDimsEqual(what, c->Value(a), c->Value(b), c->DebugString(a_shape),
                                      c->DebugString(b_shape)));
  }
  return c->Merge(a, b, out);
}

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_TF_SHAPE_SUPPORT_H_
