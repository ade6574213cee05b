#pragma once
// softmax / log_softmax, dropout and prelu (relu, gelu, silu, sigmoid and tanh live in
// elementwise.hpp). Softmax-style kernels see the input as [outer, D, inner] with the reduced dim
// in the middle: inner == 1 is the contiguous fast path, otherwise columns are processed in
// blocks so each pass over D streams contiguous memory. The math is float32 (double for double)
// with cpu::vec::exp; on the fast path 16-bit rows convert with SIMD and every pass is a loop
// cpu::simd compiles for AVX-512 where the CPU has it.
#include <limits>
#include <vector>

#include "mixprec/ops/linalg.hpp"

namespace mixprec {

namespace detail {
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

// out = exp(in) over a contiguous run (fn::exp: cpu::vec's vectorised exp for float, which gives
// exact zeros for masked -inf logits; std::exp for double).
template <class A>
void act_exp(const A* in, A* out, int64_t n) {
  cpu::simd([&]() MIXPREC_SIMD_BODY {
    for (int64_t i = 0; i < n; ++i) out[i] = fn::exp(in[i]);
  });
}

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
        act_exp(sh.data(), ex.data(), len);
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
          act_exp(sh.data(), ex.data(), len);
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

template <bool Log>
Tensor act_softmax_op(OpId id, const char* name, const Tensor& x, int64_t dim) {
  return dispatch(id, [name, dim](const Tensor& x) {
    MIXPREC_CHECK(x.is_floating_point(), name, ": expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    const int64_t wd = x.wrap_dim(dim, name);
    if (x.device() != Device::CPU) {
      Tensor y = device_kernel(name, x, &DeviceKernels::softmax)(x, wd, Log);
      if (autograd::should_record({x}))
        autograd::record(name, {x}, {y}, [sy = autograd::SavedTensor(y), wd, name](const std::vector<Tensor>& g) -> std::vector<Tensor> {
          const Tensor& y = sy.get(name);
          const Tensor gy = expand_raw(as_dtype_raw(g[0], y.dtype()), y.sizes());
          return {device_kernel(name, y, &DeviceKernels::softmax_backward)(y, gy, wd, Log)};
        });
      return y;
    }
    const ActSoftmaxDims s = act_softmax_dims(x, wd);
    const Tensor xc = contiguous_raw(x);
    Tensor y = empty(x.sizes(), x.dtype());
    if (x.numel() > 0)
      dispatch_floating(x.dtype(), name, [&]<class T>() { act_softmax_forward<T, Log>(xc.data<T>(), y.data<T>(), s); });
    if (autograd::should_record({x}))
      autograd::record(name, {x}, {y}, [sy = autograd::SavedTensor(y), s, name](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const Tensor& y = sy.get(name);
        const Tensor gc = contiguous_raw(expand_raw(as_dtype_raw(g[0], y.dtype()), y.sizes()));
        Tensor gx = empty(y.sizes(), y.dtype());
        if (y.numel() > 0)
          dispatch_floating(y.dtype(), name, [&]<class T>() { act_softmax_backward<T, Log>(gc.data<T>(), y.data<T>(), gx.data<T>(), s); });
        return {gx};
      });
    return y;
  }, x);
}

// Dropout's keep decision for element i of a call: a counter-based hash of (seed, i), with one
// draw of the caller's generator as the seed. Any device and any split of the work draws the
// same mask, and backward regenerates it instead of storing it on a device. The rule (splitmix64
// of seed + (i + 1) * golden ratio; the top 53 bits as a uniform in [0, 1), as Generator::uniform)
// is scaled_dot_product_attention's dropout rule (ops/attention.hpp).
MIXPREC_HOST_DEVICE uint64_t dropout_hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
MIXPREC_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t i, double p) {
  return static_cast<double>(dropout_hash(seed, i) >> 11) * 0x1.0p-53 >= p;
}
// The seed a call inside a captured graph uses on replay r: its capture-time draw mixed with r
// (read on the device), so that every replay drops different elements.
MIXPREC_HOST_DEVICE uint64_t dropout_seed(uint64_t seed, int64_t replay) {
  return dropout_hash(seed, ~static_cast<uint64_t>(replay));
}
}  // namespace detail

// Softmax along `dim`, computed in float (double for double) and rounded once on store.
inline Tensor softmax(const Tensor& x, int64_t dim) { return detail::act_softmax_op<false>(OpId::softmax, "softmax", x, dim); }
inline Tensor log_softmax(const Tensor& x, int64_t dim) {
  return detail::act_softmax_op<true>(OpId::log_softmax, "log_softmax", x, dim);
}

// Inverted dropout: kept elements are scaled by 1/(1-p) so the expectation is unchanged; the
// identity when !training or p == 0. The mask is drawn from `gen` (reproducible under a seed).
inline Tensor dropout(const Tensor& x, double p, bool training, Generator& gen = default_generator()) {
  return dispatch(OpId::dropout, [p, training, &gen](const Tensor& x) {
    MIXPREC_CHECK(p >= 0.0 && p <= 1.0, "dropout: probability has to be between 0 and 1, got ", p);
    MIXPREC_CHECK(x.is_floating_point(), "dropout: expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    if (!training || p == 0.0) return x;
    // p == 1 drops everything; a zero scale avoids inf * 0.
    const double scale = p == 1.0 ? 0.0 : 1.0 / (1.0 - p);
    if (x.device() != Device::CPU) {
      // The keep decisions are made in the kernel from the seed (no mask travels); the backward
      // regenerates them. Refused before the draw, so a refusal leaves the generator as it was.
      const auto kernel = detail::device_kernel("dropout", x, &DeviceKernels::dropout);
      MIXPREC_CHECK(x.dtype() != DType::Float64, "dropout: float64 tensors on ", x.device(), " are not supported (shape ", x.sizes(),
                    "); use float32, float16 or bfloat16");
      const uint64_t seed = gen.next_u64();
      const Tensor replay = detail::capture_state().replay_counter;  // inside a captured graph: new masks each replay
      Tensor y = kernel(detail::contiguous_raw(x), seed, p, scale, replay);
      if (autograd::should_record({x}))
        autograd::record("dropout", {x}, {y},
                         [seed, p, scale, replay, shape = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                           const Tensor gg = detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], dt), shape));
                           return {detail::device_kernel("dropout_backward", gg, &DeviceKernels::dropout)(gg, seed, p, scale, replay)};
                         });
      return y;
    }
    const int64_t n = x.numel();
    Tensor mask = empty(x.sizes(), DType::Bool);
    bool* m = mask.data<bool>();
    const uint64_t seed = gen.next_u64();
    cpu::parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) m[i] = detail::dropout_keep(seed, static_cast<uint64_t>(i), p);
    });
    Tensor y = empty(x.sizes(), x.dtype());
    dispatch_floating(x.dtype(), "dropout", [&]<class T>() {
      const auto sc = static_cast<acc_t<T>>(scale);
      cpu::map<T, T, bool>(y, [sc](auto v, auto keep) { return v * (keep ? sc : decltype(v)(0)); }, x, mask);
    });
    if (autograd::should_record({x}))
      autograd::record("dropout", {x}, {y}, [mask, scale, dt = x.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        Tensor gx = empty(mask.sizes(), dt);
        const Tensor gg = detail::expand_raw(detail::as_dtype_raw(g[0], dt), mask.sizes());
        dispatch_floating(dt, "dropout_backward", [&]<class T>() {
          const auto sc = static_cast<acc_t<T>>(scale);
          cpu::map<T, T, bool>(gx, [sc](auto v, auto keep) { return v * (keep ? sc : decltype(v)(0)); }, gg, mask);
        });
        return {gx};
      });
    return y;
  }, x);
}

