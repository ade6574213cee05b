#pragma once
// The CPU backend's element-wise entries of the device kernel table (backends/device.hpp):
// copies and casts, fills, add/mul/div (tensor and scalar operands), the table's activations and
// their gradients, sums (backends/cpu/reduce.hpp), softmax, dropout and embedding. The op bodies (ops/tensor_ops.hpp,
// elementwise.hpp, reduce.hpp, activation.hpp, shape.hpp) keep their checks, autocast policy and
// autograd and reach these through the table whatever the device, as they reach CUDA's.
//
// Why the kernels build on shared helpers (binary_kernel in backends/cpu/functor.hpp, the op
// layer's plan_reduce and softmax row loops, index_add_rows in backends/cpu/shape.hpp): those
// also serve other entries (compare, pointwise, reduce, index) and CPU code still in the op layer
// (prelu, loss kernels); this header, included after the op layer by backends/cpu/kernels.hpp,
// only assembles its entries from them. Where a CPU kernel does more
// than an entry's device contract (every dtype, any strides) device.hpp says so ("CPU: ...").
#include <array>
#include <cmath>
#include <cstring>
#include <span>

#include "mixprec/backends/cpu/loops.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/activation.hpp"
#include "mixprec/ops/elementwise.hpp"
#include "mixprec/backends/cpu/reduce.hpp"
#include "mixprec/backends/cpu/shape.hpp"
#include "mixprec/ops/shape.hpp"

namespace mixprec::cpu {

// ---- copy, fill ----

// dst = src: src broadcast to dst's shape and converted to dst's dtype; any strides, every dtype.
// One dtype moves as raw words (cpu::copy); contiguous conversions run the SIMD converters.
inline void copy_convert(const Tensor& dst, const Tensor& src) {
  if (dst.numel() == 0) return;
  // src as a view of dst's sizes: stride 0 along broadcast dims.
  const Tensor s = dst.sizes() == src.sizes() ? src : mixprec::detail::make_view(src, dst.sizes(), [&] {
    Shape st(dst.dim(), 0);
    const int64_t off = dst.dim() - src.dim();
    for (int64_t i = 0; i < src.dim(); ++i) st[off + i] = src.size(i) == 1 ? 0 : src.stride(i);
    return st;
  }(), src.storage_offset());
  if (dst.dtype() == src.dtype()) return cpu::copy(dst, s);
  if (dst.is_contiguous() && s.is_contiguous()) {
    dispatch_all_with_fp8(dst.dtype(), "copy_", [&]<class To>() {
      dispatch_all_with_fp8(src.dtype(), "copy_", [&]<class From>() {
        parallel_for(0, dst.numel(), 1 << 20, [&](int64_t b, int64_t e) { convert(s.data<From>() + b, dst.data<To>() + b, e - b); });
      });
    });
    return;
  }
  dispatch_all_with_fp8(dst.dtype(), "copy_", [&]<class To>() {
    dispatch_all_with_fp8(src.dtype(), "copy_", [&]<class From>() {
      cpu::map<To, From>(dst, [](auto v) {
        if constexpr (std::is_same_v<To, bool>) return v != 0;
        else return v;
      }, s);
    });
  });
}

// t = value (already checked to fit t's dtype); any strides, every dtype. +0 is all-zero bits in
// every dtype, so zeros() and fill_(0) clear memory (split over threads); -0.0 keeps its sign.
inline void fill_tensor(const Tensor& t, double value) {
  const int64_t n = t.numel();
  if (n == 0) return;
  if (!t.is_contiguous()) return copy_convert(t, mixprec::full({}, value, t.dtype()));
  if (value == 0.0 && !std::signbit(value)) {
    auto* p = static_cast<unsigned char*>(t.data_ptr());
    const auto es = static_cast<std::size_t>(t.element_size());
    parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
      std::memset(p + static_cast<std::size_t>(b) * es, 0, static_cast<std::size_t>(e - b) * es);
    });
    return;
  }
  dispatch_all_with_fp8(t.dtype(), "fill_", [&]<class T>() {
    const T v = static_cast<T>(value);
    T* p = t.data<T>();
    parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) { std::fill(p + b, p + e, v); });
  });
}

