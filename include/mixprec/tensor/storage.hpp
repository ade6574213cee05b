#pragma once
#include <cstdint>
#include <functional>
#include <memory>

#include "mixprec/tensor/allocator.hpp"

namespace mixprec {

// Refcounted bytes on one device. Views share it; the version counter lives here so that an
// in-place write through any view is seen by autograd's saved-tensor check.
struct StorageImpl {
  void* data = nullptr;
  int64_t nbytes = 0;
  Device device = Device::CPU;
  Allocator* owner = nullptr;               // null: memory borrowed from the user (from_blob)
  std::function<void(void*)> user_deleter;  // optional, for borrowed memory
  uint64_t version = 0;

  StorageImpl() = default;
  StorageImpl(const StorageImpl&) = delete;
  StorageImpl& operator=(const StorageImpl&) = delete;
  ~StorageImpl() {
    if (owner) owner->deallocate(data, nbytes);
    else if (user_deleter) user_deleter(data);
  }

  static std::shared_ptr<StorageImpl> allocate(Device d, int64_t nbytes) {
    auto s = std::make_shared<StorageImpl>();
    Allocator& a = allocator(d);
    s->data = a.allocate(nbytes);
    s->nbytes = nbytes;
    s->device = d;
    s->owner = &a;
    return s;
  }
};

}  // namespace mixprec
