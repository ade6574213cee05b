// mixprec_gpu_bench: the mixprec side of the GPU timing table (issue 17, part 8). Training steps
// (forward, backward, optimizer; fp16 with the GradScaler) of the workloads of issue 17's table,
// through the public API only, timed with CUDA events after a warm-up: the median over a few
// timed windows of several steps each, and the peak tensor memory of the timed steps. Also the
// element-wise bandwidth of the public ops on contiguous tensors of >= 64 MB, against the
// device-to-device cudaMemcpy rate measured in the same run.
// benchmarks/peers/torch_gpu.py prints the same lines for PyTorch; benchmarks/peers/gpu_table.py
// merges both into a Markdown table; scripts/gpu_check.sh runs the two alternately.
//
// One machine-readable line per result:
//   BENCH mixprec <workload> <precision> ms_per_step=<x> peak_mib=<y> skipped=<k> steps=<n>
//   BENCH mixprec bw_<name> <dtype> gbps=<x> pct_of_copy=<y>
// Workloads: gpt12 (GPT 12 layers, d_model 768, 12 heads, seq 256, batch 32, byte vocabulary,
// AdamW lr 3e-4 + clip_grad_norm_ 1.0, dropout 0), gpt2l (the same, 2 layers), resnet20 (batch
// 128, 3x32x32 channels-last, 10 classes, SGD lr 0.05 momentum 0.9; resnet20-nchw, opt-in: the
// same on an NCHW batch), gptmini (4 layers, d 256, 4 heads, seq 128,
// batch 32, AdamW lr 3e-4, no clipping, as the selftest's), bandwidth.
// Precisions: fp32, bf16 (autocast), fp16 (autocast + GradScaler).
//
// Exit codes: 0 every workload ran; 1 one failed (the others still run and print); 2 bad
// arguments; 77 no usable CUDA device (ctest reports the test as skipped).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include <mixprec/cuda.hpp>

using namespace mixprec;
namespace mc = mixprec::gpu;

