// The CUDA backend against the CPU: every test needs a GPU and skips with the reason where there
// is none. Compiled by nvcc for sm_80 and sm_90 with warnings as errors, so every .cuh header is
// compile-checked here even without a device.
#include <gtest/gtest.h>

#include <mixprec/cuda.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
namespace mc = mixprec::gpu;
using mixprec::testing::rel_error;

#define MIXPREC_REQUIRE_GPU() \
  if (!cuda_is_available()) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason()

namespace {
Tensor up(const Tensor& t) { return mc::to_device(t); }
Tensor down(const Tensor& t) { return mc::to_host(mc::contiguous(t)).to(DType::Float32); }
double tol(DType d) { return d == DType::Float32 ? 1e-5 : mixprec::testing::low_tolerance(d); }
}  // namespace

TEST(CudaGemm, MatchesCpuOverDtypesTransposesAndBatches) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const std::vector<std::pair<Tensor, Tensor>> cases = {
        {randn({64, 32}), randn({32, 48})},            {randn({7, 13}), randn({13, 5})},
        {randn({13, 7}).t(), randn({5, 13}).t()},      {randn({3, 9, 17}), randn({3, 17, 6})},
        {randn({2, 3, 8, 16}), randn({16, 24})},       {randn({4, 10, 12}), randn({4, 10, 12}).transpose(-2, -1)},
        {randn({2, 1, 5, 6}), randn({1, 3, 6, 4})},  // broadcast that needs a copy
    };
    for (const auto& [a, b] : cases) {
      const Tensor al = a.to(d), bl = b.to(d);
      const Tensor ref = matmul(al.to(DType::Float32), bl.to(DType::Float32));
      EXPECT_LT(rel_error(down(mc::matmul(up(al), up(bl))), ref), tol(d)) << d;
      EXPECT_LT(rel_error(down(mc::matmul(up(al), up(bl), DType::Float32)), ref), 1e-5) << d << " -> float32";
    }
  }
}

TEST(CudaGemm, BiasAndGeluEpiloguesMatchLinear) {
  MIXPREC_REQUIRE_GPU();
  const Tensor x = randn({2, 24, 40}), w = randn({56, 40}), b = randn({56});
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const Tensor xl = x.to(d), wl = w.to(d), bl = b.to(d);
    const Tensor ref = linear(xl.to(DType::Float32), wl.to(DType::Float32), bl.to(DType::Float32));
    EXPECT_LT(rel_error(down(mc::linear(up(xl), up(wl), up(bl))), ref), tol(d)) << d;
    EXPECT_LT(rel_error(down(mc::linear(up(xl), up(wl), up(bl), mc::GemmEpilogue::GeluTanh)), gelu(ref, "tanh")), tol(d)) << d;
  }
}

TEST(CudaGemm, Tf32IsOptInAndClose) {
  MIXPREC_REQUIRE_GPU();
  const Tensor a = randn({256, 256}), b = randn({256, 256});
  const Tensor ref = matmul(a, b);
  EXPECT_LT(rel_error(down(mc::matmul(up(a), up(b), std::nullopt, Tensor(), mc::GemmEpilogue::None, true)), ref), 5e-3);
}

TEST(CudaConv, ForwardAndBothBackwardsMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  struct Case {
    int64_t N, C, H, W, O, K, S, P, D, G;
  };
  for (const Case& c : {Case{2, 8, 12, 10, 16, 3, 1, 1, 1, 1}, Case{3, 8, 9, 9, 8, 3, 2, 1, 1, 2}, Case{1, 16, 7, 11, 32, 1, 1, 0, 1, 1},
                        Case{2, 8, 13, 13, 8, 3, 1, 2, 2, 8}})
    for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
      SCOPED_TRACE(::testing::Message() << "N" << c.N << " C" << c.C << " " << c.H << "x" << c.W << " O" << c.O << " K" << c.K << " S" << c.S
                                        << " P" << c.P << " D" << c.D << " G" << c.G << " " << d);
      mc::ConvShape s;
      s.N = c.N, s.C = c.C, s.H = c.H, s.W = c.W, s.O = c.O, s.KH = s.KW = c.K, s.SH = s.SW = c.S, s.PH = s.PW = c.P,
      s.DH = s.DW = c.D, s.G = c.G, s.dtype = d;
      s.layout = d == DType::Float32 ? mc::ConvLayout::NCHW : mc::ConvLayout::NHWC;
      const Tensor x = randn({c.N, c.C, c.H, c.W}).to(d), w = randn({c.O, c.C / c.G, c.K, c.K}).to(d), bias = randn({c.O}).to(d);
      // CPU reference in float32 on the same (rounded) values, with autograd for the backwards.
      Tensor xf = x.to(DType::Float32), wf = w.to(DType::Float32);
      xf.requires_grad_();
      wf.requires_grad_();
      const Tensor y = conv2d(xf, wf, bias.to(DType::Float32), {c.S, c.S}, {c.P, c.P}, {c.D, c.D}, c.G);
      const Tensor dy = randn(y.sizes()).to(d);
      y.backward(dy.to(DType::Float32));
      const bool nhwc = s.layout == mc::ConvLayout::NHWC;
      auto to_layout = [&](const Tensor& t) { return up(nhwc ? t.permute({0, 2, 3, 1}).contiguous() : t); };
      auto from_layout = [&](const Tensor& t) { return nhwc ? down(t).permute({0, 3, 1, 2}) : down(t); };
      const Tensor yg = mc::conv2d_forward(s, to_layout(x), to_layout(w), up(bias));
      EXPECT_LT(rel_error(from_layout(yg), y.detach()), tol(d)) << d;
      EXPECT_LT(rel_error(from_layout(mc::conv2d_backward_data(s, to_layout(dy), to_layout(w))), xf.grad()), tol(d)) << d;
      EXPECT_LT(rel_error(from_layout(mc::conv2d_backward_filter(s, to_layout(x), to_layout(dy))), wf.grad()), tol(d)) << d;
    }
}

TEST(CudaNorm, SoftmaxAndBatchNormMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const Tensor x = randn({4, 10, 6}).to(d);
    for (int64_t dim : {0, 1, 2})
      for (bool log : {false, true}) {
        Tensor xf = x.to(DType::Float32).detach();  // a fresh leaf: for float32, to() returns x itself
        xf.requires_grad_();
        const Tensor y = log ? log_softmax(xf, dim) : softmax(xf, dim);
        const Tensor g = randn(y.sizes()).to(d);
        y.backward(g.to(DType::Float32));
        const Tensor yg = mc::softmax(up(x), dim, log);
        EXPECT_LT(rel_error(down(yg), y.detach()), tol(d)) << d << " dim " << dim << " log " << log;
        EXPECT_LT(rel_error(down(mc::softmax_backward(yg, up(g), dim, log)), xf.grad()), 2 * tol(d)) << d << " dim " << dim;
      }
  }
  const Tensor x = randn({8, 6, 5, 7}), w = randn({6}), b = randn({6});
  Tensor rm = zeros({6}), rv = ones({6});
  Tensor xf = x.clone();
  xf.requires_grad_();
  const Tensor y = batch_norm(xf, rm, rv, w, b, true, 0.1, 1e-5);
  const Tensor dy = randn(y.sizes());
  y.backward(dy);
  const Tensor grm = up(zeros({6})), grv = up(ones({6}));
  const mc::BatchNormResult r = mc::batch_norm_training(up(x), up(w), up(b), grm, grv, 0.1, 1e-5);
  EXPECT_LT(rel_error(down(r.y), y.detach()), 1e-5);
  EXPECT_LT(rel_error(down(grm), rm), 1e-5);
  EXPECT_LT(rel_error(down(grv), rv), 1e-5);
  const mc::BatchNormGrads g = mc::batch_norm_backward(up(x), up(dy), up(w), r.save_mean, r.save_invstd, 1e-5);
  EXPECT_LT(rel_error(down(g.dx), xf.grad()), 1e-4);
  EXPECT_LT(rel_error(down(mc::batch_norm_inference(up(x), up(w), up(b), grm, grv, 1e-5)), batch_norm(x, rm, rv, w, b, false)), 1e-5);
}

