#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

using namespace mixprec;

namespace {
Tensor nrmt_from(const std::vector<double>& v, const Shape& s, DType d = kFloat32) { return tensor(v, s).to(d); }
Tensor nrmt_leaf(Tensor t) { return t.requires_grad_(); }

// Naive normalisation of x viewed as [outer, C, inner]: the statistics group g of element
// (o, c, i) is given by `group(o, c)`; each group is normalised with its own mean and biased
// variance (or with the given mean / var), then scaled by w[c] and shifted by b[c].
struct NrmtStats {
  std::vector<double> mean, var;  // biased
};
NrmtStats nrmt_group_stats(const std::vector<double>& x, int64_t outer, int64_t C, int64_t inner, int64_t groups,
                           const std::function<int64_t(int64_t, int64_t)>& group) {
  NrmtStats s{std::vector<double>(groups, 0.0), std::vector<double>(groups, 0.0)};
  std::vector<double> cnt(groups, 0.0);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < inner; ++i) {
        s.mean[group(o, c)] += x[(o * C + c) * inner + i];
        cnt[group(o, c)] += 1;
      }
  for (int64_t g = 0; g < groups; ++g) s.mean[g] /= cnt[g];
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < inner; ++i) {
        const double d = x[(o * C + c) * inner + i] - s.mean[group(o, c)];
        s.var[group(o, c)] += d * d;
      }
  for (int64_t g = 0; g < groups; ++g) s.var[g] /= cnt[g];
  return s;
}
std::vector<double> nrmt_apply(const std::vector<double>& x, int64_t outer, int64_t C, int64_t inner, const NrmtStats& s,
                               const std::function<int64_t(int64_t, int64_t)>& group, const std::vector<double>& w,
                               const std::vector<double>& b, double eps) {
  std::vector<double> y(x.size());
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < inner; ++i) {
        const int64_t k = (o * C + c) * inner + i, g = group(o, c);
        const double h = (x[k] - s.mean[g]) / std::sqrt(s.var[g] + eps);
        y[k] = h * (w.empty() ? 1.0 : w[c]) + (b.empty() ? 0.0 : b[c]);
      }
  return y;
}

int64_t nrmt_inner(const Shape& s) {
  int64_t n = 1;
  for (std::size_t d = 2; d < s.size(); ++d) n *= s[d];
  return n;
}
}  // namespace

// ---------------- batch_norm ----------------

TEST(BatchNorm, TrainingMatchesNaiveAndUpdatesRunningStats) {
  Generator g(1);
  for (const Shape& s : {Shape{6, 3}, Shape{4, 3, 5}, Shape{2, 3, 2, 3}}) {
    const int64_t N = s[0], C = s[1], S = nrmt_inner(s);
    const Tensor x = add(mul(randn(s, kFloat32, g), 2.0), 1.5);
    const Tensor w = randn({C}, kFloat32, g), b = randn({C}, kFloat32, g);
    Tensor rm = randn({C}, kFloat32, g), rv = add(rand({C}, kFloat32, g), 0.5);
    const auto rm0 = mixprec::testing::to_doubles(rm), rv0 = mixprec::testing::to_doubles(rv);
    const uint64_t v0 = rm.version();
    const double momentum = 0.3, eps = 1e-3;
    const Tensor y = batch_norm(x, rm, rv, w, b, true, momentum, eps);

    auto grp = [](int64_t, int64_t c) { return c; };
    const auto xv = mixprec::testing::to_doubles(x);
    const NrmtStats st = nrmt_group_stats(xv, N, C, S, C, grp);
    EXPECT_LT(mixprec::testing::rel_error(y, nrmt_from(nrmt_apply(xv, N, C, S, st, grp, mixprec::testing::to_doubles(w), mixprec::testing::to_doubles(b), eps), s)), 1e-5) << "shape " << s.size();
    // running = (1 - momentum) running + momentum * stat, with the unbiased variance.
    const double M = static_cast<double>(N * S);
    const auto rm1 = mixprec::testing::to_doubles(rm), rv1 = mixprec::testing::to_doubles(rv);
    for (int64_t c = 0; c < C; ++c) {
      EXPECT_NEAR(rm1[c], (1 - momentum) * rm0[c] + momentum * st.mean[c], 1e-5);
      EXPECT_NEAR(rv1[c], (1 - momentum) * rv0[c] + momentum * st.var[c] * M / (M - 1), 1e-5);
    }
    EXPECT_GT(rm.version(), v0);
    EXPECT_EQ(rm.dtype(), kFloat32);
  }
}

