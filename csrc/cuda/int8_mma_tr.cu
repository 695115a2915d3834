// Transposed (input-gradient) instantiations of the int8 tensor-core kernels (int8_mma.cuh):
// dx (M, K) = dy (M, N) · W.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "int8_kernels.cuh"
#include "int8_mma.cuh"

namespace lrkernels {
namespace cuda {
namespace int8_mma {

cudaError_t launch_transposed(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws,
                              int* counters, cudaStream_t stream) {
  return a.dtype == Int8DType::kFloat16
             ? launch_direction<__half, true>(a, plan, ws, counters, stream)
             : launch_direction<__nv_bfloat16, true>(a, plan, ws, counters, stream);
}

}  // namespace int8_mma
}  // namespace cuda
}  // namespace lrkernels
