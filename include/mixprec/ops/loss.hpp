#pragma once
// Loss functions with PyTorch's semantics. Per-element losses are computed in float (double for
// double inputs) and reduced in double; the result has the (promoted) input dtype.
// cross_entropy fuses log_softmax and nll: forward keeps only the per-row log-sum-exp, backward
// rebuilds softmax from it (softmax - smoothed one-hot); the kernels are the device's
// (DeviceKernels::cross_entropy; the CPU's in backends/cpu/loss.hpp), or, on a device without
// them, cross_entropy_device's composition of routed ops.
#include <atomic>
#include <cmath>
#include <limits>

#include "mixprec/ops/activation.hpp"

namespace mixprec {

enum class Reduction { None, Mean, Sum };

namespace detail {
// Where per-element losses are computed: float for 16-bit and float32, double for double.
inline DType loss_acc_dtype(DType d) { return d == DType::Float64 ? DType::Float64 : DType::Float32; }
// Dispatch over the two accumulation dtypes only (no 16-bit instantiations of the lambda).
template <class F>
void loss_dispatch_acc(DType ad, F&& f) {
  if (ad == DType::Float64) f.template operator()<double>();
  else f.template operator()<float>();
}

// Sum of a contiguous float/double tensor in double. Fixed chunks with 8 partial sums each.
inline double loss_sum(const Tensor& t) {
  const int64_t n = t.numel();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(cpu::num_threads(), (n + kParallelGrain - 1) / kParallelGrain));
  std::vector<double> part(static_cast<std::size_t>(chunks), 0.0);
  loss_dispatch_acc(t.dtype(), [&]<class T>() {
    const T* p = t.data<T>();
    cpu::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
      for (int64_t k = kb; k < ke; ++k) {
        double a[8] = {};
        int64_t i = n * k / chunks;
        const int64_t e = n * (k + 1) / chunks;
        for (; i + 8 <= e; i += 8)
          for (int j = 0; j < 8; ++j) a[j] += static_cast<double>(static_cast<acc_t<T>>(p[i + j]));
        for (; i < e; ++i) a[0] += static_cast<double>(static_cast<acc_t<T>>(p[i]));
        part[k] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      }
    });
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}

// Per-element losses L (contiguous, acc dtype) reduced to the op's output in dtype `out`; Mean
// divides by `count` (0 / 0 is NaN, as PyTorch when every target is ignored).
inline Tensor loss_reduce(const Tensor& L, Reduction r, DType out, double count) {
  if (r == Reduction::None) return as_dtype_raw(L, out);
  const double s = loss_sum(L);
  return scalar_tensor(r == Reduction::Mean ? s / count : s, out);
}

// d (per-element dloss/dinput, acc dtype) times the upstream gradient of the reduction.
inline Tensor loss_chain(const Tensor& d, const Tensor& g, Reduction r, double count) {
  if (r == Reduction::None)
    return binary_kernel("loss_backward", d, contiguous_raw(expand_raw(as_dtype_raw(g, d.dtype()), d.sizes())),
                         [](auto a, auto b) { return a * b; });
  const double s = g.item<double>() / (r == Reduction::Mean ? count : 1.0);
  return unary_kernel("loss_backward", d, [s](auto a) { return a * static_cast<decltype(a)>(s); });
}

// The class-index layout shared by cross_entropy and nll_loss: input [N, C, d...] (or [C])
// seen as [N, C, S]; target [N, d...] (or []) holds one class per row r = n * S + s.
struct LossClassLayout {
  int64_t N = 1, C = 1, S = 1;
  Shape out_shape;
};
inline LossClassLayout loss_class_layout(const char* op, const Tensor& input, const Tensor& target) {
  MIXPREC_CHECK(input.defined() && target.defined(), op, ": input and target must be defined");
  MIXPREC_CHECK(input.is_floating_point(), op, ": expected a floating-point input, got ", input.dtype(), " of shape ", input.sizes());
  MIXPREC_CHECK(target.dtype() == DType::Int64, op, ": expected class-index targets of dtype int64, got ", target.dtype(),
                " of shape ", target.sizes());
  MIXPREC_CHECK(input.dim() >= 1, op, ": expected an input of shape [N, C, d...] or [C], got a 0-D tensor");
  LossClassLayout l;
  if (input.dim() == 1) {
    MIXPREC_CHECK(target.dim() == 0, op, ": for an unbatched input of shape ", input.sizes(), " the target must be 0-D, got shape ",
                  target.sizes());
    l.C = input.size(0);
    return l;
  }
  l.out_shape = input.sizes();
  l.out_shape.erase(l.out_shape.begin() + 1);
  MIXPREC_CHECK(target.sizes() == l.out_shape, op, ": target of shape ", target.sizes(), " does not match input of shape ",
                input.sizes(), " (expected target shape ", l.out_shape, ")");
  l.N = input.size(0);
  l.C = input.size(1);
  l.S = numel_of(l.out_shape) / std::max<int64_t>(l.N, 1);
  return l;
}

// Checks every class index before any parallel work (a throw cannot leave a parallel region);
// returns how many rows are not ignored.
inline int64_t loss_check_targets(const char* op, const int64_t* t, int64_t rows, int64_t C, int64_t ignore_index) {
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (t[r] == ignore_index) continue;
    MIXPREC_CHECK(t[r] >= 0 && t[r] < C, op, ": target value ", t[r], " is out of range for C = ", C,
                  " classes (expected 0 <= target < ", C, ", or ignore_index = ", ignore_index, ")");
    ++count;
  }
  return count;
}

