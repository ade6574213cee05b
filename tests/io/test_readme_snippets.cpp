// The README's C++ snippets, compiled and run, so a README that does not compile fails CI.
// Each sits between `// [snippet:<name>]` and `// [end]` exactly as README.md shows it, at column 0
// (ctest `readme_snippets_are_tested`, cmake/CheckReadmeSnippets.cmake, fails when a ```cpp block of
// README.md is not found here verbatim). The code around the markers gives the snippets their
// context and checks what their comments claim, on tiny data (milliseconds each).
#include <gtest/gtest.h>

#include <filesystem>
#include <iostream>
#include <string>

#include <unistd.h>

// [snippet:include]
#include <mixprec/mixprec.hpp>
using namespace mixprec;
// [end]

namespace readme_snippets {

// [snippet:module]
// Parameters, buffers and child modules are registered by name (state_dict keys "fc1.weight", ...);
// modules are held by std::shared_ptr, as in LibTorch.
class MLP : public nn::Module {
 public:
  MLP(int64_t in, int64_t hidden, int64_t out) : nn::Module("MLP") {
    fc1 = register_module("fc1", std::make_shared<nn::Linear>(in, hidden));
    fc2 = register_module("fc2", std::make_shared<nn::Linear>(hidden, out));
    register_parameter("temperature", temperature);  // binds the member: reassigning it is seen
  }
  Tensor forward(const Tensor& x) override { return div(fc2->forward(gelu(fc1->forward(x))), temperature); }

