// Activation checkpointing (autograd/checkpoint.hpp) and GPT's checkpoint_blocks.
#include <gtest/gtest.h>

#include <cstring>
#include <iostream>
#include <vector>

#include <mixprec/mixprec.hpp>

using namespace mixprec;

namespace ckpt_test {

Tensor leaf64(const Shape& s, uint64_t seed) {
  Generator g(seed);
  Tensor t = randn(s, DType::Float64, g);
  t.requires_grad_();
  return t;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined()) return a.defined() == b.defined();
  if (a.dtype() != b.dtype() || a.sizes() != b.sizes()) return false;
  const Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), static_cast<std::size_t>(ca.nbytes())) == 0;
}

// Every parameter's gradient, in order.
std::vector<Tensor> grads_of(nn::Module& m) {
  std::vector<Tensor> out;
  for (const Tensor& p : m.parameters()) out.push_back(p.grad().defined() ? p.grad().clone() : Tensor());
  return out;
}

}  // namespace ckpt_test

using namespace ckpt_test;

TEST(Checkpoint, BitIdenticalGradientsWithDropoutUnderBf16Autocast) {
  Generator init(3);
  nn::TransformerBlock block(16, 2, 32, /*dropout=*/0.2, /*causal=*/true, init);
  block.train();
  Generator data(4);
  const Tensor x0 = randn({2, 6, 16}, DType::Float32, data);
  const Generator::State init_state = init.get_state();

  auto run = [&](bool ckpt, Tensor& x, Tensor& out, Generator::State& rng_after_forward, Generator::State& rng_after_backward,
                 bool bf16 = true) {
    init.set_state(init_state);
    manual_seed(77);
    block.zero_grad();
    x = x0.clone();
    x.requires_grad_();
    Tensor loss;
    {
      autocast ac{Device::CPU, DType::BFloat16, bf16};
      out = ckpt ? autograd::checkpoint({.generators = {&init}}, [&](const Tensor& h) { return block.forward(h); }, x)
                 : block.forward(x);
      loss = sum(mul(out.to(DType::Float32), out.to(DType::Float32)));
    }
    rng_after_forward = default_generator().get_state();
    loss.backward();
    rng_after_backward = default_generator().get_state();
  };
  Tensor xp, op, xc, oc;
  Generator::State fp, bp, fc, bc;
  run(false, xp, op, fp, bp);
  const std::vector<Tensor> gp = grads_of(block);
  run(true, xc, oc, fc, bc);
  const std::vector<Tensor> gc = grads_of(block);

  {  // autocast mattered: the same run in float32 gives another output
    Tensor x32, o32;
    Generator::State f32, b32;
    run(false, x32, o32, f32, b32, /*bf16=*/false);
    EXPECT_FALSE(same_bits(o32, op));
  }
  EXPECT_TRUE(same_bits(op, oc));
  EXPECT_TRUE(same_bits(xp.grad(), xc.grad()));
  ASSERT_EQ(gp.size(), gc.size());
  for (std::size_t i = 0; i < gp.size(); ++i) {
    ASSERT_TRUE(gp[i].defined()) << "parameter " << i;
    EXPECT_TRUE(same_bits(gp[i], gc[i])) << "parameter " << i;
  }
  // The recomputation replays the generators and then puts them back: later draws are unshifted.
  EXPECT_EQ(fp, fc);
  EXPECT_EQ(bc, fc);
  // Dropout was really active: eval mode gives another output.
  block.eval();
  {
    no_grad ng;
    autocast ac{Device::CPU, DType::BFloat16};
    EXPECT_FALSE(same_bits(block.forward(x0), op));
  }
}

TEST(Checkpoint, Float64GradcheckThroughInputsAndCapturedParameters) {
  const Tensor a = leaf64({3, 4}, 1), b = leaf64({3, 4}, 2), w = leaf64({4, 5}, 3);
  EXPECT_TRUE(gradcheck(
      [](const std::vector<Tensor>& in) {
        const Tensor weight = in[2];  // captured (by value), not an input of checkpoint: a module's parameter
        return autograd::checkpoint([weight](const Tensor& p, const Tensor& q) { return matmul(tanh(mul(p, q)), weight); }, in[0], in[1]);
      },
      {a, b, w}));
}

TEST(Checkpoint, CapturedNonLeafGetsItsGradientThroughTheOuterGraph) {
  // h is read inside fn and used outside it too: its history must run once, after both uses
  // delivered their gradients (a nested backward running it would free it for the outer one).
  const Tensor a = leaf64({3, 4}, 9), b = leaf64({3, 4}, 10);
  const auto f = [](const std::vector<Tensor>& in) {
    const Tensor h = exp(in[1]);
    return add(autograd::checkpoint([h](const Tensor& p) { return mul(tanh(p), h); }, in[0]), mul(h, h));  // h by value: it must outlive backward
  };
  EXPECT_TRUE(gradcheck(f, {a, b}));
  // And the leaf parameters' gradients arrive through the outer graph: their post-accumulate hooks
  // run once per backward, in the outer backward.
  int hooks = 0;
  uint64_t seen_backward = 0;
  const uint64_t handle = autograd::register_post_accumulate_grad_hook(b, [&](const Tensor&) {
    ++hooks;
    seen_backward = autograd::backward_id();
  });
  uint64_t outer = 0;
  const Tensor y = sum(f({a, b}));
  autograd::register_post_accumulate_grad_hook(a, [&](const Tensor&) { outer = autograd::backward_id(); });
  y.backward();
  EXPECT_EQ(hooks, 1);
  EXPECT_EQ(seen_backward, outer);
  autograd::remove_post_accumulate_grad_hook(b, handle);
}

