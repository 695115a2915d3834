// Driver of the low-rank family (csrc/cuda/lowrank_kernels.cuh): y = (x · Vᵀ) · Uᵀ + bias through
// launch_lowrank_fused_tc (path=fused) or launch_lowrank_gemv (path=gemv), checked against a
// float64 reference that rounds the intermediate t = x · Vᵀ to the dtype as the kernels do.
//
// Case keys: path=fused|gemv dtype=f32|f16|bf16 M in out rank [bias=0|1] [sms=N]
//   [mis=<letters of x U V b y>] [dist=int|real] [seed=N] [expect=ok|invalid]
#include <cmath>
#include <string>
#include <vector>

#include "driver_common.h"
#include "lowrank_kernels.cuh"

namespace {

using drv::Buffer;
using lrkernels::cuda::DType;
using lrkernels::cuda::LowRankArgs;

template <class T>
DType api_dtype() {
  if constexpr (sizeof(T) == 4) return DType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  return DType::kBFloat16;
}

template <class T>
std::string run(const drv::Case& c, std::string* stats) {
  const std::string path = c.str("path");
  const int64_t M = c.num("M"), in = c.num("in"), out = c.num("out"), rank = c.num("rank");
  const bool has_bias = c.num("bias", 1) != 0;
  const int sms = static_cast<int>(c.num("sms", 132));
  const bool expect_ok = c.str("expect", "ok") == "ok";
  drv::Values vals(c.str("dist", "real"), static_cast<uint64_t>(c.num("seed", 1)));

  Buffer<T> x(M * in, c.misaligned('x')), U(out * rank, c.misaligned('U')),
      V(rank * in, c.misaligned('V')), b(out, c.misaligned('b')), y(M * out, c.misaligned('y'));
  vals.fill(x);
  vals.fill(U);
  vals.fill(V);
  vals.fill(b);
  y.fill_nan();
  const LowRankArgs args{
      x.data(), U.data(), V.data(),      has_bias ? b.data() : nullptr, y.data(), M, in,
      out,      rank,     api_dtype<T>()};

  cudaError_t err = cudaSuccess;
  if (path == "fused") {
    err = lrkernels::cuda::launch_lowrank_fused_tc(args, sms, nullptr);
  } else if (path == "gemv") {
    const size_t bytes = lrkernels::cuda::lowrank_gemv_workspace_bytes(args, sms);
    Buffer<unsigned char> ws(bytes, 0);
    ws.fill_nan();
    err = lrkernels::cuda::launch_lowrank_gemv(args, sms, ws.data(), bytes, nullptr);
  } else {
    return "unknown path " + path;
  }
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

  drv::Checker check(drv::tolerance<T>(), vals.exact());
  std::vector<double> t(rank), tabs(rank);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < rank; ++j) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < in; ++k) {
        const double p = double(drv::to_f(x[m * in + k])) * drv::to_f(V[j * in + k]);
        s += p;
        a += std::fabs(p);
      }
      t[j] = sizeof(T) == 4 ? s : drv::round_to<T>(s);  // 16-bit: t rounded to the dtype
      tabs[j] = a;
      check.require_exact_range(a, 1.0);
    }
    for (int64_t n = 0; n < out; ++n) {
      const double bn = has_bias ? drv::to_f(b[n]) : 0.0;
      double s = bn, scale = std::fabs(bn);
      for (int64_t j = 0; j < rank; ++j) {
        const double u = drv::to_f(U[n * rank + j]);
        s += t[j] * u;
        scale += tabs[j] * std::fabs(u);
      }
      check.require_exact_range(1.01 * scale, 1.0);
      check.add("y[" + std::to_string(m) + "," + std::to_string(n) + "]", drv::to_f(y[m * out + n]),
                drv::round_to<T>(s), scale);
    }
  }
  if (!x.unchanged() || !U.unchanged() || !V.unchanged() || !b.unchanged()) {
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
