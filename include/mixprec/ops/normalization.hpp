#pragma once
// batch_norm, layer_norm, group_norm. batch/group norm statistics accumulate in double (8
// independent partial sums, so the loop pipelines without -ffast-math), layer_norm's in acc_t<T>
// (see ln_forward_row); the normalisation itself runs in acc_t<T>
// and rounds once on store. Mean and 1/std are saved for backward, which uses the closed-form
// gradients (one pass for the sums, one to write dx).
#include <cmath>

#include "mixprec/backends/cpu/vec_math.hpp"
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
// batch_norm on a device (arguments already checked): the kernel takes float32 [C] parameters
// and statistics, as cuDNN does, so 16-bit weights are widened and their gradients rounded back.
inline Tensor batch_norm_device(const Tensor& x, const Tensor& running_mean, const Tensor& running_var, const Tensor& weight,
                                const Tensor& bias, bool training, double momentum, double eps) {
  const char* op = "batch_norm";
  const Device d = x.device();
  const int64_t C = x.size(1);
  MIXPREC_CHECK(x.dim() == 4, op, ": on ", d, " the input must be [N, C, H, W], got shape ", x.sizes());
  for (const Tensor* r : {&running_mean, &running_var})
    MIXPREC_CHECK(!r->defined() || (r->dtype() == DType::Float32 && r->is_contiguous()), op, ": on ", d,
                  " the running statistics must be contiguous float32 (they are updated in place), got ", r->dtype(), " ", r->sizes());
  auto param = [&](const Tensor& t, double fill) {
    return t.defined() ? contiguous_raw(t, DType::Float32) : full({C}, fill, DType::Float32, d);
  };
  const Tensor w32 = param(weight, 1.0), b32 = param(bias, 0.0);
  // Statistics are still computed without running buffers, into scratch ones.
  const Tensor rm = running_mean.defined() ? running_mean : zeros({C}, DType::Float32, d);
  const Tensor rv = running_var.defined() ? running_var : ones({C}, DType::Float32, d);
  const auto [y, save_mean, save_invstd] =
      device_kernel(op, x, &DeviceKernels::batch_norm)(contiguous_raw(x), w32, b32, rm, rv, training, momentum, eps);
  if (training) {
    if (running_mean.defined()) running_mean.bump_version();
    if (running_var.defined()) running_var.bump_version();
  }
  if (autograd::should_record({x, weight, bias}))
    autograd::record(op, {x, running_mean, running_var, weight, bias}, {y},
                     [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(w32), save_mean, save_invstd, training, eps,
                      wd = weight.defined() ? weight.dtype() : DType::Float32, bd = bias.defined() ? bias.dtype() : DType::Float32,
                      has_w = weight.defined(), has_b = bias.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       const Tensor& x = sx.get("batch_norm");
                       MIXPREC_CHECK(training, "batch_norm: backward in eval mode has no ", x.device(),
                                     " kernel yet; run the frozen layers under no_grad or on the CPU");
                       const Tensor gy = contiguous_raw(expand_raw(as_dtype_raw(g[0], x.dtype()), x.sizes()));
                       const auto r = device_kernel("batch_norm_backward", x, &DeviceKernels::batch_norm_backward)(
                           contiguous_raw(x), gy, sw.get("batch_norm"), save_mean, save_invstd, eps);
                       return {r[0], Tensor(), Tensor(), has_w ? as_dtype_raw(r[1], wd) : Tensor(), has_b ? as_dtype_raw(r[2], bd) : Tensor()};
                     });
  return y;
}
}  // namespace detail

