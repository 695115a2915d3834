// C++ CPU implementation of block-sparse attention (semantics: docs/attention.md):
//   block_sparse_attention_fwd -> out, lse
//   block_sparse_attention_bwd -> dq, dk, dv
//
// Blockwise kernels (attention_cpu_kernels.h, compiled for the baseline ISA and for AVX2 + FMA,
// picked at run time): the forward runs one task per (batch, head, query block) in parallel
// (at::parallel_for): it packs the query rows once, then for every listed key block (full
// blocks first, then partial ones) packs Kᵀ and V into small float tiles, computes the score
// tile with a register-blocked micro-kernel, applies the window mask to partial blocks only,
// and folds the tile into an online softmax (running max and sum per row) and the output
// accumulator. Nothing larger than a (block_q x block_k) tile is ever formed, and no ATen op
// runs per block.
//
// Same numerics as the GPU kernels: products accumulate in float32 (float64 for float64 inputs,
// which keep float64 throughout, the softmax statistics included; lse is then stored as float32
// as the schema says). Softmax in base 2 with scale·log2(e) folded into the scores. For
// float16/bfloat16, the operands that the tensor-core kernels feed to a second matmul are
// rounded to the input dtype first: the unnormalized probabilities exp(S - running max) before
// P·V in the forward (the row sum and the final division stay in float32), and P before
// dV = Pᵀ·dO and dS before dQ = dS·K / dK = dSᵀ·Q in the backward.
//
// A query row with no visible key gets out = 0 and lse = -inf; in the backward such a row
// (lse = -inf) contributes nothing. The backward recomputes P = exp(scale·QKᵀ - lse) from the
// saved lse in one pass per (batch, query head) task over the forward lists (five products per
// block pair): dq of each query block is written once, and the head's dk/dv are accumulated in
// a fixed order (query blocks ascending, listed blocks in list order) — directly into dk/dv when
// Hq == Hkv, else into per-head float buffers that are then summed over the group in head
// order. Nothing depends on the thread count, so the result is deterministic. The transposed
// lists are not needed for that; they are validated (shapes, ranges, and that they are the
// transpose of the forward lists), so that a layout the GPU backward would misread is rejected
// here as well.
//
// The layout values are read on the CPU and range-checked: counts in [0, MAX], indices in
// [0, number of column blocks), no block listed twice for one row (partial and full together).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/checks.h"

namespace lrkernels {
namespace {

constexpr const char* kOp = "block_sparse_attention: ";

int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }

// One CSR-like block list with its optional full counterpart, read on the CPU. Rows are query
// blocks (forward lists) or key blocks (transposed lists); the layout may broadcast over batch
// (Bl == 1) and head (Hl == 1).
struct BlockLists {
  const char* counts_name;
  const char* indices_name;
  const char* full_counts_name;
  const char* full_indices_name;
  at::Tensor counts, indices, full_counts, full_indices;  // contiguous; full_* undefined: none
  int64_t Bl = 0, Hl = 0, n_rows = 0, max_blocks = 0, max_full_blocks = 0;

  BlockLists(const char* cn, const char* in, const char* fcn, const char* fin, const at::Tensor& c,
             const at::Tensor& i, const std::optional<at::Tensor>& fc,
             const std::optional<at::Tensor>& fi)
      : counts_name(cn), indices_name(in), full_counts_name(fcn), full_indices_name(fin) {
    counts = c.contiguous();
    indices = i.contiguous();
    Bl = counts.size(0);
    Hl = counts.size(1);
    n_rows = counts.size(2);
    max_blocks = indices.size(3);
    if (fc.has_value()) {
      full_counts = fc->contiguous();
      full_indices = fi->contiguous();
      max_full_blocks = full_indices.size(3);
    }
  }

  bool has_full() const { return full_counts.defined(); }

  // Flat row offset of (layout batch lb, layout head lh, row).
  int64_t row_offset(int64_t lb, int64_t lh, int64_t row) const {
    return (lb * Hl + lh) * n_rows + row;
  }
  // Row of batch b / query head h, resolving the broadcast.
  int64_t row_of(int64_t b, int64_t h, int64_t row) const {
    return row_offset(Bl == 1 ? 0 : b, Hl == 1 ? 0 : h, row);
  }

