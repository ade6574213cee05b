#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using namespace mixprec::testing;

namespace {
using BinaryFn = Tensor (*)(const Tensor&, const Tensor&);
struct BinaryCase {
  const char* name;
  std::function<Tensor(const Tensor&, const Tensor&)> fn;
  std::function<double(double, double)> ref;
  bool positive_b;  // keep b away from 0 (div) / a positive (pow)
};
std::vector<BinaryCase> ew_binary_cases() {
  return {
      {"add", [](const Tensor& a, const Tensor& b) { return add(a, b); }, [](double a, double b) { return a + b; }, false},
      {"sub", [](const Tensor& a, const Tensor& b) { return sub(a, b); }, [](double a, double b) { return a - b; }, false},
      {"mul", [](const Tensor& a, const Tensor& b) { return mul(a, b); }, [](double a, double b) { return a * b; }, false},
      {"div", [](const Tensor& a, const Tensor& b) { return div(a, b); }, [](double a, double b) { return a / b; }, true},
      {"pow", [](const Tensor& a, const Tensor& b) { return pow(a, b); }, [](double a, double b) { return std::pow(a, b); }, true},
      {"maximum", [](const Tensor& a, const Tensor& b) { return maximum(a, b); }, [](double a, double b) { return std::max(a, b); }, false},
      {"minimum", [](const Tensor& a, const Tensor& b) { return minimum(a, b); }, [](double a, double b) { return std::min(a, b); }, false},
  };
}
Tensor ew_positive(Tensor t) { return add(abs(t), 0.5); }
}  // namespace

TEST(Elementwise, BinaryOpsMatchReferenceWithBroadcasting) {
  for (const auto& c : ew_binary_cases()) {
    Tensor a = randn({3, 1, 4}), b = randn({5, 1});
    if (c.positive_b) {
      a = ew_positive(a);
      b = ew_positive(b);
    }
    Tensor out = c.fn(a, b);
    ASSERT_EQ(out.sizes(), (Shape{3, 5, 4})) << c.name;
    auto A = a.accessor<float, 3>();
    auto B = b.accessor<float, 2>();
    std::vector<double> ref;
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 5; ++j)
        for (int k = 0; k < 4; ++k) ref.push_back(c.ref(A[i][0][k], B[j][0]));
    EXPECT_LT(rel_error(out, ref), 1e-6) << c.name;
  }
}

TEST(Elementwise, BinaryGradcheckBroadcastAndNonContiguous) {
  for (const auto& c : ew_binary_cases()) {
    Tensor a = randn({4, 3}, kFloat64), b = randn({3}, kFloat64);
    if (c.positive_b) {
      a = ew_positive(a);
      b = ew_positive(b);
    }
    a.requires_grad_();
    b.requires_grad_();
    auto r = gradcheck([&](const std::vector<Tensor>& in) { return c.fn(in[0], in[1]); }, {a, b});
    EXPECT_TRUE(r.ok) << c.name << "\n" << r.message;
    // Non-contiguous: a transposed view.
    Tensor at = randn({3, 4}, kFloat64);
    if (c.positive_b) at = ew_positive(at);
    Tensor t = at.t();
    Tensor leaf_t = at.clone();
    leaf_t.requires_grad_();
    auto r2 = gradcheck([&](const std::vector<Tensor>& in) { return c.fn(in[0].t(), in[1]); }, {leaf_t, b});
    EXPECT_TRUE(r2.ok) << c.name << " (transposed)\n" << r2.message;
  }
}

TEST(Elementwise, LowPrecisionMatchesFloat32) {
  for (const auto& c : ew_binary_cases()) {
    Tensor a = randn({64, 33}), b = randn({33});
    if (c.positive_b) {
      a = ew_positive(a);
      b = ew_positive(b);
    }
    const Tensor ref = c.fn(a, b);
    for (DType d : {kBFloat16, kFloat16}) {
      Tensor out = c.fn(a.to(d), b.to(d));
      EXPECT_EQ(out.dtype(), d) << c.name;
      EXPECT_LT(rel_error(out, ref), low_tolerance(d)) << c.name << " " << d;
    }
    // Mixed dtypes promote to the wider one.
    EXPECT_EQ(c.fn(a.to(kBFloat16), b).dtype(), kFloat32) << c.name;
    EXPECT_EQ(c.fn(a.to(kBFloat16), b.to(kFloat16)).dtype(), kFloat32) << c.name;
  }
}

