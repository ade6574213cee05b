#pragma once
// Learning-rate schedulers (torch.optim.lr_scheduler): each sets the lr of every parameter group
// of its optimizer. Construction applies step 0 (as PyTorch's initial step); call step() once
// per optimizer step, after it.
#include <cmath>
#include <numbers>

#include "mixprec/optim/optimizer.hpp"

namespace mixprec::optim::lr_scheduler {

class LRScheduler {
 public:
  virtual ~LRScheduler() = default;
  LRScheduler(const LRScheduler&) = delete;
  LRScheduler& operator=(const LRScheduler&) = delete;

  void step() {
    check_step(last_epoch_ + 1);
    ++last_epoch_;
    apply(get_lr());
  }
  // The lr of each group as last set by this scheduler.
  const std::vector<double>& get_last_lr() const { return last_lr_; }
  int64_t last_epoch() const { return last_epoch_; }
  const std::vector<double>& base_lrs() const { return base_lrs_; }

  // Scalars: last_epoch, base_lrs.<g>, last_lr.<g> (the optimizer's own state holds the lrs).
  virtual StateDict state_dict() const {
    StateDict sd;
    sd.scalars["last_epoch"] = static_cast<double>(last_epoch_);
    for (std::size_t g = 0; g < base_lrs_.size(); ++g) {
      sd.scalars["base_lrs." + std::to_string(g)] = base_lrs_[g];
      sd.scalars["last_lr." + std::to_string(g)] = last_lr_[g];
    }
    return sd;
  }
  virtual void load_state_dict(const StateDict& sd) {
    auto e = sd.scalar("last_epoch");
    MIXPREC_CHECK(e, "LRScheduler.load_state_dict: missing key 'last_epoch'");
    MIXPREC_CHECK(*e >= -1 && *e < 9.0e18 && *e == std::floor(*e), "LRScheduler.load_state_dict: last_epoch must be an integer >= -1, got ",
                  *e);
    std::vector<double> base(base_lrs_.size()), last(base_lrs_.size());
    for (std::size_t g = 0; g < base.size(); ++g) {
      auto b = sd.scalar("base_lrs." + std::to_string(g));
      auto l = sd.scalar("last_lr." + std::to_string(g));
      MIXPREC_CHECK(b && l, "LRScheduler.load_state_dict: missing base_lrs/last_lr for group ", g, " (the optimizer has ",
                    base.size(), " groups)");
      base[g] = *b;
      last[g] = *l;
    }
    MIXPREC_CHECK(!sd.scalar("base_lrs." + std::to_string(base.size())), "LRScheduler.load_state_dict: the state has more than ",
                  base.size(), " groups");
    last_epoch_ = static_cast<int64_t>(*e);
    base_lrs_ = std::move(base);
    last_lr_ = std::move(last);
  }

 protected:
  explicit LRScheduler(Optimizer& optimizer) : opt_(optimizer) {
    for (const ParamGroup& g : opt_.param_groups()) base_lrs_.push_back(g.lr);
  }
  // Derived constructors call this last: it computes and applies step 0.
  void initial_step() { step(); }

  // The lr of every group at last_epoch_.
  virtual std::vector<double> get_lr() = 0;
  virtual void check_step(int64_t) const {}

  std::vector<ParamGroup>& groups() {
    MIXPREC_CHECK(opt_.param_groups().size() == base_lrs_.size(), "LRScheduler: the optimizer has ",
                  opt_.param_groups().size(), " parameter groups, the scheduler was built for ", base_lrs_.size());
    return opt_.param_groups();
  }

  Optimizer& opt_;
  std::vector<double> base_lrs_;
  int64_t last_epoch_ = -1;
  std::vector<double> last_lr_;

 private:
  void apply(std::vector<double> lrs) {
    auto& gs = groups();
    for (std::size_t g = 0; g < gs.size(); ++g) gs[g].lr = lrs[g];
    last_lr_ = std::move(lrs);
  }
};

// lr = base_lr * gamma^floor(epoch / step_size), applied multiplicatively as PyTorch's chainable form.
class StepLR : public LRScheduler {
 public:
  StepLR(Optimizer& optimizer, int64_t step_size, double gamma = 0.1) : LRScheduler(optimizer), step_size_(step_size), gamma_(gamma) {
    MIXPREC_CHECK(step_size > 0, "StepLR: step_size must be positive, got ", step_size);
    initial_step();
  }

 protected:
  std::vector<double> get_lr() override {
    std::vector<double> out;
    for (const ParamGroup& g : groups())
      out.push_back(last_epoch_ == 0 || last_epoch_ % step_size_ != 0 ? g.lr : g.lr * gamma_);
    return out;
  }

