// A small CNN and a transformer block give forward outputs and gradients under autocast that
// match float32 within the dtype's tolerance; weights stay float32 and their grads arrive in float32.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using namespace mixprec::testing;

namespace {
struct AmGrads {
  Tensor out;
  std::vector<Tensor> grads;
};

AmGrads am_run(nn::Module& model, const Tensor& x, const Tensor& target, std::optional<DType> low) {
  model.zero_grad();
  Tensor out, loss;
  {
    std::optional<autocast> ac;
    if (low) ac.emplace(Device::CPU, *low);
    out = model.forward(x);
    loss = mse_loss(out, target);
  }
  EXPECT_EQ(loss.dtype(), kFloat32);
  loss.backward();
  AmGrads r{out.detach().to(kFloat32), {}};
  for (const Tensor& p : model.parameters()) {
    EXPECT_EQ(p.dtype(), kFloat32);
    EXPECT_EQ(p.grad().dtype(), kFloat32);
    r.grads.push_back(p.grad().clone());
  }
  return r;
}

// Weight gradients are sums over batch and positions of products whose terms largely cancel,
// so their relative error is a few times the dtype's epsilon ratio: bfloat16 keeps 8 bits,
// float16 11, and the measured errors scale by that 8x (about 0.07 vs 0.008 for the first conv).
void am_compare(nn::Module& model, const Tensor& x, const Tensor& target, double bf16_tol, double fp16_tol) {
  const AmGrads ref = am_run(model, x, target, std::nullopt);
  for (DType low : {kBFloat16, kFloat16}) {
    const double tol = low == kBFloat16 ? bf16_tol : fp16_tol;
    const double grad_tol = low == kBFloat16 ? 4 * tol : 2 * tol;
    const AmGrads got = am_run(model, x, target, low);
    EXPECT_LT(rel_error(got.out, ref.out), tol) << "forward under " << low;
    const auto names = model.named_parameters();
    for (std::size_t i = 0; i < ref.grads.size(); ++i)
      EXPECT_LT(rel_error(got.grads[i], ref.grads[i]), grad_tol) << "gradient of " << names[i].first << " under " << low;
  }
}
}  // namespace

TEST(AutocastModels, SmallCnnMatchesFloat32) {
  Generator g(21);
  nn::Sequential cnn{std::make_shared<nn::Conv2d>(3, 8, 3, 1, 1, 1, 1, true, g), std::make_shared<nn::BatchNorm2d>(8),
                     std::make_shared<nn::ReLU>(), std::make_shared<nn::MaxPool2d>(2),
                     std::make_shared<nn::Conv2d>(8, 16, 3, 1, 1, 1, 1, true, g), std::make_shared<nn::ReLU>(),
                     std::make_shared<nn::AdaptiveAvgPool2d>(nn::Size2{1, 1}), std::make_shared<nn::Flatten>(),
                     std::make_shared<nn::Linear>(16, 5, true, g)};
  cnn.eval();  // running statistics fixed: both runs see the same normalisation
  const Tensor x = randn({4, 3, 12, 12}, kFloat32, g), target = randn({4, 5}, kFloat32, g);
  am_compare(cnn, x, target, 2e-2, 3e-3);
}

TEST(AutocastModels, TransformerBlockMatchesFloat32) {
  Generator g(22);
  nn::TransformerBlock block(32, 4, 64, 0.0, /*causal=*/true, g);
  const Tensor x = randn({2, 10, 32}, kFloat32, g), target = randn({2, 10, 32}, kFloat32, g);
  am_compare(block, x, target, 2e-2, 3e-3);
}

// batch_norm is unlisted: under autocast it takes the 16-bit conv output with its float32 weight
// and running statistics and writes a 16-bit output, so a conv-bn-relu stack saves 16-bit
// activations only. Its statistics still match float32's.
TEST(AutocastModels, BatchNormKeepsSixteenBitActivationsWithFloat32Statistics) {
  Generator g(5);
  const Tensor x = randn({8, 4, 10, 10}, kFloat32, g);
  for (DType low : {kBFloat16, kFloat16}) {
    nn::Conv2d conv(4, 6, 3, 1, 1, 1, 1, false, g);
    nn::BatchNorm2d bn_ref(6), bn(6);
    const Tensor ref = bn_ref.forward(conv.forward(x));
    Tensor y;
    {
      autocast ac(Device::CPU, low);
      const Tensor c = conv.forward(x);
      ASSERT_EQ(c.dtype(), low);
      y = bn.forward(c);
    }
    EXPECT_EQ(y.dtype(), low);
    EXPECT_EQ(bn.running_mean.dtype(), kFloat32);
    EXPECT_LT(rel_error(y.to(kFloat32), ref), low == kBFloat16 ? 1e-2 : 2e-3) << low;
    EXPECT_LT(rel_error(bn.running_mean, bn_ref.running_mean), low == kBFloat16 ? 2e-2 : 3e-3) << low;
    EXPECT_LT(rel_error(bn.running_var, bn_ref.running_var), low == kBFloat16 ? 2e-2 : 3e-3) << low;
    sum(y * y).backward();
    EXPECT_EQ(bn.weight.grad().dtype(), kFloat32);
    EXPECT_EQ(conv.weight.grad().dtype(), kFloat32);
  }
}

// What the user buys with autocast: the tensors a conv-bn-relu network keeps for backward take
// about half of float32's bytes (the target of the benchmark issue is at most 55%).
TEST(AutocastModels, ConvNetSavesActivationsInSixteenBits) {
  Generator g(6);
  nn::Sequential net{std::make_shared<nn::Conv2d>(8, 16, 3, 1, 1, 1, 1, false, g), std::make_shared<nn::BatchNorm2d>(16),
                     std::make_shared<nn::ReLU>(), std::make_shared<nn::Conv2d>(16, 16, 3, 1, 1, 1, 1, false, g),
                     std::make_shared<nn::BatchNorm2d>(16), std::make_shared<nn::ReLU>(),
                     std::make_shared<nn::Conv2d>(16, 16, 3, 1, 1, 1, 1, false, g), std::make_shared<nn::BatchNorm2d>(16),
                     std::make_shared<nn::ReLU>()};
  const Tensor x = randn({16, 8, 16, 16}, kFloat32, g).to(kBFloat16);  // a 16-bit input, as from a previous layer
  const Tensor x32 = x.to(kFloat32);
  auto graph_bytes = [&](const Tensor& input, bool amp) {
    const int64_t before = memory_stats(Device::CPU).allocated_bytes;
    std::optional<autocast> ac;
    if (amp) ac.emplace(Device::CPU, kBFloat16);
    const Tensor out = net.forward(input);
    return memory_stats(Device::CPU).allocated_bytes - before;  // saved tensors + output, graph alive
  };
  const int64_t f32 = graph_bytes(x32, false), bf16 = graph_bytes(x, true);
  EXPECT_GT(f32, 0);
  EXPECT_LE(static_cast<double>(bf16), 0.55 * static_cast<double>(f32)) << "fp32 " << f32 << " bytes, bf16 autocast " << bf16;
}