  int64_t count(int64_t off) const { return counts.const_data_ptr<int32_t>()[off]; }
  const int32_t* list(int64_t off) const {
    return indices.const_data_ptr<int32_t>() + off * max_blocks;
  }
  int64_t full_count(int64_t off) const {
    return has_full() ? full_counts.const_data_ptr<int32_t>()[off] : 0;
  }
  const int32_t* full_list(int64_t off) const {
    return has_full() ? full_indices.const_data_ptr<int32_t>() + off * max_full_blocks : nullptr;
  }

  // Checks every count and listed index: counts in [0, MAX], indices in [0, n_cols), and no
  // column block listed twice in one row (partial and full lists together, which the contract
  // says are disjoint). `cols` describes n_cols, e.g. "key block index in [0, ceil(Sk / block_k))".
  void validate(int64_t n_cols, const char* cols) const {
    std::vector<int64_t> seen(static_cast<size_t>(n_cols), -1);  // row offset that listed it
    for (int64_t lb = 0; lb < Bl; ++lb) {
      for (int64_t lh = 0; lh < Hl; ++lh) {
        for (int64_t r = 0; r < n_rows; ++r) {
          const int64_t off = row_offset(lb, lh, r);
          for (int pass = 0; pass < 2; ++pass) {
            const bool full = pass == 1;
            if (full && !has_full()) {
              continue;
            }
            const char* cname = full ? full_counts_name : counts_name;
            const char* iname = full ? full_indices_name : indices_name;
            const int64_t maxb = full ? max_full_blocks : max_blocks;
            const int64_t n = full ? full_count(off) : count(off);
            TORCH_CHECK(n >= 0 && n <= maxb, kOp, cname, "[", lb, ", ", lh, ", ", r, "] = ", n,
                        " must be in [0, ", maxb, "] (the last dimension of ", iname, ")");
            const int32_t* idx = full ? full_list(off) : list(off);
            for (int64_t t = 0; t < n; ++t) {
              const int64_t c = idx[t];
              TORCH_CHECK(c >= 0 && c < n_cols, kOp, iname, "[", lb, ", ", lh, ", ", r, ", ", t,
                          "] = ", c, " is not a ", cols, " = [0, ", n_cols, ")");
              TORCH_CHECK(seen[c] != off, kOp, iname, "[", lb, ", ", lh, ", ", r, ", ", t,
                          "] = ", c, " is listed twice for that row (", counts_name, " and ",
                          full_counts_name,
                          " lists must hold distinct blocks, partial and full disjoint)");
              seen[c] = off;
            }
          }
        }
      }
    }
  }
};

// Checks that `tr` (per key block: query blocks) is the transpose of `fwd` (per query block: key
// blocks), the partial lists and the full lists separately, for every (batch, head) either
// distinguishes. Both must have been validated.
void check_transpose(const BlockLists& fwd, const BlockLists& tr) {
  const int64_t n_kb = tr.n_rows;
  const int64_t nb = std::max(fwd.Bl, tr.Bl);
  const int64_t nh = std::max(fwd.Hl, tr.Hl);
  std::vector<int64_t> a, b;
  for (int64_t lb = 0; lb < nb; ++lb) {
    for (int64_t lh = 0; lh < nh; ++lh) {
      for (int pass = 0; pass < 2; ++pass) {
        const bool full = pass == 1;
        if (full && !fwd.has_full()) {
          continue;  // the shared check made the transposed full lists absent too
        }
        a.clear();
        b.clear();
        for (int64_t qb = 0; qb < fwd.n_rows; ++qb) {
          const int64_t off = fwd.row_of(lb, lh, qb);
          const int64_t n = full ? fwd.full_count(off) : fwd.count(off);
          const int32_t* idx = full ? fwd.full_list(off) : fwd.list(off);
          for (int64_t t = 0; t < n; ++t) {
            a.push_back(qb * n_kb + idx[t]);
          }
        }
        for (int64_t kb = 0; kb < n_kb; ++kb) {
          const int64_t off = tr.row_of(lb, lh, kb);
          const int64_t n = full ? tr.full_count(off) : tr.count(off);
          const int32_t* idx = full ? tr.full_list(off) : tr.list(off);
          for (int64_t t = 0; t < n; ++t) {
            b.push_back(static_cast<int64_t>(idx[t]) * n_kb + kb);
          }
        }
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        if (a == b) {
          continue;
        }
        // Name one (query block, key block) pair in one list but not the other.
        std::vector<int64_t> diff;
        std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(),
                                      std::back_inserter(diff));
        const int64_t pair = diff.empty() ? 0 : diff.front();
        const bool in_fwd = std::binary_search(a.begin(), a.end(), pair);
        TORCH_CHECK(false, kOp, full ? tr.full_counts_name : tr.counts_name, "/",
                    full ? tr.full_indices_name : tr.indices_name, " must be the transpose of ",
                    full ? fwd.full_counts_name : fwd.counts_name, "/",
                    full ? fwd.full_indices_name : fwd.indices_name, ": at batch ", lb, ", head ",
                    lh, " (query block ", pair / n_kb, ", key block ", pair % n_kb,
                    ") is listed only in the ", in_fwd ? "forward" : "transposed", " lists");
      }
    }
  }
}

