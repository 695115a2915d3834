// Every op schema of the library, defined once. Implementations register per dispatch key in
// cpu/ and cuda/; fake (meta) implementations and autograd are registered from Python
// (lrkernels/ops/), where torch.library gives them to torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(lrkernels, m) {
  // y = (x · Vᵀ) · Uᵀ + bias; x (..., in), V (rank, in), U (out, rank), bias (out,) -> (..., out)
  m.def("lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor? bias=None) -> Tensor");
  // y = x · dequant(qweight, scales)ᵀ + bias; x (..., K), qweight int8 (N, K),
  // scales (N,) per output channel or (N, K / group) per group, in x's dtype -> (..., N)
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor");
  // dx = dy · dequant(qweight, scales): the input gradient of int8_linear, dy (..., N) -> (..., K)
  m.def("int8_linear_grad_input(Tensor dy, Tensor qweight, Tensor scales) -> Tensor");
}
