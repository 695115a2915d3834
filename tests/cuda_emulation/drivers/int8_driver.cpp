// Driver of the int8 weight-only family (csrc/cuda/int8_kernels.cuh), checked against a float64
// reference:
//   op=mma:     launch_int8_mma with the plan int8_mma_plan picks (or forced splits):
//               forward (dir=fwd): y = a · Wᵀ + bias, transposed (dir=tr): y = a · W;
//   op=dequant: launch_int8_dequantize: W = q · s in the dtype.
// The packed weight (layout 2) is built here from the documented formula (int8_kernels.cuh,
// lrkernels/quant.py), not from the kernels. Reference numerics, as int8_mma.cuh documents them:
// forward per channel y = s[n] · Σ a·q + b (q exact); group scales and the transposed product
// use W = round_T(q · s); accumulation in float (the comparison allows for its order).
//
// Case keys: op=mma|dequant dtype=f16|bf16 (dequant: also f32) dir=fwd|tr M N K
//   [group=0|32|64|128] [bias=0|1] [sms=N] [splits=N] [pad=<extra elements per row of a>]
//   [ypad=<extra elements per row of y>] [mis=<letters a q s b y: base off 16-byte alignment>]
//   [det=1: run twice, outputs must be bitwise equal] [dist=int|real] [seed=N]
//   [expect=ok|invalid]
//   The low-rank addend (forward; int8_kernels.cuh Int8LowRankAddend, the fused LoRA expand):
//   [lora=<rank>] [sets=0 (one set, no index) | n sets with per-row indices] [bad=1: indices and
//   ranks out of range] [tsplits=<partials of t>] [tout=0|1]. B columns past a set's rank hold
//   NaN (never multiplied); reference y += s_m · round(Σ partials) · B[a_m]ᵀ.
//   [weight=dense]: the dense 16-bit weight of Int8MmaArgs::dense_weight (the LoRA ops' dense
//   base; needs lora=, group=0, K % 8 == 0; mis=w shifts it): y = a · Wᵀ (+ bias, addend).
// Checked besides the values: inputs unchanged, padding of y never written, split-K counters
// back to zero, the plan's invariants (no empty split, grid = tiles x splits).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "driver_common.h"
#include "int8_kernels.cuh"

namespace {

using drv::Buffer;
using lrkernels::cuda::Int8DequantArgs;
using lrkernels::cuda::Int8DType;
using lrkernels::cuda::Int8LowRankAddend;
using lrkernels::cuda::Int8MmaArgs;
using lrkernels::cuda::Int8MmaPlan;

template <class T>
Int8DType api_dtype() {
  if constexpr (sizeof(T) == 4) return Int8DType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return Int8DType::kFloat16;
  return Int8DType::kBFloat16;
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

std::string plan_problem(const Int8MmaPlan& p) {
  if (p.grid != p.tiles * p.splits) return "plan: grid != tiles x splits";
  if (p.splits < 1 || (p.steps > 0 && p.splits > p.steps)) return "plan: an empty split";
  if (p.splits > 1 && (p.counters != p.tiles || p.workspace_floats == 0))
    return "plan: split-K without workspace";
  return "";
}

template <class T>
std::string run_mma(const drv::Case& c, std::string* stats) {
  const bool tr = c.str("dir", "fwd") == "tr";
  const int64_t M = c.num("M"), N = c.num("N"), K = c.num("K"), G = c.num("group", 0);
  const bool has_bias = c.num("bias", tr ? 0 : 1) != 0;
  const int sms = static_cast<int>(c.num("sms", 132));
  const bool expect_ok = c.str("expect", "ok") == "ok";
  drv::Values vals(c.str("dist", "real"), static_cast<uint64_t>(c.num("seed", 1)));
  const int64_t R = tr ? N : K, C = tr ? K : N;
  const int64_t lda = R + c.num("pad", 0), ldy = C + c.num("ypad", 0);
  const int64_t groups = G > 0 ? K / G : 1;
  const bool staged = G > 0 || tr;
  const int64_t sld = staged ? round_up(N, 8) : N;

  // Logical inputs (none in plan mode, drv::plan_only: only the launches are recorded).
  const bool plan_mode = drv::plan_only();
  std::vector<int8_t> q(static_cast<size_t>(plan_mode ? 0 : N * K));
  for (auto& v : q) v = static_cast<int8_t>(static_cast<int>(vals.rng()() % 255) - 127);
  std::vector<float> s(static_cast<size_t>(N * groups));
  for (auto& v : s) {
    v = vals.exact() ? std::ldexp(1.f, -static_cast<int>(vals.rng()() % 3))
                     : (0.5f + std::fabs(vals.next())) / 64;
    v = drv::to_f(drv::from_f<T>(v));
  }

  // Kernel-side tensors. Scale padding past N is NaN: it may be read, never used.
  Buffer<T> a(static_cast<size_t>(M * lda), c.misaligned('a')),
      sk(static_cast<size_t>(staged ? groups * sld : N), c.misaligned('s')),
      b(static_cast<size_t>(N), c.misaligned('b')),
      y(static_cast<size_t>(M * ldy), c.misaligned('y'));
  Buffer<int8_t> qp(static_cast<size_t>((N + 31) / 32 * 32 * K), c.misaligned('q'));
  const bool dense = c.str("weight", "int8") == "dense";
  Buffer<T> wd(static_cast<size_t>(dense ? N * K : 0), c.misaligned('w'));
  for (size_t i = 0; i < (plan_mode ? 0 : wd.size()); ++i) wd[i] = drv::from_f<T>(vals.next());
  wd.snapshot();
  for (size_t i = 0; i < (plan_mode ? 0 : a.size()); ++i) a[i] = drv::from_f<T>(vals.next());
  a.snapshot();
  vals.fill(b);
  if (K % 16 == 0 && !plan_mode) drv::pack_layout2(q.data(), N, K, qp.data());
  qp.snapshot();
  sk.fill_nan();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t gr = 0; gr < groups; ++gr) {
      sk[static_cast<size_t>(staged ? gr * sld + n : n)] = drv::from_f<T>(s[n * groups + gr]);
    }
  }
  sk.snapshot();
  y.fill_nan();

