// The int8 family's CUDA forward for other op families (the LoRA ops, csrc/cuda/lora_cuda.cpp):
// torch-side glue compiled by the host compiler, defined in int8_cuda.cpp, so that the weight
// layout, the operand forms the kernels need and the split-K buffers stay the int8 family's own
// (the tensor-core kernel also streams a dense 16-bit weight for the LoRA ops' dense base).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "int8_kernels.cuh"

namespace lrkernels {
namespace int8_cuda {

// True when the tensor-core kernels can run act's dtype on its device (float16 / bfloat16,
// compute capability >= 8.0).
bool tensor_cores_available(const at::Tensor& act);

// Plain (N, K) int8 weight -> packed layout 2 (K % 16 == 0): one permuting copy.
at::Tensor pack(const at::Tensor& qweight);

// y (M, N) = x2d (M, K) · Wᵀ + bias (+ the low-rank addend, int8_kernels.cuh) on the tensor-core
// kernel, W packed (qpacked (ceil(N / 32), K / 16, 512), scales (N,) or (N, K / group)), written
// into y2d (M, N) contiguous in x's dtype. Checked arguments only (the caller's op checks them):
// float16 / bfloat16 on a device where tensor_cores_available.
// after_shrink: the previous kernel in the stream is the one that writes the addend's t_partial
// (the LoRA shrink), and nothing else the GEMM reads: launched as its programmatic dependent.
void packed_forward_into(const at::Tensor& x2d, const at::Tensor& qpacked, const at::Tensor& scales,
                         const at::Tensor& bias, int64_t group,
                         const cuda::Int8LowRankAddend* addend, bool after_shrink, at::Tensor& y2d);

// y2d (M, N) = x2d (M, K) · Wᵀ + bias + the low-rank addend, W dense (N, K) in x's dtype, on
// the same tensor-core kernel (Int8MmaArgs::dense_weight): the LoRA ops' dense base in one pass.
// Float16 / bfloat16 where tensor_cores_available, K % 8 == 0, y2d contiguous.
void dense_forward_into(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& bias,
                        const cuda::Int8LowRankAddend* addend, bool after_shrink, at::Tensor& y2d);

}  // namespace int8_cuda
}  // namespace lrkernels
