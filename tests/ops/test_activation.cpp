#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

using namespace mixprec;

namespace {
// Values of any tensor as doubles, in logical (row-major) order.
// ||a - b|| / ||b||, on the values in logical order.
Tensor actt_from(const std::vector<double>& v, const Shape& s, DType d = kFloat32) { return tensor(v, s).to(d); }

// Row-major multi-index helpers for the naive references.
int64_t actt_off(const Shape& sizes, const Shape& idx) {
  int64_t off = 0;
  for (std::size_t d = 0; d < sizes.size(); ++d) off = off * sizes[d] + idx[d];
  return off;
}

// Naive (log-)softmax along `dim` of a row-major array, in double.
std::vector<double> actt_naive_softmax(const std::vector<double>& x, const Shape& sizes, int64_t dim, bool log) {
  std::vector<double> y(x.size());
  Shape idx(sizes.size(), 0);
  for (std::size_t i = 0; i < x.size(); ++i) {
    // i's multi-index
    int64_t rem = static_cast<int64_t>(i);
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      idx[d] = rem % sizes[d];
      rem /= sizes[d];
    }
    Shape j = idx;
    double m = -INFINITY;
    for (int64_t k = 0; k < sizes[dim]; ++k) {
      j[dim] = k;
      m = std::max(m, x[actt_off(sizes, j)]);
    }
    double s = 0;
    for (int64_t k = 0; k < sizes[dim]; ++k) {
      j[dim] = k;
      s += std::exp(x[actt_off(sizes, j)] - m);
    }
    y[i] = log ? x[i] - m - std::log(s) : std::exp(x[i] - m) / s;
  }
  return y;
}

// Random values bounded away from 0 (kinks of relu / prelu must not sit inside the FD step).
Tensor actt_away_from_zero(const Shape& s, DType d, uint64_t seed) {
  Generator g(seed);
  Tensor x = randn(s, kFloat64, g);
  double* p = x.data<double>();
  for (int64_t i = 0; i < x.numel(); ++i)
    if (std::fabs(p[i]) < 0.05) p[i] += p[i] < 0 ? -0.05 : 0.05;
  return x.to(d);
}

Tensor actt_leaf(Tensor t) { return t.requires_grad_(); }
}  // namespace

// ---------------- softmax / log_softmax ----------------

TEST(Softmax, MatchesNaiveReferenceEveryDim) {
  Generator g(1);
  const Shape s{3, 4, 5};
  const Tensor x = mul(randn(s, kFloat32, g), 3.0);
  const auto xv = mixprec::testing::to_doubles(x);
  for (int64_t dim : {0, 1, 2, -1, -2}) {
    const int64_t d = dim < 0 ? dim + 3 : dim;
    EXPECT_LT(mixprec::testing::rel_error(softmax(x, dim), actt_from(actt_naive_softmax(xv, s, d, false), s)), 1e-5) << "dim " << dim;
    EXPECT_LT(mixprec::testing::rel_error(log_softmax(x, dim), actt_from(actt_naive_softmax(xv, s, d, true), s)), 1e-5) << "dim " << dim;
    EXPECT_EQ(softmax(x, dim).dtype(), kFloat32);
  }
}

TEST(Softmax, WideInnerDimUsesColumnBlocksCorrectly) {
  // inner = 300 > one column block of 256: exercises the partial last block.
  Generator g(2);
  const Shape s{2, 7, 300};
  const Tensor x = randn(s, kFloat32, g);
  const auto xv = mixprec::testing::to_doubles(x);
  EXPECT_LT(mixprec::testing::rel_error(softmax(x, 1), actt_from(actt_naive_softmax(xv, s, 1, false), s)), 1e-5);
  EXPECT_LT(mixprec::testing::rel_error(log_softmax(x, 1), actt_from(actt_naive_softmax(xv, s, 1, true), s)), 1e-5);
}

TEST(Softmax, NonContiguousInput) {
  Generator g(3);
  const Tensor base = randn({5, 4, 3}, kFloat32, g);
  const Tensor x = base.permute({2, 0, 1});  // [3, 5, 4], non-contiguous
  ASSERT_FALSE(x.is_contiguous());
  const Shape s = x.sizes();
  const auto xv = mixprec::testing::to_doubles(x);
  for (int64_t d = 0; d < 3; ++d) {
    EXPECT_LT(mixprec::testing::rel_error(softmax(x, d), actt_from(actt_naive_softmax(xv, s, d, false), s)), 1e-5);
    EXPECT_LT(mixprec::testing::rel_error(log_softmax(x, d), actt_from(actt_naive_softmax(xv, s, d, true), s)), 1e-5);
  }
}