inline void loss_check_pair(const char* op, const Tensor& input, const Tensor& target) {
  MIXPREC_CHECK(input.defined() && target.defined(), op, ": input and target must be defined");
  MIXPREC_CHECK(input.is_floating_point() && target.is_floating_point(), op, ": expected floating-point input and target, got ",
                input.dtype(), " and ", target.dtype());
  require_cpu(op, input);
  require_cpu(op, target);
}

// log(1 + exp(-x)) without overflow.
template <class A>
A loss_softplus_neg(A x) {
  return std::max(-x, A(0)) + std::log1p(std::exp(-std::abs(x)));
}
template <class A>
A loss_sigmoid(A x) {
  if (x >= 0) return A(1) / (A(1) + std::exp(-x));
  const A e = std::exp(x);
  return e / (A(1) + e);
}
// cross_entropy on a device without the fused kernels, composed from routed ops: -sum_c(w_c log_softmax(x)_c) per row,
// with the row weights w (one-hot mixed with label smoothing, zero for ignored rows) and the count
// of rows built on the device from the class indices (DeviceKernels::class_weights), so nothing
// waits for the device. Targets given on the CPU are checked there first (an Error at once);
// device targets out of range make their rows' losses NaN and are reported, naming this op, at
// the next host read (detail::report_device_checks). Computed in float32 for 16-bit logits, as
// on the CPU.
inline Tensor cross_entropy_device(const Tensor& x, const Tensor& target, const LossClassLayout& lay, Reduction reduction,
                                   int64_t ignore_index, double ls) {
  const char* op = "cross_entropy";
  const Device dev = x.device();
  (void)device_kernel(op, x, &DeviceKernels::softmax);  // no backend: refuse here, by this op's name
  const auto weights = device_kernel(op, x, &DeviceKernels::class_weights);
  MIXPREC_CHECK(target.device() == Device::CPU || target.device() == dev, op, ": input on ", dev, " and target on ", target.device());
  const int64_t N = lay.N, C = lay.C, S = lay.S;
  if (target.device() == Device::CPU) {
    const Tensor tc = contiguous_raw(target);
    (void)loss_check_targets(op, tc.data<int64_t>(), N * S, C, ignore_index);
  }
  const Tensor td = contiguous_raw(move_raw(target, dev, op));
  const DType ad = loss_acc_dtype(x.dtype());
  const Tensor bad = zeros({}, DType::Float32, dev);
  const auto [w, count] = weights(td, N, C, S, ignore_index, ls, ad, bad);
  // A CPU input's targets were checked on the host above (and the CPU has no to_host to read a
  // count back with): only a device's leave a count to report.
  if (dev != Device::CPU)
    add_device_check(bad, std::string(op) + ": a target value is out of range [0, " + std::to_string(C) + "); its row's loss is NaN");
  const int64_t cdim = x.dim() == 1 ? 0 : 1;
  const Tensor logp = log_softmax(cast(x, ad), cdim);
  const Tensor per_row = mul(sum(mul(logp, reshape_raw(w, x.sizes())), {cdim}), -1.0);
  const Tensor out = reduction == Reduction::None  ? per_row
                     : reduction == Reduction::Sum ? sum(per_row)
                                                   : div(sum(per_row), cast(count, ad));
  return cast(out, x.dtype());  // the input's dtype, as on the CPU
}

}  // namespace detail

