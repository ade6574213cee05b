// nn layers: default initialisations, nn::init, forward shapes and values against the
// functional ops or plain-loop references, BatchNorm/Dropout modes, attention.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;

namespace {

std::vector<double> nl_vals(const Tensor& t) {
  const Tensor c = t.detach().to(kFloat64).contiguous();
  return std::vector<double>(c.data<double>(), c.data<double>() + c.numel());
}

double nl_rel(const std::vector<double>& a, const std::vector<double>& ref) {
  if (a.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}
double nl_rel(const Tensor& a, const Tensor& ref) { return nl_rel(nl_vals(a), nl_vals(ref)); }

struct NlStats {
  double mean, std, absmax;
};
NlStats nl_stats(const Tensor& t) {
  const auto v = nl_vals(t);
  double s = 0, ss = 0, m = 0;
  for (double x : v) s += x, m = std::max(m, std::fabs(x));
  const double mean = s / static_cast<double>(v.size());
  for (double x : v) ss += (x - mean) * (x - mean);
  return {mean, std::sqrt(ss / static_cast<double>(v.size())), m};
}

// Multi-head attention in double loops: q/k/v projections from the packed weight, per-head
// softmax(q k^T / sqrt(D) + mask) v, then the output projection. allowed(b, h, i, j) masks.
std::vector<double> nl_mha_ref(const Tensor& xq, const Tensor& xk, const Tensor& xv, const nn::MultiheadAttention& m,
                               const std::function<bool(int64_t, int64_t, int64_t, int64_t)>& allowed) {
  const int64_t B = xq.size(0), L = xq.size(1), S = xk.size(1), E = m.embed_dim, H = m.num_heads, D = E / H;
  const auto q_in = nl_vals(xq), k_in = nl_vals(xk), v_in = nl_vals(xv), W = nl_vals(m.in_proj_weight), bi = nl_vals(m.in_proj_bias),
             Wo = nl_vals(m.out_proj->weight), bo = nl_vals(m.out_proj->bias);
  auto project = [&](const std::vector<double>& x, int64_t n, int64_t which) {
    std::vector<double> out(static_cast<std::size_t>(B * n * E));
    for (int64_t r = 0; r < B * n; ++r)
      for (int64_t o = 0; o < E; ++o) {
        double s = bi[which * E + o];
        for (int64_t i = 0; i < E; ++i) s += x[r * E + i] * W[(which * E + o) * E + i];
        out[r * E + o] = s;
      }
    return out;
  };
  const auto q = project(q_in, L, 0), k = project(k_in, S, 1), v = project(v_in, S, 2);
  std::vector<double> ctx(static_cast<std::size_t>(B * L * E), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < L; ++i) {
        std::vector<double> sc(static_cast<std::size_t>(S));
        double mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += q[(b * L + i) * E + h * D + d] * k[(b * S + j) * E + h * D + d];
          sc[j] = allowed(b, h, i, j) ? s / std::sqrt(static_cast<double>(D)) : -INFINITY;
          mx = std::max(mx, sc[j]);
        }
        double tot = 0;
        for (double& s : sc) tot += (s = std::exp(s - mx));
        for (int64_t j = 0; j < S; ++j)
          for (int64_t d = 0; d < D; ++d) ctx[(b * L + i) * E + h * D + d] += sc[j] / tot * v[(b * S + j) * E + h * D + d];
      }
  std::vector<double> out(static_cast<std::size_t>(B * L * E));
  for (int64_t r = 0; r < B * L; ++r)
    for (int64_t o = 0; o < E; ++o) {
      double s = bo[o];
      for (int64_t i = 0; i < E; ++i) s += ctx[r * E + i] * Wo[o * E + i];
      out[r * E + o] = s;
    }
  return out;
}

}  // namespace

