// Driver of the block-sparse attention family (csrc/cuda/attention_kernels.cuh) through
// launch_block_sparse_attention_fwd (path=fwd) and launch_block_sparse_attention_bwd (path=bwd),
// checked against a float64 reference of docs/attention.md:
//   visible(i, j): j in a FULL block of i's row (j < Sk), or in a PARTIAL one and inside the
//     window Sk - Sq - left <= j - i <= Sk - Sq + right (-1: unbounded side);
//   fwd: S = scale·q·kᵀ, lse = log Σ_vis exp S, out = Σ_vis exp(S - lse)·v (0 / -inf for a row
//     that sees nothing);
//   bwd: from the given out (the reference forward rounded to the dtype) and lse,
//     Δ = rowsum(dout ∘ out), P = exp(S - lse), dP = dout·vᵀ, dS = P ∘ (dP - Δ),
//     dq = scale·dS·k, dk = scale·dSᵀ·q and dv = Pᵀ·dout (both summed over the GQA group).
// Each output element is compared with a tolerance of 4 units in the last place of the dtype
// relative to the sum of the absolute values of every term that enters it (drv::tolerance),
// which bounds the kernels' documented roundings (P and dS rounded to the dtype for the tensor
// cores); lse to 4e-5 of 1 + max |S|. Rows that see no key must give exactly out = 0, lse = -inf
// and gradients exactly 0. Inputs must come back unchanged; outputs and the backward workspace
// start NaN-filled.
//
// Case keys: path=fwd|bwd dtype=f16|bf16 B Hq Hkv Sq Sk D [bq=64|128] [bk=64|128] [win=L:R]
//   [layout=window|random] [dens=0.5] [full=1] [bcast=0|1|b|h] [shuf=0|1] [bad=0|1]
//   [scale=<float>, default 1/sqrt(D)] [qlay=bhsd|bshd] [kvpad=0|8] [seed=N] [mis=<letters of
//   q k v o>] [expect=ok|invalid]
//   layout=window: the blocks the window reaches (full where every in-bounds element is visible,
//   when full=1, else partial); layout=random: each block present with probability dens, full
//   or partial at random (full=1) — whole rows may be empty. bcast: layout shared by the batch
//   (b), the heads (h) or both (1). shuf: list entries in random order. bad: a negative index in
//   some lists (the kernels skip it). Lists are padded past their counts with stray indices.
//   qlay=bshd: q (and k, v) stored (B, S, H, D). kvpad: extra elements per k / v row.
// Kernel files that were absent at build time are compiled out (EMU_WITHOUT_<FILE>).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "attention_kernels.cuh"
#include "driver_common.h"

namespace {

using drv::Buffer;
using lrkernels::cuda::AttnDType;
using lrkernels::cuda::AttnShape;
using lrkernels::cuda::AttnStrides;
using lrkernels::cuda::BlockList;

template <class T>
AttnDType api_dtype() {
  return std::is_same_v<T, __half> ? AttnDType::kFloat16 : AttnDType::kBFloat16;
}

// A CSR-like list set as the kernels read it (docs/attention.md), with its dense classification
// cls[(bl * Hl + hl) * rows + r][c] in {0 absent, 1 partial, 2 full}.
struct Lists {
  int64_t Bl = 1, Hl = 1, rows = 0, cols = 0, width = 0, full_width = 0;
  bool has_full = false;
  std::vector<int32_t> counts, idx, full_counts, full_idx;
  std::vector<std::vector<uint8_t>> cls;

