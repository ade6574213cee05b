#pragma once
// The CUDA caching allocator, behind the same Allocator interface as the CPU one, so
// memory_stats(Device::CUDA) reports allocated / peak / reserved bytes exactly. Host code only
// (cudart); tensor/allocator.hpp registers it when the build defines MIXPREC_CUDA.
//
// Why cache: cudaMalloc synchronises the device and costs far more than the kernels of a small
// layer, and training asks for the same sizes every step. Blocks are rounded to size classes and
// kept per stream: a block freed on stream s is handed out again only to work on s, which the
// stream orders after every earlier use, so reuse needs no event or host sync. (A tensor used on
// a second stream must be synchronised by the caller before it is freed.) Fresh memory comes
// from cudaMallocAsync on the current stream where the device has memory pools, else cudaMalloc.
#include <bit>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "mixprec/backends/cuda/runtime.hpp"

namespace mixprec::gpu {

// 512-byte steps below 1 MiB; above, four steps per power of two (at most 25% slack).
inline int64_t size_class(int64_t nbytes) {
  constexpr int64_t kSmallStep = 512, kLarge = int64_t{1} << 20;
  if (nbytes <= kSmallStep) return kSmallStep;
  if (nbytes < kLarge) return (nbytes + kSmallStep - 1) / kSmallStep * kSmallStep;
  const int64_t step = static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(nbytes))) / 4;
  return (nbytes + step - 1) / step * step;
}

class CachingAllocator final : public Allocator {
 public:
  void* allocate(int64_t nbytes) override {
    MIXPREC_CHECK(nbytes >= 0, "CUDA allocator: negative size ", nbytes);
    MIXPREC_CHECK(cuda_is_available(), "CUDA allocator: cannot allocate ", nbytes, " bytes: CUDA is not available: ",
                  cuda_unavailable_reason());
    const int64_t size = size_class(nbytes);
    const cudaStream_t stream = current_stream();
    std::lock_guard<std::mutex> lock(mu_);
    void* p = nullptr;
    int64_t reserved_delta = 0;
    auto it = free_.find({stream, size});
    if (it != free_.end()) {
      p = it->second;
      free_.erase(it);
    } else {
      p = raw_alloc(size, stream);
      if (!p) {
        release_cached();  // give the cache back and try once more before failing
        p = raw_alloc(size, stream);
      }
      if (!p) {
        const MemoryStats s = counters_.snapshot();
        fail("CUDA allocator: out of memory allocating ", nbytes, " bytes (", s.allocated_bytes, " bytes allocated, ",
             s.reserved_bytes, " reserved)");
      }
      reserved_delta = size;
    }
    live_[p] = {size, stream};
    counters_.on_alloc(nbytes, reserved_delta);
    return p;
  }

  void deallocate(void* p, int64_t nbytes) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // not ours: nothing sensible to do in a noexcept path
    free_.emplace(std::make_pair(it->second.stream, it->second.size), p);
    live_.erase(it);
    counters_.on_free(nbytes, 0);
  }

  // Waits for the device, then returns every cached block to the driver (torch.cuda.empty_cache).
  void empty_cache() noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached();
  }

  Device device() const override { return Device::CUDA; }
  MemoryStats stats() const override { return counters_.snapshot(); }
  void reset_peak() override { counters_.reset_peak(); }

  int64_t cached_blocks() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(free_.size());
  }

 private:
  struct Block {
    int64_t size;
    cudaStream_t stream;
  };

  void* raw_alloc(int64_t size, cudaStream_t stream) {
    if (pools_ < 0) {
      int dev = 0, v = 0;
      pools_ = cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&v, cudaDevAttrMemoryPoolsSupported, dev) == cudaSuccess && v;
      cudaGetLastError();
    }
    void* p = nullptr;
    const cudaError_t e = pools_ ? cudaMallocAsync(&p, static_cast<std::size_t>(size), stream)
                                 : cudaMalloc(&p, static_cast<std::size_t>(size));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return p;
  }

  void release_cached() noexcept {
    if (free_.empty()) return;
    cudaDeviceSynchronize();
    for (auto& [key, p] : free_) {
      if (pools_ > 0) cudaFreeAsync(p, key.first);
      else cudaFree(p);
      counters_.reserved.fetch_sub(key.second, std::memory_order_relaxed);
    }
    free_.clear();
    if (pools_ > 0) {
      // cudaFreeAsync returns blocks to the pool; trimming hands them back to the driver.
      cudaDeviceSynchronize();
      int dev = 0;
      cudaMemPool_t pool;
      if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) cudaMemPoolTrimTo(pool, 0);
    }
    cudaGetLastError();
  }

  ::mixprec::detail::StatCounters counters_;
  mutable std::mutex mu_;
  std::multimap<std::pair<cudaStream_t, int64_t>, void*> free_;
  std::unordered_map<void*, Block> live_;
  int pools_ = -1;  // unknown until the first allocation (there may be no device at start-up)
};

inline Allocator* caching_allocator() {
  static auto* a = new CachingAllocator;  // never destroyed, as the CPU allocator
  return a;
}

}  // namespace mixprec::gpu