TEST(BatchNorm, TrainingWithoutAffineOrRunningStats) {
  Generator g(2);
  const Shape s{5, 4, 3};
  const Tensor x = randn(s, kFloat32, g);
  const Tensor y = batch_norm(x, Tensor(), Tensor(), Tensor(), Tensor(), true);
  auto grp = [](int64_t, int64_t c) { return c; };
  const auto xv = mixprec::testing::to_doubles(x);
  const NrmtStats st = nrmt_group_stats(xv, 5, 4, 3, 4, grp);
  EXPECT_LT(mixprec::testing::rel_error(y, nrmt_from(nrmt_apply(xv, 5, 4, 3, st, grp, {}, {}, 1e-5), s)), 1e-5);
}

TEST(BatchNorm, EvalUsesRunningStatsAndLeavesThemAlone) {
  Generator g(3);
  const Shape s{4, 3, 5};
  const Tensor x = randn(s, kFloat32, g);
  const Tensor w = randn({3}, kFloat32, g), b = randn({3}, kFloat32, g);
  Tensor rm = randn({3}, kFloat32, g), rv = add(rand({3}, kFloat32, g), 0.5);
  const auto rm0 = mixprec::testing::to_doubles(rm), rv0 = mixprec::testing::to_doubles(rv);
  const Tensor y = batch_norm(x, rm, rv, w, b, false);
  auto grp = [](int64_t, int64_t c) { return c; };
  const NrmtStats st{rm0, rv0};
  EXPECT_LT(mixprec::testing::rel_error(y, nrmt_from(nrmt_apply(mixprec::testing::to_doubles(x), 4, 3, 5, st, grp, mixprec::testing::to_doubles(w), mixprec::testing::to_doubles(b), 1e-5), s)), 1e-5);
  EXPECT_EQ(mixprec::testing::to_doubles(rm), rm0);
  EXPECT_EQ(mixprec::testing::to_doubles(rv), rv0);
  const Tensor y2 = batch_norm(x, rm, rv);  // no affine
  EXPECT_LT(mixprec::testing::rel_error(y2, nrmt_from(nrmt_apply(mixprec::testing::to_doubles(x), 4, 3, 5, st, grp, {}, {}, 1e-5), s)), 1e-5);
}

TEST(BatchNorm, LargeMeanSmallSpreadStaysAccurate) {
  // |mean| >> std: a one-pass E[x^2] - E[x]^2 variance would lose every digit here.
  Generator g(4);
  const Shape s{64, 2, 16};
  const Tensor x = add(mul(randn(s, kFloat32, g), 0.01), 1000.0);
  const Tensor y = batch_norm(x, Tensor(), Tensor(), Tensor(), Tensor(), true, 0.1, 0.0);
  auto grp = [](int64_t, int64_t c) { return c; };
  const auto xv = mixprec::testing::to_doubles(x);
  const NrmtStats st = nrmt_group_stats(xv, 64, 2, 16, 2, grp);
  EXPECT_LT(mixprec::testing::rel_error(y, nrmt_from(nrmt_apply(xv, 64, 2, 16, st, grp, {}, {}, 0.0), s)), 1e-5);
  // The same for group_norm (one group per sample) and layer_norm over the last dim.
  auto per_sample = [](int64_t n, int64_t) { return n; };
  const NrmtStats sg = nrmt_group_stats(xv, 64, 2, 16, 64, per_sample);
  EXPECT_LT(mixprec::testing::rel_error(group_norm(x, 1, Tensor(), Tensor(), 0.0), nrmt_from(nrmt_apply(xv, 64, 2, 16, sg, per_sample, {}, {}, 0.0), s)), 1e-5);
  auto per_row = [](int64_t n, int64_t c) { return n * 2 + c; };
  const NrmtStats sr = nrmt_group_stats(xv, 64, 2, 16, 128, per_row);
  const auto ref = nrmt_from(nrmt_apply(xv, 64, 2, 16, sr, per_row, {}, {}, 0.0), s);
  EXPECT_LT(mixprec::testing::rel_error(layer_norm(x, {16}, Tensor(), Tensor(), 0.0), ref), 1e-5);
  EXPECT_LT(mixprec::testing::rel_error(layer_norm(x, {16}, ones({16}), zeros({16}), 0.0), ref), 1e-5);
}

