// GradScaler against torch.amp.GradScaler's semantics: scale sequences with injected infs,
// growth, errors, skipped steps, several optimizers, master gradients, accumulation, and a
// float16 autocast training run.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <vector>

#include "ops/op_test_util.hpp"

using namespace mixprec;

namespace {

Tensor gs_param(std::vector<float> v, DType d = DType::Float32) {
  const auto n = static_cast<int64_t>(v.size());
  Tensor t = tensor(v, {n}).to(d);
  t.requires_grad_();
  return t;
}

std::vector<uint8_t> gs_bytes(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  return std::vector<uint8_t>(p, p + t.nbytes());
}

// The rule of torch._amp_update_scale_, written out independently of the library.
struct GsExpected {
  double scale;
  int64_t tracker = 0;
  int64_t interval;
  void update(bool inf) {
    if (inf) {
      scale *= 0.5;
      tracker = 0;
    } else if (++tracker == interval) {
      scale *= 2.0;
      tracker = 0;
    }
  }
};

Tensor gs_mse(const Tensor& pred, const Tensor& y) {
  const Tensor d = sub(pred, y);
  return mean(mul(d, d));
}

}  // namespace

TEST(GradScaler, InjectedInfsGiveTorchScaleSequence) {
  // growth_interval 3, infs at iterations 1, 5, 6 (and 11). Expected, by hand:
  const std::vector<double> scales = {1024, 512, 512, 512, 1024, 512, 256, 256, 256, 512, 512, 256, 256};
  const std::vector<int64_t> trackers = {1, 0, 1, 2, 0, 0, 0, 1, 2, 0, 1, 0, 1};
  const std::set<int> inf_at = {1, 5, 6, 11};
  GsExpected model{1024.0, 0, 3};

  Tensor w = gs_param({1.0f, 2.0f, 3.0f});
  const Tensor x = tensor({0.5f, -1.0f, 2.0f});
  optim::SGD opt({w}, 0.125);
  amp::GradScaler scaler(1024.0, 2.0, 0.5, 3);
  EXPECT_EQ(scaler.get_scale(), 1024.0);
  for (int it = 0; it < static_cast<int>(scales.size()); ++it) {
    SCOPED_TRACE("iteration " + std::to_string(it));
    opt.zero_grad();
    scaler.scale(sum(mul(w, x))).backward();
    const float s = static_cast<float>(scaler.get_scale());
    EXPECT_EQ(w.grad().data<float>()[0], 0.5f * s);  // the gradient of the scaled loss
    const bool inf = inf_at.count(it) > 0;
    if (inf) w.grad().data<float>()[1] = it == 6 ? NAN : INFINITY;
    const std::vector<float> before(w.data<float>(), w.data<float>() + 3);
    const bool stepped = scaler.step(opt);
    EXPECT_EQ(stepped, !inf);
    EXPECT_EQ(scaler.found_inf(opt), inf);
    for (int k = 0; k < 3; ++k) {
      const float expect = inf ? before[k] : before[k] - 0.125f * x.data<float>()[k];  // unscaled exactly: powers of 2
      EXPECT_EQ(w.data<float>()[k], expect);
    }
    scaler.update();
    model.update(inf);
    EXPECT_EQ(scaler.get_scale(), scales[it]);
    EXPECT_EQ(scaler.get_growth_tracker(), trackers[it]);
    EXPECT_EQ(scaler.get_scale(), model.scale);
    EXPECT_EQ(scaler.get_growth_tracker(), model.tracker);
  }
}

