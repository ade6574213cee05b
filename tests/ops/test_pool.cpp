#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

#include <cmath>
#include <limits>
#include <vector>

using namespace mixprec;

namespace {

using PI2 = std::array<int64_t, 2>;

// Output length straight from the PyTorch docs: floor or ceil of the fraction, then drop a
// last window that would start in the right padding.
int64_t poolt_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const double frac = static_cast<double>(in + 2 * p - d * (k - 1) - 1) / static_cast<double>(s);
  int64_t out = static_cast<int64_t>(ceil_mode ? std::ceil(frac) : std::floor(frac)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

struct PooltCfg {
  int64_t P, H, W;
  PI2 k, s, p, d;
  bool ceil_mode;
};

std::vector<PooltCfg> poolt_configs() {
  return {
      {6, 8, 8, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false},  {4, 7, 9, {3, 3}, {2, 2}, {1, 1}, {1, 1}, false},
      {3, 7, 6, {3, 2}, {2, 1}, {1, 1}, {2, 1}, true},   {5, 5, 5, {2, 2}, {2, 2}, {0, 0}, {1, 1}, true},
      {2, 5, 5, {3, 3}, {3, 3}, {1, 1}, {1, 1}, true},   {2, 11, 10, {4, 3}, {3, 2}, {2, 1}, {2, 3}, false},
      {70, 6, 6, {3, 3}, {1, 1}, {1, 1}, {1, 1}, false},
  };
}

// Max over the window's positions that fall inside the input (padding never wins).
std::vector<double> poolt_ref_max(const std::vector<double>& x, const PooltCfg& c, int64_t OH, int64_t OW) {
  std::vector<double> y;
  for (int64_t pl = 0; pl < c.P; ++pl)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t i = 0; i < c.k[0]; ++i)
          for (int64_t j = 0; j < c.k[1]; ++j) {
            const int64_t ih = oh * c.s[0] - c.p[0] + i * c.d[0], iw = ow * c.s[1] - c.p[1] + j * c.d[1];
            if (ih >= 0 && ih < c.H && iw >= 0 && iw < c.W) m = std::max(m, x[(pl * c.H + ih) * c.W + iw]);
          }
        y.push_back(m);
      }
  return y;
}

// Mean over the window; with count_include_pad the divisor counts the padded positions
// (but not the ceil-mode overhang past the padding).
std::vector<double> poolt_ref_avg(const std::vector<double>& x, const PooltCfg& c, int64_t OH, int64_t OW, bool include_pad) {
  std::vector<double> y;
  for (int64_t pl = 0; pl < c.P; ++pl)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        double s = 0;
        int64_t valid = 0, padded = 0;
        for (int64_t i = 0; i < c.k[0]; ++i)
          for (int64_t j = 0; j < c.k[1]; ++j) {
            const int64_t ih = oh * c.s[0] - c.p[0] + i, iw = ow * c.s[1] - c.p[1] + j;
            if (ih >= -c.p[0] && ih < c.H + c.p[0] && iw >= -c.p[1] && iw < c.W + c.p[1]) ++padded;
            if (ih >= 0 && ih < c.H && iw >= 0 && iw < c.W) {
              s += x[(pl * c.H + ih) * c.W + iw];
              ++valid;
            }
          }
        y.push_back(valid == 0 ? 0.0 : s / static_cast<double>(include_pad ? padded : valid));
      }
  return y;
}

}  // namespace

TEST(MaxPool2d, OutputSizesFollowPyTorch) {
  EXPECT_EQ(max_pool2d(randn({1, 1, 6, 6}), {3, 3}, {2, 2}, {1, 1}).sizes(), (Shape{1, 1, 3, 3}));
  EXPECT_EQ(max_pool2d(randn({1, 1, 6, 6}), {3, 3}, {2, 2}, {1, 1}, {1, 1}, true).sizes(), (Shape{1, 1, 4, 4}));
  // Ceil mode drops the window that would start in the right padding: 5 -> 2, not 3.
  EXPECT_EQ(max_pool2d(randn({1, 1, 5, 5}), {3, 3}, {3, 3}, {1, 1}, {1, 1}, true).sizes(), (Shape{1, 1, 2, 2}));
  EXPECT_EQ(max_pool2d(randn({2, 3, 5, 7}), {2, 2}).sizes(), (Shape{2, 3, 2, 3}));  // stride defaults to the kernel
  EXPECT_EQ(max_pool2d(randn({2, 3, 5, 7}), {2, 2}, {0, 0}, {0, 0}, {1, 1}, true).sizes(), (Shape{2, 3, 3, 4}));
  // ResNet stem: 112 -> 56.
  EXPECT_EQ(max_pool2d(randn({1, 2, 112, 112}), {3, 3}, {2, 2}, {1, 1}).sizes(), (Shape{1, 2, 56, 56}));
}