// Cross entropy of logits [N, C, d...] (or [C]) against class indices [N, d...] (or []), as
// torch.nn.functional.cross_entropy: rows whose target is ignore_index contribute nothing and
// Mean divides by the number of other rows; label smoothing mixes in the uniform distribution:
// loss = (1 - ls) * nll + ls / C * sum_c(-log p_c).
inline Tensor cross_entropy(const Tensor& logits, const Tensor& target, Reduction reduction = Reduction::Mean, int64_t ignore_index = -100,
                            double label_smoothing = 0.0) {
  return dispatch(OpId::cross_entropy, [reduction, ignore_index, label_smoothing](const Tensor& x, const Tensor& target) {
    MIXPREC_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "cross_entropy: label_smoothing must be in [0, 1], got ",
                  label_smoothing);
    const detail::LossClassLayout lay = detail::loss_class_layout("cross_entropy", x, target);
    const DeviceKernels* kt = device_kernels(x.device());
    if (!kt || !kt->cross_entropy || !kt->cross_entropy_backward)
      return detail::cross_entropy_device(x, target, lay, reduction, ignore_index, label_smoothing);
    // The fused kernel (the CPU's) takes targets checked on the host: an Error at once.
    detail::require_cpu("cross_entropy", target);
    const int64_t N = lay.N, C = lay.C, S = lay.S, R = N * S;
    const Tensor xc = detail::contiguous_raw(x), tc = detail::contiguous_raw(target);
    const int64_t count = detail::loss_check_targets("cross_entropy", tc.data<int64_t>(), R, C, ignore_index);
    const double ls = label_smoothing;
    const auto [L, lse] = detail::device_kernel("cross_entropy", x, &DeviceKernels::cross_entropy)(xc, tc, N, C, S, ignore_index, ls);
    Tensor out = detail::loss_reduce(detail::reshape_raw(L, lay.out_shape), reduction, x.dtype(), static_cast<double>(count));
    if (autograd::should_record({x}))
      autograd::record("cross_entropy", {x, target}, {out},
                       [sx = autograd::SavedTensor(x), st = autograd::SavedTensor(target), lse, N, C, S, count, reduction, ignore_index,
                        ls, out_shape = lay.out_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor xc = detail::contiguous_raw(sx.get("cross_entropy"));
                         const Tensor tc = detail::contiguous_raw(st.get("cross_entropy"));
                         const DType ad = lse.dtype();
                         // Per-row factor of the upstream gradient.
                         const Tensor gr = reduction == Reduction::None
                                               ? detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], ad), out_shape))
                                               : Tensor();
                         const double gs = reduction == Reduction::None
                                               ? 0.0
                                               : g[0].item<double>() / (reduction == Reduction::Mean ? static_cast<double>(count) : 1.0);
                         return {detail::device_kernel("cross_entropy", xc, &DeviceKernels::cross_entropy_backward)(
                                     xc, tc, lse, gr, gs, N, C, S, ignore_index, ls),
                                 Tensor()};
                       });
    return out;
  }, logits, target);
}