TEST(GradScaler, DefaultsGrowthCapAndNoFloor) {
  amp::GradScaler d;
  EXPECT_EQ(d.get_scale(), 65536.0);
  EXPECT_EQ(d.get_growth_factor(), 2.0);
  EXPECT_EQ(d.get_backoff_factor(), 0.5);
  EXPECT_EQ(d.get_growth_interval(), 2000);
  EXPECT_TRUE(d.is_enabled());
  EXPECT_NE(mixprec::testing::error_of([] { amp::GradScaler(65536.0, 1.0); }).find("The growth factor must be > 1.0."), std::string::npos);
  EXPECT_NE(mixprec::testing::error_of([] { amp::GradScaler(65536.0, 2.0, 1.0); }).find("The backoff factor must be < 1.0."), std::string::npos);
  EXPECT_EQ(mixprec::testing::error_of([] { amp::GradScaler(65536.0, 1.0, 1.0, 2000, false); }), "");  // only checked when enabled

  // Growth never reaches inf: 2^127 * 2 overflows float32, so the scale stays (the tracker resets).
  Tensor w = gs_param({1.0f});
  optim::SGD opt({w}, 0.0);
  amp::GradScaler big(std::ldexp(1.0, 127), 2.0, 0.5, 1);
  for (int i = 0; i < 2; ++i) {
    opt.zero_grad();
    big.scale(sum(w)).backward();
    EXPECT_TRUE(big.step(opt));
    big.update();
    EXPECT_EQ(big.get_scale(), std::ldexp(1.0, 127));
    EXPECT_EQ(big.get_growth_tracker(), 0);
  }
  // No floor: the scale falls below 1.
  amp::GradScaler small(1.0);
  for (double expect : {0.5, 0.25}) {
    opt.zero_grad();
    small.scale(sum(w)).backward();
    w.grad().data<float>()[0] = INFINITY;
    EXPECT_FALSE(small.step(opt));
    small.update();
    EXPECT_EQ(small.get_scale(), expect);
  }
  // update(new_scale) sets it (as float32) and leaves the tracker.
  small.update(3.0);
  EXPECT_EQ(small.get_scale(), 3.0);
  small.update(0.1);
  EXPECT_EQ(small.get_scale(), static_cast<double>(0.1f));
}

TEST(GradScaler, PyTorchErrorMessages) {
  Tensor w = gs_param({1.0f, 2.0f});
  optim::SGD opt({w}, 0.1);
  amp::GradScaler scaler;
  EXPECT_NE(mixprec::testing::error_of([&] { scaler.unscale_(opt); }).find("Attempted unscale_ but _scale is None."), std::string::npos);
  EXPECT_NE(mixprec::testing::error_of([&] { scaler.update(); }).find("Attempted update but _scale is None."), std::string::npos);

  scaler.scale(sum(w)).backward();
  scaler.unscale_(opt);
  EXPECT_EQ(mixprec::testing::error_of([&] { scaler.unscale_(opt); }), "unscale_() has already been called on this optimizer since the last update().");
  EXPECT_TRUE(scaler.step(opt));  // UNSCALED -> STEPPED without unscaling again
  EXPECT_EQ(w.data<float>()[0], 0.9f);
  EXPECT_EQ(mixprec::testing::error_of([&] { scaler.step(opt); }), "step() has already been called since the last update().");
  EXPECT_EQ(mixprec::testing::error_of([&] { scaler.unscale_(opt); }), "unscale_() is being called after step().");
  scaler.update();
  EXPECT_EQ(mixprec::testing::error_of([&] { scaler.update(); }), "No inf checks were recorded prior to update.");
  opt.zero_grad();
  EXPECT_EQ(mixprec::testing::error_of([&] { scaler.step(opt); }), "No inf checks were recorded for this optimizer.");
  EXPECT_NE(mixprec::testing::error_of([&] { scaler.load_state_dict({}); }).find("The source state dict is empty"), std::string::npos);
}

TEST(GradScaler, StateDictRoundTrip) {
  Tensor w = gs_param({1.0f});
  optim::SGD opt({w}, 0.1);
  amp::GradScaler a(256.0, 4.0, 0.25, 5);
  for (int i = 0; i < 3; ++i) {
    opt.zero_grad();
    a.scale(sum(w)).backward();
    if (i == 0) w.grad().data<float>()[0] = INFINITY;
    a.step(opt);
    a.update();
  }
  const auto sd = a.state_dict();
  ASSERT_EQ(sd.size(), 5u);
  EXPECT_EQ(sd.at("scale"), 64.0);
  EXPECT_EQ(sd.at("growth_factor"), 4.0);
  EXPECT_EQ(sd.at("backoff_factor"), 0.25);
  EXPECT_EQ(sd.at("growth_interval"), 5.0);
  EXPECT_EQ(sd.at("_growth_tracker"), 2.0);

  amp::GradScaler b;
  b.load_state_dict(sd);
  EXPECT_EQ(b.get_scale(), 64.0);
  EXPECT_EQ(b.get_growth_tracker(), 2);
  EXPECT_EQ(b.state_dict(), sd);
  // Continue both: same trajectory (3 more clean steps -> growth by 4 after 5 in a row).
  for (amp::GradScaler* s : {&a, &b}) {
    for (int i = 0; i < 3; ++i) {
      opt.zero_grad();
      s->scale(sum(w)).backward();
      s->step(opt);
      s->update();
    }
  }
  EXPECT_EQ(a.get_scale(), 256.0);
  EXPECT_EQ(b.get_scale(), 256.0);
  EXPECT_EQ(a.get_growth_tracker(), 0);
  EXPECT_EQ(b.get_growth_tracker(), 0);

  amp::GradScaler off(65536.0, 2.0, 0.5, 2000, false);
  EXPECT_TRUE(off.state_dict().empty());
  off.load_state_dict({});  // no-op when disabled
}

