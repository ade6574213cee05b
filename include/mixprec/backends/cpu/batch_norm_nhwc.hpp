#pragma once
// Batch norm of channels-last activations: x [N, C, H, W] stored as rows [N*H*W, C], so every
// pass streams whole rows and the per-channel work is a vector across C (cpu::simd: AVX-512 where
// the CPU has it). This is the layout oneDNN's convolutions return (backends/cpu/onednn.hpp); a
// network kept in it pays no reorder around its norms.
//
// Accuracy as the NCHW kernels: statistics in float32 within blocks of rows, each block's values
// taken relative to a pivot (its first row) and its moments merged in double (Chan et al.), so a
// variance never subtracts two large sums; the normalisation centres x on the double mean split
// into hi + lo and rounds once on store.
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/backends/cpu/simd.hpp"
#include "mixprec/dtype/convert.hpp"
#include "mixprec/dtype/dispatch.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::cpu::bn_nhwc {

namespace detail {
// Rows per block: a block of float32 rows stays within 64 KiB (L2-resident between its passes).
inline int64_t block_rows(int64_t C) { return std::max<int64_t>(1, (int64_t{16} << 10) / std::max<int64_t>(C, 1)); }

// A thread's float32 block buffers (slot 0-2), kept across calls: as per-call vectors their 64 KiB
// went back to the system from glibc's worker arenas and were faulted in again on every call
// (~470 page faults per ResNet-20 bf16 step).
inline std::vector<float>& scratch(int slot) {
  thread_local std::array<std::vector<float>, 3> buffers;
  return buffers[static_cast<std::size_t>(slot)];
}

// Rows [r0, r0 + m) of x as float32 (x itself when it is float32).
template <class T>
const float* rows_f32(const T* x, int64_t C, int64_t r0, int64_t m, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) return x + r0 * C;
  else {
    buf.resize(static_cast<std::size_t>(m * C));
    convert(x + r0 * C, buf.data(), m * C);
    return buf.data();
  }
}

// Gradient rows [r0, r0 + m) as float32; with y (batch_norm_relu's output), zeroed where y is not
// positive -- g * relu'(y), the product relu's backward would have written, read in the same pass.
// 16-bit y is tested on its bits (positive: sign clear, non-zero, not NaN), never widened.
template <class T>
const float* grad_rows(const T* g, const T* y, int64_t C, int64_t r0, int64_t m, std::vector<float>& gbuf) {
  const float* gv = rows_f32(g, C, r0, m, gbuf);
  if (!y) return gv;
  const int64_t n = m * C;
  if (static_cast<int64_t>(gbuf.size()) < n) gbuf.resize(static_cast<std::size_t>(n));  // float32 g was read in place
  float* o = gbuf.data();
  if constexpr (std::is_same_v<T, float>) {
    const float* yv = y + r0 * C;
    cpu::simd([&]() MIXPREC_SIMD_BODY {
      for (int64_t i = 0; i < n; ++i) o[i] = gv[i] * (yv[i] > 0.f ? 1.f : 0.f);
    });
  } else {
    const auto* yb = reinterpret_cast<const uint16_t*>(y + r0 * C);
    constexpr uint16_t inf = std::is_same_v<T, bfloat16> ? 0x7f80 : 0x7c00;
    cpu::simd([&]() MIXPREC_SIMD_BODY {
      for (int64_t i = 0; i < n; ++i) o[i] = gv[i] * (yb[i] != 0 && yb[i] <= inf ? 1.f : 0.f);
    });
  }
  return o;
}

// Per-channel (count, mean, m2) merged block by block, in double.
struct Moments {
  std::vector<double> n, mean, m2;
  explicit Moments(int64_t C) : n(C, 0.0), mean(C, 0.0), m2(C, 0.0) {}
  void merge(int64_t c, double nb, double mb, double m2b) {
    const double tot = n[c] + nb, d = mb - mean[c];
    mean[c] += d * nb / tot;
    m2[c] += m2b + d * d * n[c] * nb / tot;
    n[c] = tot;
  }
};