namespace {
struct UnaryCase {
  const char* name;
  std::function<Tensor(const Tensor&)> fn;
  std::function<double(double)> ref;
  bool positive;
};
std::vector<UnaryCase> ew_unary_cases() {
  return {
      {"neg", [](const Tensor& x) { return neg(x); }, [](double v) { return -v; }, false},
      {"exp", [](const Tensor& x) { return exp(x); }, [](double v) { return std::exp(v); }, false},
      {"log", [](const Tensor& x) { return log(x); }, [](double v) { return std::log(v); }, true},
      {"sqrt", [](const Tensor& x) { return sqrt(x); }, [](double v) { return std::sqrt(v); }, true},
      {"rsqrt", [](const Tensor& x) { return rsqrt(x); }, [](double v) { return 1 / std::sqrt(v); }, true},
      {"abs", [](const Tensor& x) { return abs(x); }, [](double v) { return std::fabs(v); }, false},
      {"pow_scalar", [](const Tensor& x) { return pow(x, 2.5); }, [](double v) { return std::pow(v, 2.5); }, true},
      {"clamp", [](const Tensor& x) { return clamp(x, -0.5, 0.7); }, [](double v) { return std::clamp(v, -0.5, 0.7); }, false},
      {"add_scalar", [](const Tensor& x) { return add(x, 1.5); }, [](double v) { return v + 1.5; }, false},
      {"mul_scalar", [](const Tensor& x) { return mul(x, -3.0); }, [](double v) { return v * -3.0; }, false},
      {"div_scalar", [](const Tensor& x) { return div(x, 4.0); }, [](double v) { return v / 4.0; }, false},
  };
}
}  // namespace

TEST(Elementwise, UnaryOpsReferenceGradcheckAndLowPrecision) {
  for (const auto& c : ew_unary_cases()) {
    Tensor x = randn({7, 5});
    if (c.positive) x = ew_positive(x);
    std::vector<double> ref;
    for (int64_t i = 0; i < x.numel(); ++i) ref.push_back(c.ref(x.data<float>()[i]));
    EXPECT_LT(rel_error(c.fn(x), ref), 1e-6) << c.name;
    for (DType d : {kBFloat16, kFloat16}) {
      Tensor out = c.fn(x.to(d));
      EXPECT_EQ(out.dtype(), d) << c.name;
      EXPECT_LT(rel_error(out, c.fn(x)), low_tolerance(d)) << c.name << " " << d;
    }
    Tensor x64 = randn({4, 6}, kFloat64);
    if (c.positive) x64 = ew_positive(x64);
    // Keep clamp's kinks away from the finite-difference stencil.
    Tensor leaf_x = x64.clone();
    leaf_x.requires_grad_();
    auto r = gradcheck([&](const std::vector<Tensor>& in) { return c.fn(in[0].t()); }, {leaf_x});
    EXPECT_TRUE(r.ok) << c.name << "\n" << r.message;
  }
}

TEST(Elementwise, WhereMaskedFillAndComparisons) {
  Tensor a = randn({3, 4}, kFloat64), b = randn({4}, kFloat64);
  Tensor cond = gt(a, 0.0);
  EXPECT_EQ(cond.dtype(), kBool);
  Tensor w = where(cond, a, b);
  auto A = a.accessor<double, 2>();
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j)
      EXPECT_EQ((w.accessor<double, 2>()[i][j]), A[i][j] > 0 ? A[i][j] : b.data<double>()[j]);
  a.requires_grad_();
  b.requires_grad_();
  EXPECT_TRUE(gradcheck([&](const std::vector<Tensor>& in) { return where(cond, in[0], in[1]); }, {a, b}).ok);
  Tensor m = lt(randn({3, 1}), 0.0);
  Tensor mf = masked_fill(a.detach(), m, -7.0);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j)
      EXPECT_EQ((mf.accessor<double, 2>()[i][j]), m.data<bool>()[i] ? -7.0 : A[i][j]);
  EXPECT_TRUE(gradcheck([&](const std::vector<Tensor>& in) { return masked_fill(in[0], m, 2.0); }, {a}).ok);
  EXPECT_THROW(where(a.detach(), a, b), Error);  // condition must be bool
  EXPECT_THROW(masked_fill(a.detach(), ones({5}, kBool), 0.0), Error);
  EXPECT_EQ(eq(tensor({1.f, 2.f}), tensor({1.f, 3.f})).data<bool>()[1], false);
}

