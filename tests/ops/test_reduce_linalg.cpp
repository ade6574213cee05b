#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using namespace mixprec::testing;

namespace {
Tensor rl_leaf(const Shape& s, uint64_t seed = 5) {
  Generator g(seed);
  Tensor t = randn(s, kFloat64, g);
  t.requires_grad_();
  return t;
}
}  // namespace

TEST(Reduce, SumMeanVarNormMatchReference) {
  Tensor x = randn({4, 5, 6});
  auto X = x.accessor<float, 3>();
  std::vector<double> s1, m02, v2;
  for (int i = 0; i < 4; ++i)
    for (int k = 0; k < 6; ++k) {
      double s = 0;
      for (int j = 0; j < 5; ++j) s += X[i][j][k];
      s1.push_back(s);
    }
  for (int j = 0; j < 5; ++j) {
    double s = 0;
    for (int i = 0; i < 4; ++i)
      for (int k = 0; k < 6; ++k) s += X[i][j][k];
    m02.push_back(s / 24);
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 5; ++j) {
      double m = 0, ss = 0;
      for (int k = 0; k < 6; ++k) m += X[i][j][k];
      m /= 6;
      for (int k = 0; k < 6; ++k) ss += (X[i][j][k] - m) * (X[i][j][k] - m);
      v2.push_back(ss / 5);
    }
  EXPECT_LT(rel_error(sum(x, {1}), s1), 1e-6);
  EXPECT_EQ(sum(x, {1}, true).sizes(), (Shape{4, 1, 6}));
  EXPECT_LT(rel_error(mean(x, {0, 2}), m02), 1e-6);
  EXPECT_LT(rel_error(var(x, {-1}), v2), 1e-5);
  double sq = 0;
  for (int64_t i = 0; i < x.numel(); ++i) sq += double(x.data<float>()[i]) * x.data<float>()[i];
  EXPECT_NEAR(norm(x).item<double>(), std::sqrt(sq), 1e-4);
  EXPECT_EQ(sum(ones({3}, kInt32)).dtype(), kInt64);
  EXPECT_EQ(sum(ones({3}, kInt32)).item<int64_t>(), 3);
}

TEST(Reduce, MaxMinArgmax) {
  Tensor x = tensor(std::vector<float>{1, 5, 3, 9, 2, 4}, {2, 3});
  auto [v, i] = max(x, 1);
  EXPECT_EQ(v.data<float>()[0], 5.0f);
  EXPECT_EQ(v.data<float>()[1], 9.0f);
  EXPECT_EQ(i.data<int64_t>()[0], 1);
  EXPECT_EQ(i.data<int64_t>()[1], 0);
  auto [mv, mi] = min(x, 0, true);
  EXPECT_EQ(mv.sizes(), (Shape{1, 3}));
  EXPECT_EQ(mv.data<float>()[1], 2.0f);
  EXPECT_EQ(argmax(x).item<int64_t>(), 3);
  EXPECT_EQ(max(x).item<float>(), 9.0f);
  EXPECT_THROW(max(zeros({0})), Error);
}

TEST(Reduce, GradchecksIncludingNonContiguous) {
  Tensor x = rl_leaf({3, 4, 5});
  auto check = [&](const char* name, std::function<Tensor(const Tensor&)> f) {
    auto r = gradcheck([&](const std::vector<Tensor>& in) { return f(in[0]); }, {x});
    EXPECT_TRUE(r.ok) << name << "\n" << r.message;
    auto r2 = gradcheck([&](const std::vector<Tensor>& in) { return f(in[0].transpose(0, 2)); }, {x});
    EXPECT_TRUE(r2.ok) << name << " (transposed)\n" << r2.message;
  };
  check("sum_all", [](const Tensor& t) { return sum(t); });
  check("sum_dim", [](const Tensor& t) { return sum(t, {1}, true); });
  check("mean", [](const Tensor& t) { return mean(t, {0, 2}); });
  check("var", [](const Tensor& t) { return var(t, {2}); });
  check("var_biased", [](const Tensor& t) { return var(t, {0}, 0, true); });
  check("norm2", [](const Tensor& t) { return norm(t, 2.0, {1}); });
  check("norm1", [](const Tensor& t) { return norm(t, 1.0, {2}); });
  check("norm3", [](const Tensor& t) { return norm(t, 3.0); });
  check("max_dim", [](const Tensor& t) { return max(t, 1).first; });
  check("min_dim", [](const Tensor& t) { return min(t, 2, true).first; });
  check("max_all", [](const Tensor& t) { return max(t); });
}

TEST(Reduce, LowPrecisionInputsAccumulateInWideType) {
  // 4096 ones in bfloat16: a bfloat16 accumulator would stall at 256.
  EXPECT_EQ(sum(ones({4096}, kBFloat16)).item<float>(), 4096.0f);
  Tensor x = randn({64, 100});
  for (DType d : {kBFloat16, kFloat16}) {
    EXPECT_LT(rel_error(mean(x.to(d), {1}), mean(x, {1})), low_tolerance(d));
    EXPECT_LT(rel_error(var(x.to(d), {1}), var(x, {1})), 2 * low_tolerance(d));
    EXPECT_LT(rel_error(norm(x.to(d), 2.0, {0}), norm(x, 2.0, {0})), low_tolerance(d));
  }
}

