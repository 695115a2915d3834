// Every op schema of the library, defined once. Implementations register per dispatch key in
// cpu/ and cuda/; fake (meta) implementations and autograd are registered from Python
// (lrkernels/ops/), where torch.library gives them to torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(lrkernels, m) {
  // y = (x · Vᵀ) · Uᵀ + bias; x (..., in), V (rank, in), U (out, rank), bias (out,) -> (..., out)
  m.def("lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor? bias=None) -> Tensor");
}
