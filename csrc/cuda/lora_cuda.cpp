// CUDA implementations of the LoRA ops (lrkernels/ops/lora.py). Torch-side glue only (host
// compiler): shared checks, device guard, contiguity, allocation, path choice, stream. Kernels are
// behind the torch-free API of lora_kernels.cuh (and int8_kernels.cuh for the int8 base).
//
// What runs where (the README's LoRA section says the same):
//   * int8 base on the tensor-core path (float16 / bfloat16, in_features % 16 == 0, int8_path
//     not "dequantize + cuBLAS"; a packed base at every M, a plain one above 16 rows, packed for
//     the call): the shrink kernel (t = drop(x) · Aᵀ for each row's adapter, float32 partials
//     over K slices), then the int8 tensor-core GEMM (int8_mma.cuh) with s · t · Bᵀ and the bias
//     in its epilogue (Int8LowRankAddend): two launches, the weight streamed once as int8, y
//     written once, t never in HBM at full size. One adapter or per-row adapters alike. After
//     the shrink the GEMM (like the GEMV below) is launched as its programmatic dependent
//     (common/pdl.cuh): its weight stream overlaps the shrink, its epilogue waits for it.
//   * dense base, float16 / bfloat16, in_features % 8 == 0, 16 < M <= kDenseFusedMaxRows: the
//     same tensor-core GEMM on the 16-bit weight (Int8MmaArgs::dense_weight), the LoRA term and
//     the bias in its epilogue (t first: cuBLAS for one adapter, the shrink for per-row ones).
//   * M <= 16 otherwise (a dense base, or a plain int8 one), lora_linear and lora_linear_multi:
//     the shrink kernel, then the weight-streaming GEMV over the dense or plain int8 base with
//     the expand (s · t · Bᵀ) and the bias fused in its epilogue. Two launches.
//   * M > 16 otherwise (large M, float32, K % 8 != 0, int8 on dequantize + cuBLAS), one
//     adapter: cuBLAS for the dense base (at::addmm) or the library's own int8 op
//     (lrkernels::int8_linear[_packed] through the dispatcher, with int8_path), cuBLAS for
//     t = drop(x) · Aᵀ (the masked x from lora_mask_kernel when dropout is on) and for
//     y += s · t · Bᵀ (beta = 1: y read and written once more).
//   * M > 16 otherwise, many adapters: the base as above, the shrink kernel (per-row adapters),
//     then the expand kernel accumulating each row's s · t · B[a]ᵀ into y.
//   * Gradients: dx = dy · W (cuBLAS with the LoRA term as its C operand, or the int8
//     grad-input op with int8_path plus an add) with keep ⊙ (dt · A) from cuBLAS and
//     lora_mask_kernel; dA = dtᵀ · (keep ⊙ x) (masked copy + cuBLAS).
// int8_path is int8_linear's `path` (lrkernels/ops/int8.py CUDA_PATHS), chosen in Python from the
// measured table (lrkernels.ops.int8.cuda_path); 0 (a direct call) means that function's default
// rule, kInt8DequantMatmulMinRows below.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <vector>

#include "../common/checks.h"
#include "int8_cuda.h"
#include "int8_kernels.cuh"
#include "launch_utils.h"
#include "lora_kernels.cuh"

namespace lrkernels {
namespace {

using cuda_launch::device_info;
using cuda_launch::poison_output;

cuda::LoraDType kernel_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::LoraDType::kFloat32;
    case at::kHalf:
      return cuda::LoraDType::kFloat16;
    case at::kBFloat16:
      return cuda::LoraDType::kBFloat16;
    default:
      TORCH_CHECK(false, op, " (cuda backend): ", t,
                  " is not supported; use the cpu or torch backend");
  }
}