TEST(Softmax, StableForHugeLogits) {
  const Tensor x = tensor({1000.f, 1001.f, 1002.f, -1000.f, 0.f, 1000.f}, {2, 3});
  const auto y = mixprec::testing::to_doubles(softmax(x, 1));
  const auto ly = mixprec::testing::to_doubles(log_softmax(x, 1));
  for (double v : y) EXPECT_TRUE(std::isfinite(v));
  for (double v : ly) EXPECT_TRUE(std::isfinite(v));
  const double e1 = std::exp(-1.0), e2 = std::exp(-2.0);
  EXPECT_NEAR(y[2], 1.0 / (1 + e1 + e2), 1e-6);
  EXPECT_NEAR(ly[0], -2.0 - std::log(1 + e1 + e2), 1e-4);
  EXPECT_NEAR(y[5], 1.0, 1e-6);
  EXPECT_NEAR(ly[3], -2000.0, 1e-2);
}

TEST(Softmax, MaskedMinusInfinityGivesExactZeros) {
  const float inf = std::numeric_limits<float>::infinity();
  const Tensor x = tensor({-inf, 1.f, -inf, 2.f, -inf, -inf, -inf, -inf}, {2, 4});
  const auto y = mixprec::testing::to_doubles(softmax(x, 1));
  const double e = std::exp(1.0);
  EXPECT_EQ(y[0], 0.0);
  EXPECT_EQ(y[2], 0.0);
  EXPECT_NEAR(y[1], 1 / (1 + e), 1e-6);
  EXPECT_NEAR(y[3], e / (1 + e), 1e-6);
  for (int i = 4; i < 8; ++i) EXPECT_TRUE(std::isnan(y[i]));  // a fully masked row is NaN, as PyTorch
  const auto ly = mixprec::testing::to_doubles(log_softmax(x, 1));
  EXPECT_EQ(ly[0], -std::numeric_limits<double>::infinity());
  EXPECT_NEAR(ly[3], -std::log1p(std::exp(-1.0)), 1e-6);
  // The same along a strided (column-block) dim.
  const auto yt = mixprec::testing::to_doubles(softmax(x.t().contiguous(), 0));
  EXPECT_EQ(yt[0], 0.0);
  EXPECT_NEAR(yt[2], 1 / (1 + e), 1e-6);
}

TEST(Softmax, RowsSumToOneAndZeroDimInput) {
  Generator g(4);
  const Tensor y = softmax(randn({6, 33}, kFloat32, g), 1);
  const auto v = mixprec::testing::to_doubles(sum(y, {1}));
  for (double s : v) EXPECT_NEAR(s, 1.0, 1e-6);
  const Tensor z = softmax(scalar_tensor(3.0), 0);
  EXPECT_EQ(z.dim(), 0);
  EXPECT_FLOAT_EQ(z.item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(log_softmax(scalar_tensor(3.0), -1).item<float>(), 0.0f);
}

TEST(Softmax, Gradcheck) {
  Generator g(5);
  for (bool log : {false, true}) {
    auto f = [log](int64_t d) {
      return [log, d](const std::vector<Tensor>& in) { return log ? log_softmax(in[0], d) : softmax(in[0], d); };
    };
    // Middle dim (strided path), last dim (fast path), first dim.
    for (int64_t d : {1, 2, 0}) {
      Tensor x = actt_leaf(randn({2, 3, 4}, kFloat64, g));
      auto r = gradcheck(f(d), {x});
      EXPECT_TRUE(r.ok) << (log ? "log_softmax" : "softmax") << " dim " << d << ": " << r.message;
    }
    // Non-contiguous leaf (a transposed view).
    Tensor xt = actt_leaf(randn({4, 3, 2}, kFloat64, g).transpose(0, 2));
    ASSERT_FALSE(xt.is_contiguous());
    for (int64_t d : {1, -1}) {
      auto r = gradcheck(f(d), {xt});
      EXPECT_TRUE(r.ok) << (log ? "log_softmax" : "softmax") << " transposed dim " << d << ": " << r.message;
    }
    // A sliced (strided) leaf along the softmax dim.
    Tensor xs = actt_leaf(randn({3, 10}, kFloat64, g).slice(1, 0, 10, 2));
    auto r = gradcheck(f(1), {xs});
    EXPECT_TRUE(r.ok) << r.message;
  }
}

TEST(Softmax, BackwardThroughBroadcastGradient) {
  // sum() hands backward a stride-0 gradient; softmax rows sum to 1 so the gradient is ~0.
  Tensor x = actt_leaf(randn({3, 4}, kFloat32));
  sum(softmax(x, 1)).backward();
  for (double v : mixprec::testing::to_doubles(x.grad())) EXPECT_NEAR(v, 0.0, 1e-6);
  Tensor x2 = actt_leaf(randn({3, 4}, kFloat32));
  sum(log_softmax(x2, 1)).backward();
  // d/dx sum_j log_softmax_j = 1 - C softmax
  const auto sm = mixprec::testing::to_doubles(softmax(x2.detach(), 1));
  const auto gv = mixprec::testing::to_doubles(x2.grad());
  for (std::size_t i = 0; i < gv.size(); ++i) EXPECT_NEAR(gv[i], 1.0 - 4.0 * sm[i], 1e-5);
}

TEST(Softmax, SixteenBitMatchesFloat32) {
  Generator g(6);
  const Tensor x = randn({8, 5, 16}, kFloat32, g);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    for (int64_t dim : {1, 2}) {
      for (bool log : {false, true}) {
        const Tensor ref = log ? log_softmax(x, dim) : softmax(x, dim);
        const Tensor y = log ? log_softmax(x.to(d), dim) : softmax(x.to(d), dim);
        EXPECT_EQ(y.dtype(), d);
        EXPECT_LT(mixprec::testing::rel_error(y, ref), tol) << name(d) << " dim " << dim << " log " << log;
      }
    }
    // Backward in the input dtype, close to the float32 gradient.
    Tensor x32 = actt_leaf(x.clone());
    Tensor x16 = actt_leaf(x.to(d));
    const Tensor w = randn(x.sizes(), kFloat32, g);
    sum(mul(softmax(x32, 1), w)).backward();
    sum(mul(softmax(x16, 1), w.to(d))).backward();
    EXPECT_EQ(x16.grad().dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(x16.grad(), x32.grad()), tol * 3) << name(d);
  }
}

