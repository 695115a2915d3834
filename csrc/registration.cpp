// Every op schema of the library, defined once. Implementations register per dispatch key in
// cpu/ and cuda/; fake (meta) implementations and autograd are registered from Python
// (lrkernels/ops/), where torch.library gives them to torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(lrkernels, m) {
  // y = (x · Vᵀ) · Uᵀ + bias; x (..., in), V (rank, in), U (out, rank), bias (out,) -> (..., out)
  m.def("lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor? bias=None) -> Tensor");
  // y = x · dequant(qweight, scales)ᵀ + bias; x (..., K), qweight int8 (N, K),
  // scales (N,) per output channel or (N, K / group) per group, in x's dtype -> (..., N).
  // path (CUDA only; the int8 ops all take it): 0 or 1 the fused tensor-core kernel, 2
  // dequantize + cuBLAS (lrkernels/ops/int8.py chooses).
  m.def(
      "int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None, int path=0) -> "
      "Tensor");
  // dx = dy · dequant(qweight, scales): the input gradient of int8_linear, dy (..., N) -> (..., K)
  m.def("int8_linear_grad_input(Tensor dy, Tensor qweight, Tensor scales, int path=0) -> Tensor");
  // The same two products on the packed weight (layout 2, lrkernels/quant.py): qweight int8
  // (ceil(N / 32), K / 16, 512), scales (N,) or (N, K / group) -> (..., N) / (..., K)
  m.def(
      "int8_linear_packed(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None, "
      "int path=0) -> Tensor");
  m.def(
      "int8_linear_packed_grad_input(Tensor dy, Tensor qweight, Tensor scales, int path=0) -> "
      "Tensor");
  // W (N, K) = q · s from the packed weight, in the scales' dtype (q · s in float32, one rounding)
  m.def("int8_dequantize_packed(Tensor qweight, Tensor scales) -> Tensor");
  // Block-sparse softmax attention with a window mask on partial blocks (docs/attention.md):
  // q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> out (B, Hq, Sq, D), lse (B, Hq, Sq) float32
  m.def(
      "block_sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, "
      "Tensor kv_indices, Tensor? full_kv_num_blocks, Tensor? full_kv_indices, int block_q, "
      "int block_k, int window_left, int window_right, float scale) -> (Tensor, Tensor)");
  // Its gradient, recomputing the softmax from lse: -> dq, dk, dv (dk/dv summed over GQA groups)
  m.def(
      "block_sparse_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor kv_num_blocks, Tensor kv_indices, Tensor? full_kv_num_blocks, "
      "Tensor? full_kv_indices, Tensor q_num_blocks, Tensor q_indices, "
      "Tensor? full_q_num_blocks, Tensor? full_q_indices, int block_q, int block_k, "
      "int window_left, int window_right, float scale) -> (Tensor, Tensor, Tensor)");
  // LoRA on a frozen base (lrkernels/ops/lora.py): y = x · Wᵀ + scale · (keep ⊙ x) · Aᵀ · Bᵀ + bias
  // with W = weight (out, in) dense in x's dtype, or int8 dequantized with weight_scales (as
  // int8_linear); A (r, in), B (out, r); keep = the counter-based dropout mask of (seed, row,
  // col) (lrkernels/reference.py), none when dropout_threshold == 0. Returns y (..., out) and
  // t = (keep ⊙ x) · Aᵀ as (M, r) in x's dtype (saved for the backward). int8_path: how the cuda
  // backend runs an int8 base product, as int8_linear's `path` (0: its built-in rule, 1: the
  // tensor-core kernel, the LoRA term fused into its epilogue; 2: dequantize + cuBLAS); chosen by
  // lrkernels.ops.int8.cuda_path (the measured table). A 3-D int8 weight is packed (layout 2).
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? weight_scales, Tensor A, Tensor B, "
      "Tensor? bias, float scale, int dropout_threshold=0, Tensor? seed=None, int int8_path=0) -> "
      "(Tensor, Tensor)");
  // Its input gradient: dx (..., in) = dy · W + keep ⊙ (dt · A), dy (..., out), dt (M, r).
  m.def(
      "lora_linear_grad_input(Tensor dy, Tensor weight, Tensor? weight_scales, Tensor dt, "
      "Tensor A, int dropout_threshold=0, Tensor? seed=None, int int8_path=0) -> Tensor");
  // Its A gradient: dA (r, in) = dtᵀ · (keep ⊙ x), x (..., in), dt (M, r).
  m.def("lora_linear_grad_A(Tensor dt, Tensor x, int dropout_threshold, Tensor seed) -> Tensor");
  // Multi-adapter batch (serving): y[m] = x[m] · Wᵀ + s[a] · x[m] · A[a, :r_a]ᵀ · B[a, :, :r_a]ᵀ
  // + bias, a = adapter_index[m] (int32, -1: base only); A (n, r_max, in), B (n, out, r_max),
  // ranks int32 (n,), adapter_scales float32 (n,).
  m.def(
      "lora_linear_multi(Tensor x, Tensor weight, Tensor? weight_scales, Tensor A, Tensor B, "
      "Tensor adapter_index, Tensor ranks, Tensor adapter_scales, Tensor? bias=None, "
      "int int8_path=0) -> Tensor");
}
