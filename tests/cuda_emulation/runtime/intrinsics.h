// Device intrinsics the kernels call, on the host (mapped by prelude.h). Exact: bit casts,
// __byte_perm, single IEEE roundings (__fmul_rn etc.; the build uses -ffp-contract=off so that
// nothing else fuses). __ldg and __ldcg are plain loads: there are no caches to model.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>

#include "emu.h"

namespace emu {

template <class T>
T ldg(const T* p) {
  return *p;
}
inline float uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// Single IEEE operations, round to nearest (the build uses -ffp-contract=off).
inline float fmul_rn(float a, float b) { return a * b; }
inline float fadd_rn(float a, float b) { return a + b; }
inline float fsub_rn(float a, float b) { return a - b; }
// Byte i of the result is byte (s >> 4i) & 7 of the 8-byte value {y:x}.
inline unsigned byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i)
    r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
[[noreturn]] inline void trap() { device_fatal("__trap()"); }

// Global-memory atomics and fences (blocks of a grid run concurrently on the worker threads, so
// these are real atomics; ThreadSanitizer sees their ordering). Sequentially consistent, which is
// at least as strong as the hardware's relaxed atomics plus __threadfence: a kernel that is wrong
// only under weaker ordering is not caught. A block that spin-waits for another block may
// deadlock here (blocks run in a shuffled order on a few workers, like a GPU without
// co-residency guarantees): use a counter whose last arriver does the work instead, or wait
// only for blocks that have already started (work handed out in the order of a global ticket
// counter, as attention_bwd.cuh does: a block runs to completion on its worker).
template <class T>
T atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_seq_cst);
}
template <class T>
T atomic_exch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v, std::memory_order_seq_cst);
}
template <class T>
T atomic_cas(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired, std::memory_order_seq_cst);
  return expected;  // the old value, as atomicCAS returns it
}
template <class T>
T atomic_max(T* p, T v) {
  std::atomic_ref<T> r(*p);
  T old = r.load(std::memory_order_seq_cst);
  while (old < v && !r.compare_exchange_weak(old, v, std::memory_order_seq_cst)) {
  }
  return old;
}
inline void threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// __nanosleep(ns), the back-off of a spin-wait: the emulated thread sleeps, which lets the block
// it waits for (on another worker) run. A spin-wait is safe only on a block that has already
// started: in the emulation as on the GPU, a block that took a ticket from a global counter
// earlier (blocks run to completion, one per worker at a time).
inline void nanosleep(unsigned ns) {
  std::this_thread::sleep_for(std::chrono::nanoseconds(ns < 1000 ? 1000 : ns));
}

}  // namespace emu