TEST(CudaNorm, LayerNormMatchesCpu) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16})
    for (const auto& [M, D] : {std::pair<int64_t, int64_t>{37, 1}, {37, 7}, {700, 256}, {37, 1000}}) {
      // D: one value per row, a partial block, several per thread; M = 700: 11 slabs of rows whose
      // weight and bias gradients meet through atomics.
      const Tensor x = add(mul(randn({M, D}), 2.0), 3.0).to(d), w = randn({D}), b = randn({D}), dy = randn({M, D}).to(d);
      Tensor xf = x.to(DType::Float32).detach(), wf = w.clone(), bf = b.clone();
      for (Tensor* t : {&xf, &wf, &bf}) t->requires_grad_();
      const Tensor y = layer_norm(xf, {D}, wf, bf);
      y.backward(dy.to(DType::Float32));
      const mc::LayerNormResult r = mc::layer_norm(up(x), up(w), up(b), 1e-5);
      EXPECT_LT(rel_error(down(r.y), y.detach()), tol(d)) << d << " M " << M << " D " << D;
      const mc::LayerNormGrads g = mc::layer_norm_backward(up(x), up(dy), up(w), r.mean, r.rstd);
      EXPECT_LT(rel_error(down(g.dx), xf.grad()), 2 * tol(d)) << d << " M " << M << " D " << D;
      EXPECT_LT(rel_error(down(g.dweight), wf.grad()), 2 * tol(d)) << d << " M " << M << " D " << D;
      EXPECT_LT(rel_error(down(g.dbias), bf.grad()), 2 * tol(d)) << d << " M " << M << " D " << D;
    }
}

TEST(CudaElementwise, EmbeddingAndDropoutMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  const Tensor w = randn({50, 24}), idx = randint(0, 50, {300}, DType::Int64);
  Tensor wf = w.clone();
  wf.requires_grad_();
  const Tensor e = embedding(wf, idx, 3);
  const Tensor g = randn({300, 24});
  e.backward(g);
  const Tensor ig = up(idx);
  EXPECT_EQ(rel_error(down(mc::embedding(up(w), ig)), e.detach()), 0.0);
  EXPECT_LT(rel_error(down(mc::embedding_backward(up(g), ig, 50, 3)), wf.grad()), 1e-6);
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const Tensor x = randn({1000}).to(d), keep = gt(rand({1000}), 0.4);
    const Tensor want = mul(mul(x.to(DType::Float32), keep.to(DType::Float32)), 1.0 / 0.6).to(d);
    EXPECT_EQ(rel_error(down(mc::masked_scale(up(x), up(keep), 1.0 / 0.6)), want.to(DType::Float32)), 0.0) << d;
  }
}

// GPT-mini through the public ops (embeddings, layer norms, causal attention, GELU, dropout,
// tied head, cross entropy) against the CPU, then one AdamW step; the GPU takes the CPU's
// dropout draws (same seed).
TEST(CudaOps, GptStepThroughThePublicOpsMatchesCpu) {
  MIXPREC_REQUIRE_GPU();
  nn::models::GPTConfig cfg;
  cfg.vocab = 64, cfg.block_size = 32, cfg.n_layer = 2, cfg.n_head = 4, cfg.d_model = 64, cfg.mlp_hidden = 256, cfg.dropout = 0.1;
  Generator g1(12), g2(12), gd(13);
  nn::models::GPT cpu(cfg, g1), gpu(cfg, g2);
  gpu.to(Device::CUDA);
  const Tensor idx = randint(0, cfg.vocab, {4, 32}, DType::Int64, gd), tgt = randint(0, cfg.vocab, {4, 32}, DType::Int64, gd);
  manual_seed(5);
  const Tensor lc = cpu.loss(idx, tgt);
  manual_seed(5);
  const Tensor lg = gpu.loss(idx.to(Device::CUDA), tgt.to(Device::CUDA));
  EXPECT_LT(rel_error(lg.cpu(), lc), 1e-5);
  lc.backward();
  lg.backward();
  const auto pc = cpu.named_parameters(), pg = gpu.named_parameters();
  for (std::size_t i = 0; i < pc.size(); ++i) EXPECT_LT(rel_error(pg[i].second.grad().cpu(), pc[i].second.grad()), 1e-4) << pc[i].first;
  // The update on the same gradients (Adam's first step is about lr * sign(g), so gradients that
  // are zero up to rounding would make any two runs differ).
  for (std::size_t i = 0; i < pc.size(); ++i) pg[i].second.grad().copy_(pc[i].second.grad());
  optim::AdamW oc(cpu.parameters(), 1e-3), og(gpu.parameters(), 1e-3);
  oc.step();
  og.step();
  // float32 on both sides, but nvcc fuses multiply-adds into FMAs where the CPU loop may not.
  for (std::size_t i = 0; i < pc.size(); ++i) EXPECT_LT(rel_error(pg[i].second.cpu(), pc[i].second), 1e-5) << pc[i].first;
}

