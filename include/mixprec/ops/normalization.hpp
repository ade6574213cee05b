#pragma once
// batch_norm, layer_norm, group_norm. They reach their kernels through the device's kernel table
// on every device (the CPU's in backends/cpu/norm.hpp, CUDA's in backends/cuda/norm.cuh; group_norm
// has a CPU kernel only, so the op refuses other devices first); their bodies here hold the
// checks, the autocast policy and autograd.
#include <cmath>

#include "mixprec/ops/conv.hpp"  // kernel_layout, layout_raw
#include "mixprec/ops/linalg.hpp"

namespace mixprec {

namespace detail {
inline void norm_check_param(const char* op, const Tensor& p, const char* what, int64_t C, const Tensor& x) {
  if (!p.defined()) return;
  MIXPREC_CHECK(p.is_floating_point(), op, ": ", what, " must be floating-point, got ", p.dtype());
  MIXPREC_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", what, " of shape ", p.sizes(), " does not match the ", C,
                " channels of input shape ", x.sizes(), " (expected [", C, "])");
  common_device(op, {&x, &p});
}
}  // namespace detail

namespace detail {
// The dtype batch_norm and layer_norm hand their parameters to the kernels in: float32, as cuDNN
// takes them, or float64 for a float64 input (the CPU's float64 kernels read doubles; CUDA takes no
// float64 input). A float64 parameter of a narrower input is rounded to float32 on every device.
inline DType norm_param_dtype(const Tensor& x) { return x.dtype() == DType::Float64 ? DType::Float64 : DType::Float32; }

// Under autocast on a device whose backend writes layer norms in any dtype (CUDA), layer_norm reads
// its input as it is and writes the autocast dtype, its arithmetic float32: the float32 policy's
// upcast copy of a 16-bit input and the downcast copy its consumer (a linear, in every model here)
// would make are both gone. A deviation from PyTorch, whose output is float32 here; on the CPU the
// policy is unchanged.
inline bool layer_norm_fuses_cast(const Tensor& x) {
  if (!x.defined() || x.device() == Device::CPU || amp::detail::state().suppressed > 0 || !autocast::is_enabled(x.device()))
    return false;
  if (x.dtype() != DType::Float32 && !is_low_precision(x.dtype())) return false;
  const DeviceKernels* k = device_kernels(x.device());
  return k != nullptr && k->layer_norm_to != nullptr;
}
}  // namespace detail

