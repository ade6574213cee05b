// Overflow-aware autocast (PrecisionTrace::auto_pin): an op whose 16-bit outputs overflow in K of
// the last N steps runs in float32 from then on, reported once. The model is the fp32-head
// pattern's (examples/patterns/fp32_head.cpp): a regression head predicting ~200,000, beyond
// float16's 65,504, which there needs a hand-written float32 scope.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ops/op_test_util.hpp"

using namespace mixprec;

namespace {

struct PriceRegressor {
  explicit PriceRegressor(Generator& gen)
      : body(std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
            std::make_shared<nn::Linear>(16, 64, true, gen), std::make_shared<nn::ReLU>(),
            std::make_shared<nn::Linear>(64, 64, true, gen), std::make_shared<nn::ReLU>()})),
        head(std::make_shared<nn::Linear>(64, 1, true, gen)) {
    no_grad ng;
    head->bias.fill_(200000.0);  // the mean price, as the pattern initialises it
  }
  // The whole model under float16 autocast: no nested float32 scope for the head.
  Tensor forward(const Tensor& x) { return head->forward(body->forward(x)); }
  std::vector<Tensor> parameters() const {
    std::vector<Tensor> ps = body->parameters();
    for (const Tensor& p : head->parameters()) ps.push_back(p);
    return ps;
  }
  std::shared_ptr<nn::Sequential> body;
  std::shared_ptr<nn::Linear> head;
};

// The pattern trains at 3e-3; 0.1 makes the loss fall visibly within the test's few steps.
constexpr double kHeadLr = 0.1;
constexpr double kHeadDecrease = 0.5;

struct HeadRun {
  std::vector<bool> skipped;
  std::vector<double> loss;
  std::vector<std::string> reports;
  std::vector<amp::PinEvent> pins;
  amp::Policy linear_policy_while_attached = amp::Policy::Unlisted;
};

enum class HeadMode { Float32, Fp16, Fp16AutoPin };

HeadRun train_head(HeadMode mode, int steps) {
  const bool auto_pin = mode == HeadMode::Fp16AutoPin;
  Generator data_gen(100);
  const Tensor x = randn({256, 16}, DType::Float32, data_gen);
  const Tensor w = randn({16, 1}, DType::Float32, data_gen);
  const Tensor y = matmul(x, w) * 20000.0 + 200000.0;
  Generator gen(0);
  PriceRegressor model(gen);
  optim::AdamW opt(model.parameters(), kHeadLr);
  amp::GradScaler scaler({.enabled = mode != HeadMode::Float32});
  HeadRun out;
  amp::PrecisionTrace trace(DType::Float16);
  if (auto_pin)
    trace.auto_pin({.overflow_steps = 2, .window = 4, .sink = [&](const std::string& m) { out.reports.push_back(m); }});
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    Tensor loss;
    {
      autocast ac(Device::CPU, DType::Float16, /*enabled=*/mode != HeadMode::Float32);
      loss = mse_loss(model.forward(x), y) / 1e8;  // in units of 10,000^2
    }
    scaler.scale(loss).backward();
    out.skipped.push_back(!scaler.step(opt));
    scaler.update();  // also ends the trace's step
    out.loss.push_back(loss.item<double>());
  }
  out.pins = trace.pinned();
  out.linear_policy_while_attached = amp::policy_of(OpId::linear);
  EXPECT_EQ(trace.steps(), auto_pin ? steps : 0);  // the GradScaler ends the steps of an auto-pin trace
  return out;
}

}  // namespace

