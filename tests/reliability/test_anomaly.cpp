// Anomaly mode: detect_anomaly names the first op whose forward or backward produced inf/NaN from
// finite inputs, with the dtypes and shapes it ran on; ops that only pass an inf along are not
// blamed; the guard is thread-local and nestable; off, results are unchanged.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <limits>
#include <thread>

#include "ops/op_test_util.hpp"

using namespace mixprec;

namespace {
void an_expect_mentions(const std::string& msg, std::initializer_list<const char*> parts) {
  ASSERT_FALSE(msg.empty()) << "no anomaly was reported";
  for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' missing from: " << msg;
}
}  // namespace

// The situation the tool is for: float16 autocast overflows in a matmul of finite float32 data.
TEST(Anomaly, NamesTheFloat16ForwardOpThatOverflowedWithItsDtypes) {
  Tensor w = full({3, 2}, 300.0);
  w.requires_grad_();
  const Tensor x = full({4, 3}, 100.0);  // 3 * 100 * 300 = 90000 > 65504
  const std::string msg = mixprec::testing::error_of([&] {
    detect_anomaly guard;
    autocast ac{Device::CPU, kFloat16};
    Tensor h = relu(x);               // finite: passes
    Tensor y = matmul(h, w);          // overflows in float16
    (void)sum(y);
  });
  an_expect_mentions(msg, {"forward of 'matmul'", "8 inf", "float16 [4, 2]", "float16 [4, 3], float16 [3, 2]",
                           "autocast ran it in float16"});
}

TEST(Anomaly, NamesTheBackwardOpThatProducedNaN) {
  Tensor x = tensor({0.0f, 4.0f, 9.0f});
  x.requires_grad_();
  const std::string msg = mixprec::testing::error_of([&] {
    detect_anomaly guard;
    Tensor y = sqrt(x);  // forward finite; d/dx at 0 is inf
    sum(mul(y, 2.0)).backward();
  });
  an_expect_mentions(msg, {"backward of 'sqrt'", "1 inf", "gradient of input 0", "float32 [3]",
                           "finite incoming gradients: float32 [3]"});
}

// Backward in float16: the scaled gradient overflows inside a matmul's backward.
TEST(Anomaly, NamesFloat16BackwardOverflow) {
  Tensor w = full({2, 2}, 1.0);
  w.requires_grad_();
  const Tensor x = full({2, 2}, 200.0, kFloat16);
  const std::string msg = mixprec::testing::error_of([&] {
    detect_anomaly guard;
    autocast ac{Device::CPU, kFloat16};
    Tensor y = matmul(x, w);                      // 400: fine in float16
    Tensor loss = mul(sum(y), 1000.0);            // 1.6e6 in float32 (sum runs in float32)
    loss.backward();                              // dL/dy = 1000; dL/dw = x^T 1000 summed = 4e5 > 65504
  });
  an_expect_mentions(msg, {"backward of 'matmul'", "inf", "float16"});
}

TEST(Anomaly, OpsThatOnlyPassAnInfAlongAreNotBlamed) {
  detect_anomaly rec{detect_anomaly::Action::Record};
  const Tensor scores = randn({2, 4});
  const Tensor mask = tensor(std::vector<uint8_t>{0, 0, 1, 1, 0, 1, 1, 1}, {2, 4}).to(kBool);
  const Tensor masked = masked_fill(scores, mask, -std::numeric_limits<double>::infinity());  // asked for
  const Tensor p = softmax(masked, 1);  // -inf in, finite out
  const Tensor q = add(masked, 1.0);    // -inf in, -inf out: passed along
  EXPECT_FALSE(rec.first().has_value()) << rec.first()->message;
  const Tensor bad = log(sub(p, p));  // log(0) = -inf from finite input
  ASSERT_TRUE(rec.first().has_value());
  EXPECT_EQ(rec.first()->op, "log");
  EXPECT_FALSE(rec.first()->backward);
}

TEST(Anomaly, RecordModeKeepsTheFirstAndLetsTheRunContinue) {
  detect_anomaly rec{detect_anomaly::Action::Record};
  const Tensor a = tensor({1.0f, -1.0f});
  const Tensor l = log(a);                // NaN: first
  const Tensor d = div(a, zeros({2}));    // inf: second, not kept
  ASSERT_TRUE(rec.first().has_value());
  EXPECT_EQ(rec.first()->op, "log");
  EXPECT_NE(rec.first()->message.find("1 NaN"), std::string::npos) << rec.first()->message;
}

TEST(Anomaly, GuardsNestAndAreThreadLocal) {
  EXPECT_FALSE(anomaly_mode_enabled());
  {
    detect_anomaly outer{detect_anomaly::Action::Record};
    {
      detect_anomaly off{false};  // switch checks off inside
      EXPECT_FALSE(anomaly_mode_enabled());
      (void)log(tensor({-1.0f}));
    }
    EXPECT_TRUE(anomaly_mode_enabled());
    EXPECT_FALSE(outer.first().has_value()) << "an op run with checks off was recorded";
    bool other_thread_enabled = true;
    std::thread([&] { other_thread_enabled = anomaly_mode_enabled(); }).join();
    EXPECT_FALSE(other_thread_enabled);
    {
      detect_anomaly inner;  // Throw mode inside Record mode
      EXPECT_NE(mixprec::testing::error_of([] { (void)log(tensor({-1.0f})); }).find("forward of 'log'"), std::string::npos);
    }
    (void)log(tensor({-1.0f}));
    EXPECT_TRUE(outer.first().has_value());
  }
  EXPECT_FALSE(anomaly_mode_enabled());
}

// Checking must not change what is computed, with or without autocast.
TEST(Anomaly, ResultsAreIdenticalWithTheGuardOn) {
  auto run = [](bool guard, bool amp) {
    Generator g(5);
    Tensor w = randn({8, 4}, kFloat32, g);
    w.requires_grad_();
    const Tensor x = randn({16, 8}, kFloat32, g);
    const Tensor y = randint(0, 4, {16}, kInt64, g);
    std::optional<detect_anomaly> d;
    if (guard) d.emplace();
    std::optional<autocast> ac;
    if (amp) ac.emplace(Device::CPU, kBFloat16);
    Tensor loss = cross_entropy(matmul(x, w), y);
    ac.reset();
    loss.backward();
    return std::make_pair(loss.item<float>(), w.grad().contiguous());
  };
  for (bool amp : {false, true}) {
    const auto [l0, g0] = run(false, amp);
    const auto [l1, g1] = run(true, amp);
    EXPECT_EQ(l0, l1);
    ASSERT_EQ(g0.sizes(), g1.sizes());
    EXPECT_EQ(std::memcmp(g0.data_ptr(), g1.data_ptr(), static_cast<std::size_t>(g0.nbytes())), 0);
  }
}
