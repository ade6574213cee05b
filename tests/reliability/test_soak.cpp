// Soak: thousands of float16 autocast steps with injected infs must not diverge, keep the loss
// scale in bounds, skip exactly the poisoned steps and return allocated memory to the same
// baseline after every step. Threads: two models trained at once, with different autocast
// settings, give bit-identical results to training them one after the other.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>

using namespace mixprec;

namespace {

struct SoakModel {
  std::shared_ptr<nn::Sequential> net;
  explicit SoakModel(uint64_t seed, int64_t in = 8, int64_t hidden = 32, int64_t out = 4) {
    Generator g(seed);
    net = std::make_shared<nn::Sequential>();
    net->push_back(std::make_shared<nn::Linear>(in, hidden, true, g));
    net->push_back(std::make_shared<nn::GELU>());
    net->push_back(std::make_shared<nn::LayerNorm>(Shape{hidden}));
    net->push_back(std::make_shared<nn::Linear>(hidden, out, true, g));
  }
};

// A fixed teacher makes the task learnable, so "no divergence" means the loss actually falls.
struct SoakTask {
  Tensor teacher;
  explicit SoakTask(uint64_t seed) { Generator g(seed); teacher = randn({8, 4}, kFloat32, g); }
  std::pair<Tensor, Tensor> batch(Generator& g) const {
    Tensor x = randn({32, 8}, kFloat32, g);
    no_grad ng;
    return {x, argmax(matmul(x, teacher), 1)};
  }
};

int64_t soak_steps() {
  const char* s = std::getenv("MIXPREC_SOAK_STEPS");  // longer local soaks; CI runs the default
  return s && std::atoll(s) > 0 ? std::atoll(s) : 5000;
}

}  // namespace

TEST(Soak, Float16AutocastWithRandomInfInjections) {
  const int64_t steps = soak_steps();
  // Never below 1 (scaling down only adds underflow) and far from float32's limit; the scale's
  // own equilibrium (where float16 gradients start to overflow) sits around 2^20 for this model.
  constexpr double kMinScale = 1.0, kMaxScale = 4294967296.0;
  SoakModel m(1);
  SoakTask task(2);
  optim::AdamW opt(m.net->parameters(), 3e-3);
  // Faults rarer than the growth interval, as in real runs: a skipped step then costs one halving.
  amp::GradScaler scaler(1024.0, 2.0, 0.5, /*growth_interval=*/20);
  Generator data(3), faults(4);
  int64_t injected = 0, skipped = 0, poisoned_but_stepped = 0;
  double first_loss = 0, last_loss = 0, recent = 0;
  double min_scale = scaler.get_scale(), max_scale = min_scale;
  int64_t baseline = -1, leaks = 0, leak_step = -1, leak_bytes = 0;
  bool ever_stepped = false;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < steps; ++step) {
    {
      const auto [x, y] = task.batch(data);
      const bool inject = faults.uniform() < 0.005;
      opt.zero_grad();
      Tensor loss;
      {
        autocast ac{Device::CPU, kFloat16};
        loss = cross_entropy(m.net->forward(x), y);
      }
      scaler.scale(loss).backward();
      if (inject) {
        // An overflow as float16 produces it: one gradient element of one parameter becomes inf.
        const auto params = m.net->parameters();
        const Tensor& p = params[faults.below(params.size())];
        no_grad ng;
        Tensor g = p.grad();
        g.reshape({-1}).narrow(0, static_cast<int64_t>(faults.below(static_cast<uint64_t>(g.numel()))), 1)
            .fill_(faults.uniform() < 0.5 ? std::numeric_limits<double>::infinity() : std::nan(""));
        ++injected;
      }
      const bool stepped = scaler.step(opt);
      scaler.update();
      skipped += !stepped;
      ever_stepped |= stepped;
      poisoned_but_stepped += inject && stepped;
      const double l = loss.item<float>();
      ASSERT_TRUE(std::isfinite(l)) << "loss diverged at step " << step;
      if (step == 0) first_loss = l;
      recent = step == 0 ? l : 0.98 * recent + 0.02 * l;
      last_loss = l;
      const double s = scaler.get_scale();
      min_scale = std::min(min_scale, s);
      max_scale = std::max(max_scale, s);
      ASSERT_TRUE(s >= kMinScale && s <= kMaxScale) << "loss scale " << s << " left [" << kMinScale << ", " << kMaxScale
                                                    << "] at step " << step;
    }
    // Every tensor of the step is gone now: live bytes must equal the baseline taken after the
    // first optimizer step (which allocates the optimizer state); nothing may accumulate after.
    const int64_t now = memory_stats().allocated_bytes;
    if (baseline < 0) {
      if (ever_stepped) baseline = now;
    } else if (now != baseline && leaks++ == 0) {
      leak_step = step;
      leak_bytes = now - baseline;
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  soak: %lld float16 steps, %lld infs/NaNs injected, %lld steps skipped, loss %.3f -> %.3f (smoothed %.3f), "
              "scale in [%g, %g], final %g, %.1f s\n",
              static_cast<long long>(steps), static_cast<long long>(injected), static_cast<long long>(skipped), first_loss,
              last_loss, recent, min_scale, max_scale, scaler.get_scale(), secs);
  EXPECT_EQ(leaks, 0) << leaks << " steps ended above the baseline; first at step " << leak_step << " by " << leak_bytes
                      << " bytes";
  EXPECT_EQ(poisoned_but_stepped, 0) << "the optimizer stepped on a gradient holding inf/NaN";
  EXPECT_GE(skipped, injected);
  // Besides the injected faults, only the scale's own probes past its equilibrium are skipped:
  // at most one per growth interval.
  EXPECT_LE(skipped, injected + steps / 20) << "far more skipped steps than injected faults";
  EXPECT_GT(injected, steps / 400);
  EXPECT_GT(baseline, 0);
  EXPECT_LT(recent, 0.5 * first_loss) << "training did not make progress";
  for (const Tensor& p : m.net->parameters()) {
    const Tensor c = p.contiguous();
    for (int64_t i = 0; i < c.numel(); ++i) ASSERT_TRUE(std::isfinite(c.data<float>()[i])) << "a weight became non-finite";
  }
}