TEST(CudaElementwise, ActivationsAndReductionsMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  using A = mc::Activation;
  const std::vector<std::pair<A, Tensor (*)(const Tensor&)>> acts = {
      {A::Relu, [](const Tensor& t) { return relu(t); }},       {A::Gelu, [](const Tensor& t) { return gelu(t); }},
      {A::GeluTanh, [](const Tensor& t) { return gelu(t, "tanh"); }}, {A::Silu, [](const Tensor& t) { return silu(t); }},
      {A::Sigmoid, [](const Tensor& t) { return sigmoid(t); }}, {A::Tanh, [](const Tensor& t) { return mixprec::tanh(t); }},
      {A::Exp, [](const Tensor& t) { return exp(t); }},         {A::Log, [](const Tensor& t) { return log(t); }}};
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const Tensor x = mul(randn({3, 1000}), 3.0).to(d);
    const Tensor xpos = add(mixprec::abs(x.to(DType::Float32)), 0.1).to(d);  // log's domain
    for (const auto& [a, f] : acts) {
      const Tensor& in = a == A::Log ? xpos : a == A::Exp ? mul(x.to(DType::Float32), 0.3).to(d) : x;  // exp: no overflow
      Tensor xf = in.to(DType::Float32).detach();  // a fresh leaf: for float32, to() returns x itself
      xf.requires_grad_();
      const Tensor y = f(xf);
      const Tensor g = randn(y.sizes()).to(d);
      y.backward(g.to(DType::Float32));
      const Tensor yg = mc::activation(a, up(in));
      EXPECT_LT(rel_error(down(yg), y.detach()), tol(d)) << d << " act " << int(a);
      EXPECT_LT(rel_error(down(mc::activation_backward(a, up(g), up(in), yg)), xf.grad()), 2 * tol(d)) << d << " act " << int(a);
    }
    EXPECT_LT(rel_error(down(mc::sum(up(x))), mixprec::sum(x.to(DType::Float32))), 1e-5) << d;
    EXPECT_LT(rel_error(down(mc::max_abs(up(x))), mixprec::max(mixprec::abs(x.to(DType::Float32)))), 1e-7) << d;
    // The reductions read 16-byte packs: views that start 1 or 3 elements past a boundary (a
    // lead), lengths with a cut last pack, one element, none; and a NaN in the lead or a pack.
    const Tensor flat = randn({4099}).to(d);
    const Tensor flat_gpu = up(flat);
    for (int64_t off : {0, 1, 3})
      for (int64_t len : {int64_t{0}, int64_t{1}, int64_t{7}, 4096 - off}) {
        const Tensor want = flat.narrow(0, off, len).to(DType::Float32);
        const Tensor got_sum = down(mc::sum(flat_gpu.narrow(0, off, len)));
        if (len == 0) EXPECT_EQ(got_sum.item<float>(), 0.0f);
        else EXPECT_LT(rel_error(got_sum, mixprec::sum(want)), 1e-5) << d << " off " << off << " len " << len;
        if (len > 0)
          EXPECT_EQ(down(mc::max_abs(flat_gpu.narrow(0, off, len))).item<float>(), mixprec::max(mixprec::abs(want)).item<float>())
              << d << " off " << off << " len " << len;
      }
    for (int64_t at : {0, 2, 100}) {  // in the view starting at element 1: in the lead (0, 2) or a pack
      Tensor poisoned = flat.to(DType::Float32).clone();
      poisoned.data<float>()[1 + at] = std::nanf("");
      EXPECT_TRUE(std::isnan(down(mc::max_abs(up(poisoned.to(d)).narrow(0, 1, 500))).item<float>())) << d << " NaN at " << at;
    }
  }
}

// The element-wise loop (loops.cuh): casts, strided and broadcast copies, fills and binary ops
// against the CPU over the plan's cases -- one dimension, vectors, misaligned views (scalar
// fallback), broadcast rows/columns/scalars, permutes that coalesce to a few dimensions.
TEST(CudaLoops, CopiesCastsFillsAndBinaryOpsMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  const std::vector<DType> dts = {DType::Float32, DType::Float16, DType::BFloat16};
  const std::vector<Shape> shapes = {{1}, {7}, {1000003}, {64, 256}, {3, 5, 7}, {2, 3, 8, 16}};
  for (const Shape& sh : shapes)
    for (DType from : dts)
      for (DType to : dts) {
        SCOPED_TRACE(::testing::Message() << ::testing::PrintToString(sh) << " " << from << " -> " << to);
        const Tensor x = randn(sh).to(from);
        const Tensor ref = x.to(to);
        EXPECT_EQ(rel_error(down(mc::contiguous(up(x), to)), ref.to(DType::Float32)), 0.0);
        // A view one element in: misaligned for 16-byte vectors, so the scalar path.
        const Tensor flat = up(x.reshape({-1}));
        if (flat.numel() > 1) {
          const Tensor tail = flat.narrow(0, 1, flat.numel() - 1);
          EXPECT_EQ(rel_error(down(mc::contiguous(tail, to)), ref.reshape({-1}).narrow(0, 1, flat.numel() - 1).to(DType::Float32)), 0.0);
        }
      }
  for (DType d : dts) {
    SCOPED_TRACE(::testing::Message() << d);
    // Head split and merge: [B, T, H, E] <-> [B, H, T, E] (inner dim contiguous: vectors).
    const Tensor x = randn({4, 33, 6, 64}).to(d);
    EXPECT_EQ(rel_error(down(mc::contiguous(up(x).permute({0, 2, 1, 3}))), x.permute({0, 2, 1, 3}).contiguous().to(DType::Float32)), 0.0);
    // A transpose (inner stride not 1: scalars) and a 5-D permute.
    const Tensor t2 = randn({37, 53}).to(d), t5 = randn({2, 3, 4, 5, 6}).to(d);
    EXPECT_EQ(rel_error(down(mc::contiguous(up(t2).t())), t2.t().contiguous().to(DType::Float32)), 0.0);
    EXPECT_EQ(rel_error(down(mc::contiguous(up(t5).permute({4, 2, 0, 3, 1}))), t5.permute({4, 2, 0, 3, 1}).contiguous().to(DType::Float32)), 0.0);
    // copy_ into a strided destination, with a broadcast source and a cast.
    Tensor dst = up(zeros({8, 16, 12}).to(d));
    const Tensor row = randn({12});
    mc::copy(dst.transpose(0, 1), up(row));
    EXPECT_EQ(rel_error(down(dst), row.to(d).expand({8, 16, 12}).to(DType::Float32)), 0.0);
    // fill of a strided view leaves the rest alone.
    Tensor base = up(zeros({10, 20}).to(d));
    mc::fill(base.narrow(1, 3, 8), 2.5);
    Tensor expect = zeros({10, 20});
    expect.narrow(1, 3, 8).fill_(2.5);
    EXPECT_EQ(rel_error(down(base), expect), 0.0);
    // Binary ops over broadcasts: rows (bias), columns, scalars, middle dims; and a strided operand.
    const std::vector<std::pair<Shape, Shape>> pairs = {{{300, 256}, {256}},       {{300, 256}, {300, 1}}, {{300, 256}, {1}},
                                                        {{8, 1, 128}, {8, 16, 1}}, {{4, 12, 33, 33}, {33, 33}}, {{1001}, {1001}}};
    for (const auto& [sa, sb] : pairs) {
      const Tensor a = randn(sa).to(d), b = add(mixprec::abs(randn(sb)), 0.5).to(d);
      const Tensor af = a.to(DType::Float32), bf = b.to(DType::Float32);
      EXPECT_LT(rel_error(down(mc::binary(DeviceBinary::Add, up(a), up(b), 0.5)), add(af, bf, 0.5).to(d).to(DType::Float32)), 1e-7) << ::testing::PrintToString(sa) << ::testing::PrintToString(sb);
      EXPECT_LT(rel_error(down(mc::binary(DeviceBinary::Mul, up(b), up(a), 1.0)), mul(bf, af).to(d).to(DType::Float32)), 1e-7) << ::testing::PrintToString(sa) << ::testing::PrintToString(sb);
      EXPECT_LT(rel_error(down(mc::binary(DeviceBinary::Div, up(a), up(b), 1.0)), div(af, bf).to(d).to(DType::Float32)), 1e-7) << ::testing::PrintToString(sa) << ::testing::PrintToString(sb);
    }
    // Mixed dtypes: float32 with a 16-bit operand in one pass, float32 out.
    if (d != DType::Float32) {
      const Tensor f = randn({300, 256}), h = randn({256}).to(d);
      EXPECT_EQ(rel_error(down(mc::binary(DeviceBinary::Add, up(f), up(h), 1.0)), add(f, h.to(DType::Float32))), 0.0);
      EXPECT_EQ(rel_error(down(mc::binary(DeviceBinary::Mul, up(h), up(f), 1.0)), mul(h.to(DType::Float32), f)), 0.0);
      const DType other = d == DType::BFloat16 ? DType::Float16 : DType::BFloat16;
      const Tensor o = randn({256}).to(other);
      EXPECT_LT(rel_error(down(mc::binary(DeviceBinary::Add, up(h), up(o), 1.0)), add(h.to(DType::Float32), o.to(DType::Float32))), 1e-7);
    }
    const Tensor m = randn({64, 48}).to(d), n = randn({48, 64}).to(d);
    EXPECT_LT(rel_error(down(mc::binary(DeviceBinary::Add, up(m), up(n).t(), 1.0)), add(m.to(DType::Float32), n.to(DType::Float32).t()).to(d).to(DType::Float32)), 1e-7);
    // Activations read non-contiguous inputs directly.
    const Tensor xt = randn({40, 72}).to(d);
    EXPECT_LT(rel_error(down(mc::activation(mc::Activation::Gelu, up(xt).t())), gelu(xt.to(DType::Float32).t()).to(d).to(DType::Float32)), tol(d));
    // Sums over leading dims (no copy: ones @ x) and over inner or mixed dims.
    const Tensor s = randn({6, 50, 96}).to(d);
    const Tensor sf = s.to(DType::Float32);
    EXPECT_LT(rel_error(down(mc::sum_dims(up(s), {0, 1})), mixprec::sum(sf, {0, 1})), tol(d));
    EXPECT_LT(rel_error(down(mc::sum_dims(up(s), {2})), mixprec::sum(sf, {2})), tol(d));
    EXPECT_LT(rel_error(down(mc::sum_dims(up(s), {0, 2})), mixprec::sum(sf, {0, 2})), tol(d));
  }
  // Integer and bool copies move bits; int64 fills (optimizer step counters).
  const Tensor ids = randint(0, 1 << 30, {5, 7}, DType::Int64);
  const Tensor got = mc::to_host(up(ids).t().contiguous()), want = ids.t().contiguous();  // the public op: copy moves int64 bits
  EXPECT_TRUE(std::equal(got.data<int64_t>(), got.data<int64_t>() + got.numel(), want.data<int64_t>()));
  Tensor counters = up(zeros({9}, DType::Int64));
  mc::fill(counters, 123456789012.0);
  EXPECT_EQ(mc::to_host(counters).data<int64_t>()[8], 123456789012);
}

