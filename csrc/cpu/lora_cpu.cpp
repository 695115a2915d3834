// C++ CPU implementation of the LoRA ops (lrkernels/ops/lora.py):
//   lora_linear:            y  = x · Wᵀ + scale · t · Bᵀ + bias,  t = (keep ⊙ x) · Aᵀ
//   lora_linear_grad_input: dx = dy · W + keep ⊙ (dt · A)
//   lora_linear_grad_A:     dA = dtᵀ · (keep ⊙ x)
//   lora_linear_multi:      per-row adapters (adapter_index, ranks, adapter_scales)
// W is the dense weight or the int8 weight dequantized in the accumulation dtype. Numerics as
// the GPU kernels: float32 accumulation (float64 for float64); t is rounded to x's dtype before
// the second product (what torch's same-dtype matmuls and the tensor-core kernels do); the base
// product and the LoRA term are summed in the accumulation dtype and rounded once. The dropout
// mask is the shared counter-based hash (csrc/cuda/lora_dropout.h). A correctness path that also
// exercises the shared checks, not a fast one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../cuda/lora_dropout.h"

namespace lrkernels {
namespace {

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// W (N, K) in `acc`: the dense weight, or int8 q · s (group -1 dense, 0 per channel, else G).
at::Tensor base_weight(const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                       int64_t group, at::ScalarType acc) {
  if (group < 0) return weight.to(acc);
  const at::Tensor q = weight.to(acc);
  const at::Tensor s = scales->to(acc);
  if (group == 0) return q * s.unsqueeze(1);
  const int64_t n = weight.size(0);
  const int64_t k = weight.size(1);
  return (q.view({n, k / group, group}) * s.unsqueeze(2)).view({n, k});
}

// keep ⊙ x2d (M, K) in `acc` (x2d itself when threshold == 0).
at::Tensor dropped(const at::Tensor& x2d, int64_t threshold, const std::optional<at::Tensor>& seed,
                   at::ScalarType acc) {
  at::Tensor xa = x2d.to(acc).contiguous();
  if (threshold == 0) return xa;
  const uint64_t seed_value = static_cast<uint64_t>(seed->item<int64_t>());
  at::Tensor out = xa.clone();
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lora_dropout_cpu", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const uint32_t key = lora::dropout_rowkey(seed_value, m);
        for (int64_t k = 0; k < cols; ++k) {
          if (!lora::dropout_keep(key, k, static_cast<uint32_t>(threshold))) p[m * cols + k] = 0;
        }
      }
    });
  });
  return out;
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

// The cpu kernels read an int8 base in layout 1 (lrkernels/ops/lora.py unpacks a packed one
// before calling them).
void check_layout1(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, op, " (cpu backend): reads an int8 base in layout 1 (a 2-D ",
              "(out, in) qweight); this one is packed (layout 2): unpack it with ",
              "lrkernels.quant.unpack");
}

// The intermediate rounded to x's dtype, then back in the accumulation dtype.
at::Tensor round_like(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype).to(t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& weight_scales,
    const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& bias, double scale,
    int64_t dropout_threshold, const std::optional<at::Tensor>& seed, int64_t int8_path) {
  const int64_t group =
      check_lora_linear_args(x, weight, weight_scales, A, B, bias, dropout_threshold, seed);
  TORCH_CHECK(x.device().is_cpu(), "lora_linear (cpu backend): x must be a CPU tensor, got ",
              x.device());
  check_layout1("lora_linear", weight);
  check_lora_int8_path("lora_linear", int8_path);  // the cuda backend's; unused here
  const at::ScalarType acc = acc_type(x);
  const int64_t in = weight.size(1);
  const at::Tensor x2d = x.reshape({-1, in});
  const at::Tensor w = base_weight(weight, weight_scales, group, acc);
  const at::Tensor t = round_like(at::mm(dropped(x2d, dropout_threshold, seed, acc), A.to(acc).t()),
                                  x.scalar_type());
  at::Tensor y = at::mm(x2d.to(acc), w.t());
  y.add_(at::mm(t, B.to(acc).t()), scale);
  if (bias.has_value()) y.add_(bias->to(acc));
  return {y.to(x.scalar_type()).reshape(with_last_dim(x, weight.size(0))), t.to(x.scalar_type())};
}

