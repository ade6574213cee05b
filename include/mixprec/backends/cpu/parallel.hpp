#pragma once
// One parallel-for for all CPU kernels, on a persistent pool of worker threads.
//
// Why not an OpenMP region per call: a training step runs ~200 parallel regions, and with
// OMP_WAIT_POLICY=passive (the setting that keeps a shared machine usable) each one wakes its
// sleeping workers -- a futex wake and an interrupt to an idle core, 10-30 us on a VM -- while
// libgomp's spinning default makes an oversubscribed machine ~10x slower (workers spin at
// barriers while the thread they wait for is descheduled; benchmarks/NOTES.md). This pool's
// workers spin for a bounded time after each region (MIXPREC_SPIN_US, default 100 us; 0 sleeps at
// once), so the back-to-back regions of a step start without a wake-up, then sleep on a futex: a
// loaded machine loses at most that spin per region, never a barrier.
//
// The thread count is OpenMP's (omp_set_num_threads, OMP_NUM_THREADS) when the build has OpenMP,
// so one setting governs this pool, oneDNN and user code; without OpenMP it is the number of CPUs.
// A region splits [begin, end) as OpenMP's static schedule did -- thread t gets the t-th of nt
// equal chunks -- so per-thread partial results combine in the same order, and a kernel called
// inside a region (nested), or while another user thread holds the pool, runs serially.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

#include "mixprec/core/config.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mixprec::cpu {

namespace detail {
inline thread_local bool tl_in_region = false;  // inside a pool region (caller or worker)
inline thread_local int tl_thread_index = 0;    // this thread's chunk in the current region

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

inline int default_spin_us() {
  const char* s = std::getenv("MIXPREC_SPIN_US");
  if (!s || !*s) return 100;
  const long v = std::strtol(s, nullptr, 10);
  return static_cast<int>(std::clamp<long>(v, 0, 1000000));
}
inline std::atomic<int>& spin_us_setting() {
  static std::atomic<int> v{default_spin_us()};
  return v;
}

// Spins on pred() for up to spin_us microseconds; false if it never held. After a short burst of
// pause instructions it yields between polls: on an idle machine a yield returns at once, on a
// loaded one it hands the core to a runnable thread -- often the very one being waited for.
template <class Pred>
bool spin_until(Pred pred) {
  const int us = spin_us_setting().load(std::memory_order_relaxed);
  if (us <= 0) return pred();
  for (int i = 0; i < 512; ++i) {  // a few microseconds
    if (pred()) return true;
    cpu_relax();
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (;;) {
    if (pred()) return true;
    std::this_thread::yield();
    if (std::chrono::steady_clock::now() >= deadline) return pred();
  }
}

class ThreadPool {
 public:
  // The process's pool. Leaked on purpose: workers never outlive it, static destructors never
  // race with a sleeping worker, and a forked child (which has no workers) gets a fresh one.
  static ThreadPool& instance() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { slot() = new ThreadPool; }); });
    ThreadPool*& p = slot();
    if (!p) {
      static std::mutex m;
      std::lock_guard<std::mutex> lock(m);
      if (!p) p = new ThreadPool;
    }
    return *p;
  }

  // body(t) for t in [0, nt): the caller runs t = 0, workers 1..nt-1 the rest. False (nothing run)
  // when another thread's region holds the pool.
  bool run(int nt, void (*call)(void*, int), void* ctx) {
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    grow(nt - 1);
    call_ = call;
    ctx_ = ctx;
    error_ = nullptr;
    pending_.store(nt - 1, std::memory_order_relaxed);
    for (int w = 0; w < nt - 1; ++w) {
      Worker& k = *workers_[static_cast<std::size_t>(w)];
      k.seq.fetch_add(1, std::memory_order_seq_cst);
      if (k.sleeping.load(std::memory_order_seq_cst)) k.seq.notify_one();
    }
    execute(0);
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      caller_sleeping_.store(true, std::memory_order_seq_cst);
      for (int v; (v = pending_.load(std::memory_order_acquire)) != 0;) pending_.wait(v, std::memory_order_acquire);
      caller_sleeping_.store(false, std::memory_order_relaxed);
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  struct alignas(64) Worker {
    std::atomic<uint32_t> seq{0};
    std::atomic<bool> sleeping{false};
  };
  static ThreadPool*& slot() {
    static ThreadPool* p = nullptr;
    return p;
  }

  void execute(int t) {
    tl_in_region = true;
    tl_thread_index = t;
    try {
      call_(ctx_, t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
    tl_in_region = false;
    tl_thread_index = 0;
  }

  void grow(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.push_back(std::make_unique<Worker>());
      const int t = static_cast<int>(workers_.size());  // chunk index of the new worker
      std::thread([this, t, k = workers_.back().get()] { loop(t, *k); }).detach();
    }
  }

  void loop(int t, Worker& k) {
    uint32_t seen = 0;
    for (;;) {
      if (!spin_until([&] { return k.seq.load(std::memory_order_acquire) != seen; })) {
        k.sleeping.store(true, std::memory_order_seq_cst);
        k.seq.wait(seen, std::memory_order_acquire);
        k.sleeping.store(false, std::memory_order_relaxed);
      }
      seen = k.seq.load(std::memory_order_acquire);
      execute(t);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1 && caller_sleeping_.load(std::memory_order_seq_cst))
        pending_.notify_one();
    }
  }

  std::mutex mu_;  // one region at a time
  std::vector<std::unique_ptr<Worker>> workers_;
  void (*call_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<int> pending_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;
};
}  // namespace detail

// Threads a kernel may use here: 1 inside a region (nested calls run serially).
inline int num_threads() {
  if (detail::tl_in_region) return 1;
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  static const int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return n;
#endif
}

// The calling thread's chunk index inside parallel_for's f (0 outside a region): for per-thread
// partial results, indexed 0..num_threads()-1.
inline int thread_index() { return detail::tl_thread_index; }

// How long idle workers spin before sleeping, in microseconds (MIXPREC_SPIN_US; 0: sleep at once,
// the setting for a machine shared with other busy processes).
inline void set_spin_us(int us) { detail::spin_us_setting().store(std::max(0, us), std::memory_order_relaxed); }
inline int spin_us() { return detail::spin_us_setting().load(std::memory_order_relaxed); }

// f(begin, end) over [begin, end), split into contiguous chunks of at least `grain` items, one per
// thread. An exception thrown by f reaches the caller (the first one, after every chunk ended).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, F&& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1)));
  if (nt > 1) {
    const int64_t chunk = (n + nt - 1) / nt;
    auto body = [&](int t) {
      const int64_t b = begin + t * chunk;
      const int64_t e = std::min(end, b + chunk);
      if (b < e) f(b, e);
    };
    using Body = decltype(body);
    if (detail::ThreadPool::instance().run(nt, [](void* p, int t) { (*static_cast<Body*>(p))(t); }, &body)) return;
  }
  f(begin, end);
}

}  // namespace mixprec::cpu
