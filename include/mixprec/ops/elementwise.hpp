#pragma once
// Element-wise ops with broadcasting. Mixed dtypes promote (promote_types); 16-bit values are
// computed in float and rounded once on store. Backward formulas reuse these same ops.
#include <cmath>
#include <numbers>

#include "mixprec/backends/cpu/functor.hpp"
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
// The CPU backend's functor loops (backends/cpu/functor.hpp), for the CPU kernels that build on them.
using cpu::binary_kernel;
using cpu::unary_floating_kernel;
using cpu::unary_kernel;

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

// The `pointwise` kernel of the operands' device (all on one device): kind k of a, b, c.
inline Tensor device_pointwise(const char* op, DevicePointwise k, const Tensor& a, const Tensor& b = {}, const Tensor& c = {},
                               double s0 = 0.0, double s1 = 0.0) {
  const auto f = device_kernel(op, a, &DeviceKernels::pointwise);
  common_device(op, {&a, &b, &c});
  return f(k, a, b, c, s0, s1);
}

// A floating unary op of the `pointwise` kernel (kind fwd) with its backward grad * f'(v) in one
// pass (kind grad), v being the saved input x or output y as `from` says.
inline Tensor unary_op(OpId id, const char* name, const Tensor& x, DevicePointwise fwd, GradFrom from, DevicePointwise grad) {
  return dispatch(id, [=](const Tensor& x) {
    const auto f = device_kernel(name, x, &DeviceKernels::pointwise);
    MIXPREC_CHECK(x.is_floating_point(), name, ": expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    Tensor y = f(fwd, x, {}, {}, 0.0, 0.0);
    if (autograd::should_record({x})) {
      autograd::record(name, {x}, {y},
                       [sv = autograd::SavedTensor(from == GradFrom::Input ? x : y), name, grad](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& v = sv.get(name);
                         // grad * f'(v): v has x's dtype; grad may differ (promote).
                         const Tensor gv = as_dtype_raw(g[0], v.dtype());
                         return {device_pointwise(name, grad, expand_raw(gv, v.sizes()), v)};
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
template <class T> MIXPREC_HOST_DEVICE T gelu(T v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return cpu::vec::gelu(v);  // one exp, no cancellation for v < 0
  else
#endif
    return T(0.5) * v * (1 + fn::erf(v * T(0.70710678118654752440)));
}
template <class T> MIXPREC_HOST_DEVICE T gelu_grad(T v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return cpu::vec::gelu_grad(v);
  else
#endif
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
    Tensor y = detail::device_pointwise("neg", DevicePointwise::Neg, x);
    if (autograd::should_record({x}))
      autograd::record("neg", {x}, {y}, [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {neg(g[0])}; });
    return y;
  }, x);
}
inline Tensor operator-(const Tensor& x) { return neg(x); }
inline Tensor operator-(double s, const Tensor& a) { return add(neg(a), s); }

// The activations of the kernel table (their CPU formulas are the fn:: ones above, assembled in
// backends/cpu/elementwise.hpp); sqrt, rsqrt and abs are kinds of the `pointwise` entry.
inline Tensor exp(const Tensor& x) { return detail::table_unary_op(OpId::exp, "exp", x, detail::GradFrom::Output, DeviceUnary::Exp); }
inline Tensor log(const Tensor& x) { return detail::table_unary_op(OpId::log, "log", x, detail::GradFrom::Input, DeviceUnary::Log); }
inline Tensor sqrt(const Tensor& x) {
  return detail::unary_op(OpId::sqrt, "sqrt", x, DevicePointwise::Sqrt, detail::GradFrom::Output, DevicePointwise::SqrtGrad);
}
inline Tensor rsqrt(const Tensor& x) {
  return detail::unary_op(OpId::rsqrt, "rsqrt", x, DevicePointwise::Rsqrt, detail::GradFrom::Output, DevicePointwise::RsqrtGrad);
}
inline Tensor abs(const Tensor& x) {
  return detail::unary_op(OpId::abs, "abs", x, DevicePointwise::Abs, detail::GradFrom::Input, DevicePointwise::AbsGrad);
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
    const auto f = detail::device_kernel("pow", x, &DeviceKernels::pointwise);
    MIXPREC_CHECK(x.is_floating_point(), "pow: expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    Tensor y = f(DevicePointwise::PowScalar, x, {}, {}, e, 0.0);
    if (autograd::should_record({x}))
      autograd::record("pow", {x}, {y}, [sx = autograd::SavedTensor(x), e](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const Tensor& x = sx.get("pow");
        const Tensor d = detail::device_pointwise("pow_backward", DevicePointwise::PowScalarGrad, x, {}, {}, e);
        return {mul(g[0], d)};
      });
    return y;
  }, x);
}
inline Tensor pow(const Tensor& x, const Tensor& e) {
  return dispatch(OpId::pow, [](const Tensor& x, const Tensor& e) {
    Tensor y = detail::device_pointwise("pow", DevicePointwise::Pow, x, e);
    MIXPREC_CHECK(y.is_floating_point(), "pow: expected floating-point tensors, got ", x.dtype(), " and ", e.dtype());
    if (autograd::should_record({x, e}))
      autograd::record("pow", {x, e}, {y},
                       [sx = autograd::SavedTensor(x), se = autograd::SavedTensor(e), sy = autograd::SavedTensor(y)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("pow");
                         const Tensor& e = se.get("pow");
                         const Tensor& y = sy.get("pow");
                         Tensor dx = detail::device_pointwise("pow_backward", DevicePointwise::PowGradBase, x, e);
                         // d/de x^e = x^e log x; define it as 0 where x == 0 (the limit from x>0 of x^e log x for e>0).
                         Tensor de = detail::device_pointwise("pow_backward", DevicePointwise::PowGradExp, y, x);
                         return {detail::grad_for(mul(g[0], dx), x.sizes(), x.dtype()), detail::grad_for(mul(g[0], de), e.sizes(), e.dtype())};
                       });
    return y;
  }, x, e);
}

// ---------- comparisons (no gradient) ----------
// Through the `compare` kernel of the operands' device.
#define MIXPREC_COMPARE(fn, kind)                                                                            \
  inline Tensor fn(const Tensor& a, const Tensor& b) {                                                        \
    return dispatch(OpId::compare, [](const Tensor& a, const Tensor& b) {                                     \
      const auto f = detail::device_kernel(#fn, a, &DeviceKernels::compare);                                  \
      detail::common_device(#fn, {&a, &b});                                                                   \
      return f(DeviceCompare::kind, a, b);                                                                    \
    }, a, b);                                                                                                 \
  }                                                                                                           \
  inline Tensor fn(const Tensor& a, double s) { return fn(a, scalar_tensor(s, detail::scalar_result_dtype(a, s))); }
MIXPREC_COMPARE(eq, Eq)
MIXPREC_COMPARE(ne, Ne)
MIXPREC_COMPARE(lt, Lt)
MIXPREC_COMPARE(le, Le)
MIXPREC_COMPARE(gt, Gt)
MIXPREC_COMPARE(ge, Ge)
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
    const auto f = detail::device_kernel("where", a, &DeviceKernels::pointwise);
    broadcast_shapes(cond.sizes(), broadcast_shapes(a.sizes(), b.sizes(), "where"), "where");
    detail::common_device("where", {&cond, &a, &b});
    Tensor out = f(DevicePointwise::Where, cond, a, b, 0.0, 0.0);
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
    Tensor out = detail::device_pointwise("masked_fill", DevicePointwise::MaskedFill, x, mask, {}, value);
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
    Tensor y = detail::device_pointwise("clamp", DevicePointwise::Clamp, x, {}, {}, l, h);
    if (autograd::should_record({x}))
      autograd::record("clamp", {x}, {y}, [sx = autograd::SavedTensor(x), l, h](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const Tensor& x = sx.get("clamp");
        return {mul(g[0], detail::device_pointwise("clamp_backward", DevicePointwise::ClampGrad, x, {}, {}, l, h))};
      });
    return y;
  }, x);
}

namespace detail {
template <bool IsMax>
Tensor extremum(OpId id, const char* name, const Tensor& a, const Tensor& b) {
  return dispatch(id, [name](const Tensor& a, const Tensor& b) {
    // NaN propagates, as torch.maximum.
    Tensor out = device_pointwise(name, IsMax ? DevicePointwise::Maximum : DevicePointwise::Minimum, a, b);
    if (autograd::should_record({a, b}))
      autograd::record(name, {a, b}, {out},
                       [sa = autograd::SavedTensor(a), sb = autograd::SavedTensor(b), name](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& a = sa.get(name);
                         const Tensor& b = sb.get(name);
                         // Ties split the gradient evenly, as PyTorch does.
                         constexpr DevicePointwise share = IsMax ? DevicePointwise::MaximumGrad : DevicePointwise::MinimumGrad;
                         auto wa = device_pointwise(name, share, a, b);
                         auto wb = device_pointwise(name, share, b, a);
                         return {grad_for(mul(g[0], wa), a.sizes(), a.dtype()), grad_for(mul(g[0], wb), b.sizes(), b.dtype())};
                       });
    return out;
  }, a, b);
}
}  // namespace detail
inline Tensor maximum(const Tensor& a, const Tensor& b) { return detail::extremum<true>(OpId::maximum, "maximum", a, b); }
inline Tensor minimum(const Tensor& a, const Tensor& b) { return detail::extremum<false>(OpId::minimum, "minimum", a, b); }

}  // namespace mixprec
