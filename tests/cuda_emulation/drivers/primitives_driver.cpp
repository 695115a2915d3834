// Driver of the primitives check (kernels/primitives.cu): the shared PTX primitives of
// csrc/cuda/common/ptx.cuh against a float64 product, exact on small integers.
//
// Case keys: dtype=f16|bf16 kvalid=8|16 [seed=N]
#include <cmath>
#include <string>

#include "driver_common.h"
#include "primitives.cuh"

namespace {

using drv::Buffer;

template <class T>
std::string run(const drv::Case& c, std::string* stats) {
  const int kvalid = static_cast<int>(c.num("kvalid", 16));
  drv::Values vals("int", static_cast<uint64_t>(c.num("seed", 1)));
  Buffer<T> a(16 * 16, false), b(16 * 8, false), bt(8 * 16, false);
  Buffer<float> d(3 * 16 * 8, false);
  vals.fill(a);
  vals.fill(b);
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < 8; ++n) bt[n * 16 + k] = b[k * 8 + n];
  }
  d.fill_nan();
  const cudaError_t err =
      emu_check::launch_primitives_check<T>(a.data(), b.data(), bt.data(), kvalid, d.data());
  if (err != cudaSuccess) return "launch returned cudaError " + std::to_string(err);
  drv::Checker check(drv::tolerance<T>(), true);
  for (int v = 0; v < 3; ++v) {
    for (int m = 0; m < 16; ++m) {
      for (int n = 0; n < 8; ++n) {
        double sum = 0, scale = 0;
        for (int k = 0; k < kvalid; ++k) {
          const double p = double(drv::to_f(a[m * 16 + k])) * drv::to_f(b[k * 8 + n]);
          sum += p;
          scale += std::fabs(p);
        }
        check.add("d" + std::to_string(v) + "[" + std::to_string(m) + "," + std::to_string(n) + "]",
                  d[v * 128 + m * 8 + n], sum, scale);
      }
    }
  }
  *stats = check.summary();
  return check.ok() ? "" : check.summary();
}

}  // namespace

int main() {
  return drv::main_loop([](const drv::Case& c, std::string* stats) {
    switch (drv::parse_dtype(c.str("dtype"))) {
      case drv::DType::kF16:
        return run<__half>(c, stats);
      case drv::DType::kBF16:
        return run<__nv_bfloat16>(c, stats);
      default:
        return std::string("dtype must be f16 or bf16");
    }
  });
}