// Negative log-likelihood of log-probabilities [N, C, d...] (or [C]) at class indices.
inline Tensor nll_loss(const Tensor& log_probs, const Tensor& target, Reduction reduction = Reduction::Mean, int64_t ignore_index = -100) {
  return dispatch(OpId::nll_loss, [reduction, ignore_index](const Tensor& x, const Tensor& target) {
    const detail::LossClassLayout lay = detail::loss_class_layout("nll_loss", x, target);
    detail::require_cpu("nll_loss", x);
    detail::require_cpu("nll_loss", target);
    const int64_t N = lay.N, C = lay.C, S = lay.S, R = N * S;
    const Tensor tc = detail::contiguous_raw(target);
    const int64_t count = detail::loss_check_targets("nll_loss", tc.data<int64_t>(), R, C, ignore_index);
    const DType ad = detail::loss_acc_dtype(x.dtype());
    Tensor L = empty(lay.out_shape, ad);
    // Only one element per row is read: index the (possibly strided) input directly.
    const Shape& xs = x.strides();
    const int64_t s0 = x.dim() == 1 ? 0 : xs[0], sc = x.dim() == 1 ? xs[0] : xs[1];
    Shape inner_sizes, inner_strides;
    for (int64_t d = 2; d < x.dim(); ++d) {
      inner_sizes.push_back(x.size(d));
      inner_strides.push_back(xs[d]);
    }
    auto offset_of = [=](int64_t r) {
      int64_t n = r / std::max<int64_t>(S, 1), s = r % std::max<int64_t>(S, 1), off = n * s0;
      for (int64_t d = static_cast<int64_t>(inner_sizes.size()) - 1; d >= 0; --d) {
        off += (s % inner_sizes[d]) * inner_strides[d];
        s /= inner_sizes[d];
      }
      return off;
    };
    if (R > 0)
      dispatch_floating(x.dtype(), "nll_loss", [&]<class T>() {
        using A = acc_t<T>;
        const T* xp = x.data<T>();
        const int64_t* tp = tc.data<int64_t>();
        A* lp = L.data<A>();
        cpu::parallel_for(0, R, kParallelGrain, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r)
            lp[r] = tp[r] == ignore_index ? A(0) : -static_cast<A>(xp[offset_of(r) + tp[r] * sc]);
        });
      });
    Tensor out = detail::loss_reduce(L, reduction, x.dtype(), static_cast<double>(count));
    if (autograd::should_record({x}))
      autograd::record("nll_loss", {x, target}, {out},
                       [st = autograd::SavedTensor(target), in_sizes = x.sizes(), dt = x.dtype(), N, C, S, count, reduction, ignore_index,
                        out_shape = lay.out_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor tc = detail::contiguous_raw(st.get("nll_loss"));
                         const int64_t R = N * S;
                         const DType ad = detail::loss_acc_dtype(dt);
                         const Tensor gr = reduction == Reduction::None
                                               ? detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], ad), out_shape))
                                               : Tensor();
                         const double gs = reduction == Reduction::None
                                               ? 0.0
                                               : g[0].item<double>() / (reduction == Reduction::Mean ? static_cast<double>(count) : 1.0);
                         Tensor gx = zeros(in_sizes, dt);
                         if (R > 0)
                           dispatch_floating(dt, "nll_loss_backward", [&]<class T>() {
                             using A = acc_t<T>;
                             T* o = gx.data<T>();
                             const int64_t* tp = tc.data<int64_t>();
                             const A* gp = gr.defined() ? gr.data<A>() : nullptr;
                             cpu::parallel_for(0, R, kParallelGrain, [&](int64_t b, int64_t e) {
                               for (int64_t r = b; r < e; ++r) {
                                 if (tp[r] == ignore_index) continue;
                                 o[(r / S) * C * S + tp[r] * S + r % S] = static_cast<T>(-(gp ? gp[r] : static_cast<A>(gs)));
                               }
                             });
                           });
                         return {gx, Tensor()};
                       });
    return out;
  }, log_probs, target);
}

// (input - target)^2; the two broadcast (both may require grad).
inline Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction = Reduction::Mean) {
  return dispatch(OpId::mse_loss, [reduction](const Tensor& a, const Tensor& b) {
    detail::loss_check_pair("mse_loss", a, b);
    const DType ct = promote_types(a.dtype(), b.dtype()), ad = detail::loss_acc_dtype(ct);
    const Tensor L = detail::binary_kernel("mse_loss", detail::as_dtype_raw(a, ad), detail::as_dtype_raw(b, ad), [](auto x, auto y) {
      const auto d = x - y;
      return d * d;
    });
    Tensor out = detail::loss_reduce(L, reduction, ct, static_cast<double>(L.numel()));
    if (autograd::should_record({a, b}))
      autograd::record("mse_loss", {a, b}, {out},
                       [sa = autograd::SavedTensor(a), sb = autograd::SavedTensor(b), reduction, ad](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& a = sa.get("mse_loss");
                         const Tensor& b = sb.get("mse_loss");
                         Tensor d = detail::binary_kernel("mse_loss_backward", detail::as_dtype_raw(a, ad), detail::as_dtype_raw(b, ad),
                                                          [](auto x, auto y) { return 2 * (x - y); });
                         d = detail::loss_chain(d, g[0], reduction, static_cast<double>(d.numel()));
                         const Tensor nd = detail::unary_kernel("mse_loss_backward", d, [](auto v) { return -v; });
                         return {detail::grad_for(d, a.sizes(), a.dtype()), detail::grad_for(nd, b.sizes(), b.dtype())};
                       });
    return out;
  }, input, target);
}

