#pragma once
// The CPU's normalisation kernels, the CPU backend's entries batch_norm, batch_norm_backward,
// batch_norm_backward_eval, layer_norm, layer_norm_backward, layer_norm_to, group_norm and
// group_norm_backward (backends/device.hpp). ops/normalization.hpp keeps the checks, the autocast
// policy and autograd for every device.
//
// What the CPU does beyond the entries' common contract (written in device.hpp): any floating
// dtype (float64 rows accumulate in double), batch norm over [N, C, *] with running statistics of
// any floating dtype and stride, statistics saved in float64, and parameter gradients summed in
// double and returned float64, so that the op's one rounding into the parameter's dtype is the
// only one.
#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "mixprec/backends/cpu/batch_norm_nhwc.hpp"
#include "mixprec/backends/cpu/elementwise.hpp"
#include "mixprec/backends/cpu/vec_math.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/conv.hpp"
#include "mixprec/ops/normalization.hpp"

namespace mixprec::cpu {

namespace norm_detail {
// Double-accumulating helpers of group norm and of batch norm's float64 path: 8 independent
// partial sums, so the loops pipeline without -ffast-math.

// Values of a (possibly strided, any floating dtype) tensor as doubles; empty when undefined.
inline std::vector<double> norm_to_vec(const Tensor& t) {
  std::vector<double> v;
  if (!t.defined()) return v;
  const Tensor c = mixprec::detail::contiguous_raw(t);
  v.resize(static_cast<std::size_t>(c.numel()));
  dispatch_floating(c.dtype(), "normalization", [&]<class T>() {
    const T* p = c.data<T>();
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(static_cast<acc_t<T>>(p[i]));
  });
  return v;
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

// layer_norm's CPU rows accumulate in acc_t<T> (float32 for 16-bit and float32 input: 16-lane
// partial sums and a two-pass variance keep the error near float rounding at these row lengths)
// so that every pass is a loop cpu::simd runs with AVX-512; 16-bit rows convert with
// SIMD on the way in and out. Missing weight / bias are ones / zeros, keeping the loops uniform.
template <class A>
std::vector<A> ln_params(const Tensor& p, int64_t D, double absent) {
  if (!p.defined()) return std::vector<A>(static_cast<std::size_t>(D), static_cast<A>(absent));
  const std::vector<double> v = norm_detail::norm_to_vec(p);
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
    // The outputs are distinct buffers; without ivdep every store might alias an input or a
    // captured scalar and the loop ran scalar (5% of a GPT-mini bf16 step).
#pragma GCC ivdep
    for (int64_t i = 0; i < D; ++i) {
      const A h = ((x[i] - hi) - lo) * rs;
      dx[i] = rs * (g[i] * w[i] - s1 - h * s2);
      gw[i] += g[i] * h;
      gb[i] += g[i];
    }
  });
}

// Batch norm's gradients for both modes (training: the batch statistics' terms; eval: the
// statistics are constants), from float64 [C] mean and 1/std.
inline std::array<Tensor, 3> batch_norm_grads(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& save_mean,
                                              const Tensor& save_invstd, bool training) {
  const int64_t N = x.size(0), C = x.size(1), S = N * C == 0 ? 0 : x.numel() / (N * C), M = N * S;
  const Tensor xc = mixprec::detail::contiguous_raw(x);
  const Tensor gc = mixprec::detail::contiguous_raw(grad);
  const std::vector<double> w = norm_detail::norm_to_vec(weight);
  const double* mean = save_mean.data<double>();
  const double* rstd = save_invstd.data<double>();
  Tensor gx = empty(x.sizes(), x.dtype());
  Tensor gw_t = empty({C}, DType::Float64), gb_t = empty({C}, DType::Float64);
  double* gw = gw_t.data<double>();
  double* gb = gb_t.data<double>();
  dispatch_floating(x.dtype(), "batch_norm_backward", [&]<class T>() {
    const T* xp = xc.data<T>();
    const T* gp = gc.data<T>();
    T* o = gx.data<T>();
    cpu::parallel_for(0, C, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(M, 1)), [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double sg = 0, sgx = 0;
        const NormCenter<float> center(mean[c]);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * S;
          std::pair<double, double> s;
          if constexpr (bn_float32_path<T>) s = bn_grad_sums_run(gp + off, xp + off, S, center);
          else s = norm_detail::norm_grad_sums(gp + off, xp + off, S, mean[c]);
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
          if constexpr (bn_float32_path<T>)
            bn_input_grad_run(gp + off, xp + off, o + off, S, center, kk, a1, a0);
          else
            norm_detail::norm_input_grad_run(gp + off, xp + off, o + off, S, mean[c], rstd[c], wc, sg, sgx, Md, training);
        }
      }
    });
  });
  return {gx, gw_t, gb_t};
}
}  // namespace norm_detail