TEST(GradScaler, DisabledIsPassThrough) {
  Tensor w = gs_param({1.0f, 2.0f});
  optim::SGD opt({w}, 0.5);
  amp::GradScaler off(65536.0, 2.0, 0.5, 2000, false);
  EXPECT_FALSE(off.is_enabled());
  Tensor loss = sum(mul(w, tensor({1.0f, 3.0f})));
  Tensor scaled = off.scale(loss);
  EXPECT_TRUE(scaled.is_same(loss));
  const std::vector<Tensor> many = off.scale(std::vector<Tensor>{loss, loss});
  EXPECT_TRUE(many[1].is_same(loss));
  scaled.backward();
  off.unscale_(opt);  // no-op
  EXPECT_EQ(w.grad().data<float>()[1], 3.0f);
  EXPECT_TRUE(off.step(opt));
  EXPECT_EQ(w.data<float>()[1], 0.5f);
  EXPECT_TRUE(off.step(opt));  // no state machine
  off.update();
  EXPECT_EQ(off.get_scale(), 1.0);
  EXPECT_EQ(off.get_growth_tracker(), 0);
}

TEST(GradScaler, ScaleMultipliesLossesInFloat32) {
  amp::GradScaler s(1024.0);
  Tensor a = gs_param({0.25f}), b = gs_param({3.0f}, DType::BFloat16);
  const auto out = s.scale(std::vector<Tensor>{sum(a), sum(b)});
  EXPECT_EQ(out[0].item<float>(), 256.0f);
  EXPECT_EQ(out[1].dtype(), DType::Float32);
  EXPECT_EQ(out[1].item<float>(), 3072.0f);
}

TEST(GradScaler, SkippedStepLeavesEverythingBitIdentical) {
  // bf16 parameters with AdamW: the weights, fp32 master weights and moment buffers must not move.
  Tensor w = gs_param({0.3f, -1.2f, 2.5f, 0.01f}, DType::BFloat16);
  Tensor b = gs_param({0.5f});
  const Tensor x = tensor({1.0f, 2.0f, -0.5f, 4.0f});
  optim::AdamW opt({w, b}, 1e-2, {0.9, 0.999}, 1e-8, 0.1, true);
  amp::GradScaler scaler(128.0);
  auto iteration = [&](bool inject) {
    opt.zero_grad();
    Tensor loss = add(sum(mul(w, x)), mul(sum(b), 3.0));
    scaler.scale(loss).backward();
    if (inject) w.grad().data<bfloat16>()[2] = bfloat16(INFINITY);
    const bool stepped = scaler.step(opt);
    scaler.update();
    return stepped;
  };
  ASSERT_TRUE(iteration(false));
  ASSERT_TRUE(iteration(false));
  const auto snap = [&] {
    std::vector<std::vector<uint8_t>> s = {gs_bytes(w), gs_bytes(b), gs_bytes(opt.master_weight(0))};
    for (std::size_t i = 0; i < 2; ++i)
      for (const auto& [k, t] : opt.state(i).buffers) s.push_back(gs_bytes(t));
    return s;
  };
  const auto before = snap();
  const int64_t steps = opt.state(0).step;
  ASSERT_EQ(before.size(), 3u + 3u + 3u);
  EXPECT_FALSE(iteration(true));
  const auto after = snap();
  for (std::size_t i = 0; i < before.size(); ++i) {
    ASSERT_EQ(before[i].size(), after[i].size());
    EXPECT_EQ(std::memcmp(before[i].data(), after[i].data(), before[i].size()), 0) << "buffer " << i << " changed";
  }
  EXPECT_EQ(opt.state(0).step, steps);
  EXPECT_EQ(scaler.get_scale(), 64.0);
  ASSERT_TRUE(iteration(false));  // and training continues
  EXPECT_NE(gs_bytes(opt.master_weight(0)), before[2]);
  EXPECT_EQ(opt.state(0).step, steps + 1);
}