namespace detail {
// layer_norm's CPU rows accumulate in acc_t<T> (float32 for 16-bit and float32 input: 16-lane
// partial sums and a two-pass variance keep the error near float rounding at these row lengths)
// so that every pass is a loop cpu::simd runs with AVX-512; 16-bit rows convert with
// SIMD on the way in and out. Missing weight / bias are ones / zeros, keeping the loops uniform.
template <class A>
std::vector<A> ln_params(const std::vector<double>& v, int64_t D, double absent) {
  if (v.empty()) return std::vector<A>(static_cast<std::size_t>(D), static_cast<A>(absent));
  return std::vector<A>(v.begin(), v.end());
}
// y = (x - mean) rstd w + b over one row; returns the row's mean and rstd. The mean is a float
// sum's m0 plus the mean of x - m0 (c, nearly exact: x - m0 loses nothing for x near m0), so
// centring keeps its digits when |mean| >> std; mean = m0 + c is kept in double for backward.
template <class A>
std::pair<double, double> ln_forward_row(const A* x, A* y, const A* w, const A* b, int64_t D, A eps) {
  std::pair<double, double> stats;
  cpu::simd([&]() MIXPREC_SIMD_BODY {
    auto plus = [](A p, A q) { return p + q; };
    const A n = static_cast<A>(D);
    const A m0 = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) { return a + x[i]; }, plus) / n;
    const A c = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) { return a + (x[i] - m0); }, plus) / n;
    const A var = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) {
      const A d = (x[i] - m0) - c;
      return a + d * d;
    }, plus) / n;
    const A rs = A(1) / std::sqrt(var + eps);
    for (int64_t i = 0; i < D; ++i) y[i] = ((x[i] - m0) - c) * rs * w[i] + b[i];
    stats = {static_cast<double>(m0) + static_cast<double>(c), static_cast<double>(rs)};
  });
  return stats;
}
// dx over one row from the closed form dx = rstd (g w - mean(g w) - xhat mean(g w xhat)), and
// the row's share of the weight and bias gradients added to gw, gb.
template <class A>
void ln_backward_row(const A* x, const A* g, A* dx, const A* w, A* gw, A* gb, int64_t D, double mean, double rstd) {
  const NormCenter<A> center(mean);
  const A hi = center.hi, lo = center.lo, rs = static_cast<A>(rstd);
  cpu::simd([&]() MIXPREC_SIMD_BODY {
    auto plus = [](A p, A q) { return p + q; };
    const A n = static_cast<A>(D);
    const A s1 = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) { return a + g[i] * w[i]; }, plus) / n;
    const A s2 = cpu::vec::reduce<A>(D, A(0), [&](A a, int64_t i) { return a + g[i] * w[i] * (((x[i] - hi) - lo) * rs); }, plus) / n;
    for (int64_t i = 0; i < D; ++i) {
      const A h = ((x[i] - hi) - lo) * rs;
      dx[i] = rs * (g[i] * w[i] - s1 - h * s2);
      gw[i] += g[i] * h;
      gb[i] += g[i];
    }
  });
}
}  // namespace detail

namespace detail {
// layer_norm on a device (arguments already checked): x seen as [M, D]. As batch_norm's, the
// kernel takes float32 parameters, so 16-bit weights are widened and their gradients rounded back.
// `out`: y's dtype when it is not x's (layer_norm_fuses_cast), through the table's layer_norm_to;
// the backward then hands the kernel the gradient in y's dtype, not a copy cast to x's.
inline Tensor layer_norm_device(const Tensor& x, const Shape& normalized_shape, const Tensor& weight, const Tensor& bias, double eps,
                                std::optional<DType> out = std::nullopt) {
  const char* op = "layer_norm";
  (void)common_device(op, {&x, &weight, &bias});
  const int64_t D = numel_of(normalized_shape), M = D == 0 ? 0 : x.numel() / D;
  auto param = [&](const Tensor& t) { return t.defined() ? reshape_raw(as_dtype_raw(t, DType::Float32), {D}) : Tensor(); };
  const Tensor w32 = param(weight), b32 = param(bias);
  const bool mixed = out && *out != x.dtype();
  const auto [y, mean, rstd] = mixed ? device_kernel(op, x, &DeviceKernels::layer_norm_to)(reshape_raw(x, {M, D}), w32, b32, eps, *out)
                                     : device_kernel(op, x, &DeviceKernels::layer_norm)(reshape_raw(x, {M, D}), w32, b32, eps);
  const Tensor result = reshape_raw(y, x.sizes());
  if (autograd::should_record({x, weight, bias}))
    autograd::record(op, {x, weight, bias}, {result},
                     [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(w32), mean, rstd, M, D, normalized_shape,
                      gd = mixed ? *out : x.dtype(), wd = weight.defined() ? weight.dtype() : DType::Float32,
                      bd = bias.defined() ? bias.dtype() : DType::Float32, has_w = weight.defined(),
                      has_b = bias.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       const Tensor& x = sx.get("layer_norm");
                       const Tensor gy = reshape_raw(contiguous_raw(expand_raw(as_dtype_raw(g[0], gd), x.sizes())), {M, D});
                       const auto r = device_kernel("layer_norm_backward", x, &DeviceKernels::layer_norm_backward)(
                           reshape_raw(x, {M, D}), gy, sw.get("layer_norm"), mean, rstd);
                       return {reshape_raw(r[0], x.sizes()), has_w ? reshape_raw(as_dtype_raw(r[1], wd), normalized_shape) : Tensor(),
                               has_b ? reshape_raw(as_dtype_raw(r[2], bd), normalized_shape) : Tensor()};
                     });
  return result;
}

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

namespace detail {
// batch_norm's float32 path (float32 and 16-bit inputs): runs are read in blocks of kBnBlock
// widened by the vectorised convert, summed in kBnLanes float32 partial sums (a loop the
// compiler vectorises without -ffast-math), and the block results combined in double, so the
// rounding error is that of one block-long float32 sum. double inputs keep the norm_* helpers.
inline constexpr int64_t kBnBlock = 512;
inline constexpr int kBnLanes = 16;

template <class T>
inline constexpr bool bn_float32_path = std::is_same_v<acc_t<T>, float>;

// p[0, n) as float32: p itself for float, else widened into buf.
template <class T>
const float* bn_load(const T* p, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) return p;
  else {
    convert(p, buf, n);
    return buf;
  }
}

inline float bn_lanes_total(const float (&a)[kBnLanes]) {
  float s = 0;
  for (float v : a) s += v;
  return s;
}

// Running (count, mean, sum of squared deviations) of one channel, merged block by block
// (Chan et al.), so the variance never subtracts two large sums.
struct BnMoments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {
    const double tot = n + nb, d = mb - mean;
    mean += d * nb / tot;
    m2 += m2b + d * d * n * nb / tot;
    n = tot;
  }
};