  BlockList api() const {
    BlockList l{};
    l.counts = counts.data();
    l.indices = width > 0 ? idx.data() : nullptr;
    l.full_counts = has_full ? full_counts.data() : nullptr;
    l.full_indices = has_full && full_width > 0 ? full_idx.data() : nullptr;
    l.batch_stride = Bl == 1 ? 0 : Hl * rows;
    l.head_stride = Hl == 1 ? 0 : rows;
    l.n_row_blocks = rows;
    l.max_blocks = width;
    l.max_full_blocks = has_full ? full_width : 0;
    return l;
  }
  uint8_t at(int64_t b, int64_t h, int64_t r, int64_t c) const {
    return cls[((Bl == 1 ? 0 : b) * Hl + (Hl == 1 ? 0 : h)) * rows + r][c];
  }
};

// Packs a classification into lists: entries in order (or shuffled), a negative index now and
// then (bad), and stray indices past each count (the kernels must ignore them).
Lists pack(const std::vector<std::vector<uint8_t>>& cls, int64_t Bl, int64_t Hl, int64_t rows,
           int64_t cols, bool has_full, bool shuf, bool bad, std::mt19937_64& rng) {
  Lists l;
  l.Bl = Bl;
  l.Hl = Hl;
  l.rows = rows;
  l.cols = cols;
  l.has_full = has_full;
  l.cls = cls;
  std::vector<std::vector<int32_t>> part(cls.size()), full(cls.size());
  for (size_t r = 0; r < cls.size(); ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      if (cls[r][c] == 1) part[r].push_back(static_cast<int32_t>(c));
      if (cls[r][c] == 2) full[r].push_back(static_cast<int32_t>(c));
    }
    if (bad && rng() % 3 == 0) part[r].insert(part[r].begin() + rng() % (part[r].size() + 1), -1);
    if (shuf) {
      std::shuffle(part[r].begin(), part[r].end(), rng);
      std::shuffle(full[r].begin(), full[r].end(), rng);
    }
  }
  auto width_of = [](const std::vector<std::vector<int32_t>>& v) {
    size_t w = 0;
    for (const auto& e : v) w = std::max(w, e.size());
    return static_cast<int64_t>(w);
  };
  auto fill = [&](const std::vector<std::vector<int32_t>>& v, int64_t width,
                  std::vector<int32_t>& counts, std::vector<int32_t>& idx) {
    counts.assign(v.size(), 0);
    idx.assign(v.size() * width, 0);
    for (size_t r = 0; r < v.size(); ++r) {
      counts[r] = static_cast<int32_t>(v[r].size());
      for (int64_t e = 0; e < width; ++e) {  // past the count: a stray (valid-looking) index
        idx[r * width + e] = e < static_cast<int64_t>(v[r].size())
                                 ? v[r][e]
                                 : static_cast<int32_t>(rng() % std::max<int64_t>(cols, 1));
      }
    }
  };
  l.width = width_of(part) + (rng() % 2);
  fill(part, l.width, l.counts, l.idx);
  if (has_full) {
    l.full_width = width_of(full) + (rng() % 2);
    fill(full, l.full_width, l.full_counts, l.full_idx);
  }
  return l;
}

bool in_window(int64_t i, int64_t j, int64_t Sq, int64_t Sk, int64_t left, int64_t right) {
  const int64_t d = j - i - (Sk - Sq);
  return (left < 0 || d >= -left) && (right < 0 || d <= right);
}

struct Problem {
  int64_t B, Hq, Hkv, Sq, Sk, D, bq, bk, left, right;
  double scale;
  Lists fwd, tr;  // per query block; the transpose, per key block
  bool visible(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const uint8_t c = fwd.at(b, h, i / bq, j / bk);
    return c == 2 || (c == 1 && in_window(i, j, Sq, Sk, left, right));
  }
};

