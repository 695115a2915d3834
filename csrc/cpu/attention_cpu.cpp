// C++ CPU implementation of block-sparse attention (semantics: docs/attention.md):
//   block_sparse_attention_fwd -> out, lse
//   block_sparse_attention_bwd -> dq, dk, dv
//
// Work is split per (batch, head, query block): the key blocks listed for that query block (full
// blocks first, then partial ones) are gathered into a (block_q, n_keys) score tile, the window
// mask is applied to the partial columns only, and the tile is reduced right away. Nothing of
// size Sq x Sk is ever formed.
//
// Same numerics as the GPU kernels: products accumulate in float32 (float64 for float64 inputs,
// which keep float64 throughout, the softmax statistics included; lse is then stored as float32
// as the schema says). For float16/bfloat16, the operands that the tensor-core kernels feed to a
// second matmul are rounded to the input dtype first: the unnormalized probabilities
// exp(S - rowmax) before P·V in the forward (the row sum and the final division stay in float32),
// and P before dV = Pᵀ·dO and dS before dQ = dS·K / dK = dSᵀ·Q in the backward.
//
// A query row with no visible key gets out = 0 and lse = -inf; in the backward such a row
// (lse = -inf) contributes nothing. The backward recomputes P = exp(scale·QKᵀ - lse) from the
// saved lse and walks the forward lists: dq of a query block is written once, and dk/dv are
// accumulated per (batch, kv head) in a fixed order (query heads of the group, then query
// blocks), so the result is deterministic. The transposed lists are not needed for that; they
// are validated (shapes, ranges, and that they are the transpose of the forward lists), so that
// a layout the GPU backward would misread is rejected here as well.
//
// The layout values are read on the CPU and range-checked: counts in [0, MAX], indices in
// [0, number of column blocks), no block listed twice for one row (partial and full together).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"

namespace lrkernels {
namespace {

constexpr const char* kOp = "block_sparse_attention: ";

int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }

at::ScalarType accumulation_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rounds `t` (in the accumulation type) to `dtype` and back: what storing an operand in
// float16/bfloat16 for the next matmul does. A no-op for float32/float64 inputs.
at::Tensor round_to(const at::Tensor& t, at::ScalarType dtype) {
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    return t.to(dtype).to(t.scalar_type());
  }
  return t;
}

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

// The keys one query block reads: positions of its full blocks' keys, then of its partial blocks'
// keys (the last key block may be short).
struct BlockKeys {
  at::Tensor positions;  // int64 (n_keys,)
  int64_t n_full = 0;    // leading entries from full blocks
  int64_t n_keys() const { return positions.size(0); }
};

BlockKeys gather_keys(const BlockLists& lists, int64_t off, int64_t block_k, int64_t Sk) {
  std::vector<int64_t> pos;
  auto add_blocks = [&](const int32_t* idx, int64_t n) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t k0 = static_cast<int64_t>(idx[t]) * block_k;
      const int64_t k1 = std::min(k0 + block_k, Sk);
      for (int64_t j = k0; j < k1; ++j) {
        pos.push_back(j);
      }
    }
  };
  add_blocks(lists.full_list(off), lists.full_count(off));
  BlockKeys keys;
  keys.n_full = static_cast<int64_t>(pos.size());
  add_blocks(lists.list(off), lists.count(off));
  keys.positions = at::tensor(pos, at::TensorOptions().dtype(at::kLong));
  return keys;
}

// Scores scale·Q·Kᵀ of query rows [q0, q0 + rows) against the gathered keys, with the window mask
// applied to the partial columns: key j is visible to query i iff
// i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1: unbounded on that side).
at::Tensor masked_scores(const at::Tensor& qb, const at::Tensor& ksel, const BlockKeys& keys,
                         int64_t q0, int64_t Sq, int64_t Sk, int64_t left, int64_t right,
                         double scale) {
  at::Tensor s = at::matmul(qb, ksel.t()).mul_(scale);
  const int64_t n_partial = keys.n_keys() - keys.n_full;
  if (n_partial > 0 && (left >= 0 || right >= 0)) {
    const at::Tensor i = at::arange(q0, q0 + qb.size(0), keys.positions.options()).unsqueeze(1);
    const at::Tensor j = keys.positions.narrow(0, keys.n_full, n_partial).unsqueeze(0);
    const at::Tensor rel = j - i - (Sk - Sq);  // visible iff -left <= rel <= right
    at::Tensor hidden = at::zeros({qb.size(0), n_partial}, rel.options().dtype(at::kBool));
    if (left >= 0) {
      hidden.logical_or_(rel < -left);
    }
    if (right >= 0) {
      hidden.logical_or_(rel > right);
    }
    s.narrow(1, keys.n_full, n_partial)
        .masked_fill_(hidden, -std::numeric_limits<double>::infinity());
  }
  return s;
}