// Offsets past 2^31 elements take the 64-bit loop: a few elements 2^30 apart in a 4 GiB buffer.
TEST(CudaLoops, OffsetsPast2To31UseTheWideIndex) {
  MIXPREC_REQUIRE_GPU();
  const int64_t n = (int64_t{1} << 31) + 64;
  Tensor big = empty({n}, DType::BFloat16, Device::CUDA);
  const Tensor sparse = mixprec::detail::make_view(big, {3}, {int64_t{1} << 30}, 32);
  mc::fill(sparse, 3.0);
  const Tensor vals = randn({3}).to(DType::BFloat16);
  mc::copy(sparse, up(vals));
  EXPECT_EQ(rel_error(down(sparse), vals.to(DType::Float32)), 0.0);
  Tensor wide = empty({3}, DType::Float32, Device::CUDA);
  mc::copy(wide, sparse);
  EXPECT_EQ(rel_error(mc::to_host(wide), vals.to(DType::Float32)), 0.0);
}

namespace {
float device_float(const float* p) {
  float v = 0;
  mc::check(cudaMemcpy(&v, p, sizeof(float), cudaMemcpyDeviceToHost), "test");
  return v;
}
}  // namespace

TEST(CudaAmp, UnscaleFindsNonFiniteInOneLaunchAndScaleUpdatesOnDevice) {
  MIXPREC_REQUIRE_GPU();
  const Tensor g32 = randn({70000}), g16 = randn({300}).to(DType::Float16);
  Tensor d32 = up(mul(g32, 1024.0)), d16 = up(mul(g16.to(DType::Float32), 1024.0).to(DType::Float16));
  Tensor master = empty({300}, DType::Float32, Device::CUDA);
  Tensor scale = up(full({}, 1024.0)), found = up(zeros({}));
  mc::unscale_and_check({{d32.data_ptr(), nullptr, 70000, uint8_t(DType::Float32)}, {d16.data_ptr(), master.data<float>(), 300, uint8_t(DType::Float16)}},
                          scale.data<float>(), found.data<float>());
  EXPECT_EQ(device_float(found.data<float>()), 0.0f);
  EXPECT_LT(rel_error(down(d32), g32), 1e-7);
  EXPECT_LT(rel_error(down(master), g16.to(DType::Float32)), 1e-3);
  EXPECT_LT(rel_error(down(d16), g16.to(DType::Float32)), 1e-3);  // the 16-bit gradient is unscaled too
  // One inf anywhere sets the flag; the update then halves the scale on the device.
  Tensor bad = up(full({5}, std::numeric_limits<double>::infinity()));
  mc::unscale_and_check({{bad.data_ptr(), nullptr, 5, uint8_t(DType::Float32)}}, scale.data<float>(), found.data<float>());
  EXPECT_EQ(device_float(found.data<float>()), 1.0f);
  Tensor tracker = up(zeros({}, DType::Int64));
  mc::update_scale(scale.data<float>(), tracker.data<int64_t>(), found.data<float>(), 2.0, 0.5, 2000);
  EXPECT_EQ(device_float(scale.data<float>()), 512.0f);
}