TEST(BatchNorm, GradcheckTrainAndEvalWithAndWithoutAffine) {
  Generator g(5);
  for (bool training : {true, false}) {
    for (bool affine : {true, false}) {
      Tensor x = nrmt_leaf(randn({4, 3, 2}, kFloat64, g));
      Tensor w = nrmt_leaf(randn({3}, kFloat64, g)), b = nrmt_leaf(randn({3}, kFloat64, g));
      Tensor rm = randn({3}, kFloat64, g), rv = add(rand({3}, kFloat64, g), 0.5);
      auto f = [&](const std::vector<Tensor>& in) {
        return batch_norm(in[0], rm, rv, affine ? in[1] : Tensor(), affine ? in[2] : Tensor(), training, 0.1, 1e-3);
      };
      auto r = gradcheck(f, affine ? std::vector<Tensor>{x, w, b} : std::vector<Tensor>{x});
      EXPECT_TRUE(r.ok) << "training " << training << " affine " << affine << ": " << r.message;
    }
  }
  // 2-D input, and a non-contiguous (permuted) input.
  Tensor x2 = nrmt_leaf(randn({5, 3}, kFloat64, g));
  Tensor xp = nrmt_leaf(randn({2, 4, 3}, kFloat64, g).permute({1, 2, 0}));  // [4, 3, 2]
  ASSERT_FALSE(xp.is_contiguous());
  Tensor w = nrmt_leaf(randn({3}, kFloat64, g)), b = nrmt_leaf(randn({3}, kFloat64, g));
  for (const Tensor& x : {x2, xp}) {
    auto r = gradcheck([](const std::vector<Tensor>& in) { return batch_norm(in[0], Tensor(), Tensor(), in[1], in[2], true); }, {x, w, b});
    EXPECT_TRUE(r.ok) << r.message;
  }
}

TEST(BatchNorm, SixteenBitInputWithFloat32Buffers) {
  Generator g(6);
  const Shape s{8, 4, 6};
  const Tensor x = randn(s, kFloat32, g);
  const Tensor w = randn({4}, kFloat32, g), b = randn({4}, kFloat32, g);
  Tensor rm32 = zeros({4}), rv32 = ones({4});
  const Tensor ref = batch_norm(x, rm32, rv32, w, b, true);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    Tensor rm = zeros({4}), rv = ones({4});
    const Tensor y = batch_norm(x.to(d), rm, rv, w, b, true);
    EXPECT_EQ(y.dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(y, ref), tol) << name(d);
    EXPECT_EQ(rm.dtype(), kFloat32);
    EXPECT_LT(mixprec::testing::rel_error(rm, rm32), tol);
    EXPECT_LT(mixprec::testing::rel_error(rv, rv32), tol);
    // Eval mode too.
    EXPECT_LT(mixprec::testing::rel_error(batch_norm(x.to(d), rm32, rv32, w, b, false), batch_norm(x, rm32, rv32, w, b, false)), tol);
    // Gradients come back in each input's dtype.
    Tensor xl = nrmt_leaf(x.to(d)), wl = nrmt_leaf(w.clone()), bl = nrmt_leaf(b.clone());
    sum(mul(batch_norm(xl, Tensor(), Tensor(), wl, bl, true), randn(s, kFloat32, g).to(d))).backward();
    EXPECT_EQ(xl.grad().dtype(), d);
    EXPECT_EQ(wl.grad().dtype(), kFloat32);
    EXPECT_EQ(bl.grad().dtype(), kFloat32);
  }
}

