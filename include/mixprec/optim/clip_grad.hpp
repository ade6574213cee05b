#pragma once
// torch.nn.utils.clip_grad_norm_ / clip_grad_value_. On the CPU the norm accumulates in double over
// the gradients' values read as float, whatever their dtype. The 2-norm is the device's kernel
// (DeviceKernels::grad_norm, the CPU's too) and the gradients are scaled by the device's
// clip_grads from it; on a device (the 2-norm only) nothing waits for the device: the result is
// a GradNorm holding the norm as a device tensor, read back only when converted to double.
//
// With mixed precision use the Optimizer& overloads after GradScaler::unscale_: they work on the
// float32 gradients step() will use (the master-gradient buffers of 16-bit parameters, which
// keep values that underflow in float16), then store the rounded result into the 16-bit .grad().
#include "mixprec/optim/optimizer.hpp"

namespace mixprec::optim {

// The total norm clip_grad_norm_ returns: a number on the CPU; on a device a float32 [] tensor
// there, which converting to double reads (and waits for).
class GradNorm {
 public:
  GradNorm(double v) : value_(v) {}  // NOLINT: a host norm
  explicit GradNorm(Tensor t) : tensor_(std::move(t)) {}
  operator double() const { return value(); }  // NOLINT: `double n = clip_grad_norm_(...)` as before
  double value() const { return tensor_.defined() ? static_cast<double>(tensor_.item<float>()) : value_; }
  // The device norm; undefined for a norm computed on the CPU.
  const Tensor& tensor() const { return tensor_; }