// ---- add, mul, div ----

// a + alpha b, a * b, a / b over the broadcast shape in promote_types(a, b), every dtype: values
// are computed in acc_t (float for 16-bit) and rounded once on store. Errors name the op.
inline Tensor binary_op(DeviceBinary kind, const Tensor& a, const Tensor& b, double alpha) {
  using mixprec::detail::binary_kernel;
  switch (kind) {
    case DeviceBinary::Add:
      if (alpha == 1.0) return binary_kernel("add", a, b, [](auto x, auto y) { return x + y; });
      return binary_kernel("add", a, b, [alpha](auto x, auto y) { return x + static_cast<decltype(x)>(alpha) * y; });
    case DeviceBinary::Mul: return binary_kernel("mul", a, b, [](auto x, auto y) { return x * y; });
    case DeviceBinary::Div: return binary_kernel("div", a, b, [](auto x, auto y) { return x / y; });
  }
  fail("cpu binary: unknown operation ", static_cast<int>(kind));
}

// The same with s as the second (reversed: first) operand, rounded to a's dtype first: the bits
// binary_op gives with a 0-dim operand of a's dtype, without broadcasting one.
inline Tensor binary_scalar_op(DeviceBinary kind, const Tensor& a, double s, double alpha, bool reversed) {
  const char* op = kind == DeviceBinary::Add ? "add" : kind == DeviceBinary::Mul ? "mul" : "div";
  mixprec::detail::require_cpu(op, a);
  Tensor out = empty_like_layout(a, a.dtype());
  dispatch_floating(a.dtype(), op, [&]<class T>() {
    using A = acc_t<T>;
    const A v = static_cast<A>(static_cast<T>(s));
    auto run = [&](auto f) { cpu::map<T, T>(out, f, a); };
    switch (kind) {
      case DeviceBinary::Add:
        if (alpha == 1.0) {
          if (reversed) run([v](auto x) { return v + x; });
          else run([v](auto x) { return x + v; });
        } else {
          const A al = static_cast<A>(alpha);
          if (reversed) run([v, al](auto x) { return v + al * x; });
          else run([v, al](auto x) { return x + al * v; });
        }
        break;
      case DeviceBinary::Mul:
        if (reversed) run([v](auto x) { return v * x; });
        else run([v](auto x) { return x * v; });
        break;
      case DeviceBinary::Div:
        if (reversed) run([v](auto x) { return v / x; });
        else run([v](auto x) { return x / v; });
        break;
    }
  });
  return out;
}

// ---- the table's activations ----

// f(name, forward, derivative, from_output) for the activation u: its formula (fn::, shared with
// the CUDA kernels) and its derivative, a function of the output y when from_output, else of x.
template <class F>
Tensor with_activation(DeviceUnary u, F&& f) {
  switch (u) {
    case DeviceUnary::Relu: return f("relu", [](auto v) { return fn::relu(v); }, [](auto y) { return fn::relu_grad(y); }, true);
    case DeviceUnary::Gelu: return f("gelu", [](auto v) { return fn::gelu(v); }, [](auto v) { return fn::gelu_grad(v); }, false);
    case DeviceUnary::GeluTanh:
      return f("gelu", [](auto v) { return fn::gelu_tanh(v); }, [](auto v) { return fn::gelu_tanh_grad(v); }, false);
    case DeviceUnary::Silu: return f("silu", [](auto v) { return fn::silu(v); }, [](auto v) { return fn::silu_grad(v); }, false);
    case DeviceUnary::Sigmoid:
      return f("sigmoid", [](auto v) { return fn::sigmoid(v); }, [](auto y) { return fn::sigmoid_grad_y(y); }, true);
    case DeviceUnary::Tanh: return f("tanh", [](auto v) { return fn::tanh(v); }, [](auto y) { return fn::tanh_grad_y(y); }, true);
    case DeviceUnary::Exp: return f("exp", [](auto v) { return fn::exp(v); }, [](auto y) { return y; }, true);
    case DeviceUnary::Log: return f("log", [](auto v) { return std::log(v); }, [](auto v) { return 1 / v; }, false);
  }
  fail("cpu unary: unknown activation ", static_cast<int>(u));
}