// The float32 kernels (float32 and 16-bit inputs: blocked float32 sums) against float64 on the
// same rounded inputs, forward and backward, at runs shorter and longer than a block.
TEST(BatchNorm, Float32KernelsMatchFloat64Reference) {
  Generator g(9);
  for (const Shape& s : {Shape{3, 5, 23, 31}, Shape{1, 4, 600}, Shape{128, 3, 7}, Shape{5, 17}}) {
    const int64_t N = s[0], C = s[1], S = nrmt_inner(s);
    const double M = static_cast<double>(N * S);
    for (auto [d, tol] : {std::pair{kFloat32, 1e-6}, std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 1e-3}}) {
      Tensor x = nrmt_leaf(add(mul(randn(s, kFloat32, g), 2.0), 1.5).to(d));
      Tensor w = nrmt_leaf(randn({C}, kFloat32, g)), b = nrmt_leaf(randn({C}, kFloat32, g));
      const Tensor gy = randn(s, kFloat32, g).to(d);
      const Tensor y = batch_norm(x, Tensor(), Tensor(), w, b, true);
      y.backward(gy);
      auto grp = [](int64_t, int64_t c) { return c; };
      const auto xv = mixprec::testing::to_doubles(x), gv = mixprec::testing::to_doubles(gy), wv = mixprec::testing::to_doubles(w);
      const NrmtStats st = nrmt_group_stats(xv, N, C, S, C, grp);
      EXPECT_LT(mixprec::testing::rel_error(y, nrmt_apply(xv, N, C, S, st, grp, wv, mixprec::testing::to_doubles(b), 1e-5)), tol)
          << name(d) << " " << s.size();
      // dx = w rstd (g - mean(g) - xhat mean(g xhat)), dw = sum g xhat, db = sum g.
      std::vector<double> gx(xv.size()), gw(C, 0.0), gb(C, 0.0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < S; ++i) {
            const int64_t k = (n * C + c) * S + i;
            gb[c] += gv[k];
            gw[c] += gv[k] * (xv[k] - st.mean[c]) / std::sqrt(st.var[c] + 1e-5);
          }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < S; ++i) {
            const int64_t k = (n * C + c) * S + i;
            const double rstd = 1.0 / std::sqrt(st.var[c] + 1e-5), xhat = (xv[k] - st.mean[c]) * rstd;
            gx[k] = wv[c] * rstd * (gv[k] - gb[c] / M - xhat * gw[c] / M);
          }
      EXPECT_LT(mixprec::testing::rel_error(x.grad(), gx), tol) << name(d) << " " << s.size();
      EXPECT_LT(mixprec::testing::rel_error(w.grad(), gw), tol) << name(d) << " " << s.size();
      EXPECT_LT(mixprec::testing::rel_error(b.grad(), gb), tol) << name(d) << " " << s.size();
    }
  }
}

TEST(BatchNorm, RunningStatUpdateDoesNotDisturbAutograd) {
  Generator g(7);
  Tensor x = nrmt_leaf(randn({4, 3, 5}, kFloat32, g));
  Tensor w = nrmt_leaf(ones({3})), b = nrmt_leaf(zeros({3}));
  Tensor rm = zeros({3}), rv = ones({3});
  // Two training steps on the same buffers, one backward through both.
  const Tensor y1 = batch_norm(x, rm, rv, w, b, true);
  const Tensor y2 = batch_norm(mul(x, 2.0), rm, rv, w, b, true);
  EXPECT_FALSE(rm.requires_grad());
  EXPECT_NO_THROW(sum(mul(add(y1, y2), randn({4, 3, 5}, kFloat32, g))).backward());
  EXPECT_TRUE(x.grad().defined());
  EXPECT_TRUE(w.grad().defined());
  // An eval-mode forward keeps its statistics even if the buffers change before backward.
  Tensor x2 = nrmt_leaf(randn({4, 3, 5}, kFloat32, g));
  const Tensor ye = batch_norm(x2, rm, rv, w, b, false);
  const auto rv_before = mixprec::testing::to_doubles(rv);
  batch_norm(randn({4, 3, 5}, kFloat32, g), rm, rv, w, b, true);  // updates the buffers
  sum(ye).backward();
  const auto gx = mixprec::testing::to_doubles(x2.grad());
  for (int64_t i = 0; i < 60; ++i) EXPECT_NEAR(gx[i], 1.0 / std::sqrt(rv_before[(i / 5) % 3] + 1e-5), 1e-5);
}

TEST(BatchNorm, Errors) {
  EXPECT_THROW(batch_norm(randn({5}), zeros({5}), ones({5})), mixprec::Error);
  EXPECT_THROW(batch_norm(randn({4, 3}), zeros({4}), ones({4})), mixprec::Error);
  EXPECT_THROW(batch_norm(randn({4, 3}), zeros({3}), ones({3}), ones({2}), Tensor(), true), mixprec::Error);
  EXPECT_THROW(batch_norm(randn({4, 3}), Tensor(), Tensor(), Tensor(), Tensor(), false), mixprec::Error);
  EXPECT_THROW(batch_norm(randn({4, 3}), zeros({3}), Tensor(), Tensor(), Tensor(), true), mixprec::Error);
  EXPECT_THROW(batch_norm(randn({1, 3}), zeros({3}), ones({3}), Tensor(), Tensor(), true), mixprec::Error);
  EXPECT_THROW(batch_norm(ones({4, 3}, kInt64), zeros({3}), ones({3})), mixprec::Error);
  try {
    batch_norm(randn({4, 3, 2}), zeros({3}), ones({3}), ones({5}), Tensor(), true);
    FAIL() << "expected an error";
  } catch (const mixprec::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("batch_norm"), std::string::npos) << m;
    EXPECT_NE(m.find("weight"), std::string::npos) << m;
  }
}

// ---------------- layer_norm ----------------

