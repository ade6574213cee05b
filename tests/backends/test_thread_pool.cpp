// The CPU's parallel_for on its persistent worker pool (backends/cpu/parallel.hpp): every index
// exactly once in OpenMP's static chunks, nested and concurrent calls serial, exceptions reaching
// the caller, the spinning and the sleeping hand-over both working, and a forked child able to use it.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec::cpu {
namespace {

// Restores the thread count and the spin time a test changes.
struct PoolSettings {
  int threads = num_threads(), spin = spin_us();
  ~PoolSettings() {
    set_spin_us(spin);
#if defined(_OPENMP)
    omp_set_num_threads(threads);
#endif
  }
};

void set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

TEST(ThreadPool, EveryIndexOnceInStaticChunks) {
  PoolSettings keep;
  for (int threads : {1, 2, 3, 4}) {
    set_threads(threads);
    for (int spin : {0, 200}) {
      set_spin_us(spin);
      for (int64_t n : {1, 2, 3, 7, 64, 1000, 4097}) {
        for (int64_t grain : {1, 5, 100}) {
          std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
          std::vector<std::atomic<int>> owner(static_cast<std::size_t>(n));
          parallel_for(10, 10 + n, grain, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) {
              hits[static_cast<std::size_t>(i - 10)].fetch_add(1);
              owner[static_cast<std::size_t>(i - 10)].store(thread_index());
            }
          });
          const int64_t nt = std::min<int64_t>(num_threads(), (n + grain - 1) / grain);
          const int64_t chunk = (n + nt - 1) / nt;
          for (int64_t i = 0; i < n; ++i) {
            ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << "threads " << threads << " n " << n << " grain " << grain << " i " << i;
            // Thread t owns the t-th chunk, as OpenMP's static schedule: per-thread partials combine in order.
            ASSERT_EQ(owner[static_cast<std::size_t>(i)].load(), i / chunk) << "threads " << threads << " n " << n << " grain " << grain;
          }
        }
      }
    }
  }
}

TEST(ThreadPool, ManyRegionsBackToBackAndAfterSleeping) {
  PoolSettings keep;
  set_threads(2);
  for (int spin : {0, 50, 1000}) {
    set_spin_us(spin);
    int64_t total = 0;
    for (int r = 0; r < 2000; ++r) {
      std::atomic<int64_t> s{0};
      parallel_for(0, 64, 1, [&](int64_t b, int64_t e) { s.fetch_add(e - b); });
      total += s.load();
      if (r % 500 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // workers go to sleep
    }
    EXPECT_EQ(total, 2000 * 64) << "spin " << spin;
  }
}

TEST(ThreadPool, NestedCallsRunSerially) {
  PoolSettings keep;
  set_threads(2);
  std::atomic<int> inner_threads{0}, inner_calls{0};
  parallel_for(0, 2, 1, [&](int64_t, int64_t) {
    EXPECT_EQ(num_threads(), 1);
    const int outer = thread_index();
    parallel_for(0, 100, 1, [&](int64_t b, int64_t e) {
      inner_calls.fetch_add(1);
      inner_threads.fetch_add(b == 0 && e == 100 ? 1 : 0);
      EXPECT_EQ(thread_index(), outer);  // the nested region did not take another chunk index
    });
  });
  EXPECT_EQ(inner_calls.load(), 2);    // one whole-range call per outer chunk
  EXPECT_EQ(inner_threads.load(), 2);
  EXPECT_GT(num_threads(), 1);         // outside a region again
}

TEST(ThreadPool, ExceptionReachesTheCallerAndThePoolStaysUsable) {
  PoolSettings keep;
  set_threads(2);
  for (int thrower : {0, 1}) {  // the caller's chunk, then a worker's
    EXPECT_THROW(parallel_for(0, 2, 1,
                              [&](int64_t b, int64_t) {
                                if (b == thrower) throw std::runtime_error("chunk failed");
                              }),
                 std::runtime_error);
    std::atomic<int64_t> s{0};
    parallel_for(0, 1000, 1, [&](int64_t b, int64_t e) { s.fetch_add(e - b); });
    EXPECT_EQ(s.load(), 1000);
  }
}

TEST(ThreadPool, ConcurrentCallersEachGetEveryIndex) {
  PoolSettings keep;
  set_threads(2);
  std::atomic<int> bad{0};
  std::vector<std::thread> users;
  for (int u = 0; u < 4; ++u)
    users.emplace_back([&] {
      for (int r = 0; r < 300; ++r) {
        std::atomic<int64_t> s{0};
        parallel_for(0, 999, 1, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) s.fetch_add(i);
        });
        if (s.load() != 999 * 998 / 2) bad.fetch_add(1);
      }
    });
  for (auto& t : users) t.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(ThreadPool, ForkedChildGetsAWorkingPool) {
  PoolSettings keep;
  set_threads(2);
  std::atomic<int64_t> warm{0};
  parallel_for(0, 10, 1, [&](int64_t b, int64_t e) { warm.fetch_add(e - b); });  // workers exist in the parent
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    alarm(60);  // a hang fails the test instead of stalling it
    std::atomic<int64_t> s{0};
    parallel_for(0, 5000, 1, [&](int64_t b, int64_t e) { s.fetch_add(e - b); });
    const Tensor x = ones({1 << 12}) * 2.0;  // ops through the pool in the child as well
    _exit(s.load() == 5000 && sum(x).item<float>() == 8192.0f ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace mixprec::cpu
