// LibTorch's side of the peer comparison (Debian libtorch-dev 1.13): the reference workloads of
// ../workloads.hpp rebuilt layer for layer with torch::nn, the same CLI as mixprec_workloads and
// the same RESULT line. Precisions: fp32 and CPU autocast bf16 (1.13's CPU autocast has no fp16).
//
// Peak tensor bytes come from a counting allocator installed with c10::SetCPUAllocator: it counts
// every byte requested from the CPU allocator, i.e. every CPU tensor storage (weights, optimizer
// state, activations, autograd buffers, temporaries) and oneDNN buffers that ATen routes through it
// (ideep's engine allocator calls GetAllocator(CPU)->raw_allocate). BLAS and oneDNN internal
// scratch memory is outside, as Eigen's packing buffers are on our side.
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// ---- counting allocator -----------------------------------------------------------------------
// data == context so raw_allocate/raw_deallocate (used by ideep) work; sizes live in a side table.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) const override {
    void* p = n ? c10::alloc_cpu(n) : nullptr;
    if (p) record(p, n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  static int64_t live() { return live_.load(); }
  static int64_t peak() { return peak_.load(); }
  static void reset_peak() { peak_.store(live_.load()); }

 private:
  static void record(void* p, size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[p] = n;
    }
    const int64_t now = live_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t pk = peak_.load();
    while (now > pk && !peak_.compare_exchange_weak(pk, now)) {}
  }
  static void release(void* p) {
    if (!p) return;
    size_t n = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sizes_.find(p);
      if (it != sizes_.end()) {
        n = it->second;
        sizes_.erase(it);
      }
    }
    live_.fetch_sub(static_cast<int64_t>(n));
    c10::free_cpu(p);
  }
  static inline std::mutex mu_;
  static inline std::unordered_map<void*, size_t> sizes_;
  static inline std::atomic<int64_t> live_{0}, peak_{0};
};

// ---- ResNet-20 (He et al. CIFAR layout, projection shortcuts as mixprec's make_resnet) --------
torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).bias(false));
}

