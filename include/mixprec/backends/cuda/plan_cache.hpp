#pragma once
// The per-shape cache of built library objects (cuBLASLt descriptors and algorithms, cuDNN
// descriptors and benchmarked algorithms): host code, tested on the CPU.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <unordered_map>

namespace mixprec::gpu {

// Built objects per key, made once by `make` on a miss. Not locked: each host thread keeps its own
// (as it keeps its own cuBLASLt and cuDNN handles). A training loop has a few dozen shapes; past
// `capacity` (shapes that keep changing) the cache starts over rather than grow without bound.
// Elements are node-based: a returned reference stays valid until the next miss that overflows.
template <class Key, class Value, class Hash = std::hash<Key>>
class PlanCache {
 public:
  explicit PlanCache(std::size_t capacity = 1024) : capacity_(capacity) {}
  template <class Make>
  Value& get(const Key& key, Make&& make) {
    if (auto it = map_.find(key); it != map_.end()) {
      ++hits_;
      return it->second;
    }
    ++misses_;
    if (map_.size() >= capacity_) map_.clear();
    return map_.emplace(key, make()).first->second;
  }
  std::size_t size() const { return map_.size(); }
  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }
  void clear() { map_.clear(); }

 private:
  std::size_t capacity_;
  std::unordered_map<Key, Value, Hash> map_;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace mixprec::gpu
