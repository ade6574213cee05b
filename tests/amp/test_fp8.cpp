// fp8 autocast with delayed scaling (amp/fp8.hpp): the quantization error bound per format
// against float64, TE's scale rule and amax history, fp8_linear's forward and backward against a
// float64 reference computed from the same fp8 operands, the delayed use of scales through
// nn::Linear, checkpointing the state, refusals, and GPT-mini trained in fp8 against bf16.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>

using namespace mixprec;
using amp::DelayedScaling;
using amp::Fp8LinearMeta;

namespace {

double fp8t_rel_norm_err(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);  // NaN compares false below: never passes
}

std::vector<double> fp8t_values(const Tensor& t) {
  const Tensor c = t.to(DType::Float64).contiguous();
  return std::vector<double>(c.data<double>(), c.data<double>() + c.numel());
}

// The float values the fp8 GEMM reads: decode(quantize(x * scale)) / scale, in double.
std::vector<double> fp8t_quantized(const Tensor& x, float scale, DType d) {
  std::vector<double> out;
  const Tensor c = x.to(DType::Float32).contiguous();
  for (int64_t i = 0; i < c.numel(); ++i) {
    const float v = c.data<float>()[i] * scale;
    const float q = d == DType::Float8E4M3FN ? float(float8_e4m3fn::from_float(v, Fp8Saturate::Yes))
                                             : float(float8_e5m2::from_float(v, Fp8Saturate::Yes));
    out.push_back(static_cast<double>(q) / scale);
  }
  return out;
}

// Same dtype, shape and bytes.
bool fp8t_same(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.sizes() != b.sizes()) return false;
  const Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), static_cast<std::size_t>(ca.nbytes())) == 0;
}

}  // namespace

TEST(Fp8, QuantizationErrorIsBoundedPerFormat) {
  Generator g(11);
  for (DType d : {DType::Float8E4M3FN, DType::Float8E5M2}) {
    const int mant = d == DType::Float8E4M3FN ? 3 : 2;
    for (double magnitude : {1e-4, 1.0, 3e3}) {
      const Tensor x = mul(randn({4096}, DType::Float32, g), magnitude);
      const std::vector<double> xv = fp8t_values(x);
      double amax = 0;
      for (double v : xv) amax = std::max(amax, std::fabs(v));
      // The scale delayed scaling would pick for this amax (margin 0).
      amp::Fp8TensorMeta m;
      const DelayedScaling r{.amax_history_len = 1};
      m.begin_use(1, r, amp::fp8_max(d));
      m.record(static_cast<float>(amax), 1);
      m.update(r, amp::fp8_max(d));
      EXPECT_EQ(m.scale, std::ldexp(1.0f, static_cast<int>(std::floor(std::log2(amp::fp8_max(d) / amax)))));
      const std::vector<double> q = fp8t_quantized(x, m.scale, d);
      // Per element: half an ulp of the format in its normal range, half the smallest subnormal below it.
      const double min_normal = std::ldexp(1.0, d == DType::Float8E4M3FN ? -6 : -14) / m.scale;
      const double half_sub = std::ldexp(1.0, d == DType::Float8E4M3FN ? -10 : -17) / m.scale;
      for (std::size_t i = 0; i < xv.size(); ++i) {
        const double bound = std::fabs(xv[i]) >= min_normal ? std::ldexp(std::fabs(xv[i]), -(mant + 1)) : half_sub;
        ASSERT_LE(std::fabs(q[i] - xv[i]), bound * (1 + 1e-12)) << d << " element " << i << " = " << xv[i];
      }
      // Over a Gaussian tensor, as a relative norm error: about 2^-(m+1)/sqrt(3) of the values.
      const double err = fp8t_rel_norm_err(q, xv);
      EXPECT_LT(err, d == DType::Float8E4M3FN ? 0.04 : 0.08) << d << " at magnitude " << magnitude;
      EXPECT_GT(err, 0.0);
    }
  }
}

