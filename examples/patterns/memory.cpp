// Memory: peak tensor memory of one ResNet-50 forward+backward in float32 at batch B, under
// autocast at batch B, and under autocast at batch 2B -- the "twice the batch in the same memory"
// claim, measured by the allocator's exact statistics.
#include <cstdio>
#include <iostream>
#include <string>

#include "patterns/patterns.hpp"

namespace patterns {
namespace {

using namespace mixprec;

struct Peak {
  int64_t total = 0;  // weights + saved activations + gradients at the peak
  int64_t saved = 0;  // allocated by the forward pass and kept for backward (incl. 16-bit weight copies)
};

Peak forward_backward_peak(nn::Module& model, int64_t batch, int64_t image, std::optional<DType> amp_dtype, uint64_t seed) {
  Generator gen(seed);
  const Tensor x = randn({batch, 3, image, image}, DType::Float32, gen);
  const Tensor y = randint(0, 1000, {batch}, DType::Int64, gen);
  for (Tensor& p : model.parameters()) p.set_grad(Tensor());
  const int64_t before = memory_stats(Device::CPU).allocated_bytes;
  reset_peak_memory_stats(Device::CPU);
  int64_t saved = 0;
  {
    Tensor loss;
    {
      std::optional<autocast> ac;
      if (amp_dtype) ac.emplace(Device::CPU, *amp_dtype);
      loss = cross_entropy(model.forward(x), y);
    }
    saved = memory_stats(Device::CPU).allocated_bytes - before;
    loss.backward();
  }
  return {memory_stats(Device::CPU).peak_allocated_bytes, saved};
}

}  // namespace

int memory(int argc, char** argv) {
  int64_t batch = 64, image = 64;
  std::string dtype = "bf16";
  uint64_t seed = 0;
  CLI::App app("Peak tensor memory of ResNet-50's forward and backward (1000 classes, random images): float32 at "
               "--batch-size, then autocast at --batch-size and at twice it.",
               "mixprec_patterns memory");
  app.add_option("--batch-size", batch, "images of the float32 run (the autocast runs: this and twice this)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--image-size", image, "image height and width, at least 32 (activations grow with its square)")
      ->check(CLI::Range(int64_t{32}, int64_t{4096}))
      ->capture_default_str();
  app.add_option("--dtype", dtype, "autocast's 16-bit type")->check(CLI::IsMember({"bf16", "fp16"}))->capture_default_str();
  app.add_option("--seed", seed, "seed of the weights and the images")->capture_default_str();
  if (auto rc = examples::parse_flags(app, argc, argv)) return *rc;
  const DType low = dtype == "bf16" ? DType::BFloat16 : DType::Float16;
  Generator gen(seed);
  auto model = nn::models::resnet50(1000, 3, false, gen);
  std::printf("ResNet-50 forward+backward, %lldx%lld images, parameters %.1f MiB (float32)\n", static_cast<long long>(image),
              static_cast<long long>(image), mib(model->num_parameters() * 4));
  const Peak f32 = forward_backward_peak(*model, batch, image, std::nullopt, seed);
  const Peak amp1 = forward_backward_peak(*model, batch, image, low, seed);
  const Peak amp2 = forward_backward_peak(*model, 2 * batch, image, low, seed);
  std::printf("| run | batch | saved by the forward pass | peak tensor memory (forward+backward) | peak vs fp32 |\n|---|---|---|---|---|\n");
  const auto row = [&](const char* name, int64_t b, const Peak& p) {
    std::printf("| %s | %lld | %.1f MiB | %.1f MiB | %.0f%% |\n", name, static_cast<long long>(b), mib(p.saved), mib(p.total),
                100.0 * static_cast<double>(p.total) / static_cast<double>(f32.total));
  };
  row("fp32", batch, f32);
  row(dtype == "bf16" ? "bf16 autocast" : "fp16 autocast", batch, amp1);
  row(dtype == "bf16" ? "bf16 autocast" : "fp16 autocast", 2 * batch, amp2);
  return 0;
}

}  // namespace patterns
