#pragma once
// Tensor: a refcounted handle to (storage, offset, sizes, strides, dtype). dtype and device are
// run-time values; typed access (data<T>, accessor<T,N>, TensorView<T>) is checked against them.
// Ops, autograd and printing attach to this class from their own headers (include mixprec.hpp).
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/dtype/dispatch.hpp"
#include "mixprec/dtype/dtype.hpp"
#include "mixprec/tensor/device.hpp"
#include "mixprec/tensor/storage.hpp"

namespace mixprec {

using Shape = std::vector<int64_t>;

namespace autograd {
struct AutogradMeta;
struct Node;
}  // namespace autograd

inline int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

inline Shape contiguous_strides(const Shape& s) {
  Shape st(s.size());
  int64_t acc = 1;
  for (int64_t i = static_cast<int64_t>(s.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= std::max<int64_t>(s[i], 1);
  }
  return st;
}

// How a 4-D [N, C, H, W] tensor is laid out (torch.memory_format). ChannelsLast stores it as
// [N, H, W, C]: the layout in which oneDNN's CPU convolutions (and tensor-core convolutions) run
// without reorders; convolutions return it for such an input and element-wise ops keep it, so a
// network converted once at its input stays in it.
enum class MemoryFormat : uint8_t { Contiguous, ChannelsLast };

// [N, C, H, W] stored as [N, H, W, C] (PyTorch's strides, size-0 dims counted as 1).
inline Shape channels_last_strides(const Shape& s) {
  MIXPREC_CHECK(s.size() == 4, "channels_last: expected a 4-D shape [N, C, H, W], got ", s);
  const int64_t C = std::max<int64_t>(s[1], 1), W = std::max<int64_t>(s[3], 1), H = std::max<int64_t>(s[2], 1);
  return {H * W * C, 1, W * C, C};
}

struct TensorImpl {
  std::shared_ptr<StorageImpl> storage;
  int64_t offset = 0;  // in elements
  Shape sizes;
  Shape strides;
  DType dtype = DType::Float32;
  std::shared_ptr<autograd::AutogradMeta> autograd;  // null until autograd touches the tensor
};

template <class T, int N>
class TensorAccessor {
 public:
  TensorAccessor(T* data, const int64_t* sizes, const int64_t* strides) : data_(data), sizes_(sizes), strides_(strides) {}
  decltype(auto) operator[](int64_t i) const {
    if constexpr (N == 1) return data_[i * strides_[0]];
    else return TensorAccessor<T, N - 1>(data_ + i * strides_[0], sizes_ + 1, strides_ + 1);
  }
  int64_t size(int d) const { return sizes_[d]; }
  int64_t stride(int d) const { return strides_[d]; }

 private:
  T* data_;
  const int64_t* sizes_;
  const int64_t* strides_;
};

class Tensor;
template <class T> struct TensorView;

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  bool defined() const { return impl_ != nullptr; }
  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool is_same(const Tensor& o) const { return impl_ == o.impl_; }

  // --- metadata ---
  const Shape& sizes() const { return checked().sizes; }
  const Shape& shape() const { return sizes(); }
  const Shape& strides() const { return checked().strides; }
  int64_t dim() const { return static_cast<int64_t>(sizes().size()); }
  int64_t size(int64_t d) const {
    MIXPREC_CHECK(dim() > 0, "size: a 0-dim tensor has no dimension ", d);
    return sizes()[wrap_dim(d, "size")];
  }
  int64_t stride(int64_t d) const {
    MIXPREC_CHECK(dim() > 0, "stride: a 0-dim tensor has no dimension ", d);
    return strides()[wrap_dim(d, "stride")];
  }
  int64_t numel() const { return numel_of(sizes()); }
  DType dtype() const { return checked().dtype; }
  Device device() const { return checked().storage->device; }
  int64_t storage_offset() const { return checked().offset; }
  std::size_t element_size() const { return itemsize(dtype()); }
  int64_t nbytes() const { return numel() * static_cast<int64_t>(element_size()); }
  bool is_floating_point() const { return mixprec::is_floating_point(dtype()); }
  bool is_contiguous() const {
    if (numel() == 0) return true;  // nothing to lay out, as in PyTorch
    const auto& s = sizes();
    const auto& st = strides();
    int64_t expect = 1;
    for (int64_t i = dim() - 1; i >= 0; --i) {
      if (s[i] == 1) continue;
      if (st[i] != expect) return false;
      expect *= s[i];
    }
    return true;
  }
  // The layout by exact strides: ChannelsLast only where the strides are channels_last_strides()
  // (then also for C = 1, where both layouts hold the same bytes: the strides say which the
  // producer chose, and so which one the next convolution returns).
  bool is_contiguous(MemoryFormat f) const {
    if (f == MemoryFormat::Contiguous) return is_contiguous();
    return dim() == 4 && strides() == channels_last_strides(sizes());
  }
  MemoryFormat suggest_memory_format() const {
    return is_contiguous(MemoryFormat::ChannelsLast) && strides() != contiguous_strides(sizes()) ? MemoryFormat::ChannelsLast
                                                                                                 : MemoryFormat::Contiguous;
  }
  const std::shared_ptr<StorageImpl>& storage() const { return checked().storage; }
  uint64_t version() const { return storage()->version; }
  void bump_version() const { ++storage()->version; }

  int64_t wrap_dim(int64_t d, const char* op) const {
    const int64_t n = static_cast<int64_t>(checked().sizes.size());
    const int64_t lim = std::max<int64_t>(n, 1);
    MIXPREC_CHECK(d >= -lim && d < lim, op, ": dimension ", d, " out of range for a tensor of shape ", sizes());
    return d < 0 ? d + lim : d;
  }

  // --- typed access ---
  void* data_ptr() const {
    const auto& i = checked();
    return static_cast<char*>(i.storage->data) + i.offset * static_cast<int64_t>(itemsize(i.dtype));
  }
  template <class T>
  T* data() const {
    MIXPREC_CHECK(dtype_of<T> == dtype(), "data<", name(dtype_of<T>), ">(): tensor has dtype ", dtype());
    return static_cast<T*>(data_ptr());
  }
  template <class T, int N>
  TensorAccessor<T, N> accessor() const {
    MIXPREC_CHECK(dim() == N, "accessor<", name(dtype_of<std::remove_const_t<T>>), ", ", N, ">(): tensor has ", dim(),
                  " dimensions, shape ", sizes());
    MIXPREC_CHECK(device() == Device::CPU, "accessor(): tensor is on ", device(), "; copy it to the CPU first");
    return TensorAccessor<T, N>(data<std::remove_const_t<T>>(), sizes().data(), strides().data());
  }
  template <class T>
  T item() const;

  // --- autograd (autograd/engine.hpp) ---
  bool requires_grad() const;
  Tensor& requires_grad_(bool on = true);
  Tensor grad() const;
  void set_grad(const Tensor& g) const;
  bool is_leaf() const;
  std::shared_ptr<autograd::Node> grad_fn() const;
  void backward(const Tensor& gradient = Tensor(), bool retain_graph = false) const;
  Tensor detach() const;
  void retain_grad() const;

  // --- views and conversions (ops/) ---
  Tensor view(const Shape& shape) const;
  Tensor reshape(const Shape& shape) const;
  Tensor flatten(int64_t start_dim = 0, int64_t end_dim = -1) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor t() const;
  Tensor permute(const Shape& dims) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor select(int64_t dim, int64_t index) const;
  Tensor expand(const Shape& shape) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;
  Tensor contiguous() const;
  Tensor contiguous(MemoryFormat f) const;  // a copy in layout f unless already in it (autograd as clone)
  Tensor clone() const;
  Tensor to(DType d) const;
  Tensor to(Device d) const;
  Tensor cpu() const { return to(Device::CPU); }
  Tensor& copy_(const Tensor& src);
  Tensor& fill_(double v);
  Tensor& zero_() { return fill_(0.0); }

  std::string to_string() const;

 private:
  const TensorImpl& checked() const {
    MIXPREC_CHECK(impl_ != nullptr, "Tensor: operation on an undefined tensor");
    return *impl_;
  }
  std::shared_ptr<TensorImpl> impl_;
};

// A typed strided view with a run-time rank: what CPU kernels iterate over.
template <class T>
struct TensorView {
  T* data;
  Shape sizes;
  Shape strides;
  explicit TensorView(const Tensor& t) : data(t.data<std::remove_const_t<T>>()), sizes(t.sizes()), strides(t.strides()) {}
  int64_t numel() const { return numel_of(sizes); }
};

namespace detail {
// A new tensor sharing `base`'s storage; no autograd bookkeeping (callers add it).
inline Tensor make_view(const Tensor& base, Shape sizes, Shape strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.storage();
  impl->offset = offset;
  impl->sizes = std::move(sizes);
  impl->strides = std::move(strides);
  impl->dtype = base.dtype();
  return Tensor(std::move(impl));
}
}  // namespace detail

inline Tensor empty(const Shape& shape, DType dtype = DType::Float32, Device device = Device::CPU) {
  for (int64_t d : shape) MIXPREC_CHECK(d >= 0, "empty: negative dimension in shape ", shape);
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = StorageImpl::allocate(device, numel_of(shape) * static_cast<int64_t>(itemsize(dtype)));
  impl->sizes = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

// The factories' options by name, next to their positional (dtype, device) forms:
// `randn({2, 3}, {.dtype = DType::BFloat16, .device = Device::CUDA, .requires_grad = true})`.
struct TensorOptions {
  DType dtype = DType::Float32;
  Device device = Device::CPU;
  bool requires_grad = false;
};

inline Tensor empty(const Shape& shape, DType dtype, Device device, MemoryFormat f) {
  Tensor t = empty(shape, dtype, device);
  if (f == MemoryFormat::ChannelsLast) t.impl()->strides = channels_last_strides(shape);
  return t;
}

// A new tensor of t's shape in t's layout (ChannelsLast kept, anything else contiguous): how
// element-wise results and casts are allocated, so that a channels-last network stays in it.
inline Tensor empty_like_layout(const Tensor& t, DType dtype) { return empty(t.sizes(), dtype, t.device(), t.suggest_memory_format()); }

inline Tensor empty_like(const Tensor& t) { return empty(t.sizes(), t.dtype(), t.device()); }
inline Tensor empty_like(const Tensor& t, DType dtype) { return empty(t.sizes(), dtype, t.device()); }

// Borrow user memory without copying (as torch::from_blob); the caller keeps it alive, or passes
// a deleter. `device` says where the memory is (a cudaMalloc'ed buffer is Device::CUDA).
inline Tensor from_blob(void* data, const Shape& shape, DType dtype, std::function<void(void*)> deleter = {},
                        Device device = Device::CPU) {
  auto s = std::make_shared<StorageImpl>();
  s->data = data;
  s->nbytes = numel_of(shape) * static_cast<int64_t>(itemsize(dtype));
  s->device = device;
  s->user_deleter = std::move(deleter);
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::move(s);
  impl->sizes = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

}  // namespace mixprec
