// Channels-last convolutions: MemoryFormat on tensors, conv2d keeping the input's layout through
// forward and backward, oneDNN's kernels (where linked) against the own kernels and a float64
// reference, and the conv entries of the CPU kernel table.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cpu/onednn.hpp>  // the kernels it tests directly (also in the compiled mode)

#include "ops/op_test_util.hpp"

#include <array>
#include <vector>

using namespace mixprec;

namespace {

using I2 = std::array<int64_t, 2>;
struct LayoutCfg {
  int64_t N, C, H, W, O, K;
  I2 stride, padding, dilation;
  int64_t groups;
  bool bias;
};
const std::vector<LayoutCfg> kLayoutCfgs = {
    {4, 16, 12, 12, 16, 3, {1, 1}, {1, 1}, {1, 1}, 1, false},  // ResNet-20's 3x3
    {3, 16, 11, 11, 32, 3, {2, 2}, {1, 1}, {1, 1}, 1, true},   // stride 2, odd size, bias
    {2, 8, 9, 7, 24, 1, {1, 1}, {0, 0}, {1, 1}, 1, false},     // pointwise
    {2, 8, 10, 10, 8, 3, {1, 1}, {2, 2}, {2, 2}, 1, true},     // dilated
    {2, 6, 8, 8, 12, 3, {1, 1}, {1, 1}, {1, 1}, 3, false},     // grouped
    {5, 1, 10, 10, 16, 3, {1, 1}, {1, 1}, {1, 1}, 1, false},   // one input channel (the stem)
};

// Restores the oneDNN switch however the test ends.
struct OneDnnSwitch {
  bool prev = cpu::onednn::enabled_flag();
  explicit OneDnnSwitch(bool on) { cpu::onednn::set_enabled(on); }
  ~OneDnnSwitch() { cpu::onednn::set_enabled(prev); }
};

struct ConvRun {
  Tensor y, gx, gw, gb;
};
// conv2d forward and backward with gradient gy; x given in `f`, everything in dtype d.
ConvRun run_conv(const LayoutCfg& c, const Tensor& x64, const Tensor& w64, const Tensor& b64, const Tensor& gy64, DType d, MemoryFormat f) {
  Tensor x = x64.to(d).contiguous(f).detach().requires_grad_();
  Tensor w = w64.to(d).detach().requires_grad_();
  Tensor b = c.bias ? b64.to(d).detach().requires_grad_() : Tensor();
  Tensor y = conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
  y.backward(gy64.to(d));
  return {y, x.grad(), w.grad(), c.bias ? b.grad() : Tensor()};
}

double tol_for(DType d) { return d == DType::BFloat16 ? 1e-2 : d == DType::Float16 ? 2e-3 : d == DType::Float32 ? 1e-5 : 1e-12; }

}  // namespace

TEST(MemoryFormat, ChannelsLastStridesAndQueries) {
  Tensor x = randn({2, 3, 4, 5});
  EXPECT_EQ(x.suggest_memory_format(), MemoryFormat::Contiguous);
  Tensor cl = x.contiguous(MemoryFormat::ChannelsLast);
  EXPECT_EQ(cl.strides(), (Shape{60, 1, 15, 3}));
  EXPECT_TRUE(cl.is_contiguous(MemoryFormat::ChannelsLast));
  EXPECT_FALSE(cl.is_contiguous());
  EXPECT_EQ(cl.suggest_memory_format(), MemoryFormat::ChannelsLast);
  EXPECT_EQ(mixprec::testing::rel_error(cl, x), 0.0);  // same values, other order
  EXPECT_TRUE(cl.contiguous(MemoryFormat::ChannelsLast).storage() == cl.storage());  // already in it: no copy
  EXPECT_TRUE(cl.contiguous().is_contiguous());
  // One channel: both layouts hold the same bytes; the strides say which one was asked for.
  Tensor one = randn({2, 1, 3, 3}).contiguous(MemoryFormat::ChannelsLast);
  EXPECT_EQ(one.suggest_memory_format(), MemoryFormat::ChannelsLast);
  EXPECT_TRUE(one.is_contiguous());
  // Gradients flow through the layout change unchanged.
  Tensor a = randn({2, 3, 4, 5}).requires_grad_();
  sum(mul(a.contiguous(MemoryFormat::ChannelsLast), 3.0)).backward();
  EXPECT_EQ(mixprec::testing::rel_error(a.grad(), full({2, 3, 4, 5}, 3.0)), 0.0);
  const std::string err = mixprec::testing::error_of([] { (void)randn({2, 3, 4}).contiguous(MemoryFormat::ChannelsLast); });
  EXPECT_NE(err.find("channels_last"), std::string::npos) << err;
  EXPECT_NE(err.find("[2, 3, 4]"), std::string::npos) << err;
}

