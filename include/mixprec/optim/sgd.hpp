#pragma once
// SGD with momentum, dampening, L2 weight decay and Nesterov momentum: torch.optim.SGD's
// single-tensor update, one float32 rounding per PyTorch op:
//   g = g + wd * w;  buf = g (first step) | buf * momentum + (1 - dampening) * g;
//   g = nesterov ? g + momentum * buf : buf;  w = w + (-lr) * g
#include "mixprec/optim/optimizer.hpp"

namespace mixprec::optim {

namespace detail {
// The step's scalars in float32 and the per-element arithmetic, one member per PyTorch op: the
// CPU kernel (backends/cpu/training.hpp) calls them per block, the fused CUDA kernel
// (backends/cuda/amp.cuh) per element.
struct SgdScalars {
  float wd = 0, mom = 0, damp1 = 1, neg_lr = 0;
  bool use_wd = false, use_mom = false, nesterov = false;

  MIXPREC_HOST_DEVICE float l2(float g, float w) const { return g + wd * w; }
  MIXPREC_HOST_DEVICE float momentum(float buf, float d) const {
    const float t = buf * mom;
    return t + damp1 * d;
  }
  MIXPREC_HOST_DEVICE float nesterov_dir(float d, float buf) const { return d + mom * buf; }
  MIXPREC_HOST_DEVICE float param(float w, float d) const { return w + neg_lr * d; }

  // The whole update of one element; buf is null without momentum, `first` on its first step.
  MIXPREC_HOST_DEVICE void step(float& w, float g, float* buf, bool first) const {
    const float d = use_wd ? l2(g, w) : g;
    if (!use_mom) {
      w = param(w, d);
      return;
    }
    *buf = first ? d : momentum(*buf, d);
    w = param(w, nesterov ? nesterov_dir(d, *buf) : *buf);
  }
};

inline SgdScalars sgd_scalars(const ParamGroup& grp) {
  SgdScalars s;
  s.wd = static_cast<float>(grp.weight_decay);
  s.mom = static_cast<float>(grp.momentum);
  s.damp1 = static_cast<float>(1.0 - grp.dampening);
  s.neg_lr = static_cast<float>(-grp.lr);
  s.use_wd = grp.weight_decay != 0.0;
  s.use_mom = grp.momentum != 0.0;
  s.nesterov = grp.nesterov.value_or(false);
  return s;
}
}  // namespace detail

// Named arguments: `SGD(params, {.lr = 0.1, .momentum = 0.9, .nesterov = true})`; defaults as torch.optim.SGD
// (but lr, which PyTorch requires: 1e-3 as the positional form). stochastic_rounding as AdamOptions'.
struct SGDOptions {
  double lr = 1e-3, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false;
  bool stochastic_rounding = false;
  uint64_t rounding_seed = 0;
};

class SGD : public Optimizer {
 public:
  SGD(std::vector<Tensor> params, const SGDOptions& o) : SGD(detail::single_group(std::move(params)), o) {}
  SGD(std::vector<ParamGroup> groups, const SGDOptions& o)
      : Optimizer(defaults(o.lr, o.momentum, o.dampening, o.weight_decay, o.nesterov)) {
    set_stochastic_rounding(o.stochastic_rounding, o.rounding_seed);
    init(std::move(groups));
  }
  SGD(std::vector<Tensor> params, double lr = 1e-3, double momentum = 0.0, double dampening = 0.0, double weight_decay = 0.0,
      bool nesterov = false)
      : SGD(detail::single_group(std::move(params)), lr, momentum, dampening, weight_decay, nesterov) {}

  SGD(std::vector<ParamGroup> groups, double lr = 1e-3, double momentum = 0.0, double dampening = 0.0, double weight_decay = 0.0,
      bool nesterov = false)
      : Optimizer(defaults(lr, momentum, dampening, weight_decay, nesterov)) {
    init(std::move(groups));
  }

  const char* name() const override { return "SGD"; }

 private:
  static ParamGroup defaults(double lr, double momentum, double dampening, double weight_decay, bool nesterov) {
    ParamGroup d;
    d.lr = lr;
    d.momentum = momentum;
    d.dampening = dampening;
    d.weight_decay = weight_decay;
    d.nesterov = nesterov;
    return d;
  }

 protected:
  void validate(const ParamGroup& g) const override {
    MIXPREC_CHECK(g.lr >= 0.0, "SGD: Invalid learning rate: ", g.lr);
    MIXPREC_CHECK(g.momentum >= 0.0, "SGD: Invalid momentum value: ", g.momentum);
    MIXPREC_CHECK(g.weight_decay >= 0.0, "SGD: Invalid weight_decay value: ", g.weight_decay);
    MIXPREC_CHECK(!(*g.nesterov && (g.momentum <= 0.0 || g.dampening != 0.0)),
                  "SGD: Nesterov momentum requires a momentum and zero dampening");
  }

  bool is_state_name(const std::string& key) const override { return key == "momentum_buffer"; }

  void update(const ParamGroup& grp, std::vector<PendingUpdate>& ups, const Tensor& found_inf) override {
    const auto kernel = ::mixprec::detail::device_kernel("SGD", ups.front().u.weights, &DeviceKernels::sgd);  // before any change
    const detail::SgdScalars sc = detail::sgd_scalars(grp);
    std::vector<DeviceParamUpdate> ps;
    for (PendingUpdate& d : ups) {
      const ParamState* st = d.state;
      DeviceParamUpdate& u = d.u;
      if (sc.use_mom) {
        Tensor buf = state_buffer(*st, "momentum_buffer", u.weights);
        if (!buf.defined()) {  // the buffer's first applied update writes it whole: counted by the kernel
          buf = empty(u.weights.sizes(), DType::Float32, u.weights.device());
          set_counters(u, 0, false);
        }
        u.state[0] = buf;
      }
      ps.push_back(u);
    }
    kernel(ps, sc, found_inf);
    if (sc.use_mom)
      for (std::size_t k = 0; k < ups.size(); ++k) ups[k].state->buffers["momentum_buffer"] = ps[k].state[0];
  }
};

}  // namespace mixprec::optim
