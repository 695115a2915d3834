// Forward instantiations of the int8 tensor-core kernels (int8_mma.cuh) with the low-rank addend
// of int8_kernels.cuh (the LoRA expand fused into the epilogue; csrc/cuda/lora_cuda.cpp), reached
// through launch_int8_mma (int8_mma_fwd.cu) when args.addend is set.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "int8_kernels.cuh"
#include "int8_mma.cuh"

namespace lrkernels {
namespace cuda {
namespace int8_mma {

cudaError_t launch_forward_addend(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws,
                                  int* counters, cudaStream_t stream) {
  return a.dtype == Int8DType::kFloat16
             ? launch_direction<__half, false, true>(a, plan, ws, counters, stream)
             : launch_direction<__nv_bfloat16, false, true>(a, plan, ws, counters, stream);
}

}  // namespace int8_mma
}  // namespace cuda
}  // namespace lrkernels