// Adds rows [r0, r1) of x to mom.
template <class T>
void moments_rows(const T* x, int64_t C, int64_t r0, int64_t r1, Moments& mom) {
  const int64_t R = block_rows(C);
  std::vector<float>& buf = scratch(0);
  std::vector<float> s(static_cast<std::size_t>(C)), q(static_cast<std::size_t>(C));
  for (int64_t b0 = r0; b0 < r1; b0 += R) {
    const int64_t m = std::min(R, r1 - b0);
    const float* v = rows_f32(x, C, b0, m, buf);
    float* sp = s.data();
    float* qp = q.data();
    cpu::simd([&]() MIXPREC_SIMD_BODY {
      // Deviations from the block's first row (the pivot) are small where |mean| >> std.
      for (int64_t c = 0; c < C; ++c) sp[c] = 0.f;
      for (int64_t i = 1; i < m; ++i)
        for (int64_t c = 0; c < C; ++c) sp[c] += v[i * C + c] - v[c];
      const float inv = 1.f / static_cast<float>(m);
      for (int64_t c = 0; c < C; ++c) {
        sp[c] *= inv;  // block mean - pivot
        qp[c] = 0.f;
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t c = 0; c < C; ++c) {
          const float d = (v[i * C + c] - v[c]) - sp[c];
          qp[c] += d * d;
        }
    });
    for (int64_t c = 0; c < C; ++c)
      mom.merge(c, static_cast<double>(m), static_cast<double>(v[c]) + static_cast<double>(sp[c]), static_cast<double>(qp[c]));
  }
}

// Threads for M rows of C: one per 32k elements, at most num_threads().
inline int64_t row_threads(int64_t M, int64_t C) {
  return std::max<int64_t>(1, std::min<int64_t>(cpu::num_threads(), M * C / (int64_t{1} << 15)));
}
// Splits rows across row_threads(M, C) ranges: f(r0, r1, range_index).
template <class F>
void for_row_ranges(int64_t M, int64_t C, F&& f) {
  const int64_t nt = row_threads(M, C);
  const int64_t per = (M + nt - 1) / nt;
  cpu::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t * per, std::min(M, (t + 1) * per), t);
  });
}

// out[row, c] = f(x[row, c], c) over all rows, in float32, rounded once into T.
template <class T, class Coef>
void affine_rows(const T* x, T* y, int64_t M, int64_t C, const Coef& coef) {
  for_row_ranges(M, C, [&](int64_t r0, int64_t r1, int64_t) {
    const int64_t R = block_rows(C);
    std::vector<float>& buf = scratch(0);
    std::vector<float>& out = scratch(1);
    for (int64_t b0 = r0; b0 < r1; b0 += R) {
      const int64_t m = std::min(R, r1 - b0);
      const float* v = rows_f32(x, C, b0, m, buf);
      float* o;
      if constexpr (std::is_same_v<T, float>) o = y + b0 * C;
      else {
        out.resize(static_cast<std::size_t>(m * C));
        o = out.data();
      }
      coef(v, o, m);
      if constexpr (!std::is_same_v<T, float>) convert(o, y + b0 * C, m * C);
    }
  });
}
}  // namespace detail

