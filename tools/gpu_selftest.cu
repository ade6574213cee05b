// mixprec_gpu_selftest: every CUDA op against the CPU reference (max abs and relative norm
// errors), GEMM throughput in float32, tf32, bfloat16 and float16, and ResNet-20 and GPT-mini
// training steps (forward, backward and optimizer through the public ops on CUDA tensors) against
// the CPU, timed in fp32 and AMP.
// Exit codes: 0 all within tolerance; 1 an op exceeded its tolerance; 77 no usable CUDA device
// (the reason is printed; ctest reports the test as skipped).
#include <cstdio>
#include <functional>
#include <string>

#include <mixprec/cuda.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
namespace mc = mixprec::gpu;

namespace gpu_selftest {  // named: tools/gpu_tools.cu compiles both tools in one unit
int failures = 0;

Tensor up(const Tensor& t) { return mc::to_device(t); }
Tensor down(const Tensor& t) { return mc::to_host(mc::contiguous(t)).to(DType::Float64); }

void report(const std::string& what, const Tensor& got_cuda, const Tensor& ref, double limit) {
  const Tensor g = down(got_cuda), r = ref.detach().to(DType::Float64).contiguous();
  const double* pg = g.data<double>();
  const double* pr = r.data<double>();
  double max_abs = 0, num = 0, den = 0;
  bool nan = g.numel() != r.numel();
  for (int64_t i = 0; i < r.numel() && !nan; ++i) {
    nan |= std::isnan(pg[i]) || std::isnan(pr[i]);
    max_abs = std::max(max_abs, std::abs(pg[i] - pr[i]));
    num += (pg[i] - pr[i]) * (pg[i] - pr[i]);
    den += pr[i] * pr[i];
  }
  const double rel = nan ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
  const bool ok = rel <= limit;
  failures += !ok;
  std::printf("  %-44s max abs err %-11.3e rel err %-11.3e (tol %.0e) %s\n", what.c_str(), max_abs, rel, limit, ok ? "ok" : "FAIL");
}

double tol(DType d) { return d == DType::Float32 ? 1e-5 : d == DType::Float16 ? 2e-3 : 1e-2; }

void check_ops() {
  std::printf("ops against the CPU reference:\n");
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const std::string dn(name(d));
    const Tensor a = randn({96, 200}).to(d), b = randn({200, 136}).to(d), bias = randn({136}).to(d);
    const Tensor ref = matmul(a.to(DType::Float32), b.to(DType::Float32));
    report("matmul " + dn, mc::matmul(up(a), up(b)), ref, tol(d));
    const Tensor at = randn({4, 40, 24}).to(d), bt = randn({4, 40, 32}).to(d);
    report("matmul transposed, batched " + dn, mc::matmul(up(at).transpose(-2, -1), up(bt)),
           matmul(at.to(DType::Float32).transpose(-2, -1), bt.to(DType::Float32)), tol(d));
    report("linear + bias + gelu(tanh) epilogue " + dn, mc::linear(up(a), up(b.t().contiguous()), up(bias), mc::GemmEpilogue::GeluTanh),
           gelu(add(ref, bias.to(DType::Float32)), "tanh"), tol(d));

    mc::ConvShape s;
    s.N = 4, s.C = 16, s.H = s.W = 16, s.O = 32, s.KH = s.KW = 3, s.PH = s.PW = 1, s.dtype = d;
    s.layout = d == DType::Float32 ? mc::ConvLayout::NCHW : mc::ConvLayout::NHWC;
    const bool nhwc = s.layout == mc::ConvLayout::NHWC;
    const Tensor x = randn({4, 16, 16, 16}).to(d), w = randn({32, 16, 3, 3}).to(d);
    Tensor xf = x.to(DType::Float32), wf = w.to(DType::Float32);
    xf.requires_grad_();
    wf.requires_grad_();
    const Tensor y = conv2d(xf, wf, Tensor(), {1, 1}, {1, 1});
    const Tensor dy = randn(y.sizes()).to(d);
    y.backward(dy.to(DType::Float32));
    auto in = [&](const Tensor& t) { return up(nhwc ? t.permute({0, 2, 3, 1}).contiguous() : t); };
    auto out = [&](const Tensor& t) { return nhwc ? mc::contiguous(t.permute({0, 3, 1, 2})) : t; };
    const std::string ln = nhwc ? " NHWC " : " NCHW ";
    report("conv2d forward" + ln + dn, out(mc::conv2d_forward(s, in(x), in(w))), y, tol(d));
    report("conv2d backward data" + ln + dn, out(mc::conv2d_backward_data(s, in(dy), in(w))), xf.grad(), tol(d));
    report("conv2d backward filter" + ln + dn, out(mc::conv2d_backward_filter(s, in(x), in(dy))), wf.grad(), tol(d));

    const Tensor z = randn({32, 1000}).to(d);
    report("softmax " + dn, mc::softmax(up(z), 1), softmax(z.to(DType::Float32), 1), tol(d));
    report("log_softmax " + dn, mc::softmax(up(z), 1, true), log_softmax(z.to(DType::Float32), 1), tol(d));
    report("gelu " + dn, mc::activation(mc::Activation::Gelu, up(z)), gelu(z.to(DType::Float32)), tol(d));
    report("silu " + dn, mc::activation(mc::Activation::Silu, up(z)), silu(z.to(DType::Float32)), tol(d));
    report("sum (CUB) " + dn, mc::sum(up(z)), sum(z.to(DType::Float32)), 1e-5);
    report("exp " + dn, mc::activation(mc::Activation::Exp, up(z)), exp(z.to(DType::Float32)), tol(d));

    // GPT-mini's ops at its shapes: [batch 32 x 128 tokens, 256].
    const Tensor h = randn({4096, 256}).to(d), lw = randn({256}), lb = randn({256});
    const mc::LayerNormResult ln_r = mc::layer_norm(up(h), up(lw), up(lb), 1e-5);
    report("layer_norm " + dn, ln_r.y, layer_norm(h.to(DType::Float32), {256}, lw, lb), tol(d));
    const Tensor keep = gt(rand({4096, 256}), 0.1);
    report("dropout (masked scale) " + dn, mc::masked_scale(up(h), up(keep), 1.0 / 0.9),
           mul(mul(h.to(DType::Float32), keep.to(DType::Float32)), 1.0 / 0.9), tol(d));
    const Tensor q = randn({32, 4, 128, 64}).to(d), k = randn({32, 4, 128, 64}).to(d), v = randn({32, 4, 128, 64}).to(d);
    report("scaled_dot_product_attention causal " + dn, scaled_dot_product_attention(up(q), up(k), up(v), Tensor(), 0.0, true),
           scaled_dot_product_attention(q.to(DType::Float32), k.to(DType::Float32), v.to(DType::Float32), Tensor(), 0.0, true),
           d == DType::Float32 ? 1e-5 : 2 * tol(d));
  }
  const Tensor emb = randn({256, 256}), ids = randint(0, 256, {4096}, DType::Int64);
  report("embedding float32", mc::embedding(up(emb), up(ids)), embedding(emb, ids), 0.0);
  const Tensor x = randn({16, 8, 10, 10}), w = randn({8}), b = randn({8});
  Tensor rm = zeros({8}), rv = ones({8});
  const Tensor y = batch_norm(x, rm, rv, w, b, true, 0.1, 1e-5);
  report("batch_norm (training) float32", mc::batch_norm_training(up(x), up(w), up(b), up(zeros({8})), up(ones({8})), 0.1, 1e-5).y, y, 1e-5);