namespace {
std::vector<double> nrmt_naive_layer_norm(const std::vector<double>& x, int64_t D, const std::vector<double>& w,
                                          const std::vector<double>& b, double eps) {
  std::vector<double> y(x.size());
  for (std::size_t r = 0; r < x.size() / D; ++r) {
    double m = 0, v = 0;
    for (int64_t i = 0; i < D; ++i) m += x[r * D + i];
    m /= D;
    for (int64_t i = 0; i < D; ++i) v += (x[r * D + i] - m) * (x[r * D + i] - m);
    v /= D;
    for (int64_t i = 0; i < D; ++i)
      y[r * D + i] = (x[r * D + i] - m) / std::sqrt(v + eps) * (w.empty() ? 1.0 : w[i]) + (b.empty() ? 0.0 : b[i]);
  }
  return y;
}
}  // namespace

TEST(LayerNorm, MatchesNaiveReference) {
  Generator g(10);
  const Tensor x = add(mul(randn({3, 4, 6}, kFloat32, g), 3.0), 2.0);
  const auto xv = mixprec::testing::to_doubles(x);
  // Over the last dim, and over the last two.
  const Tensor w1 = randn({6}, kFloat32, g), b1 = randn({6}, kFloat32, g);
  EXPECT_LT(mixprec::testing::rel_error(layer_norm(x, {6}, w1, b1), nrmt_from(nrmt_naive_layer_norm(xv, 6, mixprec::testing::to_doubles(w1), mixprec::testing::to_doubles(b1), 1e-5), x.sizes())), 1e-5);
  EXPECT_LT(mixprec::testing::rel_error(layer_norm(x, {6}), nrmt_from(nrmt_naive_layer_norm(xv, 6, {}, {}, 1e-5), x.sizes())), 1e-5);
  const Tensor w2 = randn({4, 6}, kFloat32, g), b2 = randn({4, 6}, kFloat32, g);
  EXPECT_LT(mixprec::testing::rel_error(layer_norm(x, {4, 6}, w2, b2, 1e-3), nrmt_from(nrmt_naive_layer_norm(xv, 24, mixprec::testing::to_doubles(w2), mixprec::testing::to_doubles(b2), 1e-3), x.sizes())),
            1e-5);
  EXPECT_LT(mixprec::testing::rel_error(layer_norm(x, {4, 6}, w2), nrmt_from(nrmt_naive_layer_norm(xv, 24, mixprec::testing::to_doubles(w2), {}, 1e-5), x.sizes())), 1e-5);
  // Non-contiguous input.
  const Tensor xt = randn({6, 5}, kFloat32, g).t();
  EXPECT_LT(mixprec::testing::rel_error(layer_norm(xt, {6}, w1, b1), nrmt_from(nrmt_naive_layer_norm(mixprec::testing::to_doubles(xt), 6, mixprec::testing::to_doubles(w1), mixprec::testing::to_doubles(b1), 1e-5), {5, 6})),
            1e-5);
}

TEST(LayerNorm, GradcheckOneAndTwoTrailingDims) {
  Generator g(11);
  auto check = [&](const Tensor& x, const Shape& ns, bool affine) {
    Tensor w = nrmt_leaf(randn(ns, kFloat64, g)), b = nrmt_leaf(randn(ns, kFloat64, g));
    auto r = affine ? gradcheck([&](const std::vector<Tensor>& in) { return layer_norm(in[0], ns, in[1], in[2]); }, {x, w, b})
                    : gradcheck([&](const std::vector<Tensor>& in) { return layer_norm(in[0], ns); }, {x});
    EXPECT_TRUE(r.ok) << "ns " << ns.size() << " affine " << affine << ": " << r.message;
  };
  for (bool affine : {true, false}) {
    check(nrmt_leaf(randn({3, 2, 5}, kFloat64, g)), {5}, affine);
    check(nrmt_leaf(randn({3, 2, 5}, kFloat64, g)), {2, 5}, affine);
    check(nrmt_leaf(randn({4, 3}, kFloat64, g).t()), {4}, affine);  // non-contiguous
  }
  // Weight only.
  Tensor x = nrmt_leaf(randn({3, 4}, kFloat64, g)), w = nrmt_leaf(randn({4}, kFloat64, g));
  auto r = gradcheck([](const std::vector<Tensor>& in) { return layer_norm(in[0], {4}, in[1]); }, {x, w});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(LayerNorm, SixteenBitMatchesFloat32) {
  Generator g(12);
  const Tensor x = randn({16, 64}, kFloat32, g), w = randn({64}, kFloat32, g), b = randn({64}, kFloat32, g);
  const Tensor ref = layer_norm(x, {64}, w, b);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    const Tensor y = layer_norm(x.to(d), {64}, w.to(d), b.to(d));
    EXPECT_EQ(y.dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(y, ref), tol) << name(d);
    // float32 parameters with a 16-bit input (what a model without autocast casts gives).
    EXPECT_LT(mixprec::testing::rel_error(layer_norm(x.to(d), {64}, w, b), ref), tol) << name(d);
    Tensor xl = nrmt_leaf(x.to(d)), wl = nrmt_leaf(w.clone());
    Tensor x32 = nrmt_leaf(x.clone()), w32 = nrmt_leaf(w.clone());
    const Tensor up = randn({16, 64}, kFloat32, g);
    sum(mul(layer_norm(xl, {64}, wl), up.to(d))).backward();
    sum(mul(layer_norm(x32, {64}, w32), up)).backward();
    EXPECT_EQ(xl.grad().dtype(), d);
    EXPECT_EQ(wl.grad().dtype(), kFloat32);
    EXPECT_LT(mixprec::testing::rel_error(xl.grad(), x32.grad()), 3 * tol) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(wl.grad(), w32.grad()), 3 * tol) << name(d);
  }
}