TEST(Fp8, ScaleFollowsTheAmaxHistory) {
  const float mx = amp::fp8_max(DType::Float8E4M3FN);
  auto run = [&](const DelayedScaling& r, const std::vector<float>& amaxes) {
    amp::Fp8TensorMeta m;
    std::vector<float> scales;
    for (std::size_t t = 0; t < amaxes.size(); ++t) {
      m.begin_use(static_cast<int64_t>(t + 1), r, mx);
      scales.push_back(m.scale);  // the scale step t+1 quantizes with
      m.record(amaxes[t], static_cast<int64_t>(t + 1));
      m.record(amaxes[t] / 2, static_cast<int64_t>(t + 1));  // a second use in the same step: max kept
    }
    return scales;
  };
  // "max" over 3 steps: 448 / 10 -> 2^5; then the 100 stays in the window for 3 steps.
  const DelayedScaling max3{.amax_history_len = 3};
  EXPECT_EQ(run(max3, {10, 100, 1, 1, 1, 1}), (std::vector<float>{1, 32, 4, 4, 4, 256}));
  // "most_recent": only the last step.
  const DelayedScaling recent{.amax_history_len = 3, .amax_compute_algo = "most_recent"};
  EXPECT_EQ(run(recent, {10, 100, 1, 1}), (std::vector<float>{1, 32, 4, 256}));
  // margin 2 divides by 4; an amax of 0 or inf keeps the previous scale.
  const DelayedScaling margin{.margin = 2, .amax_history_len = 1};
  EXPECT_EQ(run(margin, {10, 0, INFINITY, 1}), (std::vector<float>{1, 8, 8, 8}));
}

TEST(Fp8, LinearMatchesAFloat64ReferenceOnTheFp8Operands) {
  Generator g(3);
  nn::Linear lin(24, 16, true, g);
  const Tensor x = randn({2, 5, 24}, DType::Float32, g).requires_grad_();
  const Tensor gy = randn({2, 5, 16}, DType::Float32, g);
  const DelayedScaling recipe{.amax_history_len = 4};
  // Step 1 sets the scales (they start at 1), step 2 is checked: its scales come from step 1.
  for (int step = 1; step <= 2; ++step) {
    Tensor y;
    {
      amp::fp8_autocast fp8(recipe);
      y = lin.forward(x);
    }
    ASSERT_EQ(y.dtype(), DType::Float32);
    ASSERT_EQ(y.sizes(), (Shape{2, 5, 16}));
    lin.zero_grad();
    x.set_grad(Tensor());
    y.backward(gy);
    const auto& ts = lin.fp8_meta->tensors;
    if (step == 1) {
      // Delayed: step 1 quantized with the initial scales; its amaxes wait for the next step.
      for (const auto& t : ts) {
        EXPECT_EQ(t.scale, 1.0f);
        EXPECT_TRUE(t.pending);
      }
      continue;
    }
    // Step 2's scales come from step 1's amaxes (the same x, W and gy).
    auto pow2_scale = [](float fmax, const Tensor& t) {
      return std::ldexp(1.0f, static_cast<int>(std::floor(std::log2(fmax / max(abs(t)).item<float>()))));
    };
    const float sx = ts[Fp8LinearMeta::Input].scale, sw = ts[Fp8LinearMeta::Weight].scale;
    EXPECT_EQ(sx, pow2_scale(448.0f, x));
    EXPECT_EQ(sw, pow2_scale(448.0f, lin.weight));
    EXPECT_EQ(ts[Fp8LinearMeta::GradOutput].scale, pow2_scale(57344.0f, gy));
    const std::vector<double> xq = fp8t_quantized(x, sx, DType::Float8E4M3FN);
    const std::vector<double> wq = fp8t_quantized(lin.weight, sw, DType::Float8E4M3FN);
    const float sg = ts[Fp8LinearMeta::GradOutput].scale;
    const std::vector<double> gq = fp8t_quantized(gy, sg, DType::Float8E5M2);
    const std::vector<double> b = fp8t_values(lin.bias);
    std::vector<double> want(10 * 16), gx(10 * 24, 0.0), gw(16 * 24, 0.0), gb(16, 0.0);
    for (int i = 0; i < 10; ++i)
      for (int o = 0; o < 16; ++o) {
        double acc = b[o];
        for (int k = 0; k < 24; ++k) acc += xq[i * 24 + k] * wq[o * 24 + k];
        want[i * 16 + o] = acc;
      }
    const std::vector<double> gyv = fp8t_values(gy);
    for (int i = 0; i < 10; ++i)
      for (int o = 0; o < 16; ++o) {
        gb[o] += gyv[i * 16 + o];
        for (int k = 0; k < 24; ++k) {
          gx[i * 24 + k] += gq[i * 16 + o] * wq[o * 24 + k];
          gw[o * 24 + k] += gq[i * 16 + o] * xq[i * 24 + k];
        }
      }
    EXPECT_LT(fp8t_rel_norm_err(fp8t_values(y), want), 1e-6);
    EXPECT_LT(fp8t_rel_norm_err(fp8t_values(x.grad()), gx), 1e-6);
    EXPECT_LT(fp8t_rel_norm_err(fp8t_values(lin.weight.grad()), gw), 1e-6);
    EXPECT_LT(fp8t_rel_norm_err(fp8t_values(lin.bias.grad()), gb), 1e-6);
    // And against the unquantized float64 product: the fp8 error, not a bug-sized one.
    const std::vector<double> xv = fp8t_values(x), wv = fp8t_values(lin.weight);
    std::vector<double> exact(10 * 16);
    for (int i = 0; i < 10; ++i)
      for (int o = 0; o < 16; ++o) {
        double acc = b[o];
        for (int k = 0; k < 24; ++k) acc += xv[i * 24 + k] * wv[o * 24 + k];
        exact[i * 16 + o] = acc;
      }
    const double err = fp8t_rel_norm_err(fp8t_values(y), exact);
    EXPECT_LT(err, 0.08);
    EXPECT_GT(err, 1e-4);  // it did quantize
  }
}

