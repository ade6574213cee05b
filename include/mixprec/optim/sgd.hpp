#pragma once
// SGD with momentum, dampening, L2 weight decay and Nesterov momentum: torch.optim.SGD's
// single-tensor update, one float32 rounding per PyTorch op:
//   g = g + wd * w;  buf = g (first step) | buf * momentum + (1 - dampening) * g;
//   g = nesterov ? g + momentum * buf : buf;  w = w + (-lr) * g
#include "mixprec/optim/optimizer.hpp"

namespace mixprec::optim {

class SGD : public Optimizer {
 public:
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

  void update(const ParamGroup& grp, ParamState& st, const ParamUpdate& u) override {
    const float wd = static_cast<float>(grp.weight_decay);
    const float mom = static_cast<float>(grp.momentum);
    const float damp1 = static_cast<float>(1.0 - grp.dampening);
    const float neg_lr = static_cast<float>(-grp.lr);
    const bool use_wd = grp.weight_decay != 0.0, use_mom = grp.momentum != 0.0, nesterov = *grp.nesterov;
    bool first = false;
    float* buf = use_mom ? buffer(st, "momentum_buffer", u, &first) : nullptr;
    // Branch-free loops per case, so each one vectorises.
    for_blocks(u, [&](float* w, const float* g, int64_t off, int64_t n) {
      float dbuf[detail::kOptimBlock];
      const float* d = g;
      if (use_wd) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) dbuf[i] = g[i] + wd * w[i];
        d = dbuf;
      }
      if (!use_mom) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = w[i] + neg_lr * d[i];
        return;
      }
      float* b = buf + off;
      if (first) {
        std::copy(d, d + n, b);
      } else {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const float t = b[i] * mom;
          b[i] = t + damp1 * d[i];
        }
      }
      if (nesterov) {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = w[i] + neg_lr * (d[i] + mom * b[i]);
      } else {
        MIXPREC_OPTIM_SIMD
        for (int64_t i = 0; i < n; ++i) w[i] = w[i] + neg_lr * b[i];
      }
    });
  }
};

}  // namespace mixprec::optim