// y = f(x), floating x of any strides; a contiguous result of x's dtype.
// ReLU of 16-bit tensors on their bits, without widening to float32 and back (the conversions
// were most of a bf16 ReLU's time: ~5 ms of a ResNet-20 step). The results are the float path's
// bits: a NaN comes back quieted (its quiet bit set, as the rounding to 16 bits does), -0 and
// negatives become +0; relu_grad's g * (y > 0) keeps g where y > 0 and is g * 0 elsewhere
// (a signed zero, or the NaN that inf * 0 and NaN * 0 give). Both operands must share one dense
// layout (contiguous or channels-last), so that memory order is element order for both.
namespace detail {
template <class T>
struct Bits16 {
  static constexpr uint16_t kInf = std::is_same_v<T, bfloat16> ? 0x7f80 : 0x7c00;    // +inf; above it (sign off): NaN
  static constexpr uint16_t kQuiet = std::is_same_v<T, bfloat16> ? 0x0040 : 0x0200;  // the quiet bit
  static constexpr uint16_t kDefaultNaN = std::is_same_v<T, bfloat16> ? 0xffc0 : 0xfe00;  // inf * 0 on x86
};
inline bool same_dense_layout(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes() || a.strides() != b.strides()) return false;
  return a.is_contiguous() || a.is_contiguous(MemoryFormat::ChannelsLast);
}
template <class T>
void relu_bits(const uint16_t* x, uint16_t* y, int64_t n) {
  constexpr uint16_t inf = Bits16<T>::kInf, quiet = Bits16<T>::kQuiet;
  parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
    simd([&]() MIXPREC_SIMD_BODY {
      for (int64_t i = b; i < e; ++i) {
        const uint16_t v = x[i], mag = static_cast<uint16_t>(v & 0x7fff);
        y[i] = mag > inf ? static_cast<uint16_t>(v | quiet) : (v & 0x8000) ? uint16_t{0} : v;
      }
    });
  });
}
template <class T>
void relu_grad_bits(const uint16_t* g, const uint16_t* yv, uint16_t* out, int64_t n) {
  constexpr uint16_t inf = Bits16<T>::kInf, quiet = Bits16<T>::kQuiet, dnan = Bits16<T>::kDefaultNaN;
  parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
    simd([&]() MIXPREC_SIMD_BODY {
      for (int64_t i = b; i < e; ++i) {
        const uint16_t gv = g[i], gm = static_cast<uint16_t>(gv & 0x7fff), yy = yv[i];
        const bool pos = !(yy & 0x8000) && yy != 0 && yy <= inf;  // y > 0
        const uint16_t g_nan = static_cast<uint16_t>(gv | quiet);
        const uint16_t times0 = gm == inf ? dnan : static_cast<uint16_t>(gv & 0x8000);
        out[i] = gm > inf ? g_nan : pos ? gv : times0;
      }
    });
  });
}
}  // namespace detail

inline Tensor unary_op(DeviceUnary u, const Tensor& x) {
  if (u == DeviceUnary::Relu && (x.dtype() == DType::BFloat16 || x.dtype() == DType::Float16) && x.device() == Device::CPU &&
      detail::same_dense_layout(x, x)) {
    Tensor y = empty_like_layout(x, x.dtype());
    const auto* xs = static_cast<const uint16_t*>(x.data_ptr());
    auto* ys = static_cast<uint16_t*>(y.data_ptr());
    if (x.dtype() == DType::BFloat16) detail::relu_bits<bfloat16>(xs, ys, x.numel());
    else detail::relu_bits<half>(xs, ys, x.numel());
    return y;
  }
  return with_activation(u, [&](const char* name, auto fwd, auto, bool) { return mixprec::detail::unary_floating_kernel(name, x, fwd); });
}