TEST(NnInit, LinearAndConvDefaultBounds) {
  Generator g(11);
  nn::Linear lin(100, 50, true, g);
  const double b = 1.0 / std::sqrt(100.0);  // kaiming_uniform(a = sqrt(5)) bound = 1/sqrt(fan_in)
  const NlStats w = nl_stats(lin.weight), bs = nl_stats(lin.bias);
  EXPECT_LE(w.absmax, b);
  EXPECT_GT(w.absmax, 0.98 * b);  // 5000 draws reach the edge
  EXPECT_NEAR(w.std, b / std::sqrt(3.0), 0.03 * b);
  EXPECT_NEAR(w.mean, 0.0, 0.03 * b);
  EXPECT_LE(bs.absmax, b);
  EXPECT_GT(bs.absmax, 0.7 * b);

  nn::Conv2d conv(8, 16, 3, 1, 0, 1, 1, true, g);
  const double cb = 1.0 / std::sqrt(8.0 * 9.0);
  EXPECT_LE(nl_stats(conv.weight).absmax, cb);
  EXPECT_GT(nl_stats(conv.weight).absmax, 0.98 * cb);
  EXPECT_LE(nl_stats(conv.bias).absmax, cb);
  nn::Conv2d grouped(8, 16, {3, 1}, 1, 0, 1, 4, false, g);
  EXPECT_EQ(grouped.weight.sizes(), (Shape{16, 2, 3, 1}));
  EXPECT_LE(nl_stats(grouped.weight).absmax, 1.0 / std::sqrt(6.0));
  EXPECT_FALSE(grouped.bias.defined());
}

TEST(NnInit, Initialisers) {
  Generator g(12);
  Tensor w = empty({64, 32, 3, 3});
  w.requires_grad_();  // initialisers work on parameters (they run under no_grad)
  nn::init::kaiming_uniform_(w, 0.0, "fan_in", "relu", g);
  EXPECT_LE(nl_stats(w).absmax, std::sqrt(6.0 / (32 * 9)));
  EXPECT_GT(nl_stats(w).absmax, 0.99 * std::sqrt(6.0 / (32 * 9)));
  nn::init::kaiming_normal_(w, 0.0, "fan_out", "relu", g);
  EXPECT_NEAR(nl_stats(w).std, std::sqrt(2.0 / (64 * 9)), 0.02 * std::sqrt(2.0 / (64 * 9)));
  nn::init::xavier_uniform_(w, 1.0, g);
  const double xb = std::sqrt(6.0 / (32 * 9 + 64 * 9));
  EXPECT_LE(nl_stats(w).absmax, xb);
  EXPECT_GT(nl_stats(w).absmax, 0.99 * xb);
  nn::init::xavier_normal_(w, 2.0, g);
  EXPECT_NEAR(nl_stats(w).std, 2.0 * std::sqrt(2.0 / (32 * 9 + 64 * 9)), 0.02 * 2.0 * std::sqrt(2.0 / (32 * 9 + 64 * 9)));
  nn::init::normal_(w, 3.0, 0.5, g);
  EXPECT_NEAR(nl_stats(w).mean, 3.0, 0.01);
  EXPECT_NEAR(nl_stats(w).std, 0.5, 0.01);
  nn::init::uniform_(w, -2.0, -1.0, g);
  const auto v = nl_vals(w);
  EXPECT_GE(*std::min_element(v.begin(), v.end()), -2.0);
  EXPECT_LT(*std::max_element(v.begin(), v.end()), -1.0);
  nn::init::ones_(w);
  EXPECT_EQ(nl_stats(w).mean, 1.0);
  nn::init::zeros_(w);
  EXPECT_EQ(nl_stats(w).absmax, 0.0);
  nn::init::constant_(w, -0.25);
  EXPECT_EQ(nl_stats(w).mean, -0.25);
  EXPECT_TRUE(w.requires_grad());
  EXPECT_DOUBLE_EQ(nn::init::calculate_gain("tanh"), 5.0 / 3.0);
  EXPECT_DOUBLE_EQ(nn::init::calculate_gain("leaky_relu", std::sqrt(5.0)), std::sqrt(1.0 / 3.0));

  // Views and 16-bit tensors: values land through the strides and are rounded.
  Tensor base = zeros({4, 6});
  nn::init::ones_(base.transpose(0, 1).narrow(0, 1, 2));
  EXPECT_EQ(nl_stats(base).mean, 8.0 / 24.0);
  EXPECT_EQ(base.select(0, 2).select(0, 1).item<double>(), 1.0);
  Tensor h = empty({100, 40}, kBFloat16);
  nn::init::kaiming_uniform_(h, std::sqrt(5.0), "fan_in", "leaky_relu", g);
  EXPECT_LE(nl_stats(h).absmax, 1.0 / std::sqrt(40.0) * (1 + 1.0 / 128));

  EXPECT_THROW(nn::init::kaiming_uniform_(zeros({5})), Error);  // no fan for 1-D
  EXPECT_THROW(nn::init::kaiming_normal_(w, 0.0, "fan_sideways"), Error);
  EXPECT_THROW(nn::init::calculate_gain("swish"), Error);
  EXPECT_THROW(nn::init::normal_(zeros({3}, kInt64)), Error);

  // Seeded generators make initialisation reproducible.
  Generator a(99), b(99), c(100);
  nn::Linear la(7, 5, true, a), lb(7, 5, true, b), lc(7, 5, true, c);
  EXPECT_EQ(nl_vals(la.weight), nl_vals(lb.weight));
  EXPECT_EQ(nl_vals(la.bias), nl_vals(lb.bias));
  EXPECT_NE(nl_vals(la.weight), nl_vals(lc.weight));
}