// DeviceKernels::batch_norm. x [N, C, *] contiguous; weight, bias [C] (either may be undefined)
// and the running statistics (any floating dtype and stride) read as doubles. The running
// statistics are written in place without a version bump (the op bumps them, as for every
// device). Returns {y, mean, 1/std} as float64 [C] in both modes: eval mode's are the running
// statistics', which batch_norm_backward_eval takes.
inline std::array<Tensor, 3> batch_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                        const Tensor& running_var, bool training, double momentum, double eps) {
  using namespace norm_detail;
  const int64_t N = x.size(0), C = x.size(1), S = N * C == 0 ? 0 : x.numel() / (N * C), M = N * S;
  const Tensor xc = mixprec::detail::contiguous_raw(x);
  Tensor mean_t = empty({C}, DType::Float64), rstd_t = empty({C}, DType::Float64);
  double* mean = mean_t.data<double>();
  double* rstd = rstd_t.data<double>();
  const std::vector<double> w = norm_detail::norm_to_vec(weight), b = norm_detail::norm_to_vec(bias);
  Tensor y = empty(x.sizes(), x.dtype());
  dispatch_floating(x.dtype(), "batch_norm", [&]<class T>() {
    const T* xp = xc.data<T>();
    T* yp = y.data<T>();
    std::vector<double> var(training ? static_cast<std::size_t>(C) : 0);
    if (training) {
      cpu::parallel_for(0, C, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(M, 1)), [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          if constexpr (bn_float32_path<T>) {
            BnMoments mom;
            for (int64_t n = 0; n < N; ++n) bn_moments_run(xp + (n * C + c) * S, S, mom);
            mean[c] = mom.mean;
            var[c] = mom.m2 / static_cast<double>(M);
          } else {
            double s = 0;
            for (int64_t n = 0; n < N; ++n) s += norm_detail::norm_sum(xp + (n * C + c) * S, S);
            const double mu = s / static_cast<double>(M);
            double ss = 0;
            for (int64_t n = 0; n < N; ++n) ss += norm_detail::norm_sqdev(xp + (n * C + c) * S, S, mu);
            mean[c] = mu;
            var[c] = ss / static_cast<double>(M);
          }
          rstd[c] = 1.0 / std::sqrt(var[c] + eps);
        }
      });
    } else {
      const std::vector<double> rm = norm_detail::norm_to_vec(running_mean), rv = norm_detail::norm_to_vec(running_var);
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = rm[c];
        rstd[c] = 1.0 / std::sqrt(rv[c] + eps);
      }
    }
    cpu::parallel_for(0, N * C, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(S, 1)), [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        const int64_t c = r % C;
        const double scale = rstd[c] * (w.empty() ? 1.0 : w[c]), shift = b.empty() ? 0.0 : b[c];
        if constexpr (bn_float32_path<T>) {
          const NormCenter<float> center(mean[c]);
          const float sc = static_cast<float>(scale), sh = static_cast<float>(shift);
          bn_map_run(xp + r * S, yp + r * S, S, [&](float v) { return center(v) * sc + sh; });
        } else {
          norm_detail::norm_affine_run(xp + r * S, yp + r * S, S, mean[c], scale, shift);
        }
      }
    });
    if (training && running_mean.defined()) {
      // A buffer update, not a differentiable op: the storage is written directly.
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
      };
      update(running_mean, [&](int64_t c) { return mean[c]; });
      update(running_var, [&](int64_t c) { return var[c] * unbias; });
    }
  });
  return {y, mean_t, rstd_t};
}

