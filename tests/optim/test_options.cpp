// Named-argument forms (options structs with designated initializers) next to the PyTorch-order
// positional constructors: each sets exactly what the positional form sets, the rest defaulted.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <vector>

using namespace mixprec;

TEST(Options, OptimizersTakeNamedArguments) {
  const std::vector<Tensor> p{randn({3}).requires_grad_()};
  optim::AdamW a(p, {.lr = 3e-4, .weight_decay = 0.1});
  const auto& ga = a.param_groups()[0];
  EXPECT_EQ(ga.lr, 3e-4);
  EXPECT_EQ(ga.weight_decay, 0.1);
  EXPECT_EQ(ga.betas, (std::pair<double, double>{0.9, 0.999}));
  EXPECT_EQ(ga.eps, 1e-8);
  EXPECT_EQ(ga.amsgrad, false);
  EXPECT_STREQ(a.name(), "AdamW");

  optim::Adam b(p, {.betas = {0.8, 0.95}, .amsgrad = true});
  EXPECT_EQ(b.param_groups()[0].lr, 1e-3);
  EXPECT_EQ(b.param_groups()[0].weight_decay, 0.0);  // Adam's default, not AdamW's
  EXPECT_EQ(b.param_groups()[0].betas, (std::pair<double, double>{0.8, 0.95}));
  EXPECT_EQ(b.param_groups()[0].amsgrad, true);

  optim::SGD s(p, {.lr = 0.1, .momentum = 0.9, .nesterov = true});
  EXPECT_EQ(s.param_groups()[0].lr, 0.1);
  EXPECT_EQ(s.param_groups()[0].momentum, 0.9);
  EXPECT_EQ(s.param_groups()[0].dampening, 0.0);
  EXPECT_EQ(s.param_groups()[0].nesterov, true);
  // The checks of the positional form apply: Nesterov needs momentum and no dampening.
  EXPECT_THROW(optim::SGD(p, {.lr = 0.1, .nesterov = true}), Error);

  // The same update as the positional form.
  Tensor w1 = randn({4}).requires_grad_(), w2 = w1.detach().clone().requires_grad_();
  optim::AdamW o1({w1}, {.lr = 0.01, .betas = {0.8, 0.9}, .weight_decay = 0.2}), o2({w2}, 0.01, {0.8, 0.9}, 1e-8, 0.2);
  for (Tensor* w : {&w1, &w2}) sum(mul(*w, *w)).backward();
  o1.step();
  o2.step();
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(w1.data<float>()[i], w2.data<float>()[i]);
}

TEST(Options, GradScalerAndDataLoaderTakeNamedArguments) {
  amp::GradScaler sc({.init_scale = 1024.0, .growth_interval = 100});
  EXPECT_EQ(sc.get_scale(), 1024.0);
  EXPECT_EQ(sc.get_growth_interval(), 100);
  EXPECT_EQ(sc.get_growth_factor(), 2.0);
  EXPECT_EQ(sc.get_backoff_factor(), 0.5);
  EXPECT_TRUE(sc.is_enabled());
  EXPECT_FALSE(amp::GradScaler({.enabled = false}).is_enabled());

  data::TensorDataset ds(arange(10.0).reshape({10, 1}), arange(10.0));
  data::DataLoader dl(ds, {.batch_size = 4, .drop_last = true});
  EXPECT_EQ(dl.batch_size(), 4);
  int64_t batches = 0;
  for (auto& b : dl) {
    EXPECT_EQ(b.inputs.size(0), 4);
    ++batches;
  }
  EXPECT_EQ(batches, 2);  // drop_last: 10 = 4 + 4 + (2 dropped)
}

TEST(Options, ModelFactoriesReturnSharedPointers) {
  std::shared_ptr<nn::models::GPT> g = nn::models::gpt({.vocab = 32, .block_size = 8, .n_layer = 1, .n_head = 2, .d_model = 16, .mlp_hidden = 32});
  EXPECT_EQ(g->config.d_model, 16);
  std::shared_ptr<nn::models::ResNet> r = nn::models::resnet20(10, 1);
  EXPECT_GT(r->parameters().size(), 10u);
}

TEST(Options, FactoriesTakeNamedOptions) {
  const Tensor z = zeros({2, 3}, {.dtype = DType::BFloat16});
  EXPECT_EQ(z.dtype(), DType::BFloat16);
  EXPECT_EQ(z.device(), Device::CPU);
  EXPECT_FALSE(z.requires_grad());
  const Tensor o = ones({4}, {.dtype = DType::Float64, .requires_grad = true});
  EXPECT_EQ(o.dtype(), DType::Float64);
  EXPECT_TRUE(o.requires_grad());
  EXPECT_EQ(o.data<double>()[3], 1.0);
  EXPECT_EQ(full({2}, 2.5, {.dtype = DType::Float16}).to(DType::Float32).data<float>()[1], 2.5f);
  EXPECT_EQ(empty({5}, {.dtype = DType::Int32}).dtype(), DType::Int32);
  Generator g1(7), g2(7);
  const Tensor a = randn({8}, {.dtype = DType::BFloat16}, g1), b = randn({8}, DType::BFloat16, g2);
  for (int64_t i = 0; i < 8; ++i) EXPECT_EQ(a.data<bfloat16>()[i].x, b.data<bfloat16>()[i].x);
  EXPECT_EQ(rand({3}, {.requires_grad = true}).requires_grad(), true);
  // A device with no kernels registered (CUDA here, without nvcc) is refused by name.
  if (!cuda_is_available()) EXPECT_THROW(zeros({2}, {.device = Device::CUDA}), Error);
}