TEST(NnInit, EmbeddingAndNormDefaults) {
  Generator g(13);
  nn::Embedding emb(1000, 16, std::nullopt, g);
  const NlStats s = nl_stats(emb.weight);
  EXPECT_NEAR(s.mean, 0.0, 0.02);
  EXPECT_NEAR(s.std, 1.0, 0.02);
  nn::Embedding pad(10, 4, -1, g);  // negative padding_idx counts from the end
  EXPECT_EQ(pad.padding_idx, 9);
  EXPECT_EQ(nl_stats(pad.weight.select(0, 9)).absmax, 0.0);
  const Tensor out = pad.forward(tensor(std::vector<int64_t>{9, 2, 9}, {3}));
  EXPECT_EQ(out.sizes(), (Shape{3, 4}));
  sum(out).backward();
  EXPECT_EQ(nl_stats(pad.weight.grad().select(0, 9)).absmax, 0.0);  // padding row gets no gradient
  EXPECT_EQ(nl_stats(pad.weight.grad().select(0, 2)).mean, 1.0);
  EXPECT_EQ(pad.repr(), "Embedding(10, 4, padding_idx=9)");

  nn::LayerNorm ln(Shape{3, 5});
  EXPECT_EQ(nl_stats(ln.weight).mean, 1.0);
  EXPECT_EQ(nl_stats(ln.bias).absmax, 0.0);
  EXPECT_EQ(ln.repr(), "LayerNorm((3, 5), eps=1e-05, elementwise_affine=True)");
  nn::LayerNorm nob(8, 1e-6, true, false);
  EXPECT_FALSE(nob.bias.defined());
  EXPECT_EQ(nob.num_parameters(), 8);
  nn::GroupNorm gn(2, 6);
  EXPECT_EQ(nl_stats(gn.weight).mean, 1.0);
  EXPECT_EQ(nl_stats(gn.bias).absmax, 0.0);
  nn::BatchNorm2d bn(4);
  EXPECT_EQ(nl_stats(bn.weight).mean, 1.0);
  EXPECT_EQ(nl_stats(bn.bias).absmax, 0.0);
  EXPECT_EQ(nl_stats(bn.running_mean).absmax, 0.0);
  EXPECT_EQ(nl_stats(bn.running_var).mean, 1.0);
  nn::BatchNorm2d plain(4, 1e-5, 0.1, /*affine=*/false, /*track_running_stats=*/false);
  EXPECT_EQ(plain.num_parameters(), 0);
  EXPECT_TRUE(plain.named_buffers().empty());
}

