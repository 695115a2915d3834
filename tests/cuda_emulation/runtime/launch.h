// Kernel launches on the CPU: a launch runs every block of the grid to completion (synchronously,
// so consecutive launches see each other's results, as on one stream) on persistent worker
// threads, one fiber per CUDA thread; plus stand-ins for the runtime calls the launchers make.
//
// Emulated: launch limits (block <= 1024 threads, grid.x < 2^31, grid.y/z <= 65535, dynamic
// shared memory <= 48 KiB unless cudaFuncSetAttribute raised the kernel's limit, never above the
// device's opt-in maximum), with the same errors cudaGetLastError would return; blocks run in a
// shuffled order; a barrier nobody can complete aborts with a report instead of hanging.
// Not emulated: streams (everything is synchronous), timing, concurrency between launches,
// 2-D / 3-D blocks and blocks that are not a multiple of 32 threads (abort).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu.h"
#include "fiber.h"

namespace emu {

constexpr size_t kDefaultDynSmem = 48 * 1024;    // without cudaFuncSetAttribute
constexpr size_t kFiberStackBytes = 256 * 1024;  // wmma fragments are 1 KiB per thread each

inline cudaError_t& last_error() {
  static cudaError_t err = cudaSuccess;
  return err;
}
inline std::map<const void*, int>& max_dyn_smem() {  // cudaFuncSetAttribute, per kernel
  static std::map<const void*, int> m;
  return m;
}
inline long long& launch_count() {
  static long long n = 0;
  return n;
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// EMU_PLAN_ONLY=1: launches are checked as usual but not run; each valid one prints a line
//   plan kernel=<source name> fn=<address> anchor=<address of emu::launch_count> grid=X,Y,Z
//        block=N smem=BYTES
// on stdout (before the driver's result line for the case), and the drivers skip their reference
// (drv::Checker, driver_common.h). scripts/kernel_report.py maps fn to the kernel's symbol (fn -
// anchor is a link-time offset, so `nm` of the binary names the exact template instance).
inline bool plan_only() {
  static const bool on = env_int("EMU_PLAN_ONLY", 0) != 0;
  return on;
}

inline void thread_main(void* arg) {
  Thread& t = *static_cast<Thread*>(arg);
  BlockState& b = *t.blk;
  (*b.body)();
  t.state.store(kDone, std::memory_order_relaxed);
  b.exited.fetch_add(1, std::memory_order_relaxed);
  b.warps[t.warp].exited.fetch_add(1, std::memory_order_relaxed);
  if (b.arrived.load(std::memory_order_relaxed) > 0 ||
      b.warps[t.warp].arrived.load(std::memory_order_relaxed) > 0) {
    device_fatal("thread exited while others wait at a barrier (never completes)");
  }
}

[[noreturn]] inline void report_deadlock(const BlockState& b) {
  int counts[4] = {};
  for (const auto& t : b.threads) ++counts[t->state.load(std::memory_order_relaxed)];
  std::fprintf(stderr,
               "emu: deadlock in %s, blockIdx (%u,%u,%u): %d threads at __syncthreads, %d at "
               "a warp barrier, %d exited (divergent barrier?)\n",
               b.kernel_name, b.block_idx.x, b.block_idx.y, b.block_idx.z, counts[kAtBlockBarrier],
               counts[kAtWarpBarrier], counts[kDone]);
  fatal("deadlock");
}

// Memory a grid's blocks used. Under TSan it is freed only by the host after the grid, once it
// has acquired every job's clock: a worker freeing it would be an access unordered with the
// fibers' (a worker never acquires their clocks, so that what it hands the next block carries
// no ordering from this block and inter-block races stay visible; only thread i of both blocks
// shares a fiber, hence an order). Without TSan it is freed as soon as the block ends.
struct Leftovers {
  std::vector<std::unique_ptr<BlockState>> blocks;
  std::vector<void*> buffers;
  void release() {
    blocks.clear();
    for (void* p : buffers) std::free(p);
    buffers.clear();
  }
};

// A worker's fibers. Under TSan consecutive blocks alternate between two sets, so that thread i
// of a block and thread i of the next block on the same worker are not ordered by sharing a
// fiber (a block whose index is ignored would otherwise race unseen with its neighbour).
struct FiberPool {
  static constexpr size_t kSets = EMU_TSAN ? 2 : 1;
  std::vector<std::unique_ptr<Fiber>> fibers;
  size_t blocks_run = 0;
};

// Runs one block to completion on the calling worker thread.
inline void run_block(SchedulerContext& sched, FiberPool& pool, std::unique_ptr<BlockState> owned,
                      Leftovers& keep) {
  BlockState& b = *owned;
  Leftovers mine;
  if (b.dyn_bytes > 0) {
    void* p = nullptr;
    if (posix_memalign(&p, 256, b.dyn_bytes) != 0) fatal("out of memory (dynamic smem)");
    std::memset(p, 0xff, b.dyn_bytes);  // NaN in every float type
    b.dyn_smem = static_cast<unsigned char*>(p);
    mine.buffers.push_back(p);
  }
  void* arena = nullptr;
  if (posix_memalign(&arena, 256, kArenaBytes) != 0) fatal("out of memory (static smem)");
  std::memset(arena, 0xff, kArenaBytes);
#if EMU_ASAN
  __asan_poison_memory_region(arena, kArenaBytes);  // static_shared unpoisons what it hands out
#endif
  b.arena = static_cast<unsigned char*>(arena);
  mine.buffers.push_back(arena);

  b.warps.reset(new Warp[b.nthreads / kWarpSize]);
  const size_t first = (pool.blocks_run++ % FiberPool::kSets) * b.nthreads;
  while (pool.fibers.size() < first + b.nthreads) {
    pool.fibers.emplace_back(new Fiber(&sched, kFiberStackBytes));
  }
  b.threads.reserve(b.nthreads);
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber* f = pool.fibers[first + t].get();
    b.threads.emplace_back(new Thread(&b, static_cast<unsigned>(t), f));
    f->start(&thread_main, b.threads.back().get());
  }
  hb_release(&sched.job_start);  // everything above happens before the threads run

  for (;;) {
    bool ran = false;
    int done = 0;
    for (auto& t : b.threads) {
      if (t->state.load(std::memory_order_relaxed) == kRunnable) {
        t->fiber->resume();
        ran = true;
      }
      done += t->state.load(std::memory_order_relaxed) == kDone;
    }
    if (done == b.nthreads) break;
    if (!ran) report_deadlock(b);
  }
#if EMU_ASAN
  __asan_unpoison_memory_region(arena, kArenaBytes);
#endif
#if EMU_TSAN
  keep.blocks.push_back(std::move(owned));
  keep.buffers.insert(keep.buffers.end(), mine.buffers.begin(), mine.buffers.end());
  mine.buffers.clear();
#else
  (void)keep;
  mine.release();
#endif
}

// Persistent worker threads (EMU_WORKERS, default: the core count, at most 4), each with its
// own scheduler and fiber pool; they take blocks from a shared counter, so under TSan blocks on
// different workers really overlap. Never destroyed: the threads wait for work until exit.
class Workers {
 public:
  using BlockFn = std::function<void(SchedulerContext&, FiberPool&, Leftovers&, size_t)>;