TEST(Fp8, LinearRunsInFp8OnlyInsideTheScope) {
  Generator g(5);
  nn::Linear lin(8, 8, false, g);
  const Tensor x = randn({4, 8}, DType::Float32, g);
  const Tensor plain = lin.forward(x);
  EXPECT_EQ(lin.fp8_meta, nullptr);
  Tensor q;
  {
    amp::fp8_autocast fp8;
    q = lin.forward(x);
    ASSERT_NE(lin.fp8_meta, nullptr);
    {
      amp::fp8_autocast off(DelayedScaling{}, false);
      EXPECT_FALSE(amp::fp8_autocast::is_enabled());
      EXPECT_TRUE(fp8t_same(lin.forward(x), plain));
    }
    EXPECT_TRUE(amp::fp8_autocast::is_enabled());
  }
  EXPECT_FALSE(amp::fp8_autocast::is_enabled());
  EXPECT_FALSE(fp8t_same(q, plain));
  EXPECT_TRUE(fp8t_same(lin.forward(x), plain));
  // A bfloat16 input gives a bfloat16 output, computed the same way.
  {
    amp::fp8_autocast fp8;
    EXPECT_EQ(lin.forward(x.to(DType::BFloat16)).dtype(), DType::BFloat16);
  }
}

TEST(Fp8, RefusesBadUseWithNamedErrors) {
  Generator g(6);
  nn::Linear lin(4, 3, true, g);
  const auto meta = std::make_shared<Fp8LinearMeta>();
  auto expect_error = [](auto&& f, const std::string& part) {
    try {
      f();
      ADD_FAILURE() << "no error, expected one containing \"" << part << "\"";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_error([&] { (void)amp::fp8_linear(ones({2, 4}), lin.weight, lin.bias, meta); }, "inside amp::fp8_autocast");
  expect_error([&] { amp::fp8_autocast s(DelayedScaling{.amax_history_len = 0}); }, "amax_history_len");
  expect_error([&] { amp::fp8_autocast s(DelayedScaling{.amax_compute_algo = "mean"}); }, "amax_compute_algo");
  expect_error([&] { amp::fp8_autocast s(DelayedScaling{.margin = -1}); }, "margin");
  amp::fp8_autocast fp8;
  expect_error([&] { (void)lin.forward(ones({2, 5})); }, "fp8_linear: input of shape [2, 5]");
  expect_error([&] { (void)lin.forward(ones({2, 4}).to(DType::Float8E4M3FN)); }, "float8_e4m3fn");
  expect_error([&] { (void)amp::fp8_linear(ones({2, 4}), lin.weight, lin.bias, nullptr); }, "no Fp8LinearMeta");
  expect_error([&] { (void)amp::fp8_max(DType::Float16); }, "not a float8 dtype");
}

TEST(Fp8, StateRoundTripsThroughACheckpoint) {
  const std::string dir = std::filesystem::temp_directory_path() / ("mixprec_fp8_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/ckpt.safetensors";
  auto make = [] {
    Generator g(9);
    auto m = std::make_shared<nn::Sequential>();
    m->push_back(std::make_shared<nn::Linear>(6, 8, true, g));
    m->push_back(std::make_shared<nn::GELU>());
    m->push_back(std::make_shared<nn::Linear>(8, 2, true, g));
    return m;
  };
  auto a = make();
  const DelayedScaling recipe{.amax_history_len = 5};
  Generator g(10);
  optim::SGD opt(a->parameters(), 0.1);
  auto step = [&](nn::Sequential& m, optim::SGD& o, const Tensor& x) {
    Tensor y;
    {
      amp::fp8_autocast fp8(recipe);
      y = m.forward(x);
    }
    o.zero_grad();
    sum(mul(y, y)).backward();
    o.step();
    return y;
  };
  for (int i = 0; i < 4; ++i) step(*a, opt, randn({3, 6}, DType::Float32, g));
  const nn::NamedTensors saved = amp::fp8_state_dict(*a);
  ASSERT_EQ(saved.size(), 6u);  // two Linears x (amax_history, scale, pending)
  EXPECT_EQ(saved[0].first, "0.fp8_meta.amax_history");
  EXPECT_EQ(saved[0].second.sizes(), (Shape{3, 5}));
  io::save_checkpoint(path, {.model = a.get(), .optimizer = &opt, .fp8 = a.get()});

  auto b = make();
  optim::SGD opt_b(b->parameters(), 0.1);
  io::load_checkpoint(path, {.model = b.get(), .optimizer = &opt_b, .fp8 = b.get()});
  const nn::NamedTensors loaded = amp::fp8_state_dict(*b);
  ASSERT_EQ(loaded.size(), saved.size());
  for (std::size_t i = 0; i < saved.size(); ++i) {
    EXPECT_EQ(loaded[i].first, saved[i].first);
    EXPECT_TRUE(fp8t_same(loaded[i].second, saved[i].second)) << saved[i].first;
  }
  // The resumed model continues exactly as the original: same scales, same quantized operands.
  const Tensor x = randn({3, 6}, DType::Float32, g);
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(fp8t_same(step(*a, opt, x), step(*b, opt_b, x))) << "step " << i << " after the resume";
  const nn::NamedTensors step_state = amp::fp8_state_dict(*b);
  // Without the fp8 state the scales restart at 1 and the outputs differ.
  auto c = make();
  optim::SGD opt_c(c->parameters(), 0.1);
  io::load_checkpoint(path, {.model = c.get(), .optimizer = &opt_c});
  EXPECT_EQ(amp::fp8_state_dict(*c).size(), 0u);

  // Malformed state is refused before anything changes.
  nn::NamedTensors bad = saved;
  bad[1].second = full({3}, -1.0);
  EXPECT_THROW(amp::load_fp8_state_dict(*b, bad), Error);
  bad = saved;
  bad.emplace_back("9.fp8_meta.scale", ones({3}));
  EXPECT_THROW(amp::load_fp8_state_dict(*b, bad), Error);
  bad = saved;
  bad.pop_back();
  EXPECT_THROW(amp::load_fp8_state_dict(*b, bad), Error);
  const nn::NamedTensors after = amp::fp8_state_dict(*b);
  ASSERT_EQ(after.size(), saved.size());
  for (std::size_t i = 0; i < after.size(); ++i) EXPECT_TRUE(fp8t_same(after[i].second, step_state[i].second)) << after[i].first;
  std::filesystem::remove_all(dir);
}

TEST(Fp8, Float8TensorsRoundTripThroughSafetensors) {
  const std::string path = std::filesystem::temp_directory_path() / ("mixprec_fp8_" + std::to_string(::getpid()) + ".safetensors");
  const Tensor v = tensor(std::vector<float>{0.0f, -0.0f, 1.5f, -448.0f, 1e-3f, NAN});
  const Tensor a = v.to(DType::Float8E4M3FN), b = v.to(DType::Float8E5M2);
  io::save_safetensors(path, {{"a", a}, {"b", b}});
  const auto f = io::load_safetensors(path);
  std::filesystem::remove(path);
  ASSERT_EQ(f.at("a").dtype(), DType::Float8E4M3FN);
  ASSERT_EQ(f.at("b").dtype(), DType::Float8E5M2);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(f.at("a").data<float8_e4m3fn>()[i].x, a.data<float8_e4m3fn>()[i].x);
    EXPECT_EQ(f.at("b").data<float8_e5m2>()[i].x, b.data<float8_e5m2>()[i].x);
  }
}

namespace {

enum class Fp8tMode { BFloat16, Fp8 };

// GPT-mini on a synthetic corpus with structure to learn (each token mostly determines the next:
// t' = 5t + 3 mod V, with 15% uniform noise). Returns the mean loss of the last 20 steps.
double fp8t_train_gpt(Fp8tMode mode, int steps) {
  nn::models::GPTConfig c;
  c.vocab = 32;
  c.block_size = 16;
  c.n_layer = 2;
  c.n_head = 2;
  c.d_model = 64;
  c.mlp_hidden = 128;
  Generator init(1234);
  auto model = nn::models::gpt(c, init);
  optim::Adam opt(model->parameters(), 3e-3);
  Generator data(99);
  const int64_t B = 16, T = c.block_size;
  double tail = 0;
  for (int s = 0; s < steps; ++s) {
    std::vector<int64_t> seq(static_cast<std::size_t>(B * (T + 1)));
    for (int64_t b = 0; b < B; ++b) {
      int64_t t = static_cast<int64_t>(data.uniform() * c.vocab) % c.vocab;
      for (int64_t i = 0; i <= T; ++i) {
        seq[static_cast<std::size_t>(b * (T + 1) + i)] = t;
        t = data.uniform() < 0.15 ? static_cast<int64_t>(data.uniform() * c.vocab) % c.vocab : (5 * t + 3) % c.vocab;
      }
    }
    const Tensor all = tensor(seq, {B, T + 1});
    const Tensor idx = all.narrow(1, 0, T).contiguous(), tgt = all.narrow(1, 1, T).contiguous();
    Tensor loss;
    if (mode == Fp8tMode::Fp8) {
      amp::fp8_autocast fp8(DelayedScaling{.amax_history_len = 16});
      loss = model->loss(idx, tgt);
    } else {
      autocast ac(Device::CPU, DType::BFloat16);
      loss = model->loss(idx, tgt);
    }
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (s >= steps - 20) tail += loss.item<double>() / 20;
  }
  return tail;
}

}  // namespace

// The claim fp8 training rests on: with delayed scaling the model learns as well as in bf16.
// Measured (300 steps, ~10 s at -O2 on a loaded 2-core VM): bf16 0.9046, fp8 0.9054 (+0.09%),
// both far below the untrained ln(32) = 3.47; the test allows 5%, the brief's bound, with margin.
TEST(Fp8, GptMiniTrainsAsWellAsInBFloat16) {
  const int steps = 300;
  const double bf16 = fp8t_train_gpt(Fp8tMode::BFloat16, steps);
  const double fp8 = fp8t_train_gpt(Fp8tMode::Fp8, steps);
  std::printf("GPT-mini, %d steps: final loss bf16 %.4f, fp8 %.4f (%.2f%%)\n", steps, bf16, fp8, 100 * (fp8 - bf16) / bf16);
  EXPECT_LT(bf16, 0.6 * std::log(32.0)) << "the bf16 run did not learn";
  EXPECT_LT(std::fabs(fp8 - bf16) / bf16, 0.05);
}