void check_cuda_side(const char* op, const at::Tensor& x, int64_t rank) {
  TORCH_CHECK(x.is_cuda(), op, " (cuda backend): tensors must be on a CUDA device, got ",
              x.device());
  TORCH_CHECK(rank <= cuda::kLoraMaxRank, op, " (cuda backend): ranks up to ", cuda::kLoraMaxRank,
              " are supported, got ", rank);
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

// The int8 ops of the library, through the dispatcher (their CUDA kernels and weight layout
// stay the int8 family's own). Their last argument is the CUDA path (lrkernels/ops/int8.py
// CUDA_PATHS): 1 the tensor-core kernel, 2 one dequantize pass + cuBLAS.
constexpr int64_t kInt8PathRule = 0;
constexpr int64_t kInt8PathKernel = 1;
constexpr int64_t kInt8PathDequantMatmul = 2;
constexpr int64_t kInt8DequantMatmulMinRows = 512;  // ops/int8.py DEQUANT_MATMUL_MIN_ROWS

// The path an int8 product of `rows` rows takes: the caller's (the table's) or the default rule.
int64_t int8_path(const char* op, int64_t requested, int64_t rows) {
  check_lora_int8_path(op, requested);
  if (requested != kInt8PathRule) return requested;
  return rows >= kInt8DequantMatmulMinRows ? kInt8PathDequantMatmul : kInt8PathKernel;
}

bool is_packed(const at::Tensor& weight) { return weight.dim() == 3; }

at::Tensor int8_linear_op(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                          const std::optional<at::Tensor>& bias, int64_t path) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, int64_t);
  static const auto plain =
      c10::Dispatcher::singleton().findSchemaOrThrow("lrkernels::int8_linear", "").typed<Fn>();
  static const auto packed = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("lrkernels::int8_linear_packed", "")
                                 .typed<Fn>();
  return (is_packed(q) ? packed : plain).call(x, q, s, bias, path);
}

at::Tensor int8_grad_input_op(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& s,
                              int64_t path) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
  static const auto plain = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("lrkernels::int8_linear_grad_input", "")
                                .typed<Fn>();
  static const auto packed = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("lrkernels::int8_linear_packed_grad_input", "")
                                 .typed<Fn>();
  return (is_packed(q) ? packed : plain).call(dy, q, s, path);
}

// y2d (M, N) = x2d · Wᵀ + bias, W dense or int8 (either layout).
at::Tensor base_product(const at::Tensor& x2d, const at::Tensor& weight,
                        const std::optional<at::Tensor>& weight_scales,
                        const std::optional<at::Tensor>& bias, int64_t path) {
  if (weight_scales.has_value()) return int8_linear_op(x2d, weight, *weight_scales, bias, path);
  return bias.has_value() ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
}

// Most rows of the fused dense route: above, the product is compute-bound and cuBLAS's wgmma
// (sm_90) is expected to beat the kernel's mma.sync by more than the extra passes cost (a static
// estimate until bench/lora.py measures it).
constexpr int64_t kDenseFusedMaxRows = 1024;

// How a forward runs (the header comment's list).
enum class Route { kFused, kGemv, kBaseThenLora };

Route choose_route(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& weight_scales, int64_t M, int64_t K,
                   int64_t path) {
  if (weight_scales.has_value() && path == kInt8PathKernel && K % 16 == 0 &&
      int8_cuda::tensor_cores_available(x) && (is_packed(weight) || M > cuda::kLoraGemvMaxRows)) {
    return Route::kFused;
  }
  if (!weight_scales.has_value() && K % 8 == 0 && M > cuda::kLoraGemvMaxRows &&
      M <= kDenseFusedMaxRows && int8_cuda::tensor_cores_available(x)) {
    return Route::kFused;
  }
  if (M <= cuda::kLoraGemvMaxRows && !(weight_scales.has_value() && is_packed(weight))) {
    return Route::kGemv;
  }
  return Route::kBaseThenLora;
}

