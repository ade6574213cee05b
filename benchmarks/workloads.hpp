#pragma once
// The two reference training workloads, defined once for the benchmark suite
// (bench_train.cpp) and the peer runner (peers/mixprec_workloads.cpp); peers/torch_workloads.cpp
// mirrors them layer for layer. Inputs are one fixed random batch: data loading is not timed.
//   ResNet-20: CIFAR-style, 3 stages x 3 BasicBlocks (16/32/64 channels), BatchNorm, ReLU,
//              input [128, 1, 28, 28], 10 classes, AdamW.
//   GPT-mini:  vocab 256, d_model 256, 4 pre-norm blocks, 4 heads, MLP 1024 with GELU,
//              sequence 128, batch 16, tied head, AdamW.
// AdamW uses PyTorch's defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01) on both
// sides so the optimizer does the same work.
#include <memory>
#include <string>

#include <mixprec/mixprec.hpp>

#include "../examples/common/precision.hpp"

namespace mixprec::bench {

using examples::Precision;

enum class Workload { ResNet20, GptMini };

inline Workload parse_workload(const std::string& s) {
  if (s == "resnet20") return Workload::ResNet20;
  if (s == "gpt-mini") return Workload::GptMini;
  fail("--workload must be resnet20 or gpt-mini, got '", s, "'");
}
inline const char* workload_name(Workload w) { return w == Workload::ResNet20 ? "resnet20" : "gpt-mini"; }
inline const char* precision_name(Precision p) {
  return p == Precision::FP32 ? "fp32" : p == Precision::BF16 ? "bf16" : "fp16";
}

inline constexpr int64_t kResNetBatch = 128, kResNetImage = 28, kResNetClasses = 10;
inline constexpr int64_t kGptBatch = 16, kGptSeq = 128;

// Multiply-add FLOPs (2 per MAC) of one training step's GEMMs and convolutions: the forward's,
// times 3 (the backward computes an input and a weight gradient of each). Element-wise work is
// not counted, so FLOPs / (step time x the measured GEMM rate) is the fraction of the machine's
// matrix throughput the step achieves -- its distance from the floor.
inline double flops_per_step(Workload w) {
  double fwd = 0;
  if (w == Workload::ResNet20) {
    auto conv = [&](double cin, double cout, double k, double hw_out) { fwd += 2 * cin * cout * k * k * hw_out * kResNetBatch; };
    const double s1 = kResNetImage * kResNetImage, s2 = s1 / 4, s3 = s1 / 16;
    conv(1, 16, 3, s1);                    // stem
    for (int i = 0; i < 6; ++i) conv(16, 16, 3, s1);  // stage 1: 3 blocks of two 3x3 convs
    conv(16, 32, 3, s2), conv(16, 32, 1, s2);          // stage 2: strided conv + 1x1 projection
    for (int i = 0; i < 5; ++i) conv(32, 32, 3, s2);
    conv(32, 64, 3, s3), conv(32, 64, 1, s3);          // stage 3
    for (int i = 0; i < 5; ++i) conv(64, 64, 3, s3);
    fwd += 2.0 * kResNetBatch * 64 * kResNetClasses;   // classifier
  } else {
    const nn::models::GPTConfig c;
    const double tokens = kGptBatch * kGptSeq, d = c.d_model;
    const double per_layer = 2 * tokens * d * (3 * d + d + 2 * c.mlp_hidden)  // qkv, out projection, MLP
                             + 4 * tokens * kGptSeq * d;                       // scores and weighted values
    fwd = c.n_layer * per_layer + 2 * tokens * d * c.vocab;                     // tied head
  }
  return 3 * fwd;
}

// One model, its optimizer and scaler, and a fixed batch; step() is one full training step.
class TrainingWorkload {
 public:
  TrainingWorkload(Workload w, Precision p, uint64_t seed = 0) : workload_(w), precision_(p), scaler_(65536.0, 2.0, 0.5, 2000, p == Precision::FP16) {
    Generator gen(seed);
    if (w == Workload::ResNet20) {
      model_ = nn::models::make_resnet("resnet20", kResNetClasses, 1, false, gen);
      // Channels-last, as a user converts the input once: every conv, batch norm and element-wise
      // op then keeps that layout, in which the CPU's convolutions run on oneDNN (when linked).
      inputs_ = randn({kResNetBatch, 1, kResNetImage, kResNetImage}, DType::Float32, gen).contiguous(MemoryFormat::ChannelsLast);
      targets_ = randint(0, kResNetClasses, {kResNetBatch}, DType::Int64, gen);
    } else {
      gpt_ = std::make_shared<nn::models::GPT>(nn::models::GPTConfig{}, gen);  // the defaults are GPT-mini
      model_ = gpt_;
      inputs_ = randint(0, gpt_->config.vocab, {kGptBatch, kGptSeq}, DType::Int64, gen);
      targets_ = randint(0, gpt_->config.vocab, {kGptBatch, kGptSeq}, DType::Int64, gen);
    }
    model_->train();
    opt_ = std::make_unique<optim::AdamW>(model_->parameters(), 1e-3, std::pair{0.9, 0.999}, 1e-8, 0.01);
  }

  // Forward under the precision's autocast, backward (scaled for fp16), optimizer step: the
  // examples' step without the LR schedule and gradient clipping. Returns the loss.
  double step() {
    Tensor loss;
    {
      examples::ForwardScope scope(precision_);
      loss = gpt_ ? gpt_->loss(inputs_, targets_) : cross_entropy(model_->forward(inputs_), targets_);
    }
    opt_->zero_grad();
    scaler_.scale(loss).backward();
    scaler_.step(*opt_);
    scaler_.update();
    return loss.item<double>();
  }

  int64_t num_parameters() const { return model_->num_parameters(); }
  Workload workload() const { return workload_; }
  Precision precision() const { return precision_; }

 private:
  Workload workload_;
  Precision precision_;
  std::shared_ptr<nn::Module> model_;
  std::shared_ptr<nn::models::GPT> gpt_;  // set for GPT-mini, whose loss() flattens the logits
  std::unique_ptr<optim::AdamW> opt_;
  amp::GradScaler scaler_;
  Tensor inputs_, targets_;
};

// Tensor bytes over one call of f: `peak` is the high-water mark of live tensor bytes (weights,
// optimizer state and everything the step allocates); `baseline` is what was live before, so
// peak - baseline is the step's own working set (activations saved for backward, gradients).
struct PeakMemory {
  int64_t peak = 0, baseline = 0;
};
template <class F>
PeakMemory measure_peak(F&& f) {
  reset_peak_memory_stats(Device::CPU);
  const int64_t baseline = memory_stats(Device::CPU).allocated_bytes;
  f();
  return {memory_stats(Device::CPU).peak_allocated_bytes, baseline};
}

}  // namespace mixprec::bench
