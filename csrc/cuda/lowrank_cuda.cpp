// CUDA kernel of lrkernels::lowrank_linear(x, U, V, bias) = (x · Vᵀ) · Uᵀ + bias.
//   x (..., in), V (rank, in), U (out, rank), bias (out) or None -> y (..., out), same dtype
//   (float32 / float16 / bfloat16), float32 accumulation.
// Torch-side glue only (compiled by the host compiler, no device code): argument checks, device
// guard, the plan (lowrank_kernels.cuh: path, tiles, split count), workspace, the persistent split
// counters, stream. U and V are passed with their strides: the transposed views of the input
// gradient (dx = lowrank(dy, Vᵀ, Uᵀ)) are read in place by the tensor-core kernels (the float32
// path, which reads row-major factors, copies them).
//
// Plan overrides, read per call (benchmarks' A/Bs and tests; unset = the planner's choice):
//   LRKERNELS_LOWRANK_FILL_MARGIN=X  a grid of >= 2 blocks per SM only within X times the cost
//                                    model's best (1.0: the model's best; bench/lowrank.py's
//                                    lrkernels-cuda-modelbest provider)
//   LRKERNELS_LOWRANK_SPLITS=N       force N slices of `in` (clamped so that none is empty)
//   LRKERNELS_LOWRANK_REDUCE=last|sep  who sums a split tensor-core `down`'s partials

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
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

// `n` zeroed uint32 split counters for a launch on `stream`. The kernels leave them zeroed, so one
// buffer per (device, stream) is zeroed once and reused by every later launch on that stream
// (stream order keeps two launches from sharing it at the same time; no memset per call). While
// the stream is being captured into a CUDA graph, a fresh zeroed buffer is allocated instead (its
// zeroing becomes a graph node): a cached buffer could be shared by replays on other streams.
unsigned* split_counters(const at::Device& device, cudaStream_t stream, size_t n,
                         at::Tensor* holder) {
  if (n == 0) return nullptr;
  const auto options = at::TensorOptions().device(device).dtype(at::kInt);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    *holder = at::zeros({static_cast<int64_t>(n)}, options);
    return static_cast<unsigned*>(holder->data_ptr());
  }
  static std::mutex mutex;
  // Never destroyed: tensors freed after the caching allocator at exit would crash.
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[{device.index(), stream}];
  if (!buffer.defined() || static_cast<size_t>(buffer.numel()) < n) {
    // Zeroed on `stream`, before the launch; the old buffer is freed in stream order.
    const int64_t size = std::max<int64_t>(
        {4096, static_cast<int64_t>(n), buffer.defined() ? 2 * buffer.numel() : 0});
    buffer = at::zeros({size}, options);
  }
  *holder = buffer;
  return static_cast<unsigned*>(buffer.data_ptr());
}

cuda::PlanOptions plan_options_from_env() {
  cuda::PlanOptions o;
  if (const char* v = std::getenv("LRKERNELS_LOWRANK_FILL_MARGIN")) o.fill_margin = std::atof(v);
  if (const char* v = std::getenv("LRKERNELS_LOWRANK_SPLITS")) o.splits = std::atoi(v);
  if (const char* v = std::getenv("LRKERNELS_LOWRANK_REDUCE")) {
    const std::string r = v;
    TORCH_CHECK(r == "last" || r == "sep",
                "LRKERNELS_LOWRANK_REDUCE must be 'last' or 'sep', got '", r, "'");
    o.reduce = static_cast<int>(r == "last" ? cuda::Reduce::kLastBlock : cuda::Reduce::kSeparate);
  }
  return o;
}

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias) {
  check_lowrank_linear_args(x, U, V, bias);
  const cuda::DType dtype = to_kernel_dtype(x.scalar_type());  // before any allocation
  const c10::cuda::CUDAGuard device_guard(x.device());

  const int64_t in = x.size(-1);
  const int64_t rank = V.size(0);
  const int64_t out = U.size(0);
  at::Tensor x2d = x.reshape({-1, in});
  const int64_t M = x2d.size(0);
  if (x2d.stride(1) != 1 || (M > 1 && x2d.stride(0) < in)) x2d = x2d.contiguous();
  at::Tensor U_k = U, V_k = V;  // strided views are read in place on the tensor-core path
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->contiguous();

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  at::Tensor y = at::empty({M, out}, x.options());
  if (poison_output()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  if (M == 0) return y.reshape(out_shape);

  const int device = x.get_device();
  const DeviceInfo info = device_info(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  cuda::LowRankArgs args;
  args.x = x2d.data_ptr();
  args.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.M = M;
  args.in = in;
  args.out = out;
  args.rank = rank;
  args.ldx = M > 1 ? x2d.stride(0) : in;
  args.dtype = dtype;
  auto set_factors = [&] {
    args.U = U_k.data_ptr();
    args.V = V_k.data_ptr();
    args.v_sj = V_k.stride(0);
    args.v_sk = V_k.stride(1);
    args.u_sn = U_k.stride(0);
    args.u_sj = U_k.stride(1);
  };
  set_factors();
  const cuda::LowRankPlan plan =
      cuda::plan_lowrank(args, {info.num_sms, info.cc_major}, plan_options_from_env());
  if (plan.path == cuda::Path::kGemv && !(V_k.is_contiguous() && U_k.is_contiguous())) {
    U_k = U_k.contiguous();  // the CUDA-core path reads row-major factors (its plan does not
    V_k = V_k.contiguous();  // depend on their strides)
    set_factors();
  }

  const size_t ws_bytes = cuda::workspace_bytes(plan);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                                         x.options().dtype(at::kByte));
  at::Tensor counters_holder;
  unsigned* counters = split_counters(x.device(), stream, plan.counters, &counters_holder);
  C10_CUDA_CHECK(cuda::launch_lowrank(args, plan, workspace.data_ptr(), ws_bytes, counters,
                                      plan.counters, stream));
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) { m.impl("lowrank_linear", &lowrank_linear_cuda); }

}  // namespace lrkernels
