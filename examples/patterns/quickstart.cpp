// Quick start: a float32 training loop and the same loop with float16 autocast and the
// GradScaler. Diff the two functions: three lines change (marked AMP 1/3, 2/3, 3/3).
#include <cmath>
#include <cstdio>
#include <iostream>

#include "patterns/patterns.hpp"

namespace patterns {
namespace {

using namespace mixprec;

struct Setup {
  std::shared_ptr<nn::models::ResNet> model;
  std::unique_ptr<optim::SGD> opt;
  Tensor x, y;
};

Setup make_setup(int64_t batch, int64_t image, uint64_t seed) {
  Generator gen(seed);
  Setup s;
  s.model = nn::models::resnet50(1000, 3, false, gen);
  s.opt = std::make_unique<optim::SGD>(s.model->parameters(), 0.01, 0.9);
  s.x = randn({batch, 3, image, image}, DType::Float32, gen);
  s.y = randint(0, 1000, {batch}, DType::Int64, gen);
  return s;
}

double train_fp32(Setup& s, int64_t steps) {
  auto& [model, opt, x, y] = s;
  Tensor loss;
  for (int64_t i = 0; i < steps; ++i) {
    opt->zero_grad();
    loss = cross_entropy(model->forward(x), y);
    loss.backward();
    opt->step();
  }
  return loss.item<double>();
}

double train_amp(Setup& s, int64_t steps) {
  auto& [model, opt, x, y] = s;
  amp::GradScaler scaler;  // AMP 1/3
  Tensor loss;
  for (int64_t i = 0; i < steps; ++i) {
    opt->zero_grad();
    { autocast ac(Device::CPU, DType::Float16); loss = cross_entropy(model->forward(x), y); }  // AMP 2/3
    scaler.scale(loss).backward(); scaler.step(*opt); scaler.update();                        // AMP 3/3
  }
  // The first steps may be skipped: the scale starts at 2^16 and halves until the gradients fit
  // in float16, exactly as PyTorch's GradScaler does. It grows only after 2000 clean steps, so
  // here every halving is one skipped step.
  std::printf("  loss scale after %lld steps: %g (%lld steps skipped while it calibrated)\n", static_cast<long long>(steps),
              scaler.get_scale(), static_cast<long long>(std::llround(std::log2(65536.0 / scaler.get_scale()))));
  return loss.item<double>();
}

}  // namespace

int quickstart(int argc, char** argv) {
  int64_t batch = 8, image = 64, steps = 8;
  uint64_t seed = 0;
  CLI::App app("Quick start: ResNet-50 (1000 classes) on random images, trained with SGD by a float32 loop and by the "
               "same loop with float16 autocast and the GradScaler (three changed lines); prints both final losses.",
               "mixprec_patterns quickstart");
  app.add_option("--batch-size", batch, "images per step")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--image-size", image, "image height and width, at least 32")
      ->check(CLI::Range(int64_t{32}, int64_t{4096}))
      ->capture_default_str();
  app.add_option("--steps", steps, "SGD steps of each loop")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", seed, "seed of the weights and the images (the same for both loops)")->capture_default_str();
  if (auto rc = examples::parse_flags(app, argc, argv)) return *rc;
  std::printf("ResNet-50, random %lldx3x%lldx%lld images, 1000 classes, SGD, %lld steps\n", static_cast<long long>(batch),
              static_cast<long long>(image), static_cast<long long>(image), static_cast<long long>(steps));
  Setup fp32 = make_setup(batch, image, seed);
  const double l32 = train_fp32(fp32, steps);
  std::printf("float32 loop:                 final loss %.4f\n", l32);
  Setup amp16 = make_setup(batch, image, seed);
  const double l16 = train_amp(amp16, steps);
  std::printf("float16 autocast + GradScaler: final loss %.4f\n", l16);
  return 0;
}

}  // namespace patterns