namespace {

// One training run, self-contained: its own generators, model, optimizer and scaler.
struct ThreadRun {
  DType amp_dtype;
  bool amp_on;
  std::vector<Tensor> weights;
  std::vector<float> losses;

  void operator()() {
    SoakModel m(amp_dtype == kFloat16 ? 10 : 20, 8, 48, 4);
    SoakTask task(30);
    optim::AdamW opt(m.net->parameters(), 1e-3);
    amp::GradScaler scaler(4096.0, 2.0, 0.5, 20, /*enabled=*/amp_on && amp_dtype == kFloat16);
    Generator data(40);
    for (int step = 0; step < 150; ++step) {
      const auto [x, y] = task.batch(data);
      opt.zero_grad();
      Tensor loss;
      {
        autocast ac{Device::CPU, amp_dtype, amp_on};
        loss = cross_entropy(m.net->forward(x), y);
      }
      scaler.scale(loss).backward();
      scaler.step(opt);
      scaler.update();
      losses.push_back(loss.item<float>());
    }
    for (const Tensor& p : m.net->parameters()) weights.push_back(p.detach().clone());
  }
};

bool same_bits(const ThreadRun& a, const ThreadRun& b) {
  if (a.losses != b.losses || a.weights.size() != b.weights.size()) return false;
  for (std::size_t i = 0; i < a.weights.size(); ++i)
    if (a.weights[i].nbytes() != b.weights[i].nbytes() ||
        std::memcmp(a.weights[i].data_ptr(), b.weights[i].data_ptr(), static_cast<std::size_t>(a.weights[i].nbytes())) != 0)
      return false;
  return true;
}

}  // namespace

TEST(Threads, ConcurrentTrainingWithDifferentAutocastEqualsSequential) {
  const std::pair<ThreadRun, ThreadRun> configs[] = {
      {{kFloat16, true}, {kBFloat16, true}},   // float16 + scaler next to bfloat16
      {{kFloat16, true}, {kBFloat16, false}},  // float16 + scaler next to autocast disabled (float32)
  };
  for (const auto& [a0, b0] : configs) {
    ThreadRun seq_a = a0, seq_b = b0;
    seq_a();
    seq_b();
    ThreadRun par_a = a0, par_b = b0;
    std::thread ta(std::ref(par_a)), tb(std::ref(par_b));
    ta.join();
    tb.join();
    EXPECT_TRUE(same_bits(seq_a, par_a)) << "thread A (" << a0.amp_dtype << ") differs from its sequential run";
    EXPECT_TRUE(same_bits(seq_b, par_b)) << "thread B (" << b0.amp_dtype << ", autocast " << b0.amp_on
                                         << ") differs from its sequential run";
    EXPECT_FALSE(same_bits(seq_a, seq_b)) << "the two configurations should train differently";
  }
}
