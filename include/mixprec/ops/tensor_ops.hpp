#pragma once
// Casts, copies, views and factories. Views share storage and carry autograd like any op.
#include <cstring>
#include <iomanip>
#include <sstream>

#include "mixprec/amp/autocast.hpp"
#include "mixprec/autograd/function.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/core/capabilities.hpp"
#include "mixprec/backends/cpu/loops.hpp"
#include "mixprec/dtype/convert.hpp"
#include "mixprec/tensor/generator.hpp"

namespace mixprec {

namespace detail {
// For the ops with only a CPU kernel (backends/device.hpp lists what a device runs).
inline void require_cpu(const char* op, const Tensor& t) {
  MIXPREC_CHECK(t.device() == Device::CPU, op, ": tensor of shape ", t.sizes(), " is on ", t.device(), ", and ", op,
                " has only a CPU kernel; move it with .cpu()");
}
inline bool on_cpu(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined() && t->device() != Device::CPU) return false;
  return true;
}
// The same values on device d (same dtype, contiguous), without a graph edge. `op` names the
// caller in errors (default: to(<d>)).
inline Tensor move_raw(const Tensor& t, Device d, const char* op = nullptr) {
  if (t.device() == d) return t;
  const std::string name = op ? std::string(op) : "to(" + std::string(mixprec::name(d)) + ")";
  if (d == Device::CPU) {
    const auto to_host = device_kernel(name.c_str(), t, &DeviceKernels::to_host);
    refuse_during_capture(name, t, "reads back");
    Tensor out = to_host(t);
    report_device_checks();  // errors kernels found since the last read (backends/device.hpp)
    return out;
  }
  MIXPREC_CHECK(t.device() == Device::CPU, name, ": cannot move a tensor of shape ", t.sizes(), " from ", t.device(), " to ", d,
                " directly; go through the CPU");
  const DeviceKernels* k = device_kernels(d);
  MIXPREC_CHECK(k != nullptr || d != Device::CUDA || cuda_is_available(), name, ": cannot move a tensor of shape ", t.sizes(), " to ",
                d, ": ", cuda_unavailable_reason());
  MIXPREC_CHECK(k != nullptr && k->to_device != nullptr, name, ": cannot move a tensor of shape ", t.sizes(), " to ", d, ": no ", d,
                " kernels are compiled into this program (include <mixprec/cuda.hpp> in a translation unit compiled by nvcc and "
                "link mixprec::cuda)");
  // One value (a scalar operand) travels as a fill kernel's argument: no upload from pageable
  // memory, and a captured graph replays it.
  if (t.numel() == 1 && k->fill && t.dtype() != DType::Int64 && t.dtype() != DType::Float64) {
    Tensor out = empty(t.sizes(), t.dtype(), d);
    k->fill(out, t.item<double>());
    return out;
  }
  refuse_during_capture(name, t, "uploads");
  return k->to_device(t);
}

inline void refuse_inplace_on_grad(const char* op, const Tensor& t) {
  MIXPREC_CHECK(!(GradMode::is_enabled() && autograd::tensor_requires_grad(t)), op,
                ": in-place operation on a tensor that requires grad (shape ", t.sizes(),
                "); use the out-of-place op, or wrap it in mixprec::no_grad if it is not part of the model");
}

// Converting NaN, inf or an out-of-range floating value to an integer type is undefined behaviour.
inline bool fits_integer(DType d, double v) {
  if (is_floating_point(d) || d == DType::Bool) return true;
  const auto [lo, hi] = d == DType::UInt8 ? std::pair{-1.0, 256.0}
                        : d == DType::Int32 ? std::pair{-2147483649.0, 2147483648.0}
                                            : std::pair{-9223372036854777856.0, 9223372036854775808.0};
  return v > lo && v < hi;  // false for NaN
}
inline void check_fill_value(const char* op, DType d, double v) {
  MIXPREC_CHECK(fits_integer(d, v), op, ": value ", v, " does not fit a ", d, " tensor");
}

// dst = src, src broadcast to dst's shape and converted to dst's dtype: the library's one copy
// (casts, clone, contiguous, copy_). Run by dst's device's `copy` kernel (the CPU's is
// cpu::copy_convert, backends/cpu/elementwise.hpp); a source on another device is moved there
// first, as torch's copy_ uploads a CPU source.
inline void copy_kernel(const Tensor& dst, const Tensor& src) {
  if (dst.numel() == 0) return;
  const auto copy = device_kernel("copy_", dst, &DeviceKernels::copy);
  copy(dst, src.device() == dst.device() ? src : move_raw(src, dst.device()));
}

// t's values, contiguous and in dtype d, without a graph edge: what kernels read raw pointers from.
inline Tensor contiguous_raw(const Tensor& t, DType d) {
  if (t.dtype() == d && t.is_contiguous()) return t;
  Tensor out = empty(t.sizes(), d, t.device());
  copy_kernel(out, t);
  return out;
}
inline Tensor contiguous_raw(const Tensor& t) { return contiguous_raw(t, t.dtype()); }
// A broadcast view of t with `shape` (stride 0 on broadcast dims), no autograd.
inline Tensor expand_raw(const Tensor& t, const Shape& shape) {
  if (t.sizes() == shape) return t;
  const int64_t off = static_cast<int64_t>(shape.size()) - t.dim();
  Shape st(shape.size(), 0);
  for (int64_t i = 0; i < t.dim(); ++i) st[off + i] = t.size(i) == 1 && shape[off + i] != 1 ? 0 : t.stride(i);
  return make_view(t, shape, st, t.storage_offset());
}
// Same-dtype values without a graph edge (kernels work on raw data).
// A channels-last t stays channels-last (empty_like_layout), as PyTorch's casts preserve the format.
inline Tensor as_dtype_raw(const Tensor& t, DType d) {
  if (t.dtype() == d) return t;
  Tensor out = empty_like_layout(t, d);
  copy_kernel(out, t);
  return out;
}

// t's values with another shape of the same numel, contiguous, without a graph edge.
inline Tensor reshape_raw(const Tensor& t, const Shape& shape) {
  const Tensor c = contiguous_raw(t);
  return make_view(c, shape, contiguous_strides(shape), c.storage_offset());
}

// Only floating -> integer conversions pay for this scan.
inline void check_float_to_integer(const char* op, const Tensor& src, DType to) {
  if (!src.is_floating_point() || is_floating_point(to) || to == DType::Bool || src.numel() == 0) return;
  const Tensor v = contiguous_raw(move_raw(src, Device::CPU), DType::Float64);
  const double* p = v.data<double>();
  for (int64_t i = 0, n = v.numel(); i < n; ++i)
    MIXPREC_CHECK(fits_integer(to, p[i]), op, ": value ", p[i], " at flat index ", i, " of a ", src.dtype(),
                  " tensor of shape ", src.sizes(), " does not fit ", to, " (round or clamp it first)");
}
}  // namespace detail

