#pragma once
// Loss functions with PyTorch's semantics. Per-element losses are computed in float (double for
// double inputs) and reduced in double; the result has the (promoted) input dtype. The bodies
// here hold the checks, the autocast policy and autograd; the kernels are the device's
// (DeviceKernels::loss_terms, loss_terms_backward, loss_sum, nll_loss, cross_entropy...; the CPU's
// in backends/cpu/loss.hpp). The element-wise losses and nll_loss have CPU kernels only, so their
// ops refuse other devices first.
// cross_entropy fuses log_softmax and nll: forward keeps only the per-row log-sum-exp, backward
// rebuilds softmax from it (softmax - smoothed one-hot); on a device without the fused kernels,
// cross_entropy_device composes routed ops.
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

// Per-element losses L (dense, acc dtype) reduced to the op's output in dtype `out`; Mean
// divides by `count` (0 / 0 is NaN, as PyTorch when every target is ignored).
inline Tensor loss_reduce(const char* op, const Tensor& L, Reduction r, DType out, double count) {
  if (r == Reduction::None) return as_dtype_raw(L, out);
  return device_kernel(op, L, &DeviceKernels::loss_sum)(L, r == Reduction::Mean ? count : 1.0, out);
}

// The upstream gradient of a loss as its backward kernels take it: per element (Reduction::None;
// `shape`, contiguous, in the acc dtype ad) or one host scalar, already divided for Mean.
inline std::pair<Tensor, double> loss_upstream(const Tensor& g, Reduction r, const Shape& shape, DType ad, double count) {
  if (r == Reduction::None) return {contiguous_raw(expand_raw(as_dtype_raw(g, ad), shape)), 0.0};
  return {Tensor(), g.item<double>() / (r == Reduction::Mean ? count : 1.0)};
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
    Tensor out =
        detail::loss_reduce("cross_entropy", detail::reshape_raw(L, lay.out_shape), reduction, x.dtype(), static_cast<double>(count));
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
    const Tensor L = detail::device_kernel("nll_loss", x, &DeviceKernels::nll_loss)(x, tc, N, C, S, ignore_index);
    Tensor out = detail::loss_reduce("nll_loss", L, reduction, x.dtype(), static_cast<double>(count));
    if (autograd::should_record({x}))
      autograd::record("nll_loss", {x, target}, {out},
                       [st = autograd::SavedTensor(target), in_sizes = x.sizes(), dt = x.dtype(), N, C, S, count, reduction, ignore_index,
                        out_shape = lay.out_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor tc = detail::contiguous_raw(st.get("nll_loss"));
                         const auto [gr, gs] = detail::loss_upstream(g[0], reduction, out_shape, detail::loss_acc_dtype(dt), static_cast<double>(count));
                         return {detail::device_kernel("nll_loss_backward", tc, &DeviceKernels::nll_loss_backward)(tc, gr, gs, in_sizes, dt, N, C, S,
                                                                                                                   ignore_index),
                                 Tensor()};
                       });
    return out;
  }, log_probs, target);
}

