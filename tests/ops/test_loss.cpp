#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

#include <cmath>
#include <string>
#include <vector>

using namespace mixprec;

namespace {
Tensor lsst_from(const std::vector<double>& v, const Shape& s, DType d = kFloat32) { return tensor(v, s).to(d); }
Tensor lsst_leaf(Tensor t) { return t.requires_grad_(); }

std::vector<int64_t> lsst_ivec(const Tensor& t) {
  const Tensor c = t.contiguous();
  const int64_t* p = c.data<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// Reduced per-element losses as the op would return them (a 0-D tensor unless None).
Tensor lsst_reduce(const std::vector<double>& l, const Shape& shape, Reduction r, double count) {
  if (r == Reduction::None) return lsst_from(l, shape);
  double s = 0;
  for (double v : l) s += v;
  return scalar_tensor(r == Reduction::Mean ? s / count : s);
}

const char* lsst_name(Reduction r) { return r == Reduction::None ? "none" : r == Reduction::Mean ? "mean" : "sum"; }

// Naive cross entropy over x [N, C, S] (row-major): per-row losses and the number of rows kept.
std::pair<std::vector<double>, double> lsst_naive_ce(const std::vector<double>& x, int64_t N, int64_t C, int64_t S,
                                                     const std::vector<int64_t>& t, int64_t ignore, double ls) {
  std::vector<double> out(N * S, 0.0);
  double count = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = n * S + s;
      if (t[r] == ignore) continue;
      ++count;
      double m = -INFINITY;
      for (int64_t c = 0; c < C; ++c) m = std::max(m, x[(n * C + c) * S + s]);
      double se = 0;
      for (int64_t c = 0; c < C; ++c) se += std::exp(x[(n * C + c) * S + s] - m);
      const double lse = m + std::log(se);
      double smooth = 0;  // sum_c -log p_c
      for (int64_t c = 0; c < C; ++c) smooth += lse - x[(n * C + c) * S + s];
      out[r] = (1 - ls) * (lse - x[(n * C + t[r]) * S + s]) + ls / static_cast<double>(C) * smooth;
    }
  return {out, count};
}

// Random class indices in [0, C) with every `every`-th replaced by `ignore`.
Tensor lsst_targets(const Shape& s, int64_t C, int64_t ignore, int64_t every, uint64_t seed) {
  Generator g(seed);
  Tensor t = randint(0, C, s, kInt64, g);
  int64_t* p = t.data<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (every > 0 && i % every == 1) p[i] = ignore;
  return t;
}

constexpr Reduction kLsstReductions[] = {Reduction::None, Reduction::Mean, Reduction::Sum};
}  // namespace

// ---------------- cross_entropy ----------------

TEST(CrossEntropy, MatchesNaiveReference) {
  Generator g(1);
  struct Case {
    Shape x;
    int64_t N, C, S;
  };
  for (const Case& k : {Case{{6, 5}, 6, 5, 1}, Case{{3, 4, 2, 3}, 3, 4, 6}}) {
    const Tensor x = mul(randn(k.x, kFloat32, g), 2.0);
    Shape ts = k.x;
    ts.erase(ts.begin() + 1);
    for (int64_t ignore : {int64_t{-100}, int64_t{2}}) {
      const Tensor t = lsst_targets(ts, k.C, -100, ignore == -100 ? 3 : 0, 7);
      for (double ls : {0.0, 0.2}) {
        const auto [l, count] = lsst_naive_ce(mixprec::testing::to_doubles(x), k.N, k.C, k.S, lsst_ivec(t), ignore, ls);
        for (Reduction r : kLsstReductions) {
          const Tensor y = cross_entropy(x, t, r, ignore, ls);
          EXPECT_EQ(y.dtype(), kFloat32);
          EXPECT_LT(mixprec::testing::rel_error(y, lsst_reduce(l, ts, r, count)), 1e-5)
              << "shape " << k.x.size() << " ignore " << ignore << " ls " << ls << " " << lsst_name(r);
        }
      }
    }
  }
}

