// Forward instantiations of the tensor-core kernel family of int8_mma.cuh on a dense 16-bit
// weight (Int8MmaArgs::dense_weight) with the low-rank addend: the LoRA ops' dense base
// (csrc/cuda/lora_cuda.cpp) in one pass — the base product, s · t · Bᵀ and the bias in the
// epilogue. Reached through launch_int8_mma (int8_mma_fwd.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "int8_kernels.cuh"
#include "int8_mma.cuh"

namespace lrkernels {
namespace cuda {
namespace int8_mma {

cudaError_t launch_forward_dense(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws,
                                 int* counters, cudaStream_t stream) {
  return a.dtype == Int8DType::kFloat16
             ? launch_direction<__half, false, true, true>(a, plan, ws, counters, stream)
             : launch_direction<__nv_bfloat16, false, true, true>(a, plan, ws, counters, stream);
}

}  // namespace int8_mma
}  // namespace cuda
}  // namespace lrkernels
