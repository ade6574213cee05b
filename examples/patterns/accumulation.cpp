// Gradient accumulation with the GradScaler and clipping: K micro-batches add up their scaled
// gradients; the gradients are unscaled once, clipped on their true values, and the step is
// skipped (and the scale backed off) if any micro-batch overflowed.
#include <cstdio>
#include <iostream>

#include "patterns/patterns.hpp"

namespace patterns {

int accumulation(int argc, char** argv) {
  using namespace mixprec;
  examples::Cli cli(argc, argv,
                    {{"micro-batch", "32"}, {"accumulate", "4"}, {"steps", "20"}, {"max-norm", "1.0"}, {"lr", "0.003"}, {"seed", "0"}});
  if (cli.help()) {
    cli.usage(std::cout, "mixprec_patterns accumulation");
    return 0;
  }
  const int64_t micro = cli.i64("micro-batch"), accumulate = cli.i64("accumulate"), steps = cli.i64("steps");
  MIXPREC_CHECK(micro >= 1 && accumulate >= 1 && steps >= 1, "accumulation: micro-batch, accumulate and steps must be >= 1");
  const auto seed = static_cast<uint64_t>(cli.i64("seed"));
  Generator gen(seed);
  const data::FashionMnist train = data::synthetic_fashion_mnist(micro * accumulate * steps, seed);
  auto model = nn::models::make_resnet("resnet20", 10, 1, false, gen);
  optim::AdamW opt(model->parameters(), cli.f64("lr"));
  amp::GradScaler scaler;
  data::DataLoader loader(data::TensorDataset(train.images, train.labels), micro, /*shuffle=*/true, seed);
  std::printf("ResNet-20, fp16 autocast + GradScaler, %lld micro-batches of %lld per step (effective batch %lld), clip %.2f\n",
              static_cast<long long>(accumulate), static_cast<long long>(micro), static_cast<long long>(micro * accumulate),
              cli.f64("max-norm"));
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
    const double norm = optim::clip_grad_norm_(opt, cli.f64("max-norm"));
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