  Int8MmaArgs args{};
  args.a = a.data();
  args.lda = lda;
  args.qpacked = dense ? nullptr : qp.data();  // a dense weight never reads them
  args.scales = dense ? nullptr : sk.data();
  args.sld = sld;
  if (dense) {
    args.dense_weight = wd.data();
    args.ldw = K;
  }
  args.bias = has_bias ? b.data() : nullptr;
  args.y = y.data();
  args.ldy = ldy;
  args.M = M;
  args.N = N;
  args.K = K;
  args.group_size = G;
  args.transposed = tr;
  args.dtype = api_dtype<T>();
  args.splits = static_cast<int>(c.num("splits", 0));

  // The low-rank addend: partials of t, B, per-row sets.
  const int64_t LR = c.num("lora", 0), n_sets = c.num("sets", 0), TS = c.num("tsplits", 1);
  const int64_t n_stack = n_sets > 0 ? n_sets : 1;
  const bool bad = c.num("bad", 0) != 0, want_t = LR > 0 && n_sets == 0 && c.num("tout", 1) != 0;
  const int64_t lr_alloc = LR > 0 ? LR : 0;
  Buffer<float> tp(static_cast<size_t>(TS * M * lr_alloc), 0);
  Buffer<T> lb(static_cast<size_t>(n_stack * N * lr_alloc), 0),
      tout(static_cast<size_t>(want_t ? M * LR : 0), 0);
  Buffer<int32_t> index(static_cast<size_t>(n_sets > 0 ? M : 0), 0),
      ranks(static_cast<size_t>(n_sets), 0);
  Buffer<float> set_scales(static_cast<size_t>(n_sets), 0);
  const float lscale = vals.exact() ? 0.5f : 0.75f;
  for (size_t i = 0; i < (plan_mode ? 0 : tp.size()); ++i) tp[i] = vals.next();
  tp.snapshot();
  drv::random_adapter_sets(vals, index, ranks, set_scales, n_sets, LR, bad);
  auto set_of = [&](int64_t m) -> int64_t {
    const int64_t v = n_sets > 0 ? index[m] : 0;
    return v >= 0 && v < n_stack ? v : -1;
  };
  auto rank_of = [&](int64_t a) -> int64_t {
    const int64_t r = n_sets > 0 ? ranks[a] : LR;
    return r < 0 ? 0 : (r > LR ? LR : r);
  };
  for (int64_t a = 0; a < (plan_mode ? 0 : n_stack); ++a) {
    for (int64_t o = 0; o < N; ++o) {
      for (int64_t j = 0; j < LR; ++j) {
        lb[(a * N + o) * LR + j] = drv::from_f<T>(j < rank_of(a) ? vals.next() : NAN);
      }
    }
  }
  lb.snapshot();
  tout.fill_nan();
  Int8LowRankAddend addend{tp.data(),
                           TS,
                           LR,
                           lb.data(),
                           n_sets > 0 ? index.data() : nullptr,
                           n_sets > 0 ? ranks.data() : nullptr,
                           n_sets > 0 ? set_scales.data() : nullptr,
                           lscale,
                           n_stack,
                           want_t ? tout.data() : nullptr};
  if (c.num("lora", -1) >= 0) args.addend = &addend;  // lora=0: a launch the API must refuse