at::Tensor lora_linear_grad_input_cpu(const at::Tensor& dy, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& weight_scales,
                                      const at::Tensor& dt, const at::Tensor& A,
                                      int64_t dropout_threshold,
                                      const std::optional<at::Tensor>& seed, int64_t int8_path) {
  const int64_t group =
      check_lora_grad_input_args(dy, weight, weight_scales, dt, A, dropout_threshold, seed);
  TORCH_CHECK(dy.device().is_cpu(), "lora_linear_grad_input (cpu backend): dy must be a CPU ",
              "tensor, got ", dy.device());
  check_layout1("lora_linear_grad_input", weight);
  check_lora_int8_path("lora_linear_grad_input", int8_path);  // the cuda backend's; unused here
  const at::ScalarType acc = acc_type(dy);
  const at::Tensor w = base_weight(weight, weight_scales, group, acc);
  const at::Tensor lora = dropped(at::mm(dt.to(acc), A.to(acc)), dropout_threshold, seed, acc);
  const at::Tensor dx = at::mm(dy.reshape({-1, dy.size(-1)}).to(acc), w).add_(lora);
  return dx.to(dy.scalar_type()).reshape(with_last_dim(dy, weight.size(1)));
}

at::Tensor lora_linear_grad_A_cpu(const at::Tensor& dt, const at::Tensor& x,
                                  int64_t dropout_threshold, const at::Tensor& seed) {
  check_lora_grad_A_args(dt, x, dropout_threshold, seed);
  TORCH_CHECK(x.device().is_cpu(), "lora_linear_grad_A (cpu backend): x must be a CPU tensor, ",
              "got ", x.device());
  const at::ScalarType acc = acc_type(x);
  const at::Tensor xd = dropped(x.reshape({-1, x.size(-1)}), dropout_threshold, seed, acc);
  return at::mm(dt.to(acc).t(), xd).to(x.scalar_type());
}

at::Tensor lora_linear_multi_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& weight_scales,
                                 const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& adapter_index, const at::Tensor& ranks,
                                 const at::Tensor& adapter_scales,
                                 const std::optional<at::Tensor>& bias, int64_t int8_path) {
  const int64_t group = check_lora_multi_args(x, weight, weight_scales, A, B, adapter_index, ranks,
                                              adapter_scales, bias);
  TORCH_CHECK(x.device().is_cpu(), "lora_linear_multi (cpu backend): x must be a CPU tensor, got ",
              x.device());
  check_layout1("lora_linear_multi", weight);
  check_lora_int8_path("lora_linear_multi", int8_path);  // the cuda backend's; unused here
  const int64_t n = A.size(0);
  const int64_t r_max = A.size(1);
  const at::Tensor idx = adapter_index.reshape({-1}).contiguous();
  const at::Tensor rk = ranks.contiguous();
  // Eager value checks: reading the values costs nothing on the CPU.
  const int32_t* ip = idx.data_ptr<int32_t>();
  for (int64_t m = 0; m < idx.numel(); ++m) {
    TORCH_CHECK(ip[m] >= -1 && ip[m] < n,
                "lora_linear_multi: adapter_index values must be in [-1, ", n - 1,
                "] (-1: base only), got ", ip[m], " at row ", m);
  }
  const int32_t* rp = rk.data_ptr<int32_t>();
  for (int64_t a = 0; a < n; ++a) {
    TORCH_CHECK(rp[a] >= 0 && rp[a] <= r_max, "lora_linear_multi: ranks must be in [0, ", r_max,
                "] (r_max), got ", rp[a], " for adapter ", a);
  }
  const at::ScalarType acc = acc_type(x);
  const int64_t in = weight.size(1);
  const int64_t out = weight.size(0);
  const at::Tensor x2d = x.reshape({-1, in}).to(acc);
  at::Tensor y = at::mm(x2d, base_weight(weight, weight_scales, group, acc).t());
  if (bias.has_value()) y.add_(bias->to(acc));
  const at::Tensor Aa = A.to(acc);
  const at::Tensor Ba = B.to(acc);
  const at::Tensor sc = adapter_scales.to(at::kDouble).contiguous();
  const double* sp = sc.data_ptr<double>();
  // One adapter at a time over the rows that use it.
  for (int64_t a = 0; a < n; ++a) {
    const at::Tensor rows = at::nonzero(idx == a).reshape({-1});
    if (rows.numel() == 0 || rp[a] == 0) continue;
    const int64_t r = rp[a];
    const at::Tensor t =
        round_like(at::mm(x2d.index_select(0, rows), Aa[a].narrow(0, 0, r).t()), x.scalar_type());
    y.index_add_(0, rows, at::mm(t, Ba[a].narrow(1, 0, r).t()), sp[a]);
  }
  return y.to(x.scalar_type()).reshape(with_last_dim(x, out));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_grad_input", &lora_linear_grad_input_cpu);
  m.impl("lora_linear_grad_A", &lora_linear_grad_A_cpu);
  m.impl("lora_linear_multi", &lora_linear_multi_cpu);
}

}  // namespace lrkernels