// Forward. x channels-last, any floating dtype but float64; weight, bias, running_mean,
// running_var float32 [C] (contiguous). training: batch statistics, running ones updated in place
// (unbiased variance); eval: running statistics. Returns {y, mean, 1/std} (float32 [C]) in both
// modes, as the NCHW kernel: eval mode's backward takes the running statistics' values.
// y is channels-last in x's dtype; relu: y = max(y, 0) (NaN kept, as relu) in the same pass.
inline std::array<Tensor, 3> forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                     const Tensor& running_var, bool training, double momentum, double eps, bool relu = false) {
  const int64_t N = x.size(0), C = x.size(1), M = N * x.size(2) * x.size(3);
  Tensor y = empty(x.sizes(), x.dtype(), Device::CPU, MemoryFormat::ChannelsLast);
  std::vector<double> mean(static_cast<std::size_t>(C)), invstd(static_cast<std::size_t>(C));
  const float* rm = running_mean.data<float>();
  const float* rv = running_var.data<float>();
  dispatch_floating(x.dtype(), "batch_norm", [&]<class T>() {
    if constexpr (std::is_same_v<T, double>) {
      MIXPREC_CHECK(false, "batch_norm: the channels-last kernel takes float32 and 16-bit inputs, got float64 of shape ", x.sizes());
    } else {
      const T* xp = x.data<T>();
      if (training) {
        std::vector<detail::Moments> parts(static_cast<std::size_t>(detail::row_threads(M, C)), detail::Moments(C));
        detail::for_row_ranges(M, C, [&](int64_t r0, int64_t r1, int64_t t) { detail::moments_rows(xp, C, r0, r1, parts[t]); });
        detail::Moments all(C);
        for (const detail::Moments& p : parts)
          for (int64_t c = 0; c < C; ++c)
            if (p.n[c] > 0) all.merge(c, p.n[c], p.mean[c], p.m2[c]);
        float* rmw = running_mean.data<float>();
        float* rvw = running_var.data<float>();
        for (int64_t c = 0; c < C; ++c) {
          const double var = all.m2[c] / static_cast<double>(M);
          mean[c] = all.mean[c];
          invstd[c] = 1.0 / std::sqrt(var + eps);
          rmw[c] = static_cast<float>((1 - momentum) * rmw[c] + momentum * mean[c]);
          rvw[c] = static_cast<float>((1 - momentum) * rvw[c] + momentum * all.m2[c] / static_cast<double>(M - 1));
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          mean[c] = rm[c];
          invstd[c] = 1.0 / std::sqrt(static_cast<double>(rv[c]) + eps);
        }
      }
      // y = ((x - hi) - lo) * scale + shift per channel.
      std::vector<float> hi(static_cast<std::size_t>(C)), lo(hi), scale(hi), shift(hi);
      const float* w = weight.data<float>();
      const float* b = bias.data<float>();
      for (int64_t c = 0; c < C; ++c) {
        hi[c] = static_cast<float>(mean[c]);
        lo[c] = static_cast<float>(mean[c] - static_cast<double>(hi[c]));
        scale[c] = static_cast<float>(invstd[c] * static_cast<double>(w[c]));
        shift[c] = b[c];
      }
      detail::affine_rows(xp, y.data<T>(), M, C, [&](const float* v, float* o, int64_t m) {
        const float *h = hi.data(), *l = lo.data(), *s = scale.data(), *sh = shift.data();
        if (relu)
          cpu::simd([&]() MIXPREC_SIMD_BODY {
            for (int64_t i = 0; i < m; ++i)
              for (int64_t c = 0; c < C; ++c) {
                const float a = ((v[i * C + c] - h[c]) - l[c]) * s[c] + sh[c];
                o[i * C + c] = a <= 0.f ? 0.f : a;  // fn::relu: NaN kept (the compare is false), -0 -> +0
              }
          });
        else
          cpu::simd([&]() MIXPREC_SIMD_BODY {
            for (int64_t i = 0; i < m; ++i)
              for (int64_t c = 0; c < C; ++c) o[i * C + c] = ((v[i * C + c] - h[c]) - l[c]) * s[c] + sh[c];
          });
      });
    }
  });
  Tensor sm = empty({C}, DType::Float32), si = empty({C}, DType::Float32);
  for (int64_t c = 0; c < C; ++c) {
    sm.data<float>()[c] = static_cast<float>(mean[c]);
    si.data<float>()[c] = static_cast<float>(invstd[c]);
  }
  return {y, sm, si};
}

