// Cooperative user-level threads (fibers) for the CUDA emulation: one fiber per emulated CUDA
// thread, all fibers of a block on one OS thread, switched only at barriers. Why fibers and not
// one OS thread per CUDA thread: a block barrier then costs 256 cheap user-space switches instead
// of 256 kernel context switches (on a 2-core CI machine the OS-thread version spent minutes in
// futex wake-ups), and a barrier nobody can complete is detected (no runnable fiber left) instead
// of hanging.
//
// Sanitizers: every switch is announced to AddressSanitizer (__sanitizer_*_switch_fiber, so that
// it knows which stack is live) and to ThreadSanitizer (__tsan_switch_to_fiber with no_sync: a
// switch creates NO happens-before edge, so TSan sees the fibers as concurrent threads and reports
// any pair of accesses that the emulated barriers do not order, whatever order they ran in).
#pragma once

#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define EMU_TSAN 1
#else
#define EMU_TSAN 0
#endif

namespace emu {

[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// Happens-before annotations (no-ops without TSan): release(a) ... acquire(a) orders the
// accesses before the release before those after the acquire.
inline void hb_release(void* addr) {
#if EMU_TSAN
  __tsan_release(addr);
#else
  (void)addr;
#endif
}
inline void hb_acquire(void* addr) {
#if EMU_TSAN
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

// The context a worker OS thread runs its scheduler in; fibers only ever switch to and from it.
struct SchedulerContext {
  ucontext_t uc{};
  const void* stack_bottom = nullptr;  // ASan: the worker thread's stack
  size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;  // TSan: the worker thread's own context
  char job_start = 0;          // released by the worker after setting up a block's jobs

  SchedulerContext() {
#if EMU_ASAN
    pthread_attr_t attr;
    void* addr = nullptr;
    if (pthread_getattr_np(pthread_self(), &attr) != 0 ||
        pthread_attr_getstack(&attr, &addr, &stack_size) != 0) {
      fatal("pthread_getattr_np failed");
    }
    pthread_attr_destroy(&attr);
    stack_bottom = addr;
#endif
#if EMU_TSAN
    tsan_fiber = __tsan_get_current_fiber();
#endif
  }
};

class Fiber;
inline char g_jobs_done;  // released at the end of every job; see Fiber::trampoline
// The fiber running on this OS thread (nullptr in the scheduler). Atomic only so that TSan does
// not flag the scheduler's and the fibers' accesses to it (they are never concurrent).
inline thread_local std::atomic<Fiber*> t_current_fiber{nullptr};

// A fiber runs a sequence of jobs (one emulated CUDA thread each), so that its stack and TSan
// context are made once per worker and thread index instead of once per block (creating TSan
// contexts dominated the run time). Between jobs it waits inside trampoline's loop.
class Fiber {
 public:
  using Job = void (*)(void*);

  // Call on the worker thread that will resume it.
  Fiber(SchedulerContext* sched, size_t stack_bytes) : sched_(sched) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stack_bytes_ = (stack_bytes + page - 1) / page * page;
    map_bytes_ = stack_bytes_ + page;
    void* m = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fatal("mmap of a fiber stack failed");
    if (mprotect(m, page, PROT_NONE) != 0) fatal("mprotect of a stack guard page failed");
    map_ = m;
    stack_ = static_cast<char*>(m) + page;  // the guard page is below: overflows fault
    if (getcontext(&uc_) != 0) fatal("getcontext failed");
    uc_.uc_stack.ss_sp = stack_;
    uc_.uc_stack.ss_size = stack_bytes_;
    uc_.uc_link = nullptr;
    makecontext(&uc_, &Fiber::trampoline, 0);
    // ASan's swapcontext interceptor clears the shadow of the target's uc_stack on every switch,
    // which would drop the redzones of live frames; the stack is only needed by makecontext.
    uc_.uc_stack.ss_sp = nullptr;
    uc_.uc_stack.ss_size = 0;
#if EMU_TSAN
    tsan_fiber_ = __tsan_create_fiber(0);  // inherits the worker's clock
#endif
  }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  // Fibers live as long as their worker thread, i.e. the process: no destructor.

  static Fiber* current() { return t_current_fiber.load(std::memory_order_relaxed); }
  bool finished() const { return finished_.load(std::memory_order_relaxed); }
  void* arg() const { return arg_.load(std::memory_order_relaxed); }

  // Queues job(arg) to run from the next resume(). Call between jobs, then release
  // sched->job_start (the fiber acquires it before reading job and arg).
  void start(Job job, void* arg) {
    job_.store(job, std::memory_order_relaxed);
    arg_.store(arg, std::memory_order_relaxed);
    finished_.store(false, std::memory_order_relaxed);
  }

  // Scheduler -> this fiber; returns when the fiber yields or finishes its job.
  void resume() {
    if (finished()) fatal("resume of a finished fiber");
    t_current_fiber.store(this, std::memory_order_relaxed);
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&sched_->asan_fake_stack, stack_, stack_bytes_);
#endif
#if EMU_TSAN
    __tsan_switch_to_fiber(tsan_fiber_, __tsan_switch_to_fiber_no_sync);
#endif
    if (swapcontext(&sched_->uc, &uc_) != 0) fatal("swapcontext failed");
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(sched_->asan_fake_stack, nullptr, nullptr);
#endif
    t_current_fiber.store(nullptr, std::memory_order_relaxed);
  }

  // This fiber -> scheduler, in the middle of a job; returns when the scheduler resumes it.
  void yield() { switch_out(); }

 private:
  static void trampoline() {
    Fiber* const self = current();
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    for (;;) {
      hb_acquire(&self->sched_->job_start);
      self->job_.load(std::memory_order_relaxed)(self->arg());
      self->finished_.store(true, std::memory_order_relaxed);
      // Whoever acquires g_jobs_done (the host, after a grid) is ordered after this job.
      hb_release(&g_jobs_done);
      self->switch_out();
    }
  }

  void switch_out() {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&asan_fake_stack_, sched_->stack_bottom, sched_->stack_size);
#endif
#if EMU_TSAN
    __tsan_switch_to_fiber(sched_->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
    if (swapcontext(&uc_, &sched_->uc) != 0) fatal("swapcontext failed");
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(asan_fake_stack_, nullptr, nullptr);
#endif
  }

  SchedulerContext* const sched_;
  // Atomic, like all bookkeeping shared with the worker: the worker rewrites them for the next
  // block without being ordered after this job's reads (see Leftovers in emu.h).
  std::atomic<Job> job_{nullptr};
  std::atomic<void*> arg_{nullptr};
  ucontext_t uc_{};
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  char* stack_ = nullptr;
  size_t stack_bytes_ = 0;
  void* asan_fake_stack_ = nullptr;
  void* tsan_fiber_ = nullptr;
  std::atomic<bool> finished_{false};
};

}  // namespace emu