TEST(Softmax, Errors) {
  EXPECT_THROW(softmax(randn({2, 3}), 2), mixprec::Error);
  EXPECT_THROW(log_softmax(randn({2, 3}), -3), mixprec::Error);
  EXPECT_THROW(softmax(ones({2, 3}, kInt64), 1), mixprec::Error);
  try {
    log_softmax(ones({2}, kInt32), 0);
    FAIL() << "expected an error";
  } catch (const mixprec::Error& e) {
    EXPECT_NE(std::string(e.what()).find("log_softmax"), std::string::npos) << e.what();
  }
}

// ---------------- dropout ----------------

TEST(Dropout, StatisticsFractionAndMean) {
  Generator g(7);
  const int64_t n = 400000;
  const Tensor x = ones({n});
  for (double p : {0.1, 0.3, 0.5, 0.8}) {
    const auto y = mixprec::testing::to_doubles(dropout(x, p, true, g));
    int64_t zeros_ = 0;
    double s = 0;
    for (double v : y) {
      if (v == 0) ++zeros_;
      else EXPECT_NEAR(v, 1.0 / (1.0 - p), 1e-6);
      s += v;
    }
    const double frac = static_cast<double>(zeros_) / static_cast<double>(n);
    // 5 standard deviations of a binomial fraction.
    EXPECT_NEAR(frac, p, 5 * std::sqrt(p * (1 - p) / static_cast<double>(n))) << "p " << p;
    EXPECT_NEAR(s / static_cast<double>(n), 1.0, 0.02) << "p " << p;
  }
}

TEST(Dropout, SameSeedSameMaskAndGeneratorAdvances) {
  const Tensor x = randn({3, 50000});
  Generator a(99), b(99);
  const Tensor ya = dropout(x, 0.4, true, a), yb = dropout(x, 0.4, true, b);
  EXPECT_EQ(mixprec::testing::to_doubles(ya), mixprec::testing::to_doubles(yb));
  // The generator advanced: a second draw gives a different mask.
  const Tensor ya2 = dropout(x, 0.4, true, a);
  EXPECT_NE(mixprec::testing::to_doubles(ya), mixprec::testing::to_doubles(ya2));
  Generator c(100);
  EXPECT_NE(mixprec::testing::to_doubles(ya), mixprec::testing::to_doubles(dropout(x, 0.4, true, c)));
  // The default generator is reproducible through manual_seed.
  manual_seed(5);
  const auto d1 = mixprec::testing::to_doubles(dropout(x, 0.4, true));
  manual_seed(5);
  EXPECT_EQ(d1, mixprec::testing::to_doubles(dropout(x, 0.4, true)));
}

#if defined(_OPENMP)
TEST(Dropout, MaskDoesNotDependOnThreadCount) {
  const Tensor x = ones({300000});  // several mask chunks
  Generator a(11), b(11);
  const auto many = mixprec::testing::to_doubles(dropout(x, 0.5, true, a));
  const int prev = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto one = mixprec::testing::to_doubles(dropout(x, 0.5, true, b));
  omp_set_num_threads(prev);
  EXPECT_EQ(many, one);
}
#endif

TEST(Dropout, IdentityCasesAndAllDropped) {
  const Tensor x = randn({4, 5});
  Generator g(1);
  EXPECT_TRUE(dropout(x, 0.5, false, g).is_same(x));
  EXPECT_TRUE(dropout(x, 0.0, true, g).is_same(x));
  Tensor xl = actt_leaf(randn({4, 5}));
  const Tensor y = dropout(xl, 1.0, true, g);
  for (double v : mixprec::testing::to_doubles(y)) EXPECT_EQ(v, 0.0);
  sum(y).backward();
  for (double v : mixprec::testing::to_doubles(xl.grad())) EXPECT_EQ(v, 0.0);
}

