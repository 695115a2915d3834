// CUDA implementation of lrkernels::block_sparse_attention_fwd (docs/attention.md):
//   q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), the block layout -> out (B, Hq, Sq, D) in q's dtype,
//   lse (B, Hq, Sq) float32.
// Torch-side glue only (compiled by the host compiler, no device code): the shared argument
// checks, the CUDA kernel's own limits (float16 / bfloat16, D in {32, 64, 96, 128}, block sizes
// 64 / 128, compute capability >= 8.0), device guard, strides (inputs whose rows are not 16-byte
// aligned are copied), allocation, stream. The kernel is behind the torch-free API of
// attention_kernels.cuh (attention_fwd.cu).

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

constexpr const char* kOp = "block_sparse_attention (cuda): ";

using attention_launch::block_list;
using attention_launch::strides_of;
using attention_launch::with_aligned_rows;
using cuda_launch::poison_output;

int cc_major(int device) { return cuda_launch::device_info(device).cc_major; }

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, int64_t block_q, int64_t block_k,
    int64_t window_left, int64_t window_right, double scale) {
  check_block_sparse_attention_args(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                    full_kv_indices, block_q, block_k, window_left, window_right);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp,
              "q, k and v must be float16 or bfloat16 for the CUDA kernels, got ", q.scalar_type(),
              "; use the torch or cpu backend for float32");
  const int64_t D = q.size(3);
  TORCH_CHECK(cuda::attention_head_dim_supported(D), kOp, "head_dim ", D,
              " is not supported by the CUDA kernels; use the triton backend (the CUDA kernels ",
              "take head_dim 32, 64, 96 or 128)");
  TORCH_CHECK(block_q == 64 || block_q == 128, kOp, "block_q must be 64 or 128 for the CUDA ",
              "kernels, got ", block_q);
  TORCH_CHECK(block_k == 64 || block_k == 128, kOp, "block_k must be 64 or 128 for the CUDA ",
              "kernels, got ", block_k);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(B <= 65535, kOp, "the batch size B = ", B, " exceeds the CUDA grid limit 65535");
  TORCH_CHECK(Hq <= 65535, kOp, "the query head count Hq = ", Hq,
              " exceeds the CUDA grid limit 65535");

  const c10::cuda::CUDAGuard device_guard(q.device());
  const int device = q.get_device();
  TORCH_CHECK(cc_major(device) >= 8, kOp, "the CUDA kernels need compute capability 8.0 or newer ",
              "(bfloat16 tensor cores, cp.async); use the triton or torch backend on this device");

  at::Tensor out = at::empty({B, Hq, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (poison_output()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    lse.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (B == 0 || Hq == 0 || Sq == 0) return {out, lse};
  if (Sk == 0) {  // no key: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }

  const at::Tensor q_c = with_aligned_rows(q);
  const at::Tensor k_c = with_aligned_rows(k);
  const at::Tensor v_c = with_aligned_rows(v);

  cuda::AttnFwdArgs args{};
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
  args.shape.dtype =
      q.scalar_type() == at::kHalf ? cuda::AttnDType::kFloat16 : cuda::AttnDType::kBFloat16;
  args.q = q_c.data_ptr();
  args.k = k_c.data_ptr();
  args.v = v_c.data_ptr();
  args.q_strides = strides_of(q_c);
  args.k_strides = strides_of(k_c);
  args.v_strides = strides_of(v_c);
  at::Tensor keep[4];
  args.kv = block_list(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, keep);
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  C10_CUDA_CHECK(cuda::launch_block_sparse_attention_fwd(args, stream));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("block_sparse_attention_fwd", &block_sparse_attention_fwd_cuda);
}

}  // namespace lrkernels
