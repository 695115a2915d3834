// Forward instantiations of the int8 tensor-core kernels (int8_mma.cuh) and the checked entry
// point launch_int8_mma of both directions (the transposed instantiations are in
// int8_mma_tr.cu, those with a low-rank addend in int8_mma_fwd_addend.cu, the dense-weight ones
// in int8_mma_fwd_dense.cu: separate files so that they compile in parallel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int8_kernels.cuh"
#include "int8_mma.cuh"

namespace lrkernels {
namespace cuda {
namespace int8_mma {

cudaError_t launch_forward(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws, int* counters,
                           cudaStream_t stream) {
  if (a.dense_weight != nullptr) return launch_forward_dense(a, plan, ws, counters, stream);
  if (a.addend != nullptr) return launch_forward_addend(a, plan, ws, counters, stream);
  return a.dtype == Int8DType::kFloat16
             ? launch_direction<__half, false>(a, plan, ws, counters, stream)
             : launch_direction<__nv_bfloat16, false>(a, plan, ws, counters, stream);
}

}  // namespace int8_mma

namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

cudaError_t launch_int8_mma(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* workspace,
                            int* counters, cudaStream_t stream) {
  if (a.dtype != Int8DType::kFloat16 && a.dtype != Int8DType::kBFloat16) {
    return cudaErrorInvalidValue;
  }
  const bool dense = a.dense_weight != nullptr;
  // A dense weight needs 16-byte rows of K (K % 8 == 0); the packed int8 one units of 16.
  if (a.M < 0 || a.N < 1 || a.K < (dense ? 8 : 16) || a.K % (dense ? 8 : 16) != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.pdl && a.addend == nullptr) return cudaErrorInvalidValue;
  if (dense && (a.transposed || a.addend == nullptr || a.group_size != 0 ||
                !aligned16(a.dense_weight) || a.ldw % 8 != 0 || a.ldw < a.K)) {
    return cudaErrorInvalidValue;
  }
  const int64_t G = a.group_size;
  if (G != 0 && G != 32 && G != 64 && G != 128) return cudaErrorInvalidValue;
  if (G != 0 && a.K % G != 0) return cudaErrorInvalidValue;
  if (a.transposed && a.bias != nullptr) return cudaErrorInvalidValue;
  if (a.addend != nullptr) {
    const Int8LowRankAddend& ad = *a.addend;
    if (a.transposed || ad.rank < 1 || ad.rank > kInt8MaxAddendRank || ad.t_splits < 1 ||
        ad.n_sets < 1 || (a.M > 0 && (ad.t_partial == nullptr || ad.B == nullptr))) {
      return cudaErrorInvalidValue;
    }
  }
  const int64_t R = a.transposed ? a.N : a.K;
  const int64_t C = a.transposed ? a.K : a.N;
  if (a.M == 0) return cudaSuccess;
  if (a.a == nullptr || a.y == nullptr ||
      (!dense && (a.qpacked == nullptr || a.scales == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (!aligned16(a.a) || a.lda % 8 != 0 || a.lda < R || R % 8 != 0) return cudaErrorInvalidValue;
  if ((!dense && !aligned16(a.qpacked)) || a.ldy < C) return cudaErrorInvalidValue;
  const bool staged_scales = G > 0 || a.transposed;
  if (staged_scales && !aligned16(a.scales)) return cudaErrorInvalidValue;
  if (G > 0 && (a.sld % 8 != 0 || a.sld < a.N)) return cudaErrorInvalidValue;
  if (plan.grid < 1 || plan.grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (plan.splits > 1 && (workspace == nullptr || counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return a.transposed ? int8_mma::launch_transposed(a, plan, workspace, counters, stream)
                      : int8_mma::launch_forward(a, plan, workspace, counters, stream);
}

}  // namespace cuda
}  // namespace lrkernels