TEST(NnLayers, ForwardShapesMatchFunctionalOps) {
  Generator g(14);
  nn::Linear lin(20, 10, true, g);
  Tensor x = randn({4, 3, 20}, kFloat32, g);
  EXPECT_EQ(lin.forward(x).sizes(), (Shape{4, 3, 10}));
  EXPECT_EQ(nl_rel(lin.forward(x), linear(x, lin.weight, lin.bias)), 0.0);

  nn::Conv2d conv(3, 8, 3, 2, 1, 1, 1, true, g);
  x = randn({2, 3, 9, 9}, kFloat32, g);
  EXPECT_EQ(conv.forward(x).sizes(), (Shape{2, 8, 5, 5}));
  EXPECT_EQ(nl_rel(conv.forward(x), conv2d(x, conv.weight, conv.bias, {2, 2}, {1, 1})), 0.0);
  nn::Conv2d dil(3, 6, {3, 2}, {1, 2}, {2, 0}, 2, 3, true, g);
  EXPECT_EQ(dil.forward(x).sizes(), (Shape{2, 6, 9, 4}));
  EXPECT_EQ(dil.repr(), "Conv2d(3, 6, kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 2), groups=3)");

  nn::LayerNorm ln(9);
  EXPECT_EQ(nl_rel(ln.forward(x), layer_norm(x, {9}, ln.weight, ln.bias)), 0.0);
  nn::GroupNorm gn(3, 3);
  EXPECT_EQ(nl_rel(gn.forward(x), group_norm(x, 3, gn.weight, gn.bias)), 0.0);
  nn::BatchNorm2d bn(3);
  bn.eval();
  EXPECT_EQ(bn.forward(x).sizes(), x.sizes());

  nn::Embedding emb(11, 5, std::nullopt, g);
  const Tensor ids = randint(0, 11, {2, 7}, kInt64, g);
  EXPECT_EQ(emb.forward(ids).sizes(), (Shape{2, 7, 5}));
  EXPECT_EQ(nl_rel(emb.forward(ids), embedding(emb.weight, ids)), 0.0);

  EXPECT_EQ(nl_rel(nn::ReLU().forward(x), relu(x)), 0.0);
  EXPECT_EQ(nl_rel(nn::GELU().forward(x), gelu(x)), 0.0);
  EXPECT_EQ(nl_rel(nn::GELU("tanh").forward(x), gelu(x, "tanh")), 0.0);
  EXPECT_EQ(nl_rel(nn::SiLU().forward(x), silu(x)), 0.0);
  EXPECT_EQ(nl_rel(nn::Tanh().forward(x), tanh(x)), 0.0);
  EXPECT_EQ(nl_rel(nn::Sigmoid().forward(x), sigmoid(x)), 0.0);
  EXPECT_TRUE(nn::Identity().forward(x).is_same(x));

  x = randn({1, 2, 8, 8}, kFloat32, g);
  nn::MaxPool2d mp(3, 2, 1);
  EXPECT_EQ(mp.forward(x).sizes(), (Shape{1, 2, 4, 4}));
  EXPECT_EQ(nl_rel(mp.forward(x), max_pool2d(x, {3, 3}, {2, 2}, {1, 1})), 0.0);
  EXPECT_EQ(mp.repr(), "MaxPool2d(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)");
  nn::AvgPool2d ap(2);  // stride defaults to the kernel
  EXPECT_EQ(ap.forward(x).sizes(), (Shape{1, 2, 4, 4}));
  EXPECT_EQ(nl_rel(ap.forward(x), avg_pool2d(x, {2, 2}, {2, 2})), 0.0);
  nn::AdaptiveAvgPool2d gap({1, 1});
  EXPECT_EQ(gap.forward(x).sizes(), (Shape{1, 2, 1, 1}));
  EXPECT_EQ(nn::AdaptiveAvgPool2d({3, 2}).forward(x).sizes(), (Shape{1, 2, 3, 2}));
  EXPECT_EQ(nn::Flatten().forward(x).sizes(), (Shape{1, 128}));
  EXPECT_EQ(nn::Flatten(0, 2).forward(x).sizes(), (Shape{16, 8}));

  // Sequential chains the single-tensor forwards.
  auto c1 = std::make_shared<nn::Conv2d>(2, 4, 3, 1, 1, 1, 1, true, g);
  auto fc = std::make_shared<nn::Linear>(4, 3, true, g);
  nn::Sequential seq{c1, std::make_shared<nn::ReLU>(), std::make_shared<nn::AdaptiveAvgPool2d>(1), std::make_shared<nn::Flatten>(), fc};
  const Tensor manual = fc->forward(adaptive_avg_pool2d(relu(c1->forward(x)), {1, 1}).flatten(1));
  EXPECT_EQ(nl_rel(seq.forward(x), manual), 0.0);
  EXPECT_EQ(seq(x).sizes(), (Shape{1, 3}));
}

