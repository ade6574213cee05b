#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cpu/conv.hpp>  // the kernels it tests directly (also in the compiled mode)

#include "ops/op_test_util.hpp"

#include <cmath>
#include <vector>

using namespace mixprec;

namespace {

using ConvtI2 = std::array<int64_t, 2>;

struct ConvtCfg {
  int64_t N, C, H, W, O, KH, KW;
  ConvtI2 stride, padding, dilation;
  int64_t groups;
};

// Plain float64 contents of any tensor, in logical (row-major) order.
int64_t convt_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) { return (in + 2 * p - d * (k - 1) - 1) / s + 1; }

// Direct convolution: the definition, one multiply-add at a time, in double.
std::vector<double> convt_ref_forward(const ConvtCfg& c, const std::vector<double>& x, const std::vector<double>& w,
                                      const std::vector<double>* b) {
  const int64_t OH = convt_out(c.H, c.KH, c.stride[0], c.padding[0], c.dilation[0]);
  const int64_t OW = convt_out(c.W, c.KW, c.stride[1], c.padding[1], c.dilation[1]);
  const int64_t Cg = c.C / c.groups, Og = c.O / c.groups;
  std::vector<double> y(static_cast<std::size_t>(c.N * c.O * OH * OW), 0.0);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t o = 0; o < c.O; ++o)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          double s = b ? (*b)[o] : 0.0;
          const int64_t gi = o / Og;
          for (int64_t ci = 0; ci < Cg; ++ci)
            for (int64_t i = 0; i < c.KH; ++i)
              for (int64_t j = 0; j < c.KW; ++j) {
                const int64_t ih = oh * c.stride[0] - c.padding[0] + i * c.dilation[0];
                const int64_t iw = ow * c.stride[1] - c.padding[1] + j * c.dilation[1];
                if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
                s += x[((n * c.C + gi * Cg + ci) * c.H + ih) * c.W + iw] * w[((o * Cg + ci) * c.KH + i) * c.KW + j];
              }
          y[((n * c.O + o) * OH + oh) * OW + ow] = s;
        }
  return y;
}

// The same loops, transposed: gradients of sum(gy * conv(x, w) + b).
void convt_ref_backward(const ConvtCfg& c, const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& gy,
                        std::vector<double>& gx, std::vector<double>& gw, std::vector<double>& gb) {
  const int64_t OH = convt_out(c.H, c.KH, c.stride[0], c.padding[0], c.dilation[0]);
  const int64_t OW = convt_out(c.W, c.KW, c.stride[1], c.padding[1], c.dilation[1]);
  const int64_t Cg = c.C / c.groups, Og = c.O / c.groups;
  gx.assign(x.size(), 0.0);
  gw.assign(w.size(), 0.0);
  gb.assign(static_cast<std::size_t>(c.O), 0.0);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t o = 0; o < c.O; ++o)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const double g = gy[((n * c.O + o) * OH + oh) * OW + ow];
          gb[o] += g;
          const int64_t gi = o / Og;
          for (int64_t ci = 0; ci < Cg; ++ci)
            for (int64_t i = 0; i < c.KH; ++i)
              for (int64_t j = 0; j < c.KW; ++j) {
                const int64_t ih = oh * c.stride[0] - c.padding[0] + i * c.dilation[0];
                const int64_t iw = ow * c.stride[1] - c.padding[1] + j * c.dilation[1];
                if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
                const std::size_t xi = ((n * c.C + gi * Cg + ci) * c.H + ih) * c.W + iw;
                const std::size_t wi = ((o * Cg + ci) * c.KH + i) * c.KW + j;
                gx[xi] += g * w[wi];
                gw[wi] += g * x[xi];
              }
        }
}

// Configurations that reach every kernel path: batched small images (several samples per
// GEMM), one sample per chunk, a single sample (threads inside the GEMM), 1x1 pointwise,
// groups, stride, padding, dilation, rectangular kernels, depthwise.
std::vector<ConvtCfg> convt_configs() {
  return {
      {4, 3, 7, 6, 5, 3, 3, {1, 1}, {1, 1}, {1, 1}, 1},
      {3, 4, 9, 8, 6, 3, 2, {2, 1}, {1, 0}, {1, 2}, 2},
      {1, 6, 12, 11, 4, 3, 3, {2, 2}, {2, 1}, {2, 1}, 1},
      {8, 8, 4, 4, 16, 1, 1, {1, 1}, {0, 0}, {1, 1}, 1},
      {2, 8, 24, 24, 16, 1, 1, {1, 1}, {0, 0}, {1, 1}, 2},
      {2, 6, 10, 10, 6, 3, 3, {1, 1}, {1, 1}, {1, 1}, 6},
      {5, 4, 23, 25, 8, 5, 3, {3, 2}, {2, 1}, {1, 1}, 4},
      {2, 3, 5, 5, 4, 2, 2, {2, 2}, {0, 0}, {1, 1}, 1},
  };
}

