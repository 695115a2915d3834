// Host side shared by the drivers (one per kernel family): case parsing, test tensors, float64
// comparison, the stdin -> stdout case loop. A driver is an ordinary host program that calls the
// family's torch-free launch API; the kernels it links are the emulated ones.
//
// Protocol: each stdin line is one case of key=value tokens; for each, stdout gets one line,
// "ok <case> | <stats>" or "FAIL <case> | <reason>", flushed before the next case starts (so a
// sanitizer abort is attributed to the first case without a line). Exit status: failure count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace drv {

// Plan mode (EMU_PLAN_ONLY=1, see runtime/launch.h): the launches of a case are recorded, not
// run. Test values are not generated, and constructing a Checker (which every driver does
// after its launches, before its reference) ends the case with "ok <case> | plan only", so a
// driver gets the mode without code of its own and big shapes cost no reference.
inline bool plan_only() {
  static const bool on = [] {
    const char* v = std::getenv("EMU_PLAN_ONLY");
    return v != nullptr && *v != '\0' && std::atoi(v) != 0;
  }();
  return on;
}
struct PlanOnly {};  // thrown by Checker in plan mode, caught by main_loop

enum class DType { kF32, kF16, kBF16 };

inline DType parse_dtype(const std::string& s) {
  if (s == "f32") return DType::kF32;
  if (s == "f16") return DType::kF16;
  if (s == "bf16") return DType::kBF16;
  throw std::runtime_error("unknown dtype " + s);
}

