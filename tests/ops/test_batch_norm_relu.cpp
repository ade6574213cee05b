// batch_norm_relu (ops/normalization.hpp): the ReLU applied by the batch-norm kernel as it writes y
// and its mask applied as the backward reads the gradient (backends/cpu/batch_norm_nhwc.hpp) must
// give, bit for bit, what relu(batch_norm(...)) gives -- values, every gradient, running statistics.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

#include <cstring>

using namespace mixprec;

namespace {
bool bnr_same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.sizes() != b.sizes()) return false;
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), static_cast<std::size_t>(ac.numel() * ac.element_size())) == 0;
}

struct BnReluRun {
  Tensor y, dx, dw, db, rm, rv;
};
// One forward and backward, fused or composed, from the same inputs.
BnReluRun bnr_run(bool fused, const Tensor& x0, const Tensor& g, bool training) {
  const int64_t C = x0.size(1);
  Generator pg(11);  // the same parameters for both runs
  Tensor x = x0.detach().requires_grad_(), w = add(mul(randn({C}, kFloat32, pg), 0.3), 1.0).requires_grad_(),
         b = mul(randn({C}, kFloat32, pg), 0.2).requires_grad_();
  BnReluRun r{Tensor(), Tensor(), Tensor(), Tensor(), full({C}, 0.25), full({C}, 1.5)};
  r.y = fused ? batch_norm_relu(x, r.rm, r.rv, w, b, training, 0.1, 1e-5) : relu(batch_norm(x, r.rm, r.rv, w, b, training, 0.1, 1e-5));
  r.y.backward(g);
  r.dx = x.grad(), r.dw = w.grad(), r.db = b.grad();
  return r;
}
}  // namespace

TEST(BatchNormRelu, BitIdenticalToBatchNormThenRelu) {
  Generator gen(3);
  for (DType d : {kFloat32, kBFloat16, kFloat16, kFloat64})
    for (MemoryFormat f : {MemoryFormat::ChannelsLast, MemoryFormat::Contiguous})
      for (bool training : {true, false}) {
        // About half the pre-activations negative; a few exact zeros in x.
        Tensor x = randn({4, 24, 5, 3}, kFloat32, gen).to(d).contiguous(f);
        const Tensor g = randn({4, 24, 5, 3}, kFloat32, gen).to(d).contiguous(f);
        const BnReluRun a = bnr_run(true, x, g, training), b = bnr_run(false, x, g, training);
        const std::string what = std::string(name(d)) + (f == MemoryFormat::ChannelsLast ? " channels-last" : " NCHW") +
                                 (training ? " training" : " eval");
        EXPECT_TRUE(bnr_same_bits(a.y, b.y)) << what;
        EXPECT_EQ(a.y.suggest_memory_format(), f) << what;
        EXPECT_TRUE(bnr_same_bits(a.dx, b.dx)) << what;
        EXPECT_TRUE(bnr_same_bits(a.dw, b.dw)) << what;
        EXPECT_TRUE(bnr_same_bits(a.db, b.db)) << what;
        EXPECT_TRUE(bnr_same_bits(a.rm, b.rm)) << what;
        EXPECT_TRUE(bnr_same_bits(a.rv, b.rv)) << what;
        EXPECT_GT(sum(eq(a.y, 0.0)).item<int64_t>(), a.y.numel() / 4) << what << ": the ReLU must have zeroed something";
      }
}

TEST(BatchNormRelu, Gradcheck) {
  Generator gen(4);
  for (MemoryFormat f : {MemoryFormat::Contiguous, MemoryFormat::ChannelsLast}) {
    const Tensor x = randn({3, 4, 3, 2}, kFloat64, gen).contiguous(f).requires_grad_();
    const Tensor w = randn({4}, kFloat64, gen).requires_grad_(), b = randn({4}, kFloat64, gen).requires_grad_();
    const auto r = gradcheck([](const std::vector<Tensor>& in) { return batch_norm_relu(in[0], Tensor(), Tensor(), in[1], in[2], true); },
                             {x, w, b});
    EXPECT_TRUE(r.ok) << r.message;
  }
}

// The op reaches the fused entries on the CPU; a table without them composes batch_norm and relu.
namespace {
int g_bnr_fwd = 0, g_bnr_bwd = 0;
decltype(DeviceKernels::batch_norm_relu) g_bnr_fwd_orig = nullptr;
decltype(DeviceKernels::batch_norm_relu_backward) g_bnr_bwd_orig = nullptr;
}  // namespace

TEST(BatchNormRelu, RoutesThroughTheKernelTableAndComposesWithoutIt) {
  const DeviceKernels& cpu = *device_kernels(Device::CPU);
  ASSERT_NE(cpu.batch_norm_relu, nullptr);
  ASSERT_NE(cpu.batch_norm_relu_backward, nullptr);
  const Tensor x = randn({2, 8, 4, 4}).to(kBFloat16).contiguous(MemoryFormat::ChannelsLast), g = randn({2, 8, 4, 4}).to(kBFloat16);
  const BnReluRun want = bnr_run(false, x, g, true);
  {
    DeviceKernels t = cpu;
    g_bnr_fwd = g_bnr_bwd = 0;
    g_bnr_fwd_orig = cpu.batch_norm_relu;
    g_bnr_bwd_orig = cpu.batch_norm_relu_backward;
    t.batch_norm_relu = [](const Tensor& a, const Tensor& w, const Tensor& b, const Tensor& rm, const Tensor& rv, bool tr, double m, double e) {
      ++g_bnr_fwd;
      return g_bnr_fwd_orig(a, w, b, rm, rv, tr, m, e);
    };
    t.batch_norm_relu_backward = [](const Tensor& a, const Tensor& gr, const Tensor& y, const Tensor& w, const Tensor& sm, const Tensor& si,
                                    double e) {
      ++g_bnr_bwd;
      return g_bnr_bwd_orig(a, gr, y, w, sm, si, e);
    };
    mixprec::testing::ScopedKernels swap(Device::CPU, t);
    const BnReluRun got = bnr_run(true, x, g, true);
    EXPECT_EQ(g_bnr_fwd, 1);
    EXPECT_EQ(g_bnr_bwd, 1);
    EXPECT_TRUE(bnr_same_bits(got.dx, want.dx));
  }
  {
    DeviceKernels t = cpu;
    t.batch_norm_relu = nullptr;
    mixprec::testing::ScopedKernels swap(Device::CPU, t);
    const BnReluRun got = bnr_run(true, x, g, true);
    EXPECT_TRUE(bnr_same_bits(got.y, want.y));
    EXPECT_TRUE(bnr_same_bits(got.dx, want.dx));
    EXPECT_TRUE(bnr_same_bits(got.dw, want.dw));
  }
}
