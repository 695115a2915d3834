// CUDA implementations of the int8 weight-only (W8A16) ops, both weight layouts
// (lrkernels/quant.py):
//   int8_linear[_packed](x, qweight, scales, bias):     y  = x · Wᵀ + bias   x (..., K) -> (..., N)
//   int8_linear[_packed]_grad_input(dy, qweight, scales): dx = dy · W        dy (..., N) -> (...,
//   K) int8_dequantize_packed(qweight, scales):            W (N, K) in the scales' dtype
// Torch-side glue only (compiled by the host compiler, no device code): shared argument checks,
// device guard, the operand forms the kernels require, allocation, stream. The kernels are
// behind the torch-free API of int8_kernels.cuh.
// Paths:
//   * float16 / bfloat16: the tensor-core kernels (int8_mma*.cu) on the packed weight. A plain
//     (layout 1) weight is packed for the call (one permuting copy of the weight: pack it once
//     with lrkernels.quant.pack instead); in_features % 16 != 0 (no packed form) and devices
//     below compute capability 8.0 dequantize and call cuBLAS.
//   * float32: dequantize (float32, q · s exact for 16-bit scales) and cuBLAS (full float32, no
//     TF32 unless torch allows it).
//   * path = 2 (chosen in lrkernels/ops/int8.py for large M): dequantize once to the dtype with
//     int8_dequantize (layout 2; plain tensor ops for layout 1) and cuBLAS, for every dtype.
// Operand forms: activations with 16-byte aligned rows of a multiple of 8 elements (else copied;
// the input gradient pads dy to N rounded up to 8), group scales group-major with N % 8 == 0
// (else copied; lrkernels.quant.pack stores them so), per-channel scales of the input gradient
// likewise. Split-K counters: one int32 buffer per (device, stream), zeroed when allocated and
// left zeroed by every launch (int8_kernels.cuh), so no memset per call.

#include "int8_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "int8_kernels.cuh"
#include "launch_utils.h"