// Float32 accumulation (16-bit rows read and written directly) against the float64 path, forward
// and backward, at the row lengths of a transformer (odd ones too, for the vector tail).
TEST(LayerNorm, Float32AccumulationAgainstFloat64) {
  Generator g(13);
  for (int64_t D : {256, 77}) {
    const Tensor x = add(mul(randn({33, D}, kFloat32, g), 2.0), 0.5), w = randn({D}, kFloat32, g), b = randn({D}, kFloat32, g);
    const Tensor up = randn({33, D}, kFloat32, g);
    for (auto [d, tol] : {std::pair{kFloat32, 1e-6}, std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
      const Tensor xd = x.to(d);  // the reference sees the same rounded input
      Tensor x64 = nrmt_leaf(xd.to(kFloat64)), w64 = nrmt_leaf(w.to(kFloat64)), b64 = nrmt_leaf(b.to(kFloat64));
      const Tensor y64 = layer_norm(x64, {D}, w64, b64);
      sum(mul(y64, up.to(kFloat64))).backward();
      Tensor xl = nrmt_leaf(xd.clone()), wl = nrmt_leaf(w.clone()), bl = nrmt_leaf(b.clone());
      const Tensor y = layer_norm(xl, {D}, wl, bl);
      EXPECT_EQ(y.dtype(), d);
      // 16-bit outputs carry their own rounding (2^-9 relative for bf16); float32 is near exact.
      EXPECT_LT(mixprec::testing::rel_error(y, y64), tol) << name(d) << " D " << D;
      sum(mul(y, up.to(d))).backward();
      EXPECT_LT(mixprec::testing::rel_error(xl.grad(), x64.grad()), 3 * tol) << name(d) << " D " << D;
      EXPECT_LT(mixprec::testing::rel_error(wl.grad(), w64.grad()), 3 * tol) << name(d) << " D " << D;
      EXPECT_LT(mixprec::testing::rel_error(bl.grad(), b64.grad()), 3 * tol) << name(d) << " D " << D;
    }
  }
}

// A NaN makes its own row NaN (and only that row), so the references' NaN check fails on it.
TEST(LayerNorm, NaNPropagatesWithinItsRow) {
  std::vector<double> xs(4 * 40);
  for (std::size_t i = 0; i < xs.size(); ++i) xs[i] = std::sin(static_cast<double>(i));
  xs[1 * 40 + 3] = NAN;
  for (DType d : {kFloat32, kBFloat16}) {
    const auto y = mixprec::testing::to_doubles(layer_norm(nrmt_from(xs, {4, 40}, d), {40}));
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t i = 0; i < 40; ++i) EXPECT_EQ(std::isnan(y[r * 40 + i]), r == 1) << name(d) << " row " << r;
  }
}

TEST(LayerNorm, Errors) {
  EXPECT_THROW(layer_norm(randn({3, 4}), {5}), mixprec::Error);
  EXPECT_THROW(layer_norm(randn({3, 4}), {3}), mixprec::Error);
  EXPECT_THROW(layer_norm(randn({3, 4}), {}), mixprec::Error);
  EXPECT_THROW(layer_norm(randn({4}), {2, 4}), mixprec::Error);
  EXPECT_THROW(layer_norm(randn({3, 4}), {4}, ones({3})), mixprec::Error);
  EXPECT_THROW(layer_norm(randn({3, 4}), {4}, ones({4}), ones({4, 1})), mixprec::Error);
  EXPECT_THROW(layer_norm(ones({3, 4}, kInt32), {4}), mixprec::Error);
  try {
    layer_norm(randn({2, 3, 4}), {3, 5});
    FAIL() << "expected an error";
  } catch (const mixprec::Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer_norm"), std::string::npos) << e.what();
  }
}

