"""The static kernel report (``python scripts/kernel_report.py``): what a kernel engineer reads
before the profiler, computed on a machine without a GPU.

Modules, one job each:

- `device` — the H200's limits, occupancy (blocks per SM) and waves, the measured peaks;
- `sass` — cuobjdump / nvdisasm: per-kernel registers, stack, shared memory and instruction
  classes (tensor-core MMAs, ldmatrix, asynchronous copies, local-memory spills);
- `headline` — the headline shapes of the three families and their bytes/FLOPs floors;
- `cuda_plan` — the CUDA launches of the headline shapes, from the real launch code run in the
  CPU emulation's plan mode (``EMU_PLAN_ONLY=1``, tests/cuda_emulation);
- `triton_plan` — the Triton launches of the headline shapes (the real launchers on a fake H200)
  compiled ahead of time for sm_90 (run in its own process);
- `render` — the markdown table.
"""
