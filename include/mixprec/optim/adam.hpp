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

namespace detail {
// One step's scalars in float32 and the per-element arithmetic, one member per PyTorch op. The
// CPU kernel (backends/cpu/training.hpp) calls them one op at a time over a block (each loop
// vectorises); the fused CUDA kernel (backends/cuda/amp.cuh) calls step() per element: the same
// roundings in both.
struct AdamScalars {
  float decay = 1, wd = 0, w1 = 0, one_minus_w1 = 1, b2 = 0, w2 = 1, neg_step_size = 0, bc2_sqrt = 1, eps = 0;
  bool decoupled = false, use_wd = false, lerp_low = true, amsgrad = false;

  MIXPREC_HOST_DEVICE float decayed(float w) const { return w * decay; }           // AdamW
  MIXPREC_HOST_DEVICE float l2(float g, float w) const { return g + wd * w; }      // Adam
  // torch.lerp picks its formula by the weight: a + w (b - a) below 0.5, else b - (b - a)(1 - w).
  MIXPREC_HOST_DEVICE float exp_avg_low(float m, float g) const { return m + w1 * (g - m); }
  MIXPREC_HOST_DEVICE float exp_avg_high(float m, float g) const { return g - (g - m) * one_minus_w1; }
  MIXPREC_HOST_DEVICE float exp_avg_sq(float v, float g) const {
    const float t = v * b2;
    return t + w2 * g * g;
  }
  // max that keeps a NaN from either side; `|`: one select, vectorises.
  MIXPREC_HOST_DEVICE float max_exp_avg_sq(float vmax, float v) const { return ((vmax > v) | (vmax != vmax)) ? vmax : v; }
  MIXPREC_HOST_DEVICE float param(float w, float m, float sqrt_v) const { return w + neg_step_size * m / (sqrt_v / bc2_sqrt + eps); }

  // The whole update of one element; vmax is null without amsgrad.
  MIXPREC_HOST_DEVICE void step(float& w, float g, float& m, float& v, float* vmax) const {
    if (use_wd && decoupled) w = decayed(w);
    else if (use_wd) g = l2(g, w);
    m = lerp_low ? exp_avg_low(m, g) : exp_avg_high(m, g);
    v = exp_avg_sq(v, g);
    float s = v;
    if (vmax) s = *vmax = max_exp_avg_sq(*vmax, v);
    w = param(w, m, std::sqrt(s));
  }
};

// A group's hyper-parameters, and the step's scalars: computed in double and rounded once to
// float32, as torch.optim's single-tensor Adam. Host/device: the fused CUDA kernel derives the
// bias corrections from a step counter kept on the device.
struct AdamHyper {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool decoupled = false, amsgrad = false;
};
inline AdamHyper adam_hyper(const ParamGroup& grp, bool decoupled) {
  return {grp.lr, grp.betas.first, grp.betas.second, grp.eps, grp.weight_decay, decoupled, grp.amsgrad.value_or(false)};
}
MIXPREC_HOST_DEVICE AdamScalars adam_scalars(const AdamHyper& h, int64_t step) {
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
  AdamScalars s;
  s.neg_step_size = static_cast<float>(-(h.lr / bc1));
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.wd = static_cast<float>(h.weight_decay);
  s.w1 = static_cast<float>(1.0 - h.beta1);
  s.one_minus_w1 = 1.0f - s.w1;
  s.b2 = static_cast<float>(h.beta2);
  s.w2 = static_cast<float>(1.0 - h.beta2);
  s.eps = static_cast<float>(h.eps);
  s.decoupled = h.decoupled;
  s.use_wd = h.weight_decay != 0.0;
  s.lerp_low = (s.w1 < 0 ? -s.w1 : s.w1) < 0.5f;
  s.amsgrad = h.amsgrad;
  return s;
}
}  // namespace detail

// Named arguments for the constructors: `AdamW(params, {.lr = 3e-4, .weight_decay = 0.1})` -- the
// positional forms stay, with PyTorch's order. Defaults as torch.optim.Adam / AdamW.
// stochastic_rounding (no PyTorch equivalent, so named only): bfloat16 parameters keep no float32
// master and are rounded stochastically from rounding_seed's stream (optim/optimizer.hpp).
struct AdamOptions {
  double lr = 1e-3;
  std::pair<double, double> betas = {0.9, 0.999};
  double eps = 1e-8, weight_decay = 0.0;
  bool amsgrad = false;
  bool stochastic_rounding = false;
  uint64_t rounding_seed = 0;
};
struct AdamWOptions {
  double lr = 1e-3;
  std::pair<double, double> betas = {0.9, 0.999};
  double eps = 1e-8, weight_decay = 1e-2;
  bool amsgrad = false;
  bool stochastic_rounding = false;
  uint64_t rounding_seed = 0;
};