// ---------------- group_norm ----------------

TEST(GroupNorm, MatchesNaiveReference) {
  Generator g(20);
  for (const Shape& s : {Shape{2, 6, 4}, Shape{2, 4, 2, 3}, Shape{3, 6}}) {
    const int64_t N = s[0], C = s[1], S = nrmt_inner(s);
    const Tensor x = add(mul(randn(s, kFloat32, g), 2.0), 0.5);
    const Tensor w = randn({C}, kFloat32, g), b = randn({C}, kFloat32, g);
    const auto xv = mixprec::testing::to_doubles(x);
    for (int64_t G : {int64_t{1}, int64_t{2}, C}) {
      auto grp = [G, C](int64_t n, int64_t c) { return n * G + c / (C / G); };
      const NrmtStats st = nrmt_group_stats(xv, N, C, S, N * G, grp);
      EXPECT_LT(mixprec::testing::rel_error(group_norm(x, G, w, b), nrmt_from(nrmt_apply(xv, N, C, S, st, grp, mixprec::testing::to_doubles(w), mixprec::testing::to_doubles(b), 1e-5), s)), 1e-5)
          << "G " << G;
      EXPECT_LT(mixprec::testing::rel_error(group_norm(x, G, Tensor(), Tensor(), 1e-2), nrmt_from(nrmt_apply(xv, N, C, S, st, grp, {}, {}, 1e-2), s)), 1e-5)
          << "G " << G;
    }
  }
  // Non-contiguous input.
  const Tensor xp = randn({4, 3, 2}, kFloat32, g).permute({2, 0, 1});  // [2, 4, 3]
  auto grp = [](int64_t n, int64_t c) { return n * 2 + c / 2; };
  const auto xv = mixprec::testing::to_doubles(xp);
  const NrmtStats st = nrmt_group_stats(xv, 2, 4, 3, 4, grp);
  EXPECT_LT(mixprec::testing::rel_error(group_norm(xp, 2), nrmt_from(nrmt_apply(xv, 2, 4, 3, st, grp, {}, {}, 1e-5), xp.sizes())), 1e-5);
}

TEST(GroupNorm, Gradcheck) {
  Generator g(21);
  for (bool affine : {true, false}) {
    for (int64_t G : {1, 2, 4}) {
      Tensor x = nrmt_leaf(randn({2, 4, 3}, kFloat64, g));
      Tensor w = nrmt_leaf(randn({4}, kFloat64, g)), b = nrmt_leaf(randn({4}, kFloat64, g));
      auto r = affine ? gradcheck([G](const std::vector<Tensor>& in) { return group_norm(in[0], G, in[1], in[2]); }, {x, w, b})
                      : gradcheck([G](const std::vector<Tensor>& in) { return group_norm(in[0], G); }, {x});
      EXPECT_TRUE(r.ok) << "G " << G << " affine " << affine << ": " << r.message;
    }
  }
  Tensor xp = nrmt_leaf(randn({3, 2, 2, 4}, kFloat64, g).permute({3, 1, 0, 2}));  // [4, 2, 3, 2]
  ASSERT_FALSE(xp.is_contiguous());
  Tensor w = nrmt_leaf(randn({2}, kFloat64, g)), b = nrmt_leaf(randn({2}, kFloat64, g));
  auto r = gradcheck([](const std::vector<Tensor>& in) { return group_norm(in[0], 1, in[1], in[2]); }, {xp, w, b});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(GroupNorm, SixteenBitMatchesFloat32) {
  Generator g(22);
  const Tensor x = randn({4, 8, 5, 5}, kFloat32, g), w = randn({8}, kFloat32, g), b = randn({8}, kFloat32, g);
  const Tensor ref = group_norm(x, 4, w, b);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    const Tensor y = group_norm(x.to(d), 4, w.to(d), b.to(d));
    EXPECT_EQ(y.dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(y, ref), tol) << name(d);
    Tensor xl = nrmt_leaf(x.to(d)), wl = nrmt_leaf(w.to(d)), bl = nrmt_leaf(b.to(d));
    Tensor x32 = nrmt_leaf(x.clone()), w32 = nrmt_leaf(w.clone()), b32 = nrmt_leaf(b.clone());
    const Tensor up = randn(x.sizes(), kFloat32, g);
    sum(mul(group_norm(xl, 4, wl, bl), up.to(d))).backward();
    sum(mul(group_norm(x32, 4, w32, b32), up)).backward();
    EXPECT_EQ(xl.grad().dtype(), d);
    EXPECT_EQ(wl.grad().dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(xl.grad(), x32.grad()), 3 * tol) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(bl.grad(), b32.grad()), 3 * tol) << name(d);
  }
}