TEST(Linalg, MatmulShapesAndReference) {
  Tensor a = randn({2, 3, 4}), b = randn({4, 5});
  Tensor c = matmul(a, b);
  ASSERT_EQ(c.sizes(), (Shape{2, 3, 5}));
  std::vector<double> ref;
  auto A = a.accessor<float, 3>();
  auto B = b.accessor<float, 2>();
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 5; ++j) {
        double s = 0;
        for (int k = 0; k < 4; ++k) s += double(A[n][i][k]) * B[k][j];
        ref.push_back(s);
      }
  EXPECT_LT(rel_error(c, ref), 1e-6);
  EXPECT_EQ(matmul(randn({4}), randn({4})).dim(), 0);
  EXPECT_EQ(matmul(randn({4}), randn({4, 2})).sizes(), (Shape{2}));
  EXPECT_EQ(matmul(randn({3, 4}), randn({4})).sizes(), (Shape{3}));
  EXPECT_EQ(matmul(randn({2, 1, 3, 4}), randn({5, 4, 6})).sizes(), (Shape{2, 5, 3, 6}));
  EXPECT_THROW(matmul(randn({3, 4}), randn({5, 2})), Error);
  EXPECT_THROW(mm(randn({3}), randn({3, 2})), Error);
  EXPECT_THROW(bmm(randn({2, 3, 4}), randn({3, 4, 2})), Error);
  EXPECT_THROW(matmul(randn({3, 4}), randn({4, 2}).to(kBFloat16)), Error);  // mixed dtypes need autocast
}

TEST(Linalg, Gradchecks) {
  Tensor a = rl_leaf({2, 3, 4}, 1), b = rl_leaf({4, 5}, 2), bb = rl_leaf({2, 4, 5}, 3), v = rl_leaf({4}, 4);
  auto ok = [](const char* n, const GradcheckResult& r) { EXPECT_TRUE(r.ok) << n << "\n" << r.message; };
  ok("matmul_broadcast", gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); }, {a, b}));
  ok("matmul_vec", gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); }, {a, v}));
  ok("matmul_vecvec", gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[0]); }, {v}));
  ok("bmm", gradcheck([](const std::vector<Tensor>& in) { return bmm(in[0], in[1]); }, {a, bb}));
  ok("bmm_transposed", gradcheck([](const std::vector<Tensor>& in) { return bmm(in[0], in[1].transpose(1, 2).transpose(1, 2)); }, {a, bb}));
  Tensor m = rl_leaf({3, 4}, 5), n = rl_leaf({5, 4}, 6), bias = rl_leaf({5}, 7), mb = rl_leaf({3, 5}, 8);
  ok("mm_nt", gradcheck([](const std::vector<Tensor>& in) { return mm(in[0], in[1].t()); }, {m, n}));
  ok("addmm", gradcheck([](const std::vector<Tensor>& in) { return addmm(in[0], in[1], in[2].t(), 0.5, 2.0); }, {mb, m, n}));
  ok("baddbmm", gradcheck([](const std::vector<Tensor>& in) { return baddbmm(in[0], in[1], in[2]); }, {rl_leaf({2, 3, 5}, 9), a, bb}));
  ok("linear", gradcheck([](const std::vector<Tensor>& in) { return linear(in[0], in[1], in[2]); }, {a, n, bias}));
  ok("linear_nobias_noncontig", gradcheck([](const std::vector<Tensor>& in) { return linear(in[0].transpose(0, 1), in[1]); }, {rl_leaf({3, 2, 4}, 10), n}));
}

TEST(Linalg, LowPrecisionAccumulatesInFloat32) {
  Tensor a = randn({37, 300}), b = randn({300, 41});
  const Tensor ref = matmul(a, b);
  for (DType d : {kBFloat16, kFloat16}) {
    Tensor c = matmul(a.to(d), b.to(d));
    EXPECT_EQ(c.dtype(), d);
    // Inputs rounded to d, products accumulated in float32, one rounding on store.
    const Tensor exact = matmul(a.to(d).to(kFloat32), b.to(d).to(kFloat32));
    EXPECT_LT(rel_error(c, exact), d == kBFloat16 ? 4e-3 : 5e-4);
    EXPECT_LT(rel_error(c, ref), low_tolerance(d) * 2);
  }
  Tensor x = randn({8, 16}), w = randn({12, 16}), bias = randn({12});
  for (DType d : {kBFloat16, kFloat16})
    EXPECT_LT(rel_error(linear(x.to(d), w.to(d), bias.to(d)), linear(x, w, bias)), low_tolerance(d) * 2);
}
