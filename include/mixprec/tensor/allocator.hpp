#pragma once
// One allocator interface per device. Every tensor byte goes through it, so the memory
// statistics (the counterpart of torch.cuda.max_memory_allocated) are exact, not sampled.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#include "mixprec/core/error.hpp"
#include "mixprec/tensor/device.hpp"

namespace mixprec {

struct MemoryStats {
  int64_t allocated_bytes = 0;       // live tensor bytes now
  int64_t peak_allocated_bytes = 0;  // max of the above since the last reset
  int64_t reserved_bytes = 0;        // bytes held from the system (>= allocated with a caching allocator)
  int64_t num_allocs = 0;
  int64_t num_frees = 0;
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(int64_t nbytes) = 0;
  virtual void deallocate(void* p, int64_t nbytes) noexcept = 0;
  virtual Device device() const = 0;
  virtual MemoryStats stats() const = 0;
  virtual void reset_peak() = 0;
  // Returns cached, unused blocks to the system.
  virtual void empty_cache() noexcept {}
};

namespace detail {
// Lock-free counters shared by the device allocators.
struct StatCounters {
  std::atomic<int64_t> allocated{0}, peak{0}, reserved{0}, allocs{0}, frees{0};
  void on_alloc(int64_t n, int64_t reserved_delta) {
    const int64_t now = allocated.fetch_add(n, std::memory_order_relaxed) + n;
    int64_t p = peak.load(std::memory_order_relaxed);
    while (now > p && !peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {}
    reserved.fetch_add(reserved_delta, std::memory_order_relaxed);
    allocs.fetch_add(1, std::memory_order_relaxed);
  }
  void on_free(int64_t n, int64_t reserved_delta) {
    allocated.fetch_sub(n, std::memory_order_relaxed);
    reserved.fetch_sub(reserved_delta, std::memory_order_relaxed);
    frees.fetch_add(1, std::memory_order_relaxed);
  }
  MemoryStats snapshot() const {
    return {allocated.load(), peak.load(), reserved.load(), allocs.load(), frees.load()};
  }
  void reset_peak() { peak.store(allocated.load()); }
};
}  // namespace detail

// 64-byte aligned so AVX-512 loads never split a cache line at the start. Blocks of 64 KiB and
// more are cached for reuse (training allocates the same sizes every step): handing such a block
// back to the OS and faulting fresh pages in on the next step costs more than the kernels that
// use it. allocated_bytes counts live tensor bytes exactly; reserved_bytes adds the cache.
class CpuAllocator final : public Allocator {
 public:
  static constexpr std::size_t kAlignment = 64;
  static constexpr std::size_t kCacheMin = 64 << 10;

  void* allocate(int64_t nbytes) override {
    MIXPREC_CHECK(nbytes >= 0, "CpuAllocator: negative size ", nbytes);
    const std::size_t size = rounded(static_cast<std::size_t>(nbytes));
    void* p = nullptr;
    if (size >= kCacheMin) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);  // the most recently freed block of this size (below)
      if (it != free_.end() && it->first == size) {
        p = it->second;
        free_.erase(it);
        cached_bytes_ -= static_cast<int64_t>(size);
      }
    }
    int64_t reserved_delta = 0;
    if (!p) {
      p = std::aligned_alloc(kAlignment, size);
      if (!p) {
        empty_cache();  // give the cache back and try once more before failing
        p = std::aligned_alloc(kAlignment, size);
      }
      if (!p) fail("CpuAllocator: out of memory allocating ", nbytes, " bytes");
      reserved_delta = static_cast<int64_t>(size);
    }
    counters_.on_alloc(nbytes, reserved_delta);
    return p;
  }
  void deallocate(void* p, int64_t nbytes) noexcept override {
    const std::size_t size = rounded(static_cast<std::size_t>(nbytes));
    if (size >= kCacheMin) {
      std::lock_guard<std::mutex> lock(mu_);
      // First among its size, so the next request reuses it (last in, first out): a block freed
      // a moment ago is still in the L2/L3 cache, and writing the next result into it costs no
      // misses to memory; the oldest block of a size has long been evicted.
      free_.emplace_hint(free_.lower_bound(size), size, p);
      cached_bytes_ += static_cast<int64_t>(size);
      counters_.on_free(nbytes, 0);
      return;
    }
    std::free(p);
    counters_.on_free(nbytes, static_cast<int64_t>(size));
  }
  // Returns cached blocks to the system (as torch.cuda.empty_cache).
  void empty_cache() noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [size, p] : free_) {
      std::free(p);
      counters_.reserved.fetch_sub(static_cast<int64_t>(size), std::memory_order_relaxed);
    }
    free_.clear();
    cached_bytes_ = 0;
  }
  Device device() const override { return Device::CPU; }
  MemoryStats stats() const override { return counters_.snapshot(); }
  void reset_peak() override { counters_.reset_peak(); }

 private:
  static std::size_t rounded(std::size_t n) {
    const std::size_t r = std::max<std::size_t>((n + kAlignment - 1) / kAlignment * kAlignment, kAlignment);
    // Large blocks round to 4 KiB pages so nearby sizes share cache entries.
    return r >= kCacheMin ? (r + 4095) / 4096 * 4096 : r;
  }
  detail::StatCounters counters_;
  std::mutex mu_;
  std::multimap<std::size_t, void*> free_;
  int64_t cached_bytes_ = 0;
};

#if defined(MIXPREC_CUDA)
namespace gpu {
inline Allocator* caching_allocator();  // backends/cuda/allocator.hpp, included at the end
}
#endif

namespace detail {
inline std::array<Allocator*, kNumDevices>& allocator_registry() {
  // Never destroyed: tensors held by other static objects may be freed after main returns.
  static auto* cpu = new CpuAllocator;
#if defined(MIXPREC_CUDA)
  // Registered even without a device: its stats read zero and allocate() says why it cannot.
  static std::array<Allocator*, kNumDevices> reg{cpu, gpu::caching_allocator()};
#else
  static std::array<Allocator*, kNumDevices> reg{cpu, nullptr};
#endif
  return reg;
}
}  // namespace detail

// The CUDA backend registers its caching allocator here when it is compiled in and a device exists.
inline void set_allocator(Device d, Allocator* a) { detail::allocator_registry()[static_cast<int>(d)] = a; }

inline Allocator& allocator(Device d) {
  Allocator* a = detail::allocator_registry()[static_cast<int>(d)];
  MIXPREC_CHECK(a != nullptr, "allocator: no allocator for device ", d,
                d == Device::CUDA ? " (this build has no CUDA backend: link mixprec::cuda, which defines MIXPREC_CUDA)" : "");
  return *a;
}

inline MemoryStats memory_stats(Device d = Device::CPU) { return allocator(d).stats(); }
inline void reset_peak_memory_stats(Device d = Device::CPU) { allocator(d).reset_peak(); }
inline void empty_cache(Device d = Device::CPU) { allocator(d).empty_cache(); }

}  // namespace mixprec

#if defined(MIXPREC_CUDA)
#include "mixprec/backends/cuda/allocator.hpp"
#endif
