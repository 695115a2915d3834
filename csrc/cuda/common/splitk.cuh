// Deterministic split-K reduction inside one launch, without spin-waits: the blocks that share an
// output tile each store their partial result to global memory and arrive at the tile's counter;
// the block that arrives last (and only it) reads every partial and reduces them in a fixed order
// (slice 0, 1, ..., S - 1), so the result does not depend on which block came last. No atomics
// touch values, only the counter. CUDA headers only.
//
// Counters: one uint32 per tile, zero when the launch starts. The last block resets its counter
// to zero, so a zeroed counter array stays zeroed across launches that use it one after another
// on a stream (the host zeroes it once and may keep it). Two launches running at the same time
// must not share counters.
//
// Memory ordering (PTX memory model): each thread fences its partial stores (fence.sc.gpu via
// __threadfence) before the block's arrival, the arrival is an atomic, and the last block fences
// again before it reads; it reads the partials through L2 (ld.global.cg, __ldcg), never a stale L1
// line. The CPU emulation runs atomics and fences sequentially consistent (tests/cuda_emulation).
#pragma once

#include <cuda_runtime.h>

namespace lrkernels {
namespace cuda {
namespace splitk {

// Called by every thread of the block after it stored its share of the block's partial tile.
// Returns, in every thread, whether this block is the last of `expected` blocks to arrive at
// `counter`. `flag` is a __shared__ int of the block (any value on entry; its contents are
// clobbered). Contains two __syncthreads: every thread of the block must call it.
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned expected, int* flag) {
  __threadfence();  // this thread's partial stores are visible device-wide before the arrival
  __syncthreads();  // ... for every thread of the block
  if (threadIdx.x == 0) {
    const unsigned before = atomicAdd(counter, 1u);
    const bool last = before + 1u == expected;
    if (last) atomicExch(counter, 0u);  // every block has arrived: ready for the next launch
    *flag = last ? 1 : 0;
  }
  __syncthreads();
  const bool last = *flag != 0;
  if (last) __threadfence();  // order this block's partial loads after the observed arrivals
  return last;
}

}  // namespace splitk
}  // namespace cuda
}  // namespace lrkernels
