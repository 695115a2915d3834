// Emulation of the nvcuda::wmma subset the kernels use (m16n16k16, __half / __nv_bfloat16 inputs,
// float accumulators). Found instead of the toolkit's <mma.h> because the build puts this
// directory first on the include path.
//
// Emulated: every *_sync call is a warp collective (all 32 lanes must make the same call with the
// same pointer / ldm / layout, else abort); pointers must be 32-byte aligned and ldm a multiple
// of 16 bytes, as the CUDA programming guide requires; mma_sync accumulates in float (products of
// 16-bit inputs are exact in float; the sum runs k = 0..15 in order).
// Not emulated: the lane layout of fragments. Lane 0 holds the whole 16 x 16 tile and does the
// loads, the product and the stores for its warp; the other lanes' fragments are unused. So
// element access (fragment::x, num_elements) is deliberately absent, and a stored tile is only
// complete for the warp's other lanes after a __syncwarp (on hardware a lane cannot know which
// elements it stored itself either). Tensor-core rounding details (truncation inside the sum)
// are not modelled.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 fragments are emulated");
  float tile[16][16];  // meaningful in lane 0 only
};

namespace detail {

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
T from_f(float v);
template <>
inline float from_f<float>(float v) {
  return v;
}
template <>
inline __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

struct MemArgs {
  const void* ptr;
  unsigned ldm;
  int layout;  // 0: row major, 1: column major
};

// The warp collective of a load / store: checks that all lanes pass the same arguments and the
// alignment rules; true in lane 0, which then does the whole warp's memory access.
template <class T>
bool mem_collective(uint32_t kind, const T* ptr, unsigned ldm, int layout, const char* what) {
  const MemArgs mine{ptr, ldm, layout};
  const emu::ExchangeSlot* row = emu::warp_exchange(kind, mine);
  if (emu::self().lane != 0) return false;
  for (int l = 0; l < emu::kWarpSize; ++l) {
    const MemArgs other = emu::lane_value<MemArgs>(row, l);
    if (other.ptr != ptr || other.ldm != ldm || other.layout != layout) {
      emu::device_fatal(what);
    }
  }
  if ((reinterpret_cast<uintptr_t>(ptr) & 31u) != 0) {
    emu::device_fatal("wmma: pointer not 32-byte (256-bit) aligned");
  }
  if ((static_cast<size_t>(ldm) * sizeof(T)) % 16 != 0) {
    emu::device_fatal("wmma: ldm not a multiple of 16 bytes");
  }
  return true;
}

template <class T>
void load_tile(float (&tile)[16][16], const T* p, unsigned ldm, bool row_major) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      tile[r][c] = to_f(row_major ? p[r * ldm + c] : p[r + c * ldm]);
    }
  }
}

}  // namespace detail

template <class Use, class T, class L, class V>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, const V& v) {
  const float x = detail::to_f(v);
  for (auto& row : f.tile) {
    for (auto& e : row) e = x;
  }
}

template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  constexpr bool kRow = std::is_same_v<L, row_major>;
  if (detail::mem_collective(emu::kWmmaLoad, p, ldm, kRow ? 0 : 1,
                             "wmma::load_matrix_sync: arguments differ between lanes")) {
    detail::load_tile(f.tile, p, ldm, kRow);
  }
}

template <class T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm,
                      layout_t layout) {
  if (detail::mem_collective(emu::kWmmaLoad, p, ldm, layout == mem_row_major ? 0 : 1,
                             "wmma::load_matrix_sync: arguments differ between lanes")) {
    detail::load_tile(f.tile, p, ldm, layout == mem_row_major);
  }
}

template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "wmma inputs: __half or __nv_bfloat16");
  emu::warp_exchange(emu::kWmmaMma, 0);
  if (emu::self().lane != 0) return;
  float r[16][16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float s = c.tile[i][j];
      for (int k = 0; k < 16; ++k) s += a.tile[i][k] * b.tile[k][j];
      r[i][j] = s;
    }
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) d.tile[i][j] = r[i][j];  // d may alias c
  }
}

template <class T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                       layout_t layout) {
  const bool row = layout == mem_row_major;
  if (!detail::mem_collective(emu::kWmmaStore, p, ldm, row ? 0 : 1,
                              "wmma::store_matrix_sync: arguments differ between lanes")) {
    return;
  }
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c)
      (row ? p[r * ldm + c] : p[r + c * ldm]) = detail::from_f<T>(f.tile[r][c]);
  }
}

}  // namespace wmma
}  // namespace nvcuda
