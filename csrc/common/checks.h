// Argument checks shared by the CPU and CUDA implementations of every op, so that the CPU
// tests in CI exercise exactly the checks the GPU path runs. Every check names the argument
// and what was expected, and runs before any kernel launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <optional>
#include <utility>

namespace lrkernels {

// lowrank_linear(x, U, V, bias): x (..., in), V (rank, in), U (out, rank), bias (out,) or None.
// Checks: floating dtypes (float64/float32/float16/bfloat16; a backend may take fewer), all tensors
// share x's dtype and device, x has at least one dimension, V and U are 2-D with matching rank
// (rank >= 1), in matches, bias is 1-D of size out.
void check_lowrank_linear_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias);

// int8_linear(x, qweight, scales, bias): x (..., K) float, qweight int8 (N, K) 2-D, scales in x's
// dtype of shape (N,) (per output channel) or (N, K / group) with group in {32, 64, 128} dividing
// K, bias (N,) or None, all on x's device. Returns the group size (0 for per-channel).
int64_t check_int8_linear_args(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& bias);

// int8_linear_grad_input(dy, qweight, scales): dy (..., N), the rest as above. Returns the group
// size (0 for per-channel).
int64_t check_int8_grad_input_args(const at::Tensor& dy, const at::Tensor& qweight,
                                   const at::Tensor& scales);

// The packed-weight (layout 2, lrkernels/quant.py) forms of the two int8 ops: qweight int8
// (ceil(N / 32), K / 16, 512) with K = 16 * qweight.size(1); scales (N,) or (N, K / group) in the
// activation's dtype (any strides) give N. int8_linear_packed: x (..., K), bias (N,) or None;
// int8_linear_packed_grad_input: dy (..., N). Returns the group size (0 per channel).
int64_t check_int8_packed_linear_args(const at::Tensor& x, const at::Tensor& qweight,
                                      const at::Tensor& scales,
                                      const std::optional<at::Tensor>& bias);
int64_t check_int8_packed_grad_input_args(const at::Tensor& dy, const at::Tensor& qweight,
                                          const at::Tensor& scales);
// int8_dequantize_packed(qweight, scales): the pair as above (scales float32/16/bf16).
int64_t check_int8_dequantize_packed_args(const at::Tensor& qweight, const at::Tensor& scales);

// block_sparse_attention_fwd (docs/attention.md): q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) with
// Hq % Hkv == 0, one float dtype, one device (any strides); the layout tensors int32 on q's
// device: kv_num_blocks (Bl, Hl, ceil(Sq / block_q)) with Bl in {1, B}, Hl in {1, Hq},
// kv_indices (Bl, Hl, NQB, MAXB), the optional full lists likewise (both or neither);
// block_q, block_k >= 1; window_left, window_right >= -1. Counts and indices are range-checked
// by the kernels' callers in Python (a device sync here would stall every launch).
void check_block_sparse_attention_args(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& kv_num_blocks,
                                       const at::Tensor& kv_indices,
                                       const std::optional<at::Tensor>& full_kv_num_blocks,
                                       const std::optional<at::Tensor>& full_kv_indices,
                                       int64_t block_q, int64_t block_k, int64_t window_left,
                                       int64_t window_right);

// block_sparse_attention_bwd: the forward's checks, plus dout and out shaped like q, lse float32
// (B, Hq, Sq), and the transposed layout: q_num_blocks (Bl, Hl, ceil(Sk / block_k)), q_indices
// (Bl, Hl, NKB, MAXQ), optional full lists likewise.
void check_block_sparse_attention_bwd_args(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const at::Tensor& q_num_blocks,
    const at::Tensor& q_indices, const std::optional<at::Tensor>& full_q_num_blocks,
    const std::optional<at::Tensor>& full_q_indices, int64_t block_q, int64_t block_k,
    int64_t window_left, int64_t window_right);

// LoRA (lora_linear and friends). The base: weight (out, in) in x's dtype when weight_scales is
// None (dense), else int8 with weight_scales as for int8_linear (layout 1) or int8_linear_packed
// (a 3-D weight: layout 2; the cuda backend reads it, the cpu backend wants layout 1). A (r, in)
// and B (out, r) in x's dtype with r >= 1; bias (out,); dropout_threshold in [0, 65535] and, when >
// 0, seed a one-element int64 tensor on x's device. Every tensor on x's device. Returns the base's
// group size: -1 dense, 0 int8 per channel, else the int8 group size. int8_path of the LoRA ops: 0
// (the default rule), 1 (kernel) or 2 (dequantize + cuBLAS).
void check_lora_int8_path(const char* op, int64_t int8_path);

// (out_features, in_features) of a checked LoRA base, either layout.
std::pair<int64_t, int64_t> lora_base_shape(const at::Tensor& weight,
                                            const std::optional<at::Tensor>& weight_scales);

int64_t check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& weight_scales, const at::Tensor& A,
                               const at::Tensor& B, const std::optional<at::Tensor>& bias,
                               int64_t dropout_threshold, const std::optional<at::Tensor>& seed);

// lora_linear_grad_input(dy, weight, weight_scales, dt, A, threshold, seed): dy (..., out), dt
// (M, r) with M = dy.numel() / out, A (r, in), the base and the dropout as above.
int64_t check_lora_grad_input_args(const at::Tensor& dy, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& weight_scales,
                                   const at::Tensor& dt, const at::Tensor& A,
                                   int64_t dropout_threshold,
                                   const std::optional<at::Tensor>& seed);

// lora_linear_grad_A(dt, x, threshold, seed): dt (M, r) in x's dtype, x (..., in) with M rows.
void check_lora_grad_A_args(const at::Tensor& dt, const at::Tensor& x, int64_t dropout_threshold,
                            const at::Tensor& seed);

// lora_linear_multi: A (n, r_max, in), B (n, out, r_max) in x's dtype (n, r_max >= 1),
// adapter_index int32 with x's leading shape, ranks int32 (n,), adapter_scales float32 (n,), the
// base and bias as above. Index and rank values are checked by the CPU kernel (eagerly) and, on
// the GPU, only on request (a value check there would need a device-to-host sync).
int64_t check_lora_multi_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& weight_scales, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& adapter_index,
                              const at::Tensor& ranks, const at::Tensor& adapter_scales,
                              const std::optional<at::Tensor>& bias);

}  // namespace lrkernels