// ---------- factories ----------
inline Tensor full(const Shape& shape, double value, DType dtype = DType::Float32, Device device = Device::CPU) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}
inline Tensor zeros(const Shape& shape, DType dtype = DType::Float32, Device device = Device::CPU) {
  Tensor t = empty(shape, dtype, device);
  if (t.numel() > 0) detail::device_kernel("zeros", t, &DeviceKernels::fill)(t, 0.0);
  return t;
}
inline Tensor ones(const Shape& shape, DType dtype = DType::Float32, Device device = Device::CPU) {
  return full(shape, 1.0, dtype, device);
}
inline Tensor zeros_like(const Tensor& t) { return zeros(t.sizes(), t.dtype(), t.device()); }
inline Tensor ones_like(const Tensor& t) { return ones(t.sizes(), t.dtype(), t.device()); }
inline Tensor full_like(const Tensor& t, double v) { return full(t.sizes(), v, t.dtype(), t.device()); }

inline Tensor arange(double start, double end, double step = 1.0, DType dtype = DType::Int64) {
  MIXPREC_CHECK(step != 0, "arange: step must be non-zero");
  MIXPREC_CHECK((end - start) / step >= 0, "arange: range [", start, ", ", end, ") with step ", step, " is empty the wrong way");
  const auto n = static_cast<int64_t>(std::ceil((end - start) / step));
  Tensor t = empty({n}, dtype);
  dispatch_all(dtype, "arange", [&]<class T>() {
    T* p = t.data<T>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(start + static_cast<double>(i) * step);
  });
  return t;
}
inline Tensor arange(int64_t end, DType dtype = DType::Int64) { return arange(0.0, static_cast<double>(end), 1.0, dtype); }