// keep ⊙ in (in place when out is in).
void apply_mask(const at::Tensor& in, at::Tensor& out, int64_t threshold, const at::Tensor& seed,
                const char* op) {
  cuda::LoraMaskArgs args{in.data_ptr(),
                          out.data_ptr(),
                          in.size(0),
                          in.size(1),
                          static_cast<uint32_t>(threshold),
                          seed.data_ptr<int64_t>(),
                          kernel_dtype(op, in.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_lora_mask(args, stream_of(in)));
}

// The shrink: float32 partials (splits, M, R) of t = drop(x) · A[a_m]ᵀ.
at::Tensor shrink(const char* op, const at::Tensor& x2d, const cuda::LoraAdapters& adapters,
                  int64_t threshold, const std::optional<at::Tensor>& seed, int64_t* splits) {
  const int64_t M = x2d.size(0);
  const int64_t K = x2d.size(1);
  *splits = cuda::lora_shrink_splits(M, K, device_info(x2d.get_device()).num_sms);
  at::Tensor partial = at::empty({*splits, M, adapters.rank}, x2d.options().dtype(at::kFloat));
  cuda::LoraShrinkArgs args{x2d.data_ptr(),
                            adapters,
                            partial.data_ptr<float>(),
                            M,
                            K,
                            *splits,
                            static_cast<uint32_t>(threshold),
                            threshold > 0 ? seed->data_ptr<int64_t>() : nullptr,
                            kernel_dtype(op, x2d.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_lora_shrink(args, stream_of(x2d)));
  return partial;
}

// Route kFused: the tensor-core GEMM over the int8 (packed) or dense base with the LoRA term
// (t from `partial`, float32 (splits, M, R)) in its epilogue; t_out, when given, receives
// round(t). after_shrink: `partial` is the output of the shrink launched just before, so the
// GEMM may start as its programmatic dependent (not after a per-call pack of a plain weight,
// which would run in between).
void run_fused(const at::Tensor& x2d, const at::Tensor& weight,
               const std::optional<at::Tensor>& weight_scales, int64_t group,
               const cuda::LoraAdapters& adapters, const at::Tensor& partial, bool after_shrink,
               const std::optional<at::Tensor>& bias, at::Tensor& y2d, at::Tensor* t_out) {
  const int64_t splits = partial.size(0);
  const cuda::Int8LowRankAddend addend{partial.data_ptr<float>(),
                                       splits,
                                       adapters.rank,
                                       adapters.B,
                                       adapters.index,
                                       adapters.ranks,
                                       adapters.scales,
                                       adapters.scale,
                                       adapters.n_adapters,
                                       t_out != nullptr ? t_out->data_ptr() : nullptr};
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (!weight_scales.has_value()) {
    int8_cuda::dense_forward_into(x2d, weight, b, &addend, after_shrink, y2d);
    return;
  }
  const at::Tensor q = is_packed(weight) ? weight : int8_cuda::pack(weight);
  int8_cuda::packed_forward_into(x2d, q, *weight_scales, b, group, &addend,
                                 after_shrink && is_packed(weight), y2d);
}

// Routes kGemv (the fused GEMV) and kBaseThenLora for per-row adapters (base, then the expand).
void run_lora_kernels(const char* op, const at::Tensor& x2d, const at::Tensor& weight,
                      const std::optional<at::Tensor>& weight_scales, int64_t group,
                      const cuda::LoraAdapters& adapters, const std::optional<at::Tensor>& bias,
                      int64_t threshold, const std::optional<at::Tensor>& seed, int64_t path,
                      Route route, at::Tensor& y2d, at::Tensor* t_out) {
  const int64_t M = x2d.size(0);
  const int64_t K = x2d.size(1);
  const int64_t N = y2d.size(1);
  const cuda::LoraDType dtype = kernel_dtype(op, x2d.scalar_type());
  const cudaStream_t stream = stream_of(x2d);
  // The GEMV's operands before the shrink: it starts as the shrink's programmatic dependent
  // and streams them before waiting (a copy kernel in between would still be running).
  const bool gemv = route == Route::kGemv;
  const at::Tensor w = gemv ? weight.contiguous() : at::Tensor();
  const at::Tensor s =
      gemv && weight_scales.has_value() ? weight_scales->contiguous() : at::Tensor();
  const at::Tensor b = gemv && bias.has_value() ? bias->contiguous() : at::Tensor();
  int64_t splits = 0;
  const at::Tensor partial = shrink(op, x2d, adapters, threshold, seed, &splits);
  if (gemv) {
    cuda::LoraGemvArgs gemv_args{x2d.data_ptr(),
                                 w.data_ptr(),
                                 s.defined() ? s.data_ptr() : nullptr,
                                 group > 0 ? group : 0,
                                 adapters,
                                 partial.data_ptr<float>(),
                                 splits,
                                 b.defined() ? b.data_ptr() : nullptr,
                                 y2d.data_ptr(),
                                 t_out != nullptr ? t_out->data_ptr() : nullptr,
                                 M,
                                 N,
                                 K,
                                 dtype,
                                 device_info(x2d.get_device()).cc_major >= 9};
    C10_CUDA_CHECK(cuda::launch_lora_gemv(gemv_args, stream));
    return;
  }
  y2d.copy_(base_product(x2d, weight, weight_scales, bias, path));
  cuda::LoraExpandArgs expand{adapters, partial.data_ptr<float>(), splits, y2d.data_ptr(), M, N,
                              dtype};
  C10_CUDA_CHECK(cuda::launch_lora_expand(expand, stream));
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& weight_scales,
    const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& bias, double scale,
    int64_t dropout_threshold, const std::optional<at::Tensor>& seed, int64_t int8_path_arg) {
  constexpr const char* op = "lora_linear";
  const int64_t group =
      check_lora_linear_args(x, weight, weight_scales, A, B, bias, dropout_threshold, seed);
  check_cuda_side(op, x, A.size(0));
  kernel_dtype(op, x.scalar_type());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto [N, K] = lora_base_shape(weight, weight_scales);
  const int64_t R = A.size(0);
  const int64_t M = x.numel() / K;
  const int64_t path = int8_path(op, int8_path_arg, M);
  at::Tensor y = at::empty(with_last_dim(x, N), x.options());
  at::Tensor t = at::empty({M, R}, x.options());
  if (poison_output()) {
    y.fill_(std::numeric_limits<double>::quiet_NaN());
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (M == 0) return {y, t};
  const at::Tensor x2d = x.reshape({M, K}).contiguous();
  const Route route = choose_route(x, weight, weight_scales, M, K, path);
  if (route != Route::kBaseThenLora) {
    const at::Tensor A_c = A.contiguous();
    const at::Tensor B_c = B.contiguous();
    const cuda::LoraAdapters adapters{
        A_c.data_ptr(), B_c.data_ptr(), nullptr, nullptr, nullptr, static_cast<float>(scale), 1, R};
    at::Tensor y2d = y.view({M, N});
    if (route == Route::kFused) {
      const std::optional<at::Tensor> b =
          bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
      if (M <= cuda::kLoraGemvMaxRows) {
        int64_t splits = 0;
        const at::Tensor partial = shrink(op, x2d, adapters, dropout_threshold, seed, &splits);
        run_fused(x2d, weight, weight_scales, group, adapters, partial, true, b, y2d, &t);
      } else {
        // Many rows, one adapter: t = drop(x) · Aᵀ on cuBLAS's tensor cores (the shrink kernel
        // is a decode kernel: a block per row re-reads A from L2), rounded to the dtype once;
        // as float32 it is its own single partial (exact), which the epilogue rounds back to
        // the same values.
        at::Tensor xd = x2d;
        if (dropout_threshold > 0) {
          xd = at::empty_like(x2d);
          apply_mask(x2d, xd, dropout_threshold, *seed, op);
        }
        t.copy_(at::mm(xd, A.t()));
        run_fused(x2d, weight, weight_scales, group, adapters, t.to(at::kFloat).unsqueeze(0), false,
                  b, y2d, nullptr);
      }
    } else {
      run_lora_kernels(op, x2d, weight, weight_scales, group, adapters, bias, dropout_threshold,
                       seed, path, route, y2d, &t);
    }
    return {y, t};
  }
  at::Tensor xd = x2d;
  if (dropout_threshold > 0) {
    xd = at::empty_like(x2d);
    apply_mask(x2d, xd, dropout_threshold, *seed, op);
  }
  t.copy_(at::mm(xd, A.t()));
  at::Tensor y2d = base_product(x2d, weight, weight_scales, bias, path);
  y2d.addmm_(t, B.t(), 1.0, scale);
  y.view({M, N}).copy_(y2d);
  return {y, t};
}

at::Tensor lora_linear_grad_input_cuda(const at::Tensor& dy, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& weight_scales,
                                       const at::Tensor& dt, const at::Tensor& A,
                                       int64_t dropout_threshold,
                                       const std::optional<at::Tensor>& seed,
                                       int64_t int8_path_arg) {
  constexpr const char* op = "lora_linear_grad_input";
  check_lora_grad_input_args(dy, weight, weight_scales, dt, A, dropout_threshold, seed);
  TORCH_CHECK(dy.is_cuda(), op, " (cuda backend): tensors must be on a CUDA device, got ",
              dy.device());
  kernel_dtype(op, dy.scalar_type());
  const c10::cuda::CUDAGuard device_guard(dy.device());
  const auto [N, K] = lora_base_shape(weight, weight_scales);
  const int64_t M = dy.numel() / N;
  const int64_t path = int8_path(op, int8_path_arg, M);
  if (M == 0) return at::empty(with_last_dim(dy, K), dy.options());
  const at::Tensor dy2d = dy.reshape({M, N});
  at::Tensor lora = at::mm(dt, A);  // (M, K), contiguous
  if (dropout_threshold > 0) apply_mask(lora, lora, dropout_threshold, *seed, op);
  at::Tensor dx = weight_scales.has_value()
                      ? int8_grad_input_op(dy2d, weight, *weight_scales, path).add_(lora)
                      : at::addmm(lora, dy2d, weight);
  return dx.reshape(with_last_dim(dy, K));
}

at::Tensor lora_linear_grad_A_cuda(const at::Tensor& dt, const at::Tensor& x,
                                   int64_t dropout_threshold, const at::Tensor& seed) {
  constexpr const char* op = "lora_linear_grad_A";
  check_lora_grad_A_args(dt, x, dropout_threshold, seed);
  TORCH_CHECK(x.is_cuda(), op, " (cuda backend): tensors must be on a CUDA device, got ",
              x.device());
  kernel_dtype(op, x.scalar_type());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t K = x.size(-1);
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  if (dropout_threshold == 0 || x2d.size(0) == 0) return at::mm(dt.t(), x2d);
  at::Tensor masked = at::empty_like(x2d);
  apply_mask(x2d, masked, dropout_threshold, seed, op);
  return at::mm(dt.t(), masked);
}

at::Tensor lora_linear_multi_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& weight_scales,
                                  const at::Tensor& A, const at::Tensor& B,
                                  const at::Tensor& adapter_index, const at::Tensor& ranks,
                                  const at::Tensor& adapter_scales,
                                  const std::optional<at::Tensor>& bias, int64_t int8_path_arg) {
  constexpr const char* op = "lora_linear_multi";
  const int64_t group = check_lora_multi_args(x, weight, weight_scales, A, B, adapter_index, ranks,
                                              adapter_scales, bias);
  check_cuda_side(op, x, A.size(1));
  kernel_dtype(op, x.scalar_type());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto [N, K] = lora_base_shape(weight, weight_scales);
  const int64_t M = x.numel() / K;
  const int64_t path = int8_path(op, int8_path_arg, M);
  at::Tensor y = at::empty(with_last_dim(x, N), x.options());
  if (poison_output()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  if (M == 0) return y;
  const at::Tensor x2d = x.reshape({M, K}).contiguous();
  const at::Tensor A_c = A.contiguous();
  const at::Tensor B_c = B.contiguous();
  const at::Tensor idx = adapter_index.reshape({M}).contiguous();
  const at::Tensor rk = ranks.contiguous();
  const at::Tensor sc = adapter_scales.contiguous();
  const cuda::LoraAdapters adapters{A_c.data_ptr(),
                                    B_c.data_ptr(),
                                    idx.data_ptr<int32_t>(),
                                    rk.data_ptr<int32_t>(),
                                    sc.data_ptr<float>(),
                                    0.f,
                                    A.size(0),
                                    A.size(1)};
  at::Tensor y2d = y.view({M, N});
  const Route route = choose_route(x, weight, weight_scales, M, K, path);
  if (route == Route::kFused) {
    const std::optional<at::Tensor> b =
        bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
    int64_t splits = 0;
    const at::Tensor partial = shrink(op, x2d, adapters, 0, std::nullopt, &splits);
    run_fused(x2d, weight, weight_scales, group, adapters, partial, true, b, y2d, nullptr);
    return y;
  }
  run_lora_kernels(op, x2d, weight, weight_scales, group, adapters, bias, 0, std::nullopt, path,
                   route, y2d, nullptr);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_grad_input", &lora_linear_grad_input_cuda);
  m.impl("lora_linear_grad_A", &lora_linear_grad_A_cuda);
  m.impl("lora_linear_multi", &lora_linear_multi_cuda);
}

}  // namespace lrkernels
