#pragma once
// Exponential moving average of parameters (timm's ModelEMA, torch.optim.swa_utils'
// EMA averaging): shadow = lerp(shadow, param, 1 - decay), kept in float32 whatever the
// parameters' dtype, so a 16-bit model's average does not stall on rounding.
//
//   optim::EMA ema(params, 0.999);
//   ... opt.step(); ema.update();
//   ema.apply();   evaluate();   ema.restore();
#include "mixprec/optim/optimizer.hpp"

namespace mixprec::optim {

class EMA {
 public:
  EMA(std::vector<Tensor> params, double decay = 0.9999) : params_(std::move(params)), decay_(decay) {
    MIXPREC_CHECK(decay >= 0.0 && decay <= 1.0, "EMA: decay must be in [0, 1], got ", decay);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Tensor& p = params_[i];
      MIXPREC_CHECK(p.defined() && p.is_floating_point() && p.device() == Device::CPU, "EMA: parameter ", i,
                    " must be a floating-point CPU tensor");
      Tensor s = empty(p.sizes(), DType::Float32);
      detail::copy_kernel(s, p);
      shadow_.push_back(s);
    }
  }

  // shadow = shadow + (1 - decay) * (param - shadow), torch.lerp's formula in float32.
  void update() {
    MIXPREC_CHECK(backup_.empty(), "EMA.update: called between apply() and restore(); the parameters hold the average");
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Tensor p = params_[i].is_contiguous() ? params_[i] : params_[i].detach().contiguous();
      MIXPREC_CHECK(p.sizes() == shadow_[i].sizes(), "EMA.update: parameter ", i, " changed shape from ", shadow_[i].sizes(),
                    " to ", p.sizes());
      // The table's `param_op` (the CPU's: float32 lerp with weight float(1 - decay)).
      ::mixprec::detail::device_kernel("EMA.update", shadow_[i], &DeviceKernels::param_op)(DeviceParamOp::EmaLerp, shadow_[i], p,
                                                                                             1.0 - decay_);
    }
    ++num_updates_;
  }

  // Puts the averages into the parameters (rounded to their dtype), keeping the originals.
  void apply() {
    MIXPREC_CHECK(backup_.empty(), "EMA.apply: already applied; call restore() first");
    no_grad guard;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Tensor b = empty(params_[i].sizes(), params_[i].dtype());
      detail::copy_kernel(b, params_[i]);
      backup_.push_back(b);
    }
    for (std::size_t i = 0; i < params_.size(); ++i) {
      detail::copy_kernel(params_[i], shadow_[i]);
      params_[i].bump_version();
    }
  }

  // Puts the parameters saved by apply() back, bit for bit.
  void restore() {
    MIXPREC_CHECK(!backup_.empty() || params_.empty(), "EMA.restore: apply() was not called");
    no_grad guard;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      detail::copy_kernel(params_[i], backup_[i]);
      params_[i].bump_version();
    }
    backup_.clear();
  }

  const std::vector<Tensor>& shadow() const { return shadow_; }
  double decay() const { return decay_; }
  void set_decay(double d) {
    MIXPREC_CHECK(d >= 0.0 && d <= 1.0, "EMA: decay must be in [0, 1], got ", d);
    decay_ = d;
  }
  int64_t num_updates() const { return num_updates_; }

  // Tensors "shadow.<i>"; scalars decay, num_updates.
  StateDict state_dict() const {
    StateDict sd;
    for (std::size_t i = 0; i < shadow_.size(); ++i) sd.tensors.emplace_back("shadow." + std::to_string(i), shadow_[i]);
    sd.scalars["decay"] = decay_;
    sd.scalars["num_updates"] = static_cast<double>(num_updates_);
    return sd;
  }
  void load_state_dict(const StateDict& sd) {
    MIXPREC_CHECK(sd.tensors.size() == shadow_.size(), "EMA.load_state_dict: ", sd.tensors.size(), " tensors for ",
                  shadow_.size(), " parameters");
    for (std::size_t i = 0; i < shadow_.size(); ++i) {
      const Tensor* t = sd.tensor("shadow." + std::to_string(i));
      MIXPREC_CHECK(t && t->defined() && t->sizes() == shadow_[i].sizes() && t->is_floating_point(),
                    "EMA.load_state_dict: missing or mis-shaped 'shadow.", i, "' (expected shape ", shadow_[i].sizes(), ")");
    }
    for (std::size_t i = 0; i < shadow_.size(); ++i) detail::copy_kernel(shadow_[i], *sd.tensor("shadow." + std::to_string(i)));
    if (auto d = sd.scalar("decay")) set_decay(*d);
    if (auto n = sd.scalar("num_updates")) num_updates_ = static_cast<int64_t>(*n);
  }

 private:
  std::vector<Tensor> params_;
  std::vector<Tensor> shadow_;
  std::vector<Tensor> backup_;
  double decay_;
  int64_t num_updates_ = 0;
};

using ModelEMA = EMA;

}  // namespace mixprec::optim
