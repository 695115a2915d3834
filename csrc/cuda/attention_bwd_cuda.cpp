// CUDA implementation of lrkernels::block_sparse_attention_bwd (docs/attention.md): the
// gradients dq, dk, dv of block-sparse softmax attention, recomputing the softmax from the
// forward's lse. Torch-side glue only (host compiler, no device code): argument checks, the
// CUDA kernels' limits, device guard, alignment / contiguity (copies where needed), workspace,
// allocation, stream. The kernels are behind the torch-free API of attention_kernels.cuh
// (attention_bwd.cu).

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
#include "attention_launch.h"
#include "launch_utils.h"

namespace lrkernels {
namespace {

constexpr const char* kOp = "block_sparse_attention_bwd (cuda backend)";

using attention_launch::block_list;
using attention_launch::contiguous_aligned;
using attention_launch::strides_of;
using attention_launch::with_aligned_rows;
using cuda_launch::poison_output;

int compute_capability_major(int device) { return cuda_launch::device_info(device).cc_major; }

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
  // Grid limits (batch and heads are grid dimensions) and the kernels' 32-bit indices within a
  // head.
  TORCH_CHECK(B <= 65535, kOp, ": the batch size (q.size(0)) must be at most 65535, got ", B);
  TORCH_CHECK(Hq <= 65535, kOp,
              ": the number of query heads (q.size(1)) must be at most 65535, got ", Hq);
  TORCH_CHECK(Sq < (int64_t{1} << 30) && Sk < (int64_t{1} << 30), kOp,
              ": sequence lengths must be below 2^30, got Sq = ", Sq, ", Sk = ", Sk);

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

  const at::Tensor q_c = with_aligned_rows(q);
  const at::Tensor k_c = with_aligned_rows(k);
  const at::Tensor v_c = with_aligned_rows(v);
  const at::Tensor dout_c = contiguous_aligned(dout);
  const at::Tensor out_c = contiguous_aligned(out);
  const at::Tensor lse_c = lse.contiguous();

  at::Tensor keep_kv[4];
  at::Tensor keep_q[4];
  cuda::AttnBwdArgs args{};
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
  // Workspace (lse2, Δ, dQ running sums, counters; attention_bwd.cu): freeing it when this
  // function returns is safe, the caching allocator is stream-ordered. Its blocks are 512-byte
  // aligned (the kernels need 256).
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(cuda::attention_bwd_workspace_bytes(args.shape))},
                q.options().dtype(at::kByte));
  args.workspace = workspace.data_ptr();
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