TEST(Dropout, BackwardUsesTheSavedMask) {
  Generator g(3);
  Tensor x = actt_leaf(add(rand({6, 7}, kFloat32, g), 0.5));  // strictly positive: y == 0 iff dropped
  const Tensor y = dropout(x, 0.3, true, g);
  const Tensor w = randn({6, 7}, kFloat32, g);
  sum(mul(y, w)).backward();
  const auto yv = mixprec::testing::to_doubles(y), gv = mixprec::testing::to_doubles(x.grad()), wv = mixprec::testing::to_doubles(w);
  for (std::size_t i = 0; i < yv.size(); ++i) EXPECT_NEAR(gv[i], yv[i] == 0 ? 0.0 : wv[i] / 0.7, 1e-5);
}

TEST(Dropout, GradcheckWithFixedSeed) {
  Generator g(8);
  Tensor x = actt_leaf(randn({5, 6}, kFloat64, g));
  Tensor xt = actt_leaf(randn({6, 5}, kFloat64, g).t());
  for (const Tensor& in : {x, xt}) {
    auto r = gradcheck([](const std::vector<Tensor>& v) {
      Generator fixed(1234);  // the same mask on every evaluation
      return dropout(v[0], 0.4, true, fixed);
    }, {in});
    EXPECT_TRUE(r.ok) << r.message;
  }
}

TEST(Dropout, SixteenBitKeepsDtypeAndMask) {
  const Tensor x = randn({64, 33});
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    Generator a(21), b(21);
    const Tensor ref = dropout(x, 0.25, true, a);
    const Tensor y = dropout(x.to(d), 0.25, true, b);
    EXPECT_EQ(y.dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(y, ref), tol) << name(d);
    const auto yv = mixprec::testing::to_doubles(y), rv = mixprec::testing::to_doubles(ref);
    for (std::size_t i = 0; i < yv.size(); ++i) EXPECT_EQ(yv[i] == 0, rv[i] == 0);
  }
}

TEST(Dropout, Errors) {
  EXPECT_THROW(dropout(randn({3}), -0.1, true), mixprec::Error);
  EXPECT_THROW(dropout(randn({3}), 1.5, true), mixprec::Error);
  EXPECT_THROW(dropout(randn({3}), 1.5, false), mixprec::Error);
  EXPECT_THROW(dropout(ones({3}, kInt64), 0.5, true), mixprec::Error);
}

// ---------------- prelu ----------------

namespace {
std::vector<double> actt_naive_prelu(const std::vector<double>& x, const Shape& s, const std::vector<double>& w) {
  std::vector<double> y(x.size());
  int64_t inner = 1;
  for (std::size_t d = 2; d < s.size(); ++d) inner *= s[d];
  const int64_t C = s.size() >= 2 ? s[1] : 1;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const int64_t c = (static_cast<int64_t>(i) / inner) % C;
    const double a = w.size() == 1 ? w[0] : w[c];
    y[i] = x[i] > 0 ? x[i] : a * x[i];
  }
  return y;
}
}  // namespace

TEST(Prelu, MatchesNaiveReference) {
  Generator g(9);
  const Shape s{3, 4, 5};
  const Tensor x = randn(s, kFloat32, g);
  const Tensor wc = rand({4}, kFloat32, g), w1 = tensor({0.25f});
  EXPECT_LT(mixprec::testing::rel_error(prelu(x, wc), actt_from(actt_naive_prelu(mixprec::testing::to_doubles(x), s, mixprec::testing::to_doubles(wc)), s)), 1e-6);
  EXPECT_LT(mixprec::testing::rel_error(prelu(x, w1), actt_from(actt_naive_prelu(mixprec::testing::to_doubles(x), s, {0.25}), s)), 1e-6);
  // 0-D weight, 1-D input.
  const Tensor x1 = randn({7}, kFloat32, g);
  EXPECT_LT(mixprec::testing::rel_error(prelu(x1, scalar_tensor(0.1)), actt_from(actt_naive_prelu(mixprec::testing::to_doubles(x1), {7}, {0.1}), {7})), 1e-6);
  // Non-contiguous input and a strided per-channel weight.
  const Tensor xt = randn({5, 4, 3}, kFloat32, g).permute({2, 1, 0});
  const Tensor ws = rand({8}, kFloat32, g).slice(0, 0, 8, 2);
  EXPECT_LT(mixprec::testing::rel_error(prelu(xt, ws), actt_from(actt_naive_prelu(mixprec::testing::to_doubles(xt), xt.sizes(), mixprec::testing::to_doubles(ws)), xt.sizes())), 1e-6);
}