// Batch normalisation of x [N, C, *] per channel. training: normalise with the batch mean and
// biased variance, and (when given) update running_mean / running_var in place with the
// unbiased variance: r = (1 - momentum) r + momentum stat, as PyTorch. eval: normalise with the
// running statistics. weight / bias are optional ([C]); the running buffers keep their dtype
// (float32 even for 16-bit x) and are never part of the graph.
namespace detail {
// batch_norm, and with relu batch_norm_relu through its own kernels (the caller checked the
// device has them): one op body, so both take the same checks, policy and saved tensors.
inline Tensor batch_norm_op(const Tensor& x, const Tensor& running_mean, const Tensor& running_var, const Tensor& weight,
                            const Tensor& bias, bool training, double momentum, double eps, bool relu) {
  // The running buffers are captured, not dispatched: autocast must not hand the kernel a cast
  // copy of a buffer that is updated in place (a bfloat16 model's buffers would never move).
  return dispatch(OpId::batch_norm, [training, momentum, eps, running_mean, running_var, relu](const Tensor& x, const Tensor& weight,
                                                                                            const Tensor& bias) {
    MIXPREC_CHECK(x.defined() && x.dim() >= 2, "batch_norm: expected an input of shape [N, C, *], got ",
                  x.defined() ? x.sizes() : Shape{});
    MIXPREC_CHECK(x.is_floating_point(), "batch_norm: expected a floating-point input, got ", x.dtype(), " of shape ", x.sizes());
    MIXPREC_CHECK(eps >= 0, "batch_norm: eps must be non-negative, got ", eps);
    const int64_t N = x.size(0), C = x.size(1), S = N * C == 0 ? 0 : x.numel() / (N * C), M = N * S;
    detail::norm_check_param("batch_norm", weight, "weight", C, x);
    detail::norm_check_param("batch_norm", bias, "bias", C, x);
    detail::norm_check_param("batch_norm", running_mean, "running_mean", C, x);
    detail::norm_check_param("batch_norm", running_var, "running_var", C, x);
    MIXPREC_CHECK(running_mean.defined() == running_var.defined(),
                  "batch_norm: running_mean and running_var must be given together (or both omitted)");
    MIXPREC_CHECK(training || running_mean.defined(), "batch_norm: running_mean and running_var are required in eval mode (input shape ",
                  x.sizes(), ")");
    MIXPREC_CHECK(!training || M > 1, "batch_norm: expected more than 1 value per channel when training, got input shape ", x.sizes());
    // The CPU kernel also takes [N, C, *] and running statistics of any floating dtype and stride
    // (device.hpp); a device's kernel takes NCHW and updates float32 buffers in place.
    if (x.device() != Device::CPU) {
      MIXPREC_CHECK(x.dim() == 4, "batch_norm: on ", x.device(), " the input must be [N, C, H, W], got shape ", x.sizes());
      for (const Tensor* r : {&running_mean, &running_var})
        MIXPREC_CHECK(!r->defined() || (r->dtype() == DType::Float32 && r->is_contiguous()), "batch_norm: on ", x.device(),
                      " the running statistics must be contiguous float32 (they are updated in place), got ", r->dtype(), " ",
                      r->sizes());
    }
    const auto kernel = relu ? detail::device_kernel("batch_norm_relu", x, &DeviceKernels::batch_norm_relu)
                             : detail::device_kernel("batch_norm", x, &DeviceKernels::batch_norm);
    const Device d = x.device();
    // The kernels take [C] parameters in float32, as cuDNN does (float64 for a float64 input, whose
    // CPU kernel reads them as doubles): 16-bit weights are widened and their gradients rounded back.
    const DType pd = detail::norm_param_dtype(x);
    auto param = [&](const Tensor& t, double fill) { return t.defined() ? detail::contiguous_raw(t, pd) : full({C}, fill, pd, d); };
    const Tensor w = param(weight, 1.0), b = param(bias, 0.0);
    // Statistics are still computed without running buffers, into scratch ones.
    const Tensor rm = running_mean.defined() ? running_mean : zeros({C}, DType::Float32, d);
    const Tensor rv = running_var.defined() ? running_var : ones({C}, DType::Float32, d);
    // A backend with channels_last takes a channels-last x as it is (no reorder), and returns y so.
    const MemoryFormat f = x.dim() == 4 ? detail::kernel_layout(x) : MemoryFormat::Contiguous;
    const auto [y, save_mean, save_invstd] = kernel(detail::layout_raw(x, f), w, b, rm, rv, training, momentum, eps);
    if (training) {  // buffer updates, not differentiable ops; the version bump flags any graph that saved the old values
      if (running_mean.defined()) running_mean.bump_version();
      if (running_var.defined()) running_var.bump_version();
    }
    if (autograd::should_record({x, weight, bias}))
      autograd::record(relu ? "batch_norm_relu" : "batch_norm", {x, running_mean, running_var, weight, bias}, {y},
                       [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(w), sy = relu ? autograd::SavedTensor(y) : autograd::SavedTensor(),
                        save_mean, save_invstd, training, eps, f, relu,
                        wd = weight.defined() ? weight.dtype() : DType::Float32, bd = bias.defined() ? bias.dtype() : DType::Float32,
                        has_w = weight.defined(), has_b = bias.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const char* op = relu ? "batch_norm_relu" : "batch_norm";
                         const Tensor& x = sx.get(op);
                         // Eval mode's gradient has its own entry (the statistics are constants); CUDA has none yet.
                         const DeviceKernels* k = device_kernels(x.device());
                         MIXPREC_CHECK(training || (k != nullptr && k->batch_norm_backward_eval != nullptr), op, ": backward in eval mode has no ",
                                       x.device(), " kernel yet; run the frozen layers under no_grad or on the CPU");
                         Tensor gy = detail::layout_raw(detail::expand_raw(detail::as_dtype_raw(g[0], x.dtype()), x.sizes()), f);
                         const Tensor w = sw.get(op), xl = detail::layout_raw(x, f);
                         const Tensor yl = relu ? detail::layout_raw(sy.get(op), f) : Tensor();
                         // Eval mode with relu: relu's own backward first (eval is not the step that needs the speed).
                         if (relu && !training) gy = detail::device_kernel("relu", yl, &DeviceKernels::unary_backward)(DeviceUnary::Relu, gy, yl, yl);
                         const auto r = training ? relu ? detail::device_kernel(op, x, &DeviceKernels::batch_norm_relu_backward)(
                                                              xl, gy, yl, w, save_mean, save_invstd, eps)
                                                        : detail::device_kernel("batch_norm_backward", x, &DeviceKernels::batch_norm_backward)(
                                                              xl, gy, w, save_mean, save_invstd, eps)
                                                 : k->batch_norm_backward_eval(xl, gy, w, save_mean, save_invstd);
                         return {r[0], Tensor(), Tensor(), has_w ? detail::as_dtype_raw(r[1], wd) : Tensor(),
                                 has_b ? detail::as_dtype_raw(r[2], bd) : Tensor()};
                       });
    return y;
  }, x, weight, bias);
}
}  // namespace detail