struct BasicBlockImpl : torch::nn::Module {
  BasicBlockImpl(int64_t in, int64_t planes, int64_t stride)
      : conv1(register_module("conv1", conv(in, planes, 3, stride))),
        bn1(register_module("bn1", torch::nn::BatchNorm2d(planes))),
        conv2(register_module("conv2", conv(planes, planes, 3, 1))),
        bn2(register_module("bn2", torch::nn::BatchNorm2d(planes))) {
    if (stride != 1 || in != planes) {
      down_conv = register_module("down_conv", conv(in, planes, 1, stride));
      down_bn = register_module("down_bn", torch::nn::BatchNorm2d(planes));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor out = torch::relu(bn1(conv1(x)));
    out = bn2(conv2(out));
    return torch::relu(out + (down_conv ? down_bn(down_conv(x)) : x));
  }
  torch::nn::Conv2d conv1;
  torch::nn::BatchNorm2d bn1;
  torch::nn::Conv2d conv2;
  torch::nn::BatchNorm2d bn2;
  torch::nn::Conv2d down_conv{nullptr};
  torch::nn::BatchNorm2d down_bn{nullptr};
};
TORCH_MODULE(BasicBlock);

struct ResNet20Impl : torch::nn::Module {
  ResNet20Impl(int64_t in_channels, int64_t classes)
      : stem(register_module("conv1", conv(in_channels, 16, 3, 1))), bn(register_module("bn1", torch::nn::BatchNorm2d(16))),
        fc(register_module("fc", torch::nn::Linear(64, classes))) {
    int64_t in = 16;
    for (int64_t stage = 0; stage < 3; ++stage) {
      const int64_t planes = 16 << stage;
      for (int64_t b = 0; b < 3; ++b) {
        blocks->push_back(BasicBlock(in, planes, stage > 0 && b == 0 ? 2 : 1));
        in = planes;
      }
    }
    register_module("blocks", blocks);
    for (auto& m : modules(false))  // torchvision's init, as make_resnet
      if (auto* c = m->as<torch::nn::Conv2d>()) torch::nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor y = torch::relu(bn(stem(x)));
    y = blocks->forward(y);
    return fc(torch::adaptive_avg_pool2d(y, {1, 1}).flatten(1));
  }
  torch::nn::Conv2d stem;
  torch::nn::BatchNorm2d bn;
  torch::nn::Sequential blocks;
  torch::nn::Linear fc;
};
TORCH_MODULE(ResNet20);

// ---- GPT-mini (pre-norm blocks, packed qkv projection, tied head, GPT-2 init as mixprec's GPT) --
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t d, int64_t heads, int64_t hidden)
      : heads(heads), ln1(register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        in_proj(register_module("in_proj", torch::nn::Linear(d, 3 * d))), out_proj(register_module("out_proj", torch::nn::Linear(d, d))),
        ln2(register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        fc1(register_module("fc1", torch::nn::Linear(d, hidden))), fc2(register_module("fc2", torch::nn::Linear(hidden, d))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t B = x.size(0), T = x.size(1), E = x.size(2), D = E / heads;
    auto qkv = in_proj(ln1(x)).chunk(3, -1);
    auto split = [&](const torch::Tensor& t) { return t.reshape({B, T, heads, D}).transpose(1, 2); };
    // 1.13's fused attention entry point (math kernel on CPU), causal.
    const torch::Tensor o = std::get<0>(at::_scaled_dot_product_attention(split(qkv[0]), split(qkv[1]), split(qkv[2]), {}, 0.0, false, true));
    const torch::Tensor a = x + out_proj(o.transpose(1, 2).reshape({B, T, E}));
    return a + fc2(torch::gelu(fc1(ln2(a))));
  }
  int64_t heads;
  torch::nn::LayerNorm ln1;
  torch::nn::Linear in_proj, out_proj;
  torch::nn::LayerNorm ln2;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Block);

struct GptMiniImpl : torch::nn::Module {
  static constexpr int64_t vocab = 256, block_size = 128, layers = 4, heads = 4, d = 256, hidden = 1024;
  GptMiniImpl()
      : tok(register_module("tok_emb", torch::nn::Embedding(vocab, d))), pos(register_module("pos_emb", torch::nn::Embedding(block_size, d))),
        ln_f(register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))) {
    for (int64_t i = 0; i < layers; ++i) blocks->push_back(Block(d, heads, hidden));
    register_module("blocks", blocks);
    torch::NoGradGuard ng;
    const double resid_std = 0.02 / std::sqrt(2.0 * layers);
    for (auto& item : named_parameters()) {
      const std::string& name = item.key();
      torch::Tensor& p = item.value();
      auto ends_with = [&](const std::string& s) { return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0; };
      if (ends_with("out_proj.weight") || ends_with("fc2.weight")) p.normal_(0.0, resid_std);
      else if (p.dim() >= 2) p.normal_(0.0, 0.02);
      else if (ends_with("bias")) p.zero_();
    }
  }
  torch::Tensor loss(const torch::Tensor& idx, const torch::Tensor& targets) {
    const int64_t T = idx.size(1);
    torch::Tensor x = tok(idx) + pos(torch::arange(T, torch::kLong));
    x = ln_f(blocks->forward(x));
    const torch::Tensor logits = torch::linear(x, tok->weight);  // the head tied to the token embedding
    return torch::cross_entropy_loss(logits.reshape({-1, vocab}), targets.reshape({-1}));
  }
  torch::nn::Embedding tok, pos;
  torch::nn::Sequential blocks;
  torch::nn::LayerNorm ln_f;
};
TORCH_MODULE(GptMini);

// ---- the runner -------------------------------------------------------------------------------
// The bf16 autocast region, as torch.autocast("cpu", torch.bfloat16) opens and closes it.
class CpuAutocast {
 public:
  explicit CpuAutocast(bool on) : on_(on) {
    if (!on_) return;
    prev_enabled_ = at::autocast::is_cpu_enabled();
    prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~CpuAutocast() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_cpu_enabled(prev_enabled_);
    at::autocast::set_autocast_cpu_dtype(prev_dtype_);
  }