TEST(Prelu, Gradcheck) {
  Tensor x = actt_leaf(actt_away_from_zero({3, 4, 2}, kFloat64, 10));
  Tensor wc = actt_leaf(actt_away_from_zero({4}, kFloat64, 11));
  Tensor w1 = actt_leaf(actt_away_from_zero({1}, kFloat64, 12));
  auto f = [](const std::vector<Tensor>& in) { return prelu(in[0], in[1]); };
  auto r = gradcheck(f, {x, wc});
  EXPECT_TRUE(r.ok) << r.message;
  r = gradcheck(f, {x, w1});
  EXPECT_TRUE(r.ok) << r.message;
  Tensor xt = actt_leaf(actt_away_from_zero({2, 4, 3}, kFloat64, 13).transpose(0, 2));  // [3, 4, 2]
  r = gradcheck(f, {xt, wc});
  EXPECT_TRUE(r.ok) << r.message;
  Tensor x2 = actt_leaf(actt_away_from_zero({6, 4}, kFloat64, 14));
  r = gradcheck(f, {x2, wc});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(Prelu, SixteenBitMatchesFloat32) {
  Generator g(15);
  const Tensor x = randn({8, 6, 5}, kFloat32, g), w = rand({6}, kFloat32, g);
  for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    const Tensor y = prelu(x.to(d), w.to(d));
    EXPECT_EQ(y.dtype(), d);
    EXPECT_LT(mixprec::testing::rel_error(y, prelu(x, w)), tol) << name(d);
    Tensor xl = actt_leaf(x.to(d)), wl = actt_leaf(w.to(d));
    sum(prelu(xl, wl)).backward();
    EXPECT_EQ(xl.grad().dtype(), d);
    EXPECT_EQ(wl.grad().dtype(), d);
  }
}

TEST(Prelu, Errors) {
  EXPECT_THROW(prelu(randn({2, 3, 4}), ones({4})), mixprec::Error);
  EXPECT_THROW(prelu(randn({2, 3}), ones({3, 1})), mixprec::Error);
  EXPECT_THROW(prelu(ones({2, 3}, kInt64), ones({3})), mixprec::Error);
  EXPECT_THROW(prelu(randn({5}), ones({5})), mixprec::Error);  // 1-D input: one shared weight only
}

// ---------------- element-wise activations from elementwise.hpp ----------------

namespace {
struct ActtUnary {
  const char* name;
  std::function<Tensor(const Tensor&)> op;
  std::function<double(double)> ref;
};
std::vector<ActtUnary> actt_unaries() {
  const double k = std::sqrt(2.0 / std::numbers::pi);
  return {
      {"relu", [](const Tensor& x) { return relu(x); }, [](double v) { return v > 0 ? v : 0.0; }},
      {"gelu", [](const Tensor& x) { return gelu(x); }, [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }},
      {"gelu_tanh", [](const Tensor& x) { return gelu(x, "tanh"); },
       [k](double v) { return 0.5 * v * (1 + std::tanh(k * (v + 0.044715 * v * v * v))); }},
      {"silu", [](const Tensor& x) { return silu(x); }, [](double v) { return v / (1 + std::exp(-v)); }},
      {"sigmoid", [](const Tensor& x) { return sigmoid(x); }, [](double v) { return 1 / (1 + std::exp(-v)); }},
      {"tanh", [](const Tensor& x) { return mixprec::tanh(x); }, [](double v) { return std::tanh(v); }},
  };
}
}  // namespace

TEST(ElementwiseActivations, MatchNaiveReference) {
  const Tensor x = mul(actt_away_from_zero({7, 9}, kFloat32, 20), 2.0);
  const auto xv = mixprec::testing::to_doubles(x);
  for (const auto& u : actt_unaries()) {
    std::vector<double> r(xv.size());
    for (std::size_t i = 0; i < xv.size(); ++i) r[i] = u.ref(xv[i]);
    EXPECT_LT(mixprec::testing::rel_error(u.op(x), actt_from(r, x.sizes())), 1e-5) << u.name;
  }
}

TEST(ElementwiseActivations, Gradcheck) {
  for (const auto& u : actt_unaries()) {
    Tensor x = actt_leaf(mul(actt_away_from_zero({4, 5}, kFloat64, 21), 2.0));
    auto f = [&u](const std::vector<Tensor>& in) { return u.op(in[0]); };
    auto r = gradcheck(f, {x});
    EXPECT_TRUE(r.ok) << u.name << ": " << r.message;
    Tensor xt = actt_leaf(actt_away_from_zero({5, 4}, kFloat64, 22).t());
    ASSERT_FALSE(xt.is_contiguous());
    r = gradcheck(f, {xt});
    EXPECT_TRUE(r.ok) << u.name << " (non-contiguous): " << r.message;
  }
}