inline Tensor batch_norm(const Tensor& x, const Tensor& running_mean, const Tensor& running_var, const Tensor& weight = Tensor(),
                         const Tensor& bias = Tensor(), bool training = false, double momentum = 0.1, double eps = 1e-5) {
  return detail::batch_norm_op(x, running_mean, running_var, weight, bias, training, momentum, eps, false);
}

// relu(batch_norm(...)) -- conv-BN-ReLU's second half -- with the ReLU applied by the batch-norm
// kernel as it writes y, and its mask applied as the backward reads the gradient: one pass over
// the activation fewer each way. Same results, bit for bit, as the two ops; a device without the
// fused kernels (DeviceKernels::batch_norm_relu) runs the two ops.
inline Tensor batch_norm_relu(const Tensor& x, const Tensor& running_mean, const Tensor& running_var, const Tensor& weight = Tensor(),
                              const Tensor& bias = Tensor(), bool training = false, double momentum = 0.1, double eps = 1e-5) {
  const DeviceKernels* k = x.defined() ? device_kernels(x.device()) : nullptr;
  if (k == nullptr || k->batch_norm_relu == nullptr || k->batch_norm_relu_backward == nullptr)
    return relu(batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps));
  return detail::batch_norm_op(x, running_mean, running_var, weight, bias, training, momentum, eps, true);
}

// Normalises over the trailing dims given by normalized_shape; weight / bias (optional) have
// that shape.
inline Tensor layer_norm(const Tensor& x, const Shape& normalized_shape, const Tensor& weight = Tensor(), const Tensor& bias = Tensor(),
                         double eps = 1e-5) {
  std::optional<DType> out_dtype;  // set: a device kernel writes y in this dtype (layer_norm_fuses_cast)
  auto impl = [normalized_shape, eps, &out_dtype](const Tensor& x, const Tensor& weight, const Tensor& bias) {
    const int64_t k = static_cast<int64_t>(normalized_shape.size());
    MIXPREC_CHECK(x.defined() && x.is_floating_point(), "layer_norm: expected a floating-point input, got ",
                  x.defined() ? name(x.dtype()) : "undefined");
    MIXPREC_CHECK(k >= 1, "layer_norm: normalized_shape must have at least one dimension, got ", normalized_shape);
    MIXPREC_CHECK(x.dim() >= k && Shape(x.sizes().end() - k, x.sizes().end()) == normalized_shape, "layer_norm: input of shape ",
                  x.sizes(), " does not end with normalized_shape ", normalized_shape);
    MIXPREC_CHECK(eps >= 0, "layer_norm: eps must be non-negative, got ", eps);
    for (const Tensor* p : {&weight, &bias}) {
      if (!p->defined()) continue;
      MIXPREC_CHECK(p->is_floating_point() && p->sizes() == normalized_shape, "layer_norm: ", p == &weight ? "weight" : "bias",
                    " of shape ", p->sizes(), " (", p->dtype(), ") must be floating-point with normalized_shape ", normalized_shape);
    }
    const char* op = "layer_norm";
    (void)detail::common_device(op, {&x, &weight, &bias});
    const int64_t D = numel_of(normalized_shape), M = D == 0 ? 0 : x.numel() / D;
    // The kernels take [D] parameters in float32 (float64 for a float64 input, whose CPU kernel
    // reads them as doubles): 16-bit weights are widened and their gradients rounded back.
    const DType pd = detail::norm_param_dtype(x);
    auto param = [&](const Tensor& t) { return t.defined() ? detail::reshape_raw(detail::as_dtype_raw(t, pd), {D}) : Tensor(); };
    const Tensor w = param(weight), b = param(bias);
    // out_dtype: y's dtype when it is not x's (layer_norm_fuses_cast), through the table's
    // layer_norm_to; the backward then hands the kernel the gradient in y's dtype, not a copy cast to x's.
    const bool mixed = out_dtype && *out_dtype != x.dtype();
    const Tensor x2 = detail::reshape_raw(x, {M, D});
    const auto [y2, mean, rstd] = mixed ? detail::device_kernel(op, x, &DeviceKernels::layer_norm_to)(x2, w, b, eps, *out_dtype)
                                        : detail::device_kernel(op, x, &DeviceKernels::layer_norm)(x2, w, b, eps);
    const Tensor y = detail::reshape_raw(y2, x.sizes());
    if (autograd::should_record({x, weight, bias}))
      autograd::record(op, {x, weight, bias}, {y},
                       [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(w), mean, rstd, M, D, normalized_shape,
                        gd = mixed ? *out_dtype : x.dtype(), wd = weight.defined() ? weight.dtype() : DType::Float32,
                        bd = bias.defined() ? bias.dtype() : DType::Float32, has_w = weight.defined(),
                        has_b = bias.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("layer_norm");
                         const Tensor gy =
                             detail::reshape_raw(detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], gd), x.sizes())), {M, D});
                         const auto r = detail::device_kernel("layer_norm_backward", x, &DeviceKernels::layer_norm_backward)(
                             detail::reshape_raw(x, {M, D}), gy, sw.get("layer_norm"), mean, rstd);
                         return {detail::reshape_raw(r[0], x.sizes()),
                                 has_w ? detail::reshape_raw(detail::as_dtype_raw(r[1], wd), normalized_shape) : Tensor(),
                                 has_b ? detail::reshape_raw(detail::as_dtype_raw(r[2], bd), normalized_shape) : Tensor()};
                       });
    return y;
  };
  if (detail::layer_norm_fuses_cast(x)) {  // the body below dispatch, with autocast's own bookkeeping
    out_dtype = autocast::dtype(x.device());
    amp::detail::Suppress inner;
    Tensor y = impl(x, weight, bias);
    amp::detail::trace_record(OpId::layer_norm, y);
    anomaly::detail::check_forward(OpId::layer_norm, out_dtype, y, x, weight, bias);
    return y;
  }
  return dispatch(OpId::layer_norm, impl, x, weight, bias);
}

