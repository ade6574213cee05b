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
//
// Graph capture (CapturedStep, graph.cuh): between begin_pool and end_pool, allocations on the
// capturing stream come from a private pool. Its fresh memory comes from plain cudaMalloc (in
// relaxed capture mode, as PyTorch does): a cudaMallocAsync would become an allocation node of
// the graph. Pool blocks are never handed to anyone else while the graph lives, whether freed or
// not, because every replay writes them again; release_pool (after the graph is destroyed) gives
// the free ones to the ordinary cache and the live ones follow when they are freed.
#include <bit>
#include <map>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
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
    if (capture_pool_ != 0 && stream == capture_stream_) {
      Pool& pool = pools_of_graphs_[capture_pool_];
      auto pit = pool.free.find(size);
      if (pit != pool.free.end()) {
        p = pit->second;
        pool.free.erase(pit);
      } else {
        p = plain_alloc(size);
        if (!p) {
          const MemoryStats s = counters_.snapshot();
          fail("CUDA allocator: out of memory allocating ", nbytes, " bytes for a graph being captured (", s.allocated_bytes,
               " bytes allocated, ", s.reserved_bytes, " reserved)");
        }
        reserved_delta = size;
      }
      live_[p] = {size, stream, capture_pool_};
      counters_.on_alloc(nbytes, reserved_delta);
      return p;
    }
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
    live_[p] = {size, stream, 0};
    counters_.on_alloc(nbytes, reserved_delta);
    return p;
  }

  void deallocate(void* p, int64_t nbytes) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // not ours: nothing sensible to do in a noexcept path
    const auto pool = it->second.pool != 0 ? pools_of_graphs_.find(it->second.pool) : pools_of_graphs_.end();
    if (pool != pools_of_graphs_.end()) pool->second.free.emplace(it->second.size, p);
    else free_.emplace(std::make_pair(it->second.stream, it->second.size), p);
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

  // Allocations on `stream` come from pool `id` (a new id makes a new pool) until end_pool.
  void begin_pool(uint64_t id, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    MIXPREC_CHECK(id != 0 && capture_pool_ == 0, "CUDA allocator: a graph pool is already capturing");
    pools_of_graphs_[id];
    capture_pool_ = id;
    capture_stream_ = stream;
  }
  void end_pool() {
    std::lock_guard<std::mutex> lock(mu_);
    capture_pool_ = 0;
    capture_stream_ = nullptr;
  }
  // The graph that used pool `id` is gone and nothing of it runs any more (the caller
  // synchronised): its free blocks join the cache of `stream`, its live ones will when freed.
  void release_pool(uint64_t id, cudaStream_t stream) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = pools_of_graphs_.find(id);
    if (it == pools_of_graphs_.end()) return;
    for (const auto& [size, p] : it->second.free) free_.emplace(std::make_pair(stream, size), p);
    for (auto& [p, b] : live_)
      if (b.pool == id) b = {b.size, stream, 0};
    pools_of_graphs_.erase(it);
  }
  // Blocks a graph pool holds, free or live (tests: nothing leaks into or out of a pool).
  int64_t pool_blocks(uint64_t id) const {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = pools_of_graphs_.find(id);
    int64_t n = it == pools_of_graphs_.end() ? 0 : static_cast<int64_t>(it->second.free.size());
    for (const auto& [p, b] : live_) n += b.pool == id;
    return n;
  }

 private:
  struct Block {
    int64_t size;
    cudaStream_t stream;
    uint64_t pool;  // the graph pool it belongs to; 0: none
  };
  struct Pool {
    std::multimap<int64_t, void*> free;
  };

  // cudaMalloc outside the capture's rules: it does not synchronise, and is not recorded.
  void* plain_alloc(int64_t size) {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, static_cast<std::size_t>(size));
    cudaThreadExchangeStreamCaptureMode(&mode);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    plain_.insert(p);
    return p;
  }

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
      if (pools_ > 0 && !plain_.count(p)) cudaFreeAsync(p, key.first);
      else cudaFree(p);
      plain_.erase(p);
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
  std::unordered_map<uint64_t, Pool> pools_of_graphs_;
  std::unordered_set<void*> plain_;  // from cudaMalloc while pools_ > 0 (cudaFree, not cudaFreeAsync)
  uint64_t capture_pool_ = 0;
  cudaStream_t capture_stream_ = nullptr;
  int pools_ = -1;  // unknown until the first allocation (there may be no device at start-up)
};

inline Allocator* caching_allocator() {
  static auto* a = new CachingAllocator;  // never destroyed, as the CPU allocator
  return a;
}

}  // namespace mixprec::gpu