// Binary cross entropy on logits, stable for any magnitude:
//   loss = (1 - t) x + (1 + (pos_weight - 1) t) log(1 + exp(-x)),
// with log(1 + exp(-x)) = max(-x, 0) + log1p(exp(-|x|)). pos_weight broadcasts against x.
inline Tensor binary_cross_entropy_with_logits(const Tensor& logits, const Tensor& target, Reduction reduction = Reduction::Mean,
                                               const Tensor& pos_weight = Tensor()) {
  return dispatch(OpId::binary_cross_entropy_with_logits, [reduction](const Tensor& x, const Tensor& t, const Tensor& pw) {
    const char* op = "binary_cross_entropy_with_logits";
    detail::loss_check_pair(op, x, t);
    MIXPREC_CHECK(t.sizes() == x.sizes(), op, ": target of shape ", t.sizes(), " must have the same shape as the input ", x.sizes());
    DType ct = promote_types(x.dtype(), t.dtype());
    if (pw.defined()) {
      MIXPREC_CHECK(pw.is_floating_point(), op, ": pos_weight must be floating-point, got ", pw.dtype());
      MIXPREC_CHECK(broadcast_shapes(pw.sizes(), x.sizes(), op) == x.sizes(), op, ": pos_weight of shape ", pw.sizes(),
                    " does not broadcast to the input shape ", x.sizes());
      detail::require_cpu(op, pw);
      ct = promote_types(ct, pw.dtype());
    }
    const DType ad = detail::loss_acc_dtype(ct);
    const Tensor xa = detail::as_dtype_raw(x, ad), ta = detail::as_dtype_raw(t, ad);
    Tensor L = empty(x.sizes(), ad);
    detail::loss_dispatch_acc(ad, [&]<class A>() {
      if (pw.defined())
        cpu::map<A, A, A, A>(L, [](A v, A tv, A p) { return (1 - tv) * v + ((p - 1) * tv + 1) * detail::loss_softplus_neg(v); }, xa, ta,
                             detail::expand_raw(detail::as_dtype_raw(pw, ad), x.sizes()));
      else
        cpu::map<A, A, A>(L, [](A v, A tv) { return (1 - tv) * v + detail::loss_softplus_neg(v); }, xa, ta);
    });
    Tensor out = detail::loss_reduce(L, reduction, ct, static_cast<double>(L.numel()));
    if (autograd::should_record({x, t, pw}))
      autograd::record(op, {x, t, pw}, {out},
                       [sx = autograd::SavedTensor(x), st = autograd::SavedTensor(t), sp = autograd::SavedTensor(pw), reduction, ad, op,
                        need_t = autograd::tensor_requires_grad(t),
                        need_pw = autograd::tensor_requires_grad(pw)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get(op);
                         const Tensor& t = st.get(op);
                         const Tensor& pw = sp.get(op);
                         const Tensor xa = detail::as_dtype_raw(x, ad), ta = detail::as_dtype_raw(t, ad);
                         const Tensor pa = pw.defined() ? detail::expand_raw(detail::as_dtype_raw(pw, ad), x.sizes()) : Tensor();
                         const double n = static_cast<double>(x.numel());
                         Tensor dx = empty(x.sizes(), ad), dt, dp;
                         detail::loss_dispatch_acc(ad, [&]<class A>() {
                           if (pa.defined()) {
                             // d/dx = (1 - t) + (1 + (pw - 1) t) (sigmoid(x) - 1)
                             cpu::map<A, A, A, A>(dx, [](A v, A tv, A p) { return (1 - tv) + ((p - 1) * tv + 1) * (detail::loss_sigmoid(v) - 1); },
                                                  xa, ta, pa);
                             if (need_t) {
                               dt = empty(x.sizes(), ad);
                               cpu::map<A, A, A>(dt, [](A v, A p) { return -v + (p - 1) * detail::loss_softplus_neg(v); }, xa, pa);
                             }
                             if (need_pw) {
                               dp = empty(x.sizes(), ad);
                               cpu::map<A, A, A>(dp, [](A v, A tv) { return tv * detail::loss_softplus_neg(v); }, xa, ta);
                             }
                           } else {
                             cpu::map<A, A, A>(dx, [](A v, A tv) { return detail::loss_sigmoid(v) - tv; }, xa, ta);
                             if (need_t) {
                               dt = empty(x.sizes(), ad);
                               cpu::map<A, A>(dt, [](A v) { return -v; }, xa);
                             }
                           }
                         });
                         Tensor gx = detail::grad_for(detail::loss_chain(dx, g[0], reduction, n), x.sizes(), x.dtype());
                         Tensor gt = dt.defined() ? detail::grad_for(detail::loss_chain(dt, g[0], reduction, n), t.sizes(), t.dtype()) : Tensor();
                         Tensor gp = dp.defined() ? detail::grad_for(detail::loss_chain(dp, g[0], reduction, n), pw.sizes(), pw.dtype()) : Tensor();
                         return {gx, gt, gp};
                       });
    return out;
  }, logits, target, pos_weight);
}

