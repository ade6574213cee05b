#pragma once
// Element-wise ops with broadcasting. Mixed dtypes promote (promote_types); 16-bit values are
// computed in float and rounded once on store. Backward formulas reuse these same ops.
#include <cmath>
#include <numbers>

#include "mixprec/backends/cpu/vec_math.hpp"
#include "mixprec/core/config.hpp"
#include "mixprec/ops/tensor_ops.hpp"

namespace mixprec {

Tensor mul(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, double s);
Tensor div(const Tensor& a, const Tensor& b);
Tensor neg(const Tensor& x);
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
Tensor masked_fill(const Tensor& x, const Tensor& mask, double value);

namespace detail {
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

// out = f(a, b) over the broadcast shape, computed in the promoted dtype; `out_dtype` may be
// bool for comparisons. F receives acc_t values.
template <class F>
Tensor binary_kernel(const char* op, const Tensor& a, const Tensor& b, F f, std::optional<DType> out_dtype = {}) {
  require_cpu(op, a);
  require_cpu(op, b);
  const Shape shape = broadcast_shapes(a.sizes(), b.sizes(), op);
  const DType ct = promote_types(a.dtype(), b.dtype());
  const Tensor ac = expand_raw(as_dtype_raw(a, ct), shape);
  const Tensor bc = expand_raw(as_dtype_raw(b, ct), shape);
  const DType od = out_dtype.value_or(ct);
  // The result takes the layout of an operand of its full shape (a channels-last one stays so).
  const MemoryFormat layout = a.sizes() == shape ? a.suggest_memory_format() : b.sizes() == shape ? b.suggest_memory_format()
                                                                                               : MemoryFormat::Contiguous;
  Tensor out = empty(shape, od, Device::CPU, layout);
  dispatch_all(ct, op, [&]<class T>() {
    if (od == DType::Bool) cpu::map<bool, T, T>(out, f, ac, bc);
    else cpu::map<T, T, T>(out, f, ac, bc);
  });
  return out;
}

template <class F>
Tensor unary_kernel(const char* op, const Tensor& x, F f, std::optional<DType> out_dtype = {}) {
  require_cpu(op, x);
  const DType od = out_dtype.value_or(x.dtype());
  Tensor out = empty_like_layout(x, od);
  dispatch_all(x.dtype(), op, [&]<class T>() {
    if (od == DType::Bool) cpu::map<bool, T>(out, f, x);
    else cpu::map<T, T>(out, f, x);
  });
  return out;
}

template <class F>
Tensor unary_floating_kernel(const char* op, const Tensor& x, F f) {
  MIXPREC_CHECK(x.is_floating_point(), op, ": expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
  return unary_kernel(op, x, f);
}

// a op b through the `binary` kernel of the operands' device (the CPU's takes every dtype; the
// others floating operands). A 0-dim CPU operand (the scalar of add(t, 2.0)) that does not change
// the result's dtype goes to the `binary_scalar` kernel by value; otherwise, off the CPU, it is
// uploaded, as PyTorch treats CPU scalars. Two floating dtypes go to the kernel as they are: it
// widens while it reads; an integer operand is brought to the promoted dtype first.
inline Tensor device_binary(const char* op, DeviceBinary kind, Tensor a, Tensor b, double alpha = 1.0) {
  const Device d = a.device() != Device::CPU ? a.device() : b.device();
  auto host_scalar = [](const Tensor& t) { return t.device() == Device::CPU && t.dim() == 0; };
  if (host_scalar(a) != host_scalar(b)) {
    const Tensor& t = host_scalar(a) ? b : a;
    const Tensor& s = host_scalar(a) ? a : b;
    const DeviceKernels* k = device_kernels(d);
    if (k && k->binary_scalar && t.is_floating_point() && promote_types(a.dtype(), b.dtype()) == t.dtype())
      return k->binary_scalar(kind, t, s.item<double>(), alpha, host_scalar(a));
  }
  auto place = [d](const Tensor& t) { return t.device() == Device::CPU && t.dim() == 0 ? move_raw(t, d) : t; };
  a = place(a);
  b = place(b);
  common_device(op, {&a, &b});
  const DType ct = promote_types(a.dtype(), b.dtype());
  MIXPREC_CHECK(d == Device::CPU || is_floating_point(ct), op, ": ", d, " kernels take floating-point operands, got ", a.dtype(),
                " and ", b.dtype());
  auto raw = [ct](const Tensor& t) { return t.is_floating_point() ? t : as_dtype_raw(t, ct); };
  return device_kernel(op, a, &DeviceKernels::binary)(kind, raw(a), raw(b), alpha);
}

// Gradient for an input of a broadcasting op: reduce to its shape, return in its dtype.
inline Tensor grad_for(const Tensor& g, const Shape& sizes, DType dtype) {
  Tensor r = sum_to(g, sizes);
  return r.dtype() == dtype ? r : as_dtype_raw(r, dtype);
}

inline bool needs_input_grad(const autograd::Edge& e) { return e.valid(); }
}  // namespace detail

// ---------- binary arithmetic ----------
inline Tensor add(const Tensor& a, const Tensor& b, double alpha = 1.0) {
  return dispatch(OpId::add, [alpha](const Tensor& a, const Tensor& b) {
    Tensor out = detail::device_binary("add", DeviceBinary::Add, a, b, alpha);
    if (autograd::should_record({a, b})) {
      autograd::record("add", {a, b}, {out},
                       [sa = a.sizes(), sb = b.sizes(), da = a.dtype(), db = b.dtype(), alpha](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         return {detail::grad_for(g[0], sa, da), detail::grad_for(alpha == 1.0 ? g[0] : mul(g[0], alpha), sb, db)};
                       });
    }
    return out;
  }, a, b);
}
inline Tensor sub(const Tensor& a, const Tensor& b, double alpha = 1.0) { return add(a, b, -alpha); }

inline Tensor mul(const Tensor& a, const Tensor& b) {
  return dispatch(OpId::mul, [](const Tensor& a, const Tensor& b) {
    Tensor out = detail::device_binary("mul", DeviceBinary::Mul, a, b);
    if (autograd::should_record({a, b})) {
      autograd::record("mul", {a, b}, {out},
                       [sa = autograd::SavedTensor(a), sb = autograd::SavedTensor(b)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& a = sa.get("mul");
                         const Tensor& b = sb.get("mul");
                         return {detail::grad_for(mul(g[0], b), a.sizes(), a.dtype()),
                                 detail::grad_for(mul(g[0], a), b.sizes(), b.dtype())};
                       });
    }
    return out;
  }, a, b);
}

inline Tensor div(const Tensor& a, const Tensor& b) {
  return dispatch(OpId::div, [](const Tensor& a, const Tensor& b) {
    const bool integral = !is_floating_point(promote_types(a.dtype(), b.dtype()));
    // True division, as Python's `/`: integers divide in float32.
    const Tensor af = integral ? detail::as_dtype_raw(a, DType::Float32) : a;
    const Tensor bf = integral ? detail::as_dtype_raw(b, DType::Float32) : b;
    Tensor out = detail::device_binary("div", DeviceBinary::Div, af, bf);
    if (autograd::should_record({a, b})) {
      autograd::record("div", {a, b}, {out},
                       [sa = autograd::SavedTensor(a), sb = autograd::SavedTensor(b)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& a = sa.get("div");
                         const Tensor& b = sb.get("div");
                         Tensor ga = detail::grad_for(div(g[0], b), a.sizes(), a.dtype());
                         // -(g a) / b^2: negating first is exact, so this rounds as -x / y does.
                         Tensor gb = detail::grad_for(div(mul(mul(g[0], a), -1.0), mul(b, b)), b.sizes(), b.dtype());
                         return {ga, gb};
                       });
    }
    return out;
  }, a, b);
}

// Scalar operands keep the tensor's dtype (a floating tensor stays 16-bit); an integer tensor
// with a non-integral scalar becomes float32, as in PyTorch.
namespace detail {
inline DType scalar_result_dtype(const Tensor& t, double s) {
  if (t.is_floating_point() || std::nearbyint(s) == s) return t.dtype();
  return DType::Float32;
}
}  // namespace detail
inline Tensor add(const Tensor& a, double s) { return add(a, scalar_tensor(s, detail::scalar_result_dtype(a, s))); }
inline Tensor sub(const Tensor& a, double s) { return add(a, -s); }
inline Tensor mul(const Tensor& a, double s) { return mul(a, scalar_tensor(s, detail::scalar_result_dtype(a, s))); }
inline Tensor div(const Tensor& a, double s) { return div(a, scalar_tensor(s, detail::scalar_result_dtype(a, s))); }

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator+(const Tensor& a, double s) { return add(a, s); }
inline Tensor operator-(const Tensor& a, double s) { return sub(a, s); }
inline Tensor operator*(const Tensor& a, double s) { return mul(a, s); }
inline Tensor operator/(const Tensor& a, double s) { return div(a, s); }
inline Tensor operator+(double s, const Tensor& a) { return add(a, s); }
inline Tensor operator*(double s, const Tensor& a) { return mul(a, s); }

// ---------- unary ----------
namespace detail {
// What a unary op's derivative is a function of; autograd keeps only that tensor alive.
enum class GradFrom : uint8_t { Input, Output };

// One of the table's activations (DeviceUnary), through the `unary` and `unary_backward` kernels
// of x's device; `from` says which of x and y the derivative reads, and autograd keeps only that.
inline Tensor table_unary_op(OpId id, const char* name, const Tensor& x, GradFrom from, DeviceUnary u) {
  return dispatch(id, [=](const Tensor& x) {
    MIXPREC_CHECK(x.is_floating_point(), name, ": expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    Tensor y = device_kernel(name, x, &DeviceKernels::unary)(u, x);
    if (autograd::should_record({x}))
      autograd::record(name, {x}, {y},
                       [sv = autograd::SavedTensor(from == GradFrom::Input ? x : y), name, u](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& v = sv.get(name);
                         // grad * f'(v): v has x's dtype; grad may differ (promote).
                         const Tensor gv = expand_raw(as_dtype_raw(g[0], v.dtype()), v.sizes());
                         // The kernel takes (x, y) and reads only the one its formula uses,
                         // which is the saved one (relu's y > 0 is x > 0).
                         return {device_kernel(name, v, &DeviceKernels::unary_backward)(u, gv, v, v)};
                       });
    return y;
  }, x);
}

// A unary op with only a CPU kernel (no table entry): y = fwd(x) and a backward grad * df(v)
// computed element-wise in one fused pass, v being the saved input x or output y as `from` says.
template <class Fwd, class Df>
Tensor unary_op(OpId id, const char* name, const Tensor& x, Fwd fwd, GradFrom from, Df df) {
  return dispatch(id, [=](const Tensor& x) {
    require_cpu(name, x);
    Tensor y = unary_floating_kernel(name, x, fwd);
    if (autograd::should_record({x})) {
      autograd::record(name, {x}, {y},
                       [sv = autograd::SavedTensor(from == GradFrom::Input ? x : y), name, df](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& v = sv.get(name);
                         // grad * f'(v): v has x's dtype; grad may differ (promote).
                         const Tensor gv = as_dtype_raw(g[0], v.dtype());
                         Tensor out = empty(v.sizes(), v.dtype());
                         dispatch_floating(v.dtype(), name, [&]<class T>() {
                           cpu::map<T, T, T>(out, [&](auto gg, auto vv) { return gg * df(vv); }, expand_raw(gv, v.sizes()), v);
                         });
                         return {out};
                       });
    }
    return y;
  }, x);
}
}  // namespace detail

// The activations' scalar math, shared with the CUDA kernels (backends/cuda/elementwise.cuh) so
// the CPU tests cover the formulas the GPU runs. T is the accumulation type (float or double);
// *_grad take the input v, *_grad_y the output y, whichever the formula is cheaper from.
namespace fn {
// exp, erf and tanh for the formulas below: on the CPU, float takes cpu::vec's branch-free
// versions (libm's are calls, which keep the element-wise loops scalar); double (the gradchecks)
// and device code keep the standard functions.
template <class T> MIXPREC_HOST_DEVICE T exp(T v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return cpu::vec::exp(v);
  else
#endif
    return std::exp(v);
}
template <class T> MIXPREC_HOST_DEVICE T erf(T v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return cpu::vec::erf(v);
  else
#endif
    return std::erf(v);
}
template <class T> MIXPREC_HOST_DEVICE T tanh(T v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return cpu::vec::tanh(v);
  else
#endif
    return std::tanh(v);
}

template <class T> MIXPREC_HOST_DEVICE T relu(T v) { return v > 0 || v != v ? v : T(0); }  // NaN propagates
template <class T> MIXPREC_HOST_DEVICE T relu_grad(T v) { return static_cast<T>(v > 0); }  // from x or y alike
template <class T> MIXPREC_HOST_DEVICE T sigmoid(T v) { return 1 / (1 + fn::exp(-v)); }
template <class T> MIXPREC_HOST_DEVICE T sigmoid_grad_y(T y) { return y * (1 - y); }
template <class T> MIXPREC_HOST_DEVICE T tanh_grad_y(T y) { return 1 - y * y; }
template <class T> MIXPREC_HOST_DEVICE T silu(T v) { return v / (1 + fn::exp(-v)); }
template <class T> MIXPREC_HOST_DEVICE T silu_grad(T v) {
  const T s = 1 / (1 + fn::exp(-v));
  return s * (1 + v * (1 - s));
}
template <class T> MIXPREC_HOST_DEVICE T gelu(T v) { return T(0.5) * v * (1 + fn::erf(v * T(0.70710678118654752440))); }
template <class T> MIXPREC_HOST_DEVICE T gelu_grad(T v) {
  return T(0.5) * (1 + fn::erf(v * T(0.70710678118654752440))) + v * T(0.39894228040143267794) * fn::exp(T(-0.5) * v * v);
}
// gelu(x, "tanh"), also cuBLASLt's GELU epilogue.
template <class T> MIXPREC_HOST_DEVICE T gelu_tanh(T v) {
  const T k = T(0.7978845608028654), c = T(0.044715);
  return T(0.5) * v * (1 + fn::tanh(k * (v + c * v * v * v)));
}
template <class T> MIXPREC_HOST_DEVICE T gelu_tanh_grad(T v) {
  const T k = T(0.7978845608028654), c = T(0.044715);
  const T t = fn::tanh(k * (v + c * v * v * v));
  return T(0.5) * (1 + t) + T(0.5) * v * (1 - t * t) * k * (1 + 3 * c * v * v);
}
}  // namespace fn

inline Tensor neg(const Tensor& x) {
  return dispatch(OpId::neg, [](const Tensor& x) {
    Tensor y = detail::unary_kernel("neg", x, [](auto v) { return -v; });
    if (autograd::should_record({x}))
      autograd::record("neg", {x}, {y}, [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {neg(g[0])}; });
    return y;
  }, x);
}
inline Tensor operator-(const Tensor& x) { return neg(x); }
inline Tensor operator-(double s, const Tensor& a) { return add(neg(a), s); }

// The activations of the kernel table (their CPU formulas are the fn:: ones above, assembled in
// backends/cpu/elementwise.hpp); sqrt, rsqrt and abs have only CPU kernels.
inline Tensor exp(const Tensor& x) { return detail::table_unary_op(OpId::exp, "exp", x, detail::GradFrom::Output, DeviceUnary::Exp); }
inline Tensor log(const Tensor& x) { return detail::table_unary_op(OpId::log, "log", x, detail::GradFrom::Input, DeviceUnary::Log); }
inline Tensor sqrt(const Tensor& x) {
  return detail::unary_op(OpId::sqrt, "sqrt", x, [](auto v) { return std::sqrt(v); }, detail::GradFrom::Output,
                          [](auto y) { return 1 / (2 * y); });
}
inline Tensor rsqrt(const Tensor& x) {
  return detail::unary_op(OpId::rsqrt, "rsqrt", x, [](auto v) { return 1 / std::sqrt(v); }, detail::GradFrom::Output,
                          [](auto y) { return decltype(y)(-0.5) * y * y * y; });
}
inline Tensor abs(const Tensor& x) {
  return detail::unary_op(OpId::abs, "abs", x, [](auto v) { return std::abs(v); }, detail::GradFrom::Input,
                          [](auto v) { return static_cast<decltype(v)>((v > 0) - (v < 0)); });
}
inline Tensor relu(const Tensor& x) { return detail::table_unary_op(OpId::relu, "relu", x, detail::GradFrom::Output, DeviceUnary::Relu); }
inline Tensor sigmoid(const Tensor& x) {
  return detail::table_unary_op(OpId::sigmoid, "sigmoid", x, detail::GradFrom::Output, DeviceUnary::Sigmoid);
}
inline Tensor tanh(const Tensor& x) { return detail::table_unary_op(OpId::tanh, "tanh", x, detail::GradFrom::Output, DeviceUnary::Tanh); }
inline Tensor silu(const Tensor& x) { return detail::table_unary_op(OpId::silu, "silu", x, detail::GradFrom::Input, DeviceUnary::Silu); }
// approximate: "none" (exact, erf) or "tanh", as torch.nn.functional.gelu.
inline Tensor gelu(const Tensor& x, std::string_view approximate = "none") {
  if (approximate == "tanh") return detail::table_unary_op(OpId::gelu, "gelu", x, detail::GradFrom::Input, DeviceUnary::GeluTanh);
  MIXPREC_CHECK(approximate == "none", "gelu: approximate must be \"none\" or \"tanh\", got \"", approximate, "\"");
  return detail::table_unary_op(OpId::gelu, "gelu", x, detail::GradFrom::Input, DeviceUnary::Gelu);
}

inline Tensor pow(const Tensor& x, double e) {
  return dispatch(OpId::pow, [e](const Tensor& x) {
    Tensor y = detail::unary_floating_kernel("pow", x, [e](auto v) { return std::pow(v, static_cast<decltype(v)>(e)); });
    if (autograd::should_record({x}))
      autograd::record("pow", {x}, {y}, [sx = autograd::SavedTensor(x), e](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const Tensor& x = sx.get("pow");
        const Tensor d = detail::unary_kernel("pow_backward", x, [e](auto v) { return static_cast<decltype(v)>(e) * std::pow(v, static_cast<decltype(v)>(e - 1)); });
        return {mul(g[0], d)};
      });
    return y;
  }, x);
}
inline Tensor pow(const Tensor& x, const Tensor& e) {
  return dispatch(OpId::pow, [](const Tensor& x, const Tensor& e) {
    Tensor y = detail::binary_kernel("pow", x, e, [](auto a, auto b) { return std::pow(a, b); });
    MIXPREC_CHECK(y.is_floating_point(), "pow: expected floating-point tensors, got ", x.dtype(), " and ", e.dtype());
    if (autograd::should_record({x, e}))
      autograd::record("pow", {x, e}, {y},
                       [sx = autograd::SavedTensor(x), se = autograd::SavedTensor(e), sy = autograd::SavedTensor(y)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("pow");
                         const Tensor& e = se.get("pow");
                         const Tensor& y = sy.get("pow");
                         Tensor dx = detail::binary_kernel("pow_backward", x, e, [](auto a, auto b) { return b * std::pow(a, b - 1); });
                         // d/de x^e = x^e log x; define it as 0 where x == 0 (the limit from x>0 of x^e log x for e>0).
                         Tensor de = detail::binary_kernel("pow_backward", y, x, [](auto p, auto a) { return a == 0 ? decltype(a)(0) : p * std::log(a); });
                         return {detail::grad_for(mul(g[0], dx), x.sizes(), x.dtype()), detail::grad_for(mul(g[0], de), e.sizes(), e.dtype())};
                       });
    return y;
  }, x, e);
}

// ---------- comparisons (no gradient) ----------
#define MIXPREC_COMPARE(fn, expr)                                                                            \
  inline Tensor fn(const Tensor& a, const Tensor& b) {                                                        \
    return dispatch(OpId::compare, [](const Tensor& a, const Tensor& b) {                                     \
      return detail::binary_kernel(#fn, a, b, [](auto x, auto y) { return expr; }, DType::Bool);              \
    }, a, b);                                                                                                 \
  }                                                                                                           \
  inline Tensor fn(const Tensor& a, double s) { return fn(a, scalar_tensor(s, detail::scalar_result_dtype(a, s))); }
MIXPREC_COMPARE(eq, x == y)
MIXPREC_COMPARE(ne, x != y)
MIXPREC_COMPARE(lt, x < y)
MIXPREC_COMPARE(le, x <= y)
MIXPREC_COMPARE(gt, x > y)
MIXPREC_COMPARE(ge, x >= y)
#undef MIXPREC_COMPARE
inline Tensor operator<(const Tensor& a, const Tensor& b) { return lt(a, b); }
inline Tensor operator>(const Tensor& a, const Tensor& b) { return gt(a, b); }
inline Tensor operator<=(const Tensor& a, const Tensor& b) { return le(a, b); }
inline Tensor operator>=(const Tensor& a, const Tensor& b) { return ge(a, b); }

// ---------- selection ----------
// where(cond, a, b): a where cond is true, else b; all three broadcast.
inline Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return dispatch(OpId::where, [](const Tensor& cond, const Tensor& a, const Tensor& b) {
    MIXPREC_CHECK(cond.dtype() == DType::Bool, "where: condition must be bool, got ", cond.dtype(), " of shape ", cond.sizes());
    detail::require_cpu("where", a);
    const Shape shape = broadcast_shapes(cond.sizes(), broadcast_shapes(a.sizes(), b.sizes(), "where"), "where");
    const DType ct = promote_types(a.dtype(), b.dtype());
    Tensor out = empty(shape, ct);
    dispatch_all(ct, "where", [&]<class T>() {
      cpu::map<T, bool, T, T>(out, [](auto c, auto x, auto y) { return c ? x : y; }, detail::expand_raw(cond, shape),
                              detail::expand_raw(detail::as_dtype_raw(a, ct), shape), detail::expand_raw(detail::as_dtype_raw(b, ct), shape));
    });
    if (autograd::should_record({a, b}))
      autograd::record("where", {a, b}, {out},
                       [sc = autograd::SavedTensor(cond), sa = a.sizes(), sb = b.sizes(), da = a.dtype(), db = b.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& c = sc.get("where");
                         const Tensor z = zeros({}, g[0].dtype());
                         return {detail::grad_for(where(c, g[0], z), sa, da), detail::grad_for(where(c, z, g[0]), sb, db)};
                       });
    return out;
  }, cond, a, b);
}

inline Tensor masked_fill(const Tensor& x, const Tensor& mask, double value) {
  // value is a dispatch argument so that anomaly mode sees a -inf fill was asked for.
  return dispatch(OpId::masked_fill, [](const Tensor& x, const Tensor& mask, double value) {
    MIXPREC_CHECK(mask.dtype() == DType::Bool, "masked_fill: mask must be bool, got ", mask.dtype());
    detail::check_fill_value("masked_fill", x.dtype(), value);
    const Shape shape = broadcast_shapes(x.sizes(), mask.sizes(), "masked_fill");
    MIXPREC_CHECK(shape == x.sizes(), "masked_fill: mask of shape ", mask.sizes(), " does not broadcast to input shape ", x.sizes());
    detail::require_cpu("masked_fill", x);
    Tensor out = empty(x.sizes(), x.dtype());
    dispatch_all(x.dtype(), "masked_fill", [&]<class T>() {
      const auto v = static_cast<acc_t<T>>(static_cast<T>(value));
      cpu::map<T, T, bool>(out, [v](auto a, auto m) { return m ? v : a; }, x, detail::expand_raw(mask, shape));
    });
    if (autograd::should_record({x}))
      autograd::record("masked_fill", {x}, {out}, [sm = autograd::SavedTensor(mask)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        return {masked_fill(g[0], sm.get("masked_fill"), 0.0)};
      });
    return out;
  }, x, mask, value);
}

inline Tensor clamp(const Tensor& x, std::optional<double> lo, std::optional<double> hi = std::nullopt) {
  MIXPREC_CHECK(lo || hi, "clamp: at least one of min and max must be given");
  return dispatch(OpId::clamp, [lo, hi](const Tensor& x) {
    const double l = lo.value_or(-std::numeric_limits<double>::infinity());
    const double h = hi.value_or(std::numeric_limits<double>::infinity());
    Tensor y = detail::unary_kernel("clamp", x, [l, h](auto v) {
      using T = decltype(v);
      if (v != v) return v;  // NaN stays NaN
      return static_cast<T>(std::min<double>(std::max<double>(static_cast<double>(v), l), h));
    });
    if (autograd::should_record({x}))
      autograd::record("clamp", {x}, {y}, [sx = autograd::SavedTensor(x), l, h](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const Tensor& x = sx.get("clamp");
        return {mul(g[0], detail::unary_kernel("clamp_backward", x, [l, h](auto v) {
                      return static_cast<decltype(v)>(static_cast<double>(v) >= l && static_cast<double>(v) <= h);
                    }))};
      });
    return y;
  }, x);
}

namespace detail {
template <bool IsMax>
Tensor extremum(OpId id, const char* name, const Tensor& a, const Tensor& b) {
  return dispatch(id, [name](const Tensor& a, const Tensor& b) {
    // NaN propagates, as torch.maximum.
    Tensor out = binary_kernel(name, a, b, [](auto x, auto y) {
      if (x != x || y != y) return x != x ? x : y;
      return IsMax ? (x > y ? x : y) : (x < y ? x : y);
    });
    if (autograd::should_record({a, b}))
      autograd::record(name, {a, b}, {out},
                       [sa = autograd::SavedTensor(a), sb = autograd::SavedTensor(b), name](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& a = sa.get(name);
                         const Tensor& b = sb.get(name);
                         // Ties split the gradient evenly, as PyTorch does.
                         auto wa = binary_kernel(name, a, b, [](auto x, auto y) {
                           using T = decltype(x);
                           return x == y ? T(0.5) : T(IsMax ? (x > y) : (x < y));
                         });
                         auto wb = binary_kernel(name, b, a, [](auto x, auto y) {
                           using T = decltype(x);
                           return x == y ? T(0.5) : T(IsMax ? (x > y) : (x < y));
                         });
                         return {grad_for(mul(g[0], wa), a.sizes(), a.dtype()), grad_for(mul(g[0], wb), b.sizes(), b.dtype())};
                       });
    return out;
  }, a, b);
}
}  // namespace detail
inline Tensor maximum(const Tensor& a, const Tensor& b) { return detail::extremum<true>(OpId::maximum, "maximum", a, b); }
inline Tensor minimum(const Tensor& a, const Tensor& b) { return detail::extremum<false>(OpId::minimum, "minimum", a, b); }

}  // namespace mixprec