// Training-mode backward: {dx (channels-last, x's dtype), dweight, dbias (float32 [C])} from x
// and grad (both channels-last, one dtype), weight and the forward's saved mean and 1/std. With
// relu_out (forward(relu = true)'s y), the gradient of batch_norm_relu: grad masked as it is read.
inline std::array<Tensor, 3> backward(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& save_mean,
                                      const Tensor& save_invstd, const Tensor& relu_out = Tensor()) {
  const int64_t N = x.size(0), C = x.size(1), M = N * x.size(2) * x.size(3);
  Tensor dx = empty(x.sizes(), x.dtype(), Device::CPU, MemoryFormat::ChannelsLast);
  Tensor dw = empty({C}, DType::Float32), db = empty({C}, DType::Float32);
  const float* w = weight.data<float>();
  const float* sm = save_mean.data<float>();
  const float* si = save_invstd.data<float>();
  std::vector<float> hi(static_cast<std::size_t>(C)), lo(hi);
  for (int64_t c = 0; c < C; ++c) {
    hi[c] = sm[c];
    lo[c] = 0.f;  // the saved mean is float32: hi is exact
  }
  dispatch_floating(x.dtype(), "batch_norm_backward", [&]<class T>() {
    if constexpr (std::is_same_v<T, double>) {
      MIXPREC_CHECK(false, "batch_norm_backward: the channels-last kernel takes float32 and 16-bit inputs, got float64 of shape ", x.sizes());
    } else {
      const T* xp = x.data<T>();
      const T* gp = grad.data<T>();
      const T* yp = relu_out.defined() ? relu_out.data<T>() : nullptr;
      // Pass 1: per channel sum(g) and sum(g (x - mean)), float32 per block, double across.
      const int64_t nt = detail::row_threads(M, C);
      std::vector<std::vector<double>> sg(static_cast<std::size_t>(nt), std::vector<double>(C, 0.0)), sgx(sg);
      detail::for_row_ranges(M, C, [&](int64_t r0, int64_t r1, int64_t t) {
        const int64_t R = detail::block_rows(C);
        std::vector<float>& xb = detail::scratch(0);
        std::vector<float>& gb = detail::scratch(1);
        std::vector<float> a(static_cast<std::size_t>(C)), b(a);
        for (int64_t b0 = r0; b0 < r1; b0 += R) {
          const int64_t m = std::min(R, r1 - b0);
          const float* xv = detail::rows_f32(xp, C, b0, m, xb);
          const float* gv = detail::grad_rows(gp, yp, C, b0, m, gb);
          float *ap = a.data(), *bp = b.data();
          const float* h = hi.data();
          cpu::simd([&]() MIXPREC_SIMD_BODY {
            for (int64_t c = 0; c < C; ++c) ap[c] = bp[c] = 0.f;
            for (int64_t i = 0; i < m; ++i)
              for (int64_t c = 0; c < C; ++c) {
                ap[c] += gv[i * C + c];
                bp[c] += gv[i * C + c] * (xv[i * C + c] - h[c]);
              }
          });
          for (int64_t c = 0; c < C; ++c) {
            sg[t][c] += ap[c];
            sgx[t][c] += bp[c];
          }
        }
      });
      std::vector<float> kk(static_cast<std::size_t>(C)), a1(kk), a0(kk);
      for (int64_t c = 0; c < C; ++c) {
        double g_sum = 0, gx_sum = 0;
        for (int64_t t = 0; t < nt; ++t) {
          g_sum += sg[t][c];
          gx_sum += sgx[t][c];
        }
        const double rstd = si[c], k = static_cast<double>(w[c]) * rstd;
        kk[c] = static_cast<float>(k);
        a1[c] = static_cast<float>(-k * rstd * rstd * gx_sum / static_cast<double>(M));
        a0[c] = static_cast<float>(-k * g_sum / static_cast<double>(M));
        dw.data<float>()[c] = static_cast<float>(gx_sum * rstd);
        db.data<float>()[c] = static_cast<float>(g_sum);
      }
      // Pass 2: dx = k g + a1 (x - mean) + a0.
      T* dxp = dx.data<T>();
      detail::for_row_ranges(M, C, [&](int64_t r0, int64_t r1, int64_t) {
        const int64_t R = detail::block_rows(C);
        std::vector<float>& xb = detail::scratch(0);
        std::vector<float>& gb = detail::scratch(1);
        std::vector<float>& out = detail::scratch(2);
        for (int64_t b0 = r0; b0 < r1; b0 += R) {
          const int64_t m = std::min(R, r1 - b0);
          const float* xv = detail::rows_f32(xp, C, b0, m, xb);
          const float* gv = detail::grad_rows(gp, yp, C, b0, m, gb);
          float* o;
          if constexpr (std::is_same_v<T, float>) o = dxp + b0 * C;
          else {
            out.resize(static_cast<std::size_t>(m * C));
            o = out.data();
          }
          const float *kp = kk.data(), *p1 = a1.data(), *p0 = a0.data(), *h = hi.data();
          cpu::simd([&]() MIXPREC_SIMD_BODY {
            for (int64_t i = 0; i < m; ++i)
              for (int64_t c = 0; c < C; ++c) o[i * C + c] = kp[c] * gv[i * C + c] + p1[c] * (xv[i * C + c] - h[c]) + p0[c];
          });
          if constexpr (!std::is_same_v<T, float>) convert(o, dxp + b0 * C, m * C);
        }
      });
    }
  });
  return {dx, dw, db};
}

}  // namespace mixprec::cpu::bn_nhwc