  // AdamW on a bfloat16 model: float32 masters and bfloat16 copies written in one kernel.
  const int64_t n = 100000;
  Tensor p = randn({n}).to(DType::BFloat16);
  Tensor master = up(p.to(DType::Float32)), copy = up(p), m = up(zeros({n})), v = up(zeros({n}));
  Tensor step = up(zeros({}, DType::Int64));
  p.requires_grad_();
  optim::AdamW opt({p}, 1e-3);
  const Tensor g = randn({n}).to(DType::BFloat16);
  p.set_grad(g);
  opt.step();
  const Tensor gd = up(g);
  mc::fused_adam({{master.data<float>(), copy.data_ptr(), gd.data_ptr(), m.data<float>(), v.data<float>(), nullptr, step.data<int64_t>(), n,
                   uint8_t(DType::BFloat16), uint8_t(DType::BFloat16)}},
                 optim::detail::adam_hyper(opt.param_groups()[0], true));
  report("fused AdamW, float32 masters", master, opt.master_weight(0), 1e-6);
  report("fused AdamW, bfloat16 model copy", copy, p.detach(), 1e-2);
  std::printf("\n");
}

// Square n x n x n GEMMs: TFLOP/s from CUDA events over `iters` runs after a warm-up.
void gemm_throughput() {
  std::printf("GEMM throughput (cuBLASLt, float32 accumulation):\n");
  struct Mode {
    const char* name;
    DType dtype;
    bool tf32;
  };
  for (int64_t n : {4096, 8192})
    for (const Mode& mode : {Mode{"float32", DType::Float32, false}, Mode{"tf32", DType::Float32, true},
                             Mode{"bfloat16", DType::BFloat16, false}, Mode{"float16", DType::Float16, false}}) {
      const Tensor a = up(randn({n, n}).to(mode.dtype)), b = up(randn({n, n}).to(mode.dtype));
      Tensor out = empty({n, n}, mode.dtype, Device::CUDA);
      const mc::GemmPlan plan = mc::plan_gemm(mc::gemm_request(a, b, out, Tensor(), mc::GemmEpilogue::None, mode.tf32));
      mc::run_gemm(plan);
      const double ms = mc::time_ms(20, [&] { mc::run_gemm(plan); });
      const double tflops = 2.0 * double(n) * double(n) * double(n) / (ms * 1e-3) / 1e12;
      std::printf("  n=%-5lld %-9s %8.1f TFLOP/s  (tensor-core aligned: %s)\n", static_cast<long long>(n), mode.name, tflops,
                  plan.tensor_core_aligned ? "yes" : "no");
    }
}
// ResNet-20's forward at batch 128, module by module against the CPU model (fp32): where a
// mismatch starts, and the ops at the shapes it uses.
void resnet20_layers() {
  std::printf("ResNet-20 forward, batch 128, module by module (fp32):\n");
  Generator g1(7), g2(7), gd(8);
  auto cpu = nn::models::resnet20(10, 3, false, g1);
  auto gpu = nn::models::resnet20(10, 3, false, g2);
  gpu->to(Device::CUDA);
  Tensor yc = randn({128, 3, 32, 32}, DType::Float32, gd), yg = yc.to(Device::CUDA);
  no_grad ng;
  auto both = [&](const std::string& what, nn::Module& mc_, nn::Module& mg) {
    yc = mc_.forward(yc);
    yg = mg.forward(yg);
    report(what, yg, yc, 1e-5);
  };
  both("stem conv", *cpu->conv1, *gpu->conv1);
  both("stem batch_norm", *cpu->bn1, *gpu->bn1);
  both("stem relu", *cpu->relu, *gpu->relu);
  for (std::size_t s = 0; s < cpu->stages.size(); ++s) both("stage " + std::to_string(s + 1), *cpu->stages[s], *gpu->stages[s]);
  both("avgpool", *cpu->avgpool, *gpu->avgpool);
  yc = yc.flatten(1);
  yg = yg.flatten(1);
  both("fc", *cpu->fc, *gpu->fc);
  // The ops alone at those shapes.
  const Tensor x = randn({128, 16, 32, 32}), w1 = randn({32, 16, 1, 1}), w3 = randn({16, 16, 3, 3});
  report("conv2d 3x3 16->16 at 128x16x32x32", conv2d(up(x), up(w3), Tensor(), {1, 1}, {1, 1}), conv2d(x, w3, Tensor(), {1, 1}, {1, 1}), 1e-5);
  report("conv2d 1x1 stride 2 16->32", conv2d(up(x), up(w1), Tensor(), {2, 2}), conv2d(x, w1, Tensor(), {2, 2}), 1e-5);
  Tensor rm = zeros({16}), rv = ones({16}), rmg = up(rm), rvg = up(rv);
  report("batch_norm training at 128x16x32x32", batch_norm(up(x), rmg, rvg, Tensor(), Tensor(), true),
         batch_norm(x, rm, rv, Tensor(), Tensor(), true), 1e-5);
  report("mean over {2, 3} at 128x16x32x32", mean(up(x), {2, 3}), mean(x, {2, 3}), 1e-5);
  report("sum over {0, 2, 3} at 128x16x32x32", sum(up(x), {0, 2, 3}), sum(x, {0, 2, 3}), 1e-5);
  std::printf("\n");
}