TEST(CrossEntropy, UnbatchedAndNonContiguousLogits) {
  Generator g(2);
  const Tensor x = randn({5}, kFloat32, g);
  const Tensor t = tensor(std::vector<int64_t>{3}, {});
  const auto [l, count] = lsst_naive_ce(mixprec::testing::to_doubles(x), 1, 5, 1, {3}, -100, 0.1);
  const Tensor y = cross_entropy(x, t, Reduction::None, -100, 0.1);
  EXPECT_EQ(y.dim(), 0);
  EXPECT_NEAR(y.item<double>(), l[0], 1e-5);
  EXPECT_NEAR(cross_entropy(x, t).item<double>(), lsst_naive_ce(mixprec::testing::to_doubles(x), 1, 5, 1, {3}, -100, 0.0).first[0], 1e-5);
  // Non-contiguous [N, C].
  const Tensor xt = randn({5, 7}, kFloat32, g).t();
  const Tensor tt = lsst_targets({7}, 5, -100, 3, 3);
  const auto [l2, c2] = lsst_naive_ce(mixprec::testing::to_doubles(xt), 7, 5, 1, lsst_ivec(tt), -100, 0.0);
  EXPECT_LT(mixprec::testing::rel_error(cross_entropy(xt, tt), lsst_reduce(l2, {7}, Reduction::Mean, c2)), 1e-5);
}

TEST(CrossEntropy, StableForHugeLogits) {
  const Tensor x = tensor({1000.f, -1000.f, 0.f, 3000.f, 2999.f, -5000.f}, {2, 3});
  const Tensor t = tensor(std::vector<int64_t>{1, 1}, {2});
  const auto l = mixprec::testing::to_doubles(cross_entropy(x, t, Reduction::None));
  EXPECT_NEAR(l[0], 2000.0, 1e-2);
  EXPECT_NEAR(l[1], 1.0 + std::log1p(std::exp(-1.0)), 1e-3);
  // A masked (-inf) class: finite loss, and exactly zero gradient there.
  Tensor xm = lsst_leaf(tensor({-INFINITY, 0.f, 1.f}, {1, 3}));
  const Tensor lm = cross_entropy(xm, tensor(std::vector<int64_t>{2}, {1}));
  EXPECT_NEAR(lm.item<double>(), std::log1p(std::exp(-1.0)), 1e-6);
  lm.backward();
  const auto gm = mixprec::testing::to_doubles(xm.grad());
  EXPECT_EQ(gm[0], 0.0);
  EXPECT_NEAR(gm[1], 1 / (1 + std::exp(1.0)), 1e-6);
}

TEST(CrossEntropy, EqualsNllOfLogSoftmax) {
  Generator g(3);
  const Tensor x = randn({4, 6, 3}, kFloat32, g);
  const Tensor t = lsst_targets({4, 3}, 6, -100, 4, 9);
  for (Reduction r : kLsstReductions)
    EXPECT_LT(mixprec::testing::rel_error(cross_entropy(x, t, r), nll_loss(log_softmax(x, 1), t, r)), 1e-6) << lsst_name(r);
}

TEST(CrossEntropy, Gradcheck) {
  Generator g(4);
  for (Reduction r : kLsstReductions) {
    for (double ls : {0.0, 0.15}) {
      Tensor x = lsst_leaf(randn({5, 4}, kFloat64, g));
      const Tensor t = lsst_targets({5}, 4, -100, 3, 11);
      auto res = gradcheck([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], t, r, -100, ls); }, {x});
      EXPECT_TRUE(res.ok) << lsst_name(r) << " ls " << ls << ": " << res.message;
      // Spatial dims, a custom ignore_index that is a valid class.
      Tensor x4 = lsst_leaf(randn({2, 3, 2, 2}, kFloat64, g));
      const Tensor t4 = lsst_targets({2, 2, 2}, 3, -100, 0, 12);
      res = gradcheck([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], t4, r, 1, ls); }, {x4});
      EXPECT_TRUE(res.ok) << "4-D " << lsst_name(r) << " ls " << ls << ": " << res.message;
      // Non-contiguous logits.
      Tensor xt = lsst_leaf(randn({4, 5}, kFloat64, g).t());
      res = gradcheck([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], t, r, -100, ls); }, {xt});
      EXPECT_TRUE(res.ok) << "transposed " << lsst_name(r) << " ls " << ls << ": " << res.message;
    }
  }
}