TEST(AutocastAutoPin, Fp32HeadPatternTrainsWithoutAHandWrittenScope) {
  constexpr int kSteps = 30;
  // Without auto-pin the head's float16 linear overflows: every step is skipped.
  const HeadRun plain = train_head(HeadMode::Fp16, kSteps);
  for (int i = 0; i < kSteps; ++i) {
    EXPECT_TRUE(plain.skipped[i]) << "step " << i;
    EXPECT_FALSE(std::isfinite(plain.loss[i])) << "step " << i;
  }
  EXPECT_TRUE(plain.pins.empty());
  EXPECT_EQ(plain.linear_policy_while_attached, amp::Policy::LowerPrecision);

  // With it: the two overflowing steps pin `linear` to float32, reported once; then every step
  // is taken, and training goes on as the float32 model's from its first step (the skipped steps
  // left the weights and AdamW's state as they were; the loss scale is a power of two).
  const HeadRun pinned = train_head(HeadMode::Fp16AutoPin, kSteps);
  const HeadRun fp32 = train_head(HeadMode::Float32, kSteps - 2);
  EXPECT_TRUE(pinned.skipped[0]);
  EXPECT_TRUE(pinned.skipped[1]);
  for (int i = 2; i < kSteps; ++i) {
    EXPECT_FALSE(pinned.skipped[i]) << "step " << i;
    EXPECT_NEAR(pinned.loss[i], fp32.loss[i - 2], 1e-6 * std::fabs(fp32.loss[i - 2])) << "step " << i;
  }
  EXPECT_LT(pinned.loss.back(), kHeadDecrease * pinned.loss[2]);
  ASSERT_EQ(pinned.pins.size(), 1u);
  EXPECT_EQ(pinned.pins[0].op, "linear");
  EXPECT_EQ(pinned.pins[0].step, 2);
  ASSERT_EQ(pinned.reports.size(), 1u);
  EXPECT_EQ(pinned.reports[0], pinned.pins[0].message);
  for (const char* part : {"'linear'", "float32", "2 of the last 4 steps"})
    EXPECT_NE(pinned.reports[0].find(part), std::string::npos) << part << " not in: " << pinned.reports[0];
  EXPECT_EQ(pinned.linear_policy_while_attached, amp::Policy::Float32);
  // The pin lives with the trace: detached, the table's policy is back.
  EXPECT_EQ(amp::policy_of(OpId::linear), amp::Policy::LowerPrecision);
}

// K of the last N steps, counted per step; a NaN passed along (non-finite inputs) is not the
// op's overflow; the pin changes the dtype the op runs in.
TEST(AutocastAutoPin, CountsOverflowingStepsInAWindow) {
  const Tensor big = full({2, 2}, 300.0), ok = full({2, 2}, 1.0);
  const Tensor nan_in = full({2, 2}, std::numeric_limits<double>::quiet_NaN());
  auto product = [&](const Tensor& a) {
    autocast ac(Device::CPU, DType::Float16);
    return matmul(a, big);  // 300 * 300 * 2 = 180,000: inf in float16
  };
  std::vector<std::string> reports;
  {
    amp::PrecisionTrace trace(DType::Float16);
    trace.auto_pin({.overflow_steps = 2, .window = 3, .sink = [&](const std::string& m) { reports.push_back(m); }});
    EXPECT_FALSE(std::isfinite(sum(product(big).to(DType::Float32)).item<double>()));
    trace.step();  // window: 1
    product(ok);
    trace.step();  // 10
    product(ok);
    trace.step();  // 100
    product(big);
    trace.step();  // 001: the first overflow fell out of the window
    EXPECT_FALSE(trace.is_pinned(OpId::matmul));
    EXPECT_FALSE(std::isfinite(sum(product(nan_in).to(DType::Float32)).item<double>()));
    trace.step();  // 010: NaN in, NaN out is not counted
    EXPECT_FALSE(trace.is_pinned(OpId::matmul));
    EXPECT_EQ(amp::policy_of(OpId::matmul), amp::Policy::LowerPrecision);
    product(big);
    trace.step();  // 101: pinned
    EXPECT_TRUE(trace.is_pinned(OpId::matmul));
    EXPECT_EQ(amp::policy_of(OpId::matmul), amp::Policy::Float32);
    const Tensor p = product(big);
    EXPECT_EQ(p.dtype(), DType::Float32);
    EXPECT_EQ(max(p).item<double>(), 180000.0);
    for (int i = 0; i < 5; ++i) {
      product(big);
      trace.step();
    }
    ASSERT_EQ(trace.pinned().size(), 1u);
    EXPECT_EQ(trace.pinned()[0].step, 6);
    EXPECT_NE(mixprec::testing::error_of([&] { trace.auto_pin({.overflow_steps = 4, .window = 3}); }).find("overflow_steps <= window"),
              std::string::npos);
  }
  EXPECT_EQ(reports.size(), 1u);  // once
  EXPECT_EQ(amp::policy_of(OpId::matmul), amp::Policy::LowerPrecision);
  // Without auto-pin a trace only counts: nothing is pinned however often it overflows.
  amp::PrecisionTrace counting(DType::Float16);
  for (int i = 0; i < 3; ++i) {
    product(big);
    counting.step();
  }
  EXPECT_TRUE(counting.pinned().empty());
  EXPECT_EQ(counting.op("matmul").nonfinite_outputs, 3);
}
