#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

using namespace mixprec;

namespace {
Tensor leaf(const Shape& s, DType d = kFloat64, uint64_t seed = 1) {
  Generator g(seed);
  Tensor t = randn(s, d, g);
  t.requires_grad_();
  return t;
}
}  // namespace

TEST(Autograd, ScalarBackwardAndAccumulation) {
  Tensor x = leaf({3});
  Tensor y = sum(mul(x, x));
  y.backward();
  Tensor expected = mul(x.detach(), 2.0);
  EXPECT_EQ(std::memcmp(x.grad().data_ptr(), expected.data_ptr(), 24), 0);
  // A second graph accumulates into .grad, as PyTorch.
  sum(mul(x, 3.0)).backward();
  for (int i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(x.grad().data<double>()[i], expected.data<double>()[i] + 3.0);
}

TEST(Autograd, ExplicitGradientForNonScalar) {
  Tensor x = leaf({2, 2});
  Tensor y = mul(x, 2.0);
  EXPECT_THROW(y.backward(), Error);  // non-scalar needs a gradient
  y = mul(x, 2.0);
  y.backward(full({2, 2}, 0.5, kFloat64));
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(x.grad().data<double>()[i], 1.0);
  EXPECT_THROW(mul(x, 2.0).backward(ones({3}, kFloat64)), Error);  // wrong shape
}

TEST(Autograd, DiamondGraphSumsBothPaths) {
  Tensor x = leaf({4});
  Tensor a = exp(x);
  Tensor y = sum(add(mul(a, a), a));  // d/dx = 2 e^{2x} + e^x
  y.backward();
  for (int i = 0; i < 4; ++i) {
    const double v = x.data<double>()[i];
    EXPECT_NEAR(x.grad().data<double>()[i], 2 * std::exp(2 * v) + std::exp(v), 1e-12);
  }
}

TEST(Autograd, RetainGraphAllowsSecondBackwardOtherwiseClearError) {
  Tensor x = leaf({3});
  Tensor y = sum(mul(exp(x), x));
  y.backward(Tensor(), /*retain_graph=*/true);
  Tensor g1 = x.grad().clone();
  y.backward();
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(x.grad().data<double>()[i], 2 * g1.data<double>()[i], 1e-12);
  try {
    y.backward();
    FAIL() << "second backward through a freed graph must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("second time"), std::string::npos) << e.what();
  }
}

TEST(Autograd, NoGradAndDetachStopTheGraph) {
  Tensor x = leaf({3});
  {
    no_grad ng;
    Tensor y = mul(x, x);
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
    {
      enable_grad eg;
      EXPECT_TRUE(mul(x, x).requires_grad());
    }
  }
  Tensor d = x.detach();
  EXPECT_FALSE(d.requires_grad());
  EXPECT_EQ(d.storage(), x.storage());
  Tensor y = sum(mul(d, x));  // only the x path carries gradient
  y.backward();
  for (int i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(x.grad().data<double>()[i], x.data<double>()[i]);
  EXPECT_THROW(sum(d).backward(), Error);  // nothing requires grad
}

TEST(Autograd, InPlaceChecks) {
  Tensor x = leaf({3});
  EXPECT_THROW(x.fill_(1.0), Error);  // leaf that requires grad
  Tensor a = randn({3}, kFloat64);
  Tensor y = mul(x, a);  // saves a
  a.fill_(2.0);          // a changes after being saved
  try {
    sum(y).backward();
    FAIL() << "modified saved tensor must be detected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("in-place"), std::string::npos) << e.what();
  }
  {
    no_grad ng;
    EXPECT_NO_THROW(x.fill_(0.5));  // optimizers update leaves under no_grad
  }
}

TEST(Autograd, RetainGradOnIntermediate) {
  Tensor x = leaf({3});
  Tensor h = mul(x, 3.0);
  h.retain_grad();
  sum(mul(h, h)).backward();
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(h.grad().data<double>()[i], 2 * h.data<double>()[i], 1e-12);
}

TEST(Autograd, GradientsArriveInLeafDType) {
  Tensor w = randn({4, 3});
  w.requires_grad_();
  Tensor x = randn({2, 3}).to(kBFloat16);
  Tensor y = matmul(x, w.to(kBFloat16).t());  // cast is differentiable
  EXPECT_EQ(y.dtype(), kBFloat16);
  sum(y).backward();
  ASSERT_TRUE(w.grad().defined());
  EXPECT_EQ(w.grad().dtype(), kFloat32);
  EXPECT_EQ(w.grad().sizes(), w.sizes());
}

TEST(Autograd, GraphIsFreedAfterEachStep) {
  // A training step of a small MLP: allocated bytes return to the same baseline every step.
  Generator g(3);
  Tensor w1 = mul(randn({16, 8}, kFloat32, g), 0.3), w2 = mul(randn({1, 16}, kFloat32, g), 0.3);
  w1.requires_grad_();
  w2.requires_grad_();
  const Tensor x = randn({32, 8}, kFloat32, g), t = randn({32, 1}, kFloat32, g);
  auto step = [&] {
    Tensor h = relu(linear(x, w1));
    Tensor out = linear(h, w2);
    Tensor d = sub(out, t);
    Tensor loss = mean(mul(d, d));
    loss.backward();
    no_grad ng;
    for (Tensor* p : {&w1, &w2}) {
      Tensor upd = mul(p->grad(), 0.01);
      p->copy_(sub(*p, upd));
      p->set_grad(Tensor());
    }
  };
  step();
  const int64_t baseline = memory_stats().allocated_bytes;
  for (int i = 0; i < 5; ++i) {
    step();
    EXPECT_EQ(memory_stats().allocated_bytes, baseline) << "step " << i;
  }
}

TEST(Autograd, LeafGraphReleasedWhenOutputsDie) {
  Tensor x = leaf({100});
  const int64_t before = memory_stats().allocated_bytes;
  {
    Tensor y = exp(mul(x, 2.0));  // saves tensors
    EXPECT_GT(memory_stats().allocated_bytes, before);
  }
  EXPECT_EQ(memory_stats().allocated_bytes, before);  // no cycle keeps them alive
}

TEST(Gradcheck, DetectsAWrongGradient) {
  // A deliberately wrong backward must be caught: gradcheck is not vacuous.
  Tensor x = leaf({5});
  auto wrong = [](const std::vector<Tensor>& in) {
    const Tensor& a = in[0];
    Tensor out = detail::unary_kernel("wrong", a, [](auto v) { return v * v; });
    if (autograd::should_record({a}))
      autograd::record("wrong", {a}, {out}, [sa = autograd::SavedTensor(a)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        return {mul(g[0], sa.get("wrong"))};  // should be 2x
      });
    return out;
  };
  EXPECT_FALSE(gradcheck(wrong, {x}).ok);
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return mul(in[0], in[0]); }, {x}).ok);
  Tensor f = randn({3});
  f.requires_grad_();
  EXPECT_THROW(gradcheck([](const std::vector<Tensor>& in) { return in[0]; }, {f}), Error);  // needs float64
}