TEST(CudaAmp, FusedAdamWAndSgdMatchTheCpuOptimizers) {
  MIXPREC_REQUIRE_GPU();
  for (DType model : {DType::Float32, DType::BFloat16, DType::Float16}) {
    // CPU: the optimizer keeps float32 masters for a 16-bit model and writes rounded copies back.
    Tensor p = randn({5000}).to(model);
    p.requires_grad_();
    optim::AdamW cpu_opt({p}, 1e-2, {0.9, 0.999}, 1e-8, 0.1);
    Tensor master = up(p.detach().to(DType::Float32)), copy = up(p.detach());
    Tensor m = up(zeros({5000})), v = up(zeros({5000})), step = up(zeros({}, DType::Int64));
    const optim::detail::AdamHyper h{1e-2, 0.9, 0.999, 1e-8, 0.1, true, false};
    for (int it = 0; it < 3; ++it) {
      const Tensor g = randn({5000}).to(model);
      p.set_grad(g);
      cpu_opt.step();
      const Tensor gd = up(g);
      mc::fused_adam({{master.data<float>(), model == DType::Float32 ? nullptr : copy.data_ptr(), gd.data_ptr(), m.data<float>(),
                         v.data<float>(), nullptr, step.data<int64_t>(), 5000, uint8_t(model), uint8_t(model)}},
                       h);
    }
    const Tensor cpu_master = model == DType::Float32 ? p.detach() : cpu_opt.master_weight(0);
    EXPECT_LT(rel_error(down(master), cpu_master), 1e-6) << model;
    if (model != DType::Float32) EXPECT_LT(rel_error(down(copy), p.detach().to(DType::Float32)), tol(model)) << model;
    EXPECT_EQ(mc::to_host(step).item<int64_t>(), 3);
  }
  // SGD with momentum and Nesterov; a skipped step (found_inf set) changes nothing.
  Tensor p = randn({3000});
  p.requires_grad_();
  optim::SGD cpu_opt({p}, 0.05, 0.9, 0.0, 1e-3, true);
  Tensor master = up(p.detach()), buf = up(zeros({3000})), step = up(zeros({}, DType::Int64));
  optim::ParamGroup grp;
  grp.lr = 0.05, grp.momentum = 0.9, grp.dampening = 0.0, grp.weight_decay = 1e-3, grp.nesterov = true;
  for (int it = 0; it < 3; ++it) {
    const Tensor g = randn({3000});
    p.set_grad(g);
    cpu_opt.step();
    const Tensor gd = up(g);
    mc::fused_sgd({{master.data<float>(), nullptr, gd.data_ptr(), buf.data<float>(), step.data<int64_t>(), 3000}}, optim::detail::sgd_scalars(grp));
  }
  EXPECT_LT(rel_error(down(master), p.detach()), 1e-6);
  const Tensor before = down(master), found = up(ones({})), gd = up(randn({3000}));
  mc::fused_sgd({{master.data<float>(), nullptr, gd.data_ptr(), buf.data<float>(), step.data<int64_t>(), 3000}}, optim::detail::sgd_scalars(grp),
                  found.data<float>());
  EXPECT_EQ(rel_error(down(master), before), 0.0);
  EXPECT_EQ(mc::to_host(step).item<int64_t>(), 3);
}

// The public ops on CUDA tensors (backends/cuda/kernels.cuh behind backends/device.hpp).

TEST(CudaOps, KernelTableIsRegisteredByIncludingCudaHpp) {  // runs without a GPU
  const DeviceKernels* k = device_kernels(Device::CUDA);
  ASSERT_NE(k, nullptr);
  for (bool set : {k->to_device != nullptr, k->to_host != nullptr, k->copy != nullptr, k->fill != nullptr, k->binary != nullptr,
                   k->unary != nullptr, k->unary_backward != nullptr, k->sum != nullptr, k->matmul != nullptr, k->softmax != nullptr,
                   k->softmax_backward != nullptr, k->conv_forward != nullptr, k->conv_backward_input != nullptr,
                   k->conv_backward_weight != nullptr, k->batch_norm != nullptr, k->batch_norm_backward != nullptr,
                   k->layer_norm != nullptr, k->layer_norm_backward != nullptr, k->embedding != nullptr,
                   k->embedding_backward != nullptr, k->masked_scale != nullptr, k->adam != nullptr, k->sgd != nullptr,
                   k->unscale != nullptr})
    EXPECT_TRUE(set);
  if (!cuda_is_available()) {
    try {
      (void)randn({2, 3}).to(Device::CUDA);
      ADD_FAILURE() << "to(cuda) without a device was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(cuda_unavailable_reason()), std::string::npos) << e.what();
    }
  }
}

TEST(CudaOps, TrainingStepThroughThePublicOpsMatchesCpu) {
  MIXPREC_REQUIRE_GPU();
  Generator g(3);
  const Tensor x = randn({8, 3, 12, 12}, DType::Float32, g);
  const Tensor w = mul(randn({16, 3, 3, 3}, DType::Float32, g), 0.3), fc = mul(randn({10, 16}, DType::Float32, g), 0.3);
  const Tensor fb = mul(randn({10}, DType::Float32, g), 0.3);  // not zero: a dropped bias must show
  Tensor onehot = zeros({8, 10});
  for (int64_t i = 0; i < 8; ++i) onehot.select(0, i).select(0, i % 10).fill_(1.0);
  auto step = [&](Device d, std::optional<DType> amp, std::vector<Tensor>& grads) {
    // detach: on the CPU, to() returns the tensor itself, and these must be fresh leaves each time.
    std::vector<Tensor> ps{w.to(d).detach().requires_grad_(), fc.to(d).detach().requires_grad_(), fb.to(d).detach().requires_grad_()};
    Tensor rm = zeros({16}, DType::Float32, d), rv = ones({16}, DType::Float32, d);
    Tensor loss;
    {
      std::optional<autocast> ac;
      if (amp) ac.emplace(d, *amp);
      Tensor h = relu(batch_norm(conv2d(x.to(d), ps[0], Tensor(), {1, 1}, {1, 1}), rm, rv, Tensor(), Tensor(), true));
      const Tensor logp = log_softmax(linear(mean(h, {2, 3}), ps[1], ps[2]), 1);
      loss = mul(sum(mul(logp, onehot.to(d))), -1.0 / 8);
    }
    loss.backward();
    grads.clear();
    for (const Tensor& p : ps) grads.push_back(p.grad().cpu());
    grads.push_back(rv.cpu());
    return loss.cpu();
  };
  std::vector<Tensor> gc, gg;
  const Tensor lc = step(Device::CPU, std::nullopt, gc);
  const Tensor lg = step(Device::CUDA, std::nullopt, gg);
  EXPECT_LT(rel_error(lg, lc), 1e-5);
  for (std::size_t i = 0; i < gc.size(); ++i) EXPECT_LT(rel_error(gg[i], gc[i]), 1e-4) << i;
  for (DType amp : {DType::Float16, DType::BFloat16}) {  // 16-bit conv and linear on tensor cores
    if (amp == DType::BFloat16 && !is_bf16_supported(Device::CUDA)) continue;
    const Tensor la = step(Device::CUDA, amp, gg);
    EXPECT_LT(rel_error(la, lc), mixprec::testing::low_tolerance(amp)) << amp;
    for (std::size_t i = 0; i < 3; ++i) EXPECT_LT(rel_error(gg[i], gc[i]), 5 * mixprec::testing::low_tolerance(amp)) << amp << " " << i;
  }
}

