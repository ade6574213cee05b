#pragma once
// The CPU backend's `compare` and `pointwise` entries of the device kernel table
// (backends/device.hpp): comparisons, neg, sign, sqrt, rsqrt, abs, pow, clamp, maximum/minimum,
// where, masked_fill and their backward formulas, reached by the op bodies of ops/elementwise.hpp
// and reduce.hpp (norm's backward) on every device. Why one entry per family with a kind: every
// kind is the same functor loop (backends/cpu/functor.hpp) with another scalar formula, so one
// switch assembles them; each formula is written once, here.
#include <cmath>

#include "mixprec/backends/cpu/functor.hpp"
#include "mixprec/backends/device.hpp"

namespace mixprec::cpu {

inline Tensor compare_op(DeviceCompare k, const Tensor& a, const Tensor& b) {
  using C = DeviceCompare;
  switch (k) {
    case C::Eq: return binary_kernel("eq", a, b, [](auto x, auto y) { return x == y; }, DType::Bool);
    case C::Ne: return binary_kernel("ne", a, b, [](auto x, auto y) { return x != y; }, DType::Bool);
    case C::Lt: return binary_kernel("lt", a, b, [](auto x, auto y) { return x < y; }, DType::Bool);
    case C::Le: return binary_kernel("le", a, b, [](auto x, auto y) { return x <= y; }, DType::Bool);
    case C::Gt: return binary_kernel("gt", a, b, [](auto x, auto y) { return x > y; }, DType::Bool);
    case C::Ge: return binary_kernel("ge", a, b, [](auto x, auto y) { return x >= y; }, DType::Bool);
  }
  MIXPREC_CHECK(false, "compare: unknown comparison ", static_cast<int>(k), " for shapes ", a.sizes(), " and ", b.sizes());
  return {};
}

namespace detail {
// grad * df(v) in one pass: grad (v's dtype) already broadcast to v's shape; contiguous result.
template <class Df>
Tensor grad_times(const char* op, const Tensor& grad, const Tensor& v, Df df) {
  Tensor out = empty(v.sizes(), v.dtype());
  dispatch_floating(v.dtype(), op, [&]<class T>() {
    cpu::map<T, T, T>(out, [&](auto gg, auto vv) { return gg * df(vv); }, grad, v);
  });
  return out;
}
// Where maximum (IsMax) or minimum takes x over y: 1, 0, or 0.5 on ties (PyTorch splits them).
template <bool IsMax>
Tensor extremum_share(const char* op, const Tensor& a, const Tensor& b) {
  return binary_kernel(op, a, b, [](auto x, auto y) {
    using T = decltype(x);
    return x == y ? T(0.5) : T(IsMax ? (x > y) : (x < y));
  });
}
template <bool IsMax>
Tensor extremum(const char* op, const Tensor& a, const Tensor& b) {
  return binary_kernel(op, a, b, [](auto x, auto y) {
    if (x != x || y != y) return x != x ? x : y;  // NaN propagates, as torch.maximum
    return IsMax ? (x > y ? x : y) : (x < y ? x : y);
  });
}
}  // namespace detail

inline Tensor pointwise_op(DevicePointwise k, const Tensor& a, const Tensor& b, const Tensor& c, double s0, double s1) {
  namespace md = mixprec::detail;
  using P = DevicePointwise;
  switch (k) {
    case P::Neg: return unary_kernel("neg", a, [](auto v) { return -v; });
    case P::Sign: return unary_kernel("sign", a, [](auto v) { return static_cast<decltype(v)>((v > 0) - (v < 0)); });
    case P::Sqrt: return unary_floating_kernel("sqrt", a, [](auto v) { return std::sqrt(v); });
    case P::Rsqrt: return unary_floating_kernel("rsqrt", a, [](auto v) { return 1 / std::sqrt(v); });
    case P::Abs: return unary_floating_kernel("abs", a, [](auto v) { return std::abs(v); });
    case P::PowScalar: return unary_floating_kernel("pow", a, [e = s0](auto v) { return std::pow(v, static_cast<decltype(v)>(e)); });
    case P::PowScalarGrad:
      return unary_kernel("pow_backward", a, [e = s0](auto v) { return static_cast<decltype(v)>(e) * std::pow(v, static_cast<decltype(v)>(e - 1)); });
    case P::Clamp:
      return unary_kernel("clamp", a, [l = s0, h = s1](auto v) {
        using T = decltype(v);
        if (v != v) return v;  // NaN stays NaN
        return static_cast<T>(std::min<double>(std::max<double>(static_cast<double>(v), l), h));
      });
    case P::ClampGrad:
      return unary_kernel("clamp_backward", a, [l = s0, h = s1](auto v) {
        return static_cast<decltype(v)>(static_cast<double>(v) >= l && static_cast<double>(v) <= h);
      });
    case P::SqrtGrad: return detail::grad_times("sqrt", a, b, [](auto y) { return 1 / (2 * y); });
    case P::RsqrtGrad: return detail::grad_times("rsqrt", a, b, [](auto y) { return decltype(y)(-0.5) * y * y * y; });
    case P::AbsGrad: return detail::grad_times("abs", a, b, [](auto v) { return static_cast<decltype(v)>((v > 0) - (v < 0)); });
    case P::Pow: return binary_kernel("pow", a, b, [](auto x, auto e) { return std::pow(x, e); });
    case P::PowGradBase: return binary_kernel("pow_backward", a, b, [](auto x, auto e) { return e * std::pow(x, e - 1); });
    // d/de x^e = x^e log x, defined as 0 where x == 0 (the limit from x > 0 of x^e log x for e > 0).
    case P::PowGradExp: return binary_kernel("pow_backward", a, b, [](auto p, auto x) { return x == 0 ? decltype(x)(0) : p * std::log(x); });
    case P::Prelu: return binary_kernel("prelu", a, b, [](auto v, auto w) { return v > 0 ? v : w * v; });
    case P::PreluGradInput:
    case P::PreluGradWeight: {
      Tensor out = empty(b.sizes(), b.dtype());
      dispatch_floating(b.dtype(), "prelu_backward", [&]<class T>() {
        if (k == P::PreluGradInput) cpu::map<T, T, T, T>(out, [](auto gv, auto v, auto wv) { return v > 0 ? gv : gv * wv; }, a, b, c);
        else cpu::map<T, T, T>(out, [](auto gv, auto v) { return v > 0 ? decltype(v)(0) : gv * v; }, a, b);
      });
      return out;
    }
    case P::Maximum: return detail::extremum<true>("maximum", a, b);
    case P::Minimum: return detail::extremum<false>("minimum", a, b);
    case P::MaximumGrad: return detail::extremum_share<true>("maximum", a, b);
    case P::MinimumGrad: return detail::extremum_share<false>("minimum", a, b);
    case P::NormGrad:
      // x |x|^(p-2) / y^(p-1), defined as 0 where the norm is 0.
      return binary_kernel("norm_backward", a, b, [p = s0](auto v, auto n) {
        using T = decltype(v);
        if (n == 0) return T(0);
        if (p == 1.0) return static_cast<T>((v > 0) - (v < 0));
        if (p == 2.0) return v / n;
        return static_cast<T>(v * std::pow(std::fabs(v), p - 2) / std::pow(n, p - 1));
      });
    case P::Where: {
      const Shape shape = broadcast_shapes(a.sizes(), broadcast_shapes(b.sizes(), c.sizes(), "where"), "where");
      const DType ct = promote_types(b.dtype(), c.dtype());
      Tensor out = empty(shape, ct);
      dispatch_all(ct, "where", [&]<class T>() {
        cpu::map<T, bool, T, T>(out, [](auto m, auto x, auto y) { return m ? x : y; }, md::expand_raw(a, shape),
                                md::expand_raw(md::as_dtype_raw(b, ct), shape), md::expand_raw(md::as_dtype_raw(c, ct), shape));
      });
      return out;
    }
    case P::MaskedFill: {
      Tensor out = empty(a.sizes(), a.dtype());
      dispatch_all(a.dtype(), "masked_fill", [&]<class T>() {
        const auto v = static_cast<acc_t<T>>(static_cast<T>(s0));
        cpu::map<T, T, bool>(out, [v](auto x, auto m) { return m ? v : x; }, a, md::expand_raw(b, a.sizes()));
      });
      return out;
    }
  }
  MIXPREC_CHECK(false, "pointwise: unknown kind ", static_cast<int>(k), " for a tensor of shape ", a.sizes());
  return {};
}

inline void fill_pointwise_kernels(DeviceKernels& t) {
  t.compare = compare_op;
  t.pointwise = pointwise_op;
}

}  // namespace mixprec::cpu
