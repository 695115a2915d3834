// Driver of the int8 weight-only family (csrc/cuda/int8_kernels.cuh) through launch_int8_gemv
// (path=gemv) or launch_int8_gemm_tc (path=tc), checked against a float64 reference:
//   forward (dir=fwd): y = a · Wᵀ + bias,  transposed (dir=tr): y = a · W,
//   W[n, k] = q[n, k] · s[n, k / G] formed in float32; the tensor-core path rounds W to the
//   dtype before the product (as int8_gemm_tc.cu documents), so the reference does too.
//
// Case keys: path=gemv|tc dtype=f32|f16|bf16 dir=fwd|tr M N K [group=0|32|64|128] [bias=0|1]
//   [sms=N] [mis=<letters of a q s b y>] [dist=int|real] [seed=N] [expect=ok|invalid]
// Kernel files that were absent at build time are compiled out (EMU_WITHOUT_<FILE>).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "driver_common.h"
#include "int8_kernels.cuh"

namespace {

using drv::Buffer;
using lrkernels::cuda::Int8Args;
using lrkernels::cuda::Int8DType;

template <class T>
Int8DType api_dtype() {
  if constexpr (sizeof(T) == 4) return Int8DType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return Int8DType::kFloat16;
  return Int8DType::kBFloat16;
}

cudaError_t launch(const std::string& path, const Int8Args& args, int sms, std::string* why) {
  if (path == "gemv") {
#ifndef EMU_WITHOUT_INT8_GEMV
    const size_t bytes = lrkernels::cuda::int8_gemv_workspace_bytes(args, sms);
    Buffer<unsigned char> ws(bytes, 0);
    ws.fill_nan();
    return lrkernels::cuda::launch_int8_gemv(args, bytes > 0 ? ws.data() : nullptr, sms, nullptr);
#endif
  } else if (path == "tc") {
#ifndef EMU_WITHOUT_INT8_GEMM_TC
    return lrkernels::cuda::launch_int8_gemm_tc(args, sms, nullptr);
#endif
  }
  *why = "path " + path + " unknown or not built";
  return cudaErrorUnknown;
}

template <class T>
std::string run(const drv::Case& c, std::string* stats) {
  const std::string path = c.str("path");
  const bool tr = c.str("dir", "fwd") == "tr";
  const int64_t M = c.num("M"), N = c.num("N"), K = c.num("K"), G = c.num("group", 0);
  const bool has_bias = c.num("bias", tr ? 0 : 1) != 0;
  const int sms = static_cast<int>(c.num("sms", 132));
  const bool expect_ok = c.str("expect", "ok") == "ok";
  drv::Values vals(c.str("dist", "real"), static_cast<uint64_t>(c.num("seed", 1)));
  const int64_t in_cols = tr ? N : K, out_cols = tr ? K : N;
  const int64_t groups = G > 0 ? K / G : 1;  // scales per row of W

  Buffer<T> a(M * in_cols, c.misaligned('a')), s(N * groups, c.misaligned('s')),
      b(N, c.misaligned('b')), y(M * out_cols, c.misaligned('y'));
  Buffer<int8_t> q(N * K, c.misaligned('q'));
  vals.fill(a);
  vals.fill(b);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(vals.rng()() % 255) - 127;
  q.snapshot();
  for (size_t i = 0; i < s.size(); ++i) {
    const float v = vals.exact() ? std::ldexp(1.f, -static_cast<int>(vals.rng()() % 3))
                                 : (0.5f + std::fabs(vals.next())) / 64;
    s[i] = drv::from_f<T>(v);
  }
  s.snapshot();
  y.fill_nan();
  const Int8Args args{
      a.data(), q.data(), s.data(),      has_bias ? b.data() : nullptr, y.data(), M, N, K,
      G,        tr,       api_dtype<T>()};

  std::string why;
  const cudaError_t err = launch(path, args, sms, &why);
  if (!why.empty()) return why;
  if (!expect_ok) {
    if (err != cudaErrorInvalidValue)
      return "expected cudaErrorInvalidValue, got " + std::to_string(err);
    for (size_t i = 0; i < y.size(); ++i) {
      if (!std::isnan(drv::to_f(y[i]))) return "rejected launch wrote y";
    }
    *stats = "rejected as expected";
    return "";
  }
  if (err != cudaSuccess) return "launch returned cudaError " + std::to_string(err);

  drv::Checker check(drv::tolerance<T>(), vals.exact());  // before the O(N·K) W (plan mode)
  // W in float64: float(q) * s rounded to float32 (exact for dist=int), then to T on the tensor
  // cores.
  std::vector<double> w(N * K);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const float v =
          static_cast<float>(q[n * K + k]) * drv::to_f(s[n * groups + (G > 0 ? k / G : 0)]);
      w[n * K + k] = path == "tc" ? drv::round_to<T>(v) : v;
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < out_cols; ++o) {
      const double bias = has_bias ? drv::to_f(b[o]) : 0.0;
      double sum = bias, scale = std::fabs(bias);
      for (int64_t r = 0; r < in_cols; ++r) {
        const double p = double(drv::to_f(a[m * in_cols + r])) * (tr ? w[r * K + o] : w[o * K + r]);
        sum += p;
        scale += std::fabs(p);
      }
      check.require_exact_range(scale, 0.25);  // dist=int: scales >= 1/4
      check.add("y[" + std::to_string(m) + "," + std::to_string(o) + "]",
                drv::to_f(y[m * out_cols + o]), drv::round_to<T>(sum), scale);
    }
  }
  if (!a.unchanged() || !q.unchanged() || !s.unchanged() || !b.unchanged()) {
    check.fail("an input was modified");
  }
  *stats = check.summary();
  return check.ok() ? "" : check.summary();
}

}  // namespace

int main() {
  return drv::main_loop([](const drv::Case& c, std::string* stats) {
    switch (drv::parse_dtype(c.str("dtype"))) {
      case drv::DType::kF32:
        return run<float>(c, stats);
      case drv::DType::kF16:
        return run<__half>(c, stats);
      case drv::DType::kBF16:
        return run<__nv_bfloat16>(c, stats);
    }
    return std::string("unreachable");
  });
}
