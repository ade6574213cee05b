// Plans cached per shape (cuBLASLt descriptors and algorithms, cuDNN descriptors and benchmarked
// algorithms with their math types) and the layer-norm kernels that read and write different
// dtypes, against the CPU. Each test skips without a GPU.
#include <gtest/gtest.h>

#include <mixprec/cuda.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
namespace mc = mixprec::gpu;
using mixprec::testing::rel_error;

#define MIXPREC_REQUIRE_GPU() \
  if (!cuda_is_available()) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason()

namespace {
Tensor plans_up(const Tensor& t) { return mc::to_device(t); }
Tensor plans_down(const Tensor& t) { return mc::to_host(mc::contiguous(t)).to(DType::Float32); }
double plans_tol(DType d) { return d == DType::Float32 ? 1e-5 : mixprec::testing::low_tolerance(d); }
// The looser of two dtypes' tolerances (a kernel reading one and writing the other).
double plans_tol(DType a, DType b) { return std::max(plans_tol(a), plans_tol(b)); }
}  // namespace

// D = 1: x - mean is exactly 0, so y is exactly bias and dx exactly 0, as on the CPU (the H200
// once gave dx = rstd times the rounding error of g w, an FMA's leftover, 6.4e-5 from zero).
TEST(CudaNorm, LayerNormOneElementRowsAreExact) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const Tensor x = add(mul(randn({37, 1}), 100.0), 3.0).to(d), w = randn({1}), b = randn({1}), dy = randn({37, 1}).to(d);
    const mc::LayerNormResult r = mc::layer_norm(plans_up(x), plans_up(w), plans_up(b), 1e-5);
    const auto y = mixprec::testing::to_doubles(plans_down(r.y));
    const double bias = static_cast<double>(b.to(d).to(DType::Float32).item<float>());
    for (double v : y) ASSERT_EQ(v, bias) << d;
    const mc::LayerNormGrads g = mc::layer_norm_backward(plans_up(x), plans_up(dy), plans_up(w), r.mean, r.rstd);
    for (double v : mixprec::testing::to_doubles(plans_down(g.dx))) ASSERT_EQ(v, 0.0) << d;
    EXPECT_EQ(plans_down(g.dweight).item<float>(), 0.0f) << d;
  }
}

// Every (input, output) dtype pair, with and without 16-byte vector access (D = 1000 and 7 take
// narrower or scalar paths), against the CPU's float32 layer norm of the same values.
TEST(CudaNorm, LayerNormReadsAndWritesAnyDtypePairMatchingCpu) {
  MIXPREC_REQUIRE_GPU();
  for (DType dx : {DType::Float32, DType::Float16, DType::BFloat16})
    for (DType dy_t : {DType::Float32, DType::Float16, DType::BFloat16})
      for (const auto& [M, D] : {std::pair<int64_t, int64_t>{37, 7}, {64, 256}, {37, 1000}, {8, 4096}}) {
        SCOPED_TRACE(::testing::Message() << "x " << dx << " y " << dy_t << " M " << M << " D " << D);
        const Tensor x = add(mul(randn({M, D}), 2.0), 3.0).to(dx), w = randn({D}), b = randn({D}), gy = randn({M, D}).to(dy_t);
        Tensor xf = x.to(DType::Float32).detach(), wf = w.clone(), bf = b.clone();
        for (Tensor* t : {&xf, &wf, &bf}) t->requires_grad_();
        const Tensor y = layer_norm(xf, {D}, wf, bf);
        y.backward(gy.to(DType::Float32));
        const mc::LayerNormResult r = mc::layer_norm(plans_up(x), plans_up(w), plans_up(b), 1e-5, dy_t);
        ASSERT_EQ(r.y.dtype(), dy_t);
        EXPECT_LT(rel_error(plans_down(r.y), y.detach()), plans_tol(dx, dy_t));
        const mc::LayerNormGrads g = mc::layer_norm_backward(plans_up(x), plans_up(gy), plans_up(w), r.mean, r.rstd);
        ASSERT_EQ(g.dx.dtype(), dx);
        EXPECT_LT(rel_error(plans_down(g.dx), xf.grad()), 2 * plans_tol(dx, dy_t));
        EXPECT_LT(rel_error(plans_down(g.dweight), wf.grad()), 2 * plans_tol(dx, dy_t));
        EXPECT_LT(rel_error(plans_down(g.dbias), bf.grad()), 2 * plans_tol(dx, dy_t));
      }
}