  static Workers& instance() {
    static Workers* w = new Workers();
    return *w;
  }

  // Calls fn for every block index in [0, n) on the workers; returns when all are done.
  void run(size_t n, const BlockFn& fn) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      active_ = static_cast<int>(threads_.size());
      ++epoch_;
      work_cv_.notify_all();
      done_cv_.wait(lk, [&] { return active_ == 0; });
    }
    hb_acquire(&g_jobs_done);  // every job released it: the host now sees all the blocks did
    for (auto& k : keep_) k.release();
  }

 private:
  Workers() {
    const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const char* env = std::getenv("EMU_WORKERS");
    const int n = std::clamp(env != nullptr ? std::atoi(env) : std::min(hw, 4), 1, 64);
    keep_.resize(n);
    for (int w = 0; w < n; ++w) threads_.emplace_back([this, w] { main(w); });
  }

  void main(int w) {
    SchedulerContext sched;
    FiberPool pool;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      work_cv_.wait(lk, [&] { return epoch_ != seen; });
      seen = epoch_;
      const BlockFn* fn = fn_;
      const size_t n = n_;
      lk.unlock();
      for (size_t i; (i = next_.fetch_add(1)) < n;) (*fn)(sched, pool, keep_[w], i);
      lk.lock();
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  const BlockFn* fn_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  int active_ = 0;
  uint64_t epoch_ = 0;
  std::vector<Leftovers> keep_;
  std::vector<std::thread> threads_;
};

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem;
};
inline LaunchConfig config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return {grid, block, smem};
}

// Runs every block of the grid, in a shuffled order (EMU_BLOCK_ORDER=forward|reverse|shuffle)
// so that no kernel can depend on block order.
inline void run_grid(const char* name, const LaunchConfig& cfg, size_t smem_limit,
                     const std::function<void()>& body) {
  std::vector<uint3> order;
  for (unsigned z = 0; z < cfg.grid.z; ++z) {
    for (unsigned y = 0; y < cfg.grid.y; ++y) {
      for (unsigned x = 0; x < cfg.grid.x; ++x) order.push_back(make_uint3(x, y, z));
    }
  }
  const char* how = std::getenv("EMU_BLOCK_ORDER");
  if (how != nullptr && std::strcmp(how, "reverse") == 0) {
    std::reverse(order.begin(), order.end());
  } else if (how == nullptr || std::strcmp(how, "forward") != 0) {
    std::mt19937 rng(static_cast<unsigned>(launch_count()));
    std::shuffle(order.begin(), order.end(), rng);
  }
  Workers::instance().run(order.size(),
                          [&](SchedulerContext& sched, FiberPool& pool, Leftovers& keep, size_t i) {
                            auto b = std::make_unique<BlockState>();
                            b->kernel_name = name;
                            b->body = &body;
                            b->block_idx = order[i];
                            b->grid_dim = cfg.grid;
                            b->block_dim = cfg.block;
                            b->nthreads = static_cast<int>(cfg.block.x);
                            b->dyn_bytes = cfg.smem;
                            b->smem_limit = smem_limit;
                            run_block(sched, pool, std::move(b), keep);
                          });
}