// grad * f'(x or y), in one fused pass over the one of x and y the derivative reads (relu's y > 0
// is x > 0: either serves); grad of that tensor's dtype and shape, any strides.
inline Tensor unary_backward_op(DeviceUnary u, const Tensor& grad, const Tensor& x, const Tensor& y) {
  return with_activation(u, [&](const char* name, auto, auto df, bool from_output) {
    const Tensor& v = from_output ? y : x;
    mixprec::detail::require_cpu(name, v);
    Tensor out = empty_like_layout(v, v.dtype());
    if (u == DeviceUnary::Relu && (v.dtype() == DType::BFloat16 || v.dtype() == DType::Float16) && grad.dtype() == v.dtype() &&
        detail::same_dense_layout(v, v) && detail::same_dense_layout(grad, v) && out.strides() == v.strides()) {
      const auto* gs = static_cast<const uint16_t*>(grad.data_ptr());
      const auto* vs = static_cast<const uint16_t*>(v.data_ptr());
      auto* os = static_cast<uint16_t*>(out.data_ptr());
      if (v.dtype() == DType::BFloat16) detail::relu_grad_bits<bfloat16>(gs, vs, os, v.numel());
      else detail::relu_grad_bits<half>(gs, vs, os, v.numel());
      return out;
    }
    dispatch_floating(v.dtype(), name, [&]<class T>() {
      cpu::map<T, T, T>(out, [&](auto gg, auto vv) { return gg * df(vv); }, grad, v);
    });
    return out;
  });
}

// ---- softmax ----

namespace detail {
// Softmax-style kernels see the input as [outer, D, inner] with the reduced dim in the middle:
// inner == 1 is the contiguous fast path, otherwise columns are processed in blocks so each pass
// over D streams contiguous memory. The math is float32 (double for double) with cpu::vec::exp;
// on the fast path 16-bit rows convert with SIMD and every pass is a loop cpu::simd compiles for
// AVX-512 where the CPU has it.
struct ActSoftmaxDims {
  int64_t outer = 1, D = 1, inner = 1;
};
inline ActSoftmaxDims act_softmax_dims(const Tensor& x, int64_t d) {
  ActSoftmaxDims s;
  if (x.dim() == 0) return s;
  for (int64_t i = 0; i < d; ++i) s.outer *= x.size(i);
  s.D = x.size(d);
  for (int64_t i = d + 1; i < x.dim(); ++i) s.inner *= x.size(i);
  return s;
}

inline constexpr int64_t kActColumnBlock = 256;

// softmax / log_softmax of one contiguous row of D values in A, into y (which may be x); ex is
// scratch. One pass for the max, one for exp and its sum, one to scale or shift.
template <bool Log, class A>
void act_softmax_row(const A* x, A* y, A* ex, int64_t D) {
  cpu::simd([&]() MIXPREC_SIMD_BODY {
    const A m = cpu::vec::reduce<A>(D, -std::numeric_limits<A>::infinity(), [&](A a, int64_t i) { return cpu::vec::max_of(a, x[i]); },
                              [](A a, A b) { return cpu::vec::max_of(a, b); });
    const A sum = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) {
      ex[i] = fn::exp(x[i] - m);
      return a + ex[i];
    }, [](A a, A b) { return a + b; });
    if constexpr (Log) {
      const A lse = m + std::log(sum);
      for (int64_t i = 0; i < D; ++i) y[i] = x[i] - lse;
    } else {
      const A inv = A(1) / sum;
      for (int64_t i = 0; i < D; ++i) y[i] = ex[i] * inv;
    }
  });
}

