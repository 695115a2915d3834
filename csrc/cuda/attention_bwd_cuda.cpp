// CUDA implementation of lrkernels::block_sparse_attention_bwd (docs/attention.md): the
// gradients dq, dk, dv of block-sparse softmax attention, recomputing the softmax from the
// forward's lse. Torch-side glue only (host compiler, no device code): argument checks, the
// CUDA kernels' limits, device guard, contiguity, allocation, stream. The kernels are behind
// the torch-free API of attention_kernels.cuh (attention_bwd.cu).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "attention_kernels.cuh"
#include "launch_utils.h"

namespace lrkernels {
namespace {

constexpr const char* kOp = "block_sparse_attention_bwd (cuda backend)";

using cuda_launch::poison_output;

int compute_capability_major(int device) { return cuda_launch::device_info(device).cc_major; }

// q / k / v keep their strides when the head dimension is contiguous (or of size 1).
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

cuda::AttnStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// A CSR-like block list from its (already checked) tensors; `keep` holds the contiguous copies
// alive until the launch has been enqueued.
cuda::BlockList block_list(const at::Tensor& counts, const at::Tensor& indices,
                           const std::optional<at::Tensor>& full_counts,
                           const std::optional<at::Tensor>& full_indices, at::Tensor (&keep)[4]) {
  keep[0] = counts.contiguous();
  keep[1] = indices.contiguous();
  const bool has_full = full_counts.has_value() && full_counts->defined() &&
                        full_indices.has_value() && full_indices->defined();
  keep[2] = has_full ? full_counts->contiguous() : at::Tensor();
  keep[3] = has_full ? full_indices->contiguous() : at::Tensor();

  const int64_t Bl = keep[0].size(0);
  const int64_t Hl = keep[0].size(1);
  const int64_t n_rows = keep[0].size(2);
  cuda::BlockList l;
  l.counts = keep[0].data_ptr<int32_t>();
  l.indices = keep[1].numel() > 0 ? keep[1].data_ptr<int32_t>() : nullptr;
  l.full_counts = has_full ? keep[2].data_ptr<int32_t>() : nullptr;
  l.full_indices = has_full && keep[3].numel() > 0 ? keep[3].data_ptr<int32_t>() : nullptr;
  l.batch_stride = Bl == 1 ? 0 : Hl * n_rows;
  l.head_stride = Hl == 1 ? 0 : n_rows;
  l.n_row_blocks = n_rows;
  l.max_blocks = keep[1].size(3);
  l.max_full_blocks = has_full ? keep[3].size(3) : 0;
  return l;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_bwd_cuda(
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

  // Limits of the CUDA kernels (the torch / cpu backends take the rest).
  const at::ScalarType st = q.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, kOp,
              ": q, k, v, out and dout must be float16 or bfloat16, got ", st,
              "; use the torch or cpu backend");
  const int64_t D = q.size(3);
  TORCH_CHECK(cuda::attention_head_dim_supported(D), kOp,
              ": the head dimension (q.size(-1)) must be 32, 64, 96 or 128, got ", D,
              "; use the triton, torch or cpu backend");
  TORCH_CHECK(block_q == 64 || block_q == 128, kOp, ": block_q must be 64 or 128, got ", block_q);
  TORCH_CHECK(block_k == 64 || block_k == 128, kOp, ": block_k must be 64 or 128, got ", block_k);
  TORCH_CHECK(q.is_cuda(), kOp, ": tensors must be on a CUDA device, got q on ", q.device());

  const int64_t B = q.size(0);
  const int64_t Hq = q.size(1);
  const int64_t Sq = q.size(2);
  const int64_t Hkv = k.size(1);
  const int64_t Sk = k.size(2);
  // Grid limits: batch and heads are grid dimensions y / z (<= 65535).
  TORCH_CHECK(B <= 65535, kOp, ": the batch size (q.size(0)) must be at most 65535, got ", B);
  TORCH_CHECK(Hq <= 65535, kOp,
              ": the number of query heads (q.size(1)) must be at most 65535, got ", Hq);

  const c10::cuda::CUDAGuard device_guard(q.device());

  // Gradients: contiguous, in the inputs' dtype.
  at::Tensor dq = at::empty({B, Hq, Sq, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, Sk, D}, k.options());
  at::Tensor dv = at::empty({B, Hkv, Sk, D}, v.options());
  if (B == 0 || Hq == 0 || Hkv == 0 || Sq == 0 || Sk == 0) {
    // No query or no key: every gradient is zero (a query that sees no key has none either).
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  if (poison_output()) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    dq.fill_(nan);
    dk.fill_(nan);
    dv.fill_(nan);
  }

  const int device = q.get_device();
  TORCH_CHECK(compute_capability_major(device) >= 8, kOp,
              ": needs a GPU of compute capability 8.0 or newer (bf16 tensor cores); use the "
              "triton or torch backend");

  const at::Tensor q_c = unit_last_stride(q);
  const at::Tensor k_c = unit_last_stride(k);
  const at::Tensor v_c = unit_last_stride(v);
  const at::Tensor dout_c = dout.contiguous();
  const at::Tensor out_c = out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  // Δ = rowsum(dO ∘ O), float32 workspace; freeing it when this function returns is safe
  // (the caching allocator is stream-ordered).
  const at::Tensor delta = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));

  at::Tensor keep_kv[4];
  at::Tensor keep_q[4];
  cuda::AttnBwdArgs args;
  args.shape.B = B;
  args.shape.Hq = Hq;
  args.shape.Hkv = Hkv;
  args.shape.Sq = Sq;
  args.shape.Sk = Sk;
  args.shape.D = D;
  args.shape.block_q = block_q;
  args.shape.block_k = block_k;
  args.shape.window_left = window_left;
  args.shape.window_right = window_right;
  args.shape.scale = static_cast<float>(scale);
  args.shape.dtype = st == at::kHalf ? cuda::AttnDType::kFloat16 : cuda::AttnDType::kBFloat16;
  args.q = q_c.data_ptr();
  args.k = k_c.data_ptr();
  args.v = v_c.data_ptr();
  args.q_strides = strides_of(q_c);
  args.k_strides = strides_of(k_c);
  args.v_strides = strides_of(v_c);
  args.out = out_c.data_ptr();
  args.dout = dout_c.data_ptr();
  args.lse = lse_c.data_ptr<float>();
  args.kv = block_list(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, keep_kv);
  args.q_blocks = block_list(q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, keep_q);
  args.delta = delta.data_ptr<float>();
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  C10_CUDA_CHECK(cuda::launch_block_sparse_attention_bwd(args, stream));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("block_sparse_attention_bwd", &block_sparse_attention_bwd_cuda);
}

}  // namespace lrkernels
