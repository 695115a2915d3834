// Driver of the LoRA family (csrc/cuda/lora_kernels.cuh), checked against a float64 reference:
//   path=gemv:   launch_lora_shrink then launch_lora_gemv (M <= 16):
//                y = x · Wᵀ + s_m · round(t) · B[a_m]ᵀ + bias, t = (keep ⊙ x) · A[a_m, :r_m]ᵀ,
//                and t_out = round(t) (one adapter)
//   path=expand: launch_lora_shrink then launch_lora_expand: y = y0 + s_m · round(t) · B[a_m]ᵀ
//   path=mask:   launch_lora_mask: out = keep ⊙ in (exactly)
//   path=fused:  launch_lora_shrink then launch_int8_mma with the low-rank addend
//   (int8_kernels.cuh,
//                as a programmatic dependent of the shrink): the tensor-core route of
//                lora_cuda.cpp, on the dense 16-bit weight or the int8 one packed here (layout 2,
//                group scales group-major); f16 / bf16, K % 8 == 0 (int8: K % 16 == 0).
//                Group-scaled int8 W is round(q · s) there (the int8 kernel's numerics).
// W is dense or int8 (float(q) · s in float32); keep is the shared hash of
// csrc/cuda/lora_dropout.h.
//
// Case keys: path dtype=f32|f16|bf16 M N K R [base=dense|int8] [group=0|32|64|128]
//   [n=0 (one adapter) | n adapters with per-row indices] [bad=0|1 (out-of-range indices and
//   ranks: base-only rows, clamped ranks)] [bias=0|1] [drop=threshold] [sms=N]
//   [mis=<letters of x w y>] [dist=int|real] [seed=N] [expect=ok|invalid]
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "driver_common.h"
#include "int8_kernels.cuh"
#include "lora_dropout.h"
#include "lora_kernels.cuh"

