"""Triton kernels for lrkernels (fused low-rank linear: y = (x @ V.T) @ U.T + bias)."""
