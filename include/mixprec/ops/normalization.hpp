#pragma once
// batch_norm, layer_norm, group_norm. batch_norm and layer_norm reach their kernels through the
// device's kernel table on every device (the CPU's in backends/cpu/norm.hpp, CUDA's in
// backends/cuda/norm.cuh); their bodies here hold the checks, the autocast policy and autograd.
// group_norm (no table entry) keeps its CPU kernel here: statistics accumulate in double (8
// independent partial sums, so the loop pipelines without -ffast-math), the normalisation runs in
// acc_t<T> and rounds once on store. Mean and 1/std are saved for backward, which uses the
// closed-form gradients (one pass for the sums, one to write dx); the double helpers below are
// shared with the CPU's float64 batch norm.
#include <cmath>

#include "mixprec/ops/conv.hpp"  // kernel_layout, layout_raw
#include "mixprec/ops/linalg.hpp"

namespace mixprec {

namespace detail {
// Values of a (possibly strided, any floating dtype) tensor as doubles; empty when undefined.
inline std::vector<double> norm_to_vec(const Tensor& t) {
  std::vector<double> v;
  if (!t.defined()) return v;
  const Tensor c = contiguous_raw(t);
  v.resize(static_cast<std::size_t>(c.numel()));
  dispatch_floating(c.dtype(), "normalization", [&]<class T>() {
    const T* p = c.data<T>();
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(static_cast<acc_t<T>>(p[i]));
  });
  return v;
}
inline Tensor norm_from_vec(const std::vector<double>& v, const Shape& shape, DType dt) {
  Tensor t = empty(shape, dt);
  dispatch_floating(dt, "normalization", [&]<class T>() {
    T* p = t.data<T>();
    for (std::size_t i = 0; i < v.size(); ++i) p[i] = static_cast<T>(static_cast<acc_t<T>>(v[i]));
  });
  return t;
}

template <class T>
double norm_sum(const T* p, int64_t n) {
  double a[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) a[k] += static_cast<double>(static_cast<acc_t<T>>(p[i + k]));
  for (; i < n; ++i) a[0] += static_cast<double>(static_cast<acc_t<T>>(p[i]));
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}
// Sum of squared deviations from `mean` (the second pass of a two-pass variance).
template <class T>
double norm_sqdev(const T* p, int64_t n, double mean) {
  double a[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const double d = static_cast<double>(static_cast<acc_t<T>>(p[i + k])) - mean;
      a[k] += d * d;
    }
  for (; i < n; ++i) {
    const double d = static_cast<double>(static_cast<acc_t<T>>(p[i])) - mean;
    a[0] += d * d;
  }
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}
// (sum g, sum g * (x - mean)) over a run.
template <class T>
std::pair<double, double> norm_grad_sums(const T* g, const T* x, int64_t n, double mean) {
  double a[8] = {}, b[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const double gv = static_cast<double>(static_cast<acc_t<T>>(g[i + k]));
      a[k] += gv;
      b[k] += gv * (static_cast<double>(static_cast<acc_t<T>>(x[i + k])) - mean);
    }
  for (; i < n; ++i) {
    const double gv = static_cast<double>(static_cast<acc_t<T>>(g[i]));
    a[0] += gv;
    b[0] += gv * (static_cast<double>(static_cast<acc_t<T>>(x[i])) - mean);
  }
  return {((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])),
          ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]))};
}

// x - mean in A with the double mean split into hi + lo: x - hi is exact for x near the mean
// (Sterbenz), so centring keeps the digits a float-rounded mean would lose when |mean| >> std.
template <class A>
struct NormCenter {
  A hi, lo;
  explicit NormCenter(double mean) : hi(static_cast<A>(mean)), lo(static_cast<A>(mean - static_cast<double>(hi))) {}
  A operator()(A x) const { return (x - hi) - lo; }
};

