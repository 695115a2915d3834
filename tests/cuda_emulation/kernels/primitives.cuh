// Launch API of the primitives check kernel (kernels/primitives.cu): exercises every function of
// csrc/cuda/common/ptx.cuh once, in the emulation only (never built into the extension).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace emu_check {

// a: 16 x 16 row-major; b: 16 x 8 row-major (k x n); bt: 8 x 16 row-major (= bᵀ); all T, 16-byte
// aligned. Rows k >= kvalid of b and columns k >= kvalid of bt are read as zero (cp.async
// zero-fill). d: 3 x (16 x 8) float, the product a · b computed three ways (B fragments from b
// through ldmatrix .x2.trans, from bt through .x2, from bt through two .x1).
template <class T>
cudaError_t launch_primitives_check(const T* a, const T* b, const T* bt, int kvalid, float* d);

}  // namespace emu_check
