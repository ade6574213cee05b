#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cpu/gemm.hpp>  // the kernels it tests directly (also in the compiled mode)

#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

using namespace mixprec;

namespace {

std::vector<double> att_values(const Tensor& t) {
  no_grad ng;
  const Tensor c = t.detach().to(kFloat64).contiguous();
  const double* p = c.data<double>();
  return std::vector<double>(p, p + c.numel());
}

double att_rel_err(const Tensor& a, const Tensor& b) {
  const auto x = att_values(a), y = att_values(b);
  EXPECT_EQ(x.size(), y.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size() && i < y.size(); ++i) {
    num += (x[i] - y[i]) * (x[i] - y[i]);
    den += y[i] * y[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

Tensor att_randn(const Shape& s, uint64_t seed, DType dt = kFloat64, bool grad = true) {
  Generator g(seed);
  Tensor t = randn(s, dt, g);
  if (grad) t.requires_grad_();
  return t;
}

// The plain composition the fused kernel must match: matmul, mask, softmax, (dropout), matmul.
// `drop` is an optional [..., L, S] multiplier (keep / (1 - p), or 0).
Tensor att_reference(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask = Tensor(), bool causal = false,
                     std::optional<double> scale = std::nullopt, const Tensor& drop = Tensor()) {
  const int64_t L = q.size(-2), S = k.size(-2);
  const double sc = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(-1))));
  Tensor s = mul(matmul(q, k.transpose(-2, -1)), sc);
  Tensor m = mask;
  if (causal) m = tril(ones({L, S}, kBool));
  if (m.defined() && m.dtype() == kBool) {
    m = detail::expand_raw(m, s.sizes());
    s = masked_fill(s, eq(m, 0.0), -std::numeric_limits<double>::infinity());
  } else if (m.defined()) {
    s = add(s, m);
  }
  const Tensor mx = max(s, -1, true).first.detach();
  const Tensor e = exp(sub(s, mx));
  Tensor p = div(e, sum(e, {-1}, true));
  if (drop.defined()) p = mul(p, drop);
  return matmul(p, v);
}

// Forward in plain loops (double accumulation) over [B, L, E] x [B, S, E] x [B, S, Ev];
// bias(b, i, j) is added to the scaled score (-inf to mask).
std::vector<double> att_loops(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                              const std::function<double(int64_t, int64_t, int64_t)>& bias) {
  const int64_t L = q.size(-2), S = k.size(-2), E = q.size(-1), Ev = v.size(-1);
  const int64_t B = q.numel() / (L * E);
  const auto qv = att_values(q), kv = att_values(k), vv = att_values(v);
  std::vector<double> out(static_cast<std::size_t>(B * L * Ev), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) {
      std::vector<double> s(static_cast<std::size_t>(S));
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < S; ++j) {
        double d = 0;
        for (int64_t e = 0; e < E; ++e) d += qv[(b * L + i) * E + e] * kv[(b * S + j) * E + e];
        s[j] = d * scale + bias(b, i, j);
        mx = std::max(mx, s[j]);
      }
      double z = 0;
      for (int64_t j = 0; j < S; ++j) z += (s[j] = std::exp(s[j] - mx));
      for (int64_t j = 0; j < S; ++j)
        for (int64_t c = 0; c < Ev; ++c) out[(b * L + i) * Ev + c] += s[j] / z * vv[(b * S + j) * Ev + c];
    }
  return out;
}

double att_rel_err(const std::vector<double>& x, const Tensor& ref_or_out) {
  const auto y = att_values(ref_or_out);
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    num += (x[i] - y[i]) * (x[i] - y[i]);
    den += x[i] * x[i];
  }
  return std::sqrt(num / den);
}

// Output and input gradients of f(inputs) for a fixed output gradient.
std::vector<Tensor> att_run(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& inputs,
                            uint64_t seed = 99) {
  for (const Tensor& t : inputs)
    if (t.requires_grad()) t.set_grad(Tensor());
  Tensor out = f(inputs);
  Generator g(seed);
  out.backward(randn(out.sizes(), kFloat32, g).to(out.dtype()));
  std::vector<Tensor> r{out.detach()};
  for (const Tensor& t : inputs)
    if (t.requires_grad()) r.push_back(t.grad());
  return r;
}

}  // namespace