inline Tensor rand(const Shape& shape, DType dtype = DType::Float32, Generator& g = default_generator()) {
  Tensor t = empty(shape, dtype);
  dispatch_floating(dtype, "rand", [&]<class T>() {
    T* p = t.data<T>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(g.uniform());
  });
  return t;
}
inline Tensor randn(const Shape& shape, DType dtype = DType::Float32, Generator& g = default_generator()) {
  Tensor t = empty(shape, dtype);
  dispatch_floating(dtype, "randn", [&]<class T>() {
    T* p = t.data<T>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(g.normal());
  });
  return t;
}
// Uniform integers in [low, high).
inline Tensor randint(int64_t low, int64_t high, const Shape& shape, DType dtype = DType::Int64,
                      Generator& g = default_generator()) {
  MIXPREC_CHECK(high > low, "randint: empty range [", low, ", ", high, ")");
  Tensor t = empty(shape, dtype);
  dispatch_all(dtype, "randint", [&]<class T>() {
    T* p = t.data<T>();
    const auto span = static_cast<uint64_t>(high - low);
    for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(static_cast<double>(low + static_cast<int64_t>(g.below(span))));
  });
  return t;
}

// The same factories with TensorOptions (tensor/tensor.hpp). Random values are drawn on the CPU,
// in the CPU's order, and then moved: the same seed gives the same tensor on every device.
namespace detail {
inline Tensor with_options(Tensor t, const TensorOptions& o) {
  if (t.device() != o.device) t = t.to(o.device);
  if (o.requires_grad) t.requires_grad_();
  return t;
}
}  // namespace detail
inline Tensor empty(const Shape& shape, const TensorOptions& o) { return detail::with_options(empty(shape, o.dtype, o.device), o); }
inline Tensor zeros(const Shape& shape, const TensorOptions& o) { return detail::with_options(zeros(shape, o.dtype, o.device), o); }
inline Tensor ones(const Shape& shape, const TensorOptions& o) { return detail::with_options(ones(shape, o.dtype, o.device), o); }
inline Tensor full(const Shape& shape, double value, const TensorOptions& o) {
  return detail::with_options(full(shape, value, o.dtype, o.device), o);
}
inline Tensor rand(const Shape& shape, const TensorOptions& o, Generator& g = default_generator()) {
  return detail::with_options(rand(shape, o.dtype, g), o);
}
inline Tensor randn(const Shape& shape, const TensorOptions& o, Generator& g = default_generator()) {
  return detail::with_options(randn(shape, o.dtype, g), o);
}

// Copies `values` into a new tensor; shape defaults to 1-D.
template <class T>
Tensor tensor(const std::vector<T>& values, Shape shape = {}, DType dtype = dtype_of<T>) {
  if (shape.empty() && values.size() != 1) shape = {static_cast<int64_t>(values.size())};
  MIXPREC_CHECK(numel_of(shape) == static_cast<int64_t>(values.size()), "tensor: ", values.size(),
                " values do not fill shape ", shape);
  Tensor t = empty(shape, dtype_of<T>);
  if (!values.empty()) std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(T));
  return dtype == dtype_of<T> ? t : t.to(dtype);
}
inline Tensor tensor(std::initializer_list<float> values, Shape shape = {}, DType dtype = DType::Float32) {
  return tensor(std::vector<float>(values), std::move(shape), dtype);
}
inline Tensor scalar_tensor(double v, DType dtype = DType::Float32) { return full({}, v, dtype); }