TEST(ElementwiseActivations, SixteenBitMatchesFloat32) {
  const Tensor x = mul(actt_away_from_zero({32, 17}, kFloat32, 23), 2.0);
  const Tensor w = randn(x.sizes(), kFloat32);
  for (const auto& u : actt_unaries()) {
    const Tensor ref = u.op(x);
    Tensor x32 = actt_leaf(x.clone());
    sum(mul(u.op(x32), w)).backward();
    for (auto [d, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
      const Tensor y = u.op(x.to(d));
      EXPECT_EQ(y.dtype(), d) << u.name;
      EXPECT_LT(mixprec::testing::rel_error(y, ref), tol) << u.name << " " << name(d);
      Tensor x16 = actt_leaf(x.to(d));
      sum(mul(u.op(x16), w.to(d))).backward();
      EXPECT_EQ(x16.grad().dtype(), d) << u.name;
      EXPECT_LT(mixprec::testing::rel_error(x16.grad(), x32.grad()), tol * 2) << u.name << " grad " << name(d);
    }
  }
}

// ---------------- cpu::vec: the float32 exp / erf / tanh behind the activations ----------------

namespace {
// |got - ref| in units of float32's spacing at ref (subnormal spacing below 2^-126); 0 when
// both are NaN or the same infinity, infinity when only one is.
double actt_ulps(float got, double ref) {
  if (std::isnan(ref) || std::isnan(got)) return std::isnan(ref) && std::isnan(got) ? 0 : INFINITY;
  const float rf = static_cast<float>(ref);
  if (std::isinf(rf) || std::isinf(got)) return got == rf ? 0 : INFINITY;
  int e = 0;
  std::frexp(ref, &e);
  return std::fabs(static_cast<double>(got) - ref) / std::ldexp(1.0, std::max(e - 24, -149));
}
struct ActtVecFn {
  const char* name;
  float (*f)(float);
  double (*ref)(double);
  double max_ulp;
};
std::vector<ActtVecFn> actt_vec_fns() {
  return {{"exp", [](float v) { return cpu::vec::exp(v); }, [](double v) { return std::exp(v); }, 1.0},
          {"erf", [](float v) { return cpu::vec::erf(v); }, [](double v) { return std::erf(v); }, 2.0},
          {"tanh", [](float v) { return cpu::vec::tanh(v); }, [](double v) { return std::tanh(v); }, 2.0}};
}
// Every 4093rd float32 bit pattern (all signs, exponents, NaNs and infinities), then every float
// in [-1, 1] at stride 1021 and around the functions' branch points.
std::vector<float> actt_sweep() {
  std::vector<float> xs;
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 4093) xs.push_back(std::bit_cast<float>(static_cast<uint32_t>(b)));
  for (uint32_t b = 1; b < std::bit_cast<uint32_t>(1.0f); b += 1021) {
    xs.push_back(std::bit_cast<float>(b));
    xs.push_back(-std::bit_cast<float>(b));
  }
  for (float c : {0.625f, 0.927734375f, 3.92f, 88.7228f, -87.33f, -103.97f, -104.0f})
    for (float s : {1.0f, -1.0f}) {
      float v = s * c;
      for (int i = 0; i < 2000; ++i) v = std::nextafter(v, -INFINITY);
      for (int i = 0; i < 4000; ++i, v = std::nextafter(v, INFINITY)) xs.push_back(v);
    }
  for (float v : {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f, -1e-45f, 1e-38f, 3e38f, -3e38f}) xs.push_back(v);
  return xs;
}
}  // namespace

// The bounds documented in vec_math.hpp, on the portable path and on the vectorised one (the
// same function inlined into cpu::simd's AVX-512 loop where the CPU has it); both
// paths must also give the same bits.
TEST(VecMath, UlpErrorBoundsOverADenseSweep) {
  const std::vector<float> xs = actt_sweep();
  std::vector<float> ys(xs.size()), yv(xs.size());
  for (const auto& fn : actt_vec_fns()) {
    for (std::size_t i = 0; i < xs.size(); ++i) ys[i] = fn.f(xs[i]);
    const float* x = xs.data();
    float* y = yv.data();
    const int64_t n = static_cast<int64_t>(xs.size());
    if (fn.name[1] == 'x')
      cpu::simd([&]() MIXPREC_SIMD_BODY { for (int64_t i = 0; i < n; ++i) y[i] = cpu::vec::exp(x[i]); });
    else if (fn.name[0] == 'e')
      cpu::simd([&]() MIXPREC_SIMD_BODY { for (int64_t i = 0; i < n; ++i) y[i] = cpu::vec::erf(x[i]); });
    else
      cpu::simd([&]() MIXPREC_SIMD_BODY { for (int64_t i = 0; i < n; ++i) y[i] = cpu::vec::tanh(x[i]); });
    double worst = 0;
    float at = 0;
    int64_t differ = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const double e = actt_ulps(ys[i], fn.ref(xs[i]));
      if (e > worst) worst = e, at = xs[i];
      differ += std::bit_cast<uint32_t>(ys[i]) != std::bit_cast<uint32_t>(yv[i]);
    }
    EXPECT_LE(worst, fn.max_ulp) << fn.name << " at " << at;
    EXPECT_EQ(differ, 0) << fn.name << ": the vectorised path differs from the portable one";
  }
}