// The layout: per (bl, hl) a classification of (query block, key block), then its lists and the
// transposed lists (per key block, the query blocks that list it).
void make_layout(const drv::Case& c, Problem& pr, std::mt19937_64& rng) {
  const std::string kind = c.str("layout", "window");
  const std::string bc = c.str("bcast", "0");
  const bool has_full = c.num("full", 1) != 0;
  const bool shuf = c.num("shuf", 0) != 0, bad = c.num("bad", 0) != 0;
  const double dens = std::stod(c.str("dens", "0.5"));
  const int64_t Bl = (bc == "1" || bc == "b") ? 1 : pr.B;
  const int64_t Hl = (bc == "1" || bc == "h") ? 1 : pr.Hq;
  const int64_t nqb = (pr.Sq + pr.bq - 1) / pr.bq, nkb = (pr.Sk + pr.bk - 1) / pr.bk;
  std::vector<std::vector<uint8_t>> cls(Bl * Hl * nqb, std::vector<uint8_t>(nkb, 0));
  for (int64_t r = 0; r < Bl * Hl * nqb; ++r) {
    const int64_t qb = r % nqb;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      if (kind == "random") {
        if (std::uniform_real_distribution<double>(0, 1)(rng) < dens) {
          cls[r][kb] = has_full && rng() % 2 ? 2 : 1;
        }
        continue;
      }
      if (kind != "window") throw std::runtime_error("layout must be window or random");
      int64_t seen = 0, all = 0;
      for (int64_t i = qb * pr.bq; i < std::min(pr.Sq, (qb + 1) * pr.bq); ++i) {
        for (int64_t j = kb * pr.bk; j < std::min(pr.Sk, (kb + 1) * pr.bk); ++j) {
          ++all;
          seen += in_window(i, j, pr.Sq, pr.Sk, pr.left, pr.right);
        }
      }
      cls[r][kb] = seen == 0 ? 0 : (seen == all && has_full ? 2 : 1);
    }
  }
  pr.fwd = pack(cls, Bl, Hl, nqb, nkb, has_full, shuf, bad, rng);
  std::vector<std::vector<uint8_t>> tcls(Bl * Hl * nkb, std::vector<uint8_t>(nqb, 0));
  for (int64_t bh = 0; bh < Bl * Hl; ++bh) {
    for (int64_t qb = 0; qb < nqb; ++qb) {
      for (int64_t kb = 0; kb < nkb; ++kb) tcls[bh * nkb + kb][qb] = cls[bh * nqb + qb][kb];
    }
  }
  pr.tr = pack(tcls, Bl, Hl, nkb, nqb, has_full, shuf, bad, rng);
}

// q / k / v storage: (B, H, S, D) or (B, S, H, D), rows padded by `pad` elements.
struct Storage {
  AttnStrides st;
  size_t elems;
};
Storage storage(int64_t B, int64_t H, int64_t S, int64_t D, bool bshd, int64_t pad) {
  const int64_t row = D + pad;
  if (bshd) return {{S * H * row, row, H * row}, static_cast<size_t>(B * S * H * row)};
  return {{H * S * row, S * row, row}, static_cast<size_t>(B * H * S * row)};
}
int64_t offset(const AttnStrides& s, int64_t b, int64_t h, int64_t i) {
  return b * s.batch + h * s.head + i * s.seq;
}

