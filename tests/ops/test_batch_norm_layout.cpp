// Batch norm on channels-last activations (backends/cpu/batch_norm_nhwc.hpp) against float64
// formulas, in float32 and bfloat16, with a mean far from zero (where a one-pass variance fails).
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cpu/batch_norm_nhwc.hpp>  // the kernels it tests directly (also in the compiled mode)

#include "ops/op_test_util.hpp"

#include <cmath>
#include <vector>

using namespace mixprec;

namespace {
struct BnRef {
  std::vector<double> y, dx, dw, db, mean, invstd, rm, rv;
};
// The definition in double, x and g given as [N, C, H, W] values (logical order).
BnRef bn_reference(const std::vector<double>& x, const std::vector<double>& g, const std::vector<double>& w, const std::vector<double>& b,
                   int64_t N, int64_t C, int64_t S, double eps, double momentum) {
  BnRef r;
  const double M = static_cast<double>(N * S);
  r.y.resize(x.size());
  r.dx.resize(x.size());
  for (int64_t c = 0; c < C; ++c) {
    double m = 0, v = 0, sg = 0, sgx = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) m += x[(n * C + c) * S + s];
    m /= M;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) v += (x[(n * C + c) * S + s] - m) * (x[(n * C + c) * S + s] - m);
    const double istd = 1 / std::sqrt(v / M + eps);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const std::size_t i = static_cast<std::size_t>((n * C + c) * S + s);
        r.y[i] = (x[i] - m) * istd * w[c] + b[c];
        sg += g[i];
        sgx += g[i] * (x[i] - m) * istd;
      }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const std::size_t i = static_cast<std::size_t>((n * C + c) * S + s);
        r.dx[i] = w[c] * istd * (g[i] - sg / M - (x[i] - m) * istd * sgx / M);
      }
    r.dw.push_back(sgx);
    r.db.push_back(sg);
    r.mean.push_back(m);
    r.invstd.push_back(istd);
    r.rm.push_back(0.9 * 0.5 + 0.1 * m);
    r.rv.push_back(0.9 * 2.0 + 0.1 * v / (M - 1));
  }
  return r;
}
}  // namespace

TEST(BatchNormChannelsLast, KernelsMatchFloat64Definition) {
  const int64_t N = 6, C = 24, H = 7, W = 5;
  for (DType d : {kFloat32, kBFloat16, kFloat16}) {
    // Offset 100: float32 sums of squares would lose the variance (std ~1, mean^2 ~1e4).
    const Tensor x64 = add(randn({N, C, H, W}, kFloat64), 100.0).to(d).to(kFloat64);
    const Tensor g64 = randn({N, C, H, W}, kFloat64).to(d).to(kFloat64);
    const Tensor w = randn({C}), b = randn({C});
    const BnRef ref = bn_reference(mixprec::testing::to_doubles(x64), mixprec::testing::to_doubles(g64), mixprec::testing::to_doubles(w),
                                   mixprec::testing::to_doubles(b), N, C, H * W, 1e-5, 0.1);
    const Tensor x = x64.to(d).contiguous(MemoryFormat::ChannelsLast), g = g64.to(d).contiguous(MemoryFormat::ChannelsLast);
    Tensor rm = full({C}, 0.5), rv = full({C}, 2.0);
    const auto [y, mean, invstd] = cpu::bn_nhwc::forward(x, w, b, rm, rv, true, 0.1, 1e-5);
    EXPECT_TRUE(y.is_contiguous(MemoryFormat::ChannelsLast));
    EXPECT_EQ(y.dtype(), d);
    const double tol = d == kFloat32 ? 1e-5 : d == kBFloat16 ? 1e-2 : 2e-3;
    EXPECT_LT(mixprec::testing::rel_error(y, ref.y), tol) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(mean, ref.mean), 1e-6) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(invstd, ref.invstd), 1e-5) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(rm, ref.rm), 1e-6) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(rv, ref.rv), 1e-5) << name(d);
    const auto [dx, dw, db] = cpu::bn_nhwc::backward(x, g, w, mean, invstd);
    EXPECT_TRUE(dx.is_contiguous(MemoryFormat::ChannelsLast));
    EXPECT_LT(mixprec::testing::rel_error(dx, ref.dx), d == kFloat32 ? 1e-4 : tol) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(dw, ref.dw), 1e-4) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(db, ref.db), 1e-5) << name(d);
    // Eval: the running statistics.
    const auto [ye, rm_seen, rstd_seen] = cpu::bn_nhwc::forward(x, w, b, rm, rv, false, 0.1, 1e-5);
    EXPECT_EQ(mixprec::testing::rel_error(rm_seen, rm), 0.0);
    std::vector<double> yref(ref.y.size());
    const std::vector<double> xv = mixprec::testing::to_doubles(x64), rmv = mixprec::testing::to_doubles(rm),
                              rvv = mixprec::testing::to_doubles(rv), wv = mixprec::testing::to_doubles(w), bv = mixprec::testing::to_doubles(b);
    for (std::size_t i = 0; i < yref.size(); ++i) {
      const std::size_t c = (i / (H * W)) % C;
      yref[i] = (xv[i] - rmv[c]) / std::sqrt(rvv[c] + 1e-5) * wv[c] + bv[c];
    }
    EXPECT_LT(mixprec::testing::rel_error(ye, yref), tol) << name(d);
  }
}

// The op: a channels-last input stays channels-last through forward and backward and gives the
// NCHW run's values (the float64 NCHW kernels as the reference), in training and eval mode.
TEST(BatchNormChannelsLast, OpKeepsLayoutAndMatchesNchw) {
  const int64_t N = 4, C = 16, H = 6, W = 6;
  const Tensor x64 = randn({N, C, H, W}, kFloat64), g64 = randn({N, C, H, W}, kFloat64);
  const Tensor w0 = randn({C}), b0 = randn({C});
  for (bool training : {true, false})
    for (DType d : {kFloat32, kBFloat16, kFloat64}) {
      auto run = [&](DType dt, MemoryFormat f) {
        Tensor x = x64.to(dt).contiguous(f).detach().requires_grad_();
        Tensor w = w0.clone().requires_grad_(), b = b0.clone().requires_grad_();
        Tensor rm = full({C}, 0.25), rv = full({C}, 1.5);
        Tensor y = batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5);
        y.backward(g64.to(dt));
        return std::vector<Tensor>{y, x.grad(), w.grad(), b.grad(), rm, rv};
      };
      const auto ref = run(kFloat64, MemoryFormat::Contiguous);
      const auto cl = run(d, MemoryFormat::ChannelsLast);
      const double tol = d == kFloat64 ? 1e-12 : d == kFloat32 ? 1e-5 : 1e-2;
      EXPECT_TRUE(cl[0].is_contiguous(MemoryFormat::ChannelsLast)) << name(d) << " training=" << training;
      for (std::size_t i = 0; i < ref.size(); ++i)
        EXPECT_LT(mixprec::testing::rel_error(cl[i], ref[i]), tol) << name(d) << " training=" << training << " result " << i;
    }
}
