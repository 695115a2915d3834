// Driver of the low-rank family (csrc/cuda/lowrank_kernels.cuh): y = (x · Vᵀ) · Uᵀ + bias through
// plan_lowrank + launch_lowrank (tensor-core or CUDA-core path), checked against a float64
// reference that rounds the intermediate t = x · Vᵀ to the dtype as the kernels do. Also checks
// that the split counters come back zeroed, that inputs are untouched and that sm_90 launches
// use PDL; repeat=N runs the same launch N times on the same counters.
//
// Case keys: dtype=f32|f16|bf16 M in out rank [path=auto|tc|gemv] [bias=0|1] [sms=N] [cc=9]
//   [splits=N] [tile=0|1|2 (16|64|128)] [reduce=last|sep: who sums a split down's partials]
//   [fill=X: take a grid of >= 2 blocks per SM within X times the best estimate]
//   [both_reduce=1: a split tensor-core plan is run again with the other reduction; y must be
//   bitwise equal (the two sum the partials in the same order)]
//   [mis=<letters of x U V b y>] [vt=1: V stored as (in, rank) column-major, i.e. a transposed
//   view] [ut=1: U likewise] [vpad=N] [upad=N] [xpad=N]
//   (extra elements per stored row) [repeat=N] [dist=int|real] [seed=N] [expect=ok|invalid]
//   [mode=run|plan] (plan: print the plan of the shape, allocate nothing)
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "driver_common.h"
#include "launch.h"  // emu::pdl_launch_count
#include "lowrank_kernels.cuh"