TEST(MaxPool2d, ForwardMatchesNaiveLoops) {
  for (const auto& c : poolt_configs()) {
    const Tensor x = randn({2, c.P, c.H, c.W});
    PooltCfg cc = c;
    cc.P = 2 * c.P;
    const int64_t OH = poolt_out(c.H, c.k[0], c.s[0], c.p[0], c.d[0], c.ceil_mode), OW = poolt_out(c.W, c.k[1], c.s[1], c.p[1], c.d[1], c.ceil_mode);
    const auto [y, idx] = max_pool2d_with_indices(x, c.k, c.s, c.p, c.d, c.ceil_mode);
    EXPECT_EQ(y.sizes(), (Shape{x.size(0), x.size(1), OH, OW}));
    EXPECT_EQ(y.dtype(), kFloat32);
    EXPECT_EQ(mixprec::testing::rel_error(y, poolt_ref_max(mixprec::testing::to_doubles(x), cc, OH, OW)), 0.0);
    // Each index points at the value it reports.
    const std::vector<double> xv = mixprec::testing::to_doubles(x), yv = mixprec::testing::to_doubles(y);
    const Tensor ic = idx.contiguous();
    for (int64_t k = 0; k < y.numel(); ++k) {
      const int64_t plane = k / (OH * OW), at = ic.data<int64_t>()[k];
      ASSERT_GE(at, 0);
      ASSERT_LT(at, c.H * c.W);
      EXPECT_EQ(xv[plane * c.H * c.W + at], yv[k]);
    }
  }
}

TEST(MaxPool2d, NaNWinsAndAllInfiniteWindowsPointInside) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  // As PyTorch: any NaN wins over larger values, and the last NaN seen gives the index.
  Tensor x = tensor({1.f, nan, 5.f, nan, 0.f, 2.f}, {1, 1, 2, 3});
  auto [y, idx] = max_pool2d_with_indices(x, {2, 3});
  EXPECT_TRUE(std::isnan(y.item<float>()));
  EXPECT_EQ(idx.item<int64_t>(), 3);
  // Neighbouring windows without a NaN are unaffected.
  auto [y2, idx2] = max_pool2d_with_indices(tensor({nan, 1.f, 7.f, 3.f}, {1, 1, 1, 4}), {1, 2});
  EXPECT_TRUE(std::isnan(y2.data<float>()[0]));
  EXPECT_EQ(y2.data<float>()[1], 7.f);
  EXPECT_EQ(idx2.data<int64_t>()[1], 2);
  // A window of -inf (here partly padding) reports its first real position.
  auto [y3, idx3] = max_pool2d_with_indices(full({1, 1, 3, 3}, -inf), {2, 2}, {2, 2}, {1, 1});
  EXPECT_EQ(y3.data<float>()[3], -inf);
  EXPECT_EQ(idx3.data<int64_t>()[0], 0);
  EXPECT_EQ(idx3.data<int64_t>()[3], 4);  // window rows 1-2, cols 1-2
  // Ties: the first maximum in row-major window order.
  auto [y4, idx4] = max_pool2d_with_indices(ones({1, 1, 2, 2}), {2, 2});
  EXPECT_EQ(idx4.item<int64_t>(), 0);
}