namespace lrkernels {
namespace {

using cuda_launch::device_info;
using cuda_launch::DeviceInfo;
using cuda_launch::poison_output;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

bool aligned16(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0;
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

// The forced split count of LRKERNELS_INT8_SPLITS (tests and benchmarks; 0 = the plan's).
int forced_splits() {
  const char* v = std::getenv("LRKERNELS_INT8_SPLITS");
  return v != nullptr ? std::atoi(v) : 0;
}

// Zeroed, self-resetting split-K counters of (device, stream), at least n of them.
at::Tensor split_counters(int64_t n, const at::Device& device, cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> cache;
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = cache[{device.index(), stream}];
  if (!t.defined() || t.numel() < n) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "int8_linear (cuda backend): the split-K counters of this stream are allocated "
                "on first use; call the op once on this stream before capturing a CUDA graph");
    t = at::zeros({std::max<int64_t>(n, 4096)}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  return t;
}

// Plain (N, K) int8 weight -> packed layout 2 (K % 16 == 0), as lrkernels.quant.pack_qweight.
at::Tensor pack_qweight(const at::Tensor& q) {
  const int64_t n = q.size(0);
  const int64_t k = q.size(1);
  const int64_t np = round_up(n, 32);
  const at::Tensor padded = np == n ? q : at::constant_pad_nd(q, {0, 0, 0, np - n});
  return padded.reshape({np / 32, 4, 8, k / 16, 2, 4, 2})
      .permute({0, 3, 2, 5, 1, 4, 6})
      .reshape({np / 32, k / 16, 512})
      .contiguous();
}

// W (N, K) in `dtype` by plain tensor ops from a plain weight: q · s in float32, one rounding.
at::Tensor dequantize_plain(const at::Tensor& q, const at::Tensor& scales, int64_t group,
                            at::ScalarType dtype) {
  const at::Tensor s = scales.to(at::kFloat);
  const at::Tensor qf = q.to(at::kFloat);
  const at::Tensor w = group == 0
                           ? qf * s.unsqueeze(1)
                           : (qf.reshape({q.size(0), q.size(1) / group, group}) * s.unsqueeze(2))
                                 .reshape({q.size(0), q.size(1)});
  return w.to(dtype);
}

cuda::Int8DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::Int8DType::kFloat32;
    case at::kHalf:
      return cuda::Int8DType::kFloat16;
    default:
      return cuda::Int8DType::kBFloat16;
  }
}

void check_cuda_inputs(const char* op, const at::Tensor& act) {
  TORCH_CHECK(act.scalar_type() != at::kDouble, op,
              " (cuda backend): float64 is not supported; use the cpu or torch backend");
  TORCH_CHECK(act.is_cuda(), op, " (cuda backend): tensors must be on a CUDA device, got ",
              act.device());
}

// W (N, K) from the packed weight with the dequantize kernel.
at::Tensor dequantize_packed(const at::Tensor& qpacked, const at::Tensor& scales, int64_t n,
                             int64_t group) {
  const at::Tensor q = aligned16(qpacked) && qpacked.is_contiguous() ? qpacked : qpacked.clone();
  const int64_t k = 16 * q.size(1);
  at::Tensor w = at::empty({n, k}, scales.options());
  cuda::Int8DequantArgs args{};
  args.qpacked = static_cast<const int8_t*>(q.data_ptr());
  args.scales = scales.data_ptr();
  args.s_stride_n = scales.stride(0);
  args.s_stride_g = scales.dim() == 2 ? scales.stride(1) : 0;
  args.w = w.data_ptr();
  args.ldw = k;
  args.N = n;
  args.K = k;
  args.group_size = group;
  args.dtype = kernel_dtype(scales.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  C10_CUDA_CHECK(cuda::launch_int8_dequantize(args, stream));
  return w;
}

// Scales as the kernels stage them: group-major rows (groups, sld), sld % 8 == 0 and every row
// readable up to N rounded to 8. Per-channel scales are one such row.
at::Tensor staged_scales(const at::Tensor& scales, int64_t n, int64_t* sld) {
  const bool per_channel = scales.dim() == 1;
  const bool group_major = scales.stride(0) == 1 && (per_channel || scales.stride(1) == n);
  if (group_major && n % 8 == 0 && aligned16(scales)) {
    *sld = n;
    return scales;
  }
  const int64_t groups = per_channel ? 1 : scales.size(1);
  *sld = round_up(n, 8);
  at::Tensor buf = at::zeros({groups, *sld}, scales.options());
  buf.narrow(1, 0, n).copy_(per_channel ? scales.unsqueeze(0) : scales.t());
  return buf;
}

// Plans args on act's device and launches on its current stream, with the split-K workspace and
// counters the plan asks for.
void launch_planned(const cuda::Int8MmaArgs& args, const at::Tensor& act) {
  const int device = act.get_device();
  const DeviceInfo info = device_info(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const cuda::Int8MmaPlan plan = cuda::int8_mma_plan(args, info.num_sms);
  at::Tensor workspace, counters;
  if (plan.splits > 1) {
    // Caching-allocator blocks are 256-byte aligned and stream-ordered: freeing this when the
    // function returns is safe.
    workspace =
        at::empty({static_cast<int64_t>(plan.workspace_floats)}, act.options().dtype(at::kFloat));
    counters = split_counters(plan.counters, act.device(), stream);
  }
  C10_CUDA_CHECK(
      cuda::launch_int8_mma(args, plan, workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                            counters.defined() ? counters.data_ptr<int>() : nullptr, stream));
}

// The activations as the kernels read them: (m, r8) rows of a multiple of 8 elements, 16-byte
// aligned (zero-padded when `features` is not a multiple of 8, else copied only when needed).
at::Tensor kernel_rows(const at::Tensor& act, int64_t m, int64_t features) {
  const int64_t r8 = round_up(features, 8);
  at::Tensor a = act.reshape({m, features});
  if (r8 != features) return at::constant_pad_nd(a, {0, r8 - features});
  if (!a.is_contiguous() || !aligned16(a)) {
    a = a.contiguous();
    if (!aligned16(a)) a = a.clone();
  }
  return a;
}

// The tensor-core path: act (..., R) with R = K (forward) or N (transposed). out: a contiguous
// (..., C) tensor to write (else one is allocated); addend: forward only.
at::Tensor run_mma(const at::Tensor& act, const at::Tensor& qpacked, const at::Tensor& scales,
                   const at::Tensor& bias, int64_t n, int64_t k, int64_t group, bool transposed,
                   const cuda::Int8LowRankAddend* addend = nullptr, at::Tensor* out = nullptr,
                   bool pdl = false) {
  const int64_t in_features = transposed ? n : k;
  const int64_t out_features = transposed ? k : n;
  at::Tensor y = out != nullptr ? *out : at::empty(with_last_dim(act, out_features), act.options());
  if (poison_output()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  const int64_t m = act.numel() / in_features;
  if (m == 0) return y;

  // Activations: rows of a multiple of 8 elements, 16-byte aligned. The input gradient pads dy
  // to N rounded up to 8 (the kernels then see N8 rows of W: rows past N are zero in the packed
  // weight, and their staged scales are zero).
  const int64_t r8 = round_up(in_features, 8);
  const at::Tensor a = kernel_rows(act, m, in_features);
  // The input gradient sees N rounded up to 8 rows of W (staged_scales pads then, with zeros).
  const int64_t n_kernel = transposed ? r8 : n;
  int64_t sld = n;
  const at::Tensor s =
      group > 0 || transposed ? staged_scales(scales, n, &sld) : scales.contiguous();
  const at::Tensor q = aligned16(qpacked) && qpacked.is_contiguous() ? qpacked : qpacked.clone();
  const at::Tensor b = bias.defined() ? bias.contiguous() : at::Tensor();

  cuda::Int8MmaArgs args{};
  args.a = a.data_ptr();
  args.lda = a.stride(0);
  args.qpacked = static_cast<const int8_t*>(q.data_ptr());
  args.scales = s.data_ptr();
  args.sld = sld;
  args.bias = b.defined() ? b.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.ldy = out_features;
  args.M = m;
  args.N = n_kernel;
  args.K = k;
  args.group_size = group;
  args.transposed = transposed;
  args.dtype = kernel_dtype(act.scalar_type());
  args.splits = forced_splits();
  args.addend = addend;
  // As a programmatic dependent only when no operand the main loop reads was copied after the
  // producer of t (the copy kernel would be the previous one, still running).
  args.pdl = pdl && device_info(act.get_device()).cc_major >= 9 && a.data_ptr() == act.data_ptr() &&
             s.data_ptr() == scales.data_ptr() && q.data_ptr() == qpacked.data_ptr();
  launch_planned(args, act);
  return y;
}

constexpr int64_t kPathDequantMatmul = 2;

bool tensor_cores(const at::Tensor& act, int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "int8_linear (cuda backend): path must be 0, 1 (kernel) or ",
              "2 (dequantize + cuBLAS), got ", path);
  return path != kPathDequantMatmul && act.scalar_type() != at::kFloat &&
         device_info(act.get_device()).cc_major >= 8;
}

// ----------------------------------------------------------------------------------- the ops

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                            int64_t path) {
  const int64_t group = check_int8_linear_args(x, qweight, scales, bias);
  check_cuda_inputs("int8_linear", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1);
  if (!tensor_cores(x, path) || k % 16 != 0) {
    const at::Tensor w = dequantize_plain(qweight, scales, group, x.scalar_type());
    return at::linear(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
  }
  return run_mma(x, pack_qweight(qweight), scales, b, n, k, group, /*transposed=*/false);
}

at::Tensor int8_linear_grad_input_cuda(const at::Tensor& dy, const at::Tensor& qweight,
                                       const at::Tensor& scales, int64_t path) {
  const int64_t group = check_int8_grad_input_args(dy, qweight, scales);
  check_cuda_inputs("int8_linear_grad_input", dy);
  const c10::cuda::CUDAGuard device_guard(dy.device());
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1);
  if (!tensor_cores(dy, path) || k % 16 != 0) {
    return at::matmul(dy, dequantize_plain(qweight, scales, group, dy.scalar_type()));
  }
  return run_mma(dy, pack_qweight(qweight), scales, at::Tensor(), n, k, group,
                 /*transposed=*/true);
}

at::Tensor int8_linear_packed_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                                   int64_t path) {
  const int64_t group = check_int8_packed_linear_args(x, qweight, scales, bias);
  check_cuda_inputs("int8_linear_packed", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  const int64_t n = scales.size(0);
  const int64_t k = 16 * qweight.size(1);
  if (!tensor_cores(x, path)) {
    const at::Tensor w = dequantize_packed(qweight, scales, n, group);
    return at::linear(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
  }
  return run_mma(x, qweight, scales, b, n, k, group, /*transposed=*/false);
}

at::Tensor int8_linear_packed_grad_input_cuda(const at::Tensor& dy, const at::Tensor& qweight,
                                              const at::Tensor& scales, int64_t path) {
  const int64_t group = check_int8_packed_grad_input_args(dy, qweight, scales);
  check_cuda_inputs("int8_linear_packed_grad_input", dy);
  const c10::cuda::CUDAGuard device_guard(dy.device());
  const int64_t n = scales.size(0);
  const int64_t k = 16 * qweight.size(1);
  if (!tensor_cores(dy, path)) return at::matmul(dy, dequantize_packed(qweight, scales, n, group));
  return run_mma(dy, qweight, scales, at::Tensor(), n, k, group, /*transposed=*/true);
}

at::Tensor int8_dequantize_packed_cuda(const at::Tensor& qweight, const at::Tensor& scales) {
  const int64_t group = check_int8_dequantize_packed_args(qweight, scales);
  TORCH_CHECK(qweight.is_cuda(),
              "int8_dequantize_packed (cuda backend): tensors must be on a CUDA device, got ",
              qweight.device());
  const c10::cuda::CUDAGuard device_guard(qweight.device());
  return dequantize_packed(qweight, scales, scales.size(0), group);
}

}  // namespace

namespace int8_cuda {

bool tensor_cores_available(const at::Tensor& act) { return tensor_cores(act, /*path=*/1); }

at::Tensor pack(const at::Tensor& qweight) { return pack_qweight(qweight); }

void packed_forward_into(const at::Tensor& x2d, const at::Tensor& qpacked, const at::Tensor& scales,
                         const at::Tensor& bias, int64_t group,
                         const cuda::Int8LowRankAddend* addend, bool after_shrink,
                         at::Tensor& y2d) {
  TORCH_CHECK(y2d.is_contiguous() && y2d.dim() == 2 && y2d.size(0) == x2d.size(0) &&
                  y2d.size(1) == scales.size(0),
              "int8 packed forward: the output must be a contiguous (M, N) tensor");
  run_mma(x2d, qpacked, scales, bias, scales.size(0), 16 * qpacked.size(1), group,
          /*transposed=*/false, addend, &y2d, after_shrink);
}

void dense_forward_into(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& bias,
                        const cuda::Int8LowRankAddend* addend, bool after_shrink, at::Tensor& y2d) {
  const int64_t m = x2d.size(0);
  const int64_t n = weight.size(0);
  const int64_t k = weight.size(1);
  TORCH_CHECK(
      k % 8 == 0 && y2d.is_contiguous() && y2d.dim() == 2 && y2d.size(0) == m && y2d.size(1) == n,
      "dense low-rank forward: in_features % 8 == 0 and a contiguous (M, N) output");
  if (poison_output()) y2d.fill_(std::numeric_limits<double>::quiet_NaN());
  if (m == 0) return;
  const at::Tensor a = kernel_rows(x2d, m, k);
  const at::Tensor w = kernel_rows(weight, n, k);
  const at::Tensor b = bias.defined() ? bias.contiguous() : at::Tensor();
  cuda::Int8MmaArgs args{};
  args.a = a.data_ptr();
  args.lda = a.stride(0);
  args.bias = b.defined() ? b.data_ptr() : nullptr;
  args.y = y2d.data_ptr();
  args.ldy = n;
  args.M = m;
  args.N = n;
  args.K = k;
  args.dtype = kernel_dtype(x2d.scalar_type());
  args.splits = forced_splits();
  args.addend = addend;
  args.dense_weight = w.data_ptr();
  args.ldw = w.stride(0);
  args.pdl = after_shrink && device_info(x2d.get_device()).cc_major >= 9 &&
             a.data_ptr() == x2d.data_ptr() && w.data_ptr() == weight.data_ptr();
  launch_planned(args, x2d);
}

}  // namespace int8_cuda

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("int8_linear_grad_input", &int8_linear_grad_input_cuda);
  m.impl("int8_linear_packed", &int8_linear_packed_cuda);
  m.impl("int8_linear_packed_grad_input", &int8_linear_packed_grad_input_cuda);
  m.impl("int8_dequantize_packed", &int8_dequantize_packed_cuda);
}

}  // namespace lrkernels