TEST(CrossEntropy, EveryTargetIgnored) {
  Tensor x = lsst_leaf(randn({3, 4}));
  const Tensor t = full({3}, -100.0, kInt64);
  EXPECT_TRUE(std::isnan(cross_entropy(x, t).item<double>()));  // 0 / 0, as PyTorch
  const Tensor s = cross_entropy(x, t, Reduction::Sum, -100, 0.3);
  EXPECT_EQ(s.item<double>(), 0.0);
  s.backward();
  for (double v : mixprec::testing::to_doubles(x.grad())) EXPECT_EQ(v, 0.0);
}

TEST(CrossEntropy, SixteenBitMatchesFloat32) {
  Generator g(5);
  const Tensor x = mul(randn({32, 10}, kFloat32, g), 2.0);
  const Tensor t = lsst_targets({32}, 10, -100, 5, 13);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    for (Reduction r : kLsstReductions) {
      const Tensor y = cross_entropy(x.to(d), t, r, -100, 0.1);
      EXPECT_EQ(y.dtype(), d);
      EXPECT_LT(mixprec::testing::rel_error(y, cross_entropy(x, t, r, -100, 0.1)), tol) << name(d) << " " << lsst_name(r);
    }
    Tensor x16 = lsst_leaf(x.to(d)), x32 = lsst_leaf(x.clone());
    cross_entropy(x16, t).backward();
    cross_entropy(x32, t).backward();
    EXPECT_EQ(x16.grad().dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(x16.grad(), x32.grad()), 3 * tol) << name(d);
  }
}

TEST(CrossEntropy, Errors) {
  const Tensor x = randn({4, 5});
  try {
    cross_entropy(x, tensor(std::vector<int64_t>{0, 7, 1, 2}, {4}));
    FAIL() << "expected an error";
  } catch (const mixprec::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cross_entropy"), std::string::npos) << m;
    EXPECT_NE(m.find("7"), std::string::npos) << m;
    EXPECT_NE(m.find("C = 5"), std::string::npos) << m;
  }
  EXPECT_THROW(cross_entropy(x, tensor(std::vector<int64_t>{0, -1, 1, 2}, {4})), mixprec::Error);
  EXPECT_NO_THROW(cross_entropy(x, tensor(std::vector<int64_t>{0, 5, 1, 2}, {4}), Reduction::Sum, 5));
  EXPECT_THROW(cross_entropy(x, zeros({4}, kInt64).reshape({2, 2})), mixprec::Error);
  EXPECT_THROW(cross_entropy(x, zeros({5}, kInt64)), mixprec::Error);
  EXPECT_THROW(cross_entropy(x, zeros({4}, kFloat32)), mixprec::Error);
  EXPECT_THROW(cross_entropy(x, zeros({4}, kInt32)), mixprec::Error);
  EXPECT_THROW(cross_entropy(x, zeros({4}, kInt64), Reduction::Mean, -100, 1.5), mixprec::Error);
  EXPECT_THROW(cross_entropy(ones({4, 5}, kInt64), zeros({4}, kInt64)), mixprec::Error);
  EXPECT_THROW(cross_entropy(scalar_tensor(1.0), zeros({}, kInt64)), mixprec::Error);
}

// ---------------- nll_loss ----------------