TEST(Attention, ForwardMatchesLoops) {
  const int64_t B = 2, H = 3, L = 70, S = 150, E = 16, Ev = 24;
  Tensor q = att_randn({B, H, L, E}, 1, kFloat32, false), k = att_randn({B, H, S, E}, 2, kFloat32, false),
         v = att_randn({B, H, S, Ev}, 3, kFloat32, false);
  const double sc = 1.0 / 4.0;
  const double ninf = -std::numeric_limits<double>::infinity();
  auto none = [](int64_t, int64_t, int64_t) { return 0.0; };
  EXPECT_LT(att_rel_err(att_loops(q, k, v, sc, none), scaled_dot_product_attention(q, k, v)), 1e-5);
  EXPECT_LT(att_rel_err(att_loops(q, k, v, sc, [&](int64_t, int64_t i, int64_t j) { return j <= i ? 0.0 : ninf; }),
                        scaled_dot_product_attention(q, k, v, Tensor(), 0.0, true)),
            1e-5);
  // A bool mask shared by the batch, and an additive mask broadcast over heads.
  Generator g(4);
  Tensor keep = gt(rand({L, S}, kFloat32, g), 0.3);
  const auto kv = att_values(keep);
  EXPECT_LT(att_rel_err(att_loops(q, k, v, sc, [&](int64_t, int64_t i, int64_t j) { return kv[i * S + j] != 0 ? 0.0 : ninf; }),
                        scaled_dot_product_attention(q, k, v, keep)),
            1e-5);
  Tensor bias = randn({B, 1, L, S}, kFloat32, g);
  const auto bv = att_values(bias);
  EXPECT_LT(att_rel_err(att_loops(q, k, v, sc, [&](int64_t b, int64_t i, int64_t j) { return bv[((b / H) * L + i) * S + j]; }),
                        scaled_dot_product_attention(q, k, v, bias)),
            1e-5);
  // Causal with L > S and L < S is top-left aligned (keep j <= i), as PyTorch.
  Tensor qL = att_randn({2, 150, E}, 5, kFloat32, false), kS = att_randn({2, 70, E}, 6, kFloat32, false),
         vS = att_randn({2, 70, Ev}, 7, kFloat32, false);
  auto causal = [&](int64_t, int64_t i, int64_t j) { return j <= i ? 0.0 : ninf; };
  EXPECT_LT(att_rel_err(att_loops(qL, kS, vS, sc, causal), scaled_dot_product_attention(qL, kS, vS, Tensor(), 0.0, true)), 1e-5);
  EXPECT_LT(att_rel_err(att_loops(kS, qL, att_randn({2, 150, Ev}, 8, kFloat32, false), sc, causal),
                        scaled_dot_product_attention(kS, qL, att_randn({2, 150, Ev}, 8, kFloat32, false), Tensor(), 0.0, true)),
            1e-5);
  // Explicit scale; 2-D inputs with no batch dims.
  Tensor q2 = q.select(0, 0).select(0, 0), k2 = k.select(0, 0).select(0, 0), v2 = v.select(0, 0).select(0, 0);
  Tensor o2 = scaled_dot_product_attention(q2, k2, v2, Tensor(), 0.0, false, 0.37);
  EXPECT_EQ(o2.sizes(), (Shape{L, Ev}));
  EXPECT_LT(att_rel_err(att_loops(q2, k2, v2, 0.37, none), o2), 1e-5);
}

TEST(Attention, GradcheckVariants) {
  const Shape qs{2, 2, 5, 3}, ks{2, 2, 7, 3}, vs{2, 2, 7, 4};
  Tensor q = att_randn(qs, 11), k = att_randn(ks, 12), v = att_randn(vs, 13);
  using In = std::vector<Tensor>;
  auto check = [&](const char* what, const std::function<Tensor(const In&)>& f, const In& in) {
    auto r = gradcheck(f, in);
    EXPECT_TRUE(r.ok) << what << ": " << r.message;
  };
  check("plain", [](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2]); }, {q, k, v});
  check("causal", [](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2], Tensor(), 0.0, true); }, {q, k, v});
  check("scale", [](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2], Tensor(), 0.0, false, 0.7); }, {q, k, v});
  Generator g(14);
  Tensor keep = gt(rand({2, 1, 5, 7}, kFloat32, g), 0.4);
  keep.select(0, 1).select(1, 2).fill_(0.0);  // one fully masked row: output 0, no gradient
  check("bool mask", [&](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2], keep); }, {q, k, v});
  // An additive mask that itself requires grad (a learned bias), broadcast over batch and heads.
  Tensor bias = att_randn({5, 7}, 15);
  check("float mask", [](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2], in[3]); }, {q, k, v, bias});
  Tensor bias_row = att_randn({7}, 16);
  check("1-D float mask", [](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2], in[3]); },
        {q, k, v, bias_row});
  // Non-contiguous q ([B, L, H, E] transposed to [B, H, L, E]) and k/v shared across heads.
  Tensor qt = att_randn({2, 5, 2, 3}, 17, kFloat64, false).transpose(1, 2);
  qt.requires_grad_();
  Tensor k1 = att_randn({2, 1, 7, 3}, 18), v1 = att_randn({7, 4}, 19);
  check("broadcast batch, non-contiguous q",
        [](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2], Tensor(), 0.0, true); }, {qt, k1, v1});
  // L > S with causal (rows past S see every key), E != Ev.
  Tensor qL = att_randn({2, 9, 3}, 20), kS = att_randn({2, 4, 3}, 21), vS = att_randn({2, 4, 5}, 22);
  check("L > S causal", [](const In& in) { return scaled_dot_product_attention(in[0], in[1], in[2], Tensor(), 0.0, true); },
        {qL, kS, vS});
}

