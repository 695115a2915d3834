// The execution state of an emulated block: its threads (each run by a fiber, see fiber.h),
// __syncthreads / __syncwarp, warp collectives and shuffles, static and dynamic shared memory.
// launch.h runs grids of such blocks; prelude.h maps the CUDA keywords onto both.
//
// Emulated faithfully:
//   - every CUDA thread runs the kernel body as written;
//   - barriers: a thread blocks until all threads of its block (warp) arrive; a barrier that can
//     never complete (divergent __syncthreads, a thread that exited) aborts with a report;
//   - warp collectives (shuffles, wmma, ldmatrix, mma) need every lane in the same call;
//   - TSan sees exactly the ordering the barriers give (fibers are concurrent for it), so a
//     missing barrier is a reported data race even when the run happened to be in a safe order;
//   - shared memory is filled with NaN bytes (0xff) before every block, dynamic shared memory is
//     its own exactly-sized allocation and every static __shared__ array its own poisoned-around
//     region, so ASan reports overruns and unwritten data shows up as NaN; static shared memory
//     is limited to 48 KiB, static + dynamic to the device's opt-in maximum.
// Not emulated: the hardware's scheduling (threads run to their next barrier in thread order),
// the memory model beyond barrier ordering (no caches, no weak ordering; __threadfence, atomics,
// cooperative groups and partial-mask warp operations are absent and fail to compile or abort),
// bank conflicts, registers / occupancy / __launch_bounds__.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include "fiber.h"

namespace emu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr size_t kStaticRedzone = 64;  // poisoned gap between static __shared__ arrays
constexpr int kMaxStaticSlots = 64;
constexpr size_t kArenaBytes = kStaticSmemLimit + kMaxStaticSlots * (kStaticRedzone + 256);

// The emulated device: an H100's limits.
struct DeviceProps {
  int num_sms = 132;
  int smem_optin = 232448;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int cc_major = 9;
  int cc_minor = 0;
};
inline DeviceProps& device() {
  static DeviceProps props;
  return props;
}

enum ThreadState : int { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

// One deposit of a warp collective (see warp_exchange).
struct ExchangeSlot {
  uint32_t seq;
  uint32_t kind;
  alignas(16) unsigned char data[48];
};

struct Warp {
  int size = kWarpSize;
  std::atomic<int> arrived{0};
  std::atomic<int> exited{0};
  std::atomic<unsigned> generation{0};
  char hb[2] = {};  // TSan sync addresses, alternating by generation parity
  ExchangeSlot slots[2][kWarpSize] = {};
};

struct BlockState;

// The cp.async copies a thread has issued and not yet waited for (runtime/ptx.h): a copy lands
// in shared memory only when the thread waits for its group, so a read before the wait (or, by
// another thread, before the barrier after it) sees the old contents, as it may on the hardware.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  uint32_t size;       // bytes written to dst
  uint32_t src_bytes;  // bytes read from src; the rest of dst is zero-filled
};
struct AsyncCopies {
  std::vector<AsyncCopy> copies;   // issued, oldest first
  std::vector<size_t> group_ends;  // copies.size() at each commit, oldest group first
};

// One emulated CUDA thread, run by a pooled fiber.
struct Thread {
  Thread(BlockState* blk, unsigned tid, Fiber* fiber)
      : fiber(fiber),
        blk(blk),
        thread_idx(make_uint3(tid, 0, 0)),
        warp(static_cast<int>(tid) / kWarpSize),
        lane(static_cast<int>(tid) % kWarpSize) {}
  Fiber* const fiber;
  BlockState* const blk;
  const uint3 thread_idx;
  const int warp;
  const int lane;
  std::atomic<int> state{kRunnable};
  uint32_t collectives = 0;  // warp collectives this thread has entered (private)
  AsyncCopies async;         // cp.async copies in flight (private)
};