// y = softmax or log_softmax of x along D; max subtraction keeps exp in range.
template <class T, bool Log>
void act_softmax_forward(const T* x, T* y, const ActSoftmaxDims& s) {
  using A = acc_t<T>;
  const int64_t D = s.D;
  if (s.inner == 1) {
    cpu::parallel_for(0, s.outer, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      std::vector<A> in(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(D)), out(in.size()), ex(static_cast<std::size_t>(D));
      for (int64_t r = b; r < e; ++r) {
        A* yr = std::is_same_v<T, A> ? reinterpret_cast<A*>(y + r * D) : out.data();
        act_softmax_row<Log>(cpu::vec::load_row(x + r * D, D, in), yr, ex.data(), D);
        cpu::vec::store_row(yr, y + r * D, D);
      }
    });
    return;
  }
  const int64_t inner = s.inner, nblk = (inner + kActColumnBlock - 1) / kActColumnBlock;
  cpu::parallel_for(0, s.outer * nblk, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D * std::min(inner, kActColumnBlock), 1)),
                    [&](int64_t b, int64_t e) {
    std::vector<A> mx(kActColumnBlock), sm(kActColumnBlock), sh(kActColumnBlock), ex(kActColumnBlock);
    for (int64_t task = b; task < e; ++task) {
      const int64_t o = task / nblk, i0 = (task % nblk) * kActColumnBlock, len = std::min(kActColumnBlock, inner - i0);
      const T* xo = x + o * D * inner + i0;
      T* yo = y + o * D * inner + i0;
      std::fill(mx.begin(), mx.begin() + len, -std::numeric_limits<A>::infinity());
      std::fill(sm.begin(), sm.begin() + len, A(0));
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < len; ++j) mx[j] = std::max(mx[j], static_cast<A>(xo[d * inner + j]));
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < len; ++j) sh[j] = static_cast<A>(xo[d * inner + j]) - mx[j];
        cpu::vec::act_exp(sh.data(), ex.data(), len);
        for (int64_t j = 0; j < len; ++j) sm[j] += ex[j];
      }
      if constexpr (Log) {
        for (int64_t j = 0; j < len; ++j) mx[j] += std::log(sm[j]);
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < len; ++j) yo[d * inner + j] = static_cast<T>(static_cast<A>(xo[d * inner + j]) - mx[j]);
      } else {
        for (int64_t j = 0; j < len; ++j) sm[j] = A(1) / sm[j];
        for (int64_t d = 0; d < D; ++d) {
          for (int64_t j = 0; j < len; ++j) sh[j] = static_cast<A>(xo[d * inner + j]) - mx[j];
          cpu::vec::act_exp(sh.data(), ex.data(), len);
          for (int64_t j = 0; j < len; ++j) yo[d * inner + j] = static_cast<T>(ex[j] * sm[j]);
        }
      }
    }
  });
}

// softmax: gx = y (g - sum(g y));  log_softmax: gx = g - exp(y) sum(g).
template <class T, bool Log>
void act_softmax_backward(const T* g, const T* y, T* gx, const ActSoftmaxDims& s) {
  using A = acc_t<T>;
  const int64_t D = s.D;
  auto term = [](A gv, A yv) { return Log ? gv : gv * yv; };
  auto grad = [](A gv, A yv, A sum) { return Log ? gv - fn::exp(yv) * sum : yv * (gv - sum); };
  if (s.inner == 1) {
    cpu::parallel_for(0, s.outer, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      const std::size_t n16 = std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(D);
      std::vector<A> gbuf(n16), ybuf(n16), obuf(n16);
      for (int64_t r = b; r < e; ++r) {
        const A* gr = cpu::vec::load_row(g + r * D, D, gbuf);
        const A* yr = cpu::vec::load_row(y + r * D, D, ybuf);
        A* o = std::is_same_v<T, A> ? reinterpret_cast<A*>(gx + r * D) : obuf.data();
        cpu::simd([&]() MIXPREC_SIMD_BODY {
          auto plus = [](A a, A b) { return a + b; };
          if constexpr (Log) {
            const A sum = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) { return a + gr[i]; }, plus);
            for (int64_t i = 0; i < D; ++i) o[i] = gr[i] - fn::exp(yr[i]) * sum;
          } else {
            const A sum = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) { return a + gr[i] * yr[i]; }, plus);
            for (int64_t i = 0; i < D; ++i) o[i] = yr[i] * (gr[i] - sum);
          }
        });
        cpu::vec::store_row(o, gx + r * D, D);
      }
    });
    return;
  }
  const int64_t inner = s.inner, nblk = (inner + kActColumnBlock - 1) / kActColumnBlock;
  cpu::parallel_for(0, s.outer * nblk, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D * std::min(inner, kActColumnBlock), 1)),
                    [&](int64_t b, int64_t e) {
    std::vector<A> sm(kActColumnBlock);
    for (int64_t task = b; task < e; ++task) {
      const int64_t o = task / nblk, i0 = (task % nblk) * kActColumnBlock, len = std::min(kActColumnBlock, inner - i0);
      const int64_t base = o * D * inner + i0;
      std::fill(sm.begin(), sm.begin() + len, A(0));
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < len; ++j) {
          const int64_t k = base + d * inner + j;
          sm[j] += term(static_cast<A>(g[k]), static_cast<A>(y[k]));
        }
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < len; ++j) {
          const int64_t k = base + d * inner + j;
          gx[k] = static_cast<T>(grad(static_cast<A>(g[k]), static_cast<A>(y[k]), sm[j]));
        }
    }
  });
}
}  // namespace detail