// ---------- in-place ----------
inline Tensor& Tensor::fill_(double v) {
  detail::refuse_inplace_on_grad("fill_", *this);
  detail::check_fill_value("fill_", dtype(), v);
  if (numel() > 0) detail::device_kernel("fill_", *this, &DeviceKernels::fill)(*this, v);
  bump_version();
  return *this;
}

inline Tensor& Tensor::copy_(const Tensor& src) {
  detail::refuse_inplace_on_grad("copy_", *this);
  MIXPREC_CHECK(src.dim() <= dim(), "copy_: cannot broadcast source of shape ", src.sizes(), " to ", sizes());
  for (int64_t i = 0; i < src.dim(); ++i) {
    const int64_t d = src.size(src.dim() - 1 - i);
    MIXPREC_CHECK(d == 1 || d == size(dim() - 1 - i), "copy_: cannot broadcast source of shape ", src.sizes(), " to ",
                  sizes());
  }
  detail::check_float_to_integer("copy_", src, dtype());
  detail::copy_kernel(*this, src);
  bump_version();
  return *this;
}

// ---------- cast / copy ----------
inline Tensor cast(const Tensor& t, DType d) {
  if (t.dtype() == d) return t;
  detail::check_float_to_integer("cast", t, d);
  Tensor out = empty_like_layout(t, d);  // a channels-last tensor stays channels-last
  detail::copy_kernel(out, t);
  if (autograd::should_record({t}) && is_floating_point(d)) {
    const DType from = t.dtype();
    autograd::record("cast", {t}, {out}, [from](const std::vector<Tensor>& g) -> std::vector<Tensor> {
      return {cast(g[0], from)};
    });
  }
  return out;
}
inline Tensor Tensor::to(DType d) const { return cast(*this, d); }

// Differentiable, as torch's: the gradient goes back to the source device.
inline Tensor Tensor::to(Device d) const {
  if (device() == d) return *this;
  Tensor out = detail::move_raw(*this, d);
  if (autograd::should_record({*this}))
    autograd::record("to", {*this}, {out}, [from = device()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
      return {detail::move_raw(g[0], from)};
    });
  return out;
}

inline Tensor Tensor::clone() const {
  Tensor out = empty(sizes(), dtype(), device());
  detail::copy_kernel(out, *this);
  if (autograd::should_record({*this}))
    autograd::record("clone", {*this}, {out}, [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {g[0]}; });
  return out;
}
inline Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }
inline Tensor Tensor::contiguous(MemoryFormat f) const {
  if (f == MemoryFormat::Contiguous) return contiguous();
  if (is_contiguous(f)) return *this;
  Tensor out = empty(sizes(), dtype(), device(), f);  // checks the 4 dims
  detail::copy_kernel(out, *this);
  if (autograd::should_record({*this}))
    autograd::record("contiguous", {*this}, {out}, [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {g[0]}; });
  return out;
}