// out = (x - mean) * scale + shift over a run, in acc_t<T>.
template <class T>
void norm_affine_run(const T* x, T* y, int64_t n, double mean, double scale, double shift) {
  using A = acc_t<T>;
  const NormCenter<A> center(mean);
  const A s = static_cast<A>(scale), b = static_cast<A>(shift);
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(center(static_cast<A>(x[i])) * s + b);
}

inline void norm_check_param(const char* op, const Tensor& p, const char* what, int64_t C, const Tensor& x) {
  if (!p.defined()) return;
  MIXPREC_CHECK(p.is_floating_point(), op, ": ", what, " must be floating-point, got ", p.dtype());
  MIXPREC_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", what, " of shape ", p.sizes(), " does not match the ", C,
                " channels of input shape ", x.sizes(), " (expected [", C, "])");
  common_device(op, {&x, &p});
}

// Input gradient of batch/group norm for one run of x sharing (mean, rstd): in training mode
// dx = w rstd (g - sum_g / M - xhat sum_gxhat / M); in eval mode (stats are constants) w rstd g.
template <class T>
void norm_input_grad_run(const T* g, const T* x, T* gx, int64_t n, double mean, double rstd, double w, double sum_g,
                         double sum_gxc, double M, bool training) {
  using A = acc_t<T>;
  const double k = w * rstd;
  if (!training) {
    const A kk = static_cast<A>(k);
    for (int64_t i = 0; i < n; ++i) gx[i] = static_cast<T>(static_cast<A>(g[i]) * kk);
    return;
  }
  // dx = k g - k sum_g / M - k (x - mean) rstd^2 sum_gxc / M  =  k g + c1 (x - mean) + c0
  const double c1 = -k * rstd * rstd * sum_gxc / M;
  const double c0 = -k * sum_g / M;
  const A kk = static_cast<A>(k), a1 = static_cast<A>(c1), a0 = static_cast<A>(c0);
  const NormCenter<A> center(mean);
  for (int64_t i = 0; i < n; ++i) gx[i] = static_cast<T>(kk * static_cast<A>(g[i]) + a1 * center(static_cast<A>(x[i])) + a0);
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
    const int64_t N = x.size(0), C = x.size(1);
    MIXPREC_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm: expected the ", C, " channels of input shape ", x.sizes(),
                  " to be divisible by num_groups, got num_groups = ", num_groups);
    MIXPREC_CHECK(eps >= 0, "group_norm: eps must be non-negative, got ", eps);
    detail::norm_check_param("group_norm", weight, "weight", C, x);
    detail::norm_check_param("group_norm", bias, "bias", C, x);
    detail::require_cpu("group_norm", x);
    const int64_t G = num_groups, Cg = C / G, S = N * C == 0 ? 0 : x.numel() / (N * C), L = Cg * S;
    const Tensor xc = detail::contiguous_raw(x);
    Tensor y = empty(x.sizes(), x.dtype());
    Tensor mean_t = empty({N * G}, DType::Float64), rstd_t = empty({N * G}, DType::Float64);
    const std::vector<double> w = detail::norm_to_vec(weight), b = detail::norm_to_vec(bias);
    if (L > 0)
      dispatch_floating(x.dtype(), "group_norm", [&]<class T>() {
        const T* xp = xc.data<T>();
        T* yp = y.data<T>();
        double* mp = mean_t.data<double>();
        double* rp = rstd_t.data<double>();
        cpu::parallel_for(0, N * G, std::max<int64_t>(1, kParallelGrain / L), [&](int64_t rb, int64_t re) {
          for (int64_t r = rb; r < re; ++r) {
            const T* xr = xp + r * L;
            const double mu = detail::norm_sum(xr, L) / static_cast<double>(L);
            const double rs = 1.0 / std::sqrt(detail::norm_sqdev(xr, L, mu) / static_cast<double>(L) + eps);
            mp[r] = mu;
            rp[r] = rs;
            for (int64_t j = 0; j < Cg; ++j) {
              const int64_t c = (r % G) * Cg + j;
              detail::norm_affine_run(xr + j * S, yp + r * L + j * S, S, mu, rs * (w.empty() ? 1.0 : w[c]), b.empty() ? 0.0 : b[c]);
            }
          }
        });
      });
    if (autograd::should_record({x, weight, bias}))
      autograd::record("group_norm", {x, weight, bias}, {y},
                       [sx = autograd::SavedTensor(x), w, mean_t, rstd_t, N, C, G, Cg, S, L, wd = weight.defined() ? weight.dtype() : DType::Float32,
                        bd = bias.defined() ? bias.dtype() : DType::Float32, has_w = weight.defined(),
                        has_b = bias.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("group_norm");
                         const Tensor xc = detail::contiguous_raw(x);
                         const Tensor gc = detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], x.dtype()), x.sizes()));
                         Tensor gx = empty(x.sizes(), x.dtype());
                         // Per (n, c): sum g and sum g xhat; reduced over n for the weight / bias.
                         std::vector<double> sg(static_cast<std::size_t>(N * C)), sgh(static_cast<std::size_t>(N * C));
                         const double* mp = mean_t.data<double>();
                         const double* rp = rstd_t.data<double>();
                         if (L > 0)
                           dispatch_floating(x.dtype(), "group_norm_backward", [&]<class T>() {
                             const T* xp = xc.data<T>();
                             const T* gp = gc.data<T>();
                             T* o = gx.data<T>();
                             cpu::parallel_for(0, N * G, std::max<int64_t>(1, kParallelGrain / L), [&](int64_t rb, int64_t re) {
                               for (int64_t r = rb; r < re; ++r) {
                                 const int64_t n = r / G, c0 = (r % G) * Cg;
                                 double s1 = 0, s2 = 0;  // sum(g w), sum(g w xhat)
                                 for (int64_t j = 0; j < Cg; ++j) {
                                   const int64_t off = r * L + j * S;
                                   const auto [a, bb] = detail::norm_grad_sums(gp + off, xp + off, S, mp[r]);
                                   sg[n * C + c0 + j] = a;
                                   sgh[n * C + c0 + j] = bb * rp[r];
                                   const double wc = w.empty() ? 1.0 : w[c0 + j];
                                   s1 += wc * a;
                                   s2 += wc * bb * rp[r];
                                 }
                                 // dx = rstd (g w - s1 / L - xhat s2 / L) = k g + c1 (x - mean) + c0 per channel.
                                 using A = acc_t<T>;
                                 const double c1 = -rp[r] * rp[r] * s2 / static_cast<double>(L);
                                 const double cc = -rp[r] * s1 / static_cast<double>(L);
                                 const A a1 = static_cast<A>(c1), a0 = static_cast<A>(cc);
                                 const detail::NormCenter<A> center(mp[r]);
                                 for (int64_t j = 0; j < Cg; ++j) {
                                   const int64_t off = r * L + j * S;
                                   const A kk = static_cast<A>(rp[r] * (w.empty() ? 1.0 : w[c0 + j]));
                                   for (int64_t i = 0; i < S; ++i)
                                     o[off + i] = static_cast<T>(kk * static_cast<A>(gp[off + i]) + a1 * center(static_cast<A>(xp[off + i])) + a0);
                                 }
                               }
                             });
                           });
                         std::vector<double> gw(static_cast<std::size_t>(C), 0.0), gb(static_cast<std::size_t>(C), 0.0);
                         for (int64_t n = 0; n < N; ++n)
                           for (int64_t c = 0; c < C; ++c) {
                             gw[c] += sgh[n * C + c];
                             gb[c] += sg[n * C + c];
                           }
                         return {gx, has_w ? detail::norm_from_vec(gw, {C}, wd) : Tensor(), has_b ? detail::norm_from_vec(gb, {C}, bd) : Tensor()};
                       });
    return y;
  }, x, weight, bias);
}

}  // namespace mixprec
