"""CPU emulation of the CUDA kernels (see README.md)."""