// ---------- views ----------
namespace detail {
inline Shape infer_shape(Shape shape, int64_t numel, const char* op, const Shape& from) {
  int64_t known = 1, infer = -1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MIXPREC_CHECK(infer < 0, op, ": only one dimension can be -1 in shape ", shape);
      infer = static_cast<int64_t>(i);
    } else {
      MIXPREC_CHECK(shape[i] >= 0, op, ": invalid shape ", shape);
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    MIXPREC_CHECK(known != 0 && numel % known == 0, op, ": shape ", shape, " is invalid for input of shape ", from);
    shape[infer] = numel / known;
  }
  MIXPREC_CHECK(numel_of(shape) == numel, op, ": shape ", shape, " is invalid for input of shape ", from, " (", numel,
                " elements)");
  return shape;
}
// Strides for viewing `t` as `shape` without a copy, if any (PyTorch's computeStride).
inline std::optional<Shape> view_strides(const Tensor& t, const Shape& shape) {
  if (t.is_contiguous()) return contiguous_strides(shape);
  const Shape& old = t.sizes();
  const Shape& os = t.strides();
  Shape st(shape.size());
  int64_t view_d = static_cast<int64_t>(shape.size()) - 1;
  int64_t chunk_base = os.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(old.size()) - 1; d >= 0; --d) {
    tensor_numel *= old[d];
    if (d == 0 || (old[d - 1] != 1 && os[d - 1] != tensor_numel * chunk_base)) {
      while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
        st[view_d] = view_numel * chunk_base;
        view_numel *= shape[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (d > 0) {
        chunk_base = os[d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return st;
}

// A view whose gradient is `backward(grad)`; the view's input is not saved.
template <class F>
Tensor record_view(const char* name, const Tensor& in, Tensor out, F backward) {
  if (autograd::should_record({in}))
    autograd::record(name, {in}, {out}, [backward](const std::vector<Tensor>& g) -> std::vector<Tensor> {
      return {backward(g[0])};
    });
  return out;
}

// Gradient of a strided view: zeros of the input's shape with `grad` written through the same view.
inline Tensor scatter_into_view(const Tensor& grad, const Shape& in_sizes, const auto& make_view_of) {
  Tensor z = zeros(in_sizes, grad.dtype(), grad.device());
  Tensor v = make_view_of(z);
  copy_kernel(v, grad);
  return z;
}
}  // namespace detail

inline Tensor Tensor::view(const Shape& shape) const {
  const Shape s = detail::infer_shape(shape, numel(), "view", sizes());
  auto st = detail::view_strides(*this, s);
  MIXPREC_CHECK(st.has_value(), "view: shape ", s, " is not compatible with the input's sizes ", sizes(), " and strides ",
                strides(), " (at least one dimension spans two contiguous subspaces); use reshape()");
  const Shape in = sizes();
  return detail::record_view("view", *this, detail::make_view(*this, s, *st, storage_offset()),
                             [in](const Tensor& g) { return g.reshape(in); });
}

inline Tensor Tensor::reshape(const Shape& shape) const {
  const Shape s = detail::infer_shape(shape, numel(), "reshape", sizes());
  if (detail::view_strides(*this, s)) return view(s);
  return contiguous().view(s);
}

inline Tensor Tensor::flatten(int64_t start_dim, int64_t end_dim) const {
  if (dim() == 0) return reshape({1});
  const int64_t s = wrap_dim(start_dim, "flatten"), e = wrap_dim(end_dim, "flatten");
  MIXPREC_CHECK(s <= e, "flatten: start_dim ", start_dim, " comes after end_dim ", end_dim, " for shape ", sizes());
  Shape out(sizes().begin(), sizes().begin() + s);
  int64_t m = 1;
  for (int64_t i = s; i <= e; ++i) m *= size(i);
  out.push_back(m);
  out.insert(out.end(), sizes().begin() + e + 1, sizes().end());
  return reshape(out);
}

inline Tensor Tensor::permute(const Shape& dims) const {
  MIXPREC_CHECK(static_cast<int64_t>(dims.size()) == dim(), "permute: ", dims.size(), " dims given for a tensor of shape ",
                sizes());
  Shape s(dim()), st(dim()), inverse(dim());
  std::vector<bool> seen(dim(), false);
  for (int64_t i = 0; i < dim(); ++i) {
    const int64_t d = wrap_dim(dims[i], "permute");
    MIXPREC_CHECK(!seen[d], "permute: dimension ", d, " repeated in ", dims);
    seen[d] = true;
    s[i] = size(d);
    st[i] = stride(d);
    inverse[d] = i;
  }
  return detail::record_view("permute", *this, detail::make_view(*this, s, st, storage_offset()),
                             [inverse](const Tensor& g) { return g.permute(inverse); });
}

inline Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  if (dim() == 0) {
    wrap_dim(d0, "transpose");
    wrap_dim(d1, "transpose");
    return *this;
  }
  Shape p(dim());
  std::iota(p.begin(), p.end(), 0);
  std::swap(p[wrap_dim(d0, "transpose")], p[wrap_dim(d1, "transpose")]);
  return permute(p);
}
inline Tensor Tensor::t() const {
  MIXPREC_CHECK(dim() <= 2, "t: expects a tensor with <= 2 dimensions, got shape ", sizes());
  return dim() < 2 ? *this : transpose(0, 1);
}

inline Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  MIXPREC_CHECK(dim() > 0, "slice: cannot be applied to a 0-dim tensor");
  d = wrap_dim(d, "slice");
  MIXPREC_CHECK(step > 0, "slice: step must be positive, got ", step);
  const int64_t n = size(d);
  auto clampi = [n](int64_t i) { return std::clamp<int64_t>(i < 0 ? i + n : i, 0, n); };
  start = clampi(start);
  end = std::max(clampi(end), start);
  Shape s = sizes(), st = strides();
  s[d] = (end - start + step - 1) / step;
  st[d] *= step;
  const Shape in = sizes();
  return detail::record_view("slice", *this, detail::make_view(*this, s, st, storage_offset() + start * stride(d)),
                             [in, d, start, end, step](const Tensor& g) {
                               return detail::scatter_into_view(g, in, [&](const Tensor& z) { return z.slice(d, start, end, step); });
                             });
}
inline Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  MIXPREC_CHECK(dim() > 0, "narrow: cannot be applied to a 0-dim tensor");
  d = wrap_dim(d, "narrow");
  MIXPREC_CHECK(start >= 0 && length >= 0 && start + length <= size(d), "narrow: range [", start, ", ", start + length,
                ") out of bounds for dimension ", d, " of shape ", sizes());
  return slice(d, start, start + length);
}
inline Tensor Tensor::select(int64_t d, int64_t index) const {
  MIXPREC_CHECK(dim() > 0, "select: cannot be applied to a 0-dim tensor");
  d = wrap_dim(d, "select");
  const int64_t n = size(d);
  MIXPREC_CHECK(index >= -n && index < n, "select: index ", index, " out of range for dimension ", d, " of shape ", sizes());
  if (index < 0) index += n;
  Shape s = sizes(), st = strides();
  s.erase(s.begin() + d);
  st.erase(st.begin() + d);
  const Shape in = sizes();
  return detail::record_view("select", *this, detail::make_view(*this, s, st, storage_offset() + index * stride(d)),
                             [in, d, index](const Tensor& g) {
                               return detail::scatter_into_view(g, in, [&](const Tensor& z) { return z.select(d, index); });
                             });
}
inline Tensor Tensor::unsqueeze(int64_t d) const {
  MIXPREC_CHECK(d >= -dim() - 1 && d <= dim(), "unsqueeze: dimension ", d, " out of range for shape ", sizes());
  if (d < 0) d += dim() + 1;
  Shape s = sizes(), st = strides();
  s.insert(s.begin() + d, 1);
  st.insert(st.begin() + d, d < dim() ? st[d] * s[d + 1] : 1);
  const Shape in = sizes();
  return detail::record_view("unsqueeze", *this, detail::make_view(*this, s, st, storage_offset()),
                             [in](const Tensor& g) { return g.reshape(in); });
}
inline Tensor Tensor::squeeze(int64_t d) const {
  d = wrap_dim(d, "squeeze");
  if (dim() == 0 || size(d) != 1) return *this;
  Shape s = sizes(), st = strides();
  s.erase(s.begin() + d);
  st.erase(st.begin() + d);
  const Shape in = sizes();
  return detail::record_view("squeeze", *this, detail::make_view(*this, s, st, storage_offset()),
                             [in](const Tensor& g) { return g.reshape(in); });
}