TEST(NllLoss, MatchesNaiveReference) {
  Generator g(6);
  const Tensor x = randn({4, 5, 3}, kFloat32, g);
  const Tensor t = lsst_targets({4, 3}, 5, -100, 4, 14);
  const auto xv = mixprec::testing::to_doubles(x);
  const auto tv = lsst_ivec(t);
  std::vector<double> l(12, 0.0);
  double count = 0;
  for (int64_t n = 0; n < 4; ++n)
    for (int64_t s = 0; s < 3; ++s)
      if (tv[n * 3 + s] != -100) {
        l[n * 3 + s] = -xv[(n * 5 + tv[n * 3 + s]) * 3 + s];
        ++count;
      }
  for (Reduction r : kLsstReductions) EXPECT_LT(mixprec::testing::rel_error(nll_loss(x, t, r), lsst_reduce(l, {4, 3}, r, count)), 1e-6) << lsst_name(r);
  // Non-contiguous input and unbatched input.
  const Tensor xp = x.permute({2, 1, 0}).permute({2, 1, 0});  // same values, now strided views
  const Tensor xs = randn({5, 8}, kFloat32, g).t();           // [8, 5]
  const Tensor ts = lsst_targets({8}, 5, -100, 0, 15);
  const auto xsv = mixprec::testing::to_doubles(xs);
  const auto tsv = lsst_ivec(ts);
  double s = 0;
  for (int64_t n = 0; n < 8; ++n) s -= xsv[n * 5 + tsv[n]];
  EXPECT_NEAR(nll_loss(xs, ts, Reduction::Sum).item<double>(), s, 1e-5);
  EXPECT_NEAR(nll_loss(xs.select(0, 2), ts.select(0, 2), Reduction::None).item<double>(), -xsv[2 * 5 + tsv[2]], 1e-6);
  EXPECT_LT(mixprec::testing::rel_error(nll_loss(xp, t), nll_loss(x, t)), 1e-7);
}

TEST(NllLoss, Gradcheck) {
  Generator g(7);
  for (Reduction r : kLsstReductions) {
    Tensor x = lsst_leaf(randn({6, 4}, kFloat64, g));
    const Tensor t = lsst_targets({6}, 4, -100, 3, 16);
    auto res = gradcheck([&](const std::vector<Tensor>& in) { return nll_loss(in[0], t, r); }, {x});
    EXPECT_TRUE(res.ok) << lsst_name(r) << ": " << res.message;
    Tensor x3 = lsst_leaf(randn({2, 3, 4}, kFloat64, g).transpose(1, 2).transpose(1, 2));
    const Tensor t3 = lsst_targets({2, 4}, 3, 0, 0, 17);
    res = gradcheck([&](const std::vector<Tensor>& in) { return nll_loss(in[0], t3, r, 0); }, {x3});
    EXPECT_TRUE(res.ok) << "3-D " << lsst_name(r) << ": " << res.message;
    Tensor xt = lsst_leaf(randn({4, 6}, kFloat64, g).t());
    res = gradcheck([&](const std::vector<Tensor>& in) { return nll_loss(in[0], t, r); }, {xt});
    EXPECT_TRUE(res.ok) << "transposed " << lsst_name(r) << ": " << res.message;
  }
}

TEST(NllLoss, SixteenBitAndErrors) {
  Generator g(8);
  const Tensor x = log_softmax(randn({16, 7}, kFloat32, g), 1);
  const Tensor t = lsst_targets({16}, 7, -100, 4, 18);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    const Tensor y = nll_loss(x.to(d), t);
    EXPECT_EQ(y.dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(y, nll_loss(x, t)), tol);
    Tensor xl = lsst_leaf(x.to(d));
    nll_loss(xl, t, Reduction::Sum).backward();
    EXPECT_EQ(xl.grad().dtype(), d);
  }
  try {
    nll_loss(x, full({16}, 9.0, kInt64));
    FAIL() << "expected an error";
  } catch (const mixprec::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("nll_loss"), std::string::npos) << m;
    EXPECT_NE(m.find("9"), std::string::npos) << m;
    EXPECT_NE(m.find("C = 7"), std::string::npos) << m;
  }
  EXPECT_THROW(nll_loss(x, zeros({15}, kInt64)), mixprec::Error);
  EXPECT_THROW(nll_loss(x, zeros({16}, kFloat32)), mixprec::Error);
}

// ---------------- mse_loss ----------------