// Through the op under autocast: a float32 activation in, the autocast dtype out, one kernel; the
// gradients are the CPU's float32 ones within the 16-bit tolerance. Without autocast: float32.
TEST(CudaNorm, LayerNormUnderAutocastWritesTheAutocastDtype) {
  MIXPREC_REQUIRE_GPU();
  const Tensor x = add(mul(randn({4, 16, 96}), 2.0), 1.0), w = randn({96}), b = randn({96}), gy = randn({4, 16, 96});
  Tensor xc = x.clone(), wc = w.clone(), bc = b.clone();
  for (Tensor* t : {&xc, &wc, &bc}) t->requires_grad_();
  const Tensor yc = layer_norm(xc, {96}, wc, bc);
  yc.backward(gy);
  for (DType low : {DType::BFloat16, DType::Float16}) {
    Tensor xg = x.to(Device::CUDA), wg = w.to(Device::CUDA), bg = b.to(Device::CUDA);
    for (Tensor* t : {&xg, &wg, &bg}) t->requires_grad_();
    Tensor y;
    {
      autocast ac(Device::CUDA, low);
      y = layer_norm(xg, {96}, wg, bg);
    }
    ASSERT_EQ(y.dtype(), low);
    EXPECT_LT(rel_error(y.cpu().to(DType::Float32), yc.detach()), plans_tol(low)) << low;
    y.backward(gy.to(low).to(Device::CUDA));
    EXPECT_EQ(xg.grad().dtype(), DType::Float32);
    EXPECT_LT(rel_error(xg.grad().cpu(), xc.grad()), 2 * plans_tol(low)) << low;
    EXPECT_LT(rel_error(wg.grad().cpu(), wc.grad()), 2 * plans_tol(low)) << low;
    EXPECT_LT(rel_error(bg.grad().cpu(), bc.grad()), 2 * plans_tol(low)) << low;
  }
  EXPECT_EQ(layer_norm(x.to(Device::CUDA), {96}, w.to(Device::CUDA), b.to(Device::CUDA)).dtype(), DType::Float32);
}

// A repeated GEMM reuses its descriptors and algorithm: one miss per new key, none after, and the
// cached plan (with a per-call bias pointer) still gives the right answers.
TEST(CudaPlans, RepeatedGemmsHitThePlanCache) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::BFloat16}) {
    const Tensor w = randn({56, 40}).to(d);
    const auto before = mc::gemm_plan_cache_stats();
    for (int i = 0; i < 3; ++i) {
      const Tensor x = randn({24, 40}).to(d), b = randn({56}).to(d);
      const Tensor ref = linear(x.to(DType::Float32), w.to(DType::Float32), b.to(DType::Float32));
      EXPECT_LT(rel_error(plans_down(mc::linear(plans_up(x), plans_up(w), plans_up(b))), ref), plans_tol(d)) << d << " call " << i;
    }
    const auto after = mc::gemm_plan_cache_stats();
    // Built at most once (once unless an earlier test had this key), found every other time.
    EXPECT_LE(after.second - before.second, 1) << d;
    EXPECT_EQ((after.first + after.second) - (before.first + before.second), 3) << d;
    EXPECT_GE(after.first - before.first, 2) << d;
  }
}

// Convolutions: each direction benchmarked once per shape (cudnnFind*Ex), run with the math type
// it was measured with (read back from the descriptor), and the answers the CPU's.
TEST(CudaPlans, ConvolutionsBenchmarkOnceAndRunWithTheirMathType) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::BFloat16, DType::Float16}) {
    mc::ConvShape s;
    s.N = 4, s.C = 16, s.H = 12, s.W = 12, s.O = 32, s.KH = s.KW = 3, s.PH = s.PW = 1, s.dtype = d;
    s.layout = d == DType::Float32 ? mc::ConvLayout::NCHW : mc::ConvLayout::NHWC;
    const bool nhwc = s.layout == mc::ConvLayout::NHWC;
    auto to_layout = [&](const Tensor& t) { return plans_up(nhwc ? t.permute({0, 2, 3, 1}).contiguous() : t); };
    auto from_layout = [&](const Tensor& t) { return nhwc ? plans_down(t).permute({0, 3, 1, 2}) : plans_down(t); };
    const auto before = mc::conv_plan_cache_stats();
    for (int i = 0; i < 2; ++i) {
      const Tensor x = randn({4, 16, 12, 12}).to(d), w = randn({32, 16, 3, 3}).to(d);
      Tensor xf = x.to(DType::Float32).detach(), wf = w.to(DType::Float32).detach();
      xf.requires_grad_();
      wf.requires_grad_();
      const Tensor y = conv2d(xf, wf, Tensor(), {1, 1}, {1, 1});
      const Tensor dy = randn(y.sizes()).to(d);
      y.backward(dy.to(DType::Float32));
      EXPECT_LT(rel_error(from_layout(mc::conv2d_forward(s, to_layout(x), to_layout(w))), y.detach()), plans_tol(d)) << d;
      EXPECT_LT(rel_error(from_layout(mc::conv2d_backward_data(s, to_layout(dy), to_layout(w))), xf.grad()), plans_tol(d)) << d;
      EXPECT_LT(rel_error(from_layout(mc::conv2d_backward_filter(s, to_layout(x), to_layout(dy))), wf.grad()), plans_tol(d)) << d;
    }
    const auto after = mc::conv_plan_cache_stats();
    EXPECT_LE(after.second - before.second, 1) << d;  // one shape: descriptors built at most once
    EXPECT_EQ((after.first + after.second) - (before.first + before.second), 6) << d;  // six calls
    EXPECT_GE(after.first - before.first, 5) << d;
    mc::ConvPlan& plan = mc::detail::conv_plan(s);
    ASSERT_FALSE(plan.fwd.empty() || plan.bwd_data.empty() || plan.bwd_filter.empty());
    // The last call (backward-filter) left its algorithm's math type on the descriptor.
    cudnnMathType_t m{};
    mc::check_cudnn(cudnnGetConvolutionMathType(plan.d.conv.get(), &m), "cudnnGetConvolutionMathType");
    EXPECT_EQ(m, plan.bwd_filter.front().math) << d;
    if (d == DType::Float32) EXPECT_EQ(m, CUDNN_FMA_MATH);  // no tf32 unless asked for
  }
}

