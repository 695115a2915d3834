// CUDA implementations of the int8 weight-only (W8A16) ops:
//   int8_linear(x, qweight, scales, bias):     y  = x · Wᵀ + bias   x (..., K)  -> (..., N)
//   int8_linear_grad_input(dy, qweight, scales): dx = dy · W        dy (..., N) -> (..., K)
//   W[n, k] = qweight[n, k] · scales[n] (per channel) or · scales[n, k / G] (G in 32, 64, 128);
//   qweight int8 (N, K); activations, scales, bias and outputs float32 / float16 / bfloat16
//   (float64: cpu or torch backend); float32 accumulation.
// Torch-side glue only (compiled by the host compiler, no device code): shared argument checks,
// device guard, contiguity, allocation, path choice, stream. The kernels are behind the
// torch-free API of int8_kernels.cuh.
// Paths:
//   * gemv (int8_gemv.cu): M <= 16 (decode), float32 at any M, and every M on devices below
//     compute capability 8.0 (no bf16 tensor-core mma);
//   * tensor cores (int8_gemm_tc.cu): float16 / bfloat16 with M > 16.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <vector>

#include "../common/checks.h"
#include "int8_kernels.cuh"
#include "launch_utils.h"

namespace lrkernels {
namespace {

constexpr int64_t kGemvMaxRows = 16;

using cuda_launch::device_info;
using cuda_launch::DeviceInfo;
using cuda_launch::poison_output;

cuda::Int8DType to_kernel_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::Int8DType::kFloat32;
    case at::kHalf:
      return cuda::Int8DType::kFloat16;
    case at::kBFloat16:
      return cuda::Int8DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, " (cuda backend): ", t,
                  " is not supported; use the cpu or torch backend");
  }
}

// Shared body of both ops. `act` is x (forward) or dy (transposed), already checked.
at::Tensor run_int8(const char* op, const at::Tensor& act, const at::Tensor& qweight,
                    const at::Tensor& scales, const at::Tensor& bias, int64_t group,
                    bool transposed) {
  TORCH_CHECK(act.scalar_type() != at::kDouble, op,
              " (cuda backend): float64 is not supported; use the cpu or torch backend");
  const cuda::Int8DType dtype = to_kernel_dtype(op, act.scalar_type());
  TORCH_CHECK(act.is_cuda(), op, " (cuda backend): tensors must be on a CUDA device, got ",
              act.device());
  const c10::cuda::CUDAGuard device_guard(act.device());

  const int64_t N = qweight.size(0);
  const int64_t K = qweight.size(1);
  const int64_t in_features = transposed ? N : K;
  const int64_t out_features = transposed ? K : N;

  // Output allocated directly in its final shape (contiguous), not as a view of a 2-D buffer.
  std::vector<int64_t> out_shape(act.sizes().begin(), act.sizes().end());
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, act.options());
  if (poison_output()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  const int64_t M = act.numel() / in_features;  // in_features >= 1 (checked)
  if (M == 0) return y;

  const at::Tensor a2d = act.reshape({M, in_features}).contiguous();
  const at::Tensor q_c = qweight.contiguous();
  const at::Tensor s_c = scales.contiguous();
  const at::Tensor b_c = bias.defined() ? bias.contiguous() : at::Tensor();

  cuda::Int8Args args;
  args.a = a2d.data_ptr();
  args.qweight = static_cast<const int8_t*>(q_c.data_ptr());
  args.scales = s_c.data_ptr();
  args.bias = b_c.defined() ? b_c.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.M = M;
  args.N = N;
  args.K = K;
  args.group_size = group;
  args.transposed = transposed;
  args.dtype = dtype;

  const int device = act.get_device();
  const DeviceInfo info = device_info(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  const bool tensor_cores =
      dtype != cuda::Int8DType::kFloat32 && M > kGemvMaxRows && info.cc_major >= 8;
  if (tensor_cores) {
    C10_CUDA_CHECK(cuda::launch_int8_gemm_tc(args, info.num_sms, stream));
  } else {
    const size_t bytes = cuda::int8_gemv_workspace_bytes(args, info.num_sms);
    // float32 elements, rounded up; the caching allocator's blocks are 16-byte aligned and
    // stream-ordered, so freeing it when this function returns is safe.
    const at::Tensor workspace =
        at::empty({static_cast<int64_t>((bytes + 3) / 4)}, act.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::launch_int8_gemv(args, bytes > 0 ? workspace.data_ptr() : nullptr,
                                          info.num_sms, stream));
  }
  return y;
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  const int64_t group = check_int8_linear_args(x, qweight, scales, bias);
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  return run_int8("int8_linear", x, qweight, scales, b, group, /*transposed=*/false);
}

at::Tensor int8_linear_grad_input_cuda(const at::Tensor& dy, const at::Tensor& qweight,
                                       const at::Tensor& scales) {
  const int64_t group = check_int8_grad_input_args(dy, qweight, scales);
  return run_int8("int8_linear_grad_input", dy, qweight, scales, at::Tensor(), group,
                  /*transposed=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("int8_linear_grad_input", &int8_linear_grad_input_cuda);
}

}  // namespace lrkernels
