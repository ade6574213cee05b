// GradScaler telemetry and opt-in limits: counters and the bounded history over scripted
// clean/overflowing steps, the overflowing parameters by name, min_scale's error, max_scale's
// cap, hysteresis (DeepSpeed/Megatron semantics), the state dict and checkpoint round trips, and
// the defaults' scale sequence bit for bit PyTorch's.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <unistd.h>
#include <vector>

#include "ops/op_test_util.hpp"

using namespace mixprec;

namespace {

// Two parameters, named as a module would name them; step() injects inf or NaN where asked.
struct TelemetryRig {
  Tensor w = tensor(std::vector<float>{1, 2, 3}, {3}), b = tensor(std::vector<float>{0.5f, -0.5f}, {2});
  optim::SGD opt{{w, b}, 0.1};
  TelemetryRig() {
    w.requires_grad_();
    b.requires_grad_();
  }
  enum Bad { None, BiasInf, WeightNaN, Both };
  // One iteration; returns whether the optimizer stepped.
  bool step(amp::GradScaler& s, Bad bad) {
    opt.zero_grad();
    s.scale(sum(w) + sum(b)).backward();
    if (bad == BiasInf || bad == Both) b.grad().data<float>()[1] = std::numeric_limits<float>::infinity();
    if (bad == WeightNaN || bad == Both) w.grad().data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
    const bool stepped = s.step(opt);
    s.update();
    return stepped;
  }
  std::vector<std::pair<std::string, Tensor>> names() const { return {{"layer.weight", w}, {"head.bias", b}}; }
};

std::vector<double> scales_of(const std::vector<amp::ScalerRecord>& h) {
  std::vector<double> out;
  for (const auto& r : h) out.push_back(r.scale);
  return out;
}

}  // namespace

TEST(GradScalerTelemetry, CountsAndRecordsEachUpdate) {
  TelemetryRig r;
  amp::GradScaler s({.init_scale = 1024, .growth_interval = 2});
  s.set_parameter_names(r.names());
  using B = TelemetryRig::Bad;
  const std::vector<B> script{B::None, B::BiasInf, B::None, B::None, B::WeightNaN, B::None, B::Both};
  std::vector<bool> stepped;
  for (B bad : script) stepped.push_back(r.step(s, bad));
  EXPECT_EQ(stepped, (std::vector<bool>{true, false, true, true, false, true, false}));
  EXPECT_EQ(s.steps_taken(), 4);
  EXPECT_EQ(s.skipped_steps(), 3);
  const auto h = s.history();
  ASSERT_EQ(h.size(), script.size());
  for (std::size_t i = 0; i < h.size(); ++i) {
    EXPECT_EQ(h[i].iteration, static_cast<int64_t>(i));
    EXPECT_EQ(h[i].skipped, !stepped[i]) << "iteration " << i;
    if (stepped[i]) EXPECT_TRUE(h[i].overflowing.empty()) << "iteration " << i;
  }
  // PyTorch's rule: halve at an overflow, double after 2 clean steps in a row.
  EXPECT_EQ(scales_of(h), (std::vector<double>{1024, 512, 512, 1024, 512, 512, 256}));
  EXPECT_EQ(h[1].overflowing, (std::vector<std::string>{"head.bias"}));
  EXPECT_EQ(h[4].overflowing, (std::vector<std::string>{"layer.weight"}));
  EXPECT_EQ(h[6].overflowing, (std::vector<std::string>{"layer.weight", "head.bias"}));
  EXPECT_EQ(s.last_overflowing(), h[6].overflowing);
}

TEST(GradScalerTelemetry, HistoryIsABoundedRingAndUnnamedParametersAreNumbered) {
  TelemetryRig r;
  amp::GradScaler s({.init_scale = 64, .growth_interval = 1000, .history_length = 3});
  for (int i = 0; i < 5; ++i) r.step(s, i == 3 ? TelemetryRig::BiasInf : TelemetryRig::None);
  const auto h = s.history();
  ASSERT_EQ(h.size(), 3u);
  EXPECT_EQ(h.front().iteration, 2);
  EXPECT_EQ(h.back().iteration, 4);
  EXPECT_TRUE(h[1].skipped);
  EXPECT_EQ(h[1].overflowing, (std::vector<std::string>{"parameter 1 [2]"}));  // the optimizer's numbering and the shape
  EXPECT_EQ(s.steps_taken(), 4);  // the counters cover every update, not just the ring

  amp::GradScaler none({.history_length = 0});
  r.step(none, TelemetryRig::BiasInf);
  EXPECT_TRUE(none.history().empty());
  EXPECT_EQ(none.skipped_steps(), 1);
  EXPECT_EQ(none.last_overflowing(), (std::vector<std::string>{"parameter 1 [2]"}));
}

