// LR schedulers: lr sequences against closed-form formulas, every group, momentum cycling,
// state round trips, and the optimizer actually using the scheduled lr.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <cmath>
#include <numbers>
#include <vector>

using namespace mixprec;
namespace sched = mixprec::optim::lr_scheduler;

namespace {

Tensor sch_param(float v) {
  Tensor t = full({1}, v);
  t.requires_grad_();
  return t;
}

std::vector<optim::ParamGroup> sch_two_groups(double lr0, double lr1) {
  std::vector<optim::ParamGroup> g(2);
  g[0].params = {sch_param(0.0f)};
  g[0].lr = lr0;
  g[1].params = {sch_param(0.0f)};
  g[1].lr = lr1;
  return g;
}

void sch_expect_lr(const optim::Optimizer& opt, const sched::LRScheduler& s, const std::vector<double>& expect, int step) {
  ASSERT_EQ(s.get_last_lr().size(), expect.size());
  for (std::size_t g = 0; g < expect.size(); ++g) {
    EXPECT_NEAR(s.get_last_lr()[g], expect[g], 1e-12 * std::max(1.0, std::abs(expect[g]))) << "step " << step << " group " << g;
    EXPECT_EQ(opt.param_groups()[g].lr, s.get_last_lr()[g]) << "step " << step << " group " << g;
  }
}

// PyTorch's OneCycleLR (two phases, cos), written from its documentation.
double sch_onecycle(double step, double max_lr, double total, double pct, double div, double final_div, double lo, double hi) {
  const double initial = max_lr / div, min_lr = initial / final_div;
  const double end1 = pct * total - 1, end2 = total - 1;
  auto cosine = [](double a, double b, double t) { return b + (a - b) / 2 * (std::cos(std::numbers::pi * t) + 1); };
  if (step <= end1) return cosine(lo == 0 ? initial : lo, hi == 0 ? max_lr : hi, step / end1);
  return cosine(hi == 0 ? max_lr : hi, lo == 0 ? min_lr : lo, (step - end1) / (end2 - end1));
}

}  // namespace

TEST(LRScheduler, StepLRClosedForm) {
  optim::SGD opt(sch_two_groups(0.1, 0.03), 1.0);
  sched::StepLR s(opt, 3, 0.5);
  for (int e = 0; e < 12; ++e) {
    if (e > 0) s.step();
    const double f = std::pow(0.5, e / 3);
    sch_expect_lr(opt, s, {0.1 * f, 0.03 * f}, e);
  }
  EXPECT_EQ(s.last_epoch(), 11);
  EXPECT_THROW(sched::StepLR(opt, 0), Error);
}

TEST(LRScheduler, CosineWithWarmupClosedForm) {
  optim::Adam opt(sch_two_groups(1e-3, 4e-3));
  const int warmup = 5, total = 25;
  const double min_lr = 1e-5;
  sched::CosineAnnealingWarmupLR s(opt, warmup, total, min_lr);
  for (int e = 0; e <= total + 5; ++e) {
    if (e > 0) s.step();
    std::vector<double> expect;
    for (double base : {1e-3, 4e-3}) {
      if (e < warmup) {
        expect.push_back(base * e / warmup);
      } else {
        const double p = std::min(1.0, double(e - warmup) / (total - warmup));
        expect.push_back(min_lr + (base - min_lr) * 0.5 * (1 + std::cos(std::numbers::pi * p)));
      }
    }
    sch_expect_lr(opt, s, expect, e);
  }
  // Landmarks: 0 at the start, the base lr at the end of warmup, min_lr at the end.
  optim::Adam opt2({sch_param(0.0f)}, 0.1);
  sched::CosineAnnealingWarmupLR s2(opt2, 2, 10, 0.01);
  EXPECT_EQ(s2.get_last_lr()[0], 0.0);
  s2.step();
  s2.step();
  EXPECT_DOUBLE_EQ(s2.get_last_lr()[0], 0.1);
  for (int i = 0; i < 8; ++i) s2.step();
  EXPECT_DOUBLE_EQ(s2.get_last_lr()[0], 0.01);
  EXPECT_THROW(sched::CosineAnnealingWarmupLR(opt2, 11, 10), Error);
}