template <class T>
std::string run(const drv::Case& c, std::string* stats) {
  const std::string path = c.str("path");
  const bool expect_ok = c.str("expect", "ok") == "ok";
  Problem pr{};
  pr.B = c.num("B");
  pr.Hq = c.num("Hq");
  pr.Hkv = c.num("Hkv");
  pr.Sq = c.num("Sq");
  pr.Sk = c.num("Sk");
  pr.D = c.num("D");
  pr.bq = c.num("bq", 64);
  pr.bk = c.num("bk", 64);
  {
    const std::string w = c.str("win", "-1:-1");
    const auto colon = w.find(':');
    pr.left = std::stoll(w.substr(0, colon));
    pr.right = std::stoll(w.substr(colon + 1));
  }
  pr.scale = c.str("scale", "") == "" ? 1.0 / std::sqrt(static_cast<double>(pr.D))
                                      : std::stod(c.str("scale"));
  const float scale_f = static_cast<float>(pr.scale);
  const double scale = scale_f;  // the kernels get float32
  drv::Values vals("real", static_cast<uint64_t>(c.num("seed", 1)));
  make_layout(c, pr, vals.rng());

  const bool bshd = c.str("qlay", "bhsd") == "bshd";
  const int64_t kvpad = c.num("kvpad", 0);
  const Storage qsto = storage(pr.B, pr.Hq, pr.Sq, pr.D, bshd, 0);
  const Storage ksto = storage(pr.B, pr.Hkv, pr.Sk, pr.D, bshd, kvpad);
  const size_t shift = 3;  // elements: 6 bytes off a 16-byte boundary
  Buffer<T> q(qsto.elems, c.misaligned('q') ? shift : 0);
  Buffer<T> k(ksto.elems, c.misaligned('k') ? shift : 0);
  Buffer<T> v(ksto.elems, c.misaligned('v') ? shift : 0);
  vals.fill(q);
  vals.fill(k);
  vals.fill(v);
  const int64_t group = pr.Hkv > 0 ? pr.Hq / pr.Hkv : 1;
  auto qv = [&](int64_t b, int64_t h, int64_t i, int64_t d) -> double {
    return drv::to_f(q[offset(qsto.st, b, h, i) + d]);
  };
  auto kvv = [&](const Buffer<T>& t, int64_t b, int64_t h, int64_t j, int64_t d) -> double {
    return drv::to_f(t[offset(ksto.st, b, h / group, j) + d]);
  };

  AttnShape shape{};
  shape.B = pr.B;
  shape.Hq = pr.Hq;
  shape.Hkv = pr.Hkv;
  shape.Sq = pr.Sq;
  shape.Sk = pr.Sk;
  shape.D = pr.D;
  shape.block_q = pr.bq;
  shape.block_k = pr.bk;
  shape.window_left = pr.left;
  shape.window_right = pr.right;
  shape.scale = scale_f;
  shape.dtype = api_dtype<T>();

  // Float64 forward: S, lse, P and out per (b, h, i). Plan mode (drv::plan_only) skips it and
  // every reference below: only the launches are recorded, at headline sizes.
  const bool plan = drv::plan_only();
  const int64_t rows = pr.B * pr.Hq * pr.Sq;
  const int64_t ref_rows = plan ? 0 : rows;
  std::vector<double> ref_out(ref_rows * pr.D, 0.0), ref_out_abs(ref_rows * pr.D, 0.0);
  std::vector<double> ref_lse(ref_rows, -INFINITY), s_abs_max(ref_rows, 0.0);
  std::vector<double> srow(pr.Sk), sabs(pr.Sk);
  for (int64_t b = 0; b < (plan ? 0 : pr.B); ++b) {
    for (int64_t h = 0; h < pr.Hq; ++h) {
      for (int64_t i = 0; i < pr.Sq; ++i) {
        const int64_t r = (b * pr.Hq + h) * pr.Sq + i;
        double mx = -INFINITY;
        for (int64_t j = 0; j < pr.Sk; ++j) {
          srow[j] = -INFINITY;
          if (!pr.visible(b, h, i, j)) continue;
          double s = 0, a = 0;
          for (int64_t d = 0; d < pr.D; ++d) {
            const double t = qv(b, h, i, d) * kvv(k, b, h, j, d);
            s += t;
            a += std::fabs(t);
          }
          srow[j] = scale * s;
          s_abs_max[r] = std::max(s_abs_max[r], std::fabs(scale) * a);
          mx = std::max(mx, srow[j]);
        }
        if (mx == -INFINITY) continue;
        double l = 0;
        for (int64_t j = 0; j < pr.Sk; ++j) l += srow[j] == -INFINITY ? 0 : std::exp(srow[j] - mx);
        ref_lse[r] = mx + std::log(l);
        for (int64_t j = 0; j < pr.Sk; ++j) {
          if (srow[j] == -INFINITY) continue;
          const double pj = std::exp(srow[j] - ref_lse[r]);
          for (int64_t d = 0; d < pr.D; ++d) {
            ref_out[r * pr.D + d] += pj * kvv(v, b, h, j, d);
            ref_out_abs[r * pr.D + d] += pj * std::fabs(kvv(v, b, h, j, d));
          }
        }
      }
    }
  }

  // Made after the launch: in plan mode its constructor ends the case (drv::PlanOnly).
  std::optional<drv::Checker> checker;
  std::string why;
  if (path == "fwd") {
    Buffer<T> out(rows * pr.D, c.misaligned('o') ? shift : 0);
    Buffer<float> lse(rows, 0);
    out.fill_nan();
    lse.fill_nan();
    lrkernels::cuda::AttnFwdArgs a{};
    a.shape = shape;
    a.q = q.data();
    a.k = k.data();
    a.v = v.data();
    a.q_strides = qsto.st;
    a.k_strides = ksto.st;
    a.v_strides = ksto.st;
    a.kv = pr.fwd.api();
    a.out = out.data();
    a.lse = lse.data();
    const cudaError_t err = lrkernels::cuda::launch_block_sparse_attention_fwd(a, nullptr);
    if (!expect_ok) {
      if (err != cudaErrorInvalidValue) {
        return "expected cudaErrorInvalidValue, got " + std::to_string(err);
      }
      for (size_t i = 0; i < out.size(); ++i) {
        if (!std::isnan(drv::to_f(out[i]))) return "rejected launch wrote out";
      }
      *stats = "rejected as expected";
      return "";
    }
    if (err != cudaSuccess) return "launch returned cudaError " + std::to_string(err);
    drv::Checker& check = checker.emplace(drv::tolerance<T>(), false);
    int64_t lse_bad = 0;
    std::string lse_first;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < pr.D; ++d) {
        check.add("out[" + std::to_string(r) + "," + std::to_string(d) + "]",
                  drv::to_f(out[r * pr.D + d]), ref_out[r * pr.D + d], ref_out_abs[r * pr.D + d]);
      }
      const double got = lse[r], want = ref_lse[r];
      const bool ok = want == -INFINITY
                          ? got == -INFINITY
                          : std::fabs(got - want) <= 4e-5 * (1 + s_abs_max[r] + std::fabs(want));
      if (!ok && lse_bad++ == 0) {
        lse_first = "lse[" + std::to_string(r) + "]: got " + std::to_string(got) + " want " +
                    std::to_string(want);
      }
    }
    if (lse_bad > 0) {
      check.fail(std::to_string(lse_bad) + " lse wrong (tol 4e-5 of 1 + max |S|), first " +
                 lse_first);
    }
  } else if (path == "bwd") {
#ifdef EMU_WITHOUT_ATTENTION_BWD
    return "path bwd not built";
#else
    // Inputs of the backward: out rounded to T, lse in float32, dout random.
    Buffer<T> out(rows * pr.D, 0), dout(rows * pr.D, 0);
    Buffer<float> lse(rows, 0);
    for (int64_t e = 0; e < ref_rows * pr.D; ++e) out[e] = drv::from_f<T>(ref_out[e]);
    if (!plan) out.snapshot();
    vals.fill(dout);
    for (int64_t r = 0; r < ref_rows; ++r) lse[r] = static_cast<float>(ref_lse[r]);
    if (!plan) lse.snapshot();
    const int64_t kv_rows = pr.B * pr.Hkv * pr.Sk;
    Buffer<T> dq(rows * pr.D, 0), dk(kv_rows * pr.D, 0), dv(kv_rows * pr.D, 0);
    dq.fill_nan();
    dk.fill_nan();
    dv.fill_nan();
    const size_t ws_bytes = lrkernels::cuda::attention_bwd_workspace_bytes(shape);
    Buffer<unsigned char> ws(ws_bytes, 0);
    ws.fill_nan();
    lrkernels::cuda::AttnBwdArgs a{};
    a.shape = shape;
    a.q = q.data();
    a.k = k.data();
    a.v = v.data();
    a.q_strides = qsto.st;
    a.k_strides = ksto.st;
    a.v_strides = ksto.st;
    a.out = out.data();
    a.dout = dout.data();
    a.lse = lse.data();
    a.kv = pr.fwd.api();
    a.q_blocks = pr.tr.api();
    a.workspace = ws_bytes > 0 ? ws.data() : nullptr;
    a.dq = dq.data();
    a.dk = dk.data();
    a.dv = dv.data();
    const cudaError_t err = lrkernels::cuda::launch_block_sparse_attention_bwd(a, nullptr);
    if (!expect_ok) {
      if (err != cudaErrorInvalidValue) {
        return "expected cudaErrorInvalidValue, got " + std::to_string(err);
      }
      for (const Buffer<T>* g : {&dq, &dk, &dv}) {
        for (size_t i = 0; i < g->size(); ++i) {
          if (!std::isnan(drv::to_f((*g)[i]))) return "rejected launch wrote a gradient";
        }
      }
      *stats = "rejected as expected";
      return "";
    }
    if (err != cudaSuccess) return "launch returned cudaError " + std::to_string(err);
    drv::Checker& check = checker.emplace(drv::tolerance<T>(), false);

    // Float64 gradients with their error scales (sums of absolute terms).
    std::vector<double> gq(rows * pr.D, 0), gq_abs(rows * pr.D, 0);
    std::vector<double> gk(kv_rows * pr.D, 0), gk_abs(kv_rows * pr.D, 0);
    std::vector<double> gv(kv_rows * pr.D, 0), gv_abs(kv_rows * pr.D, 0);
    for (int64_t b = 0; b < pr.B; ++b) {
      for (int64_t h = 0; h < pr.Hq; ++h) {
        const int64_t hk = h / group;
        for (int64_t i = 0; i < pr.Sq; ++i) {
          const int64_t r = (b * pr.Hq + h) * pr.Sq + i;
          if (lse[r] == -INFINITY) continue;
          double delta = 0, delta_abs = 0;
          for (int64_t d = 0; d < pr.D; ++d) {
            const double t = double(drv::to_f(dout[r * pr.D + d])) * drv::to_f(out[r * pr.D + d]);
            delta += t;
            delta_abs += std::fabs(t);
          }
          for (int64_t j = 0; j < pr.Sk; ++j) {
            if (!pr.visible(b, h, i, j)) continue;
            double s = 0;
            for (int64_t d = 0; d < pr.D; ++d) s += qv(b, h, i, d) * kvv(k, b, h, j, d);
            const double pj = std::exp(scale * s - double(lse[r]));
            double dp = 0, dp_abs = 0;
            for (int64_t d = 0; d < pr.D; ++d) {
              const double t = double(drv::to_f(dout[r * pr.D + d])) * kvv(v, b, h, j, d);
              dp += t;
              dp_abs += std::fabs(t);
            }
            const double ds = pj * (dp - delta), ds_abs = pj * (dp_abs + delta_abs);
            const int64_t kr = (b * pr.Hkv + hk) * pr.Sk + j;
            for (int64_t d = 0; d < pr.D; ++d) {
              const double dov = drv::to_f(dout[r * pr.D + d]);
              gv[kr * pr.D + d] += pj * dov;
              gv_abs[kr * pr.D + d] += pj * std::fabs(dov);
              gq[r * pr.D + d] += scale * ds * kvv(k, b, h, j, d);
              gq_abs[r * pr.D + d] += std::fabs(scale) * ds_abs * std::fabs(kvv(k, b, h, j, d));
              gk[kr * pr.D + d] += scale * ds * qv(b, h, i, d);
              gk_abs[kr * pr.D + d] += std::fabs(scale) * ds_abs * std::fabs(qv(b, h, i, d));
            }
          }
        }
      }
    }
    for (int64_t e = 0; e < rows * pr.D; ++e) {
      check.add("dq[" + std::to_string(e / pr.D) + "," + std::to_string(e % pr.D) + "]",
                drv::to_f(dq[e]), gq[e], gq_abs[e]);
    }
    for (int64_t e = 0; e < kv_rows * pr.D; ++e) {
      const std::string at = "[" + std::to_string(e / pr.D) + "," + std::to_string(e % pr.D) + "]";
      check.add("dk" + at, drv::to_f(dk[e]), gk[e], gk_abs[e]);
      check.add("dv" + at, drv::to_f(dv[e]), gv[e], gv_abs[e]);
    }
    if (!out.unchanged() || !dout.unchanged() || !lse.unchanged()) {
      check.fail("out, dout or lse was modified");
    }
#endif
  } else {
    return "unknown path " + path;
  }
  drv::Checker& check = *checker;
  if (!q.unchanged() || !k.unchanged() || !v.unchanged()) check.fail("q, k or v was modified");
  *stats = check.summary();
  return check.ok() ? "" : check.summary();
}

}  // namespace

int main() {
  return drv::main_loop([](const drv::Case& c, std::string* stats) {
    switch (drv::parse_dtype(c.str("dtype"))) {
      case drv::DType::kF16:
        return run<__half>(c, stats);
      case drv::DType::kBF16:
        return run<__nv_bfloat16>(c, stats);
      case drv::DType::kF32:
        break;
    }
    return std::string("the CUDA attention kernels take f16 or bf16");
  });
}
