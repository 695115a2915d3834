// Host entry of the block-sparse attention backward (attention_kernels.cuh): argument checks,
// the workspace layout, the prep kernel and the dispatch over (dtype, head_dim) to the main
// kernel of attention_bwd.cuh, whose instantiations live in attention_bwd_f16.cu /
// attention_bwd_bf16.cu.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "attention_bwd.cuh"
#include "attention_kernels.cuh"
#include "common/util.cuh"

namespace lrkernels {
namespace cuda {
namespace attn {

#define LRK_ATTN_BWD_DECLARE(T, D) \
  extern template cudaError_t launch_bwd<T, D>(const BwdParams<T>&, int64_t, cudaStream_t);
LRK_ATTN_BWD_DECLARE(__half, 32)
LRK_ATTN_BWD_DECLARE(__half, 64)
LRK_ATTN_BWD_DECLARE(__half, 96)
LRK_ATTN_BWD_DECLARE(__half, 128)
LRK_ATTN_BWD_DECLARE(__nv_bfloat16, 32)
LRK_ATTN_BWD_DECLARE(__nv_bfloat16, 64)
LRK_ATTN_BWD_DECLARE(__nv_bfloat16, 96)
LRK_ATTN_BWD_DECLARE(__nv_bfloat16, 128)
#undef LRK_ATTN_BWD_DECLARE

namespace {

// The workspace: lse2 and Δ (B, Hq, sq_pad) float32, the dQ running sums (B, Hq, Sq, D)
// float32, the turn counters (B, Hq, n_qtiles) and the ticket, each at a 256-byte boundary.
struct Workspace {
  size_t lse2, delta, dq_acc, turn, ticket, total;
};
constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }
Workspace workspace_layout(const AttnShape& s) {
  const size_t bh = static_cast<size_t>(s.B) * static_cast<size_t>(s.Hq);
  const size_t n_qtiles = static_cast<size_t>(util::ceil_div(s.Sq, kBwdTile));
  const size_t sq_pad = n_qtiles * kBwdTile;
  Workspace w{};
  w.lse2 = 0;
  w.delta = w.lse2 + align256(bh * sq_pad * 4);
  w.dq_acc = w.delta + align256(bh * sq_pad * 4);
  w.turn = w.dq_acc + align256(bh * static_cast<size_t>(s.Sq) * static_cast<size_t>(s.D) * 4);
  w.ticket = w.turn + align256(bh * n_qtiles * 4);
  w.total = w.ticket + 256;
  return w;
}

bool rows_aligned16(const void* base, const AttnStrides& s) {
  return util::is_aligned16(base) && s.batch % 8 == 0 && s.head % 8 == 0 && s.seq % 8 == 0;
}

template <typename T>
cudaError_t launch_typed(const AttnBwdArgs& a, cudaStream_t stream) {
  const AttnShape& s = a.shape;
  const Workspace w = workspace_layout(s);
  unsigned char* ws = static_cast<unsigned char*>(a.workspace);
  BwdParams<T> p;
  p.q = static_cast<const T*>(a.q);
  p.k = static_cast<const T*>(a.k);
  p.v = static_cast<const T*>(a.v);
  p.out = static_cast<const T*>(a.out);
  p.dout = static_cast<const T*>(a.dout);
  p.lse = a.lse;
  p.lse2 = reinterpret_cast<float*>(ws + w.lse2);
  p.delta = reinterpret_cast<float*>(ws + w.delta);
  p.dq_acc = reinterpret_cast<float*>(ws + w.dq_acc);
  p.turn = reinterpret_cast<int*>(ws + w.turn);
  p.ticket = reinterpret_cast<int*>(ws + w.ticket);
  p.dq = static_cast<T*>(a.dq);
  p.dk = static_cast<T*>(a.dk);
  p.dv = static_cast<T*>(a.dv);
  p.qs = a.q_strides;
  p.ks = a.k_strides;
  p.vs = a.v_strides;
  p.kv = a.kv;
  p.ql = a.q_blocks;
  // Window sides beyond Sq + Sk mask nothing more than Sq + Sk does.
  auto clamp_side = [&](int64_t w) {
    return static_cast<int>(w < 0 ? -1 : (w > s.Sq + s.Sk ? s.Sq + s.Sk : w));
  };
  p.Hq = static_cast<int>(s.Hq);
  p.Hkv = static_cast<int>(s.Hkv);
  p.Sq = static_cast<int>(s.Sq);
  p.Sk = static_cast<int>(s.Sk);
  p.group = static_cast<int>(s.Hq / s.Hkv);
  p.block_q = static_cast<int>(s.block_q);
  p.block_k = static_cast<int>(s.block_k);
  p.n_qblocks = static_cast<int>(util::ceil_div(s.Sq, s.block_q));
  p.n_kblocks = static_cast<int>(util::ceil_div(s.Sk, s.block_k));
  p.n_qtiles = static_cast<int>(util::ceil_div(s.Sq, kBwdTile));
  p.n_ktiles = static_cast<int>(util::ceil_div(s.Sk, kBwdTile));
  p.sq_pad = p.n_qtiles * kBwdTile;
  p.left = clamp_side(s.window_left);
  p.right = clamp_side(s.window_right);
  p.D = static_cast<int>(s.D);
  p.scale = s.scale;
  p.scale_log2 = s.scale * kBwdLog2e;

  // 1. prep: Δ, lse2, turn counters, the ticket, dq of query tiles nobody contributes to.
  const dim3 prep_grid(static_cast<unsigned>(p.n_qtiles > 0 ? p.n_qtiles : 1),
                       static_cast<unsigned>(s.Hq), static_cast<unsigned>(s.B));
  attn_bwd_prep_kernel<T><<<prep_grid, kBwdPrepThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // 2. the gradients.
  switch (s.D) {
    case 32:
      return launch_bwd<T, 32>(p, s.B, stream);
    case 64:
      return launch_bwd<T, 64>(p, s.B, stream);
    case 96:
      return launch_bwd<T, 96>(p, s.B, stream);
    case 128:
      return launch_bwd<T, 128>(p, s.B, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace attn

size_t attention_bwd_workspace_bytes(const AttnShape& shape) {
  if (shape.B <= 0 || shape.Hq <= 0 || (shape.Sq <= 0 && shape.Sk <= 0)) return 0;
  return attn::workspace_layout(shape).total;
}

cudaError_t launch_block_sparse_attention_bwd(const AttnBwdArgs& args, cudaStream_t stream) {
  const AttnShape& s = args.shape;
  if (s.B < 0 || s.Hq < 0 || s.Hkv < 1 || s.Sq < 0 || s.Sk < 0 || s.Hq % s.Hkv != 0 ||
      !attention_head_dim_supported(s.D) || (s.block_q != 64 && s.block_q != 128) ||
      (s.block_k != 64 && s.block_k != 128) || s.window_left < -1 || s.window_right < -1) {
    return cudaErrorInvalidValue;
  }
  if (s.B == 0 || s.Hq == 0 || (s.Sq == 0 && s.Sk == 0)) return cudaSuccess;
  // Grid limits; 32-bit index arithmetic within a head (attention_bwd.cuh).
  if (s.B > 65535 || s.Hq > 65535 || s.Sq >= (int64_t{1} << 30) || s.Sk >= (int64_t{1} << 30) ||
      util::ceil_div(s.Sk, attn::kBwdTile) * s.Hkv * s.B > 0x7fffffff) {
    return cudaErrorInvalidConfiguration;
  }
  // Empty tensors may have null data: only the sides with rows must be present. The kernels
  // copy rows with 16-byte cp.async / vector loads and store pairs of elements.
  const BlockList& kv = args.kv;
  const BlockList& ql = args.q_blocks;
  auto list_ok = [](const BlockList& l, int64_t rows) {
    return l.counts != nullptr && l.max_blocks >= 0 &&
           (l.indices != nullptr || l.max_blocks == 0) &&
           (l.full_counts == nullptr ||
            (l.max_full_blocks >= 0 && (l.full_indices != nullptr || l.max_full_blocks == 0))) &&
           l.n_row_blocks >= rows && l.batch_stride >= 0 && l.head_stride >= 0;
  };
  if (args.workspace == nullptr || (reinterpret_cast<uintptr_t>(args.workspace) & 255u) != 0 ||
      (s.Sq > 0 &&
       (args.q == nullptr || args.out == nullptr || args.dout == nullptr || args.lse == nullptr ||
        args.dq == nullptr || !list_ok(kv, util::ceil_div(s.Sq, s.block_q)) ||
        !attn::rows_aligned16(args.q, args.q_strides) || !util::is_aligned16(args.out) ||
        !util::is_aligned16(args.dout) || !util::is_aligned16(args.dq) ||
        (reinterpret_cast<uintptr_t>(args.lse) & 3u) != 0)) ||
      (s.Sk > 0 && (args.k == nullptr || args.v == nullptr || args.dk == nullptr ||
                    args.dv == nullptr || !list_ok(ql, util::ceil_div(s.Sk, s.block_k)) ||
                    !attn::rows_aligned16(args.k, args.k_strides) ||
                    !attn::rows_aligned16(args.v, args.v_strides) || !util::is_aligned16(args.dk) ||
                    !util::is_aligned16(args.dv)))) {
    return cudaErrorInvalidValue;
  }
  switch (s.dtype) {
    case AttnDType::kFloat16:
      return attn::launch_typed<__half>(args, stream);
    case AttnDType::kBFloat16:
      return attn::launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
