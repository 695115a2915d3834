// C++ tests of the block-sparse attention ops through the dispatcher (as a libtorch user calls
// them): a window layout built here against a dense masked softmax (float64, with autograd for
// the gradients), the lse, rows that see no key, GQA shapes, the argument checks, and the CUDA
// kernels against the CPU op when the build has them and a GPU is present.
// No test framework: each check prints what failed; the exit code is the number of failures.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::cout << (ok ? "PASS " : "FAIL ") << what << "\n";
  failures += ok ? 0 : 1;
}

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& kvn,
                                                 const at::Tensor& kvi, const OptTensor& fkvn,
                                                 const OptTensor& fkvi, int64_t block_q,
                                                 int64_t block_k, int64_t left, int64_t right,
                                                 double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrkernels::block_sparse_attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           int64_t, int64_t, int64_t, int64_t, double)>();
  return op.call(q, k, v, kvn, kvi, fkvn, fkvi, block_q, block_k, left, right, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kvn, const at::Tensor& kvi,
    const OptTensor& fkvn, const OptTensor& fkvi, const at::Tensor& qn, const at::Tensor& qi,
    const OptTensor& fqn, const OptTensor& fqi, int64_t block_q, int64_t block_k, int64_t left,
    int64_t right, double scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrkernels::block_sparse_attention_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
              const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, int64_t, double)>();
  return op.call(dout, q, k, v, out, lse, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, block_q, block_k,
                 left, right, scale);
}

bool window_visible(int64_t i, int64_t j, int64_t sq, int64_t sk, int64_t left, int64_t right) {
  const int64_t d = j - i - (sk - sq);
  return (left < 0 || d >= -left) && (right < 0 || d <= right);
}

// Left-packed int32 lists (1, 1, rows, max(1, longest)) from per-row block lists.
std::pair<at::Tensor, at::Tensor> pack(const std::vector<std::vector<int32_t>>& rows) {
  size_t width = 1;
  for (const auto& r : rows) width = std::max(width, r.size());
  const int64_t n = static_cast<int64_t>(rows.size());
  at::Tensor counts = at::zeros({1, 1, n}, at::kInt);
  at::Tensor indices = at::zeros({1, 1, n, static_cast<int64_t>(width)}, at::kInt);
  for (int64_t r = 0; r < n; ++r) {
    counts[0][0][r] = static_cast<int64_t>(rows[r].size());
    for (size_t t = 0; t < rows[r].size(); ++t) {
      indices[0][0][r][static_cast<int64_t>(t)] = rows[r][t];
    }
  }
  return {counts, indices};
}

// The layout of a window: blocks wholly visible are full, blocks partly visible are partial;
// with the transposed lists.
struct Layout {
  at::Tensor kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi;
};

Layout window_layout(int64_t sq, int64_t sk, int64_t bq, int64_t bk, int64_t left, int64_t right) {
  const int64_t nqb = (sq + bq - 1) / bq;
  const int64_t nkb = (sk + bk - 1) / bk;
  std::vector<std::vector<int32_t>> part(nqb), full(nqb), part_t(nkb), full_t(nkb);
  for (int64_t r = 0; r < nqb; ++r) {
    for (int64_t c = 0; c < nkb; ++c) {
      bool any = false, all = true;
      for (int64_t i = r * bq; i < std::min((r + 1) * bq, sq); ++i) {
        for (int64_t j = c * bk; j < std::min((c + 1) * bk, sk); ++j) {
          const bool vis = window_visible(i, j, sq, sk, left, right);
          any = any || vis;
          all = all && vis;
        }
      }
      if (all) {
        full[r].push_back(static_cast<int32_t>(c));
        full_t[c].push_back(static_cast<int32_t>(r));
      } else if (any) {
        part[r].push_back(static_cast<int32_t>(c));
        part_t[c].push_back(static_cast<int32_t>(r));
      }
    }
  }
  Layout l;
  std::tie(l.kvn, l.kvi) = pack(part);
  std::tie(l.fkvn, l.fkvi) = pack(full);
  std::tie(l.qn, l.qi) = pack(part_t);
  std::tie(l.fqn, l.fqi) = pack(full_t);
  return l;
}