// Adds a run of n values to the moments.
template <class T>
void bn_moments_run(const T* x, int64_t n, BnMoments& mom) {
  alignas(64) float buf[kBnBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBnBlock) {
    const int64_t m = std::min(kBnBlock, n - i0);
    const float* v = bn_load(x + i0, buf, m);
    // Deviations from a pivot (the block's first value) are small where |mean| >> std, so their
    // float32 sum keeps the mean's low digits.
    const float p = v[0];
    float a[kBnLanes] = {};
    int64_t i = 0;
    for (; i + kBnLanes <= m; i += kBnLanes)
      for (int k = 0; k < kBnLanes; ++k) a[k] += v[i + k] - p;
    for (; i < m; ++i) a[i % kBnLanes] += v[i] - p;
    const float dm = bn_lanes_total(a) / static_cast<float>(m);  // block mean - p
    float q[kBnLanes] = {};
    for (i = 0; i + kBnLanes <= m; i += kBnLanes)
      for (int k = 0; k < kBnLanes; ++k) {
        const float d = (v[i + k] - p) - dm;
        q[k] += d * d;
      }
    for (; i < m; ++i) q[i % kBnLanes] += ((v[i] - p) - dm) * ((v[i] - p) - dm);
    mom.merge(static_cast<double>(m), static_cast<double>(p) + static_cast<double>(dm), static_cast<double>(bn_lanes_total(q)));
  }
}

// y = f(x) element-wise over a run in float32, x and y of type T (rounded once on store).
template <class T, class F>
void bn_map_run(const T* x, T* y, int64_t n, F f) {
  alignas(64) float buf[kBnBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBnBlock) {
    const int64_t m = std::min(kBnBlock, n - i0);
    const float* v = bn_load(x + i0, buf, m);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < m; ++i) y[i0 + i] = f(v[i]);
    } else {
      for (int64_t i = 0; i < m; ++i) buf[i] = f(v[i]);
      convert(buf, y + i0, m);
    }
  }
}

// (sum g, sum g * (x - mean)) over a run, float32 within blocks.
template <class T>
std::pair<double, double> bn_grad_sums_run(const T* g, const T* x, int64_t n, const NormCenter<float>& center) {
  alignas(64) float gb[kBnBlock], xb[kBnBlock];
  double sg = 0, sgx = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBnBlock) {
    const int64_t m = std::min(kBnBlock, n - i0);
    const float* gv = bn_load(g + i0, gb, m);
    const float* xv = bn_load(x + i0, xb, m);
    float a[kBnLanes] = {}, b[kBnLanes] = {};
    int64_t i = 0;
    for (; i + kBnLanes <= m; i += kBnLanes)
      for (int k = 0; k < kBnLanes; ++k) {
        a[k] += gv[i + k];
        b[k] += gv[i + k] * center(xv[i + k]);
      }
    for (; i < m; ++i) {
      a[i % kBnLanes] += gv[i];
      b[i % kBnLanes] += gv[i] * center(xv[i]);
    }
    sg += static_cast<double>(bn_lanes_total(a));
    sgx += static_cast<double>(bn_lanes_total(b));
  }
  return {sg, sgx};
}

