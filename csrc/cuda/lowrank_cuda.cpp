// CUDA kernel of lrkernels::lowrank_linear(x, U, V, bias) = (x · Vᵀ) · Uᵀ + bias.
//   x (..., in), V (rank, in), U (out, rank), bias (out) or None -> y (..., out), same dtype
//   (float32 / float16 / bfloat16), float32 accumulation.
// Torch-side glue only (compiled by the host compiler, no device code): argument checks,
// device guard, contiguity, allocation, path choice, stream. The kernels are behind the
// torch-free API of lowrank_kernels.cuh.
// Paths:
//   * tensor-core fused (lowrank_fused_tc.cu): float16 / bfloat16, M > 16, rank <= 512,
//     compute capability >= 8.0;
//   * gemv (lowrank_gemv.cu): everything else, i.e. decode-sized M, float32 at any M, and
//     16-bit ranks above 512 (slow fallback).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <vector>

#include "../common/checks.h"
#include "launch_utils.h"
#include "lowrank_kernels.cuh"

namespace lrkernels {
namespace {

using cuda_launch::device_info;
using cuda_launch::DeviceInfo;
using cuda_launch::poison_output;

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(
          false, "lowrank_linear: the CUDA kernel supports float32, float16 and bfloat16, got ", t);
  }
}

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias) {
  check_lowrank_linear_args(x, U, V, bias);
  const cuda::DType dtype = to_kernel_dtype(x.scalar_type());  // before any allocation
  const c10::cuda::CUDAGuard device_guard(x.device());

  const int64_t in = x.size(-1);
  const int64_t rank = V.size(0);
  const int64_t out = U.size(0);
  const at::Tensor x2d = x.reshape({-1, in}).contiguous();
  const at::Tensor U_c = U.contiguous();
  const at::Tensor V_c = V.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->contiguous();
  const int64_t M = x2d.size(0);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  at::Tensor y = at::empty({M, out}, x.options());
  if (poison_output()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  if (M == 0) return y.reshape(out_shape);

  cuda::LowRankArgs args;
  args.x = x2d.data_ptr();
  args.U = U_c.data_ptr();
  args.V = V_c.data_ptr();
  args.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.M = M;
  args.in = in;
  args.out = out;
  args.rank = rank;
  args.dtype = dtype;

  const int device = x.get_device();
  const DeviceInfo info = device_info(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  const bool fused = args.dtype != cuda::DType::kFloat32 && M > cuda::kGemvMaxRows &&
                     rank <= cuda::kMaxFusedRank && info.cc_major >= 8;
  if (fused) {
    C10_CUDA_CHECK(cuda::launch_lowrank_fused_tc(args, info.num_sms, stream));
  } else {
    const size_t bytes = cuda::lowrank_gemv_workspace_bytes(args, info.num_sms);
    // float32 elements, rounded up; the caching allocator's blocks are 16-byte aligned and
    // stream-ordered, so freeing it when this function returns is safe.
    const at::Tensor workspace =
        at::empty({static_cast<int64_t>((bytes + 3) / 4)}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(
        cuda::launch_lowrank_gemv(args, info.num_sms, workspace.data_ptr(), bytes, stream));
  }
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) { m.impl("lowrank_linear", &lowrank_linear_cuda); }

}  // namespace lrkernels