// DeviceKernels::batch_norm_backward (training) and batch_norm_backward_eval: {dx in x's dtype,
// dweight, dbias float64 [C]} from batch_norm's float64 statistics.
inline std::array<Tensor, 3> batch_norm_backward(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& save_mean,
                                                 const Tensor& save_invstd, double /*eps: 1/std is saved*/) {
  return norm_detail::batch_norm_grads(x, grad, weight, save_mean, save_invstd, true);
}
inline std::array<Tensor, 3> batch_norm_backward_eval(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& mean,
                                                      const Tensor& invstd) {
  return norm_detail::batch_norm_grads(x, grad, weight, mean, invstd, false);
}

// DeviceKernels::layer_norm_to: x [M, D] contiguous, rows in acc_t of x's dtype, y written in
// `out`; weight, bias [D] (either may be undefined) of any floating dtype. Returns {y, mean, 1/std}
// with the statistics float64 [M] (the mean keeps its low digits for backward's centring).
inline std::array<Tensor, 3> layer_norm_to(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps, DType out) {
  using namespace norm_detail;
  const int64_t M = x.size(0), D = x.size(1);
  const Tensor xc = mixprec::detail::contiguous_raw(x);
  Tensor y = empty(x.sizes(), out);
  Tensor mean_t = empty({M}, DType::Float64), rstd_t = empty({M}, DType::Float64);
  dispatch_floating(x.dtype(), "layer_norm", [&]<class T>() {
    dispatch_floating(out, "layer_norm", [&]<class Y>() {
      using A = acc_t<T>;
      const std::vector<A> w = ln_params<A>(weight, D, 1), b = ln_params<A>(bias, D, 0);
      const T* xp = xc.data<T>();
      Y* yp = y.data<Y>();
      double* mp = mean_t.data<double>();
      double* rp = rstd_t.data<double>();
      cpu::parallel_for(0, M, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D, 1)), [&](int64_t rb, int64_t re) {
        std::vector<A> xbuf(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(D)),
            ybuf(std::is_same_v<Y, A> ? 0 : static_cast<std::size_t>(D));
        for (int64_t r = rb; r < re; ++r) {
          const A* xr = cpu::vec::load_row(xp + r * D, D, xbuf);
          A* yr;
          if constexpr (std::is_same_v<Y, A>) yr = yp + r * D;
          else yr = ybuf.data();
          std::tie(mp[r], rp[r]) = ln_forward_row(xr, yr, w.data(), b.data(), D, static_cast<A>(eps));
          cpu::vec::store_row(yr, yp + r * D, D);
        }
      });
    });
  });
  return {y, mean_t, rstd_t};
}
// DeviceKernels::layer_norm: y in x's dtype.
inline std::array<Tensor, 3> layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  return layer_norm_to(x, weight, bias, eps, x.dtype());
}