// Dense masked softmax attention in the inputs' dtype: out, lse (-inf and out 0 where a row
// sees nothing).
std::pair<at::Tensor, at::Tensor> dense_reference(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, int64_t left, int64_t right,
                                                  double scale) {
  const int64_t sq = q.size(2), sk = k.size(2), group = q.size(1) / k.size(1);
  const at::Tensor i = at::arange(sq).unsqueeze(1);
  const at::Tensor j = at::arange(sk).unsqueeze(0);
  const at::Tensor d = j - i - (sk - sq);
  at::Tensor visible = at::ones({sq, sk}, at::kBool);
  if (left >= 0) visible = visible & (d >= -left);
  if (right >= 0) visible = visible & (d <= right);
  const at::Tensor kk = k.repeat_interleave(group, 1);
  const at::Tensor vv = v.repeat_interleave(group, 1);
  const at::Tensor any = visible.any(-1, /*keepdim=*/true);
  // Rows that see nothing get a row of zeros (no NaN), zeroed after the softmax.
  const at::Tensor s = at::where(visible, at::matmul(q, kk.transpose(-1, -2)) * scale,
                                 at::where(any, -std::numeric_limits<double>::infinity(), 0.0));
  const at::Tensor lse = at::logsumexp(s, -1, /*keepdim=*/true);
  const at::Tensor out = at::matmul(at::exp(s - lse) * any, vv);
  return {out, at::where(any, lse, -std::numeric_limits<double>::infinity()).squeeze(-1)};
}

double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  const at::Tensor r = ref.detach().to(at::kDouble);
  return ((a.to(at::kDouble) - r).abs().max() / r.abs().max().clamp_min(1e-30)).item<double>();
}

// Forward and backward of one window case against the dense float64 reference.
void check_window_case(const std::string& name, int64_t B, int64_t Hq, int64_t Hkv, int64_t sq,
                       int64_t sk, int64_t D, int64_t bq, int64_t bk, int64_t left, int64_t right,
                       int64_t expected_dead_rows) {
  const Layout l = window_layout(sq, sk, bq, bk, left, right);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const at::Tensor q = at::randn({B, Hq, sq, D});
  const at::Tensor k = at::randn({B, Hkv, sk, D});
  const at::Tensor v = at::randn({B, Hkv, sk, D});
  const at::Tensor dout = at::randn({B, Hq, sq, D});

  const auto [out, lse] =
      attention_fwd(q, k, v, l.kvn, l.kvi, l.fkvn, l.fkvi, bq, bk, left, right, scale);
  expect(out.sizes() == q.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
         name + ": out (B, Hq, Sq, D) float32 contiguous");
  expect(lse.sizes() == at::IntArrayRef({B, Hq, sq}) && lse.scalar_type() == at::kFloat,
         name + ": lse (B, Hq, Sq) float32");

  at::Tensor q64 = q.to(at::kDouble).set_requires_grad(true);
  at::Tensor k64 = k.to(at::kDouble).set_requires_grad(true);
  at::Tensor v64 = v.to(at::kDouble).set_requires_grad(true);
  const auto [ref_out, ref_lse] = dense_reference(q64, k64, v64, left, right, scale);
  expect(rel_err(out, ref_out) < 1e-5, name + ": out equals the dense masked softmax");

  const at::Tensor dead = ref_lse.detach().isneginf();
  const int64_t n_dead = dead.sum().item<int64_t>();
  expect(n_dead == expected_dead_rows * B * Hq,
         name + ": " + std::to_string(expected_dead_rows) + " query rows see no key");
  const at::Tensor live = dead.logical_not();
  const double lse_err =
      n_dead == dead.numel()
          ? 0.0
          : (lse.to(at::kDouble).masked_select(live) - ref_lse.detach().masked_select(live))
                .abs()
                .max()
                .item<double>();
  expect(lse_err < 1e-5, name + ": lse equals the dense logsumexp");
  expect(lse.masked_select(dead).isneginf().all().item<bool>() &&
             out.masked_select(dead.unsqueeze(-1).expand_as(out)).eq(0).all().item<bool>(),
         name + ": rows that see no key give out 0 and lse -inf");

  const auto [dq, dk, dv] = attention_bwd(dout, q, k, v, out, lse, l.kvn, l.kvi, l.fkvn, l.fkvi,
                                          l.qn, l.qi, l.fqn, l.fqi, bq, bk, left, right, scale);
  expect(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes(),
         name + ": dq (B, Hq, Sq, D), dk/dv (B, Hkv, Sk, D)");
  const auto grads = torch::autograd::grad({ref_out}, {q64, k64, v64}, {dout.to(at::kDouble)});
  expect(
      rel_err(dq, grads[0]) < 1e-4 && rel_err(dk, grads[1]) < 1e-4 && rel_err(dv, grads[2]) < 1e-4,
      name + ": dq, dk, dv equal the dense gradients");
  expect(dq.isfinite().all().item<bool>() &&
             dq.masked_select(dead.unsqueeze(-1).expand_as(dq)).eq(0).all().item<bool>(),
         name + ": rows that see no key get dq 0, no NaN");
}