TEST(Attention, FusedMatchesCompositionAcrossBlocks) {
  // Several query and key blocks, partial last blocks; batch 1 and batched (the two backward
  // schedules), every mask kind.
  for (const Shape& batch : {Shape{1}, Shape{2, 3}}) {
    const int64_t L = 130, S = 260, E = 8, Ev = 12;
    Shape qs = batch, ks = batch, vs = batch;
    qs.insert(qs.end(), {L, E});
    ks.insert(ks.end(), {S, E});
    vs.insert(vs.end(), {S, Ev});
    Tensor q = att_randn(qs, 31), k = att_randn(ks, 32), v = att_randn(vs, 33);
    Generator g(34);
    Tensor keep = gt(rand({L, S}, kFloat32, g), 0.2);
    Tensor bias = randn({L, S}, kFloat64, g);
    bias.requires_grad_();
    struct Case {
      const char* name;
      Tensor mask;
      bool causal;
    };
    for (const Case& c : {Case{"none", Tensor(), false}, Case{"causal", Tensor(), true}, Case{"bool", keep, false},
                          Case{"float", bias, false}}) {
      std::vector<Tensor> in{q, k, v};
      if (c.mask.defined() && c.mask.requires_grad()) in.push_back(c.mask);
      auto fused = att_run([&](const std::vector<Tensor>& x) { return scaled_dot_product_attention(x[0], x[1], x[2], c.mask, 0.0, c.causal); }, in);
      auto ref = att_run([&](const std::vector<Tensor>& x) { return att_reference(x[0], x[1], x[2], c.mask, c.causal); }, in);
      ASSERT_EQ(fused.size(), ref.size());
      for (std::size_t i = 0; i < fused.size(); ++i)
        EXPECT_LT(att_rel_err(fused[i], ref[i]), 1e-11) << c.name << " batch " << batch.size() << " tensor " << i;
    }
  }
  // Causal with L much larger than S.
  Tensor q = att_randn({2, 300, 8}, 35), k = att_randn({2, 100, 8}, 36), v = att_randn({2, 100, 8}, 37);
  auto fused = att_run([](const std::vector<Tensor>& x) { return scaled_dot_product_attention(x[0], x[1], x[2], Tensor(), 0.0, true); }, {q, k, v});
  auto ref = att_run([](const std::vector<Tensor>& x) { return att_reference(x[0], x[1], x[2], Tensor(), true); }, {q, k, v});
  for (std::size_t i = 0; i < fused.size(); ++i) EXPECT_LT(att_rel_err(fused[i], ref[i]), 1e-11) << "tensor " << i;
}