TEST(NnLayers, BatchNormTrainEval) {
  Generator g(15);
  const int64_t N = 8, C = 3, HW = 16;
  Tensor x = add(mul(randn({N, C, 4, 4}, kFloat32, g), 2.0), tensor({1.0f, -3.0f, 0.5f}, {1, 3, 1, 1}));
  const auto xv = nl_vals(x);
  std::vector<double> bmean(C, 0), bvar(C, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) bmean[c] += xv[(n * C + c) * HW + i] / (N * HW);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) bvar[c] += std::pow(xv[(n * C + c) * HW + i] - bmean[c], 2) / (N * HW);

  nn::BatchNorm2d bn(C);
  const Tensor y = bn.forward(x);  // training: batch statistics
  const auto yv = nl_vals(y);
  for (int64_t c = 0; c < C; ++c) {
    double m = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < HW; ++i) m += yv[(n * C + c) * HW + i] / (N * HW);
    EXPECT_NEAR(m, 0.0, 1e-5);
    const double unbiased = bvar[c] * (N * HW) / (N * HW - 1);
    EXPECT_NEAR(nl_vals(bn.running_mean)[c], 0.1 * bmean[c], 1e-5);
    EXPECT_NEAR(nl_vals(bn.running_var)[c], 0.9 + 0.1 * unbiased, 1e-4);
  }
  EXPECT_EQ(bn.num_batches_tracked.item<int64_t>(), 1);

  bn.eval();  // eval: running statistics, which stay put
  const auto rm = nl_vals(bn.running_mean), rv = nl_vals(bn.running_var);
  const auto ye = nl_vals(bn.forward(x));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) {
        const int64_t k = (n * C + c) * HW + i;
        EXPECT_NEAR(ye[k], (xv[k] - rm[c]) / std::sqrt(rv[c] + 1e-5), 1e-4);
      }
  EXPECT_EQ(nl_vals(bn.running_mean), rm);
  EXPECT_EQ(bn.num_batches_tracked.item<int64_t>(), 1);

  // momentum = None: a cumulative average of the batch means.
  nn::BatchNorm2d cum(C, 1e-5, std::nullopt);
  const Tensor x2 = randn({N, C, 4, 4}, kFloat32, g);
  cum.forward(x);
  cum.forward(x2);
  const Tensor m2 = mean(x2, {0, 2, 3});
  for (int64_t c = 0; c < C; ++c) EXPECT_NEAR(nl_vals(cum.running_mean)[c], 0.5 * (bmean[c] + nl_vals(m2)[c]), 1e-5);
  EXPECT_EQ(cum.num_batches_tracked.item<int64_t>(), 2);

  // Without running statistics, eval mode still normalises with the batch.
  nn::BatchNorm2d nostats(C, 1e-5, 0.1, true, false);
  nostats.eval();
  EXPECT_NEAR(nl_stats(nostats.forward(x)).mean, 0.0, 1e-5);

  EXPECT_NE(mixprec::testing::error_of([&] { bn.forward(randn({2, 3, 4})); }).find("4-D"), std::string::npos);
  EXPECT_THROW(bn.forward(randn({2, 4, 2, 2})), Error);
}

TEST(NnLayers, DropoutTrainEval) {
  const Tensor x = ones({4000});
  Generator ga(21), gb(21);
  nn::Dropout da(0.25, ga), db(0.25, gb);
  const auto y = nl_vals(da.forward(x));
  int64_t zeros_seen = 0;
  for (double v : y) {
    EXPECT_TRUE(v == 0.0 || std::fabs(v - 1.0 / 0.75) < 1e-6) << v;
    zeros_seen += v == 0.0;
  }
  EXPECT_NEAR(static_cast<double>(zeros_seen) / 4000.0, 0.25, 0.03);
  EXPECT_EQ(nl_vals(db.forward(x)), y);  // same seed, same mask
  da.eval();
  EXPECT_EQ(nl_vals(da.forward(x)), nl_vals(x));
  EXPECT_THROW(nn::Dropout(1.5), Error);
}