// Milliseconds per training step of `loss` (forward, backward, opt's step) in fp32, fp16 autocast
// with GradScaler, and bf16 autocast, after a warm-up (cuDNN algorithm choice, allocator cache),
// with the peak device memory of the timed steps.
template <class Loss>
void time_steps(optim::Optimizer& opt, Loss&& loss_fn) {
  struct Mode {
    const char* name;
    std::optional<DType> amp;
  };
  double fp32_ms = 0;
  for (const Mode& m : {Mode{"fp32", std::nullopt}, Mode{"fp16 autocast", DType::Float16}, Mode{"bf16 autocast", DType::BFloat16}}) {
    if (m.amp == DType::BFloat16 && !is_bf16_supported(Device::CUDA)) continue;
    amp::GradScaler scaler(65536.0, 2.0, 0.5, 2000, m.amp == DType::Float16);  // loss scaling for float16 only
    int skipped = 0;
    auto step = [&] {
      opt.zero_grad();
      std::optional<autocast> ac;
      if (m.amp) ac.emplace(Device::CUDA, *m.amp);
      Tensor loss = loss_fn();
      ac.reset();
      scaler.scale(loss).backward();
      skipped += !scaler.step(opt);
      scaler.update();
    };
    for (int i = 0; i < 3; ++i) step();
    mc::synchronize();
    reset_peak_memory_stats(Device::CUDA);
    skipped = 0;
    const double per = mc::time_ms(20, step);
    if (!m.amp) fp32_ms = per;
    std::printf("  %-14s %8.2f ms/step  %6.2fx fp32  peak %.1f MiB  (%d of 20 steps skipped)\n", m.name, per, fp32_ms / per,
                double(memory_stats(Device::CUDA).peak_allocated_bytes) / (1 << 20), skipped);
  }
  std::printf("\n");
}