// DeviceKernels::layer_norm_backward: grad in y's dtype (x's, or layer_norm_to's `out`), dx in
// x's; dweight and dbias float64 [D], from fixed row chunks' acc_t partial sums added in double.
inline std::array<Tensor, 3> layer_norm_backward(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& mean,
                                                 const Tensor& rstd) {
  using namespace norm_detail;
  const int64_t M = x.size(0), D = x.size(1);
  const Tensor xc = mixprec::detail::contiguous_raw(x);
  const Tensor gc = mixprec::detail::contiguous_raw(grad);
  Tensor gx = empty(x.sizes(), x.dtype());
  Tensor gw_t = zeros({D}, DType::Float64), gb_t = zeros({D}, DType::Float64);
  double* gw = gw_t.data<double>();
  double* gb = gb_t.data<double>();
  dispatch_floating(x.dtype(), "layer_norm_backward", [&]<class T>() {
    dispatch_floating(gc.dtype(), "layer_norm_backward", [&]<class G>() {
      using A = acc_t<T>;
      const std::vector<A> w = ln_params<A>(weight, D, 1);
      const double* mp = mean.data<double>();
      const double* rp = rstd.data<double>();
      const T* xp = xc.data<T>();
      const G* gp = gc.data<G>();
      T* o = gx.data<T>();
      // Row ranges in fixed chunks, each with private weight/bias partial sums.
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(cpu::num_threads(), M));
      std::vector<std::vector<A>> pw(static_cast<std::size_t>(chunks)), pb(static_cast<std::size_t>(chunks));
      cpu::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
        std::vector<A> xbuf(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(D)),
            gbuf(std::is_same_v<G, A> ? 0 : static_cast<std::size_t>(D)), obuf(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(D));
        for (int64_t kc = kb; kc < ke; ++kc) {
          auto& aw = pw[kc];
          auto& ab = pb[kc];
          aw.assign(static_cast<std::size_t>(D), A(0));
          ab.assign(static_cast<std::size_t>(D), A(0));
          for (int64_t r = M * kc / chunks, re = M * (kc + 1) / chunks; r < re; ++r) {
            const A* xr = cpu::vec::load_row(xp + r * D, D, xbuf);
            const A* gr = cpu::vec::load_row(gp + r * D, D, gbuf);
            A* orow;
            if constexpr (std::is_same_v<T, A>) orow = o + r * D;
            else orow = obuf.data();
            ln_backward_row(xr, gr, orow, w.data(), aw.data(), ab.data(), D, mp[r], rp[r]);
            cpu::vec::store_row(orow, o + r * D, D);
          }
        }
      });
      for (int64_t kc = 0; kc < chunks; ++kc)
        for (int64_t i = 0; i < D; ++i) {
          gw[i] += pw[kc][i];
          gb[i] += pb[kc][i];
        }
    });
  });
  return {gx, gw_t, gb_t};
}

// Channels-last activations (the layout the convolutions return, DeviceKernels::channels_last):
// float32 and 16-bit inputs with float32 running statistics take the NHWC kernels
// (backends/cpu/batch_norm_nhwc.hpp); other cases run the NCHW kernels above on a reordered copy,
// their results put back in the caller's layout.
inline bool bn_takes_nhwc(const Tensor& x, const Tensor& rm, const Tensor& rv) {
  auto f32 = [](const Tensor& t) { return t.dtype() == DType::Float32 && t.is_contiguous(); };
  return x.dim() == 4 && x.is_contiguous(MemoryFormat::ChannelsLast) && x.dtype() != DType::Float64 && f32(rm) && f32(rv);
}
inline Tensor to_channels_last(const Tensor& t) { return mixprec::detail::layout_raw(t, MemoryFormat::ChannelsLast); }