class Adam : public Optimizer {
 public:
  Adam(std::vector<Tensor> params, const AdamOptions& o) : Adam(detail::single_group(std::move(params)), o) {}
  Adam(std::vector<ParamGroup> groups, const AdamOptions& o)
      : Adam(std::move(groups), o.lr, o.betas, o.eps, o.weight_decay, o.amsgrad, false, o.stochastic_rounding, o.rounding_seed) {}
  Adam(std::vector<Tensor> params, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
       double weight_decay = 0.0, bool amsgrad = false)
      : Adam(detail::single_group(std::move(params)), lr, betas, eps, weight_decay, amsgrad) {}

  Adam(std::vector<ParamGroup> groups, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
       double weight_decay = 0.0, bool amsgrad = false)
      : Adam(std::move(groups), lr, betas, eps, weight_decay, amsgrad, false) {}

  const char* name() const override { return decoupled_ ? "AdamW" : "Adam"; }

 protected:
  Adam(std::vector<ParamGroup> groups, double lr, std::pair<double, double> betas, double eps, double weight_decay, bool amsgrad,
       bool decoupled, bool stochastic_rounding = false, uint64_t rounding_seed = 0)
      : Optimizer(defaults(lr, betas, eps, weight_decay, amsgrad)), decoupled_(decoupled) {
    set_stochastic_rounding(stochastic_rounding, rounding_seed);
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

  // The group's updates through the device's adam kernel (the CPU's too), which skips on found_inf.
  void update(const ParamGroup& grp, std::vector<PendingUpdate>& ups, const Tensor& found_inf) override {
    const auto kernel = ::mixprec::detail::device_kernel(name(), ups.front().u.weights, &DeviceKernels::adam);  // before any change
    const bool amsgrad = *grp.amsgrad;
    std::vector<DeviceParamUpdate> ps;
    for (PendingUpdate& d : ups) {
      const ParamState* st = d.state;
      DeviceParamUpdate& u = d.u;
      const Tensor& w = u.weights;
      Tensor m = state_buffer(*st, "exp_avg", w), v = state_buffer(*st, "exp_avg_sq", w);
      Tensor vmax = amsgrad ? state_buffer(*st, "max_exp_avg_sq", w) : Tensor();
      d.restart = !m.defined() || !v.defined();  // a missing moment restarts the state, as PyTorch's lazy init
      if (d.restart) {
        m = zeros(w.sizes(), DType::Float32, w.device());
        v = zeros(w.sizes(), DType::Float32, w.device());
        set_counters(u, 0);  // this update is step 1, whenever it is not skipped
      }
      if (amsgrad && (d.restart || !vmax.defined())) vmax = zeros(w.sizes(), DType::Float32, w.device());
      u.state = {m, v, vmax};
      ps.push_back(u);
    }
    kernel(ps, detail::adam_hyper(grp, decoupled_), found_inf);
    for (std::size_t k = 0; k < ups.size(); ++k) {
      ParamState& st = *ups[k].state;
      st.buffers["exp_avg"] = ps[k].state[0];
      st.buffers["exp_avg_sq"] = ps[k].state[1];
      if (amsgrad) st.buffers["max_exp_avg_sq"] = ps[k].state[2];
    }
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
  AdamW(std::vector<Tensor> params, const AdamWOptions& o) : AdamW(detail::single_group(std::move(params)), o) {}
  AdamW(std::vector<ParamGroup> groups, const AdamWOptions& o)
      : Adam(std::move(groups), o.lr, o.betas, o.eps, o.weight_decay, o.amsgrad, true, o.stochastic_rounding, o.rounding_seed) {}
  AdamW(std::vector<Tensor> params, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
        double weight_decay = 1e-2, bool amsgrad = false)
      : AdamW(detail::single_group(std::move(params)), lr, betas, eps, weight_decay, amsgrad) {}

  AdamW(std::vector<ParamGroup> groups, double lr = 1e-3, std::pair<double, double> betas = {0.9, 0.999}, double eps = 1e-8,
        double weight_decay = 1e-2, bool amsgrad = false)
      : Adam(std::move(groups), lr, betas, eps, weight_decay, amsgrad, true) {}
};

}  // namespace mixprec::optim