// A whole training step on the GPU: ResNet-20 with GradScaler, clip_grad_norm_ and AdamW or SGD
// (the fused kernels behind the optimizers), one step skipped for an overflow, against the CPU.
// Each step's backward runs on both; the GPU then takes the CPU's gradients (scaled), so the
// unscale, clipping and update are compared exactly (Adam's update would magnify the conv
// backward's float32 noise in near-zero gradients; that backward is compared on its own above).
TEST(CudaOps, OptimizerAndGradScalerStepsMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  Generator gd(5);
  const Tensor x = randn({8, 3, 12, 12}, DType::Float32, gd), y = randint(0, 10, {8}, DType::Int64, gd);
  const Tensor xg = x.to(Device::CUDA), yg = y.to(Device::CUDA);
  for (bool sgd : {false, true}) {
    SCOPED_TRACE(sgd ? "SGD" : "AdamW");
    Generator g1(9), g2(9);
    auto cpu = nn::models::resnet20(10, 3, false, g1);
    auto gpu = nn::models::resnet20(10, 3, false, g2);
    gpu->to(Device::CUDA);
    auto make = [&](nn::Module& m) -> std::unique_ptr<optim::Optimizer> {
      if (sgd) return std::make_unique<optim::SGD>(m.parameters(), 0.05, 0.9, 0.0, 1e-4, true);
      return std::make_unique<optim::AdamW>(m.parameters(), 1e-3);
    };
    auto oc = make(*cpu), og = make(*gpu);
    amp::GradScaler sc(1024.0, 2.0, 0.5, 2), sg(1024.0, 2.0, 0.5, 2);
    const auto pc = cpu->parameters(), pg = gpu->parameters();
    for (int it = 0; it < 4; ++it) {
      oc->zero_grad();
      og->zero_grad();
      sc.scale(cross_entropy(cpu->forward(x), y)).backward();
      sg.scale(cross_entropy(gpu->forward(xg), yg)).backward();
      for (std::size_t i = 0; i < pc.size(); ++i) {
        EXPECT_LT(rel_error(pg[i].grad().cpu(), pc[i].grad()), 1e-2) << "parameter " << i << ", iteration " << it;
        pg[i].grad().copy_(pc[i].grad());
      }
      if (it == 1) {  // an overflow in one gradient: the step is skipped, the scale halves
        Tensor bad = pc.front().grad();
        bad.data<float>()[0] = std::numeric_limits<float>::infinity();
        pg.front().grad().copy_(bad);
      }
      double norms[2];
      int k = 0;
      for (auto [opt, scaler] : {std::pair{oc.get(), &sc}, std::pair{og.get(), &sg}}) {
        scaler->unscale_(*opt);
        if (it != 1) norms[k] = optim::clip_grad_norm_(*opt, 1.0);
        EXPECT_EQ(scaler->step(*opt), it != 1);
        scaler->update();
        ++k;
      }
      if (it != 1) EXPECT_NEAR(norms[1], norms[0], 1e-5 * norms[0]) << "iteration " << it;  // float32 sums on the GPU
      EXPECT_EQ(sg.get_scale(), sc.get_scale()) << "iteration " << it;
    }
    for (std::size_t i = 0; i < pc.size(); ++i) {
      EXPECT_EQ(pg[i].device(), Device::CUDA);
      EXPECT_LT(rel_error(pg[i].cpu(), pc[i].detach()), 1e-5) << "parameter " << i;
      EXPECT_EQ(og->state(i).step, oc->state(i).step);
    }
  }
}

// float16 autocast + GradScaler on the GPU: three clean steps (the scale holds) that stay close to
// the float32 CPU run.
TEST(CudaOps, MixedPrecisionTrainingOnTheGpuStaysCloseToFloat32) {
  MIXPREC_REQUIRE_GPU();
  Generator gd(6);
  const Tensor x = randn({16, 3, 12, 12}, DType::Float32, gd), y = randint(0, 10, {16}, DType::Int64, gd);
  Generator g1(4), g2(4);
  auto cpu = nn::models::resnet20(10, 3, false, g1);
  auto gpu = nn::models::resnet20(10, 3, false, g2);
  gpu->to(Device::CUDA);
  optim::SGD oc(cpu->parameters(), 0.05, 0.9), og(gpu->parameters(), 0.05, 0.9);
  amp::GradScaler scaler;
  const Tensor xg = x.to(Device::CUDA), yg = y.to(Device::CUDA);
  double start = 0;
  for (int it = 0; it < 3; ++it) {
    oc.zero_grad();
    cross_entropy(cpu->forward(x), y).backward();
    oc.step();
    og.zero_grad();
    Tensor loss;
    {
      autocast ac(Device::CUDA, DType::Float16);
      loss = cross_entropy(gpu->forward(xg), yg);
    }
    if (it == 0) start = loss.item<double>();
    scaler.scale(loss).backward();
    EXPECT_TRUE(scaler.step(og));
    scaler.update();
  }
  EXPECT_EQ(scaler.get_scale(), 65536.0);
  // The loss each model now reaches in float32 on the batch: the same to within float16's noise,
  // and below where training started.
  no_grad ng;
  const double after_cpu = cross_entropy(cpu->forward(x), y).item<double>();
  const double after_gpu = cross_entropy(gpu->forward(xg), yg).item<double>();
  EXPECT_NEAR(after_gpu, after_cpu, 2e-2 * after_cpu);
  EXPECT_LT(after_gpu, start);
}

// ---- Channels-last (NHWC) activations: DeviceKernels::channels_last on CUDA. Each test is a few
// small shapes, so that all of them run in seconds on the next lent GPU. ----

namespace {
mixprec::detail::ConvGeom conv_geom(const Shape& x, const Shape& w, int64_t stride, int64_t pad, int64_t dil, int64_t groups) {
  mixprec::detail::ConvGeom g;
  g.N = x[0], g.C = x[1], g.H = x[2], g.W = x[3], g.O = w[0], g.KH = w[2], g.KW = w[3];
  g.SH = g.SW = stride, g.PH = g.PW = pad, g.DH = g.DW = dil, g.G = groups;
  g.OH = (g.H + 2 * pad - dil * (g.KH - 1) - 1) / stride + 1;
  g.OW = (g.W + 2 * pad - dil * (g.KW - 1) - 1) / stride + 1;
  return g;
}
// to(cuda) uploads contiguous (copy.hpp); the device tensor is then put in channels-last there.
Tensor up_cl(const Tensor& t) { return up(t).contiguous(MemoryFormat::ChannelsLast); }
bool is_cl(const Tensor& t) { return t.is_contiguous(MemoryFormat::ChannelsLast) && t.suggest_memory_format() == MemoryFormat::ChannelsLast; }
}  // namespace