namespace {

using drv::Buffer;
using lrkernels::cuda::LoraAdapters;
using lrkernels::cuda::LoraDType;
namespace lora = lrkernels::lora;

template <class T>
LoraDType api_dtype() {
  if constexpr (sizeof(T) == 4) return LoraDType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return LoraDType::kFloat16;
  return LoraDType::kBFloat16;
}

template <class T>
std::string run_mask(const drv::Case& c, std::string* stats) {
  const int64_t M = c.num("M"), K = c.num("K");
  const uint32_t thr = static_cast<uint32_t>(c.num("drop", 20000));
  drv::Values vals(c.str("dist", "real"), static_cast<uint64_t>(c.num("seed", 1)));
  Buffer<T> in(M * K, c.misaligned('x')), out(M * K, c.misaligned('y'));
  Buffer<int64_t> seed(1, 0);
  seed[0] = static_cast<int64_t>(vals.rng()());
  vals.fill(in);
  out.fill_nan();
  const lrkernels::cuda::LoraMaskArgs args{in.data(),   out.data(),    M, K, thr,
                                           seed.data(), api_dtype<T>()};
  const cudaError_t err = lrkernels::cuda::launch_lora_mask(args, nullptr);
  if (err != cudaSuccess) return "launch returned cudaError " + std::to_string(err);
  if (drv::plan_only()) throw drv::PlanOnly{};  // the launch is recorded; nothing to check
  int64_t wrong = 0, kept = 0;
  for (int64_t m = 0; m < M; ++m) {
    const uint32_t key = lora::dropout_rowkey(static_cast<uint64_t>(seed[0]), m);
    for (int64_t k = 0; k < K; ++k) {
      const bool keep = lora::dropout_keep(key, k, thr);
      kept += keep;
      const float want = keep ? drv::to_f(in[m * K + k]) : 0.f;
      const float got = drv::to_f(out[m * K + k]);
      wrong += !(got == want);
    }
  }
  if (!in.unchanged()) return "the input was modified";
  if (wrong != 0) return std::to_string(wrong) + " masked elements wrong";
  *stats = "kept " + std::to_string(kept) + " of " + std::to_string(M * K);
  return "";
}

// path=fused: the tensor-core GEMM over the base with the shrink's partials as its addend.
template <class T>
cudaError_t run_fused(const drv::Case& c, const Buffer<T>& x, const Buffer<T>& w,
                      const Buffer<int8_t>& q, const Buffer<T>& s, const Buffer<T>& b,
                      const Buffer<T>& bias, Buffer<T>& y, Buffer<T>& t_out,
                      const Buffer<float>& partial, int64_t splits, const Buffer<int32_t>& index,
                      const Buffer<int32_t>& ranks, const Buffer<float>& scales, float scale,
                      int64_t n_stack, bool has_bias) {
  using lrkernels::cuda::Int8DType;
  if constexpr (sizeof(T) == 4) {
    return cudaErrorInvalidValue;  // 16-bit activations only
  } else {
    const int64_t M = c.num("M"), N = c.num("N"), K = c.num("K"), R = c.num("R");
    const int64_t n = c.num("n", 0), G = c.num("group", 0);
    const bool int8 = c.str("base", "dense") == "int8";
    const int64_t groups = G > 0 ? K / G : 1, sld = (N + 7) / 8 * 8;
    // The int8 base as the kernel reads it: packed units, scales per channel or group-major.
    Buffer<int8_t> qp(static_cast<size_t>(int8 && K % 16 == 0 ? (N + 31) / 32 * 32 * K : 0), 0);
    Buffer<T> sg(static_cast<size_t>(int8 ? (G > 0 ? groups * sld : N) : 0), 0);
    if (qp.size() != 0 && !drv::plan_only()) drv::pack_layout2(q.data(), N, K, qp.data());
    for (size_t i = 0; i < sg.size(); ++i) sg[i] = drv::from_f<T>(0.f);
    for (int64_t o = 0; int8 && o < N; ++o) {
      for (int64_t g = 0; g < groups; ++g) sg[G > 0 ? g * sld + o : o] = s[o * groups + g];
    }
    const lrkernels::cuda::Int8LowRankAddend addend{partial.data(),
                                                    splits,
                                                    R,
                                                    b.data(),
                                                    n > 0 ? index.data() : nullptr,
                                                    n > 0 ? ranks.data() : nullptr,
                                                    n > 0 ? scales.data() : nullptr,
                                                    scale,
                                                    n_stack,
                                                    n > 0 ? nullptr : t_out.data()};
    lrkernels::cuda::Int8MmaArgs args{};
    args.a = x.data();
    args.lda = K;
    if (int8) {
      args.qpacked = qp.data();
      args.scales = sg.data();
      args.sld = sld;
      args.group_size = G;
    } else {
      args.dense_weight = w.data();
      args.ldw = K;
    }
    args.bias = has_bias ? bias.data() : nullptr;
    args.y = y.data();
    args.ldy = N;
    args.M = M;
    args.N = N;
    args.K = K;
    args.dtype = std::is_same_v<T, __half> ? Int8DType::kFloat16 : Int8DType::kBFloat16;
    args.addend = &addend;
    args.pdl = true;
    const lrkernels::cuda::Int8MmaPlan plan =
        lrkernels::cuda::int8_mma_plan(args, static_cast<int>(c.num("sms", 132)));
    Buffer<float> ws(plan.workspace_floats, 0);
    Buffer<int> counters(static_cast<size_t>(plan.counters), 0);
    for (size_t i = 0; i < counters.size(); ++i) counters[i] = 0;
    return lrkernels::cuda::launch_int8_mma(args, plan, ws.data(), counters.data(), nullptr);
  }
}

template <class T>
std::string run(const drv::Case& c, std::string* stats) {
  const std::string path = c.str("path");
  if (path == "mask") return run_mask<T>(c, stats);
  const int64_t M = c.num("M"), N = c.num("N"), K = c.num("K"), R = c.num("R");
  const int64_t n = c.num("n", 0);
  const int64_t n_stack = n > 0 ? n : 1;
  const bool int8 = c.str("base", "dense") == "int8";
  const int64_t G = c.num("group", 0);
  const bool has_bias = c.num("bias", 1) != 0 && (path == "gemv" || path == "fused");
  const bool bad = c.num("bad", 0) != 0;
  const uint32_t thr = static_cast<uint32_t>(c.num("drop", 0));
  const int sms = static_cast<int>(c.num("sms", 132));
  const bool expect_ok = c.str("expect", "ok") == "ok";
  drv::Values vals(c.str("dist", "real"), static_cast<uint64_t>(c.num("seed", 1)));
  const int64_t groups = G > 0 ? K / G : 1;

  Buffer<T> x(M * K, c.misaligned('x')), w(int8 ? 0 : N * K, c.misaligned('w')),
      s(int8 ? N * groups : 0, 0), a(n_stack * R * K, 0), b(n_stack * N * R, 0), bias(N, 0),
      y(M * N, c.misaligned('y')), t_out(M * R, 0);
  Buffer<int8_t> q(int8 ? N * K : 0, c.misaligned('w'));
  Buffer<int32_t> index(n > 0 ? M : 0, 0), ranks(n > 0 ? n : 0, 0);
  Buffer<float> scales(n > 0 ? n : 0, 0);
  Buffer<int64_t> seed(1, 0);
  seed[0] = static_cast<int64_t>(vals.rng()());
  vals.fill(x);
  vals.fill(w);
  vals.fill(a);
  vals.fill(b);
  vals.fill(bias);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(vals.rng()() % 255) - 127;
  q.snapshot();
  for (size_t i = 0; i < s.size(); ++i) {
    const float v = vals.exact() ? std::ldexp(1.f, -static_cast<int>(vals.rng()() % 3))
                                 : (0.5f + std::fabs(vals.next())) / 64;
    s[i] = drv::from_f<T>(v);
  }
  s.snapshot();
  const float scale = vals.exact() ? 0.5f : 0.75f;
  drv::random_adapter_sets(vals, index, ranks, scales, n, R, bad);
  // Columns of A and B at or past an adapter's (clamped) rank hold NaN: they must never be read
  // into a result (0 · NaN would poison it).
  for (int64_t ad = 0; ad < static_cast<int64_t>(ranks.size()); ++ad) {
    const int64_t r = ranks[ad] < 0 ? 0 : (ranks[ad] > R ? R : ranks[ad]);
    for (int64_t j = r; j < R; ++j) {
      for (int64_t k = 0; k < K; ++k) a[(ad * R + j) * K + k] = drv::from_f<T>(NAN);
      for (int64_t o = 0; o < N; ++o) b[(ad * N + o) * R + j] = drv::from_f<T>(NAN);
    }
  }
  a.snapshot();
  b.snapshot();
  std::vector<double> y0(M * N, 0.0);
  if (path == "expand") {
    vals.fill(y);
    for (int64_t i = 0; i < M * N; ++i) y0[i] = drv::to_f(y[i]);
  } else {
    y.fill_nan();
  }
  t_out.fill_nan();

  const LoraAdapters adapters{a.data(),
                              b.data(),
                              n > 0 ? index.data() : nullptr,
                              n > 0 ? ranks.data() : nullptr,
                              n > 0 ? scales.data() : nullptr,
                              scale,
                              n_stack,
                              R};
  const int64_t splits = lrkernels::cuda::lora_shrink_splits(M, K, sms);
  Buffer<float> partial(splits * M * R, 0);
  partial.fill_nan();
  const lrkernels::cuda::LoraShrinkArgs shrink{x.data(), adapters,    partial.data(), M, K, splits,
                                               thr,      seed.data(), api_dtype<T>()};
  cudaError_t err = lrkernels::cuda::launch_lora_shrink(shrink, nullptr);
  if (err == cudaSuccess) {
    if (path == "gemv") {
      const lrkernels::cuda::LoraGemvArgs args{
          x.data(),
          int8 ? static_cast<const void*>(q.data()) : static_cast<const void*>(w.data()),
          int8 ? s.data() : nullptr,
          G,
          adapters,
          partial.data(),
          splits,
          has_bias ? bias.data() : nullptr,
          y.data(),
          n > 0 ? nullptr : t_out.data(),
          M,
          N,
          K,
          api_dtype<T>(),
          /*pdl=*/true};
      err = lrkernels::cuda::launch_lora_gemv(args, nullptr);
    } else if (path == "fused") {
      err = run_fused<T>(c, x, w, q, s, b, bias, y, t_out, partial, splits, index, ranks, scales,
                         scale, n_stack, has_bias);
    } else if (path == "expand") {
      const lrkernels::cuda::LoraExpandArgs args{adapters, partial.data(), splits, y.data(), M,
                                                 N,        api_dtype<T>()};
      err = lrkernels::cuda::launch_lora_expand(args, nullptr);
    } else {
      return "unknown path " + path;
    }
  }
  if (!expect_ok) {
    if (err != cudaErrorInvalidValue) {
      return "expected cudaErrorInvalidValue, got " + std::to_string(err);
    }
    *stats = "rejected as expected";
    return "";
  }
  if (err != cudaSuccess) return "launch returned cudaError " + std::to_string(err);

  drv::Checker check(drv::tolerance<T>(), vals.exact());
  std::vector<double> t(R);
  for (int64_t m = 0; m < M; ++m) {
    int64_t ad = n > 0 ? index[m] : 0;
    int64_t rank = n > 0 && ad >= 0 && ad < n ? ranks[ad] : R;
    double s_m = n > 0 && ad >= 0 && ad < n ? scales[ad] : scale;
    if (ad < 0 || ad >= n_stack) ad = -1;
    rank = rank < 0 ? 0 : (rank > R ? R : rank);
    const uint32_t key = lora::dropout_rowkey(static_cast<uint64_t>(seed[0]), m);
    double t_scale = 0;
    for (int64_t j = 0; j < R; ++j) {
      double sum = 0;
      if (ad >= 0 && j < rank) {
        for (int64_t k = 0; k < K; ++k) {
          if (thr != 0 && !lora::dropout_keep(key, k, thr)) continue;
          const double p = double(drv::to_f(x[m * K + k])) * drv::to_f(a[(ad * R + j) * K + k]);
          sum += p;
          t_scale += std::fabs(p);
        }
      }
      t[j] = drv::round_to<T>(sum);
      if (n == 0 && (path == "gemv" || path == "fused")) {
        check.add("t[" + std::to_string(m) + "," + std::to_string(j) + "]",
                  drv::to_f(t_out[m * R + j]), t[j], t_scale + std::fabs(t[j]));
      }
    }
    for (int64_t o = 0; o < N; ++o) {
      double sum = has_bias ? drv::to_f(bias[o]) : y0[m * N + o];
      double sc = std::fabs(sum);
      if (path == "gemv" || path == "fused") {
        const bool rounded_w = path == "fused" && G > 0;  // the int8 kernel's HMUL2 pairs
        for (int64_t k = 0; k < K; ++k) {
          const float qs = int8 ? static_cast<float>(q[o * K + k]) *
                                      drv::to_f(s[o * groups + (G > 0 ? k / G : 0)])
                                : 0.f;
          const double wv = int8 ? (rounded_w ? drv::round_to<T>(qs) : double(qs))
                                 : double(drv::to_f(w[o * K + k]));
          const double p = double(drv::to_f(x[m * K + k])) * wv;
          sum += p;
          sc += std::fabs(p);
        }
      }
      if (ad >= 0) {
        double lora_sum = 0, lora_sc = 0;
        for (int64_t j = 0; j < rank; ++j) {
          const double p = t[j] * drv::to_f(b[(ad * N + o) * R + j]);
          lora_sum += p;
          lora_sc += std::fabs(p);
        }
        sum += s_m * lora_sum;
        // A one-ulp difference in a rounded t element moves the result by up to ulp(t) · |B|.
        sc += std::fabs(s_m) * (lora_sc + t_scale * drv::tolerance<T>());
      }
      check.require_exact_range(sc, vals.exact() ? 0.125 : 1.0);
      check.add("y[" + std::to_string(m) + "," + std::to_string(o) + "]", drv::to_f(y[m * N + o]),
                drv::round_to<T>(sum), sc);
    }
  }
  if (!x.unchanged() || !w.unchanged() || !q.unchanged() || !s.unchanged() || !a.unchanged() ||
      !b.unchanged() || !bias.unchanged() || !index.unchanged() || !ranks.unchanged() ||
      !scales.unchanged()) {
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