TEST(GroupNorm, Errors) {
  EXPECT_THROW(group_norm(randn({2, 6, 3}), 4), mixprec::Error);
  EXPECT_THROW(group_norm(randn({2, 6, 3}), 0), mixprec::Error);
  EXPECT_THROW(group_norm(randn({6}), 2), mixprec::Error);
  EXPECT_THROW(group_norm(randn({2, 6, 3}), 3, ones({3})), mixprec::Error);
  EXPECT_THROW(group_norm(randn({2, 6, 3}), 3, ones({6}), ones({2, 3})), mixprec::Error);
  try {
    group_norm(randn({2, 6, 3}), 4);
    FAIL() << "expected an error";
  } catch (const mixprec::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("group_norm"), std::string::npos) << m;
    EXPECT_NE(m.find("num_groups"), std::string::npos) << m;
  }
}

// ---------------- autocast ----------------

// Under autocast batch_norm keeps its 16-bit input's dtype (float32 statistics inside, float32
// buffers updated in place); layer_norm and group_norm run in float32.
TEST(Normalization, AutocastPolicies) {
  Generator g(30);
  const Tensor x = randn({4, 6, 3}, kFloat32, g).to(kBFloat16);
  autocast ac(Device::CPU, kBFloat16);
  Tensor rm = zeros({6}), rv = ones({6});
  EXPECT_EQ(batch_norm(x, rm, rv, ones({6}), zeros({6}), true).dtype(), kBFloat16);
  EXPECT_EQ(rm.dtype(), kFloat32);
  EXPECT_NE(mixprec::testing::to_doubles(rm), std::vector<double>(6, 0.0));  // the caller's buffer was updated
  // bfloat16 buffers (a model moved to bfloat16) are updated in place, not through a cast copy.
  Tensor rm16 = zeros({6}, kBFloat16), rv16 = ones({6}, kBFloat16);
  batch_norm(x, rm16, rv16, Tensor(), Tensor(), true);
  EXPECT_EQ(rm16.dtype(), kBFloat16);
  EXPECT_LT(mixprec::testing::rel_error(rm16, rm), 1e-2);
  EXPECT_LT(mixprec::testing::rel_error(rv16, rv), 1e-2);
  EXPECT_NE(mixprec::testing::to_doubles(rv16), std::vector<double>(6, 1.0));
  EXPECT_EQ(layer_norm(x, {3}).dtype(), kFloat32);
  EXPECT_EQ(group_norm(x, 3).dtype(), kFloat32);
}

// A one-element row: x - mean(x) is exactly 0, so y is exactly bias and dx exactly 0 (y does not
// depend on x), whatever x's size and dtype. The CUDA kernel is held to the same (CudaNorm.*).
TEST(LayerNorm, OneElementRowsGiveExactlyBiasAndZeroInputGradient) {
  Generator g(13);
  for (DType d : {kFloat32, kBFloat16, kFloat16, kFloat64}) {
    Tensor x = add(mul(randn({37, 1}, kFloat32, g), 1e3), 7.0).to(d), w = randn({1}, kFloat32, g).to(d), b = randn({1}, kFloat32, g).to(d);
    for (Tensor* t : {&x, &w, &b}) t->requires_grad_();
    const Tensor y = layer_norm(x, {1}, w, b);
    const Tensor dy = randn({37, 1}, kFloat32, g).to(d);
    y.backward(dy);
    const auto yv = mixprec::testing::to_doubles(y), bv = mixprec::testing::to_doubles(b);
    for (double v : yv) ASSERT_EQ(v, bv[0]) << name(d);
    for (double v : mixprec::testing::to_doubles(x.grad())) ASSERT_EQ(v, 0.0) << name(d);
    EXPECT_EQ(mixprec::testing::to_doubles(w.grad())[0], 0.0) << name(d);  // sum of dy * xhat, xhat == 0
    double sum_dy = 0;
    for (double v : mixprec::testing::to_doubles(dy)) sum_dy += v;
    EXPECT_NEAR(mixprec::testing::to_doubles(b.grad())[0], sum_dy, 1e-2 * (1 + std::abs(sum_dy))) << name(d);
  }
}