// ResNet-20 at batch 128 on 32x32 inputs: loss and gradients against the CPU model, then
// milliseconds per training step (forward, backward, SGD with momentum through the fused kernel;
// under fp16 autocast also GradScaler's unscale and skip check) and peak device memory.
void resnet20_step() {
  std::printf("ResNet-20 training step, batch 128, 3x32x32 (public ops on CUDA tensors, SGD momentum 0.9):\n");
  Generator g0(7), g1(7), g2(7), gd(8);
  auto ref = nn::models::resnet20(10, 3, false, g0);
  auto cpu = nn::models::resnet20(10, 3, false, g1);
  auto gpu = nn::models::resnet20(10, 3, false, g2);
  ref->to(DType::Float64);
  gpu->to(Device::CUDA);
  const Tensor x = randn({128, 3, 32, 32}, DType::Float32, gd), y = randint(0, 10, {128}, DType::Int64, gd);
  const Tensor xd = x.to(Device::CUDA), yd = y.to(Device::CUDA);
  cross_entropy(ref->forward(x.to(DType::Float64)), y).backward();
  const Tensor lc = cross_entropy(cpu->forward(x), y);
  lc.backward();
  const Tensor lg = cross_entropy(gpu->forward(xd), yd);
  lg.backward();
  report("resnet20 loss (fp32)", lg, lc, 1e-5);
  // Gradients against a float64 CPU model: the GPU's float32 error may be up to twice the CPU's
  // float32 error (BatchNorm's backward cancels large terms, so both are far above 1e-6).
  const auto pr = ref->parameters(), pc = cpu->parameters(), pg = gpu->parameters();
  for (const auto& [what, i] : {std::pair<const char*, std::size_t>{"first conv", 0}, {"fc", pc.size() - 2}}) {
    const double cpu_err = mixprec::testing::rel_error(pc[i].grad(), pr[i].grad());
    report(std::string("resnet20 ") + what + " weight grad (fp32) vs float64", pg[i].grad(), pr[i].grad(), 2 * cpu_err + 1e-6);
    std::printf("    (the CPU's float32 gradient: rel err %.3e)\n", cpu_err);
  }
  optim::SGD oc(cpu->parameters(), 0.05, 0.9), og(gpu->parameters(), 0.05, 0.9);
  for (std::size_t i = 0; i < pg.size(); ++i) pg[i].grad().copy_(pc[i].grad());  // the same gradients: the update alone
  oc.step();
  og.step();
  report("resnet20 SGD step on the same gradients", pg.front(), pc.front(), 1e-6);
  time_steps(og, [&] { return cross_entropy(gpu->forward(xd), yd); });
}

