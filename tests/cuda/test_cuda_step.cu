// A training step on the GPU without host synchronisation, eager and captured in a CUDA graph
// (CapturedStep): ResNet-20- and GPT-mini-sized models train the same few steps both ways and end
// with the same weights, scale and step counts, including float16 steps that overflow and are
// skipped inside the graph. Part of test_cuda_device (one executable); each test skips without a GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>

#include <mixprec/cuda.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::rel_error;

#define MIXPREC_STEP_REQUIRE_GPU() \
  if (!cuda_is_available()) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason()

namespace cuda_step_test {

// One model, optimizer and scaler trained by `step_fn` over `batches`, eagerly or captured.
struct TrainRun {
  std::vector<Tensor> params;
  std::unique_ptr<optim::Optimizer> opt;
  std::unique_ptr<amp::GradScaler> scaler;
  double ms_per_step = 0;
};

template <class StepFn>
void train(TrainRun& r, StepFn&& step_fn, const std::vector<std::vector<Tensor>>& batches, int steps, bool capture) {
  std::unique_ptr<gpu::CapturedStep> cs;
  if (capture) cs = std::make_unique<gpu::CapturedStep>([&](const std::vector<Tensor>& in) { return step_fn(in); });
  std::vector<Tensor> device_batch;
  double ms = 0;
  for (int it = 0; it < steps; ++it) {
    const auto& b = batches[static_cast<std::size_t>(it) % batches.size()];
    gpu::synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    if (capture) {
      (void)(*cs)(b);
    } else {
      device_batch.clear();
      for (const Tensor& t : b) device_batch.push_back(t.to(Device::CUDA));
      (void)step_fn(device_batch);
    }
    gpu::synchronize();
    if (it >= 2) ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  r.ms_per_step = steps > 2 ? ms / (steps - 2) : 0;
  if (capture) {
    EXPECT_TRUE(cs->captured());
    EXPECT_EQ(cs->replays(), steps - 1);  // one warm-up step, then every step replays
  }
}

// With `again` (a second eager run of the same steps), each parameter may differ from the eager
// run by up to tol plus three times the two eager runs' own difference: cuDNN's benchmarked
// algorithms and attention's dQ accumulate with atomics, so runs are not bit-reproducible, and
// a few steps of SGD/AdamW amplify that noise (a bias whose gradient is zero in exact arithmetic,
// as attention's key bias, moves by +-lr on noise alone). A captured step that computed anything
// else would be far outside that band; CapturedIngredientsTrainAsEager checks the bitwise case.
void expect_same_training(const TrainRun& eager, const TrainRun& graph, double tol, const char* what, const TrainRun* again = nullptr) {
  ASSERT_EQ(eager.params.size(), graph.params.size());
  double worst = 0, worst_noise = 0;
  for (std::size_t i = 0; i < eager.params.size(); ++i) {
    const double err = rel_error(graph.params[i].cpu().to(DType::Float32), eager.params[i].cpu().to(DType::Float32));
    const double noise = again ? rel_error(again->params[i].cpu().to(DType::Float32), eager.params[i].cpu().to(DType::Float32)) : 0.0;
    worst = std::max(worst, err);
    worst_noise = std::max(worst_noise, noise);
    EXPECT_LT(err, tol + 3 * noise) << what << ": parameter " << i << " (eager against eager: " << noise << ")";
    EXPECT_EQ(graph.opt->state(i).step, eager.opt->state(i).step) << what << ": parameter " << i;
  }
  EXPECT_EQ(graph.scaler->get_scale(), eager.scaler->get_scale()) << what;
  EXPECT_EQ(graph.scaler->skipped_steps(), eager.scaler->skipped_steps()) << what;
  std::printf("[ %s ] eager %.3f ms/step, captured %.3f ms/step; largest parameter difference captured/eager %.3e, eager/eager %.3e\n",
              what, eager.ms_per_step, graph.ms_per_step, worst, worst_noise);
}

std::vector<std::vector<Tensor>> image_batches(int64_t n, Generator& g) {
  std::vector<std::vector<Tensor>> out;
  for (int k = 0; k < 3; ++k) out.push_back({randn({n, 3, 32, 32}, DType::Float32, g), randint(0, 10, {n}, DType::Int64, g)});
  return out;
}

// ResNet-20 (CIFAR), batch 32, SGD with momentum, GradScaler and clip_grad_norm_; float32 and
// float16 autocast. The float16 run starts at a scale of 2^26 so its first steps overflow and
// are skipped -- inside the graph for the captured run -- until the scale has backed off.
TEST(CudaStep, CapturedResNet20TrainsAsEager) {
  MIXPREC_STEP_REQUIRE_GPU();
  Generator gd(41);
  const auto batches = image_batches(32, gd);
  for (bool fp16 : {false, true}) {
    SCOPED_TRACE(fp16 ? "float16 autocast" : "float32");
    TrainRun runs[3];  // eager, captured, eager again (the noise band)
    for (int k = 0; k < 3; ++k) {
      Generator g(42);
      auto model = nn::models::resnet20(10, 3, false, g);
      model->to(Device::CUDA);
      TrainRun& r = runs[k];
      r.params = model->parameters();
      r.opt = std::make_unique<optim::SGD>(r.params, 0.05, 0.9, 0.0, 1e-4, true);
      r.scaler = std::make_unique<amp::GradScaler>(fp16 ? std::ldexp(1.0, 26) : 1024.0, 2.0, 0.5, 3);
      auto step = [&, model](const std::vector<Tensor>& in) {
        r.opt->zero_grad();
        Tensor loss;
        {
          std::optional<autocast> ac;
          if (fp16) ac.emplace(Device::CUDA, DType::Float16);
          loss = cross_entropy(model->forward(in[0]), in[1]);
        }
        r.scaler->scale(loss).backward();
        r.scaler->unscale_(*r.opt);
        (void)optim::clip_grad_norm_(*r.opt, 5.0);
        r.scaler->step(*r.opt);
        r.scaler->update();
        return loss;
      };
      train(r, step, batches, 12, /*capture=*/k == 1);
    }
    if (fp16) EXPECT_GT(runs[0].scaler->skipped_steps(), 0) << "the float16 run was meant to overflow";
    expect_same_training(runs[0], runs[1], fp16 ? 1e-3 : 1e-4, fp16 ? "ResNet-20 fp16" : "ResNet-20 fp32", &runs[2]);
  }
}

// GPT-mini (4 layers, d 256, seq 128, batch 32), AdamW, bfloat16 autocast and GradScaler; no
// dropout here, so the two runs draw nothing and must agree.
TEST(CudaStep, CapturedGptMiniTrainsAsEager) {
  MIXPREC_STEP_REQUIRE_GPU();
  nn::models::GPTConfig cfg;
  cfg.vocab = 256, cfg.block_size = 128, cfg.n_layer = 4, cfg.n_head = 4, cfg.d_model = 256, cfg.mlp_hidden = 1024, cfg.dropout = 0.0;
  Generator gd(51);
  std::vector<std::vector<Tensor>> batches;
  for (int k = 0; k < 3; ++k)
    batches.push_back({randint(0, cfg.vocab, {32, 128}, DType::Int64, gd), randint(0, cfg.vocab, {32, 128}, DType::Int64, gd)});
  for (DType dt : {DType::BFloat16, DType::Float16}) {
    SCOPED_TRACE(name(dt));
    TrainRun runs[3];  // eager, captured, eager again (the noise band)
    for (int k = 0; k < 3; ++k) {
      Generator g(52);
      auto model = std::make_shared<nn::models::GPT>(cfg, g);
      model->to(Device::CUDA);
      TrainRun& r = runs[k];
      r.params = model->parameters();
      r.opt = std::make_unique<optim::AdamW>(r.params, 3e-4);
      // float16: an absurd initial scale, so that the first steps are skipped inside the graph.
      r.scaler = std::make_unique<amp::GradScaler>(dt == DType::Float16 ? std::ldexp(1.0, 31) : 1.0, 2.0, 0.5, 4);
      auto step = [&, model](const std::vector<Tensor>& in) {
        r.opt->zero_grad();
        Tensor loss;
        {
          autocast ac(Device::CUDA, dt);
          loss = model->loss(in[0], in[1]);
        }
        r.scaler->scale(loss).backward();
        r.scaler->step(*r.opt);
        r.scaler->update();
        return loss;
      };
      train(r, step, batches, 10, /*capture=*/k == 1);
    }
    if (dt == DType::Float16) EXPECT_GT(runs[0].scaler->skipped_steps(), 0) << "the float16 run was meant to overflow";
    // AdamW normalises each gradient: last-bit differences of the atomics in the embedding
    // backward show a little more than in SGD.
    expect_same_training(runs[0], runs[1], 2e-3, dt == DType::Float16 ? "GPT-mini fp16" : "GPT-mini bf16", &runs[2]);
  }
}

// Dropout inside the graph draws new masks on every replay (the replay counter is mixed into
// the seed on the device), the loss stays a static output, and it is finite.
TEST(CudaStep, CapturedDropoutDrawsNewMasksEachReplay) {
  MIXPREC_STEP_REQUIRE_GPU();
  Generator g(61);
  const Tensor w = randn({64, 64}, DType::Float32, g).to(Device::CUDA).requires_grad_();
  optim::SGD opt({w}, 0.0);  // lr 0: the weights stay, only the masks change
  gpu::CapturedStep step([&](const std::vector<Tensor>& in) {
    opt.zero_grad();
    const Tensor loss = sum(dropout(matmul(in[0], w), 0.5, true));
    loss.backward();
    opt.step();
    return loss;
  });
  const Tensor x = randn({8, 64}, DType::Float32, g);
  std::vector<float> losses;
  for (int it = 0; it < 4; ++it) losses.push_back(step({x}).item<float>());
  EXPECT_TRUE(step.captured());
  for (float l : losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_NE(losses[2], losses[3]);  // two replays, two masks
  EXPECT_NE(losses[1], losses[2]);
}

// A host read inside the step is refused while capturing, naming the op, and the device is left
// usable: the same CapturedStep captures on its next call once the read is gone.
TEST(CudaStep, HostReadsAreRefusedWhileCapturing) {
  MIXPREC_STEP_REQUIRE_GPU();
  const Tensor w = randn({16}).to(Device::CUDA);
  bool read = true;
  gpu::CapturedStep step(
      [&](const std::vector<Tensor>& in) {
        const Tensor y = sum(mul(in[0], w));
        if (read) (void)y.item<float>();
        return y;
      },
      Device::CUDA, 0);
  try {
    step({randn({16})});
    ADD_FAILURE() << "a host read inside the capture was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CapturedStep is being captured"), std::string::npos) << e.what();
  }
  read = false;
  const Tensor x = randn({16});
  const float got = step({x}).item<float>();
  EXPECT_NEAR(got, sum(mul(x, w.cpu())).item<float>(), 1e-4);
  EXPECT_TRUE(step.captured());
}

// cross_entropy with an out-of-range target inside a replay: reported at the next read.
TEST(CudaStep, DeviceErrorsInsideTheGraphAreReportedAfterTheReplay) {
  MIXPREC_STEP_REQUIRE_GPU();
  const Tensor logits = randn({4, 5}).to(Device::CUDA);
  gpu::CapturedStep step([&](const std::vector<Tensor>& in) { return cross_entropy(logits, in[0]); });
  const Tensor good = tensor(std::vector<int64_t>{0, 1, 2, 3}), bad = tensor(std::vector<int64_t>{0, 9, 2, 3});
  (void)step({good}).item<float>();  // warm-up
  (void)step({good}).item<float>();  // captured and replayed
  const Tensor loss = step({bad});
  try {
    (void)loss.item<float>();
    ADD_FAILURE() << "the out-of-range target was not reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cross_entropy: a target value is out of range [0, 5)"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(std::isfinite(step({good}).item<float>()));
}


// Eager against captured on small models, one ingredient added at a time (plain SGD on an MLP;
// momentum, Nesterov and weight decay; GradScaler + clip; a convolution; batch norm): which
// ingredient a captured step gets wrong, if any, shows as the first failing line.
TEST(CudaStep, CapturedIngredientsTrainAsEager) {
  MIXPREC_STEP_REQUIRE_GPU();
  struct Case {
    const char* what;
    bool conv, bn, momentum, scaler;
  };
  for (const Case& c : {Case{"mlp sgd", false, false, false, false}, Case{"mlp sgd momentum nesterov wd", false, false, true, false},
                        Case{"mlp + scaler + clip", false, false, true, true}, Case{"conv sgd", true, false, false, false},
                        Case{"conv + batch norm sgd", true, true, false, false}, Case{"conv + bn + momentum + scaler", true, true, true, true}}) {
    SCOPED_TRACE(c.what);
    Generator gd(61);
    std::vector<std::vector<Tensor>> batches;
    for (int k = 0; k < 3; ++k)
      batches.push_back({randn({16, 3, 8, 8}, DType::Float32, gd), randint(0, 10, {16}, DType::Int64, gd)});
    TrainRun runs[2];
    for (int k = 0; k < 2; ++k) {
      Generator g(62);
      std::shared_ptr<nn::Sequential> model;
      if (c.conv)
        model = std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
            std::make_shared<nn::Conv2d>(3, 8, 3, 1, 1, 1, 1, !c.bn, g), c.bn ? std::shared_ptr<nn::Module>(std::make_shared<nn::BatchNorm2d>(8))
                                                                              : std::shared_ptr<nn::Module>(std::make_shared<nn::Identity>()),
            std::make_shared<nn::ReLU>(), std::make_shared<nn::AdaptiveAvgPool2d>(1), std::make_shared<nn::Flatten>(),
            std::make_shared<nn::Linear>(8, 10, true, g)});
      else
        model = std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
            std::make_shared<nn::Flatten>(), std::make_shared<nn::Linear>(192, 64, true, g), std::make_shared<nn::ReLU>(),
            std::make_shared<nn::Linear>(64, 10, true, g)});
      model->to(Device::CUDA);
      TrainRun& r = runs[k];
      r.params = model->parameters();
      r.opt = c.momentum ? std::make_unique<optim::SGD>(r.params, 0.05, 0.9, 0.0, 1e-4, true) : std::make_unique<optim::SGD>(r.params, 0.05);
      r.scaler = std::make_unique<amp::GradScaler>(1024.0, 2.0, 0.5, 3, c.scaler);
      auto step = [&, model](const std::vector<Tensor>& in) {
        r.opt->zero_grad();
        const Tensor loss = cross_entropy(model->forward(in[0]), in[1]);
        r.scaler->scale(loss).backward();
        if (c.scaler) {
          r.scaler->unscale_(*r.opt);
          (void)optim::clip_grad_norm_(*r.opt, 5.0);
        }
        r.scaler->step(*r.opt);
        r.scaler->update();
        return loss;
      };
      train(r, step, batches, 6, /*capture=*/k == 1);
    }
    for (std::size_t i = 0; i < runs[0].params.size(); ++i)
      std::printf("[ capture ingredients ] %-32s parameter %zu: rel err %.3e\n", c.what, i,
                  rel_error(runs[1].params[i].cpu(), runs[0].params[i].cpu()));
    expect_same_training(runs[0], runs[1], 1e-5, c.what);
  }
}

}  // namespace cuda_step_test