Tensor convt_rand(const Shape& s, DType d = kFloat32) { return randn(s, kFloat64).to(d); }

}  // namespace

TEST(Conv2d, ForwardMatchesDirectConvolution) {
  for (const auto& c : convt_configs()) {
    const Tensor x = convt_rand({c.N, c.C, c.H, c.W}), w = convt_rand({c.O, c.C / c.groups, c.KH, c.KW}), b = convt_rand({c.O});
    const std::vector<double> xv = mixprec::testing::to_doubles(x), wv = mixprec::testing::to_doubles(w), bv = mixprec::testing::to_doubles(b);
    const Tensor y = conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    const int64_t OH = convt_out(c.H, c.KH, c.stride[0], c.padding[0], c.dilation[0]);
    const int64_t OW = convt_out(c.W, c.KW, c.stride[1], c.padding[1], c.dilation[1]);
    EXPECT_EQ(y.sizes(), (Shape{c.N, c.O, OH, OW}));
    EXPECT_EQ(y.dtype(), kFloat32);
    EXPECT_LT(mixprec::testing::rel_error(y, convt_ref_forward(c, xv, wv, &bv)), 1e-5) << "config N=" << c.N << " C=" << c.C << " groups=" << c.groups;
    // Without bias.
    EXPECT_LT(mixprec::testing::rel_error(conv2d(x, w, Tensor(), c.stride, c.padding, c.dilation, c.groups), convt_ref_forward(c, xv, wv, nullptr)), 1e-5);
  }
}

TEST(Conv2d, LargeBatchOfSmallImagesBatchesTheGemm) {
  // 16 samples of 3x3 output: several samples share one GEMM; every output must still land in
  // its own sample and channel.
  const ConvtCfg c{16, 5, 5, 5, 7, 3, 3, {1, 1}, {0, 0}, {1, 1}, 1};
  const Tensor x = convt_rand({c.N, c.C, c.H, c.W}), w = convt_rand({c.O, c.C, 3, 3}), b = convt_rand({c.O});
  const std::vector<double> xv = mixprec::testing::to_doubles(x), wv = mixprec::testing::to_doubles(w), bv = mixprec::testing::to_doubles(b);
  EXPECT_LT(mixprec::testing::rel_error(conv2d(x, w, b), convt_ref_forward(c, xv, wv, &bv)), 1e-5);
}

TEST(Conv2d, BackwardMatchesDirectReferenceInFloat32) {
  for (const auto& c : convt_configs()) {
    Tensor x = convt_rand({c.N, c.C, c.H, c.W}), w = convt_rand({c.O, c.C / c.groups, c.KH, c.KW}), b = convt_rand({c.O});
    x.requires_grad_();
    w.requires_grad_();
    b.requires_grad_();
    const Tensor y = conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    const Tensor gy = convt_rand(y.sizes());
    y.backward(gy);
    std::vector<double> gx, gw, gb;
    convt_ref_backward(c, mixprec::testing::to_doubles(x), mixprec::testing::to_doubles(w), mixprec::testing::to_doubles(gy), gx, gw, gb);
    EXPECT_EQ(x.grad().dtype(), kFloat32);
    EXPECT_EQ(x.grad().sizes(), x.sizes());
    EXPECT_EQ(w.grad().sizes(), w.sizes());
    EXPECT_EQ(b.grad().sizes(), b.sizes());
    EXPECT_LT(mixprec::testing::rel_error(x.grad(), gx), 1e-5) << "groups=" << c.groups << " N=" << c.N;
    EXPECT_LT(mixprec::testing::rel_error(w.grad(), gw), 1e-5) << "groups=" << c.groups << " N=" << c.N;
    EXPECT_LT(mixprec::testing::rel_error(b.grad(), gb), 1e-5) << "groups=" << c.groups << " N=" << c.N;
  }
}