TEST(GradScaler, TwoOptimizersOnlyOneSeesInf) {
  Tensor w1 = gs_param({1.0f, 1.0f}), w2 = gs_param({2.0f});
  optim::SGD o1({w1}, 0.25), o2({w2}, 0.25);
  amp::GradScaler scaler(64.0, 2.0, 0.5, 2);
  auto backward = [&] {
    o1.zero_grad();
    o2.zero_grad();
    scaler.scale(add(sum(w1), sum(w2))).backward();
  };
  backward();
  w2.grad().data<float>()[0] = INFINITY;
  EXPECT_TRUE(scaler.step(o1));
  EXPECT_FALSE(scaler.step(o2));
  EXPECT_EQ(w1.data<float>()[0], 0.75f);
  EXPECT_EQ(w2.data<float>()[0], 2.0f);
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 32.0);  // any inf backs the shared scale off
  EXPECT_EQ(scaler.get_growth_tracker(), 0);
  // A clean iteration for both: each steps, and the tracker counts one iteration, not two.
  backward();
  scaler.unscale_(o2);
  EXPECT_EQ(scaler.stage(o2), amp::GradScaler::OptState::UNSCALED);
  EXPECT_EQ(scaler.stage(o1), amp::GradScaler::OptState::READY);
  EXPECT_TRUE(scaler.step(o1));
  EXPECT_TRUE(scaler.step(o2));
  scaler.update();
  EXPECT_EQ(w2.data<float>()[0], 1.75f);
  EXPECT_EQ(scaler.get_growth_tracker(), 1);
  EXPECT_EQ(scaler.get_scale(), 32.0);
}

TEST(GradScaler, SixteenBitGradientsUnscaleIntoFloat32MasterGradients) {
  // 1e-8 * 65536 is a normal float16, but 1e-8 itself underflows to 0 in float16: the
  // master-gradient buffer keeps it, .grad() gets the rounded (zero) value, step() uses the buffer.
  Tensor p = gs_param({0.0f, 0.0f}, DType::Float16);
  optim::SGD opt({p}, 1.0);
  amp::GradScaler scaler;
  scaler.scale(sum(mul(p, tensor({1e-8f, 1e-3f})))).backward();
  ASSERT_EQ(p.grad().dtype(), DType::Float16);
  const float g0 = static_cast<float>(half(1e-8f * 65536.0f)) / 65536.0f;
  const float g1 = static_cast<float>(half(1e-3f * 65536.0f)) / 65536.0f;
  scaler.unscale_(opt);
  EXPECT_EQ(static_cast<float>(p.grad().data<half>()[0]), 0.0f);  // what float16 unscaling would leave
  EXPECT_NEAR(static_cast<float>(p.grad().data<half>()[1]), 1e-3f, 2e-6);
  const auto grads = opt.fp32_grads();
  ASSERT_EQ(grads.size(), 1u);
  EXPECT_EQ(grads[0].second.dtype(), DType::Float32);
  EXPECT_EQ(grads[0].second.data<float>()[0], g0);
  EXPECT_NEAR(g0, 1e-8f, 1e-11);
  EXPECT_TRUE(scaler.step(opt));
  scaler.update();
  EXPECT_EQ(opt.master_weight(0).data<float>()[0], -g0);
  EXPECT_EQ(opt.master_weight(0).data<float>()[1], -g1);
}

TEST(GradScaler, ClipAfterUnscaleSeesUnscaledFloat32Gradients) {
  Tensor p = gs_param({0.0f, 0.0f}, DType::Float16);
  Tensor q = gs_param({0.0f});
  optim::SGD opt({p, q}, 1.0);
  amp::GradScaler scaler;
  scaler.scale(add(sum(mul(p, tensor({3e-6f, 4e-6f}))), mul(sum(q), 1e-5))).backward();
  scaler.unscale_(opt);
  const float a = static_cast<float>(half(3e-6f * 65536.0f)) / 65536.0f;
  const float b = static_cast<float>(half(4e-6f * 65536.0f)) / 65536.0f;
  const float c = 1e-5f;
  const double norm = std::sqrt(double(a) * a + double(b) * b + double(c) * c);
  const double got = optim::clip_grad_norm_(opt, norm / 2);
  EXPECT_NEAR(got, norm, 1e-6 * norm);
  ASSERT_TRUE(scaler.step(opt));
  const float coef = static_cast<float>((norm / 2) / (got + 1e-6));
  EXPECT_NEAR(opt.master_weight(0).data<float>()[0], -a * coef, 1e-6 * a);
  EXPECT_NEAR(opt.master_weight(0).data<float>()[1], -b * coef, 1e-6 * b);
  EXPECT_NEAR(q.data<float>()[0], -c * coef, 1e-6 * c);
}

