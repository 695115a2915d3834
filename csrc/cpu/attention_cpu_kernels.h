// The blockwise CPU attention kernels (semantics: docs/attention.md), written once and compiled
// twice by attention_cpu.cpp: for the baseline x86-64 ISA (SSE2, 16-byte vectors) and, under
// `#pragma GCC target("avx2,fma")`, for AVX2 + FMA (32-byte vectors); the caller picks one at
// run time. Hence no include guard and no #include here: attention_cpu.cpp includes every header
// first (so that nothing from torch or the standard library is compiled for AVX2), then defines
//   LRK_ISA        the namespace of this copy (base / avx2)
//   LRK_VEC_BYTES  16 or 32
//   LRK_FMA        1 when fused multiply-add intrinsics may be used
//   LRK_MR         rows of the matmul micro-kernel (its register tile is LRK_MR x 2 vectors)
// and includes this file. Everything is in an anonymous namespace of attention_cpu.cpp.
//
// Design (per forward task = one (batch, head, query block); per backward task = one
// (batch, query head)):
// - the score tile is kept transposed, Sᵀ (keys x query rows), computed as K·Qᵀ with Qᵀ packed
//   once per query block: the softmax statistics of the query rows are then vectors (column max,
//   exp2, column sums run along Sᵀ's rows), and the second products read Pᵀ / dSᵀ either way
//   round through the matmul's A strides. float32 / float64 inputs with D a multiple of 16 are
//   read in place (K, V: no per-block copy); otherwise K / V tiles are packed (converted, padded
//   to Dp = D rounded up to 16 with zeros). Query columns are padded to a multiple of 16 too.
// - every product is C[M x N] (+)= A·B with N a multiple of 16: `gemm` broadcasts A's entries and
//   streams B's rows through an LRK_MR x 2-vector register tile of accumulators, K innermost.
//   Tiles are small (64 x 64 floats = 16 KB) and stay in L1/L2.
// - online softmax in base 2 with scale·log2(e) folded into the scores, exp2 by a vectorized
//   polynomial (relative error < 2e-7), running max / sum per row in the accumulation type; the
//   window mask is applied only on partial blocks, per key row as a range of query columns.
// - float16 / bfloat16 inputs: the operands a tensor-core kernel would feed to its second matmul
//   in the input dtype are rounded to it (P before P·V and Pᵀ·dO, dS before dS·K and dSᵀ·Q), as
//   the GPU kernels do; sums, statistics and accumulators stay float32.
// Work model (AVX2 + FMA, one core at ~3 GHz: 2 FMA pipes x 8 lanes = 32 flop/cycle, ~96
// GFLOP/s): a 64 x 64 block pair at D = 64 is 4·64·64·64 = 1 MFLOP forward (two products) and
// 2.6 MFLOP backward (five). The 6 x 16 micro-kernel issues 12 FMAs per 2 loads + 6 broadcasts,
// so it is FMA-bound; with the exp2 polynomial (~2 cycles per 8 scores), the rescaling and the
// Qᵀ packing the forward should run at ~50-60 % of peak per core (measured here: ~35-40
// GFLOP/s on a shared, loaded core, where torch's own 256³ matmul reached 55-75).