// Every layout, dtype and kernel path against the float64 definition (the NCHW float64 run:
// the own kernels, which test_conv.cpp checks against a direct loop).
TEST(ConvLayout, ChannelsLastMatchesFloat64Reference) {
  for (bool onednn : {true, false}) {
    if (onednn && !cpu::onednn::compiled()) continue;
    const OneDnnSwitch sw(onednn);
    for (const LayoutCfg& c : kLayoutCfgs) {
      const Tensor x = randn({c.N, c.C, c.H, c.W}, kFloat64), w = randn({c.O, c.C / c.groups, c.K, c.K}, kFloat64),
                   b = randn({c.O}, kFloat64);
      const int64_t OH = (c.H + 2 * c.padding[0] - c.dilation[0] * (c.K - 1) - 1) / c.stride[0] + 1;
      const int64_t OW = (c.W + 2 * c.padding[1] - c.dilation[1] * (c.K - 1) - 1) / c.stride[1] + 1;
      const Tensor gy = randn({c.N, c.O, OH, OW}, kFloat64);
      const ConvRun ref = run_conv(c, x, w, b, gy, kFloat64, MemoryFormat::Contiguous);
      for (DType d : {kFloat32, kBFloat16, kFloat16, kFloat64}) {
        // Rounding the operands is the 16-bit error budget: compare with the reference on them.
        const ConvRun r16 = run_conv(c, x.to(d).to(kFloat64), w.to(d).to(kFloat64), b.to(d).to(kFloat64), gy.to(d).to(kFloat64), kFloat64,
                                     MemoryFormat::Contiguous);
        const ConvRun cl = run_conv(c, x, w, b, gy, d, MemoryFormat::ChannelsLast);
        const std::string where = "onednn=" + std::to_string(onednn) + " dtype=" + std::string(name(d)) + " C=" + std::to_string(c.C) +
                                  " O=" + std::to_string(c.O) + " stride=" + std::to_string(c.stride[0]) + " groups=" + std::to_string(c.groups);
        EXPECT_TRUE(cl.y.is_contiguous(MemoryFormat::ChannelsLast)) << where;
        EXPECT_TRUE(cl.gw.is_contiguous()) << where;  // leaves' gradients are contiguous, as the optimizers read them
        EXPECT_EQ(cl.y.dtype(), d);
        EXPECT_EQ(cl.gw.dtype(), d);
        EXPECT_LT(mixprec::testing::rel_error(cl.y, r16.y), tol_for(d)) << where;
        EXPECT_LT(mixprec::testing::rel_error(cl.gx, r16.gx), tol_for(d)) << where;
        EXPECT_LT(mixprec::testing::rel_error(cl.gw, r16.gw), tol_for(d)) << where;
        if (c.bias) EXPECT_LT(mixprec::testing::rel_error(cl.gb, r16.gb), tol_for(d)) << where;
        if (d == kFloat64) EXPECT_LT(mixprec::testing::rel_error(cl.y, ref.y), 1e-12) << where;
      }
    }
  }
}

// NCHW inputs stay NCHW (the own kernels), and give the channels-last run's values.
TEST(ConvLayout, ContiguousInputGivesContiguousOutput) {
  const LayoutCfg& c = kLayoutCfgs[0];
  const Tensor x = randn({c.N, c.C, c.H, c.W}, kFloat64), w = randn({c.O, c.C, c.K, c.K}, kFloat64), b = randn({c.O}, kFloat64);
  const Tensor gy = randn({c.N, c.O, c.H, c.W}, kFloat64);
  for (DType d : {kFloat32, kBFloat16}) {
    const ConvRun a = run_conv(c, x, w, b, gy, d, MemoryFormat::Contiguous);
    const ConvRun cl = run_conv(c, x, w, b, gy, d, MemoryFormat::ChannelsLast);
    EXPECT_TRUE(a.y.is_contiguous());
    EXPECT_TRUE(a.gx.is_contiguous());
    EXPECT_LT(mixprec::testing::rel_error(a.y, cl.y), tol_for(d)) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(a.gx, cl.gx), tol_for(d)) << name(d);
    EXPECT_LT(mixprec::testing::rel_error(a.gw, cl.gw), tol_for(d)) << name(d);
  }
}

// The CPU entries return the layout of their activation input (what keeps a network in it).
TEST(ConvLayout, CpuEntriesKeepTheLayout) {
  const DeviceKernels* k = device_kernels(Device::CPU);
  detail::ConvGeom g;
  g.N = 2, g.C = 16, g.H = 6, g.W = 6, g.O = 8, g.KH = 3, g.KW = 3, g.PH = 1, g.PW = 1, g.OH = 6, g.OW = 6;
  const Tensor w = randn({8, 16, 3, 3});
  for (DType d : {kFloat32, kBFloat16, kFloat16})
    for (MemoryFormat f : {MemoryFormat::Contiguous, MemoryFormat::ChannelsLast}) {
      const Tensor x = randn({2, 16, 6, 6}).to(d).contiguous(f), gy = randn({2, 8, 6, 6}).to(d).contiguous(f), wd = w.to(d);
      const Tensor y = k->conv_forward(g, x, wd, Tensor());
      const Tensor gx = k->conv_backward_input(g, gy, wd);
      const Tensor gw = k->conv_backward_weight(g, x, gy);
      EXPECT_TRUE(y.is_contiguous(f)) << name(d);
      EXPECT_TRUE(gx.is_contiguous(f)) << name(d);
      EXPECT_TRUE(gw.is_contiguous()) << name(d);
      EXPECT_EQ(y.dtype(), d);
      EXPECT_EQ(gx.dtype(), d);
    }
}