namespace {

using drv::Buffer;
using lrkernels::cuda::DType;
using lrkernels::cuda::LowRankArgs;
using lrkernels::cuda::LowRankPlan;
using lrkernels::cuda::Path;

template <class T>
DType api_dtype() {
  if constexpr (sizeof(T) == 4) return DType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  return DType::kBFloat16;
}

std::string describe(const LowRankPlan& p, const LowRankArgs& a, int sms) {
  const char* tiles[] = {"16", "64", "128"};
  std::string s = p.path == Path::kTensorCore ? "tc" : "gemv";
  if (p.path == Path::kTensorCore) {
    s += std::string(" down=") + tiles[static_cast<int>(p.down_tile)] +
         " up=" + tiles[static_cast<int>(p.up_tile)];
  }
  s += " splits=" + std::to_string(p.splits) +
       (p.separate_reduce() ? " reduce=sep reduce_blocks=" + std::to_string(p.reduce_blocks(a.M))
                            : std::string(p.splits > 1 ? " reduce=last" : "")) +
       " slice=" + std::to_string(p.slice) + " down_blocks=" + std::to_string(p.down_blocks()) +
       " up_blocks=" + std::to_string(p.up_blocks()) +
       " layouts=" + std::to_string(static_cast<int>(p.x_layout)) +
       std::to_string(static_cast<int>(p.v_layout)) + std::to_string(static_cast<int>(p.u_layout)) +
       " ws=" + std::to_string(lrkernels::cuda::workspace_bytes(p)) +
       " counters=" + std::to_string(p.counters);
  if (p.path == Path::kTensorCore) {  // the planner's cost model (microseconds, H200 figures)
    namespace pd = lrkernels::cuda::plan_detail;
    const double down = pd::down_cost_us(a.M, a.in, a.rank, p.down_tile, p.splits, p.reduce, sms);
    const double up = pd::up_cost_us(a.M, a.out, p.ldt, p.up_tile, sms);
    s += " model_down_us=" + std::to_string(down) + " model_up_us=" + std::to_string(up);
  }
  return s;
}

lrkernels::cuda::PlanOptions options(const drv::Case& c) {
  lrkernels::cuda::PlanOptions o;
  o.splits = static_cast<int>(c.num("splits", 0));
  o.tile = static_cast<int>(c.num("tile", -1));
  const std::string path = c.str("path", "auto");
  if (path == "gemv") o.path = static_cast<int>(Path::kGemv);
  if (path == "tc") o.path = static_cast<int>(Path::kTensorCore);
  o.fill_margin = std::stod(c.str("fill", "0"));
  const std::string reduce = c.str("reduce", "auto");
  if (reduce == "last") o.reduce = static_cast<int>(lrkernels::cuda::Reduce::kLastBlock);
  if (reduce == "sep") o.reduce = static_cast<int>(lrkernels::cuda::Reduce::kSeparate);
  return o;
}

template <class T>
std::string run(const drv::Case& c, std::string* stats) {
  const int64_t M = c.num("M"), in = c.num("in"), out = c.num("out"), rank = c.num("rank");
  const bool has_bias = c.num("bias", 1) != 0;
  const bool vt = c.num("vt", 0) != 0, ut = c.num("ut", 0) != 0;
  const int64_t xpad = c.num("xpad", 0), vpad = c.num("vpad", 0), upad = c.num("upad", 0);
  const lrkernels::cuda::DeviceCaps caps{static_cast<int>(c.num("sms", 132)),
                                         static_cast<int>(c.num("cc", 9))};
  const bool expect_ok = c.str("expect", "ok") == "ok";
  const std::string path = c.str("path", "auto");
  drv::Values vals(c.str("dist", "real"), static_cast<uint64_t>(c.num("seed", 1)));

  const int64_t ldx = in + xpad;
  const int64_t v_ld = (vt ? rank : in) + vpad, u_ld = (ut ? out : rank) + upad;
  LowRankArgs args{};
  args.M = M;
  args.in = in;
  args.out = out;
  args.rank = rank;
  args.ldx = ldx;
  args.v_sj = vt ? 1 : v_ld;
  args.v_sk = vt ? v_ld : 1;
  args.u_sn = ut ? 1 : u_ld;
  args.u_sj = ut ? u_ld : 1;
  args.dtype = api_dtype<T>();

  if (c.str("mode", "run") == "plan") {
    alignas(16) static unsigned char fake[16];
    args.x = args.U = args.V = args.y = fake;
    *stats = describe(lrkernels::cuda::plan_lowrank(args, caps, options(c)), args, caps.num_sms);
    return "";
  }

  const int64_t x_n = M > 0 ? (M - 1) * ldx + in : 0;
  const int64_t v_n = vt ? (in - 1) * v_ld + rank : (rank - 1) * v_ld + in;
  const int64_t u_n = ut ? (rank - 1) * u_ld + out : (out - 1) * u_ld + rank;
  Buffer<T> x(x_n, c.misaligned('x')), U(u_n, c.misaligned('U')), V(v_n, c.misaligned('V')),
      b(out, c.misaligned('b')), y(M * out, c.misaligned('y'));
  vals.fill(x);
  vals.fill(U);
  vals.fill(V);
  vals.fill(b);
  y.fill_nan();
  args.x = x.data();
  args.U = U.data();
  args.V = V.data();
  args.bias = has_bias ? b.data() : nullptr;
  args.y = y.data();
  auto x_at = [&](int64_t m, int64_t k) { return drv::to_f(x[m * ldx + k]); };
  auto v_at = [&](int64_t j, int64_t k) { return drv::to_f(V[j * args.v_sj + k * args.v_sk]); };
  auto u_at = [&](int64_t n, int64_t j) { return drv::to_f(U[n * args.u_sn + j * args.u_sj]); };

  const LowRankPlan plan = lrkernels::cuda::plan_lowrank(args, caps, options(c));
  if (path == "tc" && plan.path != Path::kTensorCore) return "planner refused the tc path";
  const size_t ws_bytes = lrkernels::cuda::workspace_bytes(plan);
  Buffer<unsigned char> ws(ws_bytes, 0);
  ws.fill_nan();  // unwritten t or partials read back as NaN
  Buffer<unsigned> counters(plan.counters, 0);
  for (size_t i = 0; i < counters.size(); ++i) counters[i] = 0;

  const long long pdl_before = emu::pdl_launch_count();
  const int repeat = static_cast<int>(c.num("repeat", 1));
  cudaError_t err = cudaSuccess;
  for (int r = 0; r < repeat && err == cudaSuccess; ++r) {
    if (r > 0) y.fill_nan();
    err = lrkernels::cuda::launch_lowrank(args, plan, ws.data(), ws_bytes, counters.data(),
                                          plan.counters, nullptr);
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
  if (c.num("both_reduce", 0) != 0) {
    if (plan.path != Path::kTensorCore || plan.splits < 2)
      return "both_reduce needs a split tc plan";
    LowRankPlan other = plan;
    other.reduce = plan.separate_reduce() ? lrkernels::cuda::Reduce::kLastBlock
                                          : lrkernels::cuda::Reduce::kSeparate;
    other.counters = other.separate_reduce() ? 0 : plan.row_tiles * plan.rank_chunks;
    std::vector<T> first(y.data(), y.data() + y.size());
    Buffer<unsigned> counters2(other.counters, 0);
    for (size_t i = 0; i < counters2.size(); ++i) counters2[i] = 0;
    ws.fill_nan();
    y.fill_nan();
    err = lrkernels::cuda::launch_lowrank(args, other, ws.data(), ws_bytes, counters2.data(),
                                          other.counters, nullptr);
    if (err != cudaSuccess) return "other reduction: cudaError " + std::to_string(err);
    if (std::memcmp(first.data(), y.data(), y.size() * sizeof(T)) != 0) {
      return "the two reductions differ";
    }
  }

  drv::Checker check(drv::tolerance<T>(), vals.exact());
  for (size_t i = 0; i < counters.size(); ++i) {
    if (counters[i] != 0) {
      check.fail("split counter " + std::to_string(i) + " left at " + std::to_string(counters[i]));
      break;
    }
  }
  const long long pdl = emu::pdl_launch_count() - pdl_before;
  const long long per_launch = plan.separate_reduce() ? 3 : 2;  // down, [reduce,] up
  long long kernels = per_launch * repeat;
  if (c.num("both_reduce", 0) != 0) kernels += 5 - per_launch;  // the other reduction's run
  const long long pdl_want = M > 0 && caps.cc_major >= 9 ? kernels : 0;
  if (pdl != pdl_want) {
    check.fail("PDL launches: " + std::to_string(pdl) + ", expected " + std::to_string(pdl_want));
  }
  std::vector<double> t(rank), tabs(rank);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < rank; ++j) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < in; ++k) {
        const double p = double(x_at(m, k)) * v_at(j, k);
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
        const double u = u_at(n, j);
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
  *stats = describe(plan, args, caps.num_sms) + " | " + check.summary();
  return check.ok() ? "" : check.summary() + " [" + describe(plan, args, caps.num_sms) + "]";
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