TEST(MseLoss, MatchesNaiveReference) {
  Generator g(9);
  const Tensor a = randn({4, 6}, kFloat32, g), b = randn({4, 6}, kFloat32, g), row = randn({6}, kFloat32, g);
  const auto av = mixprec::testing::to_doubles(a), bv = mixprec::testing::to_doubles(b), rv = mixprec::testing::to_doubles(row);
  std::vector<double> l(24), lb(24);
  for (int i = 0; i < 24; ++i) {
    l[i] = (av[i] - bv[i]) * (av[i] - bv[i]);
    lb[i] = (av[i] - rv[i % 6]) * (av[i] - rv[i % 6]);
  }
  for (Reduction r : kLsstReductions) {
    EXPECT_LT(mixprec::testing::rel_error(mse_loss(a, b, r), lsst_reduce(l, {4, 6}, r, 24)), 1e-6) << lsst_name(r);
    EXPECT_LT(mixprec::testing::rel_error(mse_loss(a, row, r), lsst_reduce(lb, {4, 6}, r, 24)), 1e-6) << "broadcast " << lsst_name(r);
  }
  EXPECT_LT(mixprec::testing::rel_error(mse_loss(a.t(), b.t()), lsst_reduce(l, {}, Reduction::Mean, 24)), 1e-6);
}

TEST(MseLoss, Gradcheck) {
  Generator g(10);
  for (Reduction r : kLsstReductions) {
    Tensor a = lsst_leaf(randn({3, 4}, kFloat64, g)), b = lsst_leaf(randn({3, 4}, kFloat64, g));
    auto f = [r](const std::vector<Tensor>& in) { return mse_loss(in[0], in[1], r); };
    auto res = gradcheck(f, {a, b});
    EXPECT_TRUE(res.ok) << lsst_name(r) << ": " << res.message;
    Tensor row = lsst_leaf(randn({4}, kFloat64, g));
    res = gradcheck(f, {a, row});
    EXPECT_TRUE(res.ok) << "broadcast " << lsst_name(r) << ": " << res.message;
    Tensor at = lsst_leaf(randn({4, 3}, kFloat64, g).t());
    res = gradcheck(f, {at, b});
    EXPECT_TRUE(res.ok) << "transposed " << lsst_name(r) << ": " << res.message;
  }
}

TEST(MseLoss, SixteenBitAndErrors) {
  Generator g(11);
  const Tensor a = randn({32, 8}, kFloat32, g), b = randn({32, 8}, kFloat32, g);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}})
    for (Reduction r : kLsstReductions) {
      const Tensor y = mse_loss(a.to(d), b.to(d), r);
      EXPECT_EQ(y.dtype(), d);
      EXPECT_LT(mixprec::testing::rel_error(y, mse_loss(a, b, r)), tol) << name(d) << " " << lsst_name(r);
    }
  EXPECT_THROW(mse_loss(randn({3, 4}), randn({3, 5})), mixprec::Error);
  EXPECT_THROW(mse_loss(ones({3}, kInt64), ones({3}, kInt64)), mixprec::Error);
}

// ---------------- binary_cross_entropy_with_logits ----------------

namespace {
// -(pw t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))), written out naively in long double.
double lsst_naive_bce_logits(double x, double t, double pw) {
  const long double s = 1.0L / (1.0L + std::exp(-static_cast<long double>(x)));
  return static_cast<double>(-(pw * t * std::log(s) + (1 - t) * std::log(1.0L - s)));
}
}  // namespace

TEST(BceWithLogits, MatchesNaiveReference) {
  Generator g(12);
  const Tensor x = mul(randn({5, 3}, kFloat32, g), 3.0), t = rand({5, 3}, kFloat32, g), pw = add(rand({3}, kFloat32, g), 0.5);
  const auto xv = mixprec::testing::to_doubles(x), tv = mixprec::testing::to_doubles(t), pv = mixprec::testing::to_doubles(pw);
  std::vector<double> l(15), lp(15);
  for (int i = 0; i < 15; ++i) {
    l[i] = lsst_naive_bce_logits(xv[i], tv[i], 1.0);
    lp[i] = lsst_naive_bce_logits(xv[i], tv[i], pv[i % 3]);
  }
  for (Reduction r : kLsstReductions) {
    EXPECT_LT(mixprec::testing::rel_error(binary_cross_entropy_with_logits(x, t, r), lsst_reduce(l, {5, 3}, r, 15)), 1e-5) << lsst_name(r);
    EXPECT_LT(mixprec::testing::rel_error(binary_cross_entropy_with_logits(x, t, r, pw), lsst_reduce(lp, {5, 3}, r, 15)), 1e-5) << "pos_weight " << lsst_name(r);
  }
  // Non-contiguous.
  EXPECT_LT(mixprec::testing::rel_error(binary_cross_entropy_with_logits(x.t(), t.t(), Reduction::Sum), lsst_reduce(l, {}, Reduction::Sum, 15)), 1e-5);
}

