#pragma once
// The CPU backend's `param_op` entry of the device kernel table (backends/device.hpp): the
// in-place passes over parameters and gradients that the optimizers, EMA and the clip functions
// (optim/) run outside Optimizer::step -- a p-norm's accumulation, clip_grad_value_'s clamp, the
// EMA's lerp and a master copy adopting a changed 16-bit parameter. Why one entry: each is one
// memory-bound pass of kOptimBlock float32 blocks split over threads, with a scalar; the kind
// picks the formula. accumulate_norm also serves the 2-norm of grad_norm (backends/cpu/training.hpp).
#include <cmath>
#include <mutex>

#include "mixprec/backends/device.hpp"
#include "mixprec/optim/clip_grad.hpp"
#include "mixprec/optim/ema.hpp"

namespace mixprec::cpu {

// Accumulates |v| of every element of g into `total` (norm_type total.p), in parallel over large
// tensors: each thread's partial result is merged under a lock.
inline void accumulate_norm(const Tensor& g, optim::detail::NormAcc& total) {
  using optim::detail::kOptimBlock;
  using optim::detail::NormAcc;
  std::mutex mu;
  const Tensor c = g.is_contiguous() ? g : g.contiguous();
  const DType dt = c.dtype();
  const void* data = c.data_ptr();
  cpu::parallel_for(0, c.numel(), optim::detail::kOptimGrain, [&](int64_t b, int64_t e) {
    NormAcc local{total.p, NormAcc::init(total.p)};
    float buf[kOptimBlock];
    for (int64_t s = b; s < e; s += kOptimBlock) {
      const int64_t n = std::min(kOptimBlock, e - s);
      const float* v;
      if (dt == DType::Float32) {
        v = static_cast<const float*>(data) + s;
      } else {
        optim::detail::load_float(data, dt, s, buf, n);
        v = buf;
      }
      if (total.p == 2) {
        double a = 0;
        for (int64_t i = 0; i < n; ++i) a += static_cast<double>(v[i]) * v[i];
        local.acc += a;
      } else {
        for (int64_t i = 0; i < n; ++i) local.add(std::abs(static_cast<double>(v[i])));
      }
    }
    std::lock_guard lock(mu);
    total.merge(local.acc);
  });
}

// DeviceKernels::param_op.
inline void param_op(DeviceParamOp k, const Tensor& dst, const Tensor& src, double s) {
  using optim::detail::kOptimBlock;
  using optim::detail::kOptimGrain;
  switch (k) {
    case DeviceParamOp::NormAccumulate: {
      optim::detail::NormAcc total{s, *dst.data<double>()};
      accumulate_norm(src, total);
      *dst.data<double>() = total.acc;
      return;
    }
    case DeviceParamOp::ClampValue:
      dispatch_floating(dst.dtype(), "clip_grad_value_", [&]<class T>() {
        using A = acc_t<T>;
        const A lo = static_cast<A>(-s), hi = static_cast<A>(s);
        T* p = dst.data<T>();
        cpu::parallel_for(0, dst.numel(), kOptimGrain, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const A v = static_cast<A>(p[i]);
            // NaN stays NaN, as torch.clamp.
            p[i] = static_cast<T>(v < lo ? lo : (v > hi ? hi : v));
          }
        });
      });
      return;
    case DeviceParamOp::EmaLerp: {
      const float w = static_cast<float>(s);
      float* sh = dst.data<float>();
      const void* from = src.data_ptr();
      const DType dt = src.dtype();
      cpu::parallel_for(0, src.numel(), kOptimGrain, [&](int64_t b, int64_t e) {
        float buf[kOptimBlock];
        for (int64_t o = b; o < e; o += kOptimBlock) {
          const int64_t n = std::min(kOptimBlock, e - o);
          optim::detail::load_float(from, dt, o, buf, n);
          for (int64_t j = 0; j < n; ++j) sh[o + j] = optim::detail::lerp(sh[o + j], buf[j], w);
        }
      });
      return;
    }
    case DeviceParamOp::AdoptChanged: {
      float* w = dst.data<float>();
      dispatch_floating(src.dtype(), "optimizer", [&]<class P>() {
        if constexpr (sizeof(P) == 2) {
          const P* p = src.data<P>();
          cpu::parallel_for(0, dst.numel(), kOptimGrain, [&](int64_t b, int64_t e) {
            for (int64_t j = b; j < e; ++j)
              if (P(w[j]).x != p[j].x) w[j] = static_cast<float>(p[j]);
          });
        }
      });
      return;
    }
  }
  MIXPREC_CHECK(false, "param_op: unknown kind ", static_cast<int>(k), " for a tensor of shape ", dst.sizes());
}

inline void fill_optim_kernels(DeviceKernels& t) { t.param_op = param_op; }

}  // namespace mixprec::cpu