// GPT-mini (4 layers, d_model 256, 4 heads, 128 tokens, byte vocabulary) at batch 32: loss and
// gradients with dropout 0.1 against the CPU model with the same draws, then milliseconds per
// AdamW step in fp32 and AMP.
void gpt_mini_step() {
  std::printf("GPT-mini training step, batch 32 x 128 tokens (4 layers, d_model 256, 4 heads, AdamW):\n");
  nn::models::GPTConfig cfg;
  cfg.vocab = 256, cfg.block_size = 128, cfg.n_layer = 4, cfg.n_head = 4, cfg.d_model = 256, cfg.mlp_hidden = 1024, cfg.dropout = 0.1;
  Generator g1(7), g2(7), gd(8);
  nn::models::GPT cpu(cfg, g1), gpu(cfg, g2);
  gpu.to(Device::CUDA);
  const Tensor idx = randint(0, 256, {32, 128}, DType::Int64, gd), tgt = randint(0, 256, {32, 128}, DType::Int64, gd);
  const Tensor idd = idx.to(Device::CUDA), tgd = tgt.to(Device::CUDA);
  manual_seed(9);
  const Tensor lc = cpu.loss(idx, tgt);
  lc.backward();
  manual_seed(9);
  const Tensor lg = gpu.loss(idd, tgd);
  lg.backward();
  report("gpt-mini loss (fp32, same dropout draws)", lg, lc, 1e-5);
  const auto pc = cpu.named_parameters(), pg = gpu.named_parameters();
  for (std::size_t i : {std::size_t{0}, std::size_t{3}, pc.size() - 1})
    report("gpt-mini grad " + pc[i].first, pg[i].second.grad(), pc[i].second.grad(), 1e-4);
  // Timed without dropout: its masks are drawn on the host (the CPU's stream) and copied over,
  // which would time the host's random numbers rather than the GPU.
  cfg.dropout = 0.0;
  Generator g3(7);
  nn::models::GPT timed(cfg, g3);
  timed.to(Device::CUDA);
  optim::AdamW og(timed.parameters(), 3e-4);
  time_steps(og, [&] { return timed.loss(idd, tgd); });
}
}  // namespace gpu_selftest

int mixprec_gpu_selftest_main(int, char**) {
  using namespace gpu_selftest;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // piped output: keep every finished line if a later step dies
  if (!cuda_is_available()) {
    std::printf("mixprec_gpu_selftest: no usable CUDA device (%s); nothing was run\n", cuda_unavailable_reason().c_str());
    return 77;
  }
  try {
    check_ops();
    gemm_throughput();
    resnet20_layers();
    resnet20_step();
    gpt_mini_step();
  } catch (const Error& e) {
    std::printf("mixprec_gpu_selftest: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", failures ? "SOME OPS EXCEEDED THEIR TOLERANCE" : "all ops within tolerance");
  return failures ? 1 : 0;
}