// (input - target)^2; the two broadcast (both may require grad).
inline Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction = Reduction::Mean) {
  return dispatch(OpId::mse_loss, [reduction](const Tensor& a, const Tensor& b) {
    const char* op = "mse_loss";
    detail::loss_check_pair(op, a, b);
    const Shape shape = broadcast_shapes(a.sizes(), b.sizes(), op);
    const DType ct = promote_types(a.dtype(), b.dtype()), ad = detail::loss_acc_dtype(ct);
    const Tensor L =
        detail::device_kernel(op, a, &DeviceKernels::loss_terms)(DeviceLoss::Mse, detail::as_dtype_raw(a, ad), detail::as_dtype_raw(b, ad), Tensor());
    Tensor out = detail::loss_reduce(op, L, reduction, ct, static_cast<double>(L.numel()));
    if (autograd::should_record({a, b}))
      autograd::record(op, {a, b}, {out},
                       [sa = autograd::SavedTensor(a), sb = autograd::SavedTensor(b), reduction, ad, shape, op,
                        need_b = autograd::tensor_requires_grad(b)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& a = sa.get(op);
                         const Tensor& b = sb.get(op);
                         const auto [gr, gs] = detail::loss_upstream(g[0], reduction, shape, ad, static_cast<double>(numel_of(shape)));
                         const auto d = detail::device_kernel("mse_loss_backward", a, &DeviceKernels::loss_terms_backward)(
                             DeviceLoss::Mse, detail::as_dtype_raw(a, ad), detail::as_dtype_raw(b, ad), Tensor(), gr, gs, need_b, false);
                         return {detail::grad_for(d[0], a.sizes(), a.dtype()), d[1].defined() ? detail::grad_for(d[1], b.sizes(), b.dtype()) : Tensor()};
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
    // The kernels' operands: all in the acc dtype, pos_weight expanded to x's shape.
    auto operands = [ad](const Tensor& x, const Tensor& t, const Tensor& pw) {
      return std::array<Tensor, 3>{detail::as_dtype_raw(x, ad), detail::as_dtype_raw(t, ad),
                                   pw.defined() ? detail::expand_raw(detail::as_dtype_raw(pw, ad), x.sizes()) : Tensor()};
    };
    const auto [xa, ta, pa] = operands(x, t, pw);
    const Tensor L = detail::device_kernel(op, x, &DeviceKernels::loss_terms)(DeviceLoss::BceWithLogits, xa, ta, pa);
    Tensor out = detail::loss_reduce(op, L, reduction, ct, static_cast<double>(L.numel()));
    if (autograd::should_record({x, t, pw}))
      autograd::record(op, {x, t, pw}, {out},
                       [sx = autograd::SavedTensor(x), st = autograd::SavedTensor(t), sp = autograd::SavedTensor(pw), reduction, ad, op, operands,
                        need_t = autograd::tensor_requires_grad(t),
                        need_pw = autograd::tensor_requires_grad(pw)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get(op);
                         const Tensor& t = st.get(op);
                         const Tensor& pw = sp.get(op);
                         const auto [xa, ta, pa] = operands(x, t, pw);
                         const auto [gr, gs] = detail::loss_upstream(g[0], reduction, x.sizes(), ad, static_cast<double>(x.numel()));
                         const auto d = detail::device_kernel("binary_cross_entropy_with_logits_backward", x, &DeviceKernels::loss_terms_backward)(
                             DeviceLoss::BceWithLogits, xa, ta, pa, gr, gs, need_t, need_pw && pw.defined());
                         return {detail::grad_for(d[0], x.sizes(), x.dtype()), d[1].defined() ? detail::grad_for(d[1], t.sizes(), t.dtype()) : Tensor(),
                                 d[2].defined() ? detail::grad_for(d[2], pw.sizes(), pw.dtype()) : Tensor()};
                       });
    return out;
  }, logits, target, pos_weight);
}

// Binary cross entropy on probabilities in [0, 1]; each log is clamped at -100 as PyTorch does,
// so p = 0 or 1 gives a finite loss. The kernel refuses inputs outside [0, 1].
inline Tensor binary_cross_entropy(const Tensor& probs, const Tensor& target, Reduction reduction = Reduction::Mean) {
  return dispatch(OpId::binary_cross_entropy, [reduction](const Tensor& p, const Tensor& t) {
    const char* op = "binary_cross_entropy";
    detail::loss_check_pair(op, p, t);
    MIXPREC_CHECK(t.sizes() == p.sizes(), op, ": target of shape ", t.sizes(), " must have the same shape as the input ", p.sizes());
    const DType ct = promote_types(p.dtype(), t.dtype()), ad = detail::loss_acc_dtype(ct);
    const Tensor L =
        detail::device_kernel(op, p, &DeviceKernels::loss_terms)(DeviceLoss::Bce, detail::as_dtype_raw(p, ad), detail::as_dtype_raw(t, ad), Tensor());
    Tensor out = detail::loss_reduce(op, L, reduction, ct, static_cast<double>(L.numel()));
    if (autograd::should_record({p, t}))
      autograd::record(op, {p, t}, {out},
                       [sp = autograd::SavedTensor(p), st = autograd::SavedTensor(t), reduction, ad, op,
                        need_t = autograd::tensor_requires_grad(t)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& p = sp.get(op);
                         const Tensor& t = st.get(op);
                         const auto [gr, gs] = detail::loss_upstream(g[0], reduction, p.sizes(), ad, static_cast<double>(p.numel()));
                         const auto d = detail::device_kernel("binary_cross_entropy_backward", p, &DeviceKernels::loss_terms_backward)(
                             DeviceLoss::Bce, detail::as_dtype_raw(p, ad), detail::as_dtype_raw(t, ad), Tensor(), gr, gs, need_t, false);
                         return {detail::grad_for(d[0], p.sizes(), p.dtype()), d[1].defined() ? detail::grad_for(d[1], t.sizes(), t.dtype()) : Tensor()};
                       });
    return out;
  }, probs, target);
}

}  // namespace mixprec