TEST(Elementwise, ShapeErrorsNameOpAndShapes) {
  try {
    add(ones({2, 3}), ones({4}));
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("add"), std::string::npos) << m;
    EXPECT_NE(m.find("[2, 3]"), std::string::npos) << m;
    EXPECT_NE(m.find("[4]"), std::string::npos) << m;
  }
  EXPECT_THROW(exp(ones({2}, kInt64)), Error);
}

TEST(Elementwise, NaNPropagates) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Tensor a = tensor({nan, 1.f});
  EXPECT_TRUE(std::isnan(maximum(a, tensor({0.f, 0.f})).data<float>()[0]));
  EXPECT_TRUE(std::isnan(clamp(a, 0.0, 1.0).data<float>()[0]));
  EXPECT_TRUE(std::isnan(float(relu(a.to(kBFloat16)).data<bfloat16>()[0])));
  EXPECT_TRUE(std::isnan(sum(a).item<float>()));
}

// A unary op's backward keeps alive only the tensor its derivative reads: the output for relu,
// sigmoid, tanh, exp, sqrt and rsqrt, the input for gelu, silu, log and abs. The op's input here
// is an intermediate (x * 2, whose own backward saves only x and the scalar), so it is freed
// when its handle goes unless the op saved it.
TEST(Elementwise, UnaryOpsSaveOnlyTheTensorTheirGradientReads) {
  using Op = std::function<Tensor(const Tensor&)>;
  const std::vector<std::pair<const char*, Op>> from_y = {
      {"relu", [](const Tensor& t) { return relu(t); }},       {"sigmoid", [](const Tensor& t) { return sigmoid(t); }},
      {"tanh", [](const Tensor& t) { return mixprec::tanh(t); }}, {"exp", [](const Tensor& t) { return mixprec::exp(t); }},
      {"sqrt", [](const Tensor& t) { return mixprec::sqrt(t); }}, {"rsqrt", [](const Tensor& t) { return rsqrt(t); }}};
  const std::vector<std::pair<const char*, Op>> from_x = {
      {"gelu", [](const Tensor& t) { return gelu(t); }},          {"gelu_tanh", [](const Tensor& t) { return gelu(t, "tanh"); }},
      {"silu", [](const Tensor& t) { return silu(t); }},          {"log", [](const Tensor& t) { return mixprec::log(t); }},
      {"abs", [](const Tensor& t) { return mixprec::abs(t); }}};
  for (DType d : {kFloat32, kBFloat16}) {
    const Tensor x = add(abs(randn({4096})), 0.5).to(d).requires_grad_();
    const int64_t bytes = x.nbytes();
    for (bool keeps_y : {true, false}) {
      for (const auto& [name_, op] : keeps_y ? from_y : from_x) {
        const int64_t before = memory_stats().allocated_bytes;
        Tensor y;
        {
          const Tensor h = mul(x, 2.0);
          y = op(h);
        }
        // Live now: y, and h only when the op saved its input (plus mul's 0-dim scalar).
        const int64_t live = memory_stats().allocated_bytes - before;
        EXPECT_LT(live, (keeps_y ? 1 : 2) * bytes + 64) << name_ << " " << name(d);
        EXPECT_GE(live, (keeps_y ? 1 : 2) * bytes) << name_ << " " << name(d);
        // The gradient is still right: d op(2x)/dx = 2 op'(2x).
        sum(y).backward();
        Tensor x64 = x.detach().to(kFloat64).requires_grad_();
        sum(op(mul(x64, 2.0))).backward();
        // bf16: tanh's 1 - y^2 from a saved y near 1 cancels (as it did when x was saved too).
        EXPECT_LT(mixprec::testing::rel_error(x.grad(), x64.grad()), d == kFloat32 ? 1e-6 : 3e-2) << name_ << " " << name(d);
        x.set_grad(Tensor());
      }
    }
  }
}