inline std::array<Tensor, 3> batch_norm_any_layout(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                                   const Tensor& running_var, bool training, double momentum, double eps) {
  if (x.dim() != 4 || !x.is_contiguous(MemoryFormat::ChannelsLast))
    return cpu::batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps);
  if (bn_takes_nhwc(x, running_mean, running_var) && weight.dtype() == DType::Float32 && bias.dtype() == DType::Float32)
    return bn_nhwc::forward(x, mixprec::detail::contiguous_raw(weight), mixprec::detail::contiguous_raw(bias), running_mean, running_var,
                            training, momentum, eps);
  auto r = cpu::batch_norm(mixprec::detail::contiguous_raw(x), weight, bias, running_mean, running_var, training, momentum, eps);
  r[0] = to_channels_last(r[0]);
  return r;
}
// Saved statistics tell the kernels apart: the NHWC forward saves float32, the NCHW one float64.
inline std::array<Tensor, 3> batch_norm_backward_any_layout(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& save_mean,
                                                            const Tensor& save_invstd, double eps) {
  if (x.dim() != 4 || !x.is_contiguous(MemoryFormat::ChannelsLast)) return cpu::batch_norm_backward(x, grad, weight, save_mean, save_invstd, eps);
  if (save_mean.dtype() == DType::Float32 && weight.dtype() == DType::Float32)
    return bn_nhwc::backward(x, to_channels_last(grad), mixprec::detail::contiguous_raw(weight), save_mean, save_invstd);
  auto r = cpu::batch_norm_backward(mixprec::detail::contiguous_raw(x), mixprec::detail::contiguous_raw(grad), weight, save_mean, save_invstd, eps);
  r[0] = to_channels_last(r[0]);
  return r;
}
inline std::array<Tensor, 3> batch_norm_backward_eval_any_layout(const Tensor& x, const Tensor& grad, const Tensor& weight,
                                                                 const Tensor& mean, const Tensor& invstd) {
  const bool cl = x.dim() == 4 && x.is_contiguous(MemoryFormat::ChannelsLast);
  if (!cl) return cpu::batch_norm_backward_eval(x, grad, weight, mean, invstd);
  auto r = cpu::batch_norm_backward_eval(mixprec::detail::contiguous_raw(x), mixprec::detail::contiguous_raw(grad), weight,
                                    mean.dtype() == DType::Float64 ? mean : mixprec::detail::as_dtype_raw(mean, DType::Float64),
                                    invstd.dtype() == DType::Float64 ? invstd : mixprec::detail::as_dtype_raw(invstd, DType::Float64));
  r[0] = to_channels_last(r[0]);
  return r;
}

// batch_norm_relu: the NHWC kernel applies the ReLU as it writes y and masks the gradient as it
// reads it; other layouts and dtypes compose (the NCHW kernels, then relu's own kernels).
inline std::array<Tensor, 3> batch_norm_relu_any_layout(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                                        const Tensor& running_var, bool training, double momentum, double eps) {
  if (bn_takes_nhwc(x, running_mean, running_var) && weight.dtype() == DType::Float32 && bias.dtype() == DType::Float32)
    return bn_nhwc::forward(x, mixprec::detail::contiguous_raw(weight), mixprec::detail::contiguous_raw(bias), running_mean, running_var,
                            training, momentum, eps, true);
  auto r = batch_norm_any_layout(x, weight, bias, running_mean, running_var, training, momentum, eps);
  r[0] = unary_op(DeviceUnary::Relu, r[0]);
  return r;
}
inline std::array<Tensor, 3> batch_norm_relu_backward_any_layout(const Tensor& x, const Tensor& grad, const Tensor& y, const Tensor& weight,
                                                                 const Tensor& save_mean, const Tensor& save_invstd, double eps) {
  if (x.dim() == 4 && x.is_contiguous(MemoryFormat::ChannelsLast) && save_mean.dtype() == DType::Float32 &&
      weight.dtype() == DType::Float32 && y.dtype() == x.dtype())
    return bn_nhwc::backward(x, to_channels_last(grad), mixprec::detail::contiguous_raw(weight), save_mean, save_invstd, to_channels_last(y));
  return batch_norm_backward_any_layout(x, unary_backward_op(DeviceUnary::Relu, grad, y, y), weight, save_mean, save_invstd, eps);
}