  const Int8MmaPlan plan = lrkernels::cuda::int8_mma_plan(args, sms);
  if (expect_ok) {
    const std::string bad = plan_problem(plan);
    if (!bad.empty()) return bad;
  }
  Buffer<float> ws(plan.workspace_floats, 0);
  ws.fill_nan();
  Buffer<int> counters(static_cast<size_t>(plan.counters), 0);
  for (size_t i = 0; i < counters.size(); ++i) counters[i] = 0;

  const cudaError_t err =
      lrkernels::cuda::launch_int8_mma(args, plan, ws.data(), counters.data(), nullptr);
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
  for (size_t i = 0; i < counters.size(); ++i) {
    if (counters[i] != 0) return "a split-K counter was not reset";
  }
  if (c.num("det", 0) != 0) {  // a second launch (another block order) gives the same bits
    std::vector<T> first(y.data(), y.data() + y.size());
    y.fill_nan();
    ws.fill_nan();
    const cudaError_t err2 =
        lrkernels::cuda::launch_int8_mma(args, plan, ws.data(), counters.data(), nullptr);
    if (err2 != cudaSuccess) return "second launch failed";
    if (std::memcmp(first.data(), y.data(), y.size() * sizeof(T)) != 0) {
      return "not deterministic: two launches differ";
    }
  }

  drv::Checker check(drv::tolerance<T>(), vals.exact());  // before the O(N·K) W (plan mode)
  // t = round(Σ partials) per row (0 past the row's rank, and for rows without a set).
  std::vector<double> t_ref(static_cast<size_t>(M * lr_alloc), 0.0);
  std::vector<double> t_abs(static_cast<size_t>(M), 0.0);
  for (int64_t m = 0; m < M && LR > 0; ++m) {
    const int64_t a = set_of(m);
    for (int64_t j = 0; a >= 0 && j < rank_of(a); ++j) {
      double sum = 0;
      for (int64_t sp = 0; sp < TS; ++sp) {
        sum += tp[(sp * M + m) * LR + j];
        t_abs[m] += std::fabs(tp[(sp * M + m) * LR + j]);
      }
      t_ref[m * LR + j] = drv::round_to<T>(sum);
    }
    for (int64_t j = 0; want_t && j < LR; ++j) {
      check.add("t[" + std::to_string(m) + "," + std::to_string(j) + "]",
                drv::to_f(tout[m * LR + j]), t_ref[m * LR + j],
                t_abs[m] + std::fabs(t_ref[m * LR + j]));
    }
  }
  // Reference: W as the kernel uses it.
  const bool rounded_w = (G > 0 || tr) && !dense;
  std::vector<double> w(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const float sv = s[n * groups + (G > 0 ? k / G : 0)];
      const float qs = static_cast<float>(q[n * K + k]) * (rounded_w ? sv : 1.f);
      w[n * K + k] = dense ? drv::to_f(wd[n * K + k]) : (rounded_w ? drv::round_to<T>(qs) : qs);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < C; ++o) {
      double sum = 0, scale = 0;
      for (int64_t r = 0; r < R; ++r) {
        const double p = double(drv::to_f(a[m * lda + r])) * (tr ? w[r * K + o] : w[o * K + r]);
        sum += p;
        scale += std::fabs(p);
      }
      if (!tr && G == 0 && !dense) {  // per-channel scale in the epilogue
        sum *= s[o];
        scale *= s[o];
      }
      const double bias = has_bias ? drv::to_f(b[o]) : 0.0;
      sum += bias;
      scale += std::fabs(bias);
      const int64_t a = LR > 0 ? set_of(m) : -1;
      if (a >= 0) {
        const double s_m = n_sets > 0 ? set_scales[a] : lscale;
        double lsum = 0, lsc = 0;
        for (int64_t j = 0; j < rank_of(a); ++j) {
          const double p = t_ref[m * LR + j] * drv::to_f(lb[(a * N + o) * LR + j]);
          lsum += p;
          lsc += std::fabs(p);
        }
        sum += s_m * lsum;
        // A one-ulp difference in a rounded t element moves the result by up to ulp(t) · |B|.
        scale += std::fabs(s_m) * (lsc + t_abs[m] * drv::tolerance<T>());
      }
      check.require_exact_range(scale, 0.25);  // dist=int: scales >= 1/4
      check.add("y[" + std::to_string(m) + "," + std::to_string(o) + "]", drv::to_f(y[m * ldy + o]),
                drv::round_to<T>(sum), scale);
    }
    for (int64_t o = C; o < ldy; ++o) {
      if (!std::isnan(drv::to_f(y[m * ldy + o]))) check.fail("padding of y written");
    }
  }
  if (!a.unchanged() || !qp.unchanged() || !sk.unchanged() || !b.unchanged() || !tp.unchanged() ||
      !wd.unchanged() || !lb.unchanged() || !index.unchanged() || !ranks.unchanged() ||
      !set_scales.unchanged()) {
    check.fail("an input was modified");
  }
  *stats = check.summary() + " (bm " + std::to_string(plan.bm) + ", splits " +
           std::to_string(plan.splits) + ", grid " + std::to_string(plan.grid) + ")";
  return check.ok() ? "" : *stats;
}

