// C++ tests of the int8 ops through the dispatcher (as a libtorch user calls them), both weight
// layouts: results against at::linear with the dequantized weight, the packed layout built here
// from its documented formula (lrkernels/quant.py), the empty batch and the argument checks.
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

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t);
using GradFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

at::Tensor linear(const char* name, const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                  const std::optional<at::Tensor>& bias) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<LinearFn>();
  return op.call(x, q, s, bias, 0);
}

at::Tensor grad_input(const char* name, const at::Tensor& dy, const at::Tensor& q,
                      const at::Tensor& s) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<GradFn>();
  return op.call(dy, q, s, 0);
}

// Layout 2 by its formula: packed[nb][kb][16 L + 4 j + b] =
// q[32 nb + 8 j + L / 4][16 kb + 2 (L % 4) + (b & 1) + 8 (b >> 1)], rows past N zero.
at::Tensor pack(const at::Tensor& q) {
  const int64_t n = q.size(0), k = q.size(1), nbs = (n + 31) / 32, kbs = k / 16;
  at::Tensor out = at::zeros({nbs, kbs, 512}, q.options());
  auto src = q.accessor<int8_t, 2>();
  auto dst = out.accessor<int8_t, 3>();
  for (int64_t nb = 0; nb < nbs; ++nb)
    for (int64_t kb = 0; kb < kbs; ++kb)
      for (int L = 0; L < 32; ++L)
        for (int j = 0; j < 4; ++j)
          for (int b = 0; b < 4; ++b) {
            const int64_t r = nb * 32 + 8 * j + L / 4;
            const int64_t c = kb * 16 + 2 * (L % 4) + (b & 1) + 8 * (b >> 1);
            if (r < n) dst[nb][kb][16 * L + 4 * j + b] = src[r][c];
          }
  return out;
}

template <class Fn>
void expect_error(Fn fn, const std::string& fragment) {
  try {
    fn();
    expect(false, "error containing '" + fragment + "' (no error raised)");
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    expect(msg.find(fragment) != std::string::npos, "error containing '" + fragment + "'");
  }
}

}  // namespace

int main() {
  at::manual_seed(1234);
  const int64_t n = 37, k = 96;
  const auto x = at::randn({3, 5, k});
  const auto q = at::randint(-127, 128, {n, k}, at::kChar);
  const auto s = at::rand({n, k / 32}) / 64 + 1e-3;  // group 32
  const auto b = at::randn({n});
  const auto w = q.to(at::kFloat) * s.repeat_interleave(32, 1);
  const auto want = at::linear(x, w, b);
  const auto qp = pack(q);

  const auto y1 = linear("lrkernels::int8_linear", x, q, s, b);
  expect(y1.sizes() == at::IntArrayRef({3, 5, n}), "layout 1: output shape (3, 5, 37)");
  expect(at::allclose(y1, want, 1e-4, 1e-4), "layout 1: equals linear with the dequantized W");
  const auto y2 = linear("lrkernels::int8_linear_packed", x, qp, s, b);
  expect(at::allclose(y2, want, 1e-4, 1e-4), "layout 2: equals linear with the dequantized W");
  const auto st = s.t().contiguous().t();  // group-major scales, as lrkernels.quant.pack stores
  expect(at::equal(linear("lrkernels::int8_linear_packed", x, qp, st, b), y2),
         "layout 2: column-major scales give the same result");

  const auto dy = at::randn({4, n});
  const auto dx = grad_input("lrkernels::int8_linear_packed_grad_input", dy, qp, s);
  expect(at::allclose(dx, dy.mm(w), 1e-4, 1e-4), "layout 2: grad_input equals dy · W");
  expect(at::allclose(grad_input("lrkernels::int8_linear_grad_input", dy, q, s), dx, 1e-5, 1e-5),
         "layout 1 and 2 grad_input agree");

  const auto dq = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("lrkernels::int8_dequantize_packed", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  expect(at::equal(dq.call(qp, s), w), "int8_dequantize_packed equals q · s");

  const auto empty = linear("lrkernels::int8_linear_packed", at::randn({0, k}), qp, s, b);
  expect(empty.sizes() == at::IntArrayRef({0, n}), "empty batch gives (0, 37)");

  const char* packed_op = "lrkernels::int8_linear_packed";
  expect_error([&] { linear(packed_op, x, qp.narrow(2, 0, 256), s, b); },
               "qweight must be packed (layout 2)");
  expect_error([&] { linear(packed_op, x, qp, s.narrow(0, 0, 20), b); }, "give out_features 20");
  expect_error([&] { linear(packed_op, at::randn({2, 80}), qp, s, b); },
               "x's last dimension must be 96");
  expect_error([&] { linear(packed_op, x, qp, s.to(at::kHalf), b); }, "scales must have x's dtype");
  expect_error([&] { linear(packed_op, x, qp, at::rand({n, 6}), b); },
               "group size must be 32, 64 or 128, got 16");
  expect_error([&] { linear(packed_op, x, qp, s, at::randn({n + 1})); },
               "bias must have shape (37,)");
  expect_error(
      [&] { grad_input("lrkernels::int8_linear_packed_grad_input", at::randn({2, k}), qp, s); },
      "dy's last dimension must be 37");

  // The shared checks are callable directly by other ops' implementations.
  expect(lrkernels::check_int8_packed_linear_args(x, qp, s, b) == 32,
         "check_int8_packed_linear_args returns the group size");

  std::cout << (failures == 0 ? "all C++ tests passed" : "C++ tests FAILED") << "\n";
  return failures;
}
