#pragma once
// The CPU's training-step kernels, the CPU backend's entries adam, sgd, unscale, update_scale,
// grad_norm and clip_grads (backends/device.hpp). Optimizer::step, GradScaler and clip_grad_norm_
// reach them through the table as they reach CUDA's fused kernels, so the optimizer, scaler and
// clip bodies are one path for every device. The arithmetic is the CPU's own, unchanged: one
// float32 rounding per PyTorch op, each op one branch-free pass over a cache-resident block
// (vectorised), the scalars from optim::detail::AdamScalars / SgdScalars that CUDA's per-element
// kernels share, and amp::detail::update_scale.
//
// The CPU reads its flags (found_inf, the norm) where the device cannot: they are host memory, so
// reading them costs nothing. Beyond the entries' common contract (written in device.hpp), the
// CPU's grad_norm returns the norm in float64 (clip_grad_norm_ has always returned a double on the
// CPU), and clip_grads reads a float64 or float32 norm.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/backends/cpu/optim.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/optim/adam.hpp"
#include "mixprec/optim/clip_grad.hpp"
#include "mixprec/optim/sgd.hpp"
#include "mixprec/optim/stochastic_rounding.hpp"

namespace mixprec::cpu {

namespace training_detail {
using optim::detail::kOptimBlock;
using optim::detail::kOptimGrain;

inline bool skipped(const Tensor& found_inf) { return found_inf.defined() && *found_inf.data<float>() != 0.0f; }

// Element i of one update in [off, off + n) rounded stochastically into bfloat16 (each element's
// random bits depend only on (step_key, i): the same for any split of the work).
inline void store_bfloat16_stochastic(const float* src, bfloat16* dst, int64_t off, int64_t n, uint64_t step_key) {
  uint16_t* d = &dst[off].x;
  MIXPREC_OPTIM_SIMD
  for (int64_t i = 0; i < n; ++i)
    d[i] = optim::detail::bfloat16_bits_stochastic(src[i], optim::detail::rounding_bits(step_key, static_cast<uint64_t>(off + i)));
}

// f(float* w, const float* g, int64_t offset, int64_t n) over consecutive blocks of one
// parameter's update (parallel over large tensors); offset indexes the float32 state buffers.
// A 16-bit gradient is widened block by block, and the 16-bit model parameter is written after
// each block while it is still in cache. With stochastic rounding the bfloat16 weights are
// widened into a block buffer too, and stored back rounded stochastically.
template <class F>
void for_blocks(const DeviceParamUpdate& u, F&& f) {
  const bool sr = u.stochastic_rounding;
  MIXPREC_CHECK(!sr || u.weights.dtype() == DType::BFloat16, "optimizer: stochastic rounding updates bfloat16 weights, got ",
                u.weights.dtype(), " of shape ", u.weights.sizes());
  float* w = sr ? nullptr : u.weights.data<float>();
  bfloat16* w16 = sr ? u.weights.data<bfloat16>() : nullptr;
  const uint64_t step_key = sr ? optim::detail::rounding_step_key(u.rounding_key, u.counters.data<int64_t>()[0]) : 0;
  const void* grad = u.grad.data_ptr();
  const DType gd = u.grad.dtype();
  void* model = u.model.defined() ? u.model.data_ptr() : nullptr;
  const DType md = u.model.defined() ? u.model.dtype() : DType::Float32;
  cpu::parallel_for(0, u.weights.numel(), kOptimGrain, [&](int64_t b, int64_t e) {
    float gbuf[kOptimBlock], wbuf[kOptimBlock];
    for (int64_t s = b; s < e; s += kOptimBlock) {
      const int64_t m = std::min(kOptimBlock, e - s);
      const float* g;
      if (gd == DType::Float32) {
        g = static_cast<const float*>(grad) + s;
      } else {
        optim::detail::load_float(grad, gd, s, gbuf, m);
        g = gbuf;
      }
      if (sr) {
        convert(w16 + s, wbuf, m);
        f(wbuf, g, s, m);
        store_bfloat16_stochastic(wbuf, w16, s, m, step_key);
        continue;
      }
      f(w + s, g, s, m);
      if (model) optim::detail::store_float(w + s, model, md, s, m);
    }
  });
}

inline float* state_ptr(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

// Elements [lo, hi) of one gradient times inv (into master, when defined, and rounded back into
// the gradient); returns whether any input was inf/NaN.
inline bool unscale_range(const Tensor& grad, const Tensor& master, int64_t lo, int64_t hi, float inv) {
  using amp::detail::nonfinite;
  uint32_t bad = 0;
  if (!master.defined()) {
    float* g = grad.data<float>();
    if (inv == 1.0f) {
      MIXPREC_OPTIM_SIMD_OR(bad)
      for (int64_t i = lo; i < hi; ++i) bad |= nonfinite(g[i]);
    } else {
      MIXPREC_OPTIM_SIMD_OR(bad)
      for (int64_t i = lo; i < hi; ++i) {
        const float v = g[i];
        bad |= nonfinite(v);
        g[i] = v * inv;
      }
    }
    return bad != 0;
  }
  float* m = master.data<float>();
  for (int64_t b = lo; b < hi; b += kOptimBlock) {
    const int64_t n = std::min(kOptimBlock, hi - b);
    optim::detail::load_float(grad.data_ptr(), grad.dtype(), b, m + b, n);
    float* mb = m + b;
    MIXPREC_OPTIM_SIMD_OR(bad)
    for (int64_t i = 0; i < n; ++i) {
      const float v = mb[i];
      bad |= nonfinite(v);
      mb[i] = v * inv;  // exact when inv is 1
    }
    optim::detail::store_float(mb, grad.data_ptr(), grad.dtype(), b, n);
  }
  return bad != 0;
}
}  // namespace training_detail

// DeviceKernels::adam: per parameter, the bias corrections from its counter, one pass per
// PyTorch op over each block.
inline void adam(const std::vector<DeviceParamUpdate>& params, const optim::detail::AdamHyper& h, const Tensor& found_inf) {
  using namespace training_detail;
  if (skipped(found_inf)) return;
  for (const DeviceParamUpdate& u : params) {
    int64_t* count = u.counters.data<int64_t>();
    const optim::detail::AdamScalars sc = optim::detail::adam_scalars(h, count[0] + 1);
    float* m = u.state[0].data<float>();
    float* v = u.state[1].data<float>();
    float* vmax = state_ptr(u.state[2]);
    for_blocks(u, [&](float* w, const float* g, int64_t off, int64_t n) {
      float gbuf[kOptimBlock], sbuf[kOptimBlock];
      float* mb = m + off;
      float* vb = v + off;
      const float* gp = g;
      if (sc.use_wd && sc.decoupled) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = sc.decayed(w[i]);
      } else if (sc.use_wd) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) gbuf[i] = sc.l2(g[i], w[i]);
        gp = gbuf;
      }
      if (sc.lerp_low) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) mb[i] = sc.exp_avg_low(mb[i], gp[i]);
      } else {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) mb[i] = sc.exp_avg_high(mb[i], gp[i]);
      }
      MIXPREC_OPTIM_SIMD
      for (int64_t i = 0; i < n; ++i) vb[i] = sc.exp_avg_sq(vb[i], gp[i]);
      const float* s = vb;
      if (vmax) {
        float* xb = vmax + off;
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) xb[i] = sc.max_exp_avg_sq(xb[i], vb[i]);
        s = xb;
      }
      optim::detail::sqrt_block(s, sbuf, n);
      MIXPREC_OPTIM_SIMD
      for (int64_t i = 0; i < n; ++i) w[i] = sc.param(w[i], mb[i], sbuf[i]);
    });
    ++count[0];
    ++count[1];
  }
}

