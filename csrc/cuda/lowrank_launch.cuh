// Host-side launch helpers of the low-rank kernels: the dynamic shared-memory opt-in and
// launches as programmatic dependents (PDL, see common/pdl.cuh). CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <utility>

namespace lrkernels {
namespace cuda {
namespace lowrank_launch {

// Dynamic shared memory above 48 KiB needs an opt-in per kernel and device; done once each (a
// race between host threads only repeats the call). One instance per kernel (the template
// argument), so kernels with the same signature do not share the flag.
template <auto kKernel>
cudaError_t ensure_smem(int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && done[device].load()) return cudaSuccess;
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cached) done[device].store(true);
  return err;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the previous
// kernel in the stream when `pdl` (the kernel must call pdl::wait() before touching its inputs).
template <typename... P, typename... A>
cudaError_t launch(bool pdl, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, A&&... args) {
  if (!pdl) {
    kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  // Positional: {gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs} (the member
  // names are macros in the CPU emulation).
  cudaLaunchConfig_t config = {grid, block, smem, stream, attr, 1};
  return cudaLaunchKernelEx(&config, kernel, std::forward<A>(args)...);
}

}  // namespace lowrank_launch
}  // namespace cuda
}  // namespace lrkernels