TEST(Attention, LowPrecisionMatchesFloat32) {
  const Shape qs{2, 4, 100, 32}, ks{2, 4, 120, 32}, vs{2, 4, 120, 48};
  Tensor q = att_randn(qs, 41, kFloat32, false), k = att_randn(ks, 42, kFloat32, false), v = att_randn(vs, 43, kFloat32, false);
  for (bool causal : {false, true}) {
    auto run = [&](DType dt) {
      std::vector<Tensor> in{q.to(dt).detach(), k.to(dt).detach(), v.to(dt).detach()};
      for (Tensor& t : in) t.requires_grad_();
      auto r = att_run([&](const std::vector<Tensor>& x) { return scaled_dot_product_attention(x[0], x[1], x[2], Tensor(), 0.0, causal); }, in);
      for (const Tensor& t : r) EXPECT_EQ(t.dtype(), dt);
      return r;
    };
    const auto ref = run(kFloat32);
    for (auto [dt, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
      const auto low = run(dt);
      for (std::size_t i = 0; i < ref.size(); ++i)
        EXPECT_LT(att_rel_err(low[i], ref[i]), tol) << name(dt) << " causal " << causal << " tensor " << i;
    }
  }
}

TEST(Attention, DropoutIsReproducibleAndMatchesExplicitMask) {
  const int64_t B = 2, L = 70, S = 140, E = 6, Ev = 5;
  const double p = 0.4;
  Tensor q = att_randn({B, L, E}, 51), k = att_randn({B, S, E}, 52), v = att_randn({B, S, Ev}, 53);
  // The mask the kernel draws: a hash of (one seed taken from the default generator, position).
  Generator mirror(77);
  const uint64_t seed = mirror.next_u64();
  Tensor drop = empty({B, L, S}, kFloat64);
  double* dp = drop.data<double>();
  int64_t kept = 0;
  for (int64_t i = 0; i < B * L * S; ++i) {
    const bool keep = detail::sdpa_dropout_keep(seed, static_cast<uint64_t>(i), p);
    kept += keep;
    dp[i] = keep ? 1.0 / (1.0 - p) : 0.0;
  }
  EXPECT_NEAR(static_cast<double>(kept) / static_cast<double>(B * L * S), 1.0 - p, 0.01);
  auto fused = att_run([&](const std::vector<Tensor>& x) {
    manual_seed(77);
    return scaled_dot_product_attention(x[0], x[1], x[2], Tensor(), p);
  }, {q, k, v});
  auto ref = att_run([&](const std::vector<Tensor>& x) { return att_reference(x[0], x[1], x[2], Tensor(), false, std::nullopt, drop); },
                     {q, k, v});
  for (std::size_t i = 0; i < fused.size(); ++i) EXPECT_LT(att_rel_err(fused[i], ref[i]), 1e-11) << "tensor " << i;
  // Each call draws a new mask; the same seed gives the same output.
  manual_seed(77);
  Tensor a = scaled_dot_product_attention(q, k, v, Tensor(), p);
  Tensor b = scaled_dot_product_attention(q, k, v, Tensor(), p);
  EXPECT_GT(att_rel_err(a, b), 1e-3);
  manual_seed(77);
  EXPECT_EQ(att_rel_err(scaled_dot_product_attention(q, k, v, Tensor(), p), a), 0.0);
  // p = 1 drops everything; gradcheck with the seed fixed inside f.
  EXPECT_EQ(att_values(scaled_dot_product_attention(q, k, v, Tensor(), 1.0)), std::vector<double>(B * L * Ev, 0.0));
  Tensor qs = att_randn({2, 4, 3}, 54), ks = att_randn({2, 6, 3}, 55), vs = att_randn({2, 6, 2}, 56);
  auto r = gradcheck([](const std::vector<Tensor>& x) {
    manual_seed(5);
    return scaled_dot_product_attention(x[0], x[1], x[2], Tensor(), 0.3, true);
  }, {qs, ks, vs});
  EXPECT_TRUE(r.ok) << r.message;
}

// The integer form the CUDA kernel evaluates keeps exactly what sdpa_dropout_keep keeps.
TEST(Attention, DropoutThresholdIsTheKeepRuleInIntegers) {
  EXPECT_EQ(detail::sdpa_dropout_threshold(0.0), 0u);
  EXPECT_EQ(detail::sdpa_dropout_threshold(1.0), uint64_t{1} << 53);
  EXPECT_EQ(detail::sdpa_dropout_threshold(std::ldexp(12345.0, -53)), 12345u);  // x == p * 2^53 is kept
  EXPECT_EQ(detail::sdpa_dropout_threshold(std::nextafter(std::ldexp(12345.0, -53), 1.0)), 12346u);
  for (double p : {1e-12, 0.1, 0.25, 1.0 / 3.0, 0.5, 0.9, 0.999999})
    for (uint64_t i = 0; i < 20000; ++i) {
      const uint64_t seed = 0x5eed + static_cast<uint64_t>(p * 1e6);
      const bool by_int = (detail::sdpa_hash(seed, i) >> 11) >= detail::sdpa_dropout_threshold(p);
      ASSERT_EQ(by_int, detail::sdpa_dropout_keep(seed, i, p)) << "p " << p << " i " << i;
    }
}

TEST(Attention, FullyMaskedRowsGiveZeroAndNoGradient) {
  Tensor q = att_randn({3, 4}, 61), k = att_randn({5, 4}, 62), v = att_randn({5, 2}, 63);
  Tensor keep = ones({3, 5}, kBool);
  keep.select(0, 1).fill_(0.0);
  Tensor out = scaled_dot_product_attention(q, k, v, keep);
  const auto o = att_values(out);
  EXPECT_EQ(o[2], 0.0);
  EXPECT_EQ(o[3], 0.0);
  for (double x : o) EXPECT_TRUE(std::isfinite(x));
  sum(out).backward();
  const auto gq = att_values(q.grad());
  for (int c = 0; c < 4; ++c) EXPECT_EQ(gq[4 + c], 0.0);
  for (double x : att_values(k.grad())) EXPECT_TRUE(std::isfinite(x));
  // -inf in an additive mask behaves the same; S = 0 gives zeros.
  Tensor bias = zeros({3, 5}, kFloat64);
  bias.select(0, 2).fill_(-std::numeric_limits<double>::infinity());
  const auto ob = att_values(scaled_dot_product_attention(q, k, v, bias));
  EXPECT_EQ(ob[4], 0.0);
  EXPECT_EQ(ob[5], 0.0);
  EXPECT_EQ(att_values(scaled_dot_product_attention(q, empty({0, 4}, kFloat64), empty({0, 2}, kFloat64))),
            std::vector<double>(6, 0.0));
}

TEST(Attention, NaNPropagatesInsteadOfBeingMaskedAway) {
  // A NaN score (e.g. an fp16 overflow upstream) must show up in the output so that overflow
  // checks see it, whichever key block it falls in; bfloat16 has its own row loops.
  const int64_t L = 4, S = 300, E = 3;
  for (DType dt : {kFloat32, kBFloat16}) {
    Tensor q = att_randn({L, E}, 64, kFloat32, false).to(dt), k = att_randn({S, E}, 65, kFloat32, false).to(dt),
           v = att_randn({S, 2}, 66, kFloat32, false).to(dt);
    for (int64_t key : {0, 150, 299}) {
      Tensor kn = k.clone();
      kn.select(0, key).fill_(std::nanf(""));
      const auto o = att_values(scaled_dot_product_attention(q, kn, v));
      for (double x : o) EXPECT_TRUE(std::isnan(x)) << name(dt) << " NaN key " << key;
    }
    Tensor qn = q.clone();
    qn.select(0, 1).fill_(std::nanf(""));
    const auto o = att_values(scaled_dot_product_attention(qn, k, v, Tensor(), 0.0, true));
    for (int64_t i = 0; i < L; ++i)
      for (int64_t c = 0; c < 2; ++c) EXPECT_EQ(std::isnan(o[i * 2 + c]), i == 1) << name(dt) << " " << i;
  }
}

TEST(Attention, AutocastRunsInLowPrecisionWithFloat32Grads) {
  Tensor q = att_randn({2, 8, 16}, 71, kFloat32), k = att_randn({2, 10, 16}, 72, kFloat32), v = att_randn({2, 10, 16}, 73, kFloat32);
  Tensor out;
  {
    autocast ac(Device::CPU, kBFloat16);
    out = scaled_dot_product_attention(q, k, v, Tensor(), 0.0, true);
  }
  EXPECT_EQ(out.dtype(), kBFloat16);
  sum(out).backward();
  EXPECT_EQ(q.grad().dtype(), kFloat32);
  EXPECT_EQ(v.grad().dtype(), kFloat32);
  Tensor ref = scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), Tensor(), 0.0, true);
  EXPECT_LT(att_rel_err(out, ref), 1e-2);
}