TEST(MaxPool2d, GradcheckIncludingOverlapAndNonContiguous) {
  for (const auto& c : poolt_configs()) {
    if (c.P > 10) continue;
    Tensor x = randn({1, c.P, c.H, c.W}, kFloat64).requires_grad_();
    auto r = gradcheck([&](const std::vector<Tensor>& in) { return max_pool2d(in[0], c.k, c.s, c.p, c.d, c.ceil_mode); }, {x});
    EXPECT_TRUE(r.ok) << r.message;
  }
  Tensor xt = randn({2, 3, 7, 6}, kFloat64).requires_grad_();  // pooled as [2, 3, 6, 7]
  auto r = gradcheck([](const std::vector<Tensor>& in) { return max_pool2d(in[0].transpose(2, 3), {3, 3}, {2, 2}, {1, 1}); }, {xt});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(MaxPool2d, OverlappingWindowsAccumulateGradient) {
  // One large value is the max of all four overlapping windows: it gets 4x the gradient.
  Tensor x = zeros({1, 1, 3, 3});
  x.data<float>()[4] = 5.f;
  x.requires_grad_();
  sum(max_pool2d(x, {2, 2}, {1, 1})).backward();
  EXPECT_EQ(x.grad().data<float>()[4], 4.f);
  EXPECT_EQ(sum(x.grad()).item<float>(), 4.f);
}

TEST(MaxPool2d, LowPrecisionAndUnbatched) {
  const Tensor x = randn({4, 8, 15, 15});
  for (DType dt : {kBFloat16, kFloat16}) {
    Tensor xl = x.to(dt).requires_grad_();
    const Tensor y = max_pool2d(xl, {3, 3}, {2, 2}, {1, 1});
    EXPECT_EQ(y.dtype(), dt);
    // Max is exact: the same as float32 on the rounded input.
    Tensor x32 = xl.detach().to(kFloat32).requires_grad_();
    const Tensor y32 = max_pool2d(x32, {3, 3}, {2, 2}, {1, 1});
    EXPECT_EQ(mixprec::testing::rel_error(y, mixprec::testing::to_doubles(y32)), 0.0);
    const Tensor gy = randn(y.sizes());
    y.backward(gy.to(dt));
    y32.backward(gy.to(dt).to(kFloat32));
    EXPECT_EQ(xl.grad().dtype(), dt);
    EXPECT_LT(mixprec::testing::rel_error(xl.grad(), mixprec::testing::to_doubles(x32.grad())), dt == kBFloat16 ? 1e-2 : 2e-3);
  }
  const Tensor y3 = max_pool2d(x.select(0, 1), {3, 3}, {2, 2}, {1, 1});
  EXPECT_EQ(y3.sizes(), (Shape{8, 8, 8}));
  EXPECT_EQ(mixprec::testing::rel_error(y3, mixprec::testing::to_doubles(max_pool2d(x, {3, 3}, {2, 2}, {1, 1}).select(0, 1))), 0.0);
}

TEST(MaxPool2d, BadArgumentsThrow) {
  const Tensor x = randn({1, 2, 5, 5});
  EXPECT_THROW(max_pool2d(x, {0, 2}), Error);
  EXPECT_THROW(max_pool2d(x, {2, 2}, {1, 1}, {2, 0}), Error);            // padding > kernel / 2
  EXPECT_THROW(max_pool2d(x, {6, 6}), Error);                            // window larger than the input
  EXPECT_THROW(max_pool2d(x, {3, 3}, {1, 1}, {0, 0}, {3, 3}), Error);    // dilated window too
  EXPECT_THROW(max_pool2d(x, {2, 2}, {0, 1}), Error);                    // half-default stride
  EXPECT_THROW(max_pool2d(x, {2, 2}, {1, 1}, {0, 0}, {0, 1}), Error);
  EXPECT_THROW(max_pool2d(randn({5, 5}), {2, 2}), Error);
  EXPECT_THROW(max_pool2d(randn({1, 1, 1, 5, 5}), {2, 2}), Error);
  EXPECT_THROW(max_pool2d(zeros({1, 2, 0, 5}), {1, 1}), Error);
  EXPECT_THROW(max_pool2d(x.to(kInt64), {2, 2}), Error);
}

TEST(AvgPool2d, ForwardMatchesNaiveLoops) {
  for (const auto& c : poolt_configs()) {
    if (c.d[0] != 1 || c.d[1] != 1) continue;
    const Tensor x = randn({1, c.P, c.H, c.W});
    const int64_t OH = poolt_out(c.H, c.k[0], c.s[0], c.p[0], 1, c.ceil_mode), OW = poolt_out(c.W, c.k[1], c.s[1], c.p[1], 1, c.ceil_mode);
    for (bool include_pad : {true, false}) {
      const Tensor y = avg_pool2d(x, c.k, c.s, c.p, c.ceil_mode, include_pad);
      EXPECT_EQ(y.sizes(), (Shape{1, c.P, OH, OW}));
      EXPECT_LT(mixprec::testing::rel_error(y, poolt_ref_avg(mixprec::testing::to_doubles(x), c, OH, OW, include_pad)), 1e-6) << "include_pad=" << include_pad;
    }
  }
}

TEST(AvgPool2d, CountIncludePadChangesOnlyBorderDivisors) {
  const Tensor x = ones({1, 1, 4, 4});
  const auto with = mixprec::testing::to_doubles(avg_pool2d(x, {3, 3}, {1, 1}, {1, 1}, false, true));
  const auto without = mixprec::testing::to_doubles(avg_pool2d(x, {3, 3}, {1, 1}, {1, 1}, false, false));
  EXPECT_FLOAT_EQ(static_cast<float>(with[0]), 4.0f / 9.0f);  // corner: 4 real of 9
  EXPECT_DOUBLE_EQ(with[5], 1.0);        // interior
  for (double v : without) EXPECT_DOUBLE_EQ(v, 1.0);
}

TEST(AvgPool2d, GradcheckIncludingNonContiguous) {
  for (const auto& c : poolt_configs()) {
    if (c.d[0] != 1 || c.d[1] != 1 || c.P > 10) continue;
    for (bool include_pad : {true, false}) {
      Tensor x = randn({1, c.P, c.H, c.W}, kFloat64).requires_grad_();
      auto r = gradcheck([&](const std::vector<Tensor>& in) { return avg_pool2d(in[0], c.k, c.s, c.p, c.ceil_mode, include_pad); }, {x});
      EXPECT_TRUE(r.ok) << r.message;
    }
  }
  Tensor xt = randn({3, 2, 6, 9}, kFloat64).requires_grad_();
  auto r = gradcheck([](const std::vector<Tensor>& in) { return avg_pool2d(in[0].slice(3, 0, 9, 2), {2, 2}, {1, 2}, {1, 1}, true, false); },
                     {xt});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(AvgPool2d, LowPrecisionAndUnbatched) {
  const Tensor x = randn({3, 5, 14, 14});
  const Tensor y32 = avg_pool2d(x, {3, 3}, {2, 2}, {1, 1});
  for (auto [dt, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    Tensor xl = x.to(dt).requires_grad_();
    const Tensor y = avg_pool2d(xl, {3, 3}, {2, 2}, {1, 1});
    EXPECT_EQ(y.dtype(), dt);
    EXPECT_LT(mixprec::testing::rel_error(y, mixprec::testing::to_doubles(y32)), tol) << name(dt);
    sum(y.to(kFloat32)).backward();
    EXPECT_EQ(xl.grad().dtype(), dt);
  }
  EXPECT_LT(mixprec::testing::rel_error(avg_pool2d(x.select(0, 2), {3, 3}, {2, 2}, {1, 1}), mixprec::testing::to_doubles(y32.select(0, 2))), 1e-7);
}

TEST(AvgPool2d, BadArgumentsThrow) {
  const Tensor x = randn({1, 2, 5, 5});
  EXPECT_THROW(avg_pool2d(x, {2, 2}, {1, 1}, {2, 2}), Error);
  EXPECT_THROW(avg_pool2d(x, {6, 2}), Error);
  EXPECT_THROW(avg_pool2d(x, {2, 2}, {-1, 1}), Error);
  EXPECT_THROW(avg_pool2d(randn({2, 5}), {2, 2}), Error);
}

namespace {
std::vector<double> poolt_ref_adaptive(const std::vector<double>& x, int64_t P, int64_t H, int64_t W, int64_t OH, int64_t OW) {
  std::vector<double> y;
  for (int64_t pl = 0; pl < P; ++pl)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        const auto hs = static_cast<int64_t>(std::floor(static_cast<double>(oh * H) / OH));
        const auto he = static_cast<int64_t>(std::ceil(static_cast<double>((oh + 1) * H) / OH));
        const auto ws = static_cast<int64_t>(std::floor(static_cast<double>(ow * W) / OW));
        const auto we = static_cast<int64_t>(std::ceil(static_cast<double>((ow + 1) * W) / OW));
        double s = 0;
        for (int64_t ih = hs; ih < he; ++ih)
          for (int64_t iw = ws; iw < we; ++iw) s += x[(pl * H + ih) * W + iw];
        y.push_back(s / static_cast<double>((he - hs) * (we - ws)));
      }
  return y;
}
}  // namespace

TEST(AdaptiveAvgPool2d, ForwardMatchesNaiveLoops) {
  struct Cfg {
    int64_t H, W, OH, OW;
  };
  for (const Cfg& c : {Cfg{7, 7, 1, 1}, Cfg{10, 9, 3, 4}, Cfg{5, 6, 5, 6}, Cfg{3, 4, 7, 5}, Cfg{13, 8, 4, 3}}) {
    const Tensor x = randn({2, 3, c.H, c.W});
    const Tensor y = adaptive_avg_pool2d(x, {c.OH, c.OW});
    EXPECT_EQ(y.sizes(), (Shape{2, 3, c.OH, c.OW}));
    EXPECT_LT(mixprec::testing::rel_error(y, poolt_ref_adaptive(mixprec::testing::to_doubles(x), 6, c.H, c.W, c.OH, c.OW)), 1e-6);
  }
  // Global average pooling equals the mean over H, W.
  const Tensor x = randn({4, 5, 7, 7});
  EXPECT_LT(mixprec::testing::rel_error(adaptive_avg_pool2d(x, {1, 1}).reshape({4, 5}), mixprec::testing::to_doubles(mean(x, {2, 3}))), 1e-6);
}

TEST(AdaptiveAvgPool2d, GradcheckIncludingNonContiguous) {
  Tensor x = randn({2, 2, 7, 5}, kFloat64).requires_grad_();
  auto r = gradcheck([](const std::vector<Tensor>& in) { return adaptive_avg_pool2d(in[0], {3, 2}); }, {x});
  EXPECT_TRUE(r.ok) << r.message;
  auto r2 = gradcheck([](const std::vector<Tensor>& in) { return adaptive_avg_pool2d(in[0].transpose(2, 3), {4, 3}); }, {x});
  EXPECT_TRUE(r2.ok) << r2.message;
}

TEST(AdaptiveAvgPool2d, LowPrecisionAndUnbatched) {
  const Tensor x = randn({4, 16, 7, 7});
  const Tensor y32 = adaptive_avg_pool2d(x, {1, 1});
  for (auto [dt, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    Tensor xl = x.to(dt).requires_grad_();
    const Tensor y = adaptive_avg_pool2d(xl, {1, 1});
    EXPECT_EQ(y.dtype(), dt);
    EXPECT_LT(mixprec::testing::rel_error(y, mixprec::testing::to_doubles(y32)), tol) << name(dt);
    sum(y.to(kFloat32)).backward();
    EXPECT_EQ(xl.grad().dtype(), dt);
    EXPECT_LT(mixprec::testing::rel_error(xl.grad(), std::vector<double>(static_cast<std::size_t>(x.numel()), 1.0 / 49)), tol) << name(dt);
  }
  EXPECT_EQ(adaptive_avg_pool2d(x.select(0, 0), {2, 3}).sizes(), (Shape{16, 2, 3}));
}

TEST(AdaptiveAvgPool2d, BadArgumentsThrow) {
  EXPECT_THROW(adaptive_avg_pool2d(randn({1, 2, 5, 5}), {0, 1}), Error);
  EXPECT_THROW(adaptive_avg_pool2d(randn({5, 5}), {1, 1}), Error);
  EXPECT_THROW(adaptive_avg_pool2d(zeros({1, 2, 5, 0}), {1, 1}), Error);
  EXPECT_THROW(adaptive_avg_pool2d(randn({1, 2, 5, 5}).to(kInt32), {1, 1}), Error);
}
