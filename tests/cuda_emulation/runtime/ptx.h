// Emulation of the inline PTX the kernels use; generate.py rewrites each recognised asm statement
// into a call of the function named in its PTX_FORMS table (one table row per exact instruction
// form; any other asm is a generation error).
//
// Unlike nvcuda::wmma, these instructions have a documented lane layout (PTX ISA, "Matrix
// fragments for mma.m16n8k16" and "ldmatrix"), and it is emulated exactly: every lane receives
// precisely the elements the hardware gives it, so a kernel's fragment index arithmetic is
// tested. Products of 16-bit inputs are exact in float; each output sums k = 0..15 in order onto
// the accumulator (tensor-core internal rounding is not modelled).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu.h"

namespace emu {

// Shared-window addresses (what __cvta_generic_to_shared returns and ldmatrix takes): the
// block's static shared arena at [0, kArenaBytes), its dynamic shared memory from kDynBase.
constexpr size_t kDynBase = (kArenaBytes + 4095) / 4096 * 4096;

inline size_t cvta_generic_to_shared(const void* p) {
  const BlockState& b = *self().blk;
  const auto* c = static_cast<const unsigned char*>(p);
  if (c >= b.arena && c < b.arena + kArenaBytes) return static_cast<size_t>(c - b.arena);
  if (b.dyn_smem != nullptr && c >= b.dyn_smem && c < b.dyn_smem + b.dyn_bytes) {
    return kDynBase + static_cast<size_t>(c - b.dyn_smem);
  }
  device_fatal("__cvta_generic_to_shared of a pointer outside shared memory");
}

// The host pointer of `bytes` bytes at shared-window address `addr` of the running block.
inline const unsigned char* shared_at(uint32_t addr, size_t bytes) {
  const BlockState& b = *self().blk;
  if (addr + bytes <= kArenaBytes) return b.arena + addr;
  if (addr >= kDynBase && addr - kDynBase + bytes <= b.dyn_bytes)
    return b.dyn_smem + (addr - kDynBase);
  device_fatal("shared-window address outside the block's shared memory");
}

namespace ptx {

enum : uint32_t { kLdmatrix = 100, kMma };

template <class T>
float half_bits_to_float(uint32_t bits) {
  const auto h = static_cast<unsigned short>(bits & 0xffffu);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(h));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(h));
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 {r0, r1, r2, r3}, [addr]: lanes 8i .. 8i + 7
// give the addresses of rows 0..7 of matrix i (16 bytes each, 16-byte aligned); register i of
// lane l gets elements (l / 4, 2 (l % 4) + h), h = 0, 1 (low half first), of matrix i, or with
// .trans elements (2 (l % 4) + h, l / 4).
template <bool kTrans>
void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  const ExchangeSlot* row = warp_exchange(kLdmatrix, addr);
  const int lane = self().lane;
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) {
    out[i] = 0;
    for (int h = 0; h < 2; ++h) {
      const int r = kTrans ? 2 * (lane % 4) + h : lane / 4;
      const int c = kTrans ? lane / 4 : 2 * (lane % 4) + h;
      const auto row_addr = lane_value<uint32_t>(row, 8 * i + r);
      if (row_addr % 16 != 0) device_fatal("ldmatrix: row address not 16-byte aligned");
      unsigned short e;
      std::memcpy(&e, shared_at(row_addr, 16) + 2 * c, 2);
      out[i] |= static_cast<uint32_t>(e) << (16 * h);
    }
  }
  r0 = out[0];
  r1 = out[1];
  r2 = out[2];
  r3 = out[3];
}