// The CUDA kernels, when this build has them and a GPU is present: float16 inputs against the
// CPU op on the same values in float32, forward and gradients (block_q 128 / block_k 64: 8-warp
// forward tiles, two backward key tiles per block; GQA; Sq != Sk).
void check_cuda_case() {
  const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lrkernels::block_sparse_attention_fwd", "");
  if (!op.hasKernelForDispatchKey(c10::DispatchKey::CUDA) || !at::hasCUDA()) {
    std::cout << "SKIP cuda kernels: not built or no GPU\n";
    return;
  }
  const int64_t sq = 300, sk = 333, D = 64, bq = 128, bk = 64, left = 150, right = 0;
  const Layout l = window_layout(sq, sk, bq, bk, left, right);
  const double scale = 0.125;
  const auto half = at::TensorOptions().dtype(at::kHalf).device(at::kCUDA);
  const at::Tensor q = at::randn({2, 4, sq, D}).to(half), k = at::randn({2, 2, sk, D}).to(half);
  const at::Tensor v = at::randn({2, 2, sk, D}).to(half), dout = at::randn({2, 4, sq, D}).to(half);
  auto cuda = [](const at::Tensor& t) { return t.to(at::kCUDA); };
  auto cpu = [](const at::Tensor& t) { return t.to(at::kCPU, at::kFloat); };
  const auto [out, lse] = attention_fwd(q, k, v, cuda(l.kvn), cuda(l.kvi), cuda(l.fkvn),
                                        cuda(l.fkvi), bq, bk, left, right, scale);
  const auto [ref_out, ref_lse] = attention_fwd(cpu(q), cpu(k), cpu(v), l.kvn, l.kvi, l.fkvn,
                                                l.fkvi, bq, bk, left, right, scale);
  expect(rel_err(out.cpu(), ref_out) < 2e-3 && rel_err(lse.cpu(), ref_lse) < 1e-4,
         "cuda: forward equals the CPU op");
  const auto [dq, dk, dv] =
      attention_bwd(dout, q, k, v, out, lse, cuda(l.kvn), cuda(l.kvi), cuda(l.fkvn), cuda(l.fkvi),
                    cuda(l.qn), cuda(l.qi), cuda(l.fqn), cuda(l.fqi), bq, bk, left, right, scale);
  const auto [rdq, rdk, rdv] =
      attention_bwd(cpu(dout), cpu(q), cpu(k), cpu(v), cpu(out), lse.cpu(), l.kvn, l.kvi, l.fkvn,
                    l.fkvi, l.qn, l.qi, l.fqn, l.fqi, bq, bk, left, right, scale);
  expect(rel_err(dq.cpu(), rdq) < 1e-2 && rel_err(dk.cpu(), rdk) < 1e-2 &&
             rel_err(dv.cpu(), rdv) < 1e-2,
         "cuda: gradients equal the CPU op");
  const auto again =
      attention_bwd(dout, q, k, v, out, lse, cuda(l.kvn), cuda(l.kvi), cuda(l.fkvn), cuda(l.fkvi),
                    cuda(l.qn), cuda(l.qi), cuda(l.fqn), cuda(l.fqi), bq, bk, left, right, scale);
  expect(at::equal(std::get<0>(again), dq) && at::equal(std::get<1>(again), dk) &&
             at::equal(std::get<2>(again), dv),
         "cuda: the backward is bitwise deterministic");
}