TEST(Attention, MemoryDoesNotGrowWithTheScoreMatrix) {
  // The [L, S] float32 score matrix would be 4 MiB; the fused kernel keeps only O(L + S) rows.
  const int64_t L = 1024, S = 1024, E = 16;
  Tensor q = att_randn({1, L, E}, 81, kFloat32), k = att_randn({1, S, E}, 82, kFloat32), v = att_randn({1, S, E}, 83, kFloat32);
  const int64_t before = memory_stats().allocated_bytes;
  reset_peak_memory_stats();
  Tensor out = scaled_dot_product_attention(q, k, v, Tensor(), 0.0, true);
  sum(out).backward();
  const int64_t peak = memory_stats().peak_allocated_bytes - before;
  EXPECT_LT(peak, int64_t{1} << 20) << "peak extra bytes " << peak;
  EXPECT_LT(att_rel_err(out, att_reference(q.detach(), k.detach(), v.detach(), Tensor(), true)), 1e-5);
}

TEST(Attention, Errors) {
  Tensor q = ones({2, 3, 4}), k = ones({2, 5, 4}), v = ones({2, 5, 6});
  EXPECT_THROW(scaled_dot_product_attention(q, ones({2, 5, 3}), v), Error);                     // E differs
  EXPECT_THROW(scaled_dot_product_attention(q, k, ones({2, 4, 6})), Error);                     // S differs
  EXPECT_THROW(scaled_dot_product_attention(q, k, v.to(kFloat64)), Error);                      // dtypes differ
  EXPECT_THROW(scaled_dot_product_attention(q.to(kInt64), k.to(kInt64), v.to(kInt64)), Error);  // not floating
  EXPECT_THROW(scaled_dot_product_attention(ones({4}), ones({4}), ones({4})), Error);          // rank
  EXPECT_THROW(scaled_dot_product_attention(q, ones({3, 5, 4}), ones({3, 5, 6})), Error);       // batch
  EXPECT_THROW(scaled_dot_product_attention(q, k, v, ones({3, 4}, kBool)), Error);              // mask shape
  EXPECT_THROW(scaled_dot_product_attention(q, k, v, ones({3, 2, 3, 5}, kBool)), Error);        // mask adds batch
  EXPECT_THROW(scaled_dot_product_attention(q, k, v, ones({3, 5}, kInt64)), Error);             // mask dtype
  EXPECT_THROW(scaled_dot_product_attention(q, k, v, Tensor(), 1.5), Error);
  EXPECT_THROW(scaled_dot_product_attention(q, k, v, Tensor(), -0.1), Error);
  try {
    scaled_dot_product_attention(q, k, v, ones({3, 5}, kBool), 0.0, true);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is_causal"), std::string::npos) << e.what();
  }
}