// DeviceKernels::sgd: the momentum buffer is written whole on its first update (counter 1 is 0).
inline void sgd(const std::vector<DeviceParamUpdate>& params, const optim::detail::SgdScalars& sc, const Tensor& found_inf) {
  using namespace training_detail;
  if (skipped(found_inf)) return;
  for (const DeviceParamUpdate& u : params) {
    int64_t* count = u.counters.data<int64_t>();
    const bool first = count[1] == 0;
    float* buf = sc.use_mom ? u.state[0].data<float>() : nullptr;
    // Branch-free loops per case, so each one vectorises.
    for_blocks(u, [&](float* w, const float* g, int64_t off, int64_t n) {
      float dbuf[kOptimBlock];
      const float* d = g;
      if (sc.use_wd) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) dbuf[i] = sc.l2(g[i], w[i]);
        d = dbuf;
      }
      if (!sc.use_mom) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = sc.param(w[i], d[i]);
        return;
      }
      float* b = buf + off;
      if (first) {
        std::copy(d, d + n, b);
      } else {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) b[i] = sc.momentum(b[i], d[i]);
      }
      if (sc.nesterov) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = sc.param(w[i], sc.nesterov_dir(d[i], b[i]));
      } else {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = sc.param(w[i], b[i]);
      }
    });
    ++count[0];
    ++count[1];
  }
}

