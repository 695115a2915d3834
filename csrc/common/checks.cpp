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
              "lowrank_linear: x must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(U.scalar_type() == x.scalar_type(), "lowrank_linear: U must have x's dtype (",
              x.scalar_type(), "), got ", U.scalar_type());
  TORCH_CHECK(V.scalar_type() == x.scalar_type(), "lowrank_linear: V must have x's dtype (",
              x.scalar_type(), "), got ", V.scalar_type());
  TORCH_CHECK(U.device() == x.device(), "lowrank_linear: U must be on x's device (", x.device(),
              "), got ", U.device());
  TORCH_CHECK(V.device() == x.device(), "lowrank_linear: V must be on x's device (", x.device(),
              "), got ", V.device());
  TORCH_CHECK(x.dim() >= 1, "lowrank_linear: x must have shape (..., in_features), got a 0-d tensor");
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

}  // namespace lrkernels