 private:
  bool on_, prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

struct Args {
  std::string workload = "resnet20", precision = "fp32", memory_format = "contiguous";
  int64_t steps = 10, warmup = 2, threads = 2, seed = 0;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i], v;
    if (k == "--help" || k == "-h") {
      std::printf("usage: torch_workloads [--workload resnet20|gpt-mini] [--precision fp32|bf16] [--steps N] [--warmup W] "
                  "[--threads T] [--seed S] [--memory-format contiguous|channels_last]\n"
                  "  --memory-format channels_last: ResNet-20's input and conv weights channels-last, as\n"
                  "    model.to(memory_format=torch.channels_last) (default contiguous: PyTorch's default)\n");
      std::exit(0);
    }
    if (k.rfind("--", 0) != 0) throw std::invalid_argument("unexpected argument '" + k + "' (flags look like --name value)");
    if (auto eq = k.find('='); eq != std::string::npos) v = k.substr(eq + 1), k = k.substr(0, eq);
    else if (i + 1 < argc) v = argv[++i];
    else throw std::invalid_argument("flag " + k + " needs a value");
    if (k == "--workload") a.workload = v;
    else if (k == "--precision") a.precision = v;
    else if (k == "--steps") a.steps = std::stoll(v);
    else if (k == "--warmup") a.warmup = std::stoll(v);
    else if (k == "--threads") a.threads = std::stoll(v);
    else if (k == "--seed") a.seed = std::stoll(v);
    else if (k == "--memory-format") a.memory_format = v;
    else throw std::invalid_argument("unknown flag " + k + " (see --help)");
  }
  if (a.workload != "resnet20" && a.workload != "gpt-mini")
    throw std::invalid_argument("--workload must be resnet20 or gpt-mini, got '" + a.workload + "'");
  if (a.memory_format != "contiguous" && a.memory_format != "channels_last")
    throw std::invalid_argument("--memory-format must be contiguous or channels_last, got '" + a.memory_format + "'");
  if (a.precision != "fp32" && a.precision != "bf16")
    throw std::invalid_argument("--precision must be fp32 or bf16 (LibTorch 1.13's CPU autocast has no float16), got '" + a.precision + "'");
  // The first step creates AdamW's state, so the last of >= 2 warm-up steps shows the steady peak.
  if (a.steps < 1 || a.warmup < 2 || a.threads < 1) throw std::invalid_argument("--steps and --threads must be >= 1 and --warmup >= 2");
  return a;
}

int run(int argc, char** argv) {
  static CountingCpuAllocator counting;
  c10::SetCPUAllocator(&counting, /*priority=*/100);  // before any tensor exists
  const Args a = parse(argc, argv);
  at::set_num_interop_threads(1);
  at::set_num_threads(static_cast<int>(a.threads));
  torch::manual_seed(static_cast<uint64_t>(a.seed));
  const bool bf16 = a.precision == "bf16";

  std::shared_ptr<torch::nn::Module> model;
  std::function<torch::Tensor()> forward_loss;
  torch::Tensor x, y;
  if (a.workload == "resnet20") {
    ResNet20 net(1, 10);
    x = torch::randn({128, 1, 28, 28});
    y = torch::randint(0, 10, {128}, torch::kLong);
    if (a.memory_format == "channels_last") {
      x = x.contiguous(at::MemoryFormat::ChannelsLast);
      torch::NoGradGuard ng;
      for (auto& p : net->parameters())
        if (p.dim() == 4) p.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
    }
    forward_loss = [net, &x, &y]() mutable { return torch::cross_entropy_loss(net->forward(x), y); };
    model = net.ptr();
  } else {
    GptMini net;
    x = torch::randint(0, GptMiniImpl::vocab, {16, 128}, torch::kLong);
    y = torch::randint(0, GptMiniImpl::vocab, {16, 128}, torch::kLong);
    forward_loss = [net, &x, &y]() mutable { return net->loss(x, y); };
    model = net.ptr();
  }
  model->train();
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3).betas({0.9, 0.999}).eps(1e-8).weight_decay(0.01));
  auto step = [&] {
    torch::Tensor loss;
    {
      CpuAutocast ac(bf16);
      loss = forward_loss();
    }
    model->zero_grad(/*set_to_none=*/true);  // as mixprec's zero_grad
    loss.backward();
    opt.step();
    return loss.item<double>();
  };

  for (int64_t i = 0; i + 1 < a.warmup; ++i) step();
  CountingCpuAllocator::reset_peak();
  const int64_t baseline = CountingCpuAllocator::live();
  step();
  const int64_t peak = CountingCpuAllocator::peak();
  std::vector<double> ms;
  double loss = 0;
  for (int64_t i = 0; i < a.steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    loss = step();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  if (!std::isfinite(loss)) throw std::runtime_error(a.workload + " " + a.precision + " diverged (loss " + std::to_string(loss) + ")");
  std::sort(ms.begin(), ms.end());
  std::printf("RESULT lib=libtorch workload=%s precision=%s threads=%lld steps=%lld ms_median=%.2f ms_min=%.2f peak_bytes=%lld "
              "baseline_bytes=%lld loss=%.4f\n",
              a.workload.c_str(), a.precision.c_str(), static_cast<long long>(at::get_num_threads()), static_cast<long long>(a.steps),
              ms[ms.size() / 2], ms.front(), static_cast<long long>(peak), static_cast<long long>(baseline), loss);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