namespace {
// q, k, v as GPT's attention holds them: heads of a packed [B, L, 3, H, D] projection,
// permuted to [B, H, L, D] (no copy: unit stride along D only).
std::array<Tensor, 3> att_packed_heads(const Tensor& qkv, int64_t H) {
  const int64_t B = qkv.size(0), L = qkv.size(1), D = qkv.size(2) / (3 * H);
  const Tensor x = qkv.reshape({B, L, 3, H, D}).permute({2, 0, 3, 1, 4});
  return {x.select(0, 0), x.select(0, 1), x.select(0, 2)};
}

// Bitwise equality of two tensors' values (NaN compares unequal: it must not appear).
void att_expect_same(const Tensor& a, const Tensor& b, const std::string& what) {
  EXPECT_EQ(a.sizes(), b.sizes()) << what;
  EXPECT_TRUE(att_values(a) == att_values(b)) << what << ": rel err " << att_rel_err(a, b);
}

// The masks both entries take: a bool [L, L], an additive [B, H, L, L] that needs its gradient.
struct AttCase {
  const char* name;
  Tensor mask;
  bool causal;
  double p;
};
std::vector<AttCase> att_cases(int64_t B, int64_t H, int64_t L, int64_t S, DType mask_dtype) {
  Generator g(123);
  Tensor keep = gt(rand({L, S}, kFloat32, g), 0.25);
  Tensor bias = randn({B, H, L, S}, kFloat32, g).to(mask_dtype);
  bias.requires_grad_();
  return {AttCase{"plain", Tensor(), false, 0.0}, AttCase{"causal", Tensor(), true, 0.0}, AttCase{"bool mask", keep, false, 0.0},
          AttCase{"float mask", bias, false, 0.0}, AttCase{"causal dropout", Tensor(), true, 0.3}};
}
}  // namespace