 private:
  int64_t step_size_;
  double gamma_;
};

// Linear warmup from 0 to base_lr over warmup_steps, then cosine annealing to min_lr at
// total_steps, min_lr after (the Hugging Face cosine-with-warmup schedule, with a floor):
//   s < warmup:  base_lr * s / warmup
//   else:        min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2,  p = min(1, (s - warmup) / (total - warmup))
class CosineAnnealingWarmupLR : public LRScheduler {
 public:
  CosineAnnealingWarmupLR(Optimizer& optimizer, int64_t warmup_steps, int64_t total_steps, double min_lr = 0.0)
      : LRScheduler(optimizer), warmup_(warmup_steps), total_(total_steps), min_lr_(min_lr) {
    MIXPREC_CHECK(warmup_steps >= 0 && total_steps > 0 && warmup_steps <= total_steps,
                  "CosineAnnealingWarmupLR: need 0 <= warmup_steps <= total_steps and total_steps > 0, got warmup_steps=",
                  warmup_steps, ", total_steps=", total_steps);
    MIXPREC_CHECK(min_lr >= 0.0, "CosineAnnealingWarmupLR: min_lr must be >= 0, got ", min_lr);
    initial_step();
  }

 protected:
  std::vector<double> get_lr() override {
    std::vector<double> out;
    const double s = static_cast<double>(last_epoch_);
    for (double base : base_lrs_) {
      if (last_epoch_ < warmup_) {
        out.push_back(base * s / static_cast<double>(warmup_));
      } else {
        const double p = std::min(1.0, (s - static_cast<double>(warmup_)) / static_cast<double>(std::max<int64_t>(1, total_ - warmup_)));
        out.push_back(min_lr_ + (base - min_lr_) * 0.5 * (1.0 + std::cos(std::numbers::pi * p)));
      }
    }
    return out;
  }

 private:
  int64_t warmup_, total_;
  double min_lr_;
};

// torch.optim.lr_scheduler.OneCycleLR, two phases with cosine annealing: from max_lr/div_factor
// up to max_lr over pct_start of total_steps, then down to initial_lr/final_div_factor. With
// cycle_momentum, momentum (SGD) or beta1 (Adam/AdamW) cycles the opposite way between
// max_momentum and base_momentum.
class OneCycleLR : public LRScheduler {
 public:
  OneCycleLR(Optimizer& optimizer, double max_lr, int64_t total_steps, double pct_start = 0.3, double div_factor = 25.0,
             double final_div_factor = 1e4, bool cycle_momentum = true, double base_momentum = 0.85, double max_momentum = 0.95)
      : LRScheduler(optimizer),
        total_(total_steps),
        cycle_momentum_(cycle_momentum),
        base_momentum_(base_momentum),
        max_momentum_(max_momentum) {
    MIXPREC_CHECK(total_steps > 0, "OneCycleLR: Expected positive integer total_steps, but got ", total_steps);
    MIXPREC_CHECK(pct_start >= 0.0 && pct_start <= 1.0, "OneCycleLR: Expected float between 0 and 1 pct_start, but got ", pct_start);
    initial_lr_ = max_lr / div_factor;
    max_lr_ = max_lr;
    min_lr_ = initial_lr_ / final_div_factor;
    phase1_end_ = pct_start * static_cast<double>(total_steps) - 1.0;
    phase2_end_ = static_cast<double>(total_steps) - 1.0;
    for (double& b : base_lrs_) b = initial_lr_;
    if (cycle_momentum_) {
      for (const ParamGroup& g : groups())
        MIXPREC_CHECK(!std::isnan(g.betas.first) || !std::isnan(g.momentum),
                      "OneCycleLR: optimizer must support momentum or beta1 with `cycle_momentum` option enabled");
      set_momentum(max_momentum_);
    }
    initial_step();
  }

  StateDict state_dict() const override {
    StateDict sd = LRScheduler::state_dict();
    sd.scalars["total_steps"] = static_cast<double>(total_);
    return sd;
  }

 protected:
  void check_step(int64_t step_num) const override {
    MIXPREC_CHECK(step_num <= total_, "OneCycleLR: Tried to step ", step_num, " times. The specified number of total steps is ",
                  total_);
  }

  std::vector<double> get_lr() override {
    const double s = static_cast<double>(last_epoch_);
    double lr, mom;
    // A zero-length phase is complete at once (PyTorch divides by zero there).
    if (s <= phase1_end_) {
      const double pct = phase1_end_ > 0.0 ? s / phase1_end_ : 1.0;
      lr = anneal(initial_lr_, max_lr_, pct);
      mom = anneal(max_momentum_, base_momentum_, pct);
    } else {
      const double pct = phase2_end_ > phase1_end_ ? (s - phase1_end_) / (phase2_end_ - phase1_end_) : 1.0;
      lr = anneal(max_lr_, min_lr_, pct);
      mom = anneal(base_momentum_, max_momentum_, pct);
    }
    if (cycle_momentum_) set_momentum(mom);
    return std::vector<double>(base_lrs_.size(), lr);
  }

 private:
  static double anneal(double start, double end, double pct) {
    const double cos_out = std::cos(std::numbers::pi * pct) + 1.0;
    return end + (start - end) / 2.0 * cos_out;
  }
  void set_momentum(double m) {
    for (ParamGroup& g : groups()) {
      if (!std::isnan(g.betas.first)) g.betas.first = m;
      else g.momentum = m;
    }
  }

  int64_t total_;
  bool cycle_momentum_;
  double base_momentum_, max_momentum_;
  double initial_lr_ = 0, max_lr_ = 0, min_lr_ = 0;
  double phase1_end_ = 0, phase2_end_ = 0;
};

}  // namespace mixprec::optim::lr_scheduler
