// Stochastic rounding for bfloat16 parameters without float32 masters (optim/stochastic_rounding.hpp,
// the `stochastic_rounding` option of SGD, Adam and AdamW).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <mixprec/mixprec.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace mixprec;

namespace sr_test {

// The two bfloat16 neighbours of x and the spacing between them.
double bf16_ulp_at(float x) {
  const bfloat16 lo = bfloat16::from_bits(static_cast<uint16_t>(std::bit_cast<uint32_t>(x) >> 16));
  const bfloat16 hi = bfloat16::from_bits(static_cast<uint16_t>(lo.x + 1));
  return std::abs(static_cast<double>(static_cast<float>(hi)) - static_cast<double>(static_cast<float>(lo)));
}

Tensor bf16_full(int64_t n, float v) { return full({n}, v, DType::BFloat16); }

std::vector<uint16_t> bits_of(const Tensor& t) {
  std::vector<uint16_t> out(static_cast<std::size_t>(t.numel()));
  std::memcpy(out.data(), t.data_ptr(), out.size() * 2);
  return out;
}

// A parameter with a fixed pseudo-random gradient per step (the same for every optimizer built on it).
void set_grad(const Tensor& p, int step) {
  Generator g(1000 + static_cast<uint64_t>(step));
  p.set_grad(mul(randn(p.sizes(), DType::Float32, g), 1e-3).to(p.dtype()));
}

}  // namespace sr_test

using namespace sr_test;

TEST(StochasticRounding, UnbiasedAndOnlyTheTwoNeighbours) {
  // Several positions between neighbours, both signs, just below and above powers of two, a subnormal.
  const float xs[] = {1.0f + 0.3f * 0.0078125f, -2.7182817f, 2.0f - 0.3f * 0.0078125f, 1.9999f, 0.5000001f, -1024.37f, 3.3e-3f,
                      -1.2345e-7f, 2.0e-39f};
  const int64_t n = 1 << 18;
  for (float x : xs) {
    const uint64_t key = optim::detail::rounding_step_key(optim::detail::rounding_key(7, 3), 11);
    const float lo = bfloat16::from_bits(static_cast<uint16_t>(std::bit_cast<uint32_t>(x) >> 16));
    const double ulp = bf16_ulp_at(x);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float r = bfloat16::from_bits(optim::detail::bfloat16_bits_stochastic(x, optim::detail::rounding_bits(key, i)));
      ASSERT_TRUE(r == lo || std::abs(static_cast<double>(r) - lo) == ulp) << x << " rounded to " << r;
      sum += r;
    }
    const double mean = sum / static_cast<double>(n);
    // Standard error at most ulp / (2 sqrt(n)): 6 of them.
    EXPECT_LE(std::abs(mean - static_cast<double>(x)), 6.0 * ulp / (2.0 * std::sqrt(static_cast<double>(n)))) << "x = " << x;
    // Round-to-nearest is biased by up to half an ulp here: the tolerance above tells it apart.
    const double rne_bias = std::abs(static_cast<double>(static_cast<float>(bfloat16(x))) - x);
    if (x == xs[0]) EXPECT_GT(rne_bias, 0.25 * ulp);
  }
}

TEST(StochasticRounding, ExactValuesInfAndNaN) {
  const float exact[] = {1.0f, -3.5f, 0.0f, -0.0f, 65536.0f, static_cast<float>(bfloat16::from_bits(0x0001))};
  for (float x : exact)
    for (uint32_t r : {0u, 1u, 0x8000u, 0xffffu})
      EXPECT_EQ(optim::detail::bfloat16_bits_stochastic(x, r), bfloat16(x).x) << x << " r=" << r;
  const float inf = std::numeric_limits<float>::infinity();
  for (uint32_t r : {0u, 0xffffu}) {
    EXPECT_EQ(optim::detail::bfloat16_bits_stochastic(inf, r), 0x7f80);
    EXPECT_EQ(optim::detail::bfloat16_bits_stochastic(-inf, r), 0xff80);
    const uint16_t nan = optim::detail::bfloat16_bits_stochastic(std::numeric_limits<float>::quiet_NaN(), r);
    EXPECT_TRUE(std::isnan(static_cast<float>(bfloat16::from_bits(nan))));
    // A NaN whose payload sits only in the dropped bits stays a NaN (not inf).
    const uint16_t low_nan = optim::detail::bfloat16_bits_stochastic(std::bit_cast<float>(0x7f800001u), r);
    EXPECT_TRUE(std::isnan(static_cast<float>(bfloat16::from_bits(low_nan))));
  }
}