// Broadcast shape of a and b (numpy rules); `op` names the caller in the error.
inline Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op = "broadcast") {
  const std::size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    const int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    MIXPREC_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", a, " and ", b, " cannot be broadcast together");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

Tensor sum_to(const Tensor& t, const Shape& shape);  // ops/reduce.hpp

inline Tensor Tensor::expand(const Shape& shape) const {
  MIXPREC_CHECK(static_cast<int64_t>(shape.size()) >= dim(), "expand: target shape ", shape, " has fewer dimensions than ",
                sizes());
  const int64_t off = static_cast<int64_t>(shape.size()) - dim();
  Shape s(shape.size()), st(shape.size(), 0);
  for (int64_t i = 0; i < static_cast<int64_t>(shape.size()); ++i) {
    const int64_t want = shape[i];
    if (i < off) {
      MIXPREC_CHECK(want >= 0, "expand: invalid target shape ", shape);
      s[i] = want;
      continue;
    }
    const int64_t have = size(i - off);
    MIXPREC_CHECK(want == -1 || want == have || have == 1, "expand: cannot expand shape ", sizes(), " to ", shape);
    s[i] = want == -1 ? have : want;
    st[i] = (have == 1 && s[i] != 1) ? 0 : stride(i - off);
  }
  if (s == sizes()) return *this;
  const Shape in = sizes();
  return detail::record_view("expand", *this, detail::make_view(*this, s, st, storage_offset()),
                             [in](const Tensor& g) { return sum_to(g, in); });
}

// ---------- scalar access and printing ----------
template <class T>
T Tensor::item() const {
  MIXPREC_CHECK(numel() == 1, "item: tensor of shape ", sizes(), " has ", numel(), " elements, expected one");
  const Tensor c = detail::move_raw(*this, Device::CPU, "item");  // waits for the device
  return dispatch_all_with_fp8(dtype(), "item", [&]<class S>() -> T {
    const S v = *static_cast<const S*>(c.data_ptr());
    if constexpr (is_floating_v<T> && !std::is_same_v<S, bool>) return static_cast<T>(static_cast<acc_t<S>>(v));
    else return static_cast<T>(static_cast<acc_t<S>>(v));
  });
}

inline std::string Tensor::to_string() const {
  if (!defined()) return "tensor(undefined)";
  std::ostringstream os;
  // A device tensor prints from a contiguous host copy (values elided without a backend).
  const Tensor c = device() == Device::CPU ? *this
                   : device_kernels(device()) ? detail::move_raw(*this, Device::CPU)
                                              : Tensor();
  os << "tensor(";
  if (c.defined()) {
    dispatch_all_with_fp8(dtype(), "print", [&]<class T>() {
      const int64_t n = numel();
      const int64_t limit = 6;  // elements shown at each end of a long dimension
      std::function<void(int64_t, int64_t)> rec = [&](int64_t d, int64_t off) {
        if (d == dim()) {
          const auto v = static_cast<acc_t<T>>(static_cast<const T*>(c.data_ptr())[off - c.storage_offset()]);
          if constexpr (is_floating_v<T>) os << std::fixed << std::setprecision(4) << static_cast<double>(v);
          else os << static_cast<int64_t>(v);
          return;
        }
        os << '[';
        const int64_t len = size(d);
        for (int64_t i = 0; i < len; ++i) {
          if (len > 2 * limit && i == limit) {
            os << "...";
            i = len - limit - 1;
            if (i + 1 < len) os << ", ";
            continue;
          }
          rec(d + 1, off + i * c.stride(d));
          if (i + 1 < len) os << (d + 1 == dim() ? ", " : ",\n" + std::string(static_cast<std::size_t>(8 + d), ' '));
        }
        os << ']';
      };
      (void)n;
      rec(0, c.storage_offset());
    });
  } else {
    os << "...";
  }
  os << ", shape=[";
  for (int64_t i = 0; i < dim(); ++i) os << (i ? ", " : "") << size(i);
  os << "], dtype=" << dtype();
  if (device() != Device::CPU) os << ", device=" << device();
  if (autograd::tensor_requires_grad(*this)) os << ", requires_grad=true";
  os << ')';
  return os.str();
}
inline std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.to_string(); }

}  // namespace mixprec