// DeviceKernels::group_norm. x [N, C, *] contiguous, rows r = n G + group of L = C / G * S values:
// statistics in double, the normalisation in acc_t<T>, rounded once on store.
inline std::array<Tensor, 3> group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t G, double eps) {
  using namespace norm_detail;
  const int64_t N = x.size(0), C = x.size(1), Cg = C / G, S = N * C == 0 ? 0 : x.numel() / (N * C), L = Cg * S;
  Tensor y = empty(x.sizes(), x.dtype());
  Tensor mean_t = empty({N * G}, DType::Float64), rstd_t = empty({N * G}, DType::Float64);
  const std::vector<double> w = norm_to_vec(weight), b = norm_to_vec(bias);
  if (L > 0)
    dispatch_floating(x.dtype(), "group_norm", [&]<class T>() {
      const T* xp = x.data<T>();
      T* yp = y.data<T>();
      double* mp = mean_t.data<double>();
      double* rp = rstd_t.data<double>();
      parallel_for(0, N * G, std::max<int64_t>(1, kParallelGrain / L), [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; ++r) {
          const T* xr = xp + r * L;
          const double mu = norm_sum(xr, L) / static_cast<double>(L);
          const double rs = 1.0 / std::sqrt(norm_sqdev(xr, L, mu) / static_cast<double>(L) + eps);
          mp[r] = mu;
          rp[r] = rs;
          for (int64_t j = 0; j < Cg; ++j) {
            const int64_t c = (r % G) * Cg + j;
            norm_affine_run(xr + j * S, yp + r * L + j * S, S, mu, rs * (w.empty() ? 1.0 : w[c]), b.empty() ? 0.0 : b[c]);
          }
        }
      });
    });
  return {y, mean_t, rstd_t};
}

// DeviceKernels::group_norm_backward. x and grad contiguous [N, C, *]; {dx, dweight, dbias} with
// the parameter gradients float64 [C]: per (n, c) sums of g and g xhat, reduced over n in order.
inline std::array<Tensor, 3> group_norm_backward(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& mean,
                                                 const Tensor& rstd, int64_t G) {
  using namespace norm_detail;
  const int64_t N = x.size(0), C = x.size(1), Cg = C / G, S = N * C == 0 ? 0 : x.numel() / (N * C), L = Cg * S;
  const std::vector<double> w = norm_to_vec(weight);
  Tensor gx = empty(x.sizes(), x.dtype());
  std::vector<double> sg(static_cast<std::size_t>(N * C)), sgh(static_cast<std::size_t>(N * C));
  const double* mp = mean.data<double>();
  const double* rp = rstd.data<double>();
  if (L > 0)
    dispatch_floating(x.dtype(), "group_norm_backward", [&]<class T>() {
      const T* xp = x.data<T>();
      const T* gp = grad.data<T>();
      T* o = gx.data<T>();
      parallel_for(0, N * G, std::max<int64_t>(1, kParallelGrain / L), [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; ++r) {
          const int64_t n = r / G, c0 = (r % G) * Cg;
          double s1 = 0, s2 = 0;  // sum(g w), sum(g w xhat)
          for (int64_t j = 0; j < Cg; ++j) {
            const int64_t off = r * L + j * S;
            const auto [a, bb] = norm_grad_sums(gp + off, xp + off, S, mp[r]);
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
          const NormCenter<A> center(mp[r]);
          for (int64_t j = 0; j < Cg; ++j) {
            const int64_t off = r * L + j * S;
            const A kk = static_cast<A>(rp[r] * (w.empty() ? 1.0 : w[c0 + j]));
            for (int64_t i = 0; i < S; ++i)
              o[off + i] = static_cast<T>(kk * static_cast<A>(gp[off + i]) + a1 * center(static_cast<A>(xp[off + i])) + a0);
          }
        }
      });
    });
  Tensor gw = zeros({C}, DType::Float64), gb = zeros({C}, DType::Float64);
  double* gwp = gw.data<double>();
  double* gbp = gb.data<double>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      gwp[c] += sgh[n * C + c];
      gbp[c] += sg[n * C + c];
    }
  return {gx, gw, gb};
}

inline void fill_norm_kernels(DeviceKernels& t) {
  t.batch_norm_relu = &batch_norm_relu_any_layout;
  t.batch_norm_relu_backward = &batch_norm_relu_backward_any_layout;
  t.batch_norm = &batch_norm_any_layout;
  t.batch_norm_backward = &batch_norm_backward_any_layout;
  t.batch_norm_backward_eval = &batch_norm_backward_eval_any_layout;
  t.layer_norm = &layer_norm;
  t.layer_norm_backward = &layer_norm_backward;
  t.layer_norm_to = &layer_norm_to;
  t.group_norm = &group_norm;
  t.group_norm_backward = &group_norm_backward;
}

}  // namespace mixprec::cpu