TEST(StochasticRounding, SmallUpdatesAccumulateWhereRoundToNearestStalls) {
  const int64_t n = 4096;
  Tensor w = bf16_full(n, 1.0f);
  w.requires_grad_();
  optim::SGD opt({w}, {.lr = 1.0, .stochastic_rounding = true, .rounding_seed = 42});
  EXPECT_FALSE(opt.master_weight(0).defined());
  Tensor w_master = bf16_full(n, 1.0f);
  w_master.requires_grad_();
  optim::SGD with_master({w_master}, {.lr = 1.0});
  for (int s = 0; s < 1000; ++s) {
    w.set_grad(full({n}, -1e-4, DType::BFloat16));
    opt.step();
    w_master.set_grad(full({n}, -1e-4, DType::BFloat16));
    with_master.step();
  }
  const Tensor wf = w.to(DType::Float32);
  const double avg = mixprec::mean(wf).item<double>();
  // Per element the result is 1.1 + a martingale of rounding errors (sd about 0.03); the mean of
  // 4096 has sd 5e-4. The bfloat16 grid near 1.1 is 1/128 apart.
  EXPECT_NEAR(avg, 1.1, 0.005);
  const float* p = wf.data<float>();
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(p[i], 1.1, 0.16) << i;
  // Round-to-nearest on the bfloat16 weights: 1 + 1e-4 rounds back to 1, every time.
  bfloat16 rne(1.0f);
  for (int s = 0; s < 1000; ++s) rne = bfloat16(static_cast<float>(rne) + 1e-4f);
  EXPECT_EQ(static_cast<float>(rne), 1.0f);
  // The float32 master reaches 1.1 too (rounded to the bfloat16 grid).
  EXPECT_NEAR(w_master.to(DType::Float32).data<float>()[0], 1.1, 0.0079);
}

TEST(StochasticRounding, ReproducibleFromTheSeedAndIndependentOfThreads) {
  const int64_t n = 3 * optim::detail::kOptimGrain + 123;  // several threads' chunks
  auto run = [&](uint64_t seed, int threads) {
#if defined(_OPENMP)
    const int prev = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    Generator g(5);
    Tensor w = randn({n}, DType::Float32, g).to(DType::BFloat16);
    w.requires_grad_();
    optim::AdamW opt({w}, {.lr = 1e-3, .stochastic_rounding = true, .rounding_seed = seed});
    for (int s = 0; s < 3; ++s) {
      set_grad(w, s);
      opt.step();
    }
#if defined(_OPENMP)
    omp_set_num_threads(prev);
#endif
    return bits_of(w);
  };
  const auto a = run(1, 1);
  EXPECT_EQ(a, run(1, 2));
  EXPECT_EQ(a, run(1, 1));
  const auto b = run(2, 2);
  int64_t differ = 0;
  for (std::size_t i = 0; i < a.size(); ++i) differ += a[i] != b[i];
  EXPECT_GT(differ, n / 100) << "another seed must round differently";
}

TEST(StochasticRounding, MemoryStatsShowFourBytesPerParameterSaved) {
  const int64_t n = 10000;
  auto state_bytes = [&](bool sr) {
    Tensor w = bf16_full(n, 0.5f);
    w.requires_grad_();
    set_grad(w, 0);
    const int64_t before = memory_stats().allocated_bytes;
    optim::AdamW opt({w}, {.lr = 1e-3, .stochastic_rounding = sr});
    opt.step();
    return memory_stats().allocated_bytes - before;
  };
  const int64_t with_master = state_bytes(false), with_sr = state_bytes(true);
  std::cout << "AdamW state of " << n << " bfloat16 parameters: " << with_master << " bytes with float32 masters, " << with_sr
            << " with stochastic rounding\n";
  EXPECT_EQ(with_master - with_sr, 4 * n);
  EXPECT_GE(with_sr, 8 * n);  // exp_avg and exp_avg_sq stay float32
}