TEST(NnLayers, MultiheadAttentionMatchesManualComposition) {
  Generator g(16);
  const int64_t B = 2, L = 5, S = 3, E = 8, H = 2;
  nn::MultiheadAttention mha(E, H, 0.0, true, g);
  EXPECT_EQ(mha.num_parameters(), 4 * E * E + 4 * E);
  std::vector<std::string> names;
  for (const auto& [n, p] : mha.named_parameters()) names.push_back(n);
  EXPECT_EQ(names, (std::vector<std::string>{"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}));
  EXPECT_EQ(nl_stats(mha.in_proj_bias).absmax, 0.0);
  EXPECT_EQ(nl_stats(mha.out_proj->bias).absmax, 0.0);
  EXPECT_LE(nl_stats(mha.in_proj_weight).absmax, std::sqrt(6.0 / (E + 3 * E)));  // xavier_uniform on [3E, E]
  nn::init::uniform_(mha.in_proj_bias, -0.5, 0.5, g);  // non-zero biases so the reference checks them
  nn::init::uniform_(mha.out_proj->bias, -0.5, 0.5, g);

  const Tensor x = randn({B, L, E}, kFloat32, g), kx = randn({B, S, E}, kFloat32, g), vx = randn({B, S, E}, kFloat32, g);
  auto all = [](int64_t, int64_t, int64_t, int64_t) { return true; };
  const Tensor self = mha.forward(x);
  EXPECT_EQ(self.sizes(), (Shape{B, L, E}));
  EXPECT_LT(nl_rel(nl_vals(self), nl_mha_ref(x, x, x, mha, all)), 1e-5);
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, kx, vx)), nl_mha_ref(x, kx, vx, mha, all)), 1e-5);

  // PyTorch's MHA mask convention: bool true = may not attend; float = added to the scores.
  std::vector<uint8_t> mbits;
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < S; ++j) mbits.push_back((i + j) % 3 == 0);
  const Tensor bool_mask = tensor(mbits, {L, S}).to(kBool);
  auto masked = [](int64_t, int64_t, int64_t i, int64_t j) { return (i + j) % 3 != 0; };
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, kx, vx, bool_mask)), nl_mha_ref(x, kx, vx, mha, masked)), 1e-5);
  const Tensor float_mask = masked_fill(zeros({L, S}), bool_mask, -1e9);
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, kx, vx, float_mask)), nl_mha_ref(x, kx, vx, mha, masked)), 1e-5);

  const Tensor pad = tensor(std::vector<uint8_t>{0, 0, 1, 1, 0, 0}, {B, S}).to(kBool);  // batch 0 ignores key 2, batch 1 key 0
  auto unpadded = [](int64_t b, int64_t, int64_t, int64_t j) { return b == 0 ? j != 2 : j != 0; };
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, kx, vx, Tensor(), false, pad)), nl_mha_ref(x, kx, vx, mha, unpadded)), 1e-5);
  auto both = [&](int64_t b, int64_t h, int64_t i, int64_t j) { return masked(b, h, i, j) && unpadded(b, h, i, j); };
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, kx, vx, bool_mask, false, pad)), nl_mha_ref(x, kx, vx, mha, both)), 1e-5);

  // A per-head mask [B * H, L, S]: head 1 of every batch may not see key 0.
  std::vector<uint8_t> hb;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < S; ++j) hb.push_back(h == 1 && j == 0);
  auto per_head = [](int64_t, int64_t h, int64_t, int64_t j) { return !(h == 1 && j == 0); };
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, kx, vx, tensor(hb, {B * H, L, S}).to(kBool))), nl_mha_ref(x, kx, vx, mha, per_head)),
            1e-5);

  // Causal self-attention, alone and combined with key padding (L keys).
  auto causal = [](int64_t, int64_t, int64_t i, int64_t j) { return j <= i; };
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, x, x, Tensor(), true)), nl_mha_ref(x, x, x, mha, causal)), 1e-5);
  const Tensor pad_l = tensor(std::vector<uint8_t>{0, 1, 0, 0, 0, 0, 0, 0, 1, 0}, {B, L}).to(kBool);
  auto causal_pad = [](int64_t b, int64_t, int64_t i, int64_t j) { return j <= i && !(b == 0 && j == 1) && !(b == 1 && j == 3); };
  EXPECT_LT(nl_rel(nl_vals(mha.forward(x, x, x, Tensor(), true, pad_l)), nl_mha_ref(x, x, x, mha, causal_pad)), 1e-5);

  // Gradients reach every parameter.
  sum(mha.forward(x, kx, vx)).backward();
  for (const auto& [n, p] : mha.named_parameters()) EXPECT_GT(nl_stats(p.grad()).absmax, 0.0) << n;

  EXPECT_THROW(nn::MultiheadAttention(10, 3), Error);
  EXPECT_THROW(mha.forward(randn({B, L, E + 1})), Error);
  EXPECT_THROW(mha.forward(x, kx, vx, zeros({L, L})), Error);
  EXPECT_THROW(mha.forward(x, kx, vx, Tensor(), false, zeros({B, L}, kBool)), Error);
}