// The defaults are torch.amp.GradScaler's rule exactly: the same float32 scale after every update
// as the reference arithmetic, for a scale that is not a power of two (rounding at every step),
// and with the options spelled out or not.
TEST(GradScalerTelemetry, DefaultsFollowPyTorchBitForBit) {
  TelemetryRig r1, r2;
  amp::GradScaler a(3.7, 1.5, 0.3, 3), b({.init_scale = 3.7, .growth_factor = 1.5, .backoff_factor = 0.3, .growth_interval = 3});
  float ref = static_cast<float>(3.7);
  int64_t tracker = 0;
  for (int i = 0; i < 40; ++i) {
    const bool bad = i % 7 == 2 || i % 11 == 5;
    r1.step(a, bad ? TelemetryRig::BiasInf : TelemetryRig::None);
    r2.step(b, bad ? TelemetryRig::BiasInf : TelemetryRig::None);
    if (bad) {  // torch._amp_update_scale_
      ref = static_cast<float>(static_cast<double>(ref) * 0.3);
      tracker = 0;
    } else if (++tracker == 3) {
      ref = static_cast<float>(static_cast<double>(ref) * 1.5);
      tracker = 0;
    }
    ASSERT_EQ(static_cast<float>(a.get_scale()), ref) << "update " << i;
    ASSERT_EQ(b.get_scale(), a.get_scale()) << "update " << i;
    ASSERT_EQ(a.get_growth_tracker(), tracker) << "update " << i;
  }
  EXPECT_EQ(b.state_dict(), a.state_dict());
  EXPECT_EQ(a.state_dict().size(), 5u);  // PyTorch's keys only
  EXPECT_FALSE(a.limits().active());
}

// DeepSpeed: the scale is clamped to min_scale; an overflow with the scale already there raises
// "Current loss scale already at minimum", here naming the parameters that overflowed.
TEST(GradScalerTelemetry, MinScaleClampsThenRaisesNamingTheParameters) {
  TelemetryRig r;
  amp::GradScaler s({.init_scale = 6, .growth_interval = 100, .min_scale = 2});
  s.set_parameter_names(r.names());
  r.step(s, TelemetryRig::BiasInf);
  EXPECT_EQ(s.get_scale(), 3.0);
  r.step(s, TelemetryRig::BiasInf);
  EXPECT_EQ(s.get_scale(), 2.0);  // 1.5 clamped
  const std::string err = mixprec::testing::error_of([&] { r.step(s, TelemetryRig::BiasInf); });
  for (const char* part : {"GradScaler.update", "Current loss scale already at minimum", "min_scale 2", "head.bias", "iteration 2"})
    EXPECT_NE(err.find(part), std::string::npos) << part << " not in: " << err;
  // The step was recorded and the iteration ended: the scaler goes on (a caller may lower min_scale and retry).
  EXPECT_EQ(s.get_scale(), 2.0);
  EXPECT_EQ(s.skipped_steps(), 3);
  EXPECT_TRUE(s.history().back().skipped);
  EXPECT_TRUE(r.step(s, TelemetryRig::None));
  EXPECT_EQ(s.steps_taken(), 1);

  EXPECT_NE(mixprec::testing::error_of([] { amp::GradScaler bad({.init_scale = 4, .min_scale = 8}); }).find("min_scale <= init_scale"),
            std::string::npos);
  EXPECT_NE(mixprec::testing::error_of([] { amp::GradScaler bad({.hysteresis = 0}); }).find("hysteresis >= 1"), std::string::npos);
}

TEST(GradScalerTelemetry, MaxScaleCapsGrowth) {
  TelemetryRig r;
  amp::GradScaler s({.init_scale = 8, .growth_interval = 1, .max_scale = 40});
  std::vector<double> scales;
  for (int i = 0; i < 4; ++i) {
    r.step(s, TelemetryRig::None);
    scales.push_back(s.get_scale());
  }
  EXPECT_EQ(scales, (std::vector<double>{16, 32, 40, 40}));
  r.step(s, TelemetryRig::BiasInf);
  EXPECT_EQ(s.get_scale(), 20.0);  // backing off from the cap as usual
}

// Megatron's DynamicGradScaler / DeepSpeed's DynamicLossScaler: every overflowing step is
// skipped, but the scale backs off only at the hysteresis-th overflow; from then on every
// overflow backs off until the scale grows again, which refills the hysteresis (a clean step
// alone refills it only with consecutive_hysteresis).
TEST(GradScalerTelemetry, HysteresisDelaysTheBackoff) {
  using B = TelemetryRig::Bad;
  auto run = [](bool consecutive, const std::vector<B>& script) {
    TelemetryRig r;
    amp::GradScaler s({.init_scale = 1024, .growth_interval = 3, .hysteresis = 2, .consecutive_hysteresis = consecutive});
    std::vector<double> scales;
    for (B bad : script) {
      const Tensor before = r.b.detach().clone();
      const bool stepped = r.step(s, bad);
      EXPECT_EQ(stepped, bad == B::None);
      if (!stepped) EXPECT_EQ(mixprec::testing::rel_error(r.b.detach(), before), 0.0);  // skipped: untouched
      scales.push_back(s.get_scale());
    }
    EXPECT_EQ(s.skipped_steps(), static_cast<int64_t>(std::count(script.begin(), script.end(), B::BiasInf)));
    return scales;
  };
  const std::vector<B> script{B::BiasInf, B::BiasInf, B::BiasInf, B::None, B::None, B::None,
                              B::BiasInf, B::None,    B::BiasInf, B::None, B::BiasInf};
  // Held, backed off, backed off (hysteresis used up), grown after 3 clean (refilled), held, clean,
  // backed off (a clean step does not refill it), clean, backed off.
  EXPECT_EQ(run(false, script), (std::vector<double>{1024, 512, 256, 256, 256, 512, 512, 512, 256, 256, 128}));
  // consecutive_hysteresis: each clean step refills it, so an isolated overflow never backs off.
  EXPECT_EQ(run(true, script), (std::vector<double>{1024, 512, 256, 256, 256, 512, 512, 512, 512, 512, 512}));
}