// Binary cross entropy on probabilities in [0, 1]; each log is clamped at -100 as PyTorch does,
// so p = 0 or 1 gives a finite loss.
inline Tensor binary_cross_entropy(const Tensor& probs, const Tensor& target, Reduction reduction = Reduction::Mean) {
  return dispatch(OpId::binary_cross_entropy, [reduction](const Tensor& p, const Tensor& t) {
    const char* op = "binary_cross_entropy";
    detail::loss_check_pair(op, p, t);
    MIXPREC_CHECK(t.sizes() == p.sizes(), op, ": target of shape ", t.sizes(), " must have the same shape as the input ", p.sizes());
    const DType ct = promote_types(p.dtype(), t.dtype()), ad = detail::loss_acc_dtype(ct);
    Tensor L = empty(p.sizes(), ad);
    std::atomic<bool> out_of_range{false};
    detail::loss_dispatch_acc(ad, [&]<class A>() {
      cpu::map<A, A, A>(L, [&out_of_range](A pv, A tv) {
        if (!(pv >= 0 && pv <= 1)) out_of_range.store(true, std::memory_order_relaxed);
        const A lp = std::max(std::log(pv), A(-100)), l1p = std::max(std::log1p(-pv), A(-100));
        return -(tv * lp + (1 - tv) * l1p);
      }, detail::as_dtype_raw(p, ad), detail::as_dtype_raw(t, ad));
    });
    MIXPREC_CHECK(!out_of_range.load(), op, ": all elements of the input (shape ", p.sizes(),
                  ") should be probabilities between 0 and 1; use binary_cross_entropy_with_logits for raw scores");
    Tensor out = detail::loss_reduce(L, reduction, ct, static_cast<double>(L.numel()));
    if (autograd::should_record({p, t}))
      autograd::record(op, {p, t}, {out},
                       [sp = autograd::SavedTensor(p), st = autograd::SavedTensor(t), reduction, ad, op,
                        need_t = autograd::tensor_requires_grad(t)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& p = sp.get(op);
                         const Tensor& t = st.get(op);
                         const Tensor pa = detail::as_dtype_raw(p, ad), ta = detail::as_dtype_raw(t, ad);
                         const double n = static_cast<double>(p.numel());
                         Tensor dp = empty(p.sizes(), ad), dt;
                         detail::loss_dispatch_acc(ad, [&]<class A>() {
                           // PyTorch's form: (p - t) / max(p (1 - p), 1e-12).
                           cpu::map<A, A, A>(dp, [](A pv, A tv) { return (pv - tv) / std::max(pv * (1 - pv), A(1e-12)); }, pa, ta);
                           if (need_t) {
                             dt = empty(p.sizes(), ad);
                             cpu::map<A, A>(dt, [](A pv) { return std::max(std::log1p(-pv), A(-100)) - std::max(std::log(pv), A(-100)); }, pa);
                           }
                         });
                         Tensor gp = detail::grad_for(detail::loss_chain(dp, g[0], reduction, n), p.sizes(), p.dtype());
                         Tensor gt = dt.defined() ? detail::grad_for(detail::loss_chain(dt, g[0], reduction, n), t.sizes(), t.dtype()) : Tensor();
                         return {gp, gt};
                       });
    return out;
  }, probs, target);
}

}  // namespace mixprec