// kernel<<<grid, block, smem, stream>>>(args...) as rewritten by the generator. Arguments are
// converted to the kernel's parameter types at launch, as CUDA does. Launches run synchronously
// (one stream: each launch sees the previous one's results).
template <class... P, class... A>
void launch(const char* name, void (*kernel)(P...), const LaunchConfig& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  ++launch_count();
  const void* key = reinterpret_cast<const void*>(kernel);
  const auto it = max_dyn_smem().find(key);
  const size_t dyn_limit = it != max_dyn_smem().end() ? it->second : kDefaultDynSmem;
  const unsigned nthreads = cfg.block.x * cfg.block.y * cfg.block.z;
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.grid.x > 0x7fffffffu ||
      cfg.grid.y > 65535 || cfg.grid.z > 65535 || nthreads == 0 || nthreads > 1024) {
    std::fprintf(stderr, "emu: %s: invalid grid (%u,%u,%u) / block %u\n", name, cfg.grid.x,
                 cfg.grid.y, cfg.grid.z, nthreads);
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  if (cfg.smem > dyn_limit) {
    std::fprintf(stderr, "emu: %s: %zu bytes of dynamic shared memory, limit %zu\n", name, cfg.smem,
                 dyn_limit);
    last_error() = cudaErrorInvalidValue;
    return;
  }
  if (plan_only()) {
    std::printf("plan kernel=%s fn=%#zx anchor=%#zx grid=%u,%u,%u block=%u smem=%zu\n", name,
                reinterpret_cast<size_t>(kernel), reinterpret_cast<size_t>(&launch_count),
                cfg.grid.x, cfg.grid.y, cfg.grid.z, nthreads, cfg.smem);
    std::fflush(stdout);
    return;
  }
  if (cfg.block.y != 1 || cfg.block.z != 1 || nthreads % kWarpSize != 0) {
    fatal("emulation supports 1-D blocks of a multiple of 32 threads only");
  }
  if (env_int("EMU_VERBOSE", 0) != 0) {
    std::fprintf(stderr, "emu: launch %s grid (%u,%u,%u) block %u smem %zu\n", name, cfg.grid.x,
                 cfg.grid.y, cfg.grid.z, nthreads, cfg.smem);
  }
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  run_grid(name, cfg, static_cast<size_t>(device().smem_optin), body);
}

// cudaLaunchKernelEx(&config, kernel, args...): the same launch. Attributes: programmatic stream
// serialization (PDL) is accepted and counted (pdl_launch_count); the launch still runs after
// the previous one has completed, which is one of the orders PDL allows (the kernel's
// griddepcontrol.wait is then a no-op). Other attributes abort.
inline long long& pdl_launch_count() {
  static long long n = 0;
  return n;
}
template <class... P, class... A>
cudaError_t launch_kernel_ex(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id != cudaLaunchAttributeProgrammaticStreamSerialization) {
      fatal("cudaLaunchKernelEx: launch attribute not emulated");
    }
    if (config->attrs[i].val.programmaticStreamSerializationAllowed != 0) ++pdl_launch_count();
  }
  launch("cudaLaunchKernelEx", kernel,
         LaunchConfig{config->gridDim, config->blockDim, config->dynamicSmemBytes},
         std::forward<A>(args)...);
  return std::exchange(last_error(), cudaSuccess);
}

// Stand-ins for the runtime calls the launchers make (cudaGetLastError etc., see prelude.h).

inline cudaError_t get_last_error() { return std::exchange(last_error(), cudaSuccess); }
inline cudaError_t peek_at_last_error() { return last_error(); }
inline cudaError_t get_device(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *v = device().smem_optin;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *v = device().num_sms;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *v = device().cc_major;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *v = device().cc_minor;
      return cudaSuccess;
    default:
      fatal("cudaDeviceGetAttribute: attribute not emulated");
  }
}
template <class F>
cudaError_t func_set_attribute(F* kernel, cudaFuncAttribute attr, int v) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    fatal("cudaFuncSetAttribute: attribute not emulated");
  }
  if (v < 0 || v > device().smem_optin) return cudaErrorInvalidValue;
  max_dyn_smem()[reinterpret_cast<const void*>(kernel)] = v;
  return cudaSuccess;
}

}  // namespace emu