TEST(NnLayers, MultiheadAttentionGradcheck) {
  Generator g(17);
  nn::MultiheadAttention mha(4, 2, 0.0, true, g);
  mha.to(kFloat64);
  nn::init::uniform_(mha.in_proj_bias, -0.5, 0.5, g);
  Tensor x = randn({2, 3, 4}, kFloat64, g);
  x.requires_grad_();
  Tensor w = mha.in_proj_weight.detach().clone();
  w.requires_grad_();
  // Rebinding the member makes the module use gradcheck's probe tensors for the weight.
  const auto r = gradcheck(
      [&](const std::vector<Tensor>& in) {
        mha.in_proj_weight = in[1];
        return mha.forward(in[0], in[0], in[0], Tensor(), true);
      },
      {x, w});
  EXPECT_TRUE(r.ok) << r.message;
}

// Self-attention takes the packed path (heads read from the one qkv projection by strides, its
// gradient written in one piece); distinct key and value tensors take the head-view path. The two
// agree in float32 and under bfloat16 autocast, outputs and every gradient, dropout's draws
// included. float32: the projections' backward sums in another order, so 1e-5; bfloat16: the
// head-view path rounds each of dq, dk, dv's input gradients to bfloat16 before summing, so 1e-2.
TEST(NnLayers, MultiheadAttentionPackedPathMatchesHeadViews) {
  Generator g(18);
  const int64_t B = 3, L = 37, E = 24, H = 4;
  nn::MultiheadAttention mha(E, H, 0.2, true, g);
  nn::init::uniform_(mha.in_proj_bias, -0.5, 0.5, g);
  nn::init::uniform_(mha.out_proj->bias, -0.5, 0.5, g);
  const Tensor x0 = randn({B, L, E}, kFloat32, g), w = randn({B, L, E}, kFloat32, g);
  for (bool bf16 : {false, true})
    for (bool causal : {false, true}) {
      auto run = [&](bool packed) {
        mha.zero_grad();
        Tensor x = x0.detach();
        x.requires_grad_();
        Tensor y;
        {
          std::optional<autocast> ac;
          if (bf16) ac.emplace(Device::CPU, kBFloat16);
          manual_seed(3);
          y = packed ? mha.forward(x, x, x, Tensor(), causal) : mha.forward(x, x.view(x.sizes()), x.view(x.sizes()), Tensor(), causal);
        }
        sum(mul(y.to(kFloat32), w)).backward();
        std::vector<Tensor> r{y.detach(), x.grad()};
        for (const auto& [n, p] : mha.named_parameters()) r.push_back(p.grad());
        return r;
      };
      const auto packed = run(true), views = run(false);
      for (std::size_t i = 0; i < packed.size(); ++i)
        EXPECT_LT(nl_rel(nl_vals(packed[i]), nl_vals(views[i])), bf16 ? 1e-2 : 1e-5) << "bf16 " << bf16 << " causal " << causal << " tensor " << i;
    }
}

// The self-attention graph holds no head split or merge: no views or copies between the packed
// projection and the output projection, only the attention node itself.
TEST(NnLayers, MultiheadAttentionSelfAttentionHasNoHeadViewsOrCopies) {
  Generator g(19);
  nn::MultiheadAttention mha(32, 4, 0.0, true, g);
  Tensor x = randn({2, 16, 32}, kFloat32, g);
  Tensor y;
  {
    autocast ac(Device::CPU, kBFloat16);
    y = mha.forward(x, x, x, Tensor(), true);
  }
  std::vector<std::string> names;
  std::vector<std::shared_ptr<autograd::Node>> todo{y.grad_fn()};
  while (!todo.empty()) {
    const auto n = todo.back();
    todo.pop_back();
    if (!n) continue;
    names.push_back(n->name());
    for (const auto& e : n->next_edges) todo.push_back(e.fn);
  }
  EXPECT_NE(std::find(names.begin(), names.end(), "scaled_dot_product_attention_packed"), names.end());
  for (const char* bad : {"permute", "slice", "select", "view", "clone", "contiguous"})
    EXPECT_EQ(std::find(names.begin(), names.end(), bad), names.end()) << bad;
}

