// Host entry of the block-sparse attention forward (attention_kernels.cuh): argument checks and
// the dispatch over (dtype, head_dim) to the kernel of attention_fwd.cuh, whose instantiations
// live in attention_fwd_f16.cu / attention_fwd_bf16.cu (two files: nvcc compiles them in
// parallel, and each stays small).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_fwd.cuh"
#include "attention_kernels.cuh"
#include "common/util.cuh"

namespace lrkernels {
namespace cuda {
namespace attn {

#define LRK_ATTN_FWD_DECLARE(T, D) \
  extern template cudaError_t launch_fwd<T, D>(const FwdParams<T>&, int64_t, int, cudaStream_t);
LRK_ATTN_FWD_DECLARE(__half, 32)
LRK_ATTN_FWD_DECLARE(__half, 64)
LRK_ATTN_FWD_DECLARE(__half, 96)
LRK_ATTN_FWD_DECLARE(__half, 128)
LRK_ATTN_FWD_DECLARE(__nv_bfloat16, 32)
LRK_ATTN_FWD_DECLARE(__nv_bfloat16, 64)
LRK_ATTN_FWD_DECLARE(__nv_bfloat16, 96)
LRK_ATTN_FWD_DECLARE(__nv_bfloat16, 128)
#undef LRK_ATTN_FWD_DECLARE

namespace {

// cp.async moves 16-byte chunks: the base and every stride must keep rows 16-byte aligned.
bool rows_aligned16(const void* base, const AttnStrides& s) {
  return util::is_aligned16(base) && s.batch % 8 == 0 && s.head % 8 == 0 && s.seq % 8 == 0;
}

template <typename T>
cudaError_t launch_typed(const AttnFwdArgs& a, cudaStream_t stream) {
  const AttnShape& s = a.shape;
  FwdParams<T> p;
  p.q = static_cast<const T*>(a.q);
  p.k = static_cast<const T*>(a.k);
  p.v = static_cast<const T*>(a.v);
  p.out = static_cast<T*>(a.out);
  p.lse = a.lse;
  p.qs = a.q_strides;
  p.ks = a.k_strides;
  p.vs = a.v_strides;
  p.kv = a.kv;
  p.Hq = s.Hq;
  p.Sq = s.Sq;
  p.Sk = s.Sk;
  p.group = s.Hq / s.Hkv;
  p.left = s.window_left;
  p.right = s.window_right;
  p.subs_per_block = static_cast<int>(s.block_k / kFwdTileK);
  p.scale_log2 = s.scale * kLog2e;
  const int bq = static_cast<int>(s.block_q);
  switch (s.D) {
    case 32:
      return launch_fwd<T, 32>(p, s.B, bq, stream);
    case 64:
      return launch_fwd<T, 64>(p, s.B, bq, stream);
    case 96:
      return launch_fwd<T, 96>(p, s.B, bq, stream);
    case 128:
      return launch_fwd<T, 128>(p, s.B, bq, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace attn

cudaError_t launch_block_sparse_attention_fwd(const AttnFwdArgs& args, cudaStream_t stream) {
  const AttnShape& s = args.shape;
  if (s.B < 0 || s.Hq < 0 || s.Hkv < 1 || s.Sq < 0 || s.Sk < 0 || s.Hq % s.Hkv != 0 ||
      !attention_head_dim_supported(s.D) || (s.block_q != 64 && s.block_q != 128) ||
      (s.block_k != 64 && s.block_k != 128) || s.window_left < -1 || s.window_right < -1) {
    return cudaErrorInvalidValue;
  }
  if (s.B == 0 || s.Hq == 0 || s.Sq == 0) return cudaSuccess;
  // Sk == 0 needs no special case: every sub-tile is skipped, out = 0 and lse = -inf.
  // Index arrays may be null only when their capacity is 0 (an empty tensor); no full counts
  // means no full blocks.
  const BlockList& kv = args.kv;
  if (args.q == nullptr || args.k == nullptr || args.v == nullptr || args.out == nullptr ||
      args.lse == nullptr || kv.counts == nullptr || kv.max_blocks < 0 ||
      (kv.indices == nullptr && kv.max_blocks > 0) ||
      (kv.full_counts != nullptr &&
       (kv.max_full_blocks < 0 || (kv.full_indices == nullptr && kv.max_full_blocks > 0))) ||
      kv.n_row_blocks < util::ceil_div(s.Sq, s.block_q) || kv.batch_stride < 0 ||
      kv.head_stride < 0) {
    return cudaErrorInvalidValue;
  }
  // The kernels copy rows with 16-byte cp.async and store out in pairs of elements.
  if (!attn::rows_aligned16(args.q, args.q_strides) ||
      !attn::rows_aligned16(args.k, args.k_strides) ||
      !attn::rows_aligned16(args.v, args.v_strides) || !util::is_aligned16(args.out) ||
      (reinterpret_cast<uintptr_t>(args.lse) & 3u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (util::ceil_div(s.Sq, s.block_q) > 0x7fffffff || s.Hq > 65535 || s.B > 65535) {
    return cudaErrorInvalidConfiguration;  // grid limits
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