TEST(GradScalerTelemetry, StateDictCarriesTheLimitsAndTheHysteresisMidSequence) {
  TelemetryRig r1, r2;
  amp::GradScaler a({.init_scale = 256, .growth_interval = 4, .min_scale = 1, .hysteresis = 3});
  r1.step(a, TelemetryRig::None);
  r1.step(a, TelemetryRig::BiasInf);  // held: 2 left
  EXPECT_EQ(a.hysteresis_left(), 2);
  const auto sd = a.state_dict();
  EXPECT_EQ(sd.at("_hysteresis_tracker"), 2.0);
  EXPECT_EQ(sd.at("hysteresis"), 3.0);
  EXPECT_EQ(sd.at("min_scale"), 1.0);
  EXPECT_TRUE(std::isinf(sd.at("max_scale")));

  amp::GradScaler b;  // default options: the state dict brings the limits
  b.load_state_dict(sd);
  EXPECT_EQ(b.state_dict(), sd);
  EXPECT_EQ(b.hysteresis_left(), 2);
  std::vector<double> sa, sb;
  for (TelemetryRig::Bad bad : {TelemetryRig::BiasInf, TelemetryRig::BiasInf, TelemetryRig::None}) {
    r1.step(a, bad);
    r2.step(b, bad);
    sa.push_back(a.get_scale());
    sb.push_back(b.get_scale());
  }
  EXPECT_EQ(sa, (std::vector<double>{256, 128, 128}));  // the third overflow overall backs off
  EXPECT_EQ(sb, sa);

  // A PyTorch state dict (no limit keys) keeps the scaler's limits and refills its hysteresis.
  amp::GradScaler c({.hysteresis = 3});
  r1.step(c, TelemetryRig::BiasInf);
  c.load_state_dict({{"scale", 8}, {"growth_factor", 2}, {"backoff_factor", 0.5}, {"growth_interval", 10}, {"_growth_tracker", 0}});
  EXPECT_EQ(c.limits().hysteresis, 3);
  EXPECT_EQ(c.hysteresis_left(), 3);

  auto broken = sd;
  broken["_hysteresis_tracker"] = 0;
  amp::GradScaler d;
  EXPECT_NE(mixprec::testing::error_of([&] { d.load_state_dict(broken); }).find("_hysteresis_tracker"), std::string::npos);
  broken.erase("min_scale");
  EXPECT_NE(mixprec::testing::error_of([&] { d.load_state_dict(broken); }).find("missing key 'min_scale'"), std::string::npos);
  EXPECT_FALSE(d.limits().active());  // a refused load changes nothing
}

TEST(GradScalerTelemetry, CheckpointKeepsTheCounters) {
  TelemetryRig r;
  amp::GradScaler a({.init_scale = 512, .growth_interval = 3, .hysteresis = 2});
  for (TelemetryRig::Bad bad : {TelemetryRig::None, TelemetryRig::BiasInf, TelemetryRig::None, TelemetryRig::BiasInf})
    r.step(a, bad);
  const std::string path =
      (std::filesystem::temp_directory_path() / ("mixprec_scaler_telemetry_" + std::to_string(::getpid()) + ".safetensors")).string();
  io::CheckpointParts parts;
  parts.scaler = &a;
  io::save_checkpoint(path, parts);
  amp::GradScaler b;
  parts.scaler = &b;
  io::load_checkpoint(path, parts);
  std::filesystem::remove(path);
  EXPECT_EQ(b.steps_taken(), 2);
  EXPECT_EQ(b.skipped_steps(), 2);
  EXPECT_EQ(b.state_dict(), a.state_dict());
  EXPECT_EQ(b.counters_state_dict(), a.counters_state_dict());
  r.step(b, TelemetryRig::None);
  EXPECT_EQ(b.history().back().iteration, 4);  // numbering goes on from the checkpoint
  EXPECT_NE(mixprec::testing::error_of([&] { b.load_counters_state_dict({{"updates", 2}, {"skipped_steps", 3}}); }).find("skipped_steps <= updates"),
            std::string::npos);
}
