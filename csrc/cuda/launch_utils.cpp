#include "launch_utils.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lrkernels {
namespace cuda_launch {

bool poison_output() {
  static const bool enabled = [] {
    const char* value = std::getenv("LRKERNELS_POISON_OUTPUT");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return enabled;
}

DeviceInfo device_info(int device) {
  constexpr int kMaxCached = 64;
  static std::atomic<int> cached_sms[kMaxCached];  // 0: not queried yet
  static std::atomic<int> cached_major[kMaxCached];
  if (device >= 0 && device < kMaxCached) {
    const int sms = cached_sms[device].load();
    if (sms > 0) return {sms, cached_major[device].load()};
  }
  DeviceInfo info{0, 0};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  if (info.num_sms < 1) info.num_sms = 1;
  if (device >= 0 && device < kMaxCached) {
    cached_major[device].store(info.cc_major);  // published before the count (seq_cst)
    cached_sms[device].store(info.num_sms);
  }
  return info;
}

}  // namespace cuda_launch
}  // namespace lrkernels
