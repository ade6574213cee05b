// Forcing a sensitive part of the model to float32 inside autocast. The head of this regression
// model predicts prices around 200,000 (its bias starts at the mean target, common practice):
// beyond float16's 65,504, so under float16 autocast its linear layer overflows to inf and the
// GradScaler skips every step. Running just the head with autocast disabled, on a float32 input,
// fixes it while the body keeps its 16-bit matmuls.
#include <cmath>
#include <cstdio>
#include <iostream>

#include "patterns/patterns.hpp"

namespace patterns {
namespace {

using namespace mixprec;

enum class Mode { FP32, AllFp16, Fp32Head };

struct Regressor {
  explicit Regressor(Generator& gen)
      : body(std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
            std::make_shared<nn::Linear>(16, 64, true, gen), std::make_shared<nn::ReLU>(),
            std::make_shared<nn::Linear>(64, 64, true, gen), std::make_shared<nn::ReLU>()})),
        head(std::make_shared<nn::Linear>(64, 1, true, gen)) {
    no_grad ng;  // initialisation, not a differentiable op
    head->bias.fill_(kMeanPrice);
  }
  static constexpr double kMeanPrice = 200000.0;

  Tensor forward(const Tensor& x, Mode mode) {
    if (mode == Mode::FP32) return head->forward(body->forward(x));
    autocast ac(Device::CPU, DType::Float16);
    const Tensor h = body->forward(x);
    if (mode == Mode::AllFp16) return head->forward(h);
    autocast fp32_region(Device::CPU, /*enabled=*/false);  // the head runs as written: float32
    return head->forward(h.to(DType::Float32));
  }
  std::vector<Tensor> parameters() const {
    std::vector<Tensor> ps = body->parameters();
    for (const Tensor& p : head->parameters()) ps.push_back(p);
    return ps;
  }

  std::shared_ptr<nn::Sequential> body;
  std::shared_ptr<nn::Linear> head;
};

struct Outcome {
  double final_loss;
  int64_t skipped;
  int64_t head_nonfinite;
  double rel_error_vs_fp32;  // of the first forward's predictions
};

Outcome train(Mode mode, int64_t steps, uint64_t seed, const Tensor& x, const Tensor& y, const Tensor& reference) {
  Generator gen(seed);
  Regressor model(gen);
  optim::AdamW opt(model.parameters(), 3e-3);
  amp::GradScaler scaler(65536.0, 2.0, 0.5, 2000, /*enabled=*/mode != Mode::FP32);
  Outcome out{0, 0, 0, 0};
  {
    no_grad ng;
    amp::PrecisionTrace trace(DType::Float16);
    const Tensor pred = model.forward(x, mode).to(DType::Float64);
    out.head_nonfinite = trace.ops().count("linear") ? trace.op("linear").nonfinite_outputs : 0;
    const Tensor d = pred - reference;
    out.rel_error_vs_fp32 = std::sqrt(sum(d * d).item<double>() / sum(reference * reference).item<double>());
  }
  for (int64_t i = 0; i < steps; ++i) {
    opt.zero_grad();
    // Loss in units of 10,000^2 so that it is O(1); mse_loss itself runs in float32 under autocast.
    const Tensor loss = mse_loss(model.forward(x, mode), y) / 1e8;
    scaler.scale(loss).backward();
    if (!scaler.step(opt)) ++out.skipped;
    scaler.update();
    out.final_loss = loss.item<double>();
  }
  return out;
}

}  // namespace

int fp32_head(int argc, char** argv) {
  int64_t steps = 30, batch = 256;
  uint64_t seed = 0;
  CLI::App app("Forcing a range-sensitive head to float32 inside autocast: a regressor of prices in the tens of "
               "thousands trained in fp16 autocast, whole and with its head in float32; prints each one's skipped "
               "steps and error against the float32 reference.",
               "mixprec_patterns fp32-head");
  app.add_option("--steps", steps, "optimizer steps of each run")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--batch-size", batch, "samples (one batch, the same every step)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", seed, "seed of the weights and the data")->capture_default_str();
  if (auto rc = examples::parse_flags(app, argc, argv)) return *rc;
  Generator data_gen(seed + 100);
  const Tensor x = randn({batch, 16}, DType::Float32, data_gen);
  // Prices: the mean plus a linear function of the features, in the tens of thousands.
  const Tensor w = randn({16, 1}, DType::Float32, data_gen);
  const Tensor y = matmul(x, w) * 20000.0 + Regressor::kMeanPrice;
  Tensor reference;
  {
    no_grad ng;
    Generator gen(seed);
    reference = Regressor(gen).forward(x, Mode::FP32).to(DType::Float64);
  }
  std::printf("regression head predicting ~%.0f (float16 max 65504), %lld steps of AdamW\n", Regressor::kMeanPrice,
              static_cast<long long>(steps));
  std::printf("| mode | inf/NaN outputs of linear | rel. error of predictions vs fp32 | skipped steps | final loss |\n|---|---|---|---|---|\n");
  const struct {
    Mode mode;
    const char* name;
  } modes[] = {{Mode::FP32, "float32"}, {Mode::AllFp16, "fp16 autocast, whole model"}, {Mode::Fp32Head, "fp16 autocast, float32 head"}};
  for (const auto& m : modes) {
    const Outcome o = train(m.mode, steps, seed, x, y, reference);
    std::printf("| %s | %lld | %.2e | %lld | %.4f |\n", m.name, static_cast<long long>(o.head_nonfinite), o.rel_error_vs_fp32,
                static_cast<long long>(o.skipped), o.final_loss);
  }
  return 0;
}

}  // namespace patterns