constexpr int64_t kPad = 16;  // packed tiles: D and key counts rounded up to this
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Raw view of validated BlockLists for the kernels.
struct ListsView {
  const int32_t* counts = nullptr;
  const int32_t* indices = nullptr;
  const int32_t* full_counts = nullptr;  // nullptr: no full lists
  const int32_t* full_indices = nullptr;
  int64_t Bl = 1, Hl = 1, n_rows = 0, max_blocks = 0, max_full_blocks = 0;

  explicit ListsView(const BlockLists& l)
      : counts(l.counts.const_data_ptr<int32_t>()),
        indices(l.indices.const_data_ptr<int32_t>()),
        Bl(l.Bl),
        Hl(l.Hl),
        n_rows(l.n_rows),
        max_blocks(l.max_blocks),
        max_full_blocks(l.max_full_blocks) {
    if (l.has_full()) {
      full_counts = l.full_counts.const_data_ptr<int32_t>();
      full_indices = l.full_indices.const_data_ptr<int32_t>();
    }
  }
  int64_t row_of(int64_t b, int64_t h, int64_t row) const {
    return ((Bl == 1 ? 0 : b) * Hl + (Hl == 1 ? 0 : h)) * n_rows + row;
  }
  int64_t count(int64_t off) const { return counts[off]; }
  const int32_t* list(int64_t off) const { return indices + off * max_blocks; }
  int64_t full_count(int64_t off) const { return full_counts ? full_counts[off] : 0; }
  const int32_t* full_list(int64_t off) const {
    return full_counts ? full_indices + off * max_full_blocks : nullptr;
  }
};

// Sizes, window and lists of one call. Query i sees key j of a partial block iff
// (!has_lo || j - i >= lo) && (!has_hi || j - i <= hi), lo = Sk - Sq - left, hi = Sk - Sq + right.
struct AttnProblem {
  int64_t B, Hq, Hkv, Sq, Sk, D, Dp, group, block_q, block_k, n_qb, n_kb;
  int64_t block_k_max;  // keys of the largest key block: min(block_k, Sk)
  int64_t lo = 0, hi = 0;
  bool has_lo = false, has_hi = false;
  double scale;
  ListsView kv;

  AttnProblem(const at::Tensor& q, const at::Tensor& k, int64_t bq, int64_t bk, int64_t left,
              int64_t right, double scale_, const BlockLists& lists)
      : B(q.size(0)),
        Hq(q.size(1)),
        Hkv(k.size(1)),
        Sq(q.size(2)),
        Sk(k.size(2)),
        D(q.size(3)),
        Dp(round_up(q.size(3), kPad)),
        group(q.size(1) / k.size(1)),
        block_q(bq),
        block_k(bk),
        n_qb(ceil_div(q.size(2), bq)),
        n_kb(ceil_div(k.size(2), bk)),
        block_k_max(std::min(bk, std::max<int64_t>(k.size(2), 1))),
        scale(scale_),
        kv(lists) {
    if (left >= 0) {
      has_lo = true;
      lo = Sk - Sq - left;
    }
    if (right >= 0) {
      has_hi = true;
      hi = Sk - Sq + right;
    }
  }
};

// Element pointers and (batch, head, row) strides of the inputs; the last dimension is unit-stride.
template <typename scalar_t>
struct FwdTensors {
  const scalar_t *q, *k, *v;
  int64_t q_s[3], k_s[3], v_s[3];
  scalar_t* out;  // (B, Hq, Sq, D) contiguous
  float* lse;     // (B, Hq, Sq) contiguous
};

template <typename scalar_t, typename A>
struct BwdTensors {
  const scalar_t *dout, *q, *k, *v, *out;
  const float* lse;
  int64_t do_s[3], q_s[3], k_s[3], v_s[3], o_s[3], lse_s[3];
  scalar_t *dq, *dk, *dv;  // contiguous
  A *dk_heads, *dv_heads;  // (B, Hq, Sk, D) per-head partial sums when Hq > Hkv, else null
};