TEST(Checkpoint, NestedAndMultipleOutputsMatchThePlainRun) {
  const Tensor w = leaf64({4, 4}, 5);
  auto inner = [&](const Tensor& h) { return gelu(matmul(h, w)); };
  auto body = [&](const Tensor& h, bool ckpt) -> std::vector<Tensor> {
    const Tensor t = ckpt ? autograd::checkpoint(inner, h) : inner(h);
    return {sigmoid(t), mul(t, h)};
  };
  auto loss_of = [&](bool ckpt, const Tensor& x) {
    const std::vector<Tensor> o =
        ckpt ? autograd::checkpoint([&](const Tensor& h) { return body(h, true); }, x) : body(x, false);
    return add(sum(o[0]), sum(mul(o[1], o[1])));
  };
  const Tensor x = leaf64({3, 4}, 6);
  loss_of(false, x).backward();
  const Tensor gx = x.grad().clone(), gw = w.grad().clone();
  x.set_grad(Tensor());
  w.set_grad(Tensor());
  loss_of(true, x).backward();
  EXPECT_TRUE(same_bits(gx, x.grad()));
  EXPECT_TRUE(same_bits(gw, w.grad()));
  EXPECT_TRUE(gradcheck([&](const std::vector<Tensor>& in) { return loss_of(true, in[0]); }, {x}));
}

TEST(Checkpoint, NoGraphUnderNoGradAndParametersGetGradientsWithoutInputGrads) {
  const Tensor w = leaf64({4, 2}, 7);
  const Tensor x = randn({3, 4}, DType::Float64);  // requires no grad (use_reentrant=False: still fine)
  auto fn = [&](const Tensor& h) { return matmul(h, w); };
  {
    no_grad ng;
    const Tensor y = autograd::checkpoint(fn, x);
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
  }
  const Tensor y = autograd::checkpoint(fn, x);
  ASSERT_TRUE(y.requires_grad());
  sum(y).backward();
  ASSERT_TRUE(w.grad().defined());
  const Tensor expected = matmul(x.t(), ones({3, 2}, DType::Float64));
  EXPECT_TRUE(same_bits(w.grad(), expected));
  // Nothing requires grad: fn just runs, nothing is recorded.
  const Tensor c = randn({4, 2}, DType::Float64);
  EXPECT_FALSE(autograd::checkpoint([&](const Tensor& h) { return matmul(h, c); }, x).requires_grad());
}

TEST(Checkpoint, InPlaceChangeOfASavedInputIsAnError) {
  const Tensor x = leaf64({5}, 8);
  Tensor h = mul(x, 2.0);
  const Tensor y = autograd::checkpoint([](const Tensor& t) { return exp(t); }, h);
  {
    no_grad ng;
    h.fill_(0.0);
  }
  EXPECT_THROW(sum(y).backward(), Error);
}

TEST(Checkpoint, GptWithEveryBlockCheckpointedUsesLessPeakMemorySameGradients) {
  nn::models::GPTConfig cfg{.vocab = 64, .block_size = 64, .n_layer = 6, .n_head = 4, .d_model = 128, .mlp_hidden = 512, .dropout = 0.1};
  struct Run {
    int64_t peak = 0;
    std::vector<Tensor> grads;
    Tensor loss;
  };
  Generator data(21);
  const Tensor idx = randint(0, cfg.vocab, {8, 64}, DType::Int64, data);
  const Tensor targets = randint(0, cfg.vocab, {8, 64}, DType::Int64, data);
  auto run = [&](bool ckpt) {
    Generator g(12);
    cfg.checkpoint_blocks = ckpt;
    auto model = nn::models::gpt(cfg, g);
    model->train();
    manual_seed(31);
    Run r;
    reset_peak_memory_stats();
    const int64_t base = memory_stats().allocated_bytes;
    {
      autocast ac{Device::CPU, DType::BFloat16};
      r.loss = model->loss(idx, targets);
    }
    r.loss.backward();
    r.peak = memory_stats().peak_allocated_bytes - base;
    r.grads = grads_of(*model);
    return r;
  };
  const Run plain = run(false);
  const Run ckpt = run(true);
  std::cout << "GPT-mini (6 blocks, d 128, batch 8 x 64) peak tensor memory over forward + backward: " << plain.peak / 1024
            << " KiB plain, " << ckpt.peak / 1024 << " KiB with every block checkpointed\n";
  EXPECT_LT(ckpt.peak, plain.peak * 6 / 10);
  EXPECT_TRUE(same_bits(plain.loss, ckpt.loss));
  ASSERT_EQ(plain.grads.size(), ckpt.grads.size());
  for (std::size_t i = 0; i < plain.grads.size(); ++i) EXPECT_TRUE(same_bits(plain.grads[i], ckpt.grads[i])) << "parameter " << i;
}