inline Tensor softmax_forward(const Tensor& x, int64_t dim, bool log) {
  namespace md = mixprec::detail;
  const char* name = log ? "log_softmax" : "softmax";
  md::require_cpu(name, x);
  const detail::ActSoftmaxDims s = detail::act_softmax_dims(x, dim);
  const Tensor xc = md::contiguous_raw(x);
  Tensor y = empty(x.sizes(), x.dtype());
  if (x.numel() > 0)
    dispatch_floating(x.dtype(), name, [&]<class T>() {
      if (log) detail::act_softmax_forward<T, true>(xc.data<T>(), y.data<T>(), s);
      else detail::act_softmax_forward<T, false>(xc.data<T>(), y.data<T>(), s);
    });
  return y;
}

inline Tensor softmax_backward(const Tensor& y, const Tensor& grad, int64_t dim, bool log) {
  namespace md = mixprec::detail;
  const char* name = log ? "log_softmax" : "softmax";
  md::require_cpu(name, y);
  const detail::ActSoftmaxDims s = detail::act_softmax_dims(y, dim);
  const Tensor yc = md::contiguous_raw(y), gc = md::contiguous_raw(grad);
  Tensor gx = empty(y.sizes(), y.dtype());
  if (y.numel() > 0)
    dispatch_floating(y.dtype(), name, [&]<class T>() {
      if (log) detail::act_softmax_backward<T, true>(gc.data<T>(), yc.data<T>(), gx.data<T>(), s);
      else detail::act_softmax_backward<T, false>(gc.data<T>(), yc.data<T>(), gx.data<T>(), s);
    });
  return gx;
}

// ---- dropout ----

// x * (keep ? scale : 0) in acc_t (float; double for float64), rounded once; keep bool of x's
// shape; any strides on either.
inline Tensor masked_scale(const Tensor& x, const Tensor& keep, double scale) {
  mixprec::detail::require_cpu("dropout", x);
  MIXPREC_CHECK(keep.dtype() == DType::Bool && keep.sizes() == x.sizes(), "dropout: mask ", keep.dtype(), " ", keep.sizes(),
                " must be bool of the input's shape ", x.sizes());
  Tensor y = empty(x.sizes(), x.dtype());
  dispatch_floating(x.dtype(), "dropout", [&]<class T>() {
    const auto sc = static_cast<acc_t<T>>(scale);
    cpu::map<T, T, bool>(y, [sc](auto v, auto k) { return v * (k ? sc : decltype(v)(0)); }, x, keep);
  });
  return y;
}