// DeviceKernels::unscale: all gradients as one index space, split across threads regardless of
// tensor boundaries, so many small gradients cost one parallel region rather than one each. The
// reciprocal is taken in double (FP32 division can be imprecise for certain compile options).
inline void unscale(const std::vector<Tensor>& grads, const std::vector<Tensor>& masters, const Tensor& scale, const Tensor& found_inf) {
  using namespace training_detail;
  const float inv = static_cast<float>(1.0 / static_cast<double>(*scale.data<float>()));
  std::vector<int64_t> start(grads.size() + 1, 0);
  for (std::size_t i = 0; i < grads.size(); ++i) start[i + 1] = start[i] + grads[i].numel();
  std::atomic<bool> found{false};
  cpu::parallel_for(0, start.back(), kParallelGrain, [&](int64_t b, int64_t e) {
    bool bad = false;
    std::size_t k = static_cast<std::size_t>(std::upper_bound(start.begin(), start.end(), b) - start.begin()) - 1;
    for (int64_t pos = b; pos < e; ++k) {
      const int64_t end = std::min(e, start[k + 1]);
      if (end > pos) bad |= unscale_range(grads[k], masters[k], pos - start[k], end - start[k], inv);
      pos = std::max(pos, end);
    }
    if (bad) found.store(true, std::memory_order_relaxed);
  });
  if (found.load()) *found_inf.data<float>() = 1.0f;
}

// DeviceKernels::update_scale.
inline void update_scale(const Tensor& scale, const Tensor& growth_tracker, const std::vector<Tensor>& found_infs, double growth_factor,
                         double backoff_factor, int64_t growth_interval, const Tensor& skipped) {
  bool found = false;
  for (const Tensor& f : found_infs) found |= *f.data<float>() != 0.0f;
  amp::detail::update_scale(*scale.data<float>(), *growth_tracker.data<int64_t>(), found, growth_factor, backoff_factor, growth_interval);
  *skipped.data<int64_t>() += found;
}

// DeviceKernels::grad_norm: the 2-norm accumulated in double (float64 [] on the CPU).
inline Tensor grad_norm(const std::vector<Tensor>& grads) {
  optim::detail::NormAcc total{2.0, optim::detail::NormAcc::init(2.0)};
  for (const Tensor& g : grads) accumulate_norm(g, total);  // backends/cpu/optim.hpp
  return scalar_tensor(total.finish(), DType::Float64);
}

// DeviceKernels::clip_grads: every gradient times float(max_norm / (norm + 1e-6)), computed in
// float and rounded once into its dtype, unless that factor is >= 1.
inline void clip_grads(const std::vector<Tensor>& grads, const Tensor& norm, double max_norm) {
  const double coef = max_norm / (norm.item<double>() + 1e-6);
  if (coef >= 1.0) return;
  const float c = static_cast<float>(coef);
  for (const Tensor& g : grads)
    dispatch_floating(g.dtype(), "clip_grad_norm_", [&]<class T>() {
      T* p = g.data<T>();
      cpu::parallel_for(0, g.numel(), optim::detail::kOptimGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) p[i] = static_cast<T>(static_cast<acc_t<T>>(p[i]) * c);
      });
    });
}

inline void fill_training_kernels(DeviceKernels& t) {
  t.adam = &adam;
  t.sgd = &sgd;
  t.unscale = &unscale;
  t.update_scale = &update_scale;
  t.grad_norm = &grad_norm;
  t.clip_grads = &clip_grads;
}

}  // namespace mixprec::cpu