struct BlockState {
  const char* kernel_name = "";
  const std::function<void()>* body = nullptr;
  uint3 block_idx{};
  dim3 grid_dim, block_dim;
  int nthreads = 0;
  std::atomic<int> arrived{0};
  std::atomic<int> exited{0};
  std::atomic<unsigned> generation{0};
  char hb[2] = {};
  std::unique_ptr<Warp[]> warps;
  std::vector<std::unique_ptr<Thread>> threads;
  unsigned char* dyn_smem = nullptr;
  size_t dyn_bytes = 0;
  size_t smem_limit = 0;  // static + dynamic
  unsigned char* arena = nullptr;
  std::atomic<size_t> static_bytes{0};  // counted against the limits
  std::atomic<size_t> arena_used{0};    // including redzones
  std::atomic<void*> static_slots[kMaxStaticSlots] = {};
};

inline Thread& self() {
  Fiber* f = Fiber::current();
  if (f == nullptr) fatal("device code called outside a kernel launch");
  return *static_cast<Thread*>(f->arg());
}

// Aborts with the kernel, block and thread that hit the problem.
[[noreturn]] inline void device_fatal(const char* what) {
  Fiber* f = Fiber::current();
  if (f != nullptr) {
    const Thread& t = *static_cast<Thread*>(f->arg());
    std::fprintf(stderr, "emu: %s\n  in %s, blockIdx (%u,%u,%u), threadIdx.x %u\n", what,
                 t.blk->kernel_name, t.blk->block_idx.x, t.blk->block_idx.y, t.blk->block_idx.z,
                 t.thread_idx.x);
  }
  fatal(what);
}

// ------------------------------------------------------------------------------------ barriers

inline void block_barrier() {
  Thread& t = self();
  BlockState& b = *t.blk;
  if (b.exited.load(std::memory_order_relaxed) > 0) {
    device_fatal("__syncthreads after another thread of the block exited (never completes)");
  }
  const unsigned gen = b.generation.load(std::memory_order_relaxed);
  hb_release(&b.hb[gen & 1]);
  if (b.arrived.fetch_add(1, std::memory_order_relaxed) + 1 == b.nthreads) {
    b.arrived.store(0, std::memory_order_relaxed);
    b.generation.store(gen + 1, std::memory_order_relaxed);
    for (auto& u : b.threads) {
      if (u->state.load(std::memory_order_relaxed) == kAtBlockBarrier) {
        u->state.store(kRunnable, std::memory_order_relaxed);
      }
    }
  } else {
    t.state.store(kAtBlockBarrier, std::memory_order_relaxed);
    t.fiber->yield();
  }
  // The slot of this generation: a thread that already passed it and reached the next barrier
  // releases into the other slot, so this acquire sees no writes made after the barrier.
  hb_acquire(&b.hb[gen & 1]);
}

inline void warp_barrier() {
  Thread& t = self();
  BlockState& b = *t.blk;
  Warp& w = b.warps[t.warp];
  if (w.exited.load(std::memory_order_relaxed) > 0) {
    device_fatal("warp-synchronous operation after a thread of the warp exited");
  }
  const unsigned gen = w.generation.load(std::memory_order_relaxed);
  hb_release(&w.hb[gen & 1]);
  if (w.arrived.fetch_add(1, std::memory_order_relaxed) + 1 == w.size) {
    w.arrived.store(0, std::memory_order_relaxed);
    w.generation.store(gen + 1, std::memory_order_relaxed);
    const int first = t.warp * kWarpSize;
    for (int l = 0; l < w.size; ++l) {
      Thread& u = *b.threads[first + l];
      if (u.state.load(std::memory_order_relaxed) == kAtWarpBarrier) {
        u.state.store(kRunnable, std::memory_order_relaxed);
      }
    }
  } else {
    t.state.store(kAtWarpBarrier, std::memory_order_relaxed);
    t.fiber->yield();
  }
  hb_acquire(&w.hb[gen & 1]);
}

inline void syncthreads() { block_barrier(); }

inline void syncwarp(unsigned mask = kFullMask) {
  if (mask != kFullMask) device_fatal("__syncwarp with a partial mask is not emulated");
  warp_barrier();
}