TEST(NnLayers, TransformerBlockIsPreNormComposition) {
  Generator g(18);
  const int64_t d = 8;
  nn::TransformerBlock block(d, 2, 16, 0.0, false, g);
  EXPECT_EQ(block.num_parameters(), 2 * 2 * d + (4 * d * d + 4 * d) + (d * 16 + 16) + (16 * d + d));
  for (auto* ln : {block.ln1.get(), block.ln2.get()}) {  // non-trivial affine so both norms matter
    nn::init::uniform_(ln->weight, 0.5, 1.5, g);
    nn::init::uniform_(ln->bias, -0.5, 0.5, g);
  }
  const Tensor x = randn({2, 4, d}, kFloat32, g);
  const Tensor h = block.ln1->forward(x);
  const Tensor a = add(x, block.attn->forward(h, h, h));
  const auto fc1 = block.mlp->at<nn::Linear>(0), fc2 = block.mlp->at<nn::Linear>(2);
  const Tensor expect = add(a, fc2->forward(gelu(fc1->forward(block.ln2->forward(a)))));
  EXPECT_LT(nl_rel(block.forward(x), expect), 1e-6);
  EXPECT_EQ(block.forward(x).sizes(), x.sizes());

  // Causal: later positions do not change earlier outputs.
  nn::TransformerBlock causal(d, 2, 0, 0.0, true, g);
  EXPECT_EQ(causal.mlp->at<nn::Linear>(0)->out_features, 4 * d);  // mlp_hidden 0 means 4 d
  Tensor x2 = x.clone();
  {
    no_grad ng;
    x2.select(1, 3).copy_(randn({2, d}, kFloat32, g));
  }
  const auto y1 = nl_vals(causal.forward(x).narrow(1, 0, 3)), y2 = nl_vals(causal.forward(x2).narrow(1, 0, 3));
  EXPECT_LT(nl_rel(y2, y1), 1e-6);
  EXPECT_GT(nl_rel(nl_vals(causal.forward(x2).select(1, 3)), nl_vals(causal.forward(x).select(1, 3))), 1e-3);
}

TEST(NnLayers, BadConfigurationsAndInputs) {
  EXPECT_THROW(nn::Linear(0, 3), Error);
  nn::Linear lin(4, 3);
  EXPECT_NE(mixprec::testing::error_of([&] { lin.forward(zeros({2, 5})); }).find("linear"), std::string::npos);
  EXPECT_THROW(nn::Conv2d(3, 4, 3, 1, 0, 1, 2), Error);
  EXPECT_THROW(nn::Conv2d(3, 4, 0), Error);
  EXPECT_THROW(nn::Conv2d(3, 4, 3).forward(zeros({1, 2, 5, 5})), Error);
  EXPECT_THROW(nn::GELU("fast"), Error);
  EXPECT_THROW(nn::LayerNorm(4).forward(zeros({2, 5})), Error);
  EXPECT_THROW(nn::GroupNorm(4, 6), Error);
  EXPECT_THROW(nn::Embedding(10, 4, 10), Error);
  EXPECT_THROW(nn::BatchNorm2d(4, 1e-5, 1.5), Error);
  EXPECT_THROW(nn::MaxPool2d(3).forward(zeros({5})), Error);
}

TEST(NnLayers, BFloat16ModuleForward) {
  Generator g(19);
  nn::Linear lin(64, 32, true, g);
  const Tensor x = randn({8, 64}, kFloat32, g);
  const Tensor ref = lin.forward(x);
  lin.to(kBFloat16);
  const Tensor y = lin.forward(x.to(kBFloat16));
  EXPECT_EQ(y.dtype(), kBFloat16);
  EXPECT_LT(nl_rel(y, ref), 1e-2);
}