// ldmatrix .x1 / .x2: as .x4 for the first one / two matrices (lanes 0..7 / 0..15 give the row
// addresses; the other lanes' addresses are ignored).
template <int kN, bool kTrans>
void ldmatrix_xn(uint32_t* out, uint32_t addr) {
  const ExchangeSlot* row = warp_exchange(kLdmatrix, addr);
  const int lane = self().lane;
  for (int i = 0; i < kN; ++i) {
    out[i] = 0;
    for (int h = 0; h < 2; ++h) {
      const int r = kTrans ? 2 * (lane % 4) + h : lane / 4;
      const int c = kTrans ? lane / 4 : 2 * (lane % 4) + h;
      const auto row_addr = lane_value<uint32_t>(row, 8 * i + r);
      if (row_addr % 16 != 0) device_fatal("ldmatrix: row address not 16-byte aligned");
      unsigned short e;
      std::memcpy(&e, shared_at(row_addr, 16) + 2 * c, 2);
      out[i] |= static_cast<uint32_t>(e) << (16 * h);
    }
  }
}
template <bool kTrans>
void ldmatrix_x1(uint32_t& r0, uint32_t addr) {
  ldmatrix_xn<1, kTrans>(&r0, addr);
}
template <bool kTrans>
void ldmatrix_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  uint32_t out[2];
  ldmatrix_xn<2, kTrans>(out, addr);
  r0 = out[0];
  r1 = out[1];
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: queued on the issuing thread (emu.h
// AsyncCopies) and performed when the thread waits for its group. src_bytes is 0 or 16 (the
// zero-fill form the kernels use); both addresses must be 16-byte aligned.
inline void cp_async_16(uint32_t dst_addr, const void* src, uint32_t src_bytes) {
  if (dst_addr % 16 != 0) device_fatal("cp.async: shared address not 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    device_fatal("cp.async: global address not 16-byte aligned");
  }
  if (src_bytes != 0 && src_bytes != 16) device_fatal("cp.async: src-size must be 0 or 16 here");
  auto* dst = const_cast<unsigned char*>(shared_at(dst_addr, 16));
  self().async.copies.push_back({dst, static_cast<const unsigned char*>(src), 16, src_bytes});
}

// cp.async.commit_group: the copies issued since the previous commit form one group.
inline void cp_async_commit() {
  AsyncCopies& a = self().async;
  a.group_ends.push_back(a.copies.size());
}

// cp.async.wait_group n: completes every committed group but the n most recent ones.
inline void cp_async_wait_group(int n) {
  AsyncCopies& a = self().async;
  const int groups = static_cast<int>(a.group_ends.size());
  if (groups <= n) return;
  const size_t done = a.group_ends[static_cast<size_t>(groups - n - 1)];
  for (size_t i = 0; i < done; ++i) {
    const AsyncCopy& c = a.copies[i];
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(c.dst + c.src_bytes, 0, c.size - c.src_bytes);
  }
  a.copies.erase(a.copies.begin(), a.copies.begin() + static_cast<std::ptrdiff_t>(done));
  a.group_ends.erase(a.group_ends.begin(), a.group_ends.begin() + (groups - n));
  for (size_t& e : a.group_ends) e -= done;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A · B + C with C = D:
// with g = lane / 4, t = lane % 4 and h = 0, 1 (low half first):
//   a0: A(g, 2t + h)  a1: A(g + 8, 2t + h)  a2: A(g, 2t + 8 + h)  a3: A(g + 8, 2t + 8 + h)
//   b0: B(2t + h, g)  b1: B(2t + 8 + h, g)
//   d0, d1: D(g, 2t), D(g, 2t + 1)  d2, d3: D(g + 8, 2t), D(g + 8, 2t + 1)
template <class T>
void mma_m16n8k16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                  uint32_t a3, uint32_t b0, uint32_t b1) {
  struct Regs {
    uint32_t a[4];
    uint32_t b[2];
  };
  const ExchangeSlot* row = warp_exchange(kMma, Regs{{a0, a1, a2, a3}, {b0, b1}});
  const int lane = self().lane;
  const int g = lane / 4, t = lane % 4;
  // Rows g and g + 8 of A from the four lanes of group g; columns 2t, 2t + 1 of B from the
  // lanes of groups 2t and 2t + 1.
  float arow[2][16], bcol[2][16];
  for (int tt = 0; tt < 4; ++tt) {
    const Regs ra = lane_value<Regs>(row, 4 * g + tt);
    for (int h = 0; h < 2; ++h) {
      arow[0][2 * tt + h] = half_bits_to_float<T>(ra.a[0] >> (16 * h));
      arow[1][2 * tt + h] = half_bits_to_float<T>(ra.a[1] >> (16 * h));
      arow[0][2 * tt + 8 + h] = half_bits_to_float<T>(ra.a[2] >> (16 * h));
      arow[1][2 * tt + 8 + h] = half_bits_to_float<T>(ra.a[3] >> (16 * h));
    }
    for (int j = 0; j < 2; ++j) {
      const Regs rb = lane_value<Regs>(row, 4 * (2 * t + j) + tt);
      for (int h = 0; h < 2; ++h) {
        bcol[j][2 * tt + h] = half_bits_to_float<T>(rb.b[0] >> (16 * h));
        bcol[j][2 * tt + 8 + h] = half_bits_to_float<T>(rb.b[1] >> (16 * h));
      }
    }
  }
  float* d[4] = {&d0, &d1, &d2, &d3};
  for (int e = 0; e < 4; ++e) {
    float s = *d[e];
    for (int k = 0; k < 16; ++k) s += arow[e / 2][k] * bcol[e % 2][k];
    *d[e] = s;
  }
}

// ex2.approx.ftz.f32 d, a: d = 2^a with subnormal inputs and results flushed to zero of the
// same sign (PTX ISA); the hardware's result is within 2^-22 relative of 2^a, this one is
// exact to float rounding.
inline void ex2_approx_ftz(float& d, float a) {
  const auto flush = [](float x) {
    return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x;
  };
  d = flush(std::exp2(flush(a)));
}

}  // namespace ptx
}  // namespace emu