namespace gpu_bench {  // named: tools/gpu_tools.cu compiles both tools in one unit

struct Options {
  std::vector<std::string> workloads{"gpt12", "gpt2l", "resnet20", "gptmini", "bandwidth"};
  std::vector<std::string> precisions{"fp32", "bf16", "fp16"};
  int steps = 0;  // steps per timed window; 0: the workload's default
  int windows = 3;
  int warmup = 3;
  int64_t bw_rows = 8192, bw_cols = 4096;  // 32 M elements: 128 MB in float32, 64 MB in bfloat16
  // Workloads also timed as a CapturedStep (one CUDA graph per step), printed as precision "<p>-graph".
  std::vector<std::string> graph_workloads{"resnet20", "gptmini"};
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = std::min(s.find(',', pos), s.size());
    if (comma > pos) out.push_back(s.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

void usage() {
  std::printf(
      "usage: mixprec_gpu_bench [--workloads gpt12,gpt2l,resnet20,gptmini,bandwidth] [--precisions fp32,bf16,fp16]\n"
      "                         [--steps N (per timed window; default per workload: gpt12 5, gpt2l 10, resnet20 20, gptmini 20)]\n"
      "                         [--windows W (default 3; the median is printed)] [--warmup K (default 3)]\n"
      "                         [--bw-rows R --bw-cols C (bandwidth tensors, default 8192 x 4096)]\n"
      "                         [--graph resnet20,gptmini (also timed as a CapturedStep: precision <p>-graph; 'none' for none)]\n"
      "  resnet20 runs a channels-last batch (as the PyTorch peer); resnet20-nchw (not in the default list) the same on NCHW\n");
}


// The median of `windows` windows of `iters` calls each, in ms per call.
template <class F>
double median_ms(int windows, int iters, F&& f) {
  std::vector<double> w;
  for (int i = 0; i < windows; ++i) w.push_back(mc::time_ms(iters, f));
  std::sort(w.begin(), w.end());
  return w.size() % 2 ? w[w.size() / 2] : 0.5 * (w[w.size() / 2 - 1] + w[w.size() / 2]);
}

std::optional<DType> amp_dtype(const std::string& precision) {
  if (precision == "bf16") return DType::BFloat16;
  if (precision == "fp16") return DType::Float16;
  return std::nullopt;
}

int failures = 0;

// Times the training step loss_fn -> backward -> (unscale_, clip) -> step in one precision.
template <class Loss>
void time_precision(const Options& o, const std::string& workload, const std::string& p, int steps, std::optional<DType> amp,
                    optim::Optimizer& opt, double clip, Loss& loss_fn) {
  amp::GradScaler scaler(65536.0, 2.0, 0.5, 2000, amp == DType::Float16);  // loss scaling for float16 only
  auto step = [&]() -> Tensor {
    opt.zero_grad();
    Tensor loss;
    {
      std::optional<autocast> ac;
      if (amp) ac.emplace(Device::CUDA, *amp);
      loss = loss_fn();
    }
    scaler.scale(loss).backward();
    if (clip > 0) {
      scaler.unscale_(opt);
      (void)optim::clip_grad_norm_(opt, clip);  // the norm is not read (reading it may wait for the device)
    }
    (void)scaler.step(opt);  // its result is not read: reading it may wait for the device
    scaler.update();
    return loss;
  };
  // Every skipped step halves the scale and none grows it within 2000 steps: the skipped steps
  // are counted from the scale before and after, without a host synchronisation inside the steps.
  auto timed = [&](const std::string& label, auto&& one) {
    for (int i = 0; i < o.warmup; ++i) one();
    mc::synchronize();
    reset_peak_memory_stats(Device::CUDA);
    const double scale_before = scaler.get_scale();
    const double ms = median_ms(o.windows, steps, one);
    const double scale_after = scaler.get_scale();
    const int skipped = scale_after > 0 ? static_cast<int>(std::lround(std::log2(scale_before / scale_after))) : -1;
    std::printf("BENCH mixprec %s %s ms_per_step=%.3f peak_mib=%.1f skipped=%d steps=%d\n", workload.c_str(), label.c_str(), ms,
                double(memory_stats(Device::CUDA).peak_allocated_bytes) / (1 << 20), skipped, o.windows * steps);
  };
  timed(p, [&] { (void)step(); });
  if (std::find(o.graph_workloads.begin(), o.graph_workloads.end(), workload) != o.graph_workloads.end()) {
    // The same step recorded once into a CUDA graph (after one eager warm-up call) and replayed.
    CapturedStep captured([&](const std::vector<Tensor>&) { return step(); });
    timed(p + "-graph", [&] { (void)captured({}); });
  }
}

// Each precision in turn on one model and optimizer (in the order given, as torch_gpu.py does).
template <class Loss>
void time_training(const Options& o, const std::string& workload, int default_steps, optim::Optimizer& opt, double clip,
                   Loss&& loss_fn) {
  const int steps = o.steps > 0 ? o.steps : default_steps;
  for (const std::string& p : o.precisions) {
    const std::optional<DType> amp = amp_dtype(p);
    if (amp == DType::BFloat16 && !is_bf16_supported(Device::CUDA)) {
      std::printf("# %s %s: bfloat16 is not supported on this device; skipped\n", workload.c_str(), p.c_str());
      continue;
    }
    try {
      time_precision(o, workload, p, steps, amp, opt, clip, loss_fn);
    } catch (const std::exception& e) {  // the next precision still runs
      std::printf("# %s %s failed: %s\n", workload.c_str(), p.c_str(), e.what());
      failures++;
    }
  }
}

void gpt(const Options& o, const std::string& workload) {
  nn::models::GPTConfig cfg;
  cfg.vocab = 256, cfg.dropout = 0.0;
  int64_t batch = 32;
  int default_steps = 10;
  double clip = 1.0;
  if (workload == "gptmini") {
    cfg.n_layer = 4, cfg.d_model = 256, cfg.n_head = 4, cfg.block_size = 128, default_steps = 20, clip = 0;
  } else {
    cfg.n_layer = workload == "gpt12" ? 12 : 2, cfg.d_model = 768, cfg.n_head = 12, cfg.block_size = 256;
    default_steps = workload == "gpt12" ? 5 : 10;
  }
  cfg.mlp_hidden = 4 * cfg.d_model;
  Generator gi(7), gd(8);
  nn::models::GPT model(cfg, gi);
  model.to(Device::CUDA);
  const Tensor idx = randint(0, cfg.vocab, {batch, cfg.block_size}, DType::Int64, gd).to(Device::CUDA);
  const Tensor tgt = randint(0, cfg.vocab, {batch, cfg.block_size}, DType::Int64, gd).to(Device::CUDA);
  std::printf("# %s: GPT %lld layers, d_model %lld, %lld heads, seq %lld, batch %lld, %lld parameters, AdamW lr 3e-4%s\n",
              workload.c_str(), static_cast<long long>(cfg.n_layer), static_cast<long long>(cfg.d_model),
              static_cast<long long>(cfg.n_head), static_cast<long long>(cfg.block_size), static_cast<long long>(batch),
              static_cast<long long>(model.num_parameters()), clip > 0 ? " + clip_grad_norm_ 1.0" : "");
  // torch.optim.AdamW's defaults spelled out (betas 0.9/0.999, eps 1e-8, weight decay 0.01).
  optim::AdamW opt(model.parameters(), 3e-4, {0.9, 0.999}, 1e-8, 0.01);
  time_training(o, workload, default_steps, opt, clip, [&] { return model.loss(idx, tgt); });
}

// resnet20 feeds a channels-last batch, as the PyTorch peer does (torch_gpu.py): every conv,
// batch norm and element-wise op then stays NHWC, where cuDNN's 16-bit kernels run without
// transposes. resnet20-nchw is the same model on an NCHW batch, for the comparison.
void resnet(const Options& o, const std::string& workload) {
  const bool channels_last = workload == "resnet20";
  Generator gi(7), gd(8);
  auto model = nn::models::resnet20(10, 3, false, gi);
  model->to(Device::CUDA);
  Tensor x = randn({128, 3, 32, 32}, DType::Float32, gd).to(Device::CUDA);
  if (channels_last) x = x.contiguous(MemoryFormat::ChannelsLast);
  const Tensor y = randint(0, 10, {128}, DType::Int64, gd).to(Device::CUDA);
  std::printf("# %s: ResNet-20 (CIFAR), batch 128, 3x32x32 %s, 10 classes, SGD lr 0.05 momentum 0.9\n", workload.c_str(),
              channels_last ? "channels-last" : "NCHW");
  optim::SGD opt(model->parameters(), 0.05, 0.9);
  time_training(o, workload, 20, opt, 0, [&] { return cross_entropy(model->forward(x), y); });
}

// GB/s (bytes read + bytes written, 1e9) of f over contiguous tensors.
void bandwidth(const Options& o) {
  const int64_t R = o.bw_rows, C = o.bw_cols, n = R * C;
  std::printf("# bandwidth: contiguous [%lld, %lld] tensors (%lld elements), GB/s = (bytes read + written) / time, "
              "pct_of_copy against cudaMemcpy device to device\n",
              static_cast<long long>(R), static_cast<long long>(C), static_cast<long long>(n));
  no_grad ng;
  Generator g(9);
  const int iters = 10;
  auto rate = [&](double bytes, auto&& f) {
    f();
    f();
    return bytes / (median_ms(o.windows, iters, f) * 1e-3) / 1e9;
  };
  const Tensor a32 = randn({R, C}, DType::Float32, g).to(Device::CUDA);
  const Tensor b32 = randn({R, C}, DType::Float32, g).to(Device::CUDA);
  const Tensor row32 = randn({C}, DType::Float32, g).to(Device::CUDA);
  const double copy_gbps = [&] {
    Tensor dst = empty({R, C}, DType::Float32, Device::CUDA);
    const std::size_t bytes = static_cast<std::size_t>(n) * 4;
    return rate(2.0 * double(bytes), [&] {
      mc::check(cudaMemcpyAsync(dst.data_ptr(), a32.data_ptr(), bytes, cudaMemcpyDeviceToDevice, mc::current_stream()),
                "cudaMemcpyAsync");
    });
  }();
  // One op: its line, or why it could not run (the other ops still run).
  auto line = [&](const char* what, DType d, double bytes, auto&& f) {
    try {
      const double gbps = rate(bytes, f);
      std::printf("BENCH mixprec bw_%s %s gbps=%.1f pct_of_copy=%.1f\n", what, std::string(name(d)).c_str(), gbps, 100.0 * gbps / copy_gbps);
    } catch (const std::exception& e) {
      std::printf("# bw_%s %s failed: %s\n", what, std::string(name(d)).c_str(), e.what());
      failures++;
    }
  };
  std::printf("BENCH mixprec bw_memcpy float32 gbps=%.1f pct_of_copy=100.0\n", copy_gbps);
  line("cast_f32_bf16", DType::Float32, 6.0 * double(n), [&] { (void)a32.to(DType::BFloat16); });
  for (DType d : {DType::Float32, DType::BFloat16}) {
    const Tensor a = a32.to(d), b = b32.to(d), row = row32.to(d);
    const double s = double(n) * double(itemsize(d));
    if (d == DType::BFloat16) line("cast_bf16_f32", d, 3.0 * s, [&] { (void)a.to(DType::Float32); });
    Tensor dst = empty({R, C}, d, Device::CUDA);
    line("copy", d, 2 * s, [&] { dst.copy_(a); });
    line("add", d, 3 * s, [&] { (void)add(a, b); });
    line("add_row", d, 2 * s, [&] { (void)add(a, row); });
    line("mul_scalar", d, 2 * s, [&] { (void)mul(a, 1.5); });
    line("gelu", d, 2 * s, [&] { (void)gelu(a); });
    line("relu", d, 2 * s, [&] { (void)relu(a); });
    line("sum", d, s, [&] { (void)sum(a); });
  }
  // The fused multi-tensor passes over the same number of float32 elements, as 48 tensors (a
  // parameter list): AdamW writing a bfloat16 model copy (reads master, gradient, both moments;
  // writes master, moments and the copy: 30 bytes per element), the gradient norm (reads 4) and
  // clip_grad_norm_'s scaling (reads and writes 8; the norm is set so that it clips).
  const int64_t parts = 48, per = n / parts;
  std::vector<Tensor> master, grad, exp_avg, exp_avg_sq, model, steps;
  std::vector<mc::AdamSlot> slots;
  for (int64_t p = 0; p < parts; ++p) {
    master.push_back(randn({per}, DType::Float32, g).to(Device::CUDA));
    grad.push_back(randn({per}, DType::Float32, g).to(Device::CUDA));
    exp_avg.push_back(zeros({per}, DType::Float32, Device::CUDA));
    exp_avg_sq.push_back(zeros({per}, DType::Float32, Device::CUDA));
    model.push_back(empty({per}, DType::BFloat16, Device::CUDA));
    steps.push_back(zeros({1}, DType::Int64, Device::CUDA));
    slots.push_back({master.back().data<float>(), model.back().data_ptr(), grad.back().data_ptr(), exp_avg.back().data<float>(),
                     exp_avg_sq.back().data<float>(), nullptr, steps.back().data<int64_t>(), per, static_cast<uint8_t>(DType::BFloat16),
                     static_cast<uint8_t>(DType::Float32)});
  }
  optim::detail::AdamHyper h;
  h.weight_decay = 0.01;
  h.decoupled = true;
  const double elems = double(parts) * double(per);
  line("adamw_multi", DType::Float32, 30.0 * elems, [&] { mc::fused_adam(slots, h); });
  line("grad_norm_multi", DType::Float32, 4.0 * elems, [&] { (void)mc::grad_norm(grad); });
  const Tensor norm = full({}, 1.0001, DType::Float32, Device::CUDA);  // max_norm 1: every call scales by 0.9999
  line("clip_multi", DType::Float32, 8.0 * elems, [&] { mc::clip_grads(grad, norm, 1.0); });
}

}  // namespace gpu_bench

int mixprec_gpu_bench_main(int argc, char** argv) {
  using namespace gpu_bench;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // piped output: keep every finished line if a later step dies
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "mixprec_gpu_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else if (a == "--workloads") {
      o.workloads = split(value());
    } else if (a == "--precisions") {
      o.precisions = split(value());
    } else if (a == "--steps") {
      o.steps = std::atoi(value().c_str());
    } else if (a == "--windows") {
      o.windows = std::max(1, std::atoi(value().c_str()));
    } else if (a == "--warmup") {
      o.warmup = std::max(0, std::atoi(value().c_str()));
    } else if (a == "--bw-rows") {
      o.bw_rows = std::atoll(value().c_str());
    } else if (a == "--bw-cols") {
      o.bw_cols = std::atoll(value().c_str());
    } else if (a == "--graph") {
      const std::string v = value();
      o.graph_workloads = v == "none" ? std::vector<std::string>{} : split(v);
    } else {
      std::fprintf(stderr, "mixprec_gpu_bench: unknown argument %s\n", a.c_str());
      usage();
      return 2;
    }
  }
  for (const std::string& w : o.workloads)
    if (w != "gpt12" && w != "gpt2l" && w != "resnet20" && w != "resnet20-nchw" && w != "gptmini" && w != "bandwidth") {
      std::fprintf(stderr, "mixprec_gpu_bench: unknown workload %s\n", w.c_str());
      return 2;
    }
  for (const std::string& p : o.precisions)
    if (p != "fp32" && p != "bf16" && p != "fp16") {
      std::fprintf(stderr, "mixprec_gpu_bench: unknown precision %s\n", p.c_str());
      return 2;
    }
  if (!cuda_is_available()) {
    std::printf("mixprec_gpu_bench: no usable CUDA device (%s); nothing was run\n", cuda_unavailable_reason().c_str());
    return 77;
  }
  for (const std::string& w : o.workloads) {
    try {
      if (w == "bandwidth") bandwidth(o);
      else if (w == "resnet20" || w == "resnet20-nchw") resnet(o, w);
      else gpt(o, w);
      mc::synchronize();
    } catch (const std::exception& e) {
      std::printf("# %s failed: %s\n", w.c_str(), e.what());
      failures++;
    }
  }
  return failures ? 1 : 0;
}