TEST(StochasticRounding, SmallModelTrainsAsWellAsWithFloat32Masters) {
  // A 2-layer MLP regression on synthetic data, bfloat16 parameters; the same init and batches.
  auto train = [](bool sr) {
    Generator g(17);
    auto model = std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
        std::make_shared<nn::Linear>(8, 32, true, g), std::make_shared<nn::GELU>(), std::make_shared<nn::Linear>(32, 1, true, g)});
    model->to(DType::BFloat16);
    optim::AdamW opt(model->parameters(), {.lr = 3e-3, .weight_decay = 0.0, .stochastic_rounding = sr, .rounding_seed = 3});
    Generator data(99);
    const Tensor x = randn({256, 8}, DType::Float32, data);
    const Tensor wtrue = randn({8, 1}, DType::Float32, data);
    const Tensor y = tanh(matmul(x, wtrue));
    const Tensor xb = x.to(DType::BFloat16);
    double first = 0, last = 0;
    for (int s = 0; s < 300; ++s) {
      const Tensor loss = mse_loss(model->forward(xb).to(DType::Float32), y);
      if (s == 0) first = loss.item<double>();
      last = loss.item<double>();
      opt.zero_grad();
      loss.backward();
      opt.step();
    }
    return std::make_pair(first, last);
  };
  const auto [first_m, last_m] = train(false);
  const auto [first_s, last_s] = train(true);
  std::cout << "MLP loss: float32 masters " << first_m << " -> " << last_m << ", stochastic rounding " << first_s << " -> " << last_s
            << "\n";
  EXPECT_EQ(first_m, first_s);
  EXPECT_LT(last_m, 0.2 * first_m);
  // Stated tolerance: within 10% of the float32-master run's final loss.
  EXPECT_NEAR(last_s, last_m, 0.1 * last_m);
}

TEST(StochasticRounding, StateDictRoundTripContinuesBitIdentically) {
  Generator g(8);
  const Tensor init = randn({5000}, DType::Float32, g).to(DType::BFloat16);
  Tensor a = init.clone();
  a.requires_grad_();
  optim::Adam opt_a({a}, {.lr = 1e-3, .stochastic_rounding = true, .rounding_seed = 1234});
  for (int s = 0; s < 4; ++s) {
    set_grad(a, s);
    opt_a.step();
  }
  // Snapshot (state_dict() holds live references: clone), then the uninterrupted run goes on.
  optim::StateDict sd = opt_a.state_dict();
  for (auto& [k, t] : sd.tensors) t = t.clone();
  ASSERT_TRUE(sd.scalar("rounding_seed").has_value());
  EXPECT_EQ(*sd.scalar("rounding_seed"), 1234.0);
  EXPECT_EQ(sd.tensor("state.0.master_weight"), nullptr);
  const Tensor a_mid = a.detach().clone();
  for (int s = 4; s < 8; ++s) {
    set_grad(a, s);
    opt_a.step();
  }
  // Resumed: a new optimizer with another seed takes the checkpoint's seed and step counts.
  Tensor b = a_mid.clone();
  b.requires_grad_();
  optim::Adam opt_b({b}, {.lr = 1e-3, .stochastic_rounding = true, .rounding_seed = 99});
  opt_b.load_state_dict(sd);
  EXPECT_EQ(opt_b.rounding_seed(), 1234u);
  for (int s = 4; s < 8; ++s) {
    set_grad(b, s);
    opt_b.step();
  }
  EXPECT_EQ(bits_of(a), bits_of(b));
  // Into an optimizer with float32 masters: refused, nothing changed.
  Tensor c = a_mid.clone();
  c.requires_grad_();
  optim::Adam opt_c({c}, {.lr = 1e-3});
  EXPECT_THROW(opt_c.load_state_dict(sd), Error);
  EXPECT_EQ(opt_c.state(0).step, 0);
}

TEST(StochasticRounding, RefusesFloat16AndOversizedSeeds) {
  Tensor h = full({4}, 1.0, DType::Float16);
  h.requires_grad_();
  EXPECT_THROW(optim::AdamW({h}, {.stochastic_rounding = true}), Error);
  Tensor b = full({4}, 1.0, DType::BFloat16);
  b.requires_grad_();
  EXPECT_THROW(optim::SGD({b}, {.stochastic_rounding = true, .rounding_seed = uint64_t{1} << 60}), Error);
  // float32 parameters beside bfloat16 ones: updated in float32 as always, nothing to round.
  Tensor f = full({4}, 1.0, DType::Float32);
  f.requires_grad_();
  optim::SGD opt({b, f}, {.lr = 0.5, .stochastic_rounding = true});
  b.set_grad(full({4}, 1.0, DType::BFloat16));
  f.set_grad(full({4}, 1.0, DType::Float32));
  opt.step();
  EXPECT_EQ(f.data<float>()[0], 0.5f);
  EXPECT_EQ(static_cast<float>(b.data<bfloat16>()[0]), 0.5f);  // exact: no rounding needed
  // A NaN gradient makes NaN weights, as with masters (GradScaler is what skips such steps).
  b.set_grad(full({4}, std::numeric_limits<double>::quiet_NaN(), DType::BFloat16));
  opt.step();
  EXPECT_TRUE(std::isnan(static_cast<float>(b.data<bfloat16>()[1])));
}