TEST(CudaChannelsLast, ConvEntriesTakeAndReturnChannelsLastAndMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  const DeviceKernels* k = device_kernels(Device::CUDA);
  ASSERT_TRUE(k->channels_last);
  struct Case {
    Shape x, w;
    int64_t S, P, D, G;
    bool bias;
  };
  // ResNet's 3x3 (stride 1 and 2) and 1x1 projection, a grouped dilated 3x3 and a depthwise one,
  // and the stem of a 1-channel input (C = 1: channels-last strides on NCHW-identical bytes).
  for (const Case& c : {Case{{4, 16, 10, 10}, {16, 16, 3, 3}, 1, 1, 1, 1, false}, Case{{4, 16, 10, 10}, {32, 16, 3, 3}, 2, 1, 1, 1, true},
                        Case{{4, 16, 10, 10}, {32, 16, 1, 1}, 2, 0, 1, 1, false}, Case{{2, 8, 9, 11}, {16, 4, 3, 3}, 1, 2, 2, 2, true},
                        Case{{2, 8, 9, 9}, {8, 1, 3, 3}, 1, 1, 1, 8, false}, Case{{4, 1, 12, 12}, {8, 1, 3, 3}, 1, 1, 1, 1, true}})
    for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
      SCOPED_TRACE(::testing::Message() << "x " << ::testing::PrintToString(c.x) << " w " << ::testing::PrintToString(c.w) << " S" << c.S
                                        << " P" << c.P << " D" << c.D << " G" << c.G << " " << d);
      const mixprec::detail::ConvGeom g = conv_geom(c.x, c.w, c.S, c.P, c.D, c.G);
      const Tensor x = randn(c.x).to(d), w = randn(c.w).to(d), b = c.bias ? randn({c.w[0]}).to(d) : Tensor();
      Tensor xf = x.to(DType::Float32).detach(), wf = w.to(DType::Float32).detach();
      xf.requires_grad_();
      wf.requires_grad_();
      const Tensor y = conv2d(xf, wf, c.bias ? b.to(DType::Float32) : Tensor(), {c.S, c.S}, {c.P, c.P}, {c.D, c.D}, c.G);
      const Tensor dy = randn(y.sizes()).to(d);
      y.backward(dy.to(DType::Float32));
      const Tensor wd = up(w), bd = c.bias ? up(b) : Tensor();
      // Channels-last in, channels-last out, cuDNN NHWC on the tensors' own bytes.
      const Tensor yg = k->conv_forward(g, up_cl(x), wd, bd);
      EXPECT_TRUE(is_cl(yg)) << ::testing::PrintToString(yg.strides());
      EXPECT_LT(rel_error(down(yg), y.detach()), tol(d));
      const Tensor gx = k->conv_backward_input(g, up_cl(dy), wd);
      EXPECT_TRUE(is_cl(gx)) << ::testing::PrintToString(gx.strides());
      EXPECT_LT(rel_error(down(gx), xf.grad()), tol(d));
      const Tensor gw = k->conv_backward_weight(g, up_cl(x), up_cl(dy));
      EXPECT_EQ(gw.sizes(), c.w);
      EXPECT_TRUE(gw.is_contiguous());  // the contract: contiguous [O, C/G, KH, KW]
      EXPECT_LT(rel_error(down(gw), wf.grad()), tol(d));
      // NCHW activations keep the NCHW path and layout.
      const Tensor yn = k->conv_forward(g, up(x), wd, bd);
      EXPECT_TRUE(yn.is_contiguous());
      EXPECT_LT(rel_error(down(yn), y.detach()), tol(d));
    }
}

TEST(CudaChannelsLast, ConvThroughThePublicOpStaysChannelsLast) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::BFloat16}) {
    const Tensor x = randn({4, 8, 9, 9}).to(d), w = randn({16, 8, 3, 3}).to(d), b = randn({16}).to(d);
    Tensor xf = x.to(DType::Float32).detach(), wf = w.to(DType::Float32).detach(), bf = b.to(DType::Float32).detach();
    for (Tensor* t : {&xf, &wf, &bf}) t->requires_grad_();
    const Tensor y = conv2d(xf, wf, bf, {2, 2}, {1, 1});
    const Tensor dy = randn(y.sizes()).to(d);
    y.backward(dy.to(DType::Float32));
    Tensor xg = up_cl(x).detach(), wg = up(w).detach(), bg = up(b).detach();
    for (Tensor* t : {&xg, &wg, &bg}) t->requires_grad_();
    const Tensor yg = conv2d(xg, wg, bg, {2, 2}, {1, 1});
    EXPECT_TRUE(is_cl(yg)) << d;
    EXPECT_LT(rel_error(down(yg), y.detach()), tol(d)) << d;
    yg.backward(up_cl(dy));
    EXPECT_LT(rel_error(down(xg.grad()), xf.grad()), tol(d)) << d;
    EXPECT_LT(rel_error(down(wg.grad()), wf.grad()), tol(d)) << d;
    EXPECT_LT(rel_error(down(bg.grad()), bf.grad()), tol(d)) << d;  // the bias gradient: a sum over channels-last memory
  }
}

TEST(CudaChannelsLast, BatchNormEntriesTakeAndReturnChannelsLastAndMatchCpu) {
  MIXPREC_REQUIRE_GPU();
  const DeviceKernels* k = device_kernels(Device::CUDA);
  // Unit-scale values and values far from zero (mean 500, std 100: SPATIAL_PERSISTENT's reduction
  // range), ResNet's channel counts and an odd one.
  for (const auto& [shape, offset, scale] : {std::tuple{Shape{8, 16, 6, 6}, 0.0, 1.0}, std::tuple{Shape{4, 7, 5, 3}, 0.0, 1.0},
                                             std::tuple{Shape{8, 32, 4, 4}, 500.0, 100.0}})
    for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
      SCOPED_TRACE(::testing::Message() << ::testing::PrintToString(shape) << " offset " << offset << " " << d);
      const int64_t C = shape[1];
      const Tensor x = add(mul(randn(shape), scale), offset).to(d);
      const Tensor w = add(randn({C}), 1.0), b = randn({C});
      Tensor rm = mul(randn({C}), 0.1), rv = add(rand({C}), 0.5);
      const Tensor rm0 = rm.clone(), rv0 = rv.clone();
      Tensor xf = x.to(DType::Float32).detach(), wf = w.clone(), bf = b.clone();
      for (Tensor* t : {&xf, &wf, &bf}) t->requires_grad_();
      const Tensor y = batch_norm(xf, rm, rv, wf, bf, true, 0.1, 1e-5);
      const Tensor dy = randn(shape).to(d);
      y.backward(dy.to(DType::Float32));
      Tensor grm = up(rm0), grv = up(rv0);
      const auto [yg, mean, invstd] = k->batch_norm(up_cl(x), up(w), up(b), grm, grv, true, 0.1, 1e-5);
      EXPECT_TRUE(is_cl(yg));
      EXPECT_LT(rel_error(down(yg), y.detach()), tol(d));
      EXPECT_LT(rel_error(down(grm), rm), 1e-5);  // float32 statistics whatever x's dtype
      EXPECT_LT(rel_error(down(grv), rv), 1e-5);
      const auto [dx, dw, db] = k->batch_norm_backward(up_cl(x), up_cl(dy), up(w), mean, invstd, 1e-5);
      EXPECT_TRUE(is_cl(dx));
      // dx: as the NCHW test's bound for float32 (a difference of two sums per channel).
      EXPECT_LT(rel_error(down(dx), xf.grad()), d == DType::Float32 ? 1e-4 : 2 * tol(d));
      EXPECT_LT(rel_error(down(dw), wf.grad()), d == DType::Float32 ? 1e-4 : tol(d));
      EXPECT_LT(rel_error(down(db), bf.grad()), d == DType::Float32 ? 1e-5 : tol(d));
      // Eval mode: the running statistics, channels-last out.
      const Tensor ye = k->batch_norm(up_cl(x), up(w), up(b), up(rm0), up(rv0), false, 0.1, 1e-5)[0];
      EXPECT_TRUE(is_cl(ye));
      EXPECT_LT(rel_error(down(ye), batch_norm(x.to(DType::Float32), rm0.clone(), rv0.clone(), w, b, false)), tol(d));
    }
}