TEST(ConvLayout, GradcheckChannelsLast) {
  for (const LayoutCfg& c : {kLayoutCfgs[1], kLayoutCfgs[4]}) {
    Tensor x = randn({2, c.C, 6, 5}, kFloat64).contiguous(MemoryFormat::ChannelsLast).requires_grad_();
    Tensor w = randn({c.O, c.C / c.groups, c.K, c.K}, kFloat64).requires_grad_();
    Tensor b = randn({c.O}, kFloat64).requires_grad_();
    auto r = gradcheck([&](const std::vector<Tensor>& in) { return conv2d(in[0], in[1], in[2], c.stride, c.padding, c.dilation, c.groups); },
                       {x, w, b});
    EXPECT_TRUE(r.ok) << r.message;
  }
}

// Autocast: a channels-last float32 input runs the conv in bfloat16 and stays channels-last.
TEST(ConvLayout, AutocastKeepsChannelsLast) {
  Tensor x = randn({4, 16, 8, 8}).contiguous(MemoryFormat::ChannelsLast);
  Tensor w = randn({16, 16, 3, 3}).requires_grad_();
  Tensor y;
  {
    autocast ac(Device::CPU, kBFloat16);
    y = conv2d(x, w, Tensor(), {1, 1}, {1, 1});
  }
  EXPECT_EQ(y.dtype(), kBFloat16);
  EXPECT_TRUE(y.is_contiguous(MemoryFormat::ChannelsLast));
  sum(y.to(kFloat32)).backward();
  ASSERT_TRUE(w.grad().defined());
  EXPECT_EQ(w.grad().dtype(), kFloat32);
  const Tensor ref = conv2d(x.to(kBFloat16).to(kFloat64), w.detach().to(kBFloat16).to(kFloat64), Tensor(), {1, 1}, {1, 1});
  EXPECT_LT(mixprec::testing::rel_error(y, ref), 1e-2);
}

namespace {
int g_conv_calls[3] = {0, 0, 0};
const DeviceKernels& real_cpu_kernels() { return cpu::detail::cpu_kernel_table(); }  // what the counters forward to
}  // namespace

// The conv ops reach their kernels through the CPU's table, as on any device.
TEST(ConvLayout, CpuTableRoutesConvolutions) {
  const DeviceKernels* cpu_table = device_kernels(Device::CPU);
  ASSERT_NE(cpu_table, nullptr);
  ASSERT_NE(cpu_table->conv_forward, nullptr);
  ASSERT_NE(cpu_table->conv_backward_input, nullptr);
  ASSERT_NE(cpu_table->conv_backward_weight, nullptr);
  EXPECT_TRUE(cpu_table->channels_last);
  DeviceKernels counting = *cpu_table;
  counting.conv_forward = [](const detail::ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
    ++g_conv_calls[0];
    return real_cpu_kernels().conv_forward(g, x, w, b);
  };
  counting.conv_backward_input = [](const detail::ConvGeom& g, const Tensor& gy, const Tensor& w) {
    ++g_conv_calls[1];
    return real_cpu_kernels().conv_backward_input(g, gy, w);
  };
  counting.conv_backward_weight = [](const detail::ConvGeom& g, const Tensor& x, const Tensor& gy) {
    ++g_conv_calls[2];
    return real_cpu_kernels().conv_backward_weight(g, x, gy);
  };
  {
    const mixprec::testing::ScopedKernels swap(Device::CPU, counting);
    Tensor x = randn({2, 3, 5, 5}).requires_grad_(), w = randn({4, 3, 3, 3}).requires_grad_();
    sum(conv2d(x, w)).backward();
  }
  EXPECT_EQ(g_conv_calls[0], 1);
  EXPECT_EQ(g_conv_calls[1], 1);
  EXPECT_EQ(g_conv_calls[2], 1);
  DeviceKernels missing = *cpu_table;
  missing.conv_forward = nullptr;
  const mixprec::testing::ScopedKernels swap(Device::CPU, missing);
  const std::string err = mixprec::testing::error_of([] { (void)conv2d(randn({1, 2, 4, 4}), randn({2, 2, 3, 3})); });
  EXPECT_NE(err.find("conv2d"), std::string::npos) << err;
}