TEST(VecMath, SpecialValues) {
  EXPECT_EQ(cpu::vec::exp(INFINITY), INFINITY);
  EXPECT_EQ(cpu::vec::exp(89.0f), INFINITY);
  EXPECT_EQ(cpu::vec::exp(1e30f), INFINITY);
  EXPECT_EQ(std::bit_cast<uint32_t>(cpu::vec::exp(-INFINITY)), 0u);  // +0, as masked softmax logits need
  EXPECT_EQ(std::bit_cast<uint32_t>(cpu::vec::exp(-1e30f)), 0u);
  EXPECT_EQ(cpu::vec::exp(-0.0f), 1.0f);
  EXPECT_GT(cpu::vec::exp(-103.0f), 0.0f);  // subnormal, not flushed
  EXPECT_LT(cpu::vec::exp(-103.0f), std::numeric_limits<float>::min());
  for (float v : {INFINITY, 4.0f, 1e30f}) {
    EXPECT_EQ(cpu::vec::erf(v), 1.0f) << v;
    EXPECT_EQ(cpu::vec::erf(-v), -1.0f) << v;
  }
  for (float v : {INFINITY, 9.1f, 1e30f}) {
    EXPECT_EQ(cpu::vec::tanh(v), 1.0f) << v;
    EXPECT_EQ(cpu::vec::tanh(-v), -1.0f) << v;
  }
  for (float v : {0.0f, -0.0f, 1e-45f, -3e-40f}) {  // odd functions keep zeros and subnormals exact
    EXPECT_EQ(std::bit_cast<uint32_t>(cpu::vec::tanh(v)), std::bit_cast<uint32_t>(v)) << v;
    EXPECT_EQ(std::signbit(cpu::vec::erf(v)), std::signbit(v)) << v;
  }
  for (const auto& fn : actt_vec_fns()) EXPECT_TRUE(std::isnan(fn.f(NAN))) << fn.name;
}

// GELU's one-exp form (vec_math.hpp) against float64 on a dense grid of [-12, 12]: gelu's relative
// error, and gelu' relative to |Phi| + |x phi| (its size before the two terms cancel near -0.75).
// Measured on this grid: 6.1e-7 / 3.9e-7 for x >= -4 (5 and 3 ulp), growing to 4.1e-6 / 3.9e-6 at -12, where
// the rounding of x^2 in e^{-x^2/2} dominates (the erf form returned 0 from -5.54 on). The
// vectorised path gives the same bits as the portable one.
TEST(VecMath, GeluAndItsDerivativeMatchFloat64) {
  std::vector<float> xs;
  for (int i = -3000000; i <= 3000000; ++i) xs.push_back(static_cast<float>(i * 4e-6));
  for (float v : {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-20f, -1e-20f}) xs.push_back(v);
  const int64_t n = static_cast<int64_t>(xs.size());
  std::vector<float> g(xs.size()), d(xs.size());
  const float* x = xs.data();
  float *gp = g.data(), *dp = d.data();
  cpu::simd([&]() MIXPREC_SIMD_BODY {
    for (int64_t i = 0; i < n; ++i) gp[i] = cpu::vec::gelu(x[i]);
    for (int64_t i = 0; i < n; ++i) dp[i] = cpu::vec::gelu_grad(x[i]);
  });
  double worst[2][2] = {};  // [gelu, grad][x >= -4, below]
  int64_t differ = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = xs[i], phi = 0.5 * std::erfc(-v / std::sqrt(2.0)), dens = std::exp(-0.5 * v * v) / std::sqrt(2.0 * M_PI);
    const double ref = v * phi, ref_grad = phi + v * dens, scale = phi + std::fabs(v * dens);
    const int r = v >= -4.0 ? 0 : 1;
    if (std::fabs(ref) >= std::numeric_limits<float>::min()) worst[0][r] = std::max(worst[0][r], std::fabs(g[i] - ref) / std::fabs(ref));
    else EXPECT_LE(std::fabs(g[i] - ref), 1.5e-45) << v;  // subnormal results: one spacing
    worst[1][r] = std::max(worst[1][r], std::fabs(d[i] - ref_grad) / scale);
    differ += std::bit_cast<uint32_t>(g[i]) != std::bit_cast<uint32_t>(cpu::vec::gelu(xs[i]));
    differ += std::bit_cast<uint32_t>(d[i]) != std::bit_cast<uint32_t>(cpu::vec::gelu_grad(xs[i]));
  }
  EXPECT_LE(worst[0][0], 8e-7);
  EXPECT_LE(worst[1][0], 6e-7);
  EXPECT_LE(worst[0][1], 5e-6);
  EXPECT_LE(worst[1][1], 5e-6);
  EXPECT_EQ(differ, 0) << "the vectorised path differs from the portable one";
  EXPECT_EQ(cpu::vec::gelu(INFINITY), INFINITY);
  EXPECT_EQ(cpu::vec::gelu_grad(0.0f), 0.5f);
  EXPECT_EQ(std::bit_cast<uint32_t>(cpu::vec::gelu(-0.0f)), std::bit_cast<uint32_t>(-0.0f));
  EXPECT_EQ(cpu::vec::gelu(-30.0f), 0.0f);
  EXPECT_TRUE(std::isnan(cpu::vec::gelu(NAN)) && std::isnan(cpu::vec::gelu_grad(NAN)));
  EXPECT_TRUE(std::isnan(cpu::vec::gelu(-INFINITY)));  // -inf * Phi(-inf) = -inf * 0, as PyTorch's formula
}