// Normalises x [N, C, *] over each of num_groups groups of C / num_groups channels (and all
// spatial positions); weight / bias (optional) are per channel.
inline Tensor group_norm(const Tensor& x, int64_t num_groups, const Tensor& weight = Tensor(), const Tensor& bias = Tensor(),
                         double eps = 1e-5) {
  return dispatch(OpId::group_norm, [num_groups, eps](const Tensor& x, const Tensor& weight, const Tensor& bias) {
    MIXPREC_CHECK(x.defined() && x.dim() >= 2, "group_norm: expected an input of shape [N, C, *], got ",
                  x.defined() ? x.sizes() : Shape{});
    MIXPREC_CHECK(x.is_floating_point(), "group_norm: expected a floating-point input, got ", x.dtype(), " of shape ", x.sizes());
    const int64_t C = x.size(1);
    MIXPREC_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm: expected the ", C, " channels of input shape ", x.sizes(),
                  " to be divisible by num_groups, got num_groups = ", num_groups);
    MIXPREC_CHECK(eps >= 0, "group_norm: eps must be non-negative, got ", eps);
    detail::norm_check_param("group_norm", weight, "weight", C, x);
    detail::norm_check_param("group_norm", bias, "bias", C, x);
    detail::require_cpu("group_norm", x);
    const int64_t G = num_groups;
    const auto [y, mean_t, rstd_t] =
        detail::device_kernel("group_norm", x, &DeviceKernels::group_norm)(detail::contiguous_raw(x), weight, bias, G, eps);
    if (autograd::should_record({x, weight, bias}))
      autograd::record("group_norm", {x, weight, bias}, {y},
                       [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(weight), mean_t, rstd_t, G,
                        wd = weight.defined() ? weight.dtype() : DType::Float32, bd = bias.defined() ? bias.dtype() : DType::Float32,
                        has_w = weight.defined(), has_b = bias.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("group_norm");
                         const Tensor gc = detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], x.dtype()), x.sizes()));
                         const auto r = detail::device_kernel("group_norm_backward", x, &DeviceKernels::group_norm_backward)(
                             detail::contiguous_raw(x), gc, sw.get("group_norm"), mean_t, rstd_t, G);
                         return {r[0], has_w ? detail::as_dtype_raw(r[1], wd) : Tensor(), has_b ? detail::as_dtype_raw(r[2], bd) : Tensor()};
                       });
    return y;
  }, x, weight, bias);
}

}  // namespace mixprec