TEST(Conv2d, Gradcheck) {
  const std::vector<ConvtCfg> cfgs = {
      {2, 2, 5, 4, 3, 3, 3, {1, 1}, {1, 1}, {1, 1}, 1},
      {2, 4, 6, 5, 4, 2, 3, {2, 1}, {1, 2}, {2, 1}, 2},
      {3, 2, 3, 3, 4, 1, 1, {1, 1}, {0, 0}, {1, 1}, 2},
      {1, 3, 4, 4, 3, 3, 3, {2, 2}, {1, 1}, {1, 1}, 3},
  };
  for (const auto& c : cfgs) {
    Tensor x = randn({c.N, c.C, c.H, c.W}, kFloat64).requires_grad_();
    Tensor w = randn({c.O, c.C / c.groups, c.KH, c.KW}, kFloat64).requires_grad_();
    Tensor b = randn({c.O}, kFloat64).requires_grad_();
    auto r = gradcheck([&](const std::vector<Tensor>& in) { return conv2d(in[0], in[1], in[2], c.stride, c.padding, c.dilation, c.groups); },
                       {x, w, b});
    EXPECT_TRUE(r.ok) << "groups=" << c.groups << "\n" << r.message;
  }
}

TEST(Conv2d, GradcheckNonContiguousInputAndWeight) {
  // Input [N, C, W, H] transposed to [N, C, H, W]; weight sliced along out channels.
  Tensor xt = randn({2, 3, 5, 6}, kFloat64).requires_grad_();
  Tensor wb = randn({8, 3, 3, 2}, kFloat64).requires_grad_();
  Tensor b = randn({4}, kFloat64).requires_grad_();
  ASSERT_FALSE(xt.transpose(2, 3).is_contiguous());
  ASSERT_FALSE(wb.slice(0, 0, 8, 2).is_contiguous());
  auto r = gradcheck([](const std::vector<Tensor>& in) {
    return conv2d(in[0].transpose(2, 3), in[1].slice(0, 0, 8, 2), in[2], {2, 1}, {1, 1});
  }, {xt, wb, b});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(Conv2d, UnbatchedInput) {
  Tensor x = randn({3, 6, 5}, kFloat64).requires_grad_();
  Tensor w = randn({4, 3, 3, 3}, kFloat64).requires_grad_();
  const Tensor y = conv2d(x, w, Tensor(), {1, 1}, {1, 1});
  EXPECT_EQ(y.sizes(), (Shape{4, 6, 5}));
  EXPECT_LT(mixprec::testing::rel_error(y, conv2d(x.unsqueeze(0), w, Tensor(), {1, 1}, {1, 1}).squeeze(0)), 1e-12);
  auto r = gradcheck([](const std::vector<Tensor>& in) { return conv2d(in[0], in[1], Tensor(), {1, 1}, {1, 1}); }, {x, w});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(Conv2d, OnlyRequestedGradientsAreComputed) {
  // A frozen input (the first layer's image) or frozen weight: the other gradients still come out right.
  const ConvtCfg c{3, 4, 6, 6, 5, 3, 3, {1, 1}, {1, 1}, {1, 1}, 1};
  Tensor x = convt_rand({c.N, c.C, c.H, c.W}), w = convt_rand({c.O, c.C, 3, 3});
  Tensor wg = w.detach().clone().requires_grad_();
  Tensor y = conv2d(x, wg, Tensor(), c.stride, c.padding);
  const Tensor gy = convt_rand(y.sizes());
  y.backward(gy);
  std::vector<double> gx, gw, gb;
  convt_ref_backward(c, mixprec::testing::to_doubles(x), mixprec::testing::to_doubles(w), mixprec::testing::to_doubles(gy), gx, gw, gb);
  EXPECT_FALSE(x.grad().defined());
  EXPECT_LT(mixprec::testing::rel_error(wg.grad(), gw), 1e-5);
  Tensor xg = x.detach().clone().requires_grad_();
  conv2d(xg, w, Tensor(), c.stride, c.padding).backward(gy);
  EXPECT_LT(mixprec::testing::rel_error(xg.grad(), gx), 1e-5);
}

TEST(Conv2d, LowPrecisionMatchesFloat32) {
  for (const auto& c : convt_configs()) {
    const Tensor x = convt_rand({c.N, c.C, c.H, c.W}), w = convt_rand({c.O, c.C / c.groups, c.KH, c.KW}), b = convt_rand({c.O});
    const Tensor gy = convt_rand({c.N, c.O, convt_out(c.H, c.KH, c.stride[0], c.padding[0], c.dilation[0]),
                                  convt_out(c.W, c.KW, c.stride[1], c.padding[1], c.dilation[1])});
    Tensor x32 = x.detach().clone().requires_grad_(), w32 = w.detach().clone().requires_grad_(), b32 = b.detach().clone().requires_grad_();
    const Tensor y32 = conv2d(x32, w32, b32, c.stride, c.padding, c.dilation, c.groups);
    y32.backward(gy);
    for (auto [dt, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
      Tensor xl = x.to(dt).requires_grad_(), wl = w.to(dt).requires_grad_(), bl = b.to(dt).requires_grad_();
      const Tensor yl = conv2d(xl, wl, bl, c.stride, c.padding, c.dilation, c.groups);
      EXPECT_EQ(yl.dtype(), dt);
      // The reference sees the same rounded operands, so only the kernel's own error counts.
      const Tensor yr = conv2d(xl.detach().to(kFloat32), wl.detach().to(kFloat32), bl.detach().to(kFloat32), c.stride, c.padding,
                               c.dilation, c.groups);
      EXPECT_LT(mixprec::testing::rel_error(yl, yr), tol) << name(dt) << " groups=" << c.groups;
      EXPECT_LT(mixprec::testing::rel_error(yl, y32), tol) << name(dt);
      yl.backward(gy.to(dt));
      EXPECT_EQ(xl.grad().dtype(), dt);
      EXPECT_EQ(wl.grad().dtype(), dt);
      EXPECT_EQ(bl.grad().dtype(), dt);
      EXPECT_LT(mixprec::testing::rel_error(xl.grad(), x32.grad()), tol) << name(dt);
      EXPECT_LT(mixprec::testing::rel_error(wl.grad(), w32.grad()), tol) << name(dt);
      EXPECT_LT(mixprec::testing::rel_error(bl.grad(), b32.grad()), tol) << name(dt);
    }
  }
}

// Every kernel against the float64 definition on the same rounded operands: float32, and 16-bit
// both read directly (gemm_16bit, where the CPU has it) and widened to float32 (the fallback,
// called by name since the choice is made once per process). ResNet-like layers with shifted
// planes (3x3 pad 1, dilated, rectangular), stride 2, 1x1 stride-2 projections, a 1-channel stem,
// channels not a multiple of 16, groups, batch 1.
TEST(Conv2d, EveryKernelMatchesFloat64Reference) {
  const std::vector<ConvtCfg> cfgs = {
      {1, 17, 9, 9, 19, 3, 3, {1, 1}, {1, 1}, {1, 1}, 1},  {3, 16, 14, 14, 32, 3, 3, {2, 2}, {1, 1}, {1, 1}, 1},
      {2, 16, 8, 8, 32, 1, 1, {2, 2}, {0, 0}, {1, 1}, 1},  {4, 1, 28, 28, 16, 3, 3, {1, 1}, {1, 1}, {1, 1}, 1},
      {2, 5, 6, 11, 7, 3, 3, {1, 1}, {1, 1}, {1, 1}, 1},   {2, 4, 9, 9, 5, 3, 3, {1, 1}, {2, 2}, {2, 2}, 1},
      {3, 6, 7, 7, 9, 3, 3, {1, 1}, {1, 1}, {1, 1}, 3},    {2, 3, 8, 8, 4, 5, 5, {1, 1}, {2, 2}, {1, 1}, 1},
      {64, 3, 5, 5, 4, 3, 3, {1, 1}, {1, 1}, {1, 1}, 1},
  };
  for (const auto& c : cfgs) {
    const int64_t OH = convt_out(c.H, c.KH, c.stride[0], c.padding[0], c.dilation[0]);
    const int64_t OW = convt_out(c.W, c.KW, c.stride[1], c.padding[1], c.dilation[1]);
    detail::ConvGeom g;
    g.N = c.N, g.C = c.C, g.H = c.H, g.W = c.W, g.O = c.O, g.OH = OH, g.OW = OW, g.KH = c.KH, g.KW = c.KW, g.G = c.groups;
    g.SH = c.stride[0], g.SW = c.stride[1], g.PH = c.padding[0], g.PW = c.padding[1], g.DH = c.dilation[0], g.DW = c.dilation[1];
    for (auto [dt, tol] : {std::pair{kFloat32, 1e-6}, std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 1e-3}}) {
      const Tensor x = convt_rand({c.N, c.C, c.H, c.W}, dt), w = convt_rand({c.O, c.C / c.groups, c.KH, c.KW}, dt),
                   b = convt_rand({c.O}, dt), gy = convt_rand({c.N, c.O, OH, OW}, dt);
      const auto xv = mixprec::testing::to_doubles(x), wv = mixprec::testing::to_doubles(w), bv = mixprec::testing::to_doubles(b);
      std::vector<double> gx, gw, gb;
      convt_ref_backward(c, xv, wv, mixprec::testing::to_doubles(gy), gx, gw, gb);
      const auto yref = convt_ref_forward(c, xv, wv, &bv);
      const std::string where = std::string(name(dt)) + " N=" + std::to_string(c.N) + " C=" + std::to_string(c.C) +
                                " H=" + std::to_string(c.H) + " k=" + std::to_string(c.KH) + " groups=" + std::to_string(c.groups);
      EXPECT_LT(mixprec::testing::rel_error(detail::conv_forward(g, x, w, b), yref), tol) << where;
      EXPECT_LT(mixprec::testing::rel_error(detail::conv_backward_input(g, gy, w), gx), tol) << where;
      EXPECT_LT(mixprec::testing::rel_error(detail::conv_backward_weight(g, x, gy, kFloat32), gw), tol) << where;
      if (dt == kFloat32) continue;
      dispatch_floating(dt, "test", [&]<class T>() {
        if constexpr (cpu::conv_impl::conv_reads_16bit<T>) {
          // The widened fallback, whatever this CPU picks for the public path.
          const Tensor w32 = w.to(kFloat32), b32 = b.to(kFloat32);
          Tensor y = empty({c.N, c.O, OH, OW}, dt), gxl = empty(x.sizes(), dt), gwl = zeros(w.sizes(), kFloat32);
          cpu::conv_impl::conv_forward_kernel<T, float>(g, x.data<T>(), w32.data<float>(), b32.data<float>(), y.data<T>());
          cpu::conv_impl::conv_backward_input_kernel<T, float>(g, gy.data<T>(), w32.data<float>(), nullptr, gxl.data<T>());
          cpu::conv_impl::conv_backward_weight_kernel<T, float>(g, x.data<T>(), gy.data<T>(), gwl.data<float>());
          EXPECT_LT(mixprec::testing::rel_error(y, yref), tol) << "widened " << where;
          EXPECT_LT(mixprec::testing::rel_error(gxl, gx), tol) << "widened " << where;
          EXPECT_LT(mixprec::testing::rel_error(gwl, gw), tol) << "widened " << where;
        }
      });
    }
  }
}

TEST(Conv2d, AutocastRunsInLowerPrecision) {
  Tensor x = convt_rand({2, 3, 8, 8}), w = convt_rand({4, 3, 3, 3}).requires_grad_(), b = convt_rand({4}).requires_grad_();
  Tensor y;
  {
    autocast ac(Device::CPU, kBFloat16);
    y = conv2d(x, w, b, {1, 1}, {1, 1});
  }
  EXPECT_EQ(y.dtype(), kBFloat16);
  EXPECT_LT(mixprec::testing::rel_error(y, conv2d(x, w, b, {1, 1}, {1, 1})), 2e-2);
  sum(y.to(kFloat32)).backward();
  EXPECT_EQ(w.grad().dtype(), kFloat32);
  EXPECT_EQ(b.grad().dtype(), kFloat32);
}

TEST(Conv2d, EmptyBatch) {
  Tensor x = zeros({0, 3, 5, 5}), w = convt_rand({4, 3, 3, 3}).requires_grad_(), b = convt_rand({4}).requires_grad_();
  Tensor y = conv2d(x, w, b);
  EXPECT_EQ(y.sizes(), (Shape{0, 4, 3, 3}));
  sum(y).backward();
  EXPECT_EQ(w.grad().sizes(), w.sizes());
  for (double v : mixprec::testing::to_doubles(w.grad())) EXPECT_EQ(v, 0.0);
  for (double v : mixprec::testing::to_doubles(b.grad())) EXPECT_EQ(v, 0.0);
}

TEST(Conv2d, BadArgumentsThrow) {
  const Tensor x = randn({2, 4, 5, 5});
  // Channel mismatch.
  EXPECT_THROW(conv2d(x, randn({6, 3, 3, 3})), Error);
  // groups must divide both channel counts.
  EXPECT_THROW(conv2d(x, randn({6, 2, 3, 3}), Tensor(), {1, 1}, {0, 0}, {1, 1}, 3), Error);
  EXPECT_THROW(conv2d(x, randn({5, 2, 3, 3}), Tensor(), {1, 1}, {0, 0}, {1, 1}, 2), Error);
  EXPECT_THROW(conv2d(x, randn({4, 4, 3, 3}), Tensor(), {1, 1}, {0, 0}, {1, 1}, 0), Error);
  // Kernel larger than the padded input (also through dilation).
  EXPECT_THROW(conv2d(x, randn({6, 4, 7, 3})), Error);
  EXPECT_NO_THROW(conv2d(x, randn({6, 4, 7, 3}), Tensor(), {1, 1}, {1, 0}));
  EXPECT_THROW(conv2d(x, randn({6, 4, 3, 3}), Tensor(), {1, 1}, {0, 0}, {3, 1}), Error);
  // Bad ranks, strides, padding, bias, dtypes.
  EXPECT_THROW(conv2d(randn({4, 5}), randn({6, 4, 3, 3})), Error);
  EXPECT_THROW(conv2d(x, randn({6, 4, 3})), Error);
  EXPECT_THROW(conv2d(x, randn({6, 4, 3, 3}), Tensor(), {0, 1}), Error);
  EXPECT_THROW(conv2d(x, randn({6, 4, 3, 3}), Tensor(), {1, 1}, {-1, 0}), Error);
  EXPECT_THROW(conv2d(x, randn({6, 4, 3, 3}), randn({5})), Error);
  EXPECT_THROW(conv2d(x, randn({6, 4, 3, 3}, kFloat64)), Error);
  EXPECT_THROW(conv2d(x.to(kInt64), randn({6, 4, 3, 3}).to(kInt64)), Error);
  try {
    conv2d(x, randn({6, 3, 3, 3}));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("conv2d"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[2, 4, 5, 5]"), std::string::npos) << e.what();
  }
}

// ---------- conv1d ----------
TEST(Conv1d, ForwardMatchesDirectConvolution) {
  struct Cfg {
    int64_t N, C, L, O, K, s, p, d, g;
  };
  for (const Cfg& c : {Cfg{3, 4, 17, 6, 3, 1, 1, 1, 1}, Cfg{2, 6, 20, 9, 4, 2, 3, 2, 3}, Cfg{1, 2, 9, 4, 1, 1, 0, 1, 2}}) {
    const Tensor x = convt_rand({c.N, c.C, c.L}), w = convt_rand({c.O, c.C / c.g, c.K}), b = convt_rand({c.O});
    const std::vector<double> xv = mixprec::testing::to_doubles(x), wv = mixprec::testing::to_doubles(w), bv = mixprec::testing::to_doubles(b);
    const int64_t OL = convt_out(c.L, c.K, c.s, c.p, c.d), Cg = c.C / c.g, Og = c.O / c.g;
    std::vector<double> ref(static_cast<std::size_t>(c.N * c.O * OL));
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t o = 0; o < c.O; ++o)
        for (int64_t ol = 0; ol < OL; ++ol) {
          double s = bv[o];
          for (int64_t ci = 0; ci < Cg; ++ci)
            for (int64_t k = 0; k < c.K; ++k) {
              const int64_t il = ol * c.s - c.p + k * c.d;
              if (il >= 0 && il < c.L) s += xv[(n * c.C + (o / Og) * Cg + ci) * c.L + il] * wv[(o * Cg + ci) * c.K + k];
            }
          ref[(n * c.O + o) * OL + ol] = s;
        }
    const Tensor y = conv1d(x, w, b, c.s, c.p, c.d, c.g);
    EXPECT_EQ(y.sizes(), (Shape{c.N, c.O, OL}));
    EXPECT_LT(mixprec::testing::rel_error(y, ref), 1e-5);
    // Unbatched.
    EXPECT_EQ(conv1d(x.select(0, 0), w, b, c.s, c.p, c.d, c.g).sizes(), (Shape{c.O, OL}));
    EXPECT_LT(mixprec::testing::rel_error(conv1d(x.select(0, 0), w, b, c.s, c.p, c.d, c.g), y.select(0, 0)), 1e-6);
  }
}

TEST(Conv1d, GradcheckIncludingNonContiguousInput) {
  Tensor x = randn({2, 9, 4}, kFloat64).requires_grad_();  // used as [2, 4, 9] through a transpose
  Tensor w = randn({6, 2, 3}, kFloat64).requires_grad_();
  Tensor b = randn({6}, kFloat64).requires_grad_();
  auto r = gradcheck([](const std::vector<Tensor>& in) { return conv1d(in[0].transpose(1, 2), in[1], in[2], 2, 1, 2, 2); }, {x, w, b});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(Conv1d, LowPrecisionMatchesFloat32) {
  const Tensor x = convt_rand({4, 6, 40}), w = convt_rand({8, 6, 5}), b = convt_rand({8});
  const Tensor y32 = conv1d(x, w, b, 1, 2);
  for (auto [dt, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    const Tensor y = conv1d(x.to(dt), w.to(dt), b.to(dt), 1, 2);
    EXPECT_EQ(y.dtype(), dt);
    EXPECT_LT(mixprec::testing::rel_error(y, y32), tol) << name(dt);
  }
}

TEST(Conv1d, BadArgumentsThrow) {
  const Tensor x = randn({2, 4, 10});
  EXPECT_THROW(conv1d(x, randn({3, 5, 3})), Error);                     // channels
  EXPECT_THROW(conv1d(x, randn({3, 2, 3}), Tensor(), 1, 0, 1, 2), Error);  // out channels vs groups
  EXPECT_THROW(conv1d(x, randn({4, 4, 11})), Error);                    // kernel > input
  EXPECT_THROW(conv1d(x, randn({4, 4, 3, 3})), Error);                  // rank
  EXPECT_THROW(conv1d(randn({2, 4, 10, 1}), randn({4, 4, 3})), Error);
}

// ---------- conv_transpose2d ----------
namespace {
// Scatter form of the transposed convolution, straight from the definition.
std::vector<double> convt_ref_transpose(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b,
                                        int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t Coutg, int64_t KH, int64_t KW, ConvtI2 s, ConvtI2 p,
                                        ConvtI2 op, ConvtI2 d, int64_t groups, int64_t& OH, int64_t& OW) {
  OH = (H - 1) * s[0] - 2 * p[0] + d[0] * (KH - 1) + op[0] + 1;
  OW = (W - 1) * s[1] - 2 * p[1] + d[1] * (KW - 1) + op[1] + 1;
  const int64_t Cout = Coutg * groups, Cing = Cin / groups;
  std::vector<double> y(static_cast<std::size_t>(N * Cout * OH * OW), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t k = 0; k < OH * OW; ++k) y[(n * Cout + co) * OH * OW + k] = b[co];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t ci = 0; ci < Cin; ++ci)
      for (int64_t ih = 0; ih < H; ++ih)
        for (int64_t iw = 0; iw < W; ++iw)
          for (int64_t cog = 0; cog < Coutg; ++cog)
            for (int64_t i = 0; i < KH; ++i)
              for (int64_t j = 0; j < KW; ++j) {
                const int64_t oh = ih * s[0] - p[0] + i * d[0], ow = iw * s[1] - p[1] + j * d[1];
                if (oh < 0 || oh >= OH || ow < 0 || ow >= OW) continue;
                const int64_t co = (ci / Cing) * Coutg + cog;
                y[((n * Cout + co) * OH + oh) * OW + ow] += x[((n * Cin + ci) * H + ih) * W + iw] * w[((ci * Coutg + cog) * KH + i) * KW + j];
              }
  return y;
}
}  // namespace

TEST(ConvTranspose2d, ForwardMatchesScatterReference) {
  struct Cfg {
    int64_t N, Cin, H, W, Coutg, KH, KW;
    ConvtI2 s, p, op, d;
    int64_t g;
  };
  for (const Cfg& c : {Cfg{2, 4, 5, 5, 3, 3, 3, {2, 2}, {1, 1}, {1, 1}, {1, 1}, 1}, Cfg{3, 4, 4, 6, 2, 2, 3, {1, 2}, {0, 1}, {0, 1}, {2, 1}, 2},
                      Cfg{1, 3, 7, 3, 2, 1, 1, {1, 1}, {0, 0}, {0, 0}, {1, 1}, 1}, Cfg{6, 2, 2, 2, 4, 4, 4, {2, 2}, {1, 1}, {0, 0}, {1, 1}, 1},
                      Cfg{2, 2, 3, 3, 2, 1, 1, {1, 1}, {0, 0}, {1, 1}, {2, 2}, 1}}) {
    const Tensor x = convt_rand({c.N, c.Cin, c.H, c.W}), w = convt_rand({c.Cin, c.Coutg, c.KH, c.KW}), b = convt_rand({c.Coutg * c.g});
    int64_t OH = 0, OW = 0;
    const auto ref = convt_ref_transpose(mixprec::testing::to_doubles(x), mixprec::testing::to_doubles(w), mixprec::testing::to_doubles(b), c.N, c.Cin, c.H, c.W, c.Coutg, c.KH, c.KW, c.s,
                                         c.p, c.op, c.d, c.g, OH, OW);
    const Tensor y = conv_transpose2d(x, w, b, c.s, c.p, c.op, c.d, c.g);
    EXPECT_EQ(y.sizes(), (Shape{c.N, c.Coutg * c.g, OH, OW}));
    EXPECT_LT(mixprec::testing::rel_error(y, ref), 1e-5);
  }
}

TEST(ConvTranspose2d, IsTheAdjointOfConv2d) {
  // <conv2d(x, w), y> == <x, conv_transpose2d(y, w)>.
  const Tensor x = randn({2, 4, 9, 8}, kFloat64), w = randn({6, 2, 3, 3}, kFloat64);
  const Tensor cx = conv2d(x, w, Tensor(), {2, 2}, {1, 1}, {1, 1}, 2);
  const Tensor y = randn(cx.sizes(), kFloat64);
  const Tensor ty = conv_transpose2d(y, w, Tensor(), {2, 2}, {1, 1}, {0, 1}, {1, 1}, 2);
  ASSERT_EQ(ty.sizes(), x.sizes());
  const double lhs = sum(mul(cx, y)).item<double>(), rhs = sum(mul(x, ty)).item<double>();
  EXPECT_NEAR(lhs, rhs, 1e-9 * std::max(1.0, std::fabs(lhs)));
}

TEST(ConvTranspose2d, GradcheckIncludingNonContiguousInput) {
  Tensor x = randn({2, 4, 4, 3}, kFloat64).requires_grad_();
  Tensor w = randn({4, 2, 3, 2}, kFloat64).requires_grad_();
  Tensor b = randn({4}, kFloat64).requires_grad_();
  auto r = gradcheck([](const std::vector<Tensor>& in) { return conv_transpose2d(in[0], in[1], in[2], {2, 1}, {1, 0}, {1, 0}, {1, 2}, 2); },
                     {x, w, b});
  EXPECT_TRUE(r.ok) << r.message;
  Tensor xt = randn({2, 3, 5, 4}, kFloat64).requires_grad_();
  Tensor w2 = randn({3, 2, 3, 3}, kFloat64).requires_grad_();
  auto r2 = gradcheck([](const std::vector<Tensor>& in) { return conv_transpose2d(in[0].transpose(2, 3), in[1], Tensor(), {2, 2}, {1, 1}); },
                      {xt, w2});
  EXPECT_TRUE(r2.ok) << r2.message;
}

TEST(ConvTranspose2d, LowPrecisionAndUnbatched) {
  const Tensor x = convt_rand({3, 6, 7, 7}), w = convt_rand({6, 4, 3, 3}), b = convt_rand({4});
  const Tensor y32 = conv_transpose2d(x, w, b, {2, 2}, {1, 1}, {1, 1});
  for (auto [dt, tol] : {std::pair{kBFloat16, 1e-2}, std::pair{kFloat16, 2e-3}}) {
    const Tensor y = conv_transpose2d(x.to(dt), w.to(dt), b.to(dt), {2, 2}, {1, 1}, {1, 1});
    EXPECT_EQ(y.dtype(), dt);
    EXPECT_LT(mixprec::testing::rel_error(y, y32), tol) << name(dt);
  }
  EXPECT_LT(mixprec::testing::rel_error(conv_transpose2d(x.select(0, 1), w, b, {2, 2}, {1, 1}, {1, 1}), y32.select(0, 1)), 1e-6);
}

TEST(ConvTranspose2d, BadArgumentsThrow) {
  const Tensor x = randn({2, 4, 5, 5});
  EXPECT_THROW(conv_transpose2d(x, randn({3, 2, 3, 3})), Error);                                   // channels
  EXPECT_THROW(conv_transpose2d(x, randn({4, 2, 3, 3}), Tensor(), {1, 1}, {0, 0}, {1, 0}), Error);  // output_padding >= stride
  EXPECT_THROW(conv_transpose2d(x, randn({4, 2, 3, 3}), Tensor(), {1, 1}, {0, 0}, {0, 0}, {1, 1}, 3), Error);  // groups
  EXPECT_THROW(conv_transpose2d(x, randn({4, 2, 3, 3}), randn({3})), Error);                                     // bias
  EXPECT_THROW(conv_transpose2d(x, randn({4, 2, 1, 1}), Tensor(), {1, 1}, {3, 3}), Error);                       // output size <= 0
}