struct Problem {
  int64_t B, Hq, Hkv, Sq, Sk, D, group, n_qb, n_kb;
};

Problem problem_of(const at::Tensor& q, const at::Tensor& k, int64_t block_q, int64_t block_k) {
  Problem p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Sq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Sk = k.size(2);
  p.group = p.Hq / p.Hkv;
  p.n_qb = ceil_div(p.Sq, block_q);
  p.n_kb = ceil_div(p.Sk, block_k);
  return p;
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, int64_t block_q, int64_t block_k,
    int64_t window_left, int64_t window_right, double scale) {
  check_block_sparse_attention_args(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                    full_kv_indices, block_q, block_k, window_left, window_right);
  TORCH_CHECK(q.device().is_cpu(), kOp, "(cpu backend) q must be a CPU tensor, got ", q.device());
  const Problem p = problem_of(q, k, block_q, block_k);
  const BlockLists kv("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices);
  kv.validate(p.n_kb, "key block index in [0, ceil(Sk / block_k))");

  const at::ScalarType dtype = q.scalar_type();
  const at::ScalarType acc = accumulation_type(q);
  const at::Tensor qa = q.to(acc).contiguous();
  const at::Tensor ka = k.to(acc).contiguous();
  const at::Tensor va = v.to(acc).contiguous();
  at::Tensor out = at::zeros({p.B, p.Hq, p.Sq, p.D}, qa.options());
  at::Tensor lse = at::full({p.B, p.Hq, p.Sq}, -std::numeric_limits<double>::infinity(),
                            qa.options());  // float32 at the end; rows seeing no key stay -inf

  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.Hq;
      const int64_t h = bh % p.Hq;
      const int64_t hk = h / p.group;
      const at::Tensor q_bh = qa[b][h];
      const at::Tensor k_bh = ka[b][hk];
      const at::Tensor v_bh = va[b][hk];
      for (int64_t r = 0; r < p.n_qb; ++r) {
        const BlockKeys keys = gather_keys(kv, kv.row_of(b, h, r), block_k, p.Sk);
        if (keys.n_keys() == 0) {
          continue;  // no key: out 0, lse -inf
        }
        const int64_t q0 = r * block_q;
        const int64_t rows = std::min(block_q, p.Sq - q0);
        const at::Tensor qb = q_bh.narrow(0, q0, rows);
        const at::Tensor ksel = k_bh.index_select(0, keys.positions);
        const at::Tensor vsel = v_bh.index_select(0, keys.positions);
        const at::Tensor s =
            masked_scores(qb, ksel, keys, q0, p.Sq, p.Sk, window_left, window_right, scale);
        const at::Tensor m = std::get<0>(s.max(1, /*keepdim=*/true));
        const at::Tensor dead = m.isneginf();                      // rows that see no key
        const at::Tensor e = (s - m.masked_fill(dead, 0)).exp_();  // hidden keys: exp(-inf) = 0
        const at::Tensor l = e.sum(1, /*keepdim=*/true);           // 0 on dead rows
        at::Tensor o = at::matmul(round_to(e, dtype), vsel);
        o.div_(l.masked_fill(dead, 1));  // dead rows: o is already 0
        out[b][h].narrow(0, q0, rows).copy_(o);
        lse[b][h]
            .narrow(0, q0, rows)
            .copy_((m + l.log())
                       .masked_fill_(dead, -std::numeric_limits<double>::infinity())
                       .squeeze(1));
      }
    }
  });
  return {out.to(dtype), lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const at::Tensor& q_num_blocks,
    const at::Tensor& q_indices, const std::optional<at::Tensor>& full_q_num_blocks,
    const std::optional<at::Tensor>& full_q_indices, int64_t block_q, int64_t block_k,
    int64_t window_left, int64_t window_right, double scale) {
  check_block_sparse_attention_bwd_args(dout, q, k, v, out, lse, kv_num_blocks, kv_indices,
                                        full_kv_num_blocks, full_kv_indices, q_num_blocks,
                                        q_indices, full_q_num_blocks, full_q_indices, block_q,
                                        block_k, window_left, window_right);
  TORCH_CHECK(q.device().is_cpu(), kOp, "(cpu backend) q must be a CPU tensor, got ", q.device());
  const Problem p = problem_of(q, k, block_q, block_k);
  const BlockLists kv("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices);
  kv.validate(p.n_kb, "key block index in [0, ceil(Sk / block_k))");
  const BlockLists qt("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
                      q_num_blocks, q_indices, full_q_num_blocks, full_q_indices);
  qt.validate(p.n_qb, "query block index in [0, ceil(Sq / block_q))");
  check_transpose(kv, qt);

  const at::ScalarType dtype = q.scalar_type();
  const at::ScalarType acc = accumulation_type(q);
  const at::Tensor qa = q.to(acc).contiguous();
  const at::Tensor ka = k.to(acc).contiguous();
  const at::Tensor va = v.to(acc).contiguous();
  const at::Tensor doa = dout.to(acc).contiguous();
  // delta = rowsum(dO ∘ O) (B, Hq, Sq), from out as stored (in the input dtype).
  const at::Tensor delta = (doa * out.to(acc)).sum(-1);
  // Rows with lse = -inf saw no key: +inf makes every P = exp(s - lse) of theirs 0, never NaN.
  const at::Tensor lse_a =
      lse.to(acc).masked_fill(lse.isneginf(), std::numeric_limits<double>::infinity());
  at::Tensor dq = at::zeros({p.B, p.Hq, p.Sq, p.D}, qa.options());
  at::Tensor dk = at::zeros({p.B, p.Hkv, p.Sk, p.D}, qa.options());
  at::Tensor dv = at::zeros({p.B, p.Hkv, p.Sk, p.D}, qa.options());

  // One task per (batch, kv head): it alone writes dk/dv of that head and dq of its query heads,
  // in a fixed order, so the sums do not depend on the thread count.
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / p.Hkv;
      const int64_t hk = bk % p.Hkv;
      const at::Tensor k_bh = ka[b][hk];
      const at::Tensor v_bh = va[b][hk];
      at::Tensor dk_bh = dk[b][hk];
      at::Tensor dv_bh = dv[b][hk];
      for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
        for (int64_t r = 0; r < p.n_qb; ++r) {
          const BlockKeys keys = gather_keys(kv, kv.row_of(b, h, r), block_k, p.Sk);
          if (keys.n_keys() == 0) {
            continue;
          }
          const int64_t q0 = r * block_q;
          const int64_t rows = std::min(block_q, p.Sq - q0);
          const at::Tensor qb = qa[b][h].narrow(0, q0, rows);
          const at::Tensor dob = doa[b][h].narrow(0, q0, rows);
          const at::Tensor ksel = k_bh.index_select(0, keys.positions);
          const at::Tensor vsel = v_bh.index_select(0, keys.positions);
          const at::Tensor s =
              masked_scores(qb, ksel, keys, q0, p.Sq, p.Sk, window_left, window_right, scale);
          const at::Tensor pr = (s - lse_a[b][h].narrow(0, q0, rows).unsqueeze(1)).exp_();
          const at::Tensor dp = at::matmul(dob, vsel.t());
          const at::Tensor ds =
              round_to(pr * (dp - delta[b][h].narrow(0, q0, rows).unsqueeze(1)), dtype);
          dv_bh.index_add_(0, keys.positions, at::matmul(round_to(pr, dtype).t(), dob));
          dk_bh.index_add_(0, keys.positions, at::matmul(ds.t(), qb).mul_(scale));
          dq[b][h].narrow(0, q0, rows).copy_(at::matmul(ds, ksel).mul_(scale));
        }
      }
    }
  });
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("block_sparse_attention_fwd", &block_sparse_attention_fwd_cpu);
  m.impl("block_sparse_attention_bwd", &block_sparse_attention_bwd_cpu);
}

}  // namespace lrkernels