template <class T>
std::string run_dequant(const drv::Case& c, std::string* stats) {
  const int64_t N = c.num("N"), K = c.num("K"), G = c.num("group", 0);
  const bool expect_ok = c.str("expect", "ok") == "ok";
  const bool group_major = c.str("smajor", "n") == "g";
  drv::Values vals(c.str("dist", "real"), static_cast<uint64_t>(c.num("seed", 1)));
  const int64_t groups = G > 0 ? K / G : 1;
  const bool plan_mode = drv::plan_only();  // only the launch is recorded: no values
  std::vector<int8_t> q(static_cast<size_t>(plan_mode ? 0 : N * K));
  for (auto& v : q) v = static_cast<int8_t>(static_cast<int>(vals.rng()() % 255) - 127);
  Buffer<int8_t> qp(static_cast<size_t>((N + 31) / 32 * 32 * K), c.misaligned('q'));
  if (K % 16 == 0 && !plan_mode) drv::pack_layout2(q.data(), N, K, qp.data());
  qp.snapshot();
  Buffer<T> s(static_cast<size_t>(N * groups), c.misaligned('s')),
      w(static_cast<size_t>(N * K), c.misaligned('y'));
  for (size_t i = 0; i < s.size(); ++i) s[i] = drv::from_f<T>((0.5f + std::fabs(vals.next())) / 64);
  s.snapshot();
  w.fill_nan();
  Int8DequantArgs args{};
  args.qpacked = qp.data();
  args.scales = s.data();
  args.s_stride_n = group_major ? 1 : groups;
  args.s_stride_g = group_major ? N : 1;
  args.w = w.data();
  args.ldw = K;
  args.N = N;
  args.K = K;
  args.group_size = G;
  args.dtype = api_dtype<T>();
  const cudaError_t err = lrkernels::cuda::launch_int8_dequantize(args, nullptr);
  if (!expect_ok) {
    if (err != cudaErrorInvalidValue)
      return "expected cudaErrorInvalidValue, got " + std::to_string(err);
    *stats = "rejected as expected";
    return "";
  }
  if (err != cudaSuccess) return "launch returned cudaError " + std::to_string(err);
  drv::Checker check(0.0, true);  // one rounding of an exact float32 product: bitwise
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t gr = G > 0 ? k / G : 0;
      const float sv = drv::to_f(s[n * args.s_stride_n + gr * args.s_stride_g]);
      const double want = drv::round_to<T>(static_cast<float>(q[n * K + k]) * sv);
      check.add("w[" + std::to_string(n) + "," + std::to_string(k) + "]", drv::to_f(w[n * K + k]),
                want, std::fabs(want));
    }
  }
  if (!qp.unchanged() || !s.unchanged()) check.fail("an input was modified");
  *stats = check.summary();
  return check.ok() ? "" : check.summary();
}

template <class T>
std::string run(const drv::Case& c, std::string* stats) {
  const std::string op = c.str("op", "mma");
  if (op == "mma") return run_mma<T>(c, stats);
  if (op == "dequant") return run_dequant<T>(c, stats);
  return "unknown op " + op;
}

}  // namespace

int main() {
  return drv::main_loop([](const drv::Case& c, std::string* stats) {
    switch (drv::parse_dtype(c.str("dtype"))) {
      case drv::DType::kF32:
        if (c.str("op", "mma") == "mma") {  // the tensor-core kernels take 16-bit dtypes only
          Int8MmaArgs args{};
          args.dtype = Int8DType::kFloat32;
          args.M = 1;
          args.N = 8;
          args.K = 16;
          const Int8MmaPlan plan = lrkernels::cuda::int8_mma_plan(args, 1);
          const cudaError_t err =
              lrkernels::cuda::launch_int8_mma(args, plan, nullptr, nullptr, nullptr);
          *stats = "float32 rejected";
          return err == cudaErrorInvalidValue ? std::string() : std::string("float32 accepted");
        }
        return run<float>(c, stats);
      case drv::DType::kF16:
        return run<__half>(c, stats);
      case drv::DType::kBF16:
        return run<__nv_bfloat16>(c, stats);
    }
    return std::string("unreachable");
  });
}
