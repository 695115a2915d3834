#include "checks.h"

#include <c10/util/Exception.h>

namespace lrkernels {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_lowrank_linear_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "lowrank_linear: x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(U.scalar_type() == x.scalar_type(), "lowrank_linear: U must have x's dtype (",
              x.scalar_type(), "), got ", U.scalar_type());
  TORCH_CHECK(V.scalar_type() == x.scalar_type(), "lowrank_linear: V must have x's dtype (",
              x.scalar_type(), "), got ", V.scalar_type());
  TORCH_CHECK(U.device() == x.device(), "lowrank_linear: U must be on x's device (", x.device(),
              "), got ", U.device());
  TORCH_CHECK(V.device() == x.device(), "lowrank_linear: V must be on x's device (", x.device(),
              "), got ", V.device());
  TORCH_CHECK(x.dim() >= 1,
              "lowrank_linear: x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK(V.dim() == 2, "lowrank_linear: V must be 2-D (rank, in_features), got shape ",
              V.sizes());
  TORCH_CHECK(U.dim() == 2, "lowrank_linear: U must be 2-D (out_features, rank), got shape ",
              U.sizes());
  TORCH_CHECK(V.size(0) >= 1, "lowrank_linear: rank must be >= 1, got V of shape ", V.sizes());
  TORCH_CHECK(V.size(1) == x.size(-1), "lowrank_linear: V must have shape (rank, ", x.size(-1),
              ") to match x's last dimension, got ", V.sizes());
  TORCH_CHECK(U.size(1) == V.size(0), "lowrank_linear: U must have shape (out_features, ",
              V.size(0), ") to match V's rank, got ", U.sizes());
  TORCH_CHECK(x.size(-1) >= 1, "lowrank_linear: in_features must be >= 1, got x of shape ",
              x.sizes());
  TORCH_CHECK(U.size(0) >= 1, "lowrank_linear: out_features must be >= 1, got U of shape ",
              U.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "lowrank_linear: bias must have x's dtype (",
                x.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "lowrank_linear: bias must be on x's device (",
                x.device(), "), got ", b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == U.size(0), "lowrank_linear: bias must have shape (",
                U.size(0), ",), got ", b.sizes());
  }
}

namespace {

// Checks shared by int8_linear (`activation` is x, reduced over K = qweight.size(1)) and its
// input gradient (`activation` is dy, reduced over N = qweight.size(0)).
int64_t check_int8_common(const char* op, const char* act_name, const at::Tensor& act,
                          int64_t act_features, const at::Tensor& qweight,
                          const at::Tensor& scales) {
  TORCH_CHECK(is_supported_float(act.scalar_type()), op, ": ", act_name,
              " must be float64, float32, float16 or bfloat16, got ", act.scalar_type());
  TORCH_CHECK(act.dim() >= 1, op, ": ", act_name, " must have at least one dimension");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, op,
              ": qweight must be 2-D (out_features, in_features), got shape ", qweight.sizes());
  TORCH_CHECK(qweight.size(0) >= 1 && qweight.size(1) >= 1, op,
              ": qweight must have out_features >= 1 and in_features >= 1, got shape ",
              qweight.sizes());
  TORCH_CHECK(act.size(-1) == act_features, op, ": ", act_name, "'s last dimension must be ",
              act_features, " to match qweight of shape ", qweight.sizes(), ", got ", act.sizes());
  TORCH_CHECK(scales.scalar_type() == act.scalar_type(), op, ": scales must have ", act_name,
              "'s dtype (", act.scalar_type(), "), got ", scales.scalar_type());
  TORCH_CHECK(qweight.device() == act.device(), op, ": qweight must be on ", act_name,
              "'s device (", act.device(), "), got ", qweight.device());
  TORCH_CHECK(scales.device() == act.device(), op, ": scales must be on ", act_name, "'s device (",
              act.device(), "), got ", scales.device());
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1);
  if (scales.dim() == 1) {
    TORCH_CHECK(scales.size(0) == n, op, ": per-channel scales must have shape (", n, ",), got ",
                scales.sizes());
    return 0;
  }
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) >= 1, op,
              ": scales must have shape (", n, ",) or (", n, ", in_features / group_size), got ",
              scales.sizes());
  const int64_t groups = scales.size(1);
  TORCH_CHECK(k % groups == 0, op, ": in_features (", k, ") is not divisible into ", groups,
              " groups (scales of shape ", scales.sizes(), ")");
  const int64_t group = k / groups;
  TORCH_CHECK(group == 32 || group == 64 || group == 128, op,
              ": group size must be 32, 64 or 128, got ", group, " (in_features ", k, ", ", groups,
              " groups)");
  return group;
}

}  // namespace

int64_t check_int8_linear_args(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  const int64_t group = check_int8_common(
      "int8_linear", "x", x, qweight.dim() == 2 ? qweight.size(1) : -1, qweight, scales);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "int8_linear: bias must have x's dtype (",
                x.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "int8_linear: bias must be on x's device (", x.device(),
                "), got ", b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == qweight.size(0), "int8_linear: bias must have shape (",
                qweight.size(0), ",), got ", b.sizes());
  }
  return group;
}

int64_t check_int8_grad_input_args(const at::Tensor& dy, const at::Tensor& qweight,
                                   const at::Tensor& scales) {
  return check_int8_common("int8_linear_grad_input", "dy", dy,
                           qweight.dim() == 2 ? qweight.size(0) : -1, qweight, scales);
}

}  // namespace lrkernels