TEST(GradScaler, AccumulationOverMicroBatchesEqualsOneBigBatch) {
  Generator gen(7);
  const Tensor X = randn({32, 5}, kFloat32, gen), Y = randn({32, 3}, kFloat32, gen);
  const Tensor W0 = mul(randn({3, 5}, kFloat32, gen), 0.3), B0 = randn({3}, kFloat32, gen);
  Tensor wa = W0.clone().requires_grad_(), ba = B0.clone().requires_grad_();
  Tensor wb = W0.clone().requires_grad_(), bb = B0.clone().requires_grad_();
  optim::SGD oa({wa, ba}, 0.1, 0.9), ob({wb, bb}, 0.1, 0.9);
  amp::GradScaler scaler;
  for (int it = 0; it < 3; ++it) {
    oa.zero_grad();
    for (int k = 0; k < 4; ++k) {
      const Tensor loss = div(gs_mse(linear(X.narrow(0, 8 * k, 8), wa, ba), Y.narrow(0, 8 * k, 8)), 4.0);
      scaler.scale(loss).backward();
    }
    ASSERT_TRUE(scaler.step(oa));
    scaler.update();
    ob.zero_grad();
    gs_mse(linear(X, wb, bb), Y).backward();
    ob.step();
  }
  for (auto [a, b] : {std::pair{wa, wb}, std::pair{ba, bb}}) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < a.numel(); ++i) {
      const double d = a.data<float>()[i] - b.data<float>()[i];
      num += d * d;
      den += double(b.data<float>()[i]) * b.data<float>()[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-6);
  }
}

// A 2-layer MLP trained 300 steps under float16 autocast with the scaler, an inf injected into
// a gradient every 50 steps, against the same run in float32 that skips the same steps. The
// scale starts at 4096 so that no gradient overflows by itself: then exactly the injected
// steps are skipped. 5%: float16 activations perturb each step by ~1e-3 relative.
TEST(GradScaler, Float16AutocastTrainingTracksFloat32) {
  Generator gen(123);
  const Tensor X = randn({256, 8}, kFloat32, gen);
  const Tensor teacher = mul(randn({1, 8}, kFloat32, gen), 0.5);
  const Tensor Y = add(tanh(linear(X, teacher)), mul(relu(X.narrow(1, 0, 1)), 0.5));
  const Tensor W1 = mul(randn({16, 8}, kFloat32, gen), 0.3), W2 = mul(randn({1, 16}, kFloat32, gen), 0.3);

  struct Run {
    Tensor w1, b1, w2, b2;
    std::vector<int> skipped;
  };
  auto forward = [&](Run& r) { return linear(relu(linear(X, r.w1, r.b1)), r.w2, r.b2); };
  auto train = [&](bool amp_on) {
    Run r{W1.clone().requires_grad_(), zeros({16}).requires_grad_(), W2.clone().requires_grad_(), zeros({1}).requires_grad_(), {}};
    optim::Adam opt({r.w1, r.b1, r.w2, r.b2}, 1e-2);
    amp::GradScaler scaler(4096.0, 2.0, 0.5, 2000, amp_on);
    for (int step = 1; step <= 300; ++step) {
      opt.zero_grad();
      Tensor loss;
      {
        autocast ac{Device::CPU, DType::Float16, amp_on};
        const Tensor pred = forward(r);
        if (amp_on) {
          EXPECT_EQ(pred.dtype(), DType::Float16);
        }
        loss = gs_mse(pred, Y);
      }
      EXPECT_EQ(loss.dtype(), DType::Float32);
      scaler.scale(loss).backward();
      const bool inject = step % 50 == 0;
      if (inject) r.w1.grad().data<float>()[3] = INFINITY;
      bool stepped;
      if (amp_on) {
        stepped = scaler.step(opt);
        scaler.update();
      } else {
        stepped = !inject;
        if (stepped) opt.step();
      }
      if (!stepped) r.skipped.push_back(step);
    }
    return r;
  };
  Run half_run = train(true);
  Run full_run = train(false);
  EXPECT_EQ(half_run.skipped, (std::vector<int>{50, 100, 150, 200, 250, 300}));
  for (const Tensor& t : {half_run.w1, half_run.w2}) {
    for (int64_t i = 0; i < t.numel(); ++i) {
      ASSERT_TRUE(std::isfinite(t.data<float>()[i]));
    }
  }
  const double initial = gs_mse(linear(relu(linear(X, W1, zeros({16}))), W2, zeros({1})), Y).item<float>();
  const double l16 = gs_mse(forward(half_run), Y).item<float>();
  const double l32 = gs_mse(forward(full_run), Y).item<float>();
  std::printf("[ loss     ] initial %.5g, float32 %.5g, float16 autocast + scaler %.5g\n", initial, l32, l16);
  EXPECT_LT(l32, 0.2 * initial) << "the float32 run did not learn";
  EXPECT_LT(std::abs(l16 - l32), 0.05 * l32) << "float16+scaler loss " << l16 << " vs float32 " << l32;
}