template <typename T>
void strides3(const at::Tensor& t, int64_t* s) {
  for (int d = 0; d < 3; ++d) {
    s[d] = t.stride(d);
  }
}

// LRKERNELS_POISON_OUTPUT=1 (the tests): outputs start as NaN, so an element the kernels never
// write cannot pass.
void poison(std::initializer_list<at::Tensor*> outputs) {
  static const bool enabled = [] {
    const char* value = std::getenv("LRKERNELS_POISON_OUTPUT");
    return value != nullptr && std::string(value) == "1";
  }();
  if (enabled) {
    for (at::Tensor* t : outputs) {
      t->fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }
}

// Unit last-dimension stride (the contract: others are made contiguous).
at::Tensor unit_last(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace
}  // namespace lrkernels

// ---------------------------------------------------------------- the kernels, once per ISA
// Everything the kernels call from outside is declared above; from here on only their own code
// is compiled, first for the baseline ISA, then (x86-64, GCC or clang) for AVX2 + FMA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LRK_HAVE_AVX2 1
#else
#define LRK_HAVE_AVX2 0
#endif
#if defined(__x86_64__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace lrkernels {
namespace {

#define LRK_ISA base
#define LRK_VEC_BYTES 16
#define LRK_FMA 0
#define LRK_MR 4
#include "attention_cpu_kernels.h"
#undef LRK_ISA
#undef LRK_VEC_BYTES
#undef LRK_FMA
#undef LRK_MR

#if LRK_HAVE_AVX2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define LRK_ISA avx2
#define LRK_VEC_BYTES 32
#define LRK_FMA 1
#define LRK_MR 6
#include "attention_cpu_kernels.h"
#undef LRK_ISA
#undef LRK_VEC_BYTES
#undef LRK_FMA
#undef LRK_MR
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// AVX2 + FMA when the CPU has them and ATen's CPU capability (ATEN_CPU_CAPABILITY) allows them.
bool use_avx2() {
#if LRK_HAVE_AVX2
  static const bool yes = [] {
    __builtin_cpu_init();
    const std::string cap = at::get_cpu_capability();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cap != "DEFAULT" &&
           cap != "NO AVX";
  }();
  return yes;
#else
  return false;
#endif
}

template <typename scalar_t, typename A>
void run_forward(const AttnProblem& p, const FwdTensors<scalar_t>& t) {
  const int64_t n_tasks = p.B * p.Hq * p.n_qb;
  const bool avx2 = use_avx2();
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
#if LRK_HAVE_AVX2
    if (avx2) {
      avx2::forward_tasks<scalar_t, A>(p, t, begin, end);
      return;
    }
#endif
    base::forward_tasks<scalar_t, A>(p, t, begin, end);
  });
}

template <typename scalar_t, typename A>
void run_backward(const AttnProblem& p, const BwdTensors<scalar_t, A>& t) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
#if LRK_HAVE_AVX2
    if (avx2) {
      avx2::backward_tasks<scalar_t, A>(p, t, begin, end);
      return;
    }