// Heads read by strides from a packed projection give what contiguous copies give, bit for bit:
// the kernel's arithmetic does not depend on the layout. Odd sizes, several key blocks, both
// backward schedules (B * H = 2 is below or at the thread count on small machines; 12 above).
TEST(Attention, StridedViewsMatchContiguousBitwise) {
  for (DType dt : {kFloat32, kFloat64, kBFloat16})
    for (auto [B, H] : {std::pair<int64_t, int64_t>{1, 1}, std::pair<int64_t, int64_t>{3, 4}}) {
      const int64_t L = 131, D = 7;
      for (const AttCase& c : att_cases(B, H, L, L, dt == kFloat64 ? kFloat64 : kFloat32)) {
        Tensor qkv = att_randn({B, L, 3 * H * D}, 200, kFloat32, false).to(dt).detach();
        qkv.requires_grad_();
        const auto views = att_packed_heads(qkv.detach(), H);
        EXPECT_FALSE(views[0].is_contiguous());
        std::vector<Tensor> in;
        for (const Tensor& v : views) in.push_back(v.contiguous().detach().requires_grad_());
        if (c.mask.defined() && c.mask.requires_grad()) in.push_back(c.mask);
        auto run = [&](const std::array<Tensor, 3>& h) {
          manual_seed(9);
          return scaled_dot_product_attention(h[0], h[1], h[2], c.mask, c.p, c.causal);
        };
        const auto ref = att_run([&](const std::vector<Tensor>& x) { return run({x[0], x[1], x[2]}); }, in);
        Tensor dmask_ref = c.mask.requires_grad() ? c.mask.grad() : Tensor();
        std::vector<Tensor> packed_in{qkv};
        if (c.mask.defined() && c.mask.requires_grad()) packed_in.push_back(c.mask);
        const auto got = att_run([&](const std::vector<Tensor>& x) { return run(att_packed_heads(x[0], H)); }, packed_in);
        const std::string what = std::string(name(dt)) + " " + c.name + " B*H " + std::to_string(B * H);
        att_expect_same(got[0], ref[0], what + " out");
        const auto dv = att_packed_heads(got[1], H);
        for (int i = 0; i < 3; ++i) att_expect_same(dv[static_cast<std::size_t>(i)], ref[static_cast<std::size_t>(i) + 1], what + " grad " + std::to_string(i));
        if (dmask_ref.defined()) att_expect_same(got[2], dmask_ref, what + " mask grad");
      }
    }
}

// The packed entry is the public op on head views with the heads merged, exactly; its gradient is
// one contiguous [B, L, 3E] tensor.
TEST(Attention, PackedMatchesHeadViewsBitwise) {
  for (DType dt : {kFloat32, kFloat64, kBFloat16})
    for (auto [B, H] : {std::pair<int64_t, int64_t>{1, 1}, std::pair<int64_t, int64_t>{2, 3}}) {
      const int64_t L = 67, D = 5, E = H * D;
      for (const AttCase& c : att_cases(B, H, L, L, dt == kFloat64 ? kFloat64 : kFloat32)) {
        Tensor qkv = att_randn({B, L, 3 * E}, 300, kFloat32, false).to(dt).detach();
        qkv.requires_grad_();
        std::vector<Tensor> in{qkv};
        if (c.mask.defined() && c.mask.requires_grad()) in.push_back(c.mask);
        const auto ref = att_run([&](const std::vector<Tensor>& x) {
          manual_seed(9);
          const auto h = att_packed_heads(x[0], H);
          return scaled_dot_product_attention(h[0], h[1], h[2], c.mask, c.p, c.causal).transpose(1, 2).reshape({B, L, E});
        }, in);
        const auto got = att_run([&](const std::vector<Tensor>& x) {
          manual_seed(9);
          return scaled_dot_product_attention_packed(x[0], H, c.mask, c.p, c.causal);
        }, in);
        const std::string what = std::string(name(dt)) + " " + c.name + " B*H " + std::to_string(B * H);
        EXPECT_TRUE(got[0].is_contiguous()) << what;
        EXPECT_TRUE(got[1].is_contiguous()) << what;
        EXPECT_EQ(got[1].dtype(), dt) << what;
        for (std::size_t i = 0; i < got.size(); ++i) att_expect_same(got[i], ref[i], what + " tensor " + std::to_string(i));
      }
    }
}