TEST(CudaChannelsLast, ElementwiseResultsKeepTheLayout) {
  MIXPREC_REQUIRE_GPU();
  for (DType d : {DType::Float32, DType::BFloat16}) {
    const Tensor a = randn({4, 8, 5, 6}).to(d), b = randn({4, 8, 5, 6}).to(d), bias = randn({1, 8, 1, 1}).to(d);
    const Tensor ag = up_cl(a), bg = up_cl(b);
    const Tensor r = relu(ag), s = add(ag, bg), m = mul(ag, 2.0), c = ag.to(DType::Float32), bb = add(ag, up(bias));
    for (const Tensor* t : {&r, &s, &m, &c, &bb}) EXPECT_TRUE(is_cl(*t)) << d << " " << ::testing::PrintToString(t->strides());
    const Tensor af = a.to(DType::Float32), bf = b.to(DType::Float32);
    EXPECT_LT(rel_error(down(r), relu(af)), tol(d));
    EXPECT_LT(rel_error(down(s), add(af, bf)), tol(d));
    EXPECT_LT(rel_error(down(m), mul(af, 2.0)), tol(d));
    EXPECT_EQ(rel_error(down(c), af), 0.0);
    EXPECT_LT(rel_error(down(bb), add(af, bias.to(DType::Float32))), tol(d));
    // ReLU's gradient in the activation's layout, the incoming gradient NCHW (mean's backward).
    const Tensor gr = device_kernels(Device::CUDA)->unary_backward(DeviceUnary::Relu, up(b), ag, ag);
    EXPECT_TRUE(is_cl(gr));
    Tensor ar = af.detach().clone();
    ar.requires_grad_();
    relu(ar).backward(bf);
    EXPECT_LT(rel_error(down(gr), ar.grad()), tol(d));
    // ResNet's global pool on a device (a mean over a split view) and sums over channels-last memory.
    EXPECT_LT(rel_error(down(adaptive_avg_pool2d(ag, {1, 1})), adaptive_avg_pool2d(af, {1, 1})), tol(d));
    EXPECT_LT(rel_error(down(sum(ag, {0, 2, 3})), sum(af, {0, 2, 3})), tol(d));
    EXPECT_LT(rel_error(down(sum(ag)), sum(af)), tol(d));
  }
}

namespace {
int g_cuda_copies = 0;
const DeviceKernels* g_real_cuda = nullptr;
}  // namespace

// A ResNet basic block's training step (conv-BN-ReLU-conv-BN-add-ReLU, forward and backward) on the
// GPU with a channels-last input against the same step on an NCHW input: the same loss, output and
// gradients, the channels-last output still channels-last, and no layout copy in its forward
// (every copy and cast goes through the table's copy entry, counted here; float32 has no casts).
TEST(CudaChannelsLast, ResNetBlockStepMatchesNchwWithoutReorders) {
  MIXPREC_REQUIRE_GPU();
  Generator gen(11);
  const int64_t C = 16;
  const Tensor x = randn({8, C, 10, 10}, DType::Float32, gen), r = randn({8, C, 10, 10}, DType::Float32, gen);
  const Tensor w1 = mul(randn({C, C, 3, 3}, DType::Float32, gen), 0.1), w2 = mul(randn({C, C, 3, 3}, DType::Float32, gen), 0.1);
  const Tensor g1 = add(randn({C}, DType::Float32, gen), 1.0), b1 = randn({C}, DType::Float32, gen);
  struct Out {
    Tensor loss, y;
    std::vector<Tensor> grads;  // w1, w2, gamma1, beta1, gamma2, beta2, x, then the running variances
    int forward_copies = 0;
    bool y_channels_last = false;
  };
  auto step = [&](bool cl, std::optional<DType> amp) {
    Out o;
    std::vector<Tensor> ps;
    for (const Tensor* p : {&w1, &w2, &g1, &b1, &g1, &b1}) ps.push_back(up(*p).detach().requires_grad_());
    Tensor xd = cl ? up_cl(x) : up(x);
    xd = xd.detach().requires_grad_();
    const Tensor rd = cl ? up_cl(r) : up(r);
    Tensor rm1 = up(zeros({C})), rv1 = up(ones({C})), rm2 = up(zeros({C})), rv2 = up(ones({C}));
    {
      std::optional<autocast> ac;
      if (amp) ac.emplace(Device::CUDA, *amp);
      mixprec::testing::ScopedKernels counting(Device::CUDA, *device_kernels(Device::CUDA));
      g_real_cuda = counting.prev;
      g_cuda_copies = 0;
      counting.table.copy = [](const Tensor& dst, const Tensor& src) {
        ++g_cuda_copies;
        g_real_cuda->copy(dst, src);
      };
      Tensor h = relu(batch_norm(conv2d(xd, ps[0], Tensor(), {1, 1}, {1, 1}), rm1, rv1, ps[2], ps[3], true));
      h = batch_norm(conv2d(h, ps[1], Tensor(), {1, 1}, {1, 1}), rm2, rv2, ps[4], ps[5], true);
      o.y = relu(add(h, xd));
      o.forward_copies = g_cuda_copies;
    }
    o.y_channels_last = is_cl(o.y);
    o.loss = div(sum(mul(o.y.to(DType::Float32), rd)), static_cast<double>(x.numel()));
    o.loss.backward();
    for (const Tensor& p : ps) o.grads.push_back(down(p.grad()));
    o.grads.push_back(down(xd.grad()));
    o.grads.push_back(down(rv1));
    o.grads.push_back(down(rv2));
    o.loss = o.loss.cpu();
    o.y = down(o.y);
    return o;
  };
  for (std::optional<DType> amp : {std::optional<DType>{}, std::optional<DType>{DType::BFloat16}, std::optional<DType>{DType::Float16}}) {
    SCOPED_TRACE(amp ? name(*amp) : "float32");
    const double t = amp ? mixprec::testing::low_tolerance(*amp) : 1e-5;
    const Out n = step(false, amp), c = step(true, amp);
    EXPECT_TRUE(c.y_channels_last);
    EXPECT_FALSE(n.y_channels_last);
    if (!amp) EXPECT_EQ(c.forward_copies, 0) << "a channels-last activation was reordered (or copied) in the forward";
    EXPECT_LT(rel_error(c.loss, n.loss), t);
    EXPECT_LT(rel_error(c.y, n.y), t);
    // Gradients through two batch norms: float32 as the other BN tests' backward bound.
    for (std::size_t i = 0; i < n.grads.size(); ++i) EXPECT_LT(rel_error(c.grads[i], n.grads[i]), amp ? 2 * t : 1e-4) << "gradient " << i;
  }
}