// The activations in float32 and 16-bit against float64 over wide inputs, with the non-finite
// and subnormal values giving what the float64 formula gives (NaN where it is NaN).
TEST(ElementwiseActivations, WideRangeAndSpecialValuesMatchFloat64) {
  std::vector<double> xs;
  for (int i = -400; i <= 400; ++i) xs.push_back(i * 0.05);
  for (double v : std::initializer_list<double>{30.0, -30.0, 90.0, -90.0, 1e4, -1e4, 1e-40, -1e-40, 0.0, INFINITY, -INFINITY, NAN}) xs.push_back(v);
  const Tensor x = actt_from(xs, {static_cast<int64_t>(xs.size())});
  const auto xv = mixprec::testing::to_doubles(x);  // the float32 values
  for (const auto& u : actt_unaries()) {
    for (auto [d, tol] : {std::pair{kFloat32, 1e-6}, std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
      const Tensor xd = x.to(d);
      const auto xdv = mixprec::testing::to_doubles(xd);
      const auto yv = mixprec::testing::to_doubles(u.op(xd).to(kFloat32));
      std::vector<double> got, ref;
      for (std::size_t i = 0; i < xdv.size(); ++i) {
        if (std::isnan(xdv[i])) {  // every activation propagates NaN (relu's reference would not)
          EXPECT_TRUE(std::isnan(yv[i])) << u.name << " " << name(d);
          continue;
        }
        const double r = static_cast<double>(static_cast<float>(u.ref(xdv[i])));
        if (!std::isfinite(r) || !std::isfinite(yv[i])) {
          // bf16/half overflow of a finite float result is not a mismatch.
          const bool same = (std::isnan(r) && std::isnan(yv[i])) || r == yv[i] || (d != kFloat32 && std::isinf(yv[i]) && std::isfinite(r));
          EXPECT_TRUE(same) << u.name << " " << name(d) << " at " << xdv[i] << ": " << yv[i] << " vs " << r;
          continue;
        }
        got.push_back(yv[i]);
        ref.push_back(u.ref(xdv[i]));
      }
      EXPECT_LT(mixprec::testing::rel_error(actt_from(got, {static_cast<int64_t>(got.size())}, kFloat64), ref), tol) << u.name << " " << name(d);
    }
  }
}

// Softmax reads and writes 16-bit directly with float32 math: against float64 on rows with
// large logits and masked -inf, and a NaN logit makes its row NaN.
TEST(Softmax, SixteenBitAgainstFloat64WithMasksAndNaN) {
  Generator g(40);
  const int64_t R = 6, D = 203;  // odd length: vector body and tail
  std::vector<double> xs = mixprec::testing::to_doubles(mul(randn({R, D}, kFloat32, g), 8.0));
  for (int64_t i = 0; i < D; i += 3) xs[1 * D + i] = -INFINITY;
  xs[2 * D + 5] = 1e4;
  for (auto [d, tol] : {std::pair{kFloat32, 1e-6}, std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    const Tensor x = actt_from(xs, {R, D}, d);
    const auto xv = mixprec::testing::to_doubles(x);
    for (bool log : {false, true}) {
      const Tensor y = log ? log_softmax(x, 1) : softmax(x, 1);
      EXPECT_EQ(y.dtype(), d);
      const auto ref = actt_naive_softmax(xv, {R, D}, 1, log);
      if (log) {  // compare the finite entries (masked ones are -inf in both)
        const auto yv = mixprec::testing::to_doubles(y);
        std::vector<double> got, want;
        for (std::size_t i = 0; i < ref.size(); ++i) {
          if (std::isinf(ref[i])) {
            EXPECT_EQ(yv[i], ref[i]);
            continue;
          }
          got.push_back(yv[i]);
          want.push_back(ref[i]);
        }
        EXPECT_LT(mixprec::testing::rel_error(actt_from(got, {static_cast<int64_t>(got.size())}, kFloat64), want), tol) << name(d);
      } else {
        EXPECT_LT(mixprec::testing::rel_error(y, ref), tol) << name(d);
        const auto yv = mixprec::testing::to_doubles(y);
        for (int64_t i = 0; i < D; i += 3) EXPECT_EQ(yv[1 * D + i], 0.0);  // exact zeros
      }
    }
  }
  std::vector<double> xn = xs;
  xn[3 * D + 7] = NAN;
  const auto yn = mixprec::testing::to_doubles(softmax(actt_from(xn, {R, D}, kBFloat16), 1));
  for (int64_t i = 0; i < D; ++i) EXPECT_TRUE(std::isnan(yn[3 * D + i])) << i;
  EXPECT_FALSE(std::isnan(yn[4 * D]));
}