  std::shared_ptr<nn::Linear> fc1, fc2;
  Tensor temperature = ones({1});
};
// [end]

// The checkpoint snippet writes into the working directory: run it in a scratch one.
class ScratchCwd {
 public:
  ScratchCwd()
      : old_(std::filesystem::current_path()),
        dir_(std::filesystem::temp_directory_path() / ("mixprec_readme_" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(dir_);
    std::filesystem::current_path(dir_);
  }
  ~ScratchCwd() {
    std::filesystem::current_path(old_);
    std::filesystem::remove_all(dir_);
  }
  ScratchCwd(const ScratchCwd&) = delete;
  ScratchCwd& operator=(const ScratchCwd&) = delete;

 private:
  std::filesystem::path old_, dir_;
};

bool same_values(const Tensor& a, const Tensor& b) {
  const Tensor x = a.detach().to(DType::Float32).contiguous(), y = b.detach().to(DType::Float32).contiguous();
  if (x.sizes() != y.sizes()) return false;
  for (int64_t i = 0; i < x.numel(); ++i)
    if (x.data<float>()[i] != y.data<float>()[i]) return false;
  return true;
}

// The tests sit in the namespace too: test_training is one unity build, and MLP is a common name.

TEST(ReadmeSnippets, ModuleRegistersParametersAndChildren) {
  auto m = std::make_shared<MLP>(4, 8, 3);
  std::vector<std::string> names;
  for (const auto& [n, t] : m->named_parameters()) names.push_back(n);
  EXPECT_EQ(names, (std::vector<std::string>{"temperature", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  EXPECT_EQ(m->forward(randn({5, 4})).sizes(), (Shape{5, 3}));
}

// One flow, as the README reads: data, a float16 training loop, a checkpoint, memory statistics.
TEST(ReadmeSnippets, TourTrainsChecksPointsAndCounts) {
  const readme_snippets::ScratchCwd scratch;
// [snippet:data]
Tensor images = randn({256, 32});        // 256 samples of 32 features
Tensor labels = randint(0, 10, {256});   // int64 class indices
data::TensorDataset dataset(images, labels);
data::DataLoader loader(dataset, {.batch_size = 64, .shuffle = true});
// [end]
  EXPECT_EQ(loader.size(), 4);

// [snippet:train]
auto model = std::make_shared<MLP>(32, 64, 10);
optim::AdamW opt(model->parameters(), {.lr = 3e-4, .weight_decay = 0.1});
amp::GradScaler scaler({.init_scale = 65536});
optim::lr_scheduler::CosineAnnealingWarmupLR sched(opt, /*warmup_steps=*/10, /*total_steps=*/100);

for (auto& batch : loader) {
  Tensor loss;
  {
    autocast ac{Device::CPU, DType::Float16};  // linear runs in float16, cross_entropy in float32
    loss = cross_entropy(model->forward(batch.inputs), batch.targets);
  }
  opt.zero_grad();
  scaler.scale(loss).backward();     // backward of loss * scale: small float16 gradients survive
  scaler.unscale_(opt);              // only when clipping: the true gradients first,
  optim::clip_grad_norm_(opt, 1.0);  // then clip them
  scaler.step(opt);                  // skips the step if a gradient holds inf/NaN
  scaler.update();                   // halves the scale then; doubles it after 2000 clean steps
  sched.step();
}
// [end]
  EXPECT_EQ(scaler.get_scale(), 65536.0);  // no overflow in 4 steps of a small MLP: none skipped
  EXPECT_FALSE(opt.state_dict().tensors.empty());  // the steps created AdamW's moments
  for (const Tensor& p : model->parameters()) EXPECT_EQ(p.dtype(), DType::Float32);

  const Tensor w_saved = model->fc1->weight.detach().clone();
// [snippet:checkpoint]
io::save_checkpoint("run.ckpt", {model.get(), &opt, &scaler, &sched}, {.step = 4, .epoch = 1});
// later, with the same objects built again (a fresh process resuming the run):
io::TrainingState state = io::load_checkpoint("run.ckpt", {model.get(), &opt, &scaler, &sched});
// state.step == 4; weights, optimizer, scaler and scheduler state and the generators are back
// [end]
  EXPECT_EQ(state.step, 4);
  EXPECT_EQ(state.epoch, 1);
  {
    no_grad ng;
    model->fc1->weight.fill_(0.5);
  }
  io::load_checkpoint("run.ckpt", {model.get(), &opt, &scaler, &sched});
  EXPECT_TRUE(readme_snippets::same_values(model->fc1->weight, w_saved));
  const int64_t live_before = memory_stats(Device::CPU).allocated_bytes;
// [snippet:memory]
reset_peak_memory_stats(Device::CPU);
Tensor logits = model->forward(images);  // any work: a forward pass, a training step
MemoryStats stats = memory_stats(Device::CPU);
std::cout << "live " << stats.allocated_bytes << " B, peak " << stats.peak_allocated_bytes << " B, "
          << stats.num_allocs << " allocations so far\n";
// [end]
  // logits keeps the graph alive, so the hidden activations (256 x 64 floats) are still counted.
  EXPECT_GE(stats.allocated_bytes - live_before, 256 * 64 * 4);
  EXPECT_GE(stats.peak_allocated_bytes, stats.allocated_bytes);

// [snippet:bf16]
Tensor noise = randn({2, 3}, {.dtype = DType::BFloat16});  // factories take dtype, device, requires_grad
auto net = std::make_shared<MLP>(32, 64, 10);
net->to(DType::BFloat16);                             // parameters stored in bfloat16 ...
optim::AdamW opt16(net->parameters(), {.lr = 3e-4});  // ... the optimizer steps float32 master copies
Tensor loss16;
{
  autocast ac{Device::CPU, DType::BFloat16};  // bfloat16 has float32's range: no GradScaler needed
  loss16 = cross_entropy(net->forward(images), labels);
}
loss16.backward();
opt16.step();
// [end]
  EXPECT_EQ(noise.dtype(), DType::BFloat16);
  EXPECT_EQ(net->fc1->weight.dtype(), DType::BFloat16);
  EXPECT_EQ(loss16.dtype(), DType::Float32);
}

TEST(ReadmeSnippets, ModelsAndChannelsLast) {
// [snippet:models]
auto resnet = nn::models::resnet20(/*num_classes=*/10, /*in_channels=*/1);  // std::shared_ptr<nn::models::ResNet>
auto gpt = nn::models::gpt({.n_layer = 2, .n_head = 4, .d_model = 128});  // std::shared_ptr<nn::models::GPT>
Tensor digits = randn({2, 1, 28, 28});
Tensor scores = resnet->forward(digits.contiguous(MemoryFormat::ChannelsLast));  // convs keep the layout
// [end]
  EXPECT_EQ(scores.sizes(), (Shape{2, 10}));
  EXPECT_EQ(gpt->config.n_layer, 2);
}

TEST(ReadmeSnippets, PolicyTableAndUserOps) {
// [snippet:policy]
amp::print_policy_table();                     // every op and its policy (docs/numerics.md)
amp::Policy p = amp::policy_of("layer_norm");  // amp::Policy::Float32
const OpId my_op = amp::register_op("my_scale", amp::Policy::LowerPrecision);
Tensor y;
{
  autocast ac{Device::CPU, DType::BFloat16};
  y = dispatch(my_op, [](const Tensor& t) { return mul(t, 2.0); }, randn({4, 4}));  // ran in bfloat16
}
// [end]
  EXPECT_EQ(p, amp::Policy::Float32);
  EXPECT_EQ(y.dtype(), DType::BFloat16);
}

}  // namespace readme_snippets