TEST(BceWithLogits, StableForExtremeLogits) {
  const Tensor x = tensor({100.f, -100.f, 100.f, -100.f, 0.f});
  const Tensor t = tensor({1.f, 0.f, 0.f, 1.f, 1.f});
  const auto l = mixprec::testing::to_doubles(binary_cross_entropy_with_logits(x, t, Reduction::None));
  EXPECT_NEAR(l[0], 0.0, 1e-30);
  EXPECT_NEAR(l[1], 0.0, 1e-30);
  EXPECT_NEAR(l[2], 100.0, 1e-4);
  EXPECT_NEAR(l[3], 100.0, 1e-4);
  EXPECT_NEAR(l[4], std::log(2.0), 1e-6);
  Tensor xl = lsst_leaf(x.clone());
  binary_cross_entropy_with_logits(xl, t, Reduction::Sum).backward();
  const auto gv = mixprec::testing::to_doubles(xl.grad());
  const std::vector<double> expect{0.0, 0.0, 1.0, -1.0, -0.5};  // sigmoid(x) - t
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(gv[i], expect[i], 1e-6);
}

TEST(BceWithLogits, Gradcheck) {
  Generator g(13);
  for (Reduction r : kLsstReductions) {
    Tensor x = lsst_leaf(randn({4, 3}, kFloat64, g)), t = lsst_leaf(rand({4, 3}, kFloat64, g));
    Tensor pw = lsst_leaf(add(rand({3}, kFloat64, g), 0.5));
    auto res = gradcheck([r](const std::vector<Tensor>& in) { return binary_cross_entropy_with_logits(in[0], in[1], r); }, {x, t});
    EXPECT_TRUE(res.ok) << lsst_name(r) << ": " << res.message;
    res = gradcheck([r](const std::vector<Tensor>& in) { return binary_cross_entropy_with_logits(in[0], in[1], r, in[2]); }, {x, t, pw});
    EXPECT_TRUE(res.ok) << "pos_weight " << lsst_name(r) << ": " << res.message;
    Tensor xt = lsst_leaf(randn({3, 4}, kFloat64, g).t());
    res = gradcheck([r](const std::vector<Tensor>& in) { return binary_cross_entropy_with_logits(in[0], in[1], r, in[2]); }, {xt, t, pw});
    EXPECT_TRUE(res.ok) << "transposed " << lsst_name(r) << ": " << res.message;
  }
}

TEST(BceWithLogits, SixteenBitAndErrors) {
  Generator g(14);
  const Tensor x = randn({32, 4}, kFloat32, g), t = rand({32, 4}, kFloat32, g), pw = add(rand({4}, kFloat32, g), 0.5);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}})
    for (Reduction r : kLsstReductions) {
      const Tensor y = binary_cross_entropy_with_logits(x.to(d), t.to(d), r, pw.to(d));
      EXPECT_EQ(y.dtype(), d);
      EXPECT_LT(mixprec::testing::rel_error(y, binary_cross_entropy_with_logits(x, t, r, pw)), tol) << name(d) << " " << lsst_name(r);
    }
  EXPECT_THROW(binary_cross_entropy_with_logits(randn({3, 4}), rand({4, 3})), mixprec::Error);
  EXPECT_THROW(binary_cross_entropy_with_logits(randn({3, 4}), rand({3, 4}), Reduction::Mean, ones({3})), mixprec::Error);
  EXPECT_THROW(binary_cross_entropy_with_logits(randn({3, 4}), ones({3, 4}, kInt64)), mixprec::Error);
}