// y = x where x > 0, weight * x elsewhere; weight has 1 element or one per channel (dim 1).
inline Tensor prelu(const Tensor& x, const Tensor& weight) {
  return dispatch(OpId::prelu, [](const Tensor& x, const Tensor& weight) {
    MIXPREC_CHECK(x.defined() && weight.defined(), "prelu: input and weight must be defined");
    MIXPREC_CHECK(x.is_floating_point() && weight.is_floating_point(), "prelu: expected floating-point tensors, got input ",
                  x.dtype(), " and weight ", weight.dtype());
    MIXPREC_CHECK(weight.dim() <= 1, "prelu: weight must be 0-D or 1-D, got shape ", weight.sizes());
    const int64_t channels = x.dim() >= 2 ? x.size(1) : 1;
    MIXPREC_CHECK(weight.numel() == 1 || weight.numel() == channels, "prelu: weight of shape ", weight.sizes(),
                  " must have 1 element or one per channel (", channels, ") of input shape ", x.sizes());
    detail::require_cpu("prelu", x);
    detail::require_cpu("prelu", weight);
    // weight viewed as [1, C, 1, ...] (or all ones when shared) so it broadcasts against x.
    Shape ws(static_cast<std::size_t>(x.dim()), 1), wst(static_cast<std::size_t>(x.dim()), 0);
    if (weight.numel() > 1) {
      ws[1] = channels;
      wst[1] = weight.stride(0);
    }
    const Tensor wb = detail::make_view(weight, ws, wst, weight.storage_offset());
    Tensor y = detail::binary_kernel("prelu", x, wb, [](auto v, auto w) { return v > 0 ? v : w * v; });
    if (autograd::should_record({x, weight}))
      autograd::record("prelu", {x, weight}, {y},
                       [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(weight), ws](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("prelu");
                         const Tensor& w = sw.get("prelu");
                         const DType ct = promote_types(x.dtype(), w.dtype());
                         const Tensor xc = detail::as_dtype_raw(x, ct);
                         const Tensor wb = detail::expand_raw(detail::as_dtype_raw(detail::make_view(w, ws, [&] {
                           Shape st(ws.size(), 0);
                           if (w.numel() > 1) st[1] = w.stride(0);
                           return st;
                         }(), w.storage_offset()), ct), x.sizes());
                         const Tensor gg = detail::expand_raw(detail::as_dtype_raw(g[0], ct), x.sizes());
                         Tensor gx = empty(x.sizes(), ct), gw_full = empty(x.sizes(), ct);
                         dispatch_floating(ct, "prelu_backward", [&]<class T>() {
                           cpu::map<T, T, T, T>(gx, [](auto gv, auto v, auto wv) { return v > 0 ? gv : gv * wv; }, gg, xc, wb);
                           cpu::map<T, T, T>(gw_full, [](auto gv, auto v) { return v > 0 ? decltype(v)(0) : gv * v; }, gg, xc);
                         });
                         Tensor gw = detail::grad_for(gw_full, ws, w.dtype()).reshape(w.sizes());
                         return {detail::as_dtype_raw(gx, x.dtype()), gw};
                       });
    return y;
  }, x, weight);
}

}  // namespace mixprec
