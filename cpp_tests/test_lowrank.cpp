// C++ tests of the lowrank_linear op through the dispatcher (as a libtorch user calls it):
// results against at::linear with the dense weight, the empty batch, and the argument checks.
// No test framework: each check prints what failed; the exit code is the number of failures.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <string>

#include "common/checks.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::cout << (ok ? "PASS " : "FAIL ") << what << "\n";
  failures += ok ? 0 : 1;
}

at::Tensor lowrank_linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                          const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrkernels::lowrank_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, U, V, bias);
}

void expect_error(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                  const std::optional<at::Tensor>& bias, const std::string& fragment) {
  try {
    lowrank_linear(x, U, V, bias);
    expect(false, "error containing '" + fragment + "' (no error raised)");
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    expect(msg.find(fragment) != std::string::npos, "error containing '" + fragment + "'");
  }
}

}  // namespace

int main() {
  at::manual_seed(1234);
  const auto x = at::randn({3, 37, 45});
  const auto U = at::randn({29, 7});
  const auto V = at::randn({7, 45});
  const auto b = at::randn({29});

  const auto y = lowrank_linear(x, U, V, b);
  expect(y.sizes() == at::IntArrayRef({3, 37, 29}), "output shape (3, 37, 29)");
  expect(at::allclose(y, at::linear(x, U.mm(V), b), 1e-4, 1e-4), "float32 equals dense linear");

  const auto yh =
      lowrank_linear(x.to(at::kBFloat16), U.to(at::kBFloat16), V.to(at::kBFloat16), std::nullopt);
  const auto ref = at::linear(x, U.mm(V));
  const double rel = ((yh.to(at::kFloat) - ref).norm() / ref.norm()).item<double>();
  expect(yh.scalar_type() == at::kBFloat16 && rel < 2e-2, "bfloat16 within bf16 rounding");

  const auto empty = lowrank_linear(at::randn({0, 45}), U, V, b);
  expect(empty.sizes() == at::IntArrayRef({0, 29}), "empty batch gives (0, 29)");

  expect_error(x.to(at::kLong), U, V, b, "x must be float64, float32, float16 or bfloat16");
  expect_error(x, U, at::randn({7, 44}), b, "V must have shape (rank, 45)");
  expect_error(x, at::randn({29, 6}), V, b, "U must have shape (out_features, 7)");
  expect_error(x, U, V, at::randn({28}), "bias must have shape (29,)");
  expect_error(x, U.to(at::kDouble), V, b, "U must have x's dtype");

  // The shared check is callable directly by other ops' implementations.
  bool threw = false;
  try {
    lrkernels::check_lowrank_linear_args(x, U, at::randn({0, 45}), b);
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "rank 0 rejected by check_lowrank_linear_args");

  std::cout << (failures == 0 ? "all C++ tests passed" : "C++ tests FAILED") << "\n";
  return failures;
}