// Each kernel against a float64 composition of the same input values: relative norm error of the
// output and every gradient. float32 computes exactly what float64 does in float32 arithmetic:
// ~1e-7 per rounding (measured 2-4e-7), so 2e-6. bfloat16 rounds P and dS to bfloat16 (8
// significant bits, relative error up to 2^-9 = 2e-3 per element) for their products, and every
// result once on store: measured 2-3e-3, so 1e-2. A NaN fails (comparisons with
// NaN are false). Odd L, S, E, Ev; S spans two key blocks; dropout against the explicit mask.
TEST(Attention, KernelsMatchFloat64Reference) {
  if (!cpu::gemm_16bit_available()) GTEST_LOG_(INFO) << "no AVX-512: bfloat16 is widened to float32 here";
  for (const Shape& batch : {Shape{1}, Shape{2, 3}}) {
    const int64_t L = 67, S = 131, E = 33, Ev = 19, B = numel_of(batch);
    Shape qs = batch, ks = batch, vs = batch, ms = batch;
    qs.insert(qs.end(), {L, E});
    ks.insert(ks.end(), {S, E});
    vs.insert(vs.end(), {S, Ev});
    ms.insert(ms.end(), {L, S});
    Generator g(400);
    const Tensor keep = gt(rand({L, S}, kFloat32, g), 0.25);
    const Tensor bias = randn(ms, kFloat32, g);
    const double p = 0.3;
    Generator mirror(77);
    const uint64_t seed = mirror.next_u64();
    Tensor drop = empty(ms, kFloat64);
    for (int64_t i = 0; i < B * L * S; ++i) drop.data<double>()[i] = detail::sdpa_dropout_keep(seed, static_cast<uint64_t>(i), p) ? 1.0 / (1.0 - p) : 0.0;
    for (auto [dt, tol] : {std::pair{kFloat32, 2e-6}, std::pair{kBFloat16, 1e-2}}) {
      // Inputs representable in dt, so that the reference sees the kernel's very values.
      auto input = [&](const Shape& s, uint64_t sd) { return att_randn(s, sd, kFloat32, false).to(dt).detach(); };
      Tensor q = input(qs, 401), k = input(ks, 402), v = input(vs, 403);
      const Tensor bmask = bias.to(dt);
      struct Case {
        const char* name;
        Tensor mask;
        bool causal;
        bool dropout;
      };
      for (const Case& c : {Case{"plain", Tensor(), false, false}, Case{"causal", Tensor(), true, false}, Case{"bool", keep, false, false},
                            Case{"float", bmask, false, false}, Case{"dropout", Tensor(), false, true}}) {
        std::vector<Tensor> in{q.requires_grad_(), k.requires_grad_(), v.requires_grad_()};
        const auto got = att_run([&](const std::vector<Tensor>& x) {
          manual_seed(77);
          return scaled_dot_product_attention(x[0], x[1], x[2], c.mask, c.dropout ? p : 0.0, c.causal);
        }, in);
        std::vector<Tensor> in64;
        for (const Tensor& t : in) in64.push_back(t.detach().to(kFloat64).requires_grad_());
        const Tensor m64 = c.mask.defined() && c.mask.is_floating_point() ? c.mask.to(kFloat64) : c.mask;
        const auto ref = att_run([&](const std::vector<Tensor>& x) {
          return att_reference(x[0], x[1], x[2], m64, c.causal, std::nullopt, c.dropout ? drop : Tensor());
        }, in64);
        for (std::size_t i = 0; i < got.size(); ++i) {
          EXPECT_EQ(got[i].dtype(), dt);
          EXPECT_LT(att_rel_err(got[i], ref[i]), tol) << name(dt) << " " << c.name << " batch " << batch.size() << " tensor " << i;
        }
      }
    }
  }
}

// The packed entry allocates its output and logsumexp and nothing else in forward (no head
// copies, no widened inputs, no merge), under bfloat16 autocast as GPT runs it.
TEST(Attention, PackedForwardAllocatesNoHeadCopies) {
  const int64_t B = 2, L = 40, H = 4, D = 16, E = H * D;
  Tensor x = att_randn({B, L, 3 * E}, 500, kFloat32);
  Tensor out;
  {
    autocast ac(Device::CPU, kBFloat16);
    Tensor qkv = x.to(kBFloat16);  // as the projection's output is
    const int64_t before = memory_stats().num_allocs;
    out = scaled_dot_product_attention_packed(qkv, H, Tensor(), 0.0, true);
    EXPECT_EQ(memory_stats().num_allocs - before, 2) << "output and logsumexp only";
  }
  EXPECT_EQ(out.dtype(), kBFloat16);
  EXPECT_EQ(out.sizes(), (Shape{B, L, E}));
  EXPECT_TRUE(out.is_contiguous());
}

TEST(Attention, PackedErrors) {
  Tensor qkv = ones({2, 5, 12});
  EXPECT_THROW(scaled_dot_product_attention_packed(ones({2, 5, 13}), 2), Error);         // 3E not a multiple of 3 heads
  EXPECT_THROW(scaled_dot_product_attention_packed(ones({5, 12}), 2), Error);            // rank
  EXPECT_THROW(scaled_dot_product_attention_packed(qkv, 0), Error);                      // heads
  EXPECT_THROW(scaled_dot_product_attention_packed(qkv, 2, ones({4, 5}, kBool)), Error);  // mask shape
  EXPECT_THROW(scaled_dot_product_attention_packed(qkv, 2, ones({5, 5}, kBool), 0.0, true), Error);
  try {
    scaled_dot_product_attention_packed(ones({2, 5, 13}), 2);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("scaled_dot_product_attention_packed"), std::string::npos) << e.what();
  }
}
