// Programmatic dependent launch (sm_90+): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the previous kernel of its
// stream is still running. It must call pdl_wait() before it touches anything that kernel writes
// (or reads, if it writes it); work before the wait (loading weights that no kernel in flight
// writes, address arithmetic) overlaps the previous kernel's tail. pdl_launch_dependents() lets
// the next such kernel start early (once every block of this grid has called it or exited); it
// does not publish this grid's writes: the dependent's pdl_wait() waits for this whole grid to
// complete and its memory to be visible.
//
// Both are no-ops below sm_90 and on the host (the CPU emulation runs launches one after another,
// so the previous grid has always completed). CUDA headers only.
#pragma once

#include <cuda_runtime.h>

namespace lrkernels {
namespace cuda {
namespace pdl {

__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace pdl
}  // namespace cuda
}  // namespace lrkernels