template <class T>
float to_f(T v);
template <>
inline float to_f(float v) {
  return v;
}
template <>
inline float to_f(__half v) {
  return __half2float(v);
}
template <>
inline float to_f(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <class T>
T from_f(float v);
template <>
inline float from_f(float v) {
  return v;
}
template <>
inline __half from_f(float v) {
  return __float2half_rn(v);
}
template <>
inline __nv_bfloat16 from_f(float v) {
  return __float2bfloat16_rn(v);
}
// Rounds like the kernels: to float32 (round to nearest), then to T.
template <class T>
double round_to(double v) {
  return to_f(from_f<T>(static_cast<float>(v)));
}

// Tolerance on |got - want| / scale, where scale is the sum of the absolute values of the terms
// (so that it bounds the rounding error of any summation order): a few units in the last place
// of the dtype for 16-bit outputs; for float32, room for float32 accumulation over long sums.
// Integer-valued inputs ("dist=int") are exact in every intermediate, so they must match exactly.
template <class T>
double tolerance() {
  if constexpr (sizeof(T) == 4) return 1e-5;
  if constexpr (std::is_same_v<T, __half>) return 4.0 / 2048;
  return 4.0 / 256;
}

// One case: key=value tokens.
class Case {
 public:
  explicit Case(const std::string& line) : line_(line) {
    std::istringstream in(line);
    std::string tok;
    while (in >> tok) {
      const auto eq = tok.find('=');
      if (eq == std::string::npos) throw std::runtime_error("token without '=': " + tok);
      kv_[tok.substr(0, eq)] = tok.substr(eq + 1);
    }
  }
  const std::string& str(const std::string& key) const {
    const auto it = kv_.find(key);
    if (it == kv_.end()) throw std::runtime_error("missing key " + key);
    return it->second;
  }
  std::string str(const std::string& key, const std::string& fallback) const {
    const auto it = kv_.find(key);
    return it == kv_.end() ? fallback : it->second;
  }
  int64_t num(const std::string& key) const { return std::stoll(str(key)); }
  int64_t num(const std::string& key, int64_t fallback) const {
    const auto it = kv_.find(key);
    return it == kv_.end() ? fallback : std::stoll(it->second);
  }
  // mis=<letters>: the tensors (one letter each) whose base is shifted off 16-byte alignment.
  bool misaligned(char tensor) const { return str("mis", "-").find(tensor) != std::string::npos; }
  const std::string& line() const { return line_; }

 private:
  std::string line_;
  std::map<std::string, std::string> kv_;
};

// A tensor as the kernels see it: `n` elements, the base optionally shifted by `shift` elements
// off a 256-byte boundary, the allocation ending exactly at the last element (ASan catches any
// read or write past it). A copy of the initial contents checks that inputs stay untouched.
template <class T>
class Buffer {
 public:
  Buffer(size_t n, size_t shift) : n_(n) {
    const size_t bytes = (n + shift) * sizeof(T);
    if (posix_memalign(&raw_, 256, bytes == 0 ? 1 : bytes) != 0) throw std::bad_alloc();
    p_ = static_cast<T*>(raw_) + shift;
  }
  ~Buffer() { std::free(raw_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }
  size_t size() const { return n_; }
  void fill_nan() {  // plan mode: nothing reads the values (and headline buffers are large)
    if (!plan_only()) std::memset(static_cast<void*>(p_), 0xff, n_ * sizeof(T));
  }
  void snapshot() {
    if (plan_only()) return;  // nothing is compared: the case ends at its Checker
    copy_.assign(reinterpret_cast<const char*>(p_), reinterpret_cast<const char*>(p_ + n_));
  }
  bool unchanged() const {
    return n_ == 0 || std::memcmp(copy_.data(), static_cast<const void*>(p_), n_ * sizeof(T)) == 0;
  }

 private:
  size_t n_;
  void* raw_ = nullptr;
  T* p_ = nullptr;
  std::vector<char> copy_;
};

// Test values. dist=int: small integers (exact products and sums in float32, so every
// intermediate is exact); dist=real: uniform in [-1, 1).
class Values {
 public:
  Values(const std::string& dist, uint64_t seed) : exact_(dist == "int"), rng_(seed) {
    if (dist != "int" && dist != "real") throw std::runtime_error("dist must be int or real");
  }
  bool exact() const { return exact_; }
  float next() {
    if (exact_) {
      const int v = static_cast<int>(rng_() % 4);  // -2, -1, 1, 2
      return static_cast<float>(v < 2 ? v - 2 : v - 1);
    }
    return std::uniform_real_distribution<float>(-1.f, 1.f)(rng_);
  }
  template <class T>
  void fill(Buffer<T>& b) {
    if (plan_only()) return;  // nothing reads the values
    for (size_t i = 0; i < b.size(); ++i) b[i] = from_f<T>(next());
    b.snapshot();
  }
  std::mt19937_64& rng() { return rng_; }

 private:
  bool exact_;
  std::mt19937_64 rng_;
};

// Layout 2 from q (N, K): packed[nb][kb][16 L + 4 j + b] = q[32 nb + 8 j + L / 4]
// [16 kb + 2 (L % 4) + (b & 1) + 8 (b >> 1)], rows past N zero.
inline void pack_layout2(const int8_t* q, int64_t N, int64_t K, int8_t* out) {
  const int64_t nbs = (N + 31) / 32, kbs = K / 16;
  for (int64_t nb = 0; nb < nbs; ++nb) {
    for (int64_t kb = 0; kb < kbs; ++kb) {
      int8_t* unit = out + (nb * kbs + kb) * 512;
      for (int L = 0; L < 32; ++L) {
        for (int j = 0; j < 4; ++j) {
          for (int b = 0; b < 4; ++b) {
            const int64_t n = nb * 32 + 8 * j + L / 4;
            const int64_t k = kb * 16 + 2 * (L % 4) + (b & 1) + 8 * (b >> 1);
            unit[16 * L + 4 * j + b] = n < N ? q[n * K + k] : 0;
          }
        }
      }
    }
  }
}

// Per-row adapter indices, uniform in [-1, n) (bad: [-3, n + 2), out of range both ways), ranks
// in [0, R] (bad: [-2, R + 2]) and scales (powers of two for dist=int) of a multi-adapter case:
// index.size() rows, ranks.size() == scales.size() adapters. Snapshots all three.
inline void random_adapter_sets(Values& vals, Buffer<int32_t>& index, Buffer<int32_t>& ranks,
                                Buffer<float>& scales, int64_t n, int64_t R, bool bad) {
  for (size_t m = 0; m < index.size(); ++m) {
    const int64_t lo = bad ? -3 : -1, hi = bad ? n + 2 : n;  // [lo, hi)
    index[m] = static_cast<int32_t>(lo + static_cast<int64_t>(vals.rng()() % (hi - lo)));
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    const int64_t lo = bad ? -2 : 0, hi = bad ? R + 3 : R + 1;
    ranks[i] = static_cast<int32_t>(lo + static_cast<int64_t>(vals.rng()() % (hi - lo)));
    scales[i] = vals.exact() ? std::ldexp(1.f, -static_cast<int>(vals.rng()() % 2))
                             : 0.25f + static_cast<float>(i);
  }
  index.snapshot();
  ranks.snapshot();
  scales.snapshot();
}

// Compares outputs against the float64 reference: relative error |got - want| / scale, with
// scale the sum of |terms| of that output. Any NaN (an element never written) fails.
class Checker {
 public:
  Checker(double tol, bool exact) : tol_(tol), exact_(exact) {
    if (plan_only()) throw PlanOnly{};
  }
  // Exactness of dist=int: every partial sum must be an integer multiple of `quantum` below
  // 2^24 of them, i.e. representable in float32, whatever the summation order.
  void require_exact_range(double scale, double quantum) {
    if (exact_ && scale / quantum >= 16777216.0) exact_ = false;
  }
  void add(const std::string& where, double got, double want, double scale) {
    ++count_;
    const double err = std::fabs(got - want);
    const double rel = scale > 0 ? err / scale : (err == 0 ? 0.0 : INFINITY);
    if (std::isnan(got) || !(exact_ ? err == 0 : rel <= tol_)) {
      if (bad_ < 4) {
        std::ostringstream s;
        s << " " << where << ": got " << got << " want " << want << ";";
        detail_ += s.str();
      }
      ++bad_;
    }
    if (!std::isnan(rel) && rel > worst_) worst_ = rel;
  }
  bool ok() const { return bad_ == 0; }
  std::string summary() const {
    std::ostringstream s;
    if (bad_ != 0) {
      s << bad_ << " of " << count_ << " wrong (";
      if (exact_) {
        s << "exact";
      } else {
        s << "tol " << tol_;
      }
      s << "):" << detail_;
    } else {
      s << "worst rel err " << worst_ << (exact_ ? " (exact)" : "");
    }
    return s.str();
  }
  void fail(const std::string& why) {
    ++bad_;
    detail_ += " " + why + ";";
  }

 private:
  double tol_;
  bool exact_;
  long long count_ = 0, bad_ = 0;
  double worst_ = 0;
  std::string detail_;
};

// The stdin -> stdout loop; run_case returns "" on success or the failure reason, and may throw.
inline int main_loop(const std::function<std::string(const Case&, std::string*)>& run_case) {
  int failures = 0;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::string stats;
    std::string why;
    try {
      why = run_case(Case(line), &stats);
    } catch (const PlanOnly&) {
      why.clear();
      stats = "plan only";
    } catch (const std::exception& e) {
      why = std::string("driver error: ") + e.what();
    }
    std::printf("%s %s | %s\n", why.empty() ? "ok" : "FAIL", line.c_str(),
                why.empty() ? stats.c_str() : why.c_str());
    std::fflush(stdout);
    failures += !why.empty();
  }
  return failures > 125 ? 125 : failures;
}

}  // namespace drv