// The MLP with the tanh GELU in the GEMM epilogues (GELU_AUX_BIAS forward, DGELU_BGRAD backward)
// against the CPU's three ops and their autograd, in each dtype.
TEST(CudaPlans, MlpGeluEpiloguesMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  const Tensor x = randn({2, 24, 40}), w1 = mul(randn({64, 40}), 0.2), b1 = randn({64}), w2 = mul(randn({40, 64}), 0.2), b2 = randn({40});
  const Tensor gy = randn({2, 24, 40});
  for (DType d : {DType::Float32, DType::BFloat16, DType::Float16}) {
    std::vector<Tensor> cpu, dev;
    for (const Tensor& t : {x, w1, b1, w2, b2}) {
      cpu.push_back(t.to(d).to(DType::Float32).detach());
      dev.push_back(t.to(d).to(Device::CUDA).detach());
    }
    for (Tensor& t : cpu) t.requires_grad_();
    for (Tensor& t : dev) t.requires_grad_();
    const Tensor yc = linear(gelu(linear(cpu[0], cpu[1], cpu[2]), "tanh"), cpu[3], cpu[4]);
    yc.backward(gy.to(d).to(DType::Float32));
    ASSERT_TRUE(mixprec::detail::mlp_gelu_fusable(dev[0], dev[1], dev[2], dev[3], dev[4]));
    {  // the fused GEMMs themselves ran (they return nothing where cuBLASLt has no algorithm)
      const mc::LinearGeluResult f = mc::linear_gelu_aux(dev[0].detach().view({48, 40}), dev[1].detach(), dev[2].detach());
      ASSERT_TRUE(f.y.defined() && f.pre.defined()) << d << ": cuBLASLt has no GELU_AUX_BIAS algorithm here";
      const Tensor pre_c = linear(cpu[0].detach().view({48, 40}), cpu[1].detach(), cpu[2].detach());
      EXPECT_LT(rel_error(plans_down(f.pre), pre_c), plans_tol(d)) << d;
      EXPECT_LT(rel_error(plans_down(f.y), gelu(pre_c, "tanh")), plans_tol(d)) << d;
      const mc::LinearDGeluResult b = mc::linear_dgelu_bgrad(gy.to(d).to(Device::CUDA).view({48, 40}), dev[3].detach(), f.pre);
      ASSERT_TRUE(b.dpre.defined() && b.dbias.defined()) << d << ": cuBLASLt has no DGELU_BGRAD algorithm here";
    }
    const Tensor yg = mlp_gelu_tanh(dev[0], dev[1], dev[2], dev[3], dev[4]);
    ASSERT_EQ(yg.dtype(), d);
    EXPECT_LT(rel_error(yg.cpu().to(DType::Float32), yc.detach()), plans_tol(d)) << d;
    yg.backward(gy.to(d).to(Device::CUDA));
    const char* names[] = {"x", "w1", "b1", "w2", "b2"};
    for (int i = 0; i < 5; ++i)
      EXPECT_LT(rel_error(dev[i].grad().cpu().to(DType::Float32), cpu[i].grad()), 2 * plans_tol(d)) << d << " grad " << names[i];
  }
}

// GPT with the tanh GELU: its blocks take mlp_gelu_tanh on the GPU and plain ops on the CPU; the
// loss and every gradient agree (float32).
TEST(CudaPlans, GptWithTanhGeluMatchesCpu) {
  MIXPREC_REQUIRE_GPU();
  nn::models::GPTConfig cfg;
  cfg.vocab = 64, cfg.block_size = 32, cfg.n_layer = 2, cfg.n_head = 4, cfg.d_model = 64, cfg.mlp_hidden = 256;
  cfg.gelu_approximate = "tanh";
  Generator g1(21), g2(21), gd(22);
  nn::models::GPT cpu(cfg, g1), gpu(cfg, g2);
  gpu.to(Device::CUDA);
  const Tensor idx = randint(0, cfg.vocab, {4, 32}, DType::Int64, gd), tgt = randint(0, cfg.vocab, {4, 32}, DType::Int64, gd);
  const Tensor lc = cpu.loss(idx, tgt), lg = gpu.loss(idx.to(Device::CUDA), tgt.to(Device::CUDA));
  EXPECT_LT(rel_error(lg.cpu(), lc), 1e-5);
  lc.backward();
  lg.backward();
  const auto pc = cpu.named_parameters(), pg = gpu.named_parameters();
  for (std::size_t i = 0; i < pc.size(); ++i) EXPECT_LT(rel_error(pg[i].second.grad().cpu(), pc[i].second.grad()), 1e-4) << pc[i].first;
}
