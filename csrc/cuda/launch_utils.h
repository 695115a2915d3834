// Host-side helpers shared by the CUDA launchers (*_cuda.cpp, host compiler only).
#pragma once

namespace lrkernels {
namespace cuda_launch {

// LRKERNELS_POISON_OUTPUT=1: launchers fill their outputs with NaN before the launch, so that an
// element a kernel fails to write cannot pass a test by inheriting a plausible value. Read once.
bool poison_output();

struct DeviceInfo {
  int num_sms;
  int cc_major;
};

// Multiprocessor count and compute capability of `device`, cached per device (queried once; a
// race between host threads on first use only repeats the query).
DeviceInfo device_info(int device);

}  // namespace cuda_launch
}  // namespace lrkernels