// ---------------- binary_cross_entropy ----------------

TEST(Bce, MatchesNaiveReferenceWithClamp) {
  Generator g(15);
  const Tensor p = add(mul(rand({6, 4}, kFloat32, g), 0.98), 0.01), t = rand({6, 4}, kFloat32, g);
  const auto pv = mixprec::testing::to_doubles(p), tv = mixprec::testing::to_doubles(t);
  std::vector<double> l(24);
  for (int i = 0; i < 24; ++i) l[i] = -(tv[i] * std::log(pv[i]) + (1 - tv[i]) * std::log(1 - pv[i]));
  for (Reduction r : kLsstReductions) EXPECT_LT(mixprec::testing::rel_error(binary_cross_entropy(p, t, r), lsst_reduce(l, {6, 4}, r, 24)), 1e-5) << lsst_name(r);
  // log is clamped at -100: certain-but-wrong predictions cost exactly 100.
  // (Element-wise checks: GCC 12 at -O2 -march=native with AVX-512 miscompiles a
  // std::vector<double>{100, 100, 0, 0} literal into {100, 100, 100, 100}.)
  const auto c = mixprec::testing::to_doubles(binary_cross_entropy(tensor({0.f, 1.f, 0.f, 1.f}), tensor({1.f, 0.f, 0.f, 1.f}), Reduction::None));
  ASSERT_EQ(c.size(), 4u);
  EXPECT_EQ(c[0], 100.0);
  EXPECT_EQ(c[1], 100.0);
  EXPECT_EQ(c[2], 0.0);
  EXPECT_EQ(c[3], 0.0);
}

TEST(Bce, Gradcheck) {
  Generator g(16);
  for (Reduction r : kLsstReductions) {
    Tensor p = lsst_leaf(add(mul(rand({4, 3}, kFloat64, g), 0.8), 0.1)), t = lsst_leaf(rand({4, 3}, kFloat64, g));
    auto f = [r](const std::vector<Tensor>& in) { return binary_cross_entropy(in[0], in[1], r); };
    auto res = gradcheck(f, {p, t});
    EXPECT_TRUE(res.ok) << lsst_name(r) << ": " << res.message;
    Tensor pt = lsst_leaf(add(mul(rand({3, 4}, kFloat64, g), 0.8), 0.1).t());
    res = gradcheck(f, {pt, t});
    EXPECT_TRUE(res.ok) << "transposed " << lsst_name(r) << ": " << res.message;
  }
}

TEST(Bce, SixteenBitAndErrors) {
  Generator g(17);
  const Tensor p = add(mul(rand({32, 4}, kFloat32, g), 0.9), 0.05), t = rand({32, 4}, kFloat32, g);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}})
    for (Reduction r : kLsstReductions) {
      const Tensor y = binary_cross_entropy(p.to(d), t.to(d), r);
      EXPECT_EQ(y.dtype(), d);
      EXPECT_LT(mixprec::testing::rel_error(y, binary_cross_entropy(p, t, r)), tol) << name(d) << " " << lsst_name(r);
    }
  try {
    binary_cross_entropy(tensor({0.5f, 1.5f}), tensor({1.f, 0.f}));
    FAIL() << "expected an error";
  } catch (const mixprec::Error& e) {
    EXPECT_NE(std::string(e.what()).find("binary_cross_entropy"), std::string::npos) << e.what();
  }
  EXPECT_THROW(binary_cross_entropy(tensor({-0.1f}), tensor({1.f})), mixprec::Error);
  EXPECT_THROW(binary_cross_entropy(tensor({NAN}), tensor({1.f})), mixprec::Error);
  EXPECT_THROW(binary_cross_entropy(rand({3, 4}), rand({4, 3})), mixprec::Error);
  {
    autocast ac(Device::CPU, kFloat16);  // banned: its gradient overflows in float16
    EXPECT_THROW(binary_cross_entropy(p, t), mixprec::Error);
  }
  {
    autocast ac(Device::CPU, kBFloat16);  // runs in float32
    EXPECT_EQ(binary_cross_entropy(p.to(kBFloat16), t).dtype(), kFloat32);
  }
}