// Warp collective: every lane deposits `v` (tagged with `kind`), waits for the whole warp and gets
// the row of all lanes' deposits. Lanes that are not in the same collective (different kind or a
// different number of collectives so far) are reported: on hardware that is a divergent _sync op.
// The two rows alternate: a row is rewritten two collectives later, after a barrier that every
// lane reaches only once it has finished reading it.
template <class V>
const ExchangeSlot* warp_exchange(uint32_t kind, const V& v) {
  static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= sizeof(ExchangeSlot::data));
  Thread& t = self();
  Warp& w = t.blk->warps[t.warp];
  const uint32_t seq = t.collectives++;
  ExchangeSlot* row = w.slots[seq & 1];
  row[t.lane].seq = seq;
  row[t.lane].kind = kind;
  std::memcpy(row[t.lane].data, &v, sizeof(V));
  warp_barrier();
  // Each lane compares with the next one: all equal iff every neighbour pair is.
  const ExchangeSlot& next = row[(t.lane + 1) % w.size];
  if (next.seq != seq || next.kind != kind) {
    device_fatal("lanes of a warp are in different warp collectives (divergent _sync op)");
  }
  return row;
}

enum CollectiveKind : uint32_t { kShuffle = 1, kWmmaLoad, kWmmaMma, kWmmaStore };

template <class T>
T lane_value(const ExchangeSlot* row, int lane) {
  T v;
  std::memcpy(&v, row[lane].data, sizeof(T));
  return v;
}

template <class T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = kWarpSize) {
  if (mask != kFullMask || width != kWarpSize) device_fatal("partial warp shuffle not emulated");
  const ExchangeSlot* row = warp_exchange(kShuffle, v);
  return lane_value<T>(row, (self().lane ^ lane_mask) & (kWarpSize - 1));
}

template <class T>
T shfl_down_sync(unsigned mask, T v, unsigned delta, int width = kWarpSize) {
  if (mask != kFullMask || width != kWarpSize) device_fatal("partial warp shuffle not emulated");
  const ExchangeSlot* row = warp_exchange(kShuffle, v);
  const int src = self().lane + static_cast<int>(delta);
  return src < kWarpSize ? lane_value<T>(row, src) : v;
}

template <class T>
T shfl_sync(unsigned mask, T v, int src_lane, int width = kWarpSize) {
  if (mask != kFullMask || width != kWarpSize) device_fatal("partial warp shuffle not emulated");
  const ExchangeSlot* row = warp_exchange(kShuffle, v);
  return lane_value<T>(row, src_lane & (kWarpSize - 1));
}

// ------------------------------------------------------------------------------ shared memory

inline unsigned char* dynamic_shared() { return self().blk->dyn_smem; }

// Storage of one static __shared__ declaration (slot: its number, given by the generator), made
// on first use in the block. The fibers of a block never run concurrently, so the first-use
// check needs no lock; the atomics only keep TSan from flagging the bookkeeping itself.
template <class T>
T& static_shared(int slot, size_t align) {
  BlockState& b = *self().blk;
  if (slot < 0 || slot >= kMaxStaticSlots) device_fatal("too many __shared__ declarations");
  void* p = b.static_slots[slot].load(std::memory_order_relaxed);
  if (p == nullptr) {
    align = std::max<size_t>({align, alignof(T), 16});
    const size_t used = b.arena_used.load(std::memory_order_relaxed);
    const size_t offset = (used + align - 1) / align * align;
    const size_t total = b.static_bytes.load(std::memory_order_relaxed) + sizeof(T);
    if (total > kStaticSmemLimit) device_fatal("static shared memory above 48 KiB");
    if (total + b.dyn_bytes > b.smem_limit)
      device_fatal("static + dynamic shared memory over the limit");
    if (offset + sizeof(T) > kArenaBytes) device_fatal("static shared arena exhausted");
    p = b.arena + offset;
#if EMU_ASAN
    __asan_unpoison_memory_region(p, sizeof(T));
#endif
    b.static_bytes.store(total, std::memory_order_relaxed);
    b.arena_used.store(offset + sizeof(T) + kStaticRedzone, std::memory_order_relaxed);
    b.static_slots[slot].store(p, std::memory_order_relaxed);
  }
  return *static_cast<T*>(p);
}

// Thread-local view of the running thread's block (the blockIdx / blockDim / gridDim macros).
inline const uint3& block_idx() { return self().blk->block_idx; }
inline const dim3& block_dim() { return self().blk->block_dim; }
inline const dim3& grid_dim() { return self().blk->grid_dim; }
inline const uint3& thread_idx() { return self().thread_idx; }

}  // namespace emu
