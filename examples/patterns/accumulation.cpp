// Gradient accumulation with the GradScaler and clipping: K micro-batches add up their scaled
// gradients; the gradients are unscaled once, clipped on their true values, and the step is
// skipped (and the scale backed off) if any micro-batch overflowed.
#include <cstdio>
#include <iostream>

#include "patterns/patterns.hpp"

namespace patterns {

int accumulation(int argc, char** argv) {
  using namespace mixprec;
  int64_t micro = 32, accumulate = 4, steps = 20;
  double max_norm = 1.0, lr = 0.003;
  uint64_t seed = 0;
  CLI::App app("Gradient accumulation with the GradScaler and clipping: ResNet-20 on synthetic Fashion-MNIST in fp16 "
               "autocast; the gradients of --accumulate micro-batches add up, are unscaled once and clipped, and the "
               "step is skipped if any micro-batch overflowed.",
               "mixprec_patterns accumulation");
  app.add_option("--micro-batch", micro, "samples per micro-batch (one forward and backward)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--accumulate", accumulate, "micro-batches per optimizer step (effective batch: micro-batch x accumulate)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--steps", steps, "optimizer steps")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--max-norm", max_norm, "clip the unscaled gradients to this total L2 norm")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--lr", lr, "AdamW's learning rate")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", seed, "seed of the weights, the synthetic data and its order")->capture_default_str();
  if (auto rc = examples::parse_flags(app, argc, argv)) return *rc;
  Generator gen(seed);
  const data::FashionMnist train = data::synthetic_fashion_mnist(micro * accumulate * steps, seed);
  auto model = nn::models::make_resnet("resnet20", 10, 1, false, gen);
  optim::AdamW opt(model->parameters(), lr);
  amp::GradScaler scaler;
  data::DataLoader loader(data::TensorDataset(train.images, train.labels), micro, /*shuffle=*/true, seed);
  std::printf("ResNet-20, fp16 autocast + GradScaler, %lld micro-batches of %lld per step (effective batch %lld), clip %.2f\n",
              static_cast<long long>(accumulate), static_cast<long long>(micro), static_cast<long long>(micro * accumulate),
              max_norm);
  int64_t micro_step = 0, skipped = 0;
  double step_loss = 0;
  for (auto& b : loader) {
    Tensor loss;
    {
      autocast ac(Device::CPU, DType::Float16);
      // Each micro-batch carries 1/K of the loss, so the sum is the mean over the effective batch.
      loss = cross_entropy(model->forward(b.inputs), b.targets) / static_cast<double>(accumulate);
    }
    scaler.scale(loss).backward();
    step_loss += loss.item<double>();
    if (++micro_step % accumulate != 0) continue;
    scaler.unscale_(opt);  // true gradients, once, before clipping
    const double norm = optim::clip_grad_norm_(opt, max_norm);
    if (!scaler.step(opt)) ++skipped;  // skipped when a micro-batch produced inf/NaN
    scaler.update();
    opt.zero_grad();
    std::printf("step %3lld  loss %.4f  grad norm %8.4f  scale %g\n", static_cast<long long>(micro_step / accumulate), step_loss,
                norm, scaler.get_scale());
    step_loss = 0;
  }
  std::printf("%lld optimizer steps, %lld skipped for inf/NaN\n", static_cast<long long>(micro_step / accumulate),
              static_cast<long long>(skipped));
  return 0;
}

}  // namespace patterns