// dx = kk g + a1 (x - mean) + a0 over a run (norm_input_grad_run's training form), float32.
template <class T>
void bn_input_grad_run(const T* g, const T* x, T* gx, int64_t n, const NormCenter<float>& center, float kk, float a1, float a0) {
  alignas(64) float gb[kBnBlock], xb[kBnBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBnBlock) {
    const int64_t m = std::min(kBnBlock, n - i0);
    const float* gv = bn_load(g + i0, gb, m);
    const float* xv = bn_load(x + i0, xb, m);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < m; ++i) gx[i0 + i] = kk * gv[i] + a1 * center(xv[i]) + a0;
    } else {
      for (int64_t i = 0; i < m; ++i) xb[i] = kk * gv[i] + a1 * center(xv[i]) + a0;
      convert(xb, gx + i0, m);
    }
  }
}
}  // namespace detail

// Batch normalisation of x [N, C, *] per channel. training: normalise with the batch mean and
// biased variance, and (when given) update running_mean / running_var in place with the
// unbiased variance: r = (1 - momentum) r + momentum stat, as PyTorch. eval: normalise with the
// running statistics. weight / bias are optional ([C]); the running buffers keep their dtype
// (float32 even for 16-bit x) and are never part of the graph.
inline Tensor batch_norm(const Tensor& x, const Tensor& running_mean, const Tensor& running_var, const Tensor& weight = Tensor(),
                         const Tensor& bias = Tensor(), bool training = false, double momentum = 0.1, double eps = 1e-5) {
  // The running buffers are captured, not dispatched: autocast must not hand the kernel a cast
  // copy of a buffer that is updated in place (a bfloat16 model's buffers would never move).
  return dispatch(OpId::batch_norm, [training, momentum, eps, running_mean, running_var](const Tensor& x, const Tensor& weight,
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
    if (x.device() != Device::CPU) return detail::batch_norm_device(x, running_mean, running_var, weight, bias, training, momentum, eps);

    const Tensor xc = detail::contiguous_raw(x);
    std::vector<double> mean(static_cast<std::size_t>(C)), rstd(static_cast<std::size_t>(C));
    const std::vector<double> w = detail::norm_to_vec(weight), b = detail::norm_to_vec(bias);
    Tensor y = empty(x.sizes(), x.dtype());
    dispatch_floating(x.dtype(), "batch_norm", [&]<class T>() {
      const T* xp = xc.data<T>();
      T* yp = y.data<T>();
      std::vector<double> var(training ? static_cast<std::size_t>(C) : 0);
      if (training) {
        cpu::parallel_for(0, C, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(M, 1)), [&](int64_t cb, int64_t ce) {
          for (int64_t c = cb; c < ce; ++c) {
            if constexpr (detail::bn_float32_path<T>) {
              detail::BnMoments mom;
              for (int64_t n = 0; n < N; ++n) detail::bn_moments_run(xp + (n * C + c) * S, S, mom);
              mean[c] = mom.mean;
              var[c] = mom.m2 / static_cast<double>(M);
            } else {
              double s = 0;
              for (int64_t n = 0; n < N; ++n) s += detail::norm_sum(xp + (n * C + c) * S, S);
              const double mu = s / static_cast<double>(M);
              double ss = 0;
              for (int64_t n = 0; n < N; ++n) ss += detail::norm_sqdev(xp + (n * C + c) * S, S, mu);
              mean[c] = mu;
              var[c] = ss / static_cast<double>(M);
            }
            rstd[c] = 1.0 / std::sqrt(var[c] + eps);
          }
        });
      } else {
        const std::vector<double> rm = detail::norm_to_vec(running_mean), rv = detail::norm_to_vec(running_var);
        for (int64_t c = 0; c < C; ++c) {
          mean[c] = rm[c];
          rstd[c] = 1.0 / std::sqrt(rv[c] + eps);
        }
      }
      cpu::parallel_for(0, N * C, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(S, 1)), [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; ++r) {
          const int64_t c = r % C;
          const double scale = rstd[c] * (w.empty() ? 1.0 : w[c]), shift = b.empty() ? 0.0 : b[c];
          if constexpr (detail::bn_float32_path<T>) {
            const detail::NormCenter<float> center(mean[c]);
            const float sc = static_cast<float>(scale), sh = static_cast<float>(shift);
            detail::bn_map_run(xp + r * S, yp + r * S, S, [&](float v) { return center(v) * sc + sh; });
          } else {
            detail::norm_affine_run(xp + r * S, yp + r * S, S, mean[c], scale, shift);
          }
        }
      });
      if (training && running_mean.defined()) {
        // A buffer update, not a differentiable op: write the storage directly (the version bump
        // still flags any graph that saved the old values).
        const double unbias = static_cast<double>(M) / static_cast<double>(M - 1);
        auto update = [&](const Tensor& buf, auto stat) {
          dispatch_floating(buf.dtype(), "batch_norm", [&]<class R>() {
            R* p = buf.data<R>();
            const int64_t st = buf.stride(0);
            for (int64_t c = 0; c < C; ++c) {
              const double old = static_cast<double>(static_cast<acc_t<R>>(p[c * st]));
              p[c * st] = static_cast<R>(static_cast<acc_t<R>>((1.0 - momentum) * old + momentum * stat(c)));
            }
          });
          buf.bump_version();
        };
        update(running_mean, [&](int64_t c) { return mean[c]; });
        update(running_var, [&](int64_t c) { return var[c] * unbias; });
      }
    });

    if (autograd::should_record({x, weight, bias}))
      autograd::record("batch_norm", {x, running_mean, running_var, weight, bias}, {y},
                       [sx = autograd::SavedTensor(x), w, mean, rstd, training, N, C, S, M, wd = weight.defined() ? weight.dtype() : DType::Float32,
                        bd = bias.defined() ? bias.dtype() : DType::Float32, has_w = weight.defined(),
                        has_b = bias.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("batch_norm");
                         const Tensor xc = detail::contiguous_raw(x);
                         const Tensor gc = detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], x.dtype()), x.sizes()));
                         Tensor gx = empty(x.sizes(), x.dtype());
                         std::vector<double> gw(static_cast<std::size_t>(C)), gb(static_cast<std::size_t>(C));
                         dispatch_floating(x.dtype(), "batch_norm_backward", [&]<class T>() {
                           const T* xp = xc.data<T>();
                           const T* gp = gc.data<T>();
                           T* o = gx.data<T>();
                           cpu::parallel_for(0, C, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(M, 1)), [&](int64_t cb, int64_t ce) {
                             for (int64_t c = cb; c < ce; ++c) {
                               double sg = 0, sgx = 0;
                               const detail::NormCenter<float> center(mean[c]);
                               for (int64_t n = 0; n < N; ++n) {
                                 const int64_t off = (n * C + c) * S;
                                 std::pair<double, double> s;
                                 if constexpr (detail::bn_float32_path<T>) s = detail::bn_grad_sums_run(gp + off, xp + off, S, center);
                                 else s = detail::norm_grad_sums(gp + off, xp + off, S, mean[c]);
                                 sg += s.first;
                                 sgx += s.second;
                               }
                               gb[c] = sg;
                               gw[c] = sgx * rstd[c];
                               const double wc = w.empty() ? 1.0 : w[c];
                               // norm_input_grad_run's coefficients, in float32.
                               const double k = wc * rstd[c], Md = static_cast<double>(M);
                               const float kk = static_cast<float>(k), a1 = training ? static_cast<float>(-k * rstd[c] * rstd[c] * sgx / Md) : 0.0f,
                                           a0 = training ? static_cast<float>(-k * sg / Md) : 0.0f;
                               for (int64_t n = 0; n < N; ++n) {
                                 const int64_t off = (n * C + c) * S;
                                 if constexpr (detail::bn_float32_path<T>)
                                   detail::bn_input_grad_run(gp + off, xp + off, o + off, S, center, kk, a1, a0);
                                 else
                                   detail::norm_input_grad_run(gp + off, xp + off, o + off, S, mean[c], rstd[c], wc, sg, sgx, Md, training);
                               }
                             }
                           });
                         });
                         return {gx, Tensor(), Tensor(), has_w ? detail::norm_from_vec(gw, {C}, wd) : Tensor(),
                                 has_b ? detail::norm_from_vec(gb, {C}, bd) : Tensor()};
                       });
    return y;
  }, x, weight, bias);
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
    if (x.device() != Device::CPU) return detail::layer_norm_device(x, normalized_shape, weight, bias, eps, out_dtype);
    for (const Tensor* t : {&x, &weight, &bias})
      if (t->defined()) detail::require_cpu("layer_norm", *t);
    const int64_t D = numel_of(normalized_shape), M = D == 0 ? 0 : x.numel() / D;
    const Tensor xc = detail::contiguous_raw(x);
    Tensor y = empty(x.sizes(), x.dtype());
    Tensor mean_t = empty({M}, DType::Float64), rstd_t = empty({M}, DType::Float64);
    const std::vector<double> wv = detail::norm_to_vec(weight), bv = detail::norm_to_vec(bias);
    dispatch_floating(x.dtype(), "layer_norm", [&]<class T>() {
      using A = acc_t<T>;
      const std::vector<A> w = detail::ln_params<A>(wv, D, 1), b = detail::ln_params<A>(bv, D, 0);
      const T* xp = xc.data<T>();
      T* yp = y.data<T>();
      double* mp = mean_t.data<double>();
      double* rp = rstd_t.data<double>();
      cpu::parallel_for(0, M, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D, 1)), [&](int64_t rb, int64_t re) {
        const std::size_t n16 = std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(D);
        std::vector<A> xbuf(n16), ybuf(n16);
        for (int64_t r = rb; r < re; ++r) {
          const A* xr = cpu::vec::load_row(xp + r * D, D, xbuf);
          A* yr = std::is_same_v<T, A> ? reinterpret_cast<A*>(yp + r * D) : ybuf.data();
          std::tie(mp[r], rp[r]) = detail::ln_forward_row(xr, yr, w.data(), b.data(), D, static_cast<A>(eps));
          cpu::vec::store_row(yr, yp + r * D, D);
        }
      });
    });
    if (autograd::should_record({x, weight, bias}))
      autograd::record("layer_norm", {x, weight, bias}, {y},
                       [sx = autograd::SavedTensor(x), wv, mean_t, rstd_t, M, D, wd = weight.defined() ? weight.dtype() : DType::Float32,
                        bd = bias.defined() ? bias.dtype() : DType::Float32, has_w = weight.defined(), has_b = bias.defined(),
                        normalized_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("layer_norm");
                         const Tensor xc = detail::contiguous_raw(x);
                         const Tensor gc = detail::contiguous_raw(detail::expand_raw(detail::as_dtype_raw(g[0], x.dtype()), x.sizes()));
                         Tensor gx = empty(x.sizes(), x.dtype());
                         std::vector<double> gw(static_cast<std::size_t>(D), 0.0), gb(static_cast<std::size_t>(D), 0.0);
                         dispatch_floating(x.dtype(), "layer_norm_backward", [&]<class T>() {
                           using A = acc_t<T>;
                           const std::vector<A> w = detail::ln_params<A>(wv, D, 1);
                           const double* mp = mean_t.data<double>();
                           const double* rp = rstd_t.data<double>();
                           const T* xp = xc.data<T>();
                           const T* gp = gc.data<T>();
                           T* o = gx.data<T>();
                           // Row ranges in fixed chunks, each with private weight/bias partial sums.
                           const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(cpu::num_threads(), M));
                           std::vector<std::vector<A>> pw(static_cast<std::size_t>(chunks)), pb(static_cast<std::size_t>(chunks));
                           cpu::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
                             const std::size_t n16 = std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(D);
                             std::vector<A> xbuf(n16), gbuf(n16), obuf(n16);
                             for (int64_t kc = kb; kc < ke; ++kc) {
                               auto& aw = pw[kc];
                               auto& ab = pb[kc];
                               aw.assign(static_cast<std::size_t>(D), A(0));
                               ab.assign(static_cast<std::size_t>(D), A(0));
                               for (int64_t r = M * kc / chunks, re = M * (kc + 1) / chunks; r < re; ++r) {
                                 const A* xr = cpu::vec::load_row(xp + r * D, D, xbuf);
                                 const A* gr = cpu::vec::load_row(gp + r * D, D, gbuf);
                                 A* orow = std::is_same_v<T, A> ? reinterpret_cast<A*>(o + r * D) : obuf.data();
                                 detail::ln_backward_row(xr, gr, orow, w.data(), aw.data(), ab.data(), D, mp[r], rp[r]);
                                 cpu::vec::store_row(orow, o + r * D, D);
                               }
                             }
                           });
                           for (int64_t kc = 0; kc < chunks; ++kc)
                             for (int64_t i = 0; i < D; ++i) {
                               if (has_w) gw[i] += pw[kc][i];
                               if (has_b) gb[i] += pb[kc][i];
                             }
                         });
                         return {gx, has_w ? detail::norm_from_vec(gw, normalized_shape, wd) : Tensor(),
                                 has_b ? detail::norm_from_vec(gb, normalized_shape, bd) : Tensor()};
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