TEST(LRScheduler, OneCycleClosedFormAndMomentum) {
  // SGD: lr and momentum; Adam: lr and beta1.
  const int total = 20;
  optim::SGD sgd(sch_two_groups(1.0, 1.0), 1.0, 0.9);
  sched::OneCycleLR s(sgd, 0.5, total);
  optim::Adam adam({sch_param(0.0f)}, 1e-3, {0.9, 0.99});
  sched::OneCycleLR a(adam, 2e-2, total, 0.25, 10.0, 100.0);
  for (int e = 0; e <= total; ++e) {
    if (e > 0) {
      s.step();
      a.step();
    }
    const double lr = sch_onecycle(e, 0.5, total, 0.3, 25, 1e4, 0, 0);
    sch_expect_lr(sgd, s, {lr, lr}, e);
    EXPECT_NEAR(sgd.param_groups()[1].momentum, sch_onecycle(e, 0.5, total, 0.3, 25, 1e4, 0.95, 0.85), 1e-12) << e;
    sch_expect_lr(adam, a, {sch_onecycle(e, 2e-2, total, 0.25, 10, 100, 0, 0)}, e);
    EXPECT_NEAR(adam.param_groups()[0].betas.first, sch_onecycle(e, 2e-2, total, 0.25, 10, 100, 0.95, 0.85), 1e-12) << e;
    EXPECT_EQ(adam.param_groups()[0].betas.second, 0.99);
  }
  // Landmarks: starts at max_lr/25, peaks at max_lr at step pct*total-1, ends at max_lr/25/1e4.
  optim::SGD o2({sch_param(0.0f)}, 1.0, 0.9);
  sched::OneCycleLR s2(o2, 1.0, 10, 0.3);
  EXPECT_NEAR(s2.get_last_lr()[0], 0.04, 1e-15);
  s2.step();
  s2.step();
  EXPECT_DOUBLE_EQ(s2.get_last_lr()[0], 1.0);
  for (int i = 0; i < 7; ++i) s2.step();
  EXPECT_NEAR(s2.get_last_lr()[0], 0.04 / 1e4, 1e-15);
  s2.step();  // step == total_steps is allowed, as PyTorch
  try {
    s2.step();
    ADD_FAILURE() << "stepped past total_steps";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Tried to step 11 times. The specified number of total steps is 10"), std::string::npos);
  }
  // Without cycle_momentum the momentum is left alone.
  optim::SGD o3({sch_param(0.0f)}, 1.0, 0.5);
  sched::OneCycleLR s3(o3, 1.0, 10, 0.3, 25.0, 1e4, false);
  s3.step();
  EXPECT_EQ(o3.param_groups()[0].momentum, 0.5);
  EXPECT_THROW(sched::OneCycleLR(o3, 1.0, 0), Error);
  EXPECT_THROW(sched::OneCycleLR(o3, 1.0, 10, 1.5), Error);
}

TEST(LRScheduler, OptimizerUsesScheduledLr) {
  Tensor p = sch_param(1.0f);
  optim::SGD opt({p}, 0.5);
  sched::StepLR s(opt, 1, 0.5);
  for (float expect : {0.5f, 0.25f, 0.125f}) {
    const float before = p.data<float>()[0];
    p.set_grad(ones({1}));
    opt.step();
    s.step();
    EXPECT_FLOAT_EQ(before - p.data<float>()[0], expect);
  }
}

TEST(LRScheduler, StateDictRoundTrip) {
  optim::Adam o1({sch_param(0.0f)}, 0.1), o2({sch_param(0.0f)}, 0.1);
  sched::CosineAnnealingWarmupLR s1(o1, 3, 20, 1e-3), s2(o2, 3, 20, 1e-3);
  for (int i = 0; i < 7; ++i) s1.step();
  const optim::StateDict sd = s1.state_dict();
  EXPECT_EQ(sd.scalar("last_epoch"), 7.0);
  s2.load_state_dict(sd);
  EXPECT_EQ(s2.last_epoch(), 7);
  EXPECT_EQ(s2.get_last_lr(), s1.get_last_lr());
  for (int i = 0; i < 5; ++i) {
    s1.step();
    s2.step();
    EXPECT_EQ(o1.param_groups()[0].lr, o2.param_groups()[0].lr);
  }
  optim::SGD two(sch_two_groups(0.1, 0.2), 0.1);
  sched::StepLR s3(two, 2);
  EXPECT_THROW(s3.load_state_dict(sd), Error);  // one group into two
}