 private:
  double value_ = 0.0;
  Tensor tensor_;
};

namespace detail {

struct NormAcc {
  double p;
  double acc;
  // max/min that let NaN through, as torch's inf-norms.
  static double pick(double x, double y, bool larger) {
    if (x != x || y != y) return x + y;
    return larger ? std::max(x, y) : std::min(x, y);
  }
  void add(double a) {
    if (std::isinf(p)) acc = pick(acc, a, p > 0);
    else if (p == 0) acc += a != 0.0;
    else if (p == 1) acc += a;
    else if (p == 2) acc += a * a;
    else acc += std::pow(a, p);
  }
  void merge(double other) {
    if (std::isinf(p)) acc = pick(acc, other, p > 0);
    else acc += other;
  }
  static double init(double p) {
    return std::isinf(p) ? (p > 0 ? 0.0 : std::numeric_limits<double>::infinity()) : 0.0;
  }
  double finish() const {
    if (std::isinf(p) || p == 0 || p == 1) return acc;
    if (p == 2) return std::sqrt(acc);
    return std::pow(acc, 1.0 / p);
  }
};

inline void clamp_grad_(Tensor& g, double clip) {
  MIXPREC_CHECK(g.device() == Device::CPU, "clip_grad_value_: gradient of shape ", g.sizes(), " is on ", g.device(),
                "; clip_grad_value_ has no device kernel yet (clip_grad_norm_ has)");
  // Clamped in place, in acc_t (NaN stays NaN, as torch.clamp), by the table's `param_op`.
  ::mixprec::detail::device_kernel("clip_grad_value_", g, &DeviceKernels::param_op)(DeviceParamOp::ClampValue, g, Tensor(), clip);
  g.bump_version();
}

// Norm, then scale every gradient by max_norm / (norm + 1e-6) when that is below 1 (or NaN).
// Returns the norm and whether the gradients may have been scaled. The 2-norm and the scaling
// are the device's kernels (grad_norm, clip_grads; the CPU's in backends/cpu/training.hpp); other
// norms are accumulated here, on the CPU only. A norm in host memory (the CPU's) is read at once:
// that costs nothing, keeps GradNorm a plain number there, and skips the scaling call when the
// factor is >= 1 (nothing would change, and master gradients stay current).
inline std::pair<GradNorm, bool> clip_norm_impl(std::vector<Tensor>& grads, double max_norm, double norm_type,
                                                bool error_if_nonfinite) {
  MIXPREC_CHECK(!std::isnan(norm_type), "clip_grad_norm_: norm_type is NaN");
  if (grads.empty()) return {GradNorm(0.0), false};
  const Device dev = grads.front().device();
  for (const Tensor& g : grads)
    MIXPREC_CHECK(g.is_floating_point() && g.device() == dev, "clip_grad_norm_: gradient of shape ", g.sizes(), " has dtype ", g.dtype(),
                  " on ", g.device(), "; expected floating-point gradients all on ", dev);
  MIXPREC_CHECK(norm_type == 2.0 || dev == Device::CPU, "clip_grad_norm_: gradients on ", dev, " take norm_type 2 only, got ", norm_type);
  const auto clip_kernel = ::mixprec::detail::device_kernel("clip_grad_norm_", grads.front(), &DeviceKernels::clip_grads);
  Tensor norm;
  if (norm_type == 2.0) {
    norm = ::mixprec::detail::device_kernel("clip_grad_norm_", grads.front(), &DeviceKernels::grad_norm)(grads);
  } else {
    // Accumulated on the CPU (checked above) by the table's `param_op`, gradient after gradient.
    const auto acc_kernel = ::mixprec::detail::device_kernel("clip_grad_norm_", grads.front(), &DeviceKernels::param_op);
    Tensor acc = empty({}, DType::Float64);
    *acc.data<double>() = NormAcc::init(norm_type);
    for (Tensor& g : grads) acc_kernel(DeviceParamOp::NormAccumulate, acc, g, norm_type);
    norm = scalar_tensor(NormAcc{norm_type, *acc.data<double>()}.finish(), DType::Float64);
  }
  const bool on_host = norm.device() == Device::CPU;
  double v = 0;
  if (on_host || error_if_nonfinite) v = norm.item<double>();  // on a device, a host decision: reads the norm back
  MIXPREC_CHECK(!error_if_nonfinite || std::isfinite(v), "clip_grad_norm_: The total norm of order ", norm_type,
                " for gradients from `parameters` is non-finite (", v, "), so it cannot be clipped. To disable this error and scale "
                "the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
  if (on_host && max_norm / (v + 1e-6) >= 1.0) return {GradNorm(v), false};
  clip_kernel(grads, norm, max_norm);
  for (Tensor& g : grads) g.bump_version();
  return {on_host ? GradNorm(v) : GradNorm(norm), true};
}

inline std::vector<Tensor> grads_of(const std::vector<Tensor>& params) {
  std::vector<Tensor> grads;
  for (const Tensor& p : params) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    if (!g.is_contiguous()) {
      no_grad guard;
      g = g.contiguous();
      p.set_grad(g);
    }
    grads.push_back(g);
  }
  return grads;
}

}  // namespace detail

// Returns the total norm of all gradients (as one vector); clips them in place to max_norm.
inline GradNorm clip_grad_norm_(const std::vector<Tensor>& parameters, double max_norm, double norm_type = 2.0,
                              bool error_if_nonfinite = false) {
  std::vector<Tensor> grads = detail::grads_of(parameters);
  return detail::clip_norm_impl(grads, max_norm, norm_type, error_if_nonfinite).first;
}

// The same over the float32 gradients `optimizer` will step with (see the top of this file).
inline GradNorm clip_grad_norm_(Optimizer& optimizer, double max_norm, double norm_type = 2.0, bool error_if_nonfinite = false) {
  std::vector<Tensor> grads;
  for (auto& [p, g] : optimizer.fp32_grads()) grads.push_back(g);
  const auto [norm, scaled] = detail::clip_norm_impl(grads, max_norm, norm_type, error_if_nonfinite);
  if (scaled) optimizer.write_back_master_grads();
  return norm;
}

// Clamps every gradient to [-clip_value, clip_value].
inline void clip_grad_value_(const std::vector<Tensor>& parameters, double clip_value) {
  no_grad guard;
  for (Tensor g : detail::grads_of(parameters)) detail::clamp_grad_(g, clip_value);
}
inline void clip_grad_value_(Optimizer& optimizer, double clip_value) {
  {
    no_grad guard;
    for (auto& [p, g] : optimizer.fp32_grads()) detail::clamp_grad_(g, clip_value);
  }
  optimizer.write_back_master_grads();
}

}  // namespace mixprec::optim