namespace LRK_ISA {

typedef float vfloat __attribute__((vector_size(LRK_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(LRK_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(LRK_VEC_BYTES)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = vfloat;
  static constexpr int kLanes = LRK_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
  using type = vdouble;
  static constexpr int kLanes = LRK_VEC_BYTES / 8;
};
template <typename T>
using VecT = typename Vec<T>::type;

template <typename T>
inline VecT<T> vload(const T* p) {
  VecT<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, VecT<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// Broadcasts. (`VecT<T>{} + x` would keep the add, -0 + 0 being +0; a lane loop is not
// recognised as a broadcast by GCC 12.)
inline vfloat vsplat(float x) {
#if LRK_VEC_BYTES == 32
  return _mm256_set1_ps(x);
#elif defined(__SSE2__)
  return _mm_set1_ps(x);
#else
  return x - vfloat{};
#endif
}
inline vdouble vsplat(double x) {
#if LRK_VEC_BYTES == 32
  return _mm256_set1_pd(x);
#elif defined(__SSE2__)
  return _mm_set1_pd(x);
#else
  return x - vdouble{};
#endif
}
inline vfloat fmadd(vfloat a, vfloat b, vfloat c) {
#if LRK_FMA
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
inline vdouble fmadd(vdouble a, vdouble b, vdouble c) {
#if LRK_FMA
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

// 2^x per lane, x <= 127; exactly 0 for x <= -127 (so -inf, a masked score, gives 0). Round to
// the nearest integer n, 2^f for f = x - n in [-1/2, 1/2] by its Taylor polynomial of degree 7
// (truncation error 5e-9), times 2^n built in the exponent bits.
inline vfloat exp2v(vfloat x) {
  const vfloat lo = vsplat(-127.0f), hi = vsplat(127.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vfloat half_up = x + 0.5f;
  vint n = __builtin_convertvector(half_up, vint);      // toward zero
  n += (__builtin_convertvector(n, vfloat) > half_up);  // true is -1: now floor(x + 1/2)
  const vfloat f = x - __builtin_convertvector(n, vfloat);
  vfloat p = vsplat(1.5252733804059841e-05f);
  p = fmadd(p, f, vsplat(1.5403530393381608e-04f));
  p = fmadd(p, f, vsplat(1.3333558146428443e-03f));
  p = fmadd(p, f, vsplat(9.6181291076284772e-03f));
  p = fmadd(p, f, vsplat(5.5504108664821580e-02f));
  p = fmadd(p, f, vsplat(2.4022650695910071e-01f));
  p = fmadd(p, f, vsplat(6.9314718055994531e-01f));
  p = fmadd(p, f, vsplat(1.0f));
  const vint bits = (n + 127) << 23;
  vfloat two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}
inline vdouble exp2v(vdouble x) {  // float64 inputs: the accurate scalar exp2
  for (int i = 0; i < Vec<double>::kLanes; ++i) {
    x[i] = std::exp2(x[i]);
  }
  return x;
}

template <typename T>
inline T hmax(VecT<T> v) {
  T m = v[0];
  for (int i = 1; i < Vec<T>::kLanes; ++i) {
    m = v[i] > m ? v[i] : m;
  }
  return m;
}
template <typename T>
inline T hsum(VecT<T> v) {
  T s = v[0];
  for (int i = 1; i < Vec<T>::kLanes; ++i) {
    s += v[i];
  }
  return s;
}

// C[r][n] (+)= sum_k A[r·ars + k·acs]·B[k·ldb + n] for r < MR and n < N (N a multiple of 2
// vectors). A's entries are broadcast, B's rows streamed; the accumulators stay in registers.
template <typename T, int MR, bool ACC>
inline void gemm_rows(int64_t N, int64_t K, const T* A, int64_t ars, int64_t acs, const T* B,
                      int64_t ldb, T* C, int64_t ldc) {
  constexpr int L = Vec<T>::kLanes;
  for (int64_t n = 0; n < N; n += 2 * L) {
    VecT<T> c0[MR], c1[MR];
    for (int r = 0; r < MR; ++r) {
      if (ACC) {
        c0[r] = vload(C + r * ldc + n);
        c1[r] = vload(C + r * ldc + n + L);
      } else {
        c0[r] = VecT<T>{};
        c1[r] = VecT<T>{};
      }
    }
    const T* a = A;
    const T* b = B + n;
    for (int64_t k = 0; k < K; ++k, a += acs, b += ldb) {
      const VecT<T> b0 = vload(b);
      const VecT<T> b1 = vload(b + L);
      for (int r = 0; r < MR; ++r) {
        const VecT<T> ar = vsplat(a[r * ars]);
        c0[r] = fmadd(ar, b0, c0[r]);
        c1[r] = fmadd(ar, b1, c1[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      vstore(C + r * ldc + n, c0[r]);
      vstore(C + r * ldc + n + L, c1[r]);
    }
  }
}

// C[M x N] (+)= A·B, A[r][k] = A[r·ars + k·acs] (so Aᵀ of a row-major tile is ars = 1), B and C
// row-major (ldb, ldc); N a multiple of kPad (16), hence of 2 vectors. ACC = false overwrites C.
template <typename T, bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t acs, const T* B,
          int64_t ldb, T* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + LRK_MR <= M; m += LRK_MR) {
    gemm_rows<T, LRK_MR, ACC>(N, K, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc);
  }
  const T* a = A + m * ars;
  T* c = C + m * ldc;
  switch (M - m) {
    case 1:
      gemm_rows<T, 1, ACC>(N, K, a, ars, acs, B, ldb, c, ldc);
      break;
    case 2:
      gemm_rows<T, 2, ACC>(N, K, a, ars, acs, B, ldb, c, ldc);
      break;
    case 3:
      gemm_rows<T, 3, ACC>(N, K, a, ars, acs, B, ldb, c, ldc);
      break;
#if LRK_MR > 4
    case 4:
      gemm_rows<T, 4, ACC>(N, K, a, ars, acs, B, ldb, c, ldc);
      break;
    case 5:
      gemm_rows<T, 5, ACC>(N, K, a, ars, acs, B, ldb, c, ldc);
      break;
#endif
    default:
      break;
  }
}

// dst[r][c] = src[r·ld + c] converted for c < cols, zero for cols <= c < ldd (r < rows).
template <typename A, typename S>
inline void pack_rows(const S* src, int64_t ld, int64_t rows, int64_t cols, A* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * ld;
    A* d = dst + r * ldd;
    for (int64_t c = 0; c < cols; ++c) {
      d[c] = static_cast<A>(s[c]);
    }
    for (int64_t c = cols; c < ldd; ++c) {
      d[c] = A(0);
    }
  }
}

// dst[c][r] = src[r·ld + c] converted (c < cols, r < rows), zero for rows <= r < ldd.
template <typename A, typename S>
inline void pack_transposed(const S* src, int64_t ld, int64_t rows, int64_t cols, A* dst,
                            int64_t ldd) {
  for (int64_t c = 0; c < cols; ++c) {
    A* d = dst + c * ldd;
    for (int64_t r = rows; r < ldd; ++r) {
      d[r] = A(0);
    }
  }
  constexpr int64_t kStrip = 8;  // rows per strip: 8 sequential reads, 8 short writes per column
  for (int64_t r0 = 0; r0 < rows; r0 += kStrip) {
    const int64_t r1 = std::min(rows, r0 + kStrip);
    for (int64_t c = 0; c < cols; ++c) {
      A* d = dst + c * ldd;
      for (int64_t r = r0; r < r1; ++r) {
        d[r] = static_cast<A>(src[r * ld + c]);
      }
    }
  }
}

// x rounded to the input dtype (16-bit inputs) and back; identity otherwise.
template <typename scalar_t, typename A>
inline void round_row(A* x, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, A>) {
    for (int64_t j = 0; j < n; ++j) {
      x[j] = static_cast<A>(static_cast<scalar_t>(x[j]));
    }
  }
}

// The operand tile of keys [k0, k0 + nk) of one kv head: the input rows themselves when they
// already have the accumulation type and D is a multiple of kPad (so they serve as a matmul's B
// too), else packed (converted, columns zero-padded to Dp).
template <typename scalar_t, typename A>
inline const A* key_tile(const scalar_t* base, int64_t ld, int64_t k0, int64_t nk, int64_t D,
                         int64_t Dp, A* scratch, int64_t& ld_out) {
  if constexpr (std::is_same_v<scalar_t, A>) {
    if (D == Dp) {
      ld_out = ld;
      return base + k0 * ld;
    }
  }
  pack_rows<A>(base + k0 * ld, ld, nk, D, scratch, Dp);
  ld_out = Dp;
  return scratch;
}

// Visible query range [i0, i1] of key k (absolute) for query rows [q0, q0 + rows) of a partial
// block, relative to q0 and clipped to [0, rows); full blocks see every row.
inline void visible_rows(const AttnProblem& p, bool partial, int64_t k, int64_t q0, int64_t rows,
                         int64_t& i0, int64_t& i1) {
  i0 = 0;
  i1 = rows - 1;
  if (partial) {
    if (p.has_hi) {  // k - i <= hi
      i0 = std::max<int64_t>(i0, k - p.hi - q0);
    }
    if (p.has_lo) {  // k - i >= lo
      i1 = std::min<int64_t>(i1, k - p.lo - q0);
    }
  }
}

// Scores row of key j (over the padded query columns) scaled by c in place, with the query
// columns outside [i0, i1] set to -inf.
template <typename A>
inline void scale_mask(A* s, int64_t rowsp, int64_t i0, int64_t i1, A c) {
  constexpr int L = Vec<A>::kLanes;
  const VecT<A> cv = vsplat(c);
  for (int64_t i = 0; i < rowsp; i += L) {
    vstore(s + i, vload(s + i) * cv);
  }
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int64_t i = 0; i < std::min(i0, rowsp); ++i) {
    s[i] = ninf;
  }
  for (int64_t i = std::max<int64_t>(i1 + 1, 0); i < rowsp; ++i) {
    s[i] = ninf;
  }
}

// ------------------------------------------------------------------------------------ forward

// Tasks [begin, end) of the forward, task = (b·Hq + h)·n_qb + query block. The score tile is
// kept transposed, Sᵀ (keys x query rows), so that the softmax statistics of the query rows are
// vectors: Sᵀ = K·Qᵀ (Qᵀ packed once per task), column max / exp2 / column sums along the rows
// of Sᵀ, and O += P·V reads Pᵀ with swapped strides. For float32 / float64 inputs with D a
// multiple of 16, K and V are read in place (no per-block packing).
template <typename scalar_t, typename A>
void forward_tasks(const AttnProblem& p, const FwdTensors<scalar_t>& t, int64_t begin,
                   int64_t end) {
  constexpr int L = Vec<A>::kLanes;
  const int64_t D = p.D, Dp = p.Dp, bqp = round_up(std::min(p.block_q, p.Sq), kPad);
  const int64_t nkb = p.block_k_max;
  const A c = static_cast<A>(p.scale * kLog2e);
  std::vector<A> buf(static_cast<size_t>(D * bqp + bqp * Dp + 2 * nkb * Dp + nkb * bqp + 5 * bqp));
  A* qt = buf.data();     // D x rowsp: Qᵀ
  A* o = qt + D * bqp;    // rows x Dp: output accumulator
  A* kp = o + bqp * Dp;   // nk x Dp (when packed)
  A* vp = kp + nkb * Dp;  // nk x Dp (when packed)
  A* st = vp + nkb * Dp;  // nk x rowsp: Sᵀ, then Pᵀ
  A* m = st + nkb * bqp;  // running max (base 2), per query row
  A* l = m + bqp;         // running sum
  A* mb = l + bqp;        // block max
  A* base = mb + bqp;     // exponent base
  A* alpha = base + bqp;  // rescale factor
  for (int64_t task = begin; task < end; ++task) {
    const int64_t r = task % p.n_qb;
    const int64_t bh = task / p.n_qb;
    const int64_t h = bh % p.Hq, b = bh / p.Hq, hk = h / p.group;
    const int64_t q0 = r * p.block_q, rows = std::min(p.block_q, p.Sq - q0);
    const int64_t rowsp = round_up(rows, kPad);
    const scalar_t* kb = t.k + b * t.k_s[0] + hk * t.k_s[1];
    const scalar_t* vb = t.v + b * t.v_s[0] + hk * t.v_s[1];
    pack_transposed<A>(t.q + b * t.q_s[0] + h * t.q_s[1] + q0 * t.q_s[2], t.q_s[2], rows, D, qt,
                       rowsp);
    std::fill(o, o + rows * Dp, A(0));
    std::fill(m, m + rowsp, -std::numeric_limits<A>::infinity());
    std::fill(l, l + rowsp, A(0));
    const int64_t off = p.kv.row_of(b, h, r);
    for (int pass = 0; pass < 2; ++pass) {
      const bool partial = pass == 1;
      const int64_t n = partial ? p.kv.count(off) : p.kv.full_count(off);
      const int32_t* idx = partial ? p.kv.list(off) : p.kv.full_list(off);
      for (int64_t e = 0; e < n; ++e) {
        const int64_t k0 = static_cast<int64_t>(idx[e]) * p.block_k;
        const int64_t nk = std::min(p.block_k, p.Sk - k0);
        int64_t ldk, ldv;
        const A* ka = key_tile<scalar_t, A>(kb, t.k_s[2], k0, nk, D, Dp, kp, ldk);
        const A* va = key_tile<scalar_t, A>(vb, t.v_s[2], k0, nk, D, Dp, vp, ldv);
        gemm<A, false>(nk, rowsp, D, ka, ldk, 1, qt, rowsp, st, rowsp);  // Sᵀ = K·Qᵀ
        std::fill(mb, mb + rowsp, -std::numeric_limits<A>::infinity());
        for (int64_t j = 0; j < nk; ++j) {
          A* s = st + j * rowsp;
          int64_t i0, i1;
          visible_rows(p, partial, k0 + j, q0, rows, i0, i1);
          scale_mask<A>(s, rowsp, i0, i1, c);
          for (int64_t i = 0; i < rowsp; i += L) {
            const VecT<A> x = vload(s + i), y = vload(mb + i);
            vstore(mb + i, x > y ? x : y);
          }
        }
        const VecT<A> ninf = vsplat(-std::numeric_limits<A>::infinity());
        for (int64_t i = 0; i < rowsp; i += L) {
          const VecT<A> m_old = vload(m + i), blk = vload(mb + i);
          const VecT<A> m_new = blk > m_old ? blk : m_old;
          // A row that has seen no key yet keeps m = -inf: exponent base 0, so that
          // alpha = exp2(-inf) = 0 and every p = exp2(-inf) = 0 (never -inf - -inf).
          const VecT<A> bs = m_new == ninf ? VecT<A>{} : m_new;
          vstore(alpha + i, exp2v(m_old - bs));
          vstore(base + i, bs);
          vstore(m + i, m_new);
        }
        for (int64_t i = 0; i < rowsp; i += L) {
          const VecT<A> bs = vload(base + i);
          VecT<A> sum{};
          for (int64_t j = 0; j < nk; ++j) {
            const VecT<A> pv = exp2v(vload(st + j * rowsp + i) - bs);
            sum += pv;
            vstore(st + j * rowsp + i, pv);
          }
          vstore(l + i, vload(l + i) * vload(alpha + i) + sum);
        }
        for (int64_t j = 0; j < nk; ++j) {
          round_row<scalar_t>(st + j * rowsp, rows);
        }
        for (int64_t i = 0; i < rows; ++i) {
          if (alpha[i] != A(1)) {
            const VecT<A> a = vsplat(alpha[i]);
            for (int64_t d = 0; d < Dp; d += L) {
              vstore(o + i * Dp + d, vload(o + i * Dp + d) * a);
            }
          }
        }
        gemm<A, true>(rows, Dp, nk, st, 1, rowsp, va, ldv, o, Dp);  // O += P·V
      }
    }
    scalar_t* out = t.out + ((b * p.Hq + h) * p.Sq + q0) * D;
    float* lse = t.lse + (b * p.Hq + h) * p.Sq + q0;
    for (int64_t i = 0; i < rows; ++i) {
      const bool seen = l[i] > A(0);
      const A inv = seen ? A(1) / l[i] : A(0);  // rows that saw no key: o = 0 -> out = 0
      for (int64_t d = 0; d < D; ++d) {
        out[i * D + d] = static_cast<scalar_t>(o[i * Dp + d] * inv);
      }
      lse[i] = seen ? static_cast<float>((m[i] + std::log2(l[i])) * kLn2)
                    : -std::numeric_limits<float>::infinity();
    }
  }
}

// ----------------------------------------------------------------------------------- backward

// Tasks [begin, end) of the backward, task = b·Hq + h: dq of that head (every query block) and
// its dk/dv contributions, summed in a fixed order (query blocks ascending, each block's full
// then partial keys), written to dk/dv directly when the head owns its kv head (Hq == Hkv),
// else to the per-head buffers the caller sums over the group. Per block pair, transposed like
// the forward: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, Pᵀ = exp2(Sᵀ - lse2), dSᵀ = Pᵀ ∘ (dPᵀ - delta) as rows
// over the query columns, then dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K (dS read with swapped
// strides): five products, Q / Qᵀ / dO / dOᵀ packed once per query block.
template <typename scalar_t, typename A>
void backward_tasks(const AttnProblem& p, const BwdTensors<scalar_t, A>& t, int64_t begin,
                    int64_t end) {
  constexpr int L = Vec<A>::kLanes;
  const int64_t D = p.D, Dp = p.Dp, bqp = round_up(std::min(p.block_q, p.Sq), kPad);
  const int64_t nkb = p.block_k_max;
  const int64_t sk_pad = p.n_kb * p.block_k;
  const A c = static_cast<A>(p.scale * kLog2e);
  std::vector<A> buf(static_cast<size_t>(2 * sk_pad * Dp + 2 * D * bqp + 3 * bqp * Dp +
                                         2 * nkb * Dp + 2 * nkb * bqp + 2 * bqp));
  size_t at = 0;
  auto take = [&](int64_t n) {
    A* ptr = buf.data() + at;
    at += static_cast<size_t>(n);
    return ptr;
  };
  A* dk_acc = take(sk_pad * Dp);  // Sk x Dp, then dv_acc right after it
  A* dv_acc = take(sk_pad * Dp);
  A* qt = take(D * bqp);    // Qᵀ
  A* dot = take(D * bqp);   // dOᵀ
  A* qp = take(bqp * Dp);   // Q
  A* dop = take(bqp * Dp);  // dO
  A* dq = take(bqp * Dp);
  A* kp = take(nkb * Dp);
  A* vp = take(nkb * Dp);
  A* st = take(nkb * bqp);   // Sᵀ, then dSᵀ
  A* dpt = take(nkb * bqp);  // dPᵀ, then Pᵀ
  A* lse2 = take(bqp);
  A* delta = take(bqp);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % p.Hq, b = task / p.Hq, hk = h / p.group;
    const scalar_t* kb = t.k + b * t.k_s[0] + hk * t.k_s[1];
    const scalar_t* vb = t.v + b * t.v_s[0] + hk * t.v_s[1];
    std::fill(dk_acc, dk_acc + 2 * sk_pad * Dp, A(0));  // dk_acc and dv_acc
    for (int64_t r = 0; r < p.n_qb; ++r) {
      const int64_t q0 = r * p.block_q, rows = std::min(p.block_q, p.Sq - q0);
      const int64_t rowsp = round_up(rows, kPad);
      scalar_t* dq_out = t.dq + ((b * p.Hq + h) * p.Sq + q0) * D;
      const int64_t off = p.kv.row_of(b, h, r);
      if (p.kv.count(off) + p.kv.full_count(off) == 0) {
        std::fill(dq_out, dq_out + rows * D, scalar_t(0));
        continue;
      }
      const scalar_t* q = t.q + b * t.q_s[0] + h * t.q_s[1] + q0 * t.q_s[2];
      const scalar_t* dout = t.dout + b * t.do_s[0] + h * t.do_s[1] + q0 * t.do_s[2];
      const scalar_t* out = t.out + b * t.o_s[0] + h * t.o_s[1] + q0 * t.o_s[2];
      const float* lse = t.lse + b * t.lse_s[0] + h * t.lse_s[1] + q0 * t.lse_s[2];
      pack_transposed<A>(q, t.q_s[2], rows, D, qt, rowsp);
      pack_transposed<A>(dout, t.do_s[2], rows, D, dot, rowsp);
      pack_rows<A>(q, t.q_s[2], rows, D, qp, Dp);
      pack_rows<A>(dout, t.do_s[2], rows, D, dop, Dp);
      for (int64_t i = 0; i < rowsp; ++i) {
        if (i >= rows) {  // padding columns: P = 0
          lse2[i] = std::numeric_limits<A>::infinity();
          delta[i] = A(0);
          continue;
        }
        // A row that saw no key (lse = -inf): +inf makes each of its P = exp2(s - lse2) zero.
        const float lv = lse[i * t.lse_s[2]];
        lse2[i] = lv == -std::numeric_limits<float>::infinity()
                      ? std::numeric_limits<A>::infinity()
                      : static_cast<A>(lv) * static_cast<A>(kLog2e);
        A acc = 0;  // delta = rowsum(dO ∘ O), from out as stored
        for (int64_t d = 0; d < D; ++d) {
          acc += dop[i * Dp + d] * static_cast<A>(out[i * t.o_s[2] + d]);
        }
        delta[i] = acc;
      }
      std::fill(dq, dq + rows * Dp, A(0));
      for (int pass = 0; pass < 2; ++pass) {
        const bool partial = pass == 1;
        const int64_t n = partial ? p.kv.count(off) : p.kv.full_count(off);
        const int32_t* idx = partial ? p.kv.list(off) : p.kv.full_list(off);
        for (int64_t e = 0; e < n; ++e) {
          const int64_t k0 = static_cast<int64_t>(idx[e]) * p.block_k;
          const int64_t nk = std::min(p.block_k, p.Sk - k0);
          int64_t ldk, ldv;
          const A* ka = key_tile<scalar_t, A>(kb, t.k_s[2], k0, nk, D, Dp, kp, ldk);
          const A* va = key_tile<scalar_t, A>(vb, t.v_s[2], k0, nk, D, Dp, vp, ldv);
          gemm<A, false>(nk, rowsp, D, ka, ldk, 1, qt, rowsp, st, rowsp);    // Sᵀ = K·Qᵀ
          gemm<A, false>(nk, rowsp, D, va, ldv, 1, dot, rowsp, dpt, rowsp);  // dPᵀ = V·dOᵀ
          for (int64_t j = 0; j < nk; ++j) {
            A* s = st + j * rowsp;
            A* dp = dpt + j * rowsp;
            int64_t i0, i1;
            visible_rows(p, partial, k0 + j, q0, rows, i0, i1);
            scale_mask<A>(s, rowsp, i0, i1, c);
            for (int64_t i = 0; i < rowsp; i += L) {
              const VecT<A> pv = exp2v(vload(s + i) - vload(lse2 + i));
              vstore(s + i, pv * (vload(dp + i) - vload(delta + i)));  // dSᵀ (from unrounded P)
              vstore(dp + i, pv);                                      // Pᵀ
            }
            round_row<scalar_t>(s, rows);
            round_row<scalar_t>(dp, rows);
          }
          gemm<A, true>(nk, Dp, rows, dpt, rowsp, 1, dop, Dp, dv_acc + k0 * Dp, Dp);  // dV += Pᵀ·dO
          gemm<A, true>(nk, Dp, rows, st, rowsp, 1, qp, Dp, dk_acc + k0 * Dp, Dp);    // dK += dSᵀ·Q
          gemm<A, true>(rows, Dp, nk, st, 1, rowsp, ka, ldk, dq, Dp);                 // dQ += dS·K
        }
      }
      const A sc = static_cast<A>(p.scale);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t d = 0; d < D; ++d) {
          dq_out[i * D + d] = static_cast<scalar_t>(dq[i * Dp + d] * sc);
        }
      }
    }
    // dk = scale·Σ dSᵀ·Q, dv = Σ Pᵀ·dO of this head.
    const A sc = static_cast<A>(p.scale);
    if (p.group == 1) {
      scalar_t* dk = t.dk + (b * p.Hkv + hk) * p.Sk * D;
      scalar_t* dv = t.dv + (b * p.Hkv + hk) * p.Sk * D;
      for (int64_t j = 0; j < p.Sk; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          dk[j * D + d] = static_cast<scalar_t>(dk_acc[j * Dp + d] * sc);
          dv[j * D + d] = static_cast<scalar_t>(dv_acc[j * Dp + d]);
        }
      }
    } else {
      A* dk = t.dk_heads + (b * p.Hq + h) * p.Sk * D;
      A* dv = t.dv_heads + (b * p.Hq + h) * p.Sk * D;
      for (int64_t j = 0; j < p.Sk; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          dk[j * D + d] = dk_acc[j * Dp + d] * sc;
          dv[j * D + d] = dv_acc[j * Dp + d];
        }
      }
    }
  }
}

}  // namespace LRK_ISA