template <typename Fn>
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
  // Causal sliding window (20, 0), GQA 4 query heads on 2 kv heads, Sq != Sk, odd lengths.
  check_window_case("window (20, 0) GQA 4/2", 2, 4, 2, 45, 70, 16, 16, 16, 20, 0, 0);
  // Causal with Sq > Sk: query i sees j <= i - 15, so the first 15 rows see nothing (inside a
  // partial block shared with rows that do see keys).
  check_window_case("causal Sq 45 > Sk 30", 1, 2, 1, 45, 30, 8, 16, 8, -1, 0, 15);
  // The CPU kernel's padded tiles: D and both block sizes not multiples of 16 (packed K / V
  // tiles, partial micro-kernel row groups), a two-sided window, MQA.
  check_window_case("window (12, 3) D 40 blocks 24 x 40", 1, 3, 1, 50, 61, 40, 24, 40, 12, 3, 0);
  check_cuda_case();

  // Argument checks.
  const at::Tensor q = at::randn({1, 4, 40, 16});
  const at::Tensor k = at::randn({1, 2, 40, 16});
  const at::Tensor v = at::randn({1, 2, 40, 16});
  const Layout l = window_layout(40, 40, 16, 16, -1, 0);  // 3 query blocks, 3 key blocks
  auto fwd = [&](const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& kvn,
                 const at::Tensor& kvi) {
    return attention_fwd(qq, kk, kk, kvn, kvi, l.fkvn, l.fkvi, 16, 16, -1, 0, 0.25);
  };
  expect_error([&] { fwd(q, at::randn({1, 3, 40, 16}), l.kvn, l.kvi); },
               "block_sparse_attention: the query heads Hq = 4 must be a multiple of the kv "
               "heads Hkv = 3");
  expect_error([&] { fwd(q, k, l.kvn.to(at::kLong), l.kvi); },
               "block_sparse_attention: kv_num_blocks must be int32");
  expect_error([&] { fwd(q, k, l.kvn.narrow(2, 0, 2), l.kvi.narrow(2, 0, 2)); },
               "kv_num_blocks must have shape (Bl, Hl, 3)");
  at::Tensor bad_indices = l.kvi.clone();
  bad_indices[0][0][2][0] = 3;  // key blocks are 0, 1, 2
  expect_error([&] { fwd(q, k, l.kvn, bad_indices); },
               "kv_indices[0, 0, 2, 0] = 3 is not a key block index");
  expect_error(
      [&] {
        const auto [out, lse] = fwd(q, k, l.kvn, l.kvi);
        attention_bwd(out, q, k, k, out, lse.to(at::kDouble), l.kvn, l.kvi, l.fkvn, l.fkvi, l.qn,
                      l.qi, l.fqn, l.fqi, 16, 16, -1, 0, 0.25);
      },
      "block_sparse_attention: lse must be float32");

  // The shared checks are callable directly (the CUDA launchers run the same ones); this also
  // keeps the test linked against the library whose loading registers the ops.
  expect_error(
      [&] {
        lrkernels::check_block_sparse_attention_args(q, k, v, l.kvn, l.kvi, l.fkvn, std::nullopt,
                                                     16, 16, -1, 0);
      },
      "full_kv_num_blocks and full_kv_indices must be given together");
  expect_error(
      [&] {
        lrkernels::check_block_sparse_attention_args(q, k, v, l.kvn, l.kvi, std::nullopt,
                                                     std::nullopt, 16, 16, -2, 0);
      },
      "block_sparse_attention: window_left must be >= -1");

  std::cout << (failures == 0 ? "all C++ tests passed" : "C++ tests FAILED") << "\n";
  return failures;
}
