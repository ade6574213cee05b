#pragma once
// Adam (L2 weight decay added to the gradient) and AdamW (decoupled weight decay): the
// torch.optim single-tensor update, one float32 rounding per PyTorch op, scalars in double:
//   AdamW: w = w * (1 - lr * wd)            Adam: g = g + wd * w
//   m = lerp(m, g, 1 - beta1);  v = v * beta2;  v = v + (1 - beta2) * g * g
//   bc1 = 1 - beta1^step;  bc2 = 1 - beta2^step     (step counted per parameter)
//   denom = sqrt(amsgrad ? vmax = max(vmax, v) : v) / sqrt(bc2) + eps
//   w = w + (-lr / bc1) * m / denom
#include "mixprec/optim/optimizer.hpp"

namespace mixprec::optim {

class Adam : public Optimizer {
 public:
  Adam(std::vector<Tensor> params, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
       double weight_decay = 0.0, bool amsgrad = false)
      : Adam(detail::single_group(std::move(params)), lr, betas, eps, weight_decay, amsgrad) {}

  Adam(std::vector<ParamGroup> groups, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
       double weight_decay = 0.0, bool amsgrad = false)
      : Adam(std::move(groups), lr, betas, eps, weight_decay, amsgrad, false) {}

  const char* name() const override { return decoupled_ ? "AdamW" : "Adam"; }

 protected:
  Adam(std::vector<ParamGroup> groups, double lr, std::pair<double, double> betas, double eps, double weight_decay, bool amsgrad,
       bool decoupled)
      : Optimizer(defaults(lr, betas, eps, weight_decay, amsgrad)), decoupled_(decoupled) {
    init(std::move(groups));
  }

  void validate(const ParamGroup& g) const override {
    MIXPREC_CHECK(g.lr >= 0.0, name(), ": Invalid learning rate: ", g.lr);
    MIXPREC_CHECK(g.eps >= 0.0, name(), ": Invalid epsilon value: ", g.eps);
    MIXPREC_CHECK(g.betas.first >= 0.0 && g.betas.first < 1.0, name(), ": Invalid beta parameter at index 0: ", g.betas.first);
    MIXPREC_CHECK(g.betas.second >= 0.0 && g.betas.second < 1.0, name(), ": Invalid beta parameter at index 1: ", g.betas.second);
    MIXPREC_CHECK(g.weight_decay >= 0.0, name(), ": Invalid weight_decay value: ", g.weight_decay);
  }

  bool is_state_name(const std::string& key) const override {
    return key == "exp_avg" || key == "exp_avg_sq" || key == "max_exp_avg_sq";
  }

  void update(const ParamGroup& grp, ParamState& st, const ParamUpdate& u) override {
    const double lr = grp.lr, beta1 = grp.betas.first, beta2 = grp.betas.second, wd = grp.weight_decay;
    const bool amsgrad = *grp.amsgrad;
    bool fresh_m = false, fresh_v = false, fresh_max = false;
    float* m = buffer(st, "exp_avg", u, &fresh_m);
    float* v = buffer(st, "exp_avg_sq", u, &fresh_v);
    float* vmax = amsgrad ? buffer(st, "max_exp_avg_sq", u, &fresh_max) : nullptr;
    const bool fresh = fresh_m || fresh_v;
    if (fresh) {
      // A missing moment restarts the whole state, as PyTorch's lazy state init.
      std::fill(m, m + u.n, 0.0f);
      std::fill(v, v + u.n, 0.0f);
      st.step = 1;
    }
    if (vmax && (fresh || fresh_max)) std::fill(vmax, vmax + u.n, 0.0f);

    const double step = static_cast<double>(st.step);
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2 = 1.0 - std::pow(beta2, step);
    const float neg_step_size = static_cast<float>(-(lr / bc1));
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float decay = static_cast<float>(1.0 - lr * wd);
    const float wdf = static_cast<float>(wd);
    const float w1 = static_cast<float>(1.0 - beta1);
    const float b2 = static_cast<float>(beta2);
    const float w2 = static_cast<float>(1.0 - beta2);
    const float epsf = static_cast<float>(grp.eps);
    const bool decoupled = decoupled_, use_wd = wd != 0.0;

    // torch.lerp picks its formula by the (here uniform) weight: a + w (b - a) below 0.5, else
    // b - (b - a)(1 - w).
    const bool lerp_low = std::abs(w1) < 0.5f;
    const float one_minus_w1 = 1.0f - w1;
    // One pass per PyTorch op over a cache-resident block, each branch-free so it vectorises.
    for_blocks(u, [&](float* w, const float* g, int64_t off, int64_t n) {
      float gbuf[detail::kOptimBlock], sbuf[detail::kOptimBlock];
      float* mb = m + off;
      float* vb = v + off;
      const float* gp = g;
      if (use_wd && decoupled) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = w[i] * decay;
      } else if (use_wd) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) gbuf[i] = g[i] + wdf * w[i];
        gp = gbuf;
      }
      if (lerp_low) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) mb[i] = mb[i] + w1 * (gp[i] - mb[i]);
      } else {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) mb[i] = gp[i] - (gp[i] - mb[i]) * one_minus_w1;
      }
      MIXPREC_OPTIM_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const float t = vb[i] * b2;
        vb[i] = t + w2 * gp[i] * gp[i];
      }
      const float* s = vb;
      if (vmax) {
        float* xb = vmax + off;
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) xb[i] = detail::nan_max(xb[i], vb[i]);
        s = xb;
      }
      detail::sqrt_block(s, sbuf, n);
      MIXPREC_OPTIM_SIMD
      for (int64_t i = 0; i < n; ++i) w[i] = w[i] + neg_step_size * mb[i] / (sbuf[i] / bc2_sqrt + epsf);
    });
  }

 private:
  static ParamGroup defaults(double lr, std::pair<double, double> betas, double eps, double weight_decay, bool amsgrad) {
    ParamGroup d;
    d.lr = lr;
    d.betas = betas;
    d.eps = eps;
    d.weight_decay = weight_decay;
    d.amsgrad = amsgrad;
    return d;
  }

  bool decoupled_;
};

class AdamW : public Adam {
 public:
  AdamW(std::vector<Tensor> params, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
        double weight_decay = 1e-2, bool amsgrad = false)
      : AdamW(detail::single_group(std::move(params)), lr, betas, eps, weight_decay, amsgrad) {}

  AdamW(std::vector<ParamGroup> groups, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
        double weight_decay = 1e-2, bool amsgrad = false)
      : Adam(std::move(groups), lr, betas, eps, weight_decay, amsgrad, true) {}
};

}  // namespace mixprec::optim