// x * (dropout_keep(seed, i, p) ? scale : 0) over x's elements in row-major order. A contiguous
// x draws the decisions chunk by chunk next to the product (no mask in memory: the backward
// draws them again from the seed); a strided one (a broadcast gradient) through a mask.
inline Tensor dropout_apply(const Tensor& x, uint64_t seed, double p, double scale, const Tensor& replay_counter) {
  mixprec::detail::require_cpu("dropout", x);
  if (replay_counter.defined()) seed = mixprec::detail::dropout_seed(seed, replay_counter.item<int64_t>());
  const int64_t n = x.numel();
  if (!x.is_contiguous()) {
    Tensor keep = empty(x.sizes(), DType::Bool);
    bool* m = keep.data<bool>();
    parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) m[i] = mixprec::detail::dropout_keep(seed, static_cast<uint64_t>(i), p);
    });
    return masked_scale(x, keep, scale);
  }
  Tensor y = empty(x.sizes(), x.dtype());
  if (n == 0) return y;
  dispatch_floating(x.dtype(), "dropout", [&]<class T>() {
    using A = acc_t<T>;
    const A sc = static_cast<A>(scale);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
      std::array<A, detail::kMapChunk> factor, in, res;
      for (int64_t c = b; c < e; c += detail::kMapChunk) {
        const int64_t m = std::min(detail::kMapChunk, e - c);
        for (int64_t i = 0; i < m; ++i)
          factor[i] = mixprec::detail::dropout_keep(seed, static_cast<uint64_t>(c + i), p) ? sc : A(0);
        const A* v = detail::load_run(xp + c, 1, m, in.data());
        A* o = std::is_same_v<T, A> ? reinterpret_cast<A*>(yp + c) : res.data();
        detail::map_chunk(o, m, [](A a, A f) { return a * f; }, v, factor.data());
        if constexpr (!std::is_same_v<T, A>) detail::store_run(yp + c, 1, o, m);
      }
    });
  });
  return y;
}

// ---- embedding ----

// Rows idx (int64 [N], contiguous, in range) of a contiguous weight [V, D] of any dtype: [N, D].
inline Tensor embedding_gather(const Tensor& weight, const Tensor& idx) {
  mixprec::detail::require_cpu("embedding", weight);
  const int64_t N = idx.numel(), D = weight.size(1);
  Tensor out = empty({N, D}, weight.dtype());
  const int64_t* ip = idx.data<int64_t>();
  dispatch_all(weight.dtype(), "embedding", [&]<class T>() {
    const T* wp = weight.data<T>();
    T* op = out.data<T>();
    parallel_for(0, N, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) std::copy(wp + ip[i] * D, wp + (ip[i] + 1) * D, op + i * D);
    });
  });
  return out;
}

// grad [N, D] (contiguous float32, or float64) added into rows idx of [V, D] zeros of grad's
// dtype, in index order; row pad (-1: none) gets nothing.
inline Tensor embedding_backward(const Tensor& grad, const Tensor& idx, int64_t num_weights, int64_t pad) {
  mixprec::detail::require_cpu("embedding_backward", grad);
  MIXPREC_CHECK((grad.dtype() == DType::Float32 || grad.dtype() == DType::Float64) && grad.dim() == 2 && grad.is_contiguous() &&
                    grad.size(0) == idx.numel(),
                "embedding_backward: grad must be contiguous float32 or float64 [", idx.numel(), ", D], got ", grad.dtype(), " ",
                grad.sizes());
  const int64_t D = grad.size(1);
  Tensor acc = zeros({num_weights, D}, grad.dtype());
  dispatch_floating(grad.dtype(), "embedding_backward", [&]<class A>() {
    cpu::index_add_rows<A>(acc.data<A>(), grad.data<A>(), std::span<const int64_t>(idx.data<int64_t>(), static_cast<std::size_t>(idx.numel())), 1,
                                       num_weights, D, pad);
  });
  return acc;
}

// The entries above in the CPU table (backends/cpu/kernels.hpp).
inline void fill_elementwise_kernels(DeviceKernels& t) {
  t.copy = copy_convert;
  t.fill = fill_tensor;
  t.binary = binary_op;
  t.binary_scalar = binary_scalar_op;
  t.unary = unary_op;
  t.unary_backward = unary_backward_op;
  t.sum = sum_dims;  // backends/cpu/reduce.hpp
  t.softmax = softmax_forward;
  t.softmax_backward = softmax_backward;
  t.masked_scale = masked_scale;
  t.dropout = dropout_apply;
  t.embedding = embedding_gather;
  t.embedding_backward = embedding_backward;
}

}  // namespace mixprec::cpu