#endif
    base::backward_tasks<scalar_t, A>(p, t, begin, end);
  });
  if (p.group == 1) {
    return;
  }
  // dk/dv of kv head hk: the sum over its group of query heads, in head order.
  const int64_t D = p.D;
  at::parallel_for(0, p.B * p.Hkv * p.Sk, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row % p.Sk, bk = row / p.Sk;
      const int64_t b = bk / p.Hkv, hk = bk % p.Hkv;
      for (int64_t d = 0; d < D; ++d) {
        A sk = 0, sv = 0;
        for (int64_t g = 0; g < p.group; ++g) {
          const int64_t at = ((b * p.Hq + hk * p.group + g) * p.Sk + j) * D + d;
          sk += t.dk_heads[at];
          sv += t.dv_heads[at];
        }
        t.dk[row * D + d] = static_cast<scalar_t>(sk);
        t.dv[row * D + d] = static_cast<scalar_t>(sv);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, int64_t block_q, int64_t block_k,
    int64_t window_left, int64_t window_right, double scale) {
  check_block_sparse_attention_args(q_in, k_in, v_in, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                    full_kv_indices, block_q, block_k, window_left, window_right);
  TORCH_CHECK(q_in.device().is_cpu(), kOp, "(cpu backend) q must be a CPU tensor, got ",
              q_in.device());
  const BlockLists kv("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices);
  kv.validate(ceil_div(k_in.size(2), block_k), "key block index in [0, ceil(Sk / block_k))");
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const AttnProblem p(q, k, block_q, block_k, window_left, window_right, scale, kv);
  at::Tensor out = at::empty({p.B, p.Hq, p.Sq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Sq}, q.options().dtype(at::kFloat));
  poison({&out, &lse});
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());  // D >= 1: empty only when B·Hq·Sq is
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "block_sparse_attention_fwd_cpu", [&] {
        using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        FwdTensors<scalar_t> t;
        t.q = q.const_data_ptr<scalar_t>();
        t.k = k.const_data_ptr<scalar_t>();
        t.v = v.const_data_ptr<scalar_t>();
        strides3<scalar_t>(q, t.q_s);
        strides3<scalar_t>(k, t.k_s);
        strides3<scalar_t>(v, t.v_s);
        t.out = out.mutable_data_ptr<scalar_t>();
        t.lse = lse.mutable_data_ptr<float>();
        run_forward<scalar_t, A>(p, t);
      });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const at::Tensor& q_num_blocks,
    const at::Tensor& q_indices, const std::optional<at::Tensor>& full_q_num_blocks,
    const std::optional<at::Tensor>& full_q_indices, int64_t block_q, int64_t block_k,
    int64_t window_left, int64_t window_right, double scale) {
  check_block_sparse_attention_bwd_args(dout_in, q_in, k_in, v_in, out_in, lse, kv_num_blocks,
                                        kv_indices, full_kv_num_blocks, full_kv_indices,
                                        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                                        block_q, block_k, window_left, window_right);
  TORCH_CHECK(q_in.device().is_cpu(), kOp, "(cpu backend) q must be a CPU tensor, got ",
              q_in.device());
  const int64_t n_qb = ceil_div(q_in.size(2), block_q), n_kb = ceil_div(k_in.size(2), block_k);
  const BlockLists kv("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices);
  kv.validate(n_kb, "key block index in [0, ceil(Sk / block_k))");
  const BlockLists qt("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
                      q_num_blocks, q_indices, full_q_num_blocks, full_q_indices);
  qt.validate(n_qb, "query block index in [0, ceil(Sq / block_q))");
  check_transpose(kv, qt);

  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor dout = unit_last(dout_in), out = unit_last(out_in);
  const AttnProblem p(q, k, block_q, block_k, window_left, window_right, scale, kv);
  at::Tensor dq = at::empty({p.B, p.Hq, p.Sq, p.D}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Sk, p.D}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Sk, p.D}, q.options());
  poison({&dq, &dk, &dv});
  if (dq.numel() == 0 || dk.numel() == 0) {  // no query or no key: every gradient is 0
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "block_sparse_attention_bwd_cpu", [&] {
        using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        at::Tensor dk_heads, dv_heads;
        BwdTensors<scalar_t, A> t;
        t.dout = dout.const_data_ptr<scalar_t>();
        t.q = q.const_data_ptr<scalar_t>();
        t.k = k.const_data_ptr<scalar_t>();
        t.v = v.const_data_ptr<scalar_t>();
        t.out = out.const_data_ptr<scalar_t>();
        t.lse = lse.const_data_ptr<float>();
        strides3<scalar_t>(dout, t.do_s);
        strides3<scalar_t>(q, t.q_s);
        strides3<scalar_t>(k, t.k_s);
        strides3<scalar_t>(v, t.v_s);
        strides3<scalar_t>(out, t.o_s);
        strides3<float>(lse, t.lse_s);
        t.dq = dq.mutable_data_ptr<scalar_t>();
        t.dk = dk.mutable_data_ptr<scalar_t>();
        t.dv = dv.mutable_data_ptr<scalar_t>();
        t.dk_heads = t.dv_heads = nullptr;
        if (p.group > 1) {
          const auto opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);
          dk_heads = at::empty({p.B, p.Hq, p.Sk, p.D}, opts);
          dv_heads = at::empty({p.B, p.Hq, p.Sk, p.D}, opts);
          t.dk_heads = dk_heads.mutable_data_ptr<A>();
          t.dv_heads = dv_heads.mutable_data_ptr<A>();
        }
        run_backward<scalar_t, A>(p, t);
      });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("block_sparse_attention_fwd", &block_sparse_attention_fwd_cpu);
  m.impl("block_sparse_attention_bwd", &block_sparse_attention_bwd_cpu);
}

}  // namespace lrkernels
