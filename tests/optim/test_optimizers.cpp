// Optimizers against torch.optim's update formulas replayed op by op in float32, master
// weights, parameter groups, state dicts, EMA and gradient clipping.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

using namespace mixprec;

namespace {

using OptVec = std::vector<float>;

// ---- torch ops, one float32 rounding each (the CPU kernels' scalar form) ----
OptVec opt_add(const OptVec& a, const OptVec& b, double alpha = 1.0) {  // torch.add(a, b, alpha=)
  const float al = static_cast<float>(alpha);
  OptVec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] + al * b[i];
  return r;
}
OptVec opt_mul(const OptVec& a, double s) {
  const float f = static_cast<float>(s);
  OptVec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] * f;
  return r;
}
OptVec opt_lerp(const OptVec& a, const OptVec& b, double w) {
  const float f = static_cast<float>(w);
  OptVec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = std::abs(f) < 0.5f ? a[i] + f * (b[i] - a[i]) : b[i] - (b[i] - a[i]) * (1.0f - f);
  return r;
}
OptVec opt_addcmul(const OptVec& s, const OptVec& a, const OptVec& b, double value) {
  const float v = static_cast<float>(value);
  OptVec r(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) r[i] = s[i] + v * a[i] * b[i];
  return r;
}
OptVec opt_addcdiv(const OptVec& s, const OptVec& a, const OptVec& b, double value) {
  const float v = static_cast<float>(value);
  OptVec r(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) r[i] = s[i] + v * a[i] / b[i];
  return r;
}
OptVec opt_sqrt(const OptVec& a) {
  OptVec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = std::sqrt(a[i]);
  return r;
}
OptVec opt_div(const OptVec& a, double s) {
  const float f = static_cast<float>(s);
  OptVec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] / f;
  return r;
}
OptVec opt_adds(const OptVec& a, double s) {
  const float f = static_cast<float>(s);
  OptVec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] + f;
  return r;
}
OptVec opt_maximum(const OptVec& a, const OptVec& b) {
  OptVec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = std::max(a[i], b[i]);
  return r;
}

// torch.optim.sgd._single_tensor_sgd
struct OptSgdRef {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
  OptVec buf;
  void step(OptVec& p, OptVec grad) {
    if (weight_decay != 0) grad = opt_add(grad, p, weight_decay);
    if (momentum != 0) {
      if (buf.empty()) buf = grad;
      else buf = opt_add(opt_mul(buf, momentum), grad, 1 - dampening);
      grad = nesterov ? opt_add(grad, buf, momentum) : buf;
    }
    p = opt_add(p, grad, -lr);
  }
};

// torch.optim.adam._single_tensor_adam / adamw (decoupled weight decay)
struct OptAdamRef {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, decoupled;
  OptVec m, v, vmax;
  double step_t = 0;
  void step(OptVec& p, OptVec grad) {
    if (m.empty()) m = v = vmax = OptVec(p.size(), 0.0f);
    step_t += 1;
    if (decoupled) p = opt_mul(p, 1 - lr * weight_decay);
    else if (weight_decay != 0) grad = opt_add(grad, p, weight_decay);
    m = opt_lerp(m, grad, 1 - beta1);
    v = opt_addcmul(opt_mul(v, beta2), grad, grad, 1 - beta2);
    const double bc1 = 1 - std::pow(beta1, step_t), bc2 = 1 - std::pow(beta2, step_t);
    const double step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
    OptVec denom;
    if (amsgrad) {
      vmax = opt_maximum(vmax, v);
      denom = opt_adds(opt_div(opt_sqrt(vmax), bc2_sqrt), eps);
    } else {
      denom = opt_adds(opt_div(opt_sqrt(v), bc2_sqrt), eps);
    }
    p = opt_addcdiv(p, m, denom, -step_size);
  }
};

OptVec opt_values(const Tensor& t) {
  const Tensor c = t.to(DType::Float32).contiguous();
  return OptVec(c.data<float>(), c.data<float>() + c.numel());
}

OptVec opt_random(int64_t n, uint64_t seed, float scale = 1.0f) {
  Generator g(seed);
  OptVec v(n);
  for (auto& x : v) x = static_cast<float>(g.normal()) * scale;
  return v;
}

// Bitwise equality; a build that contracts a*b+c into FMA rounds differently, so it gets 4 ulp.
void opt_expect_matches(const Tensor& t, const OptVec& ref, const char* what) {
  const OptVec got = opt_values(t);
  ASSERT_EQ(got.size(), ref.size()) << what;
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
#if defined(__FMA__)
    const bool ok = std::abs(got[i] - ref[i]) <= 4 * std::abs(ref[i]) * std::numeric_limits<float>::epsilon();
#else
    const bool ok = std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(ref[i]);
#endif
    if (!ok && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": first mismatch at " << first << ": got " << got[first] << ", torch formula gives " << ref[first];
}

Tensor opt_param(const OptVec& v, DType d = DType::Float32) {
  Tensor t = tensor(v, {static_cast<int64_t>(v.size())}).to(d);
  t.requires_grad_();
  return t;
}

}  // namespace

// 70001 elements: more than one parallel chunk and a ragged last block.
TEST(OptimSGD, MatchesTorchFormulasOverThreeSteps) {
  struct Case {
    double lr, momentum, dampening, weight_decay;
    bool nesterov;
  };
  for (const Case c : {Case{0.1, 0.0, 0.0, 0.0, false}, Case{0.1, 0.9, 0.0, 0.0, false}, Case{0.05, 0.9, 0.0, 1e-2, true},
                       Case{0.1, 0.8, 0.3, 0.0, false}, Case{0.2, 0.7, 0.1, 5e-3, false}, Case{0.1, 0.0, 0.0, 0.1, false}}) {
    const int64_t n = 70001;
    OptVec w = opt_random(n, 1);
    Tensor p = opt_param(w);
    optim::SGD opt({p}, c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov);
    OptSgdRef ref{c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, {}};
    for (int s = 0; s < 3; ++s) {
      const OptVec g = opt_random(n, 100 + s);
      p.set_grad(tensor(g));
      opt.step();
      ref.step(w, g);
    }
    SCOPED_TRACE("momentum=" + std::to_string(c.momentum) + " dampening=" + std::to_string(c.dampening) +
                 " wd=" + std::to_string(c.weight_decay) + " nesterov=" + std::to_string(c.nesterov));
    opt_expect_matches(p, w, "SGD weights");
    if (c.momentum != 0) opt_expect_matches(opt.state(0).buffers.at("momentum_buffer"), ref.buf, "momentum_buffer");
  }
}

TEST(OptimSGD, HandComputedMomentum) {
  // w=1, g=1, lr=0.1, momentum 0.9: buf 1, 1.9, 2.71; w 0.9, 0.71, 0.439.
  Tensor p = opt_param({1.0f});
  optim::SGD opt({p}, 0.1, 0.9);
  for (float expect : {0.9f, 0.71f, 0.439f}) {
    p.set_grad(ones({1}));
    opt.step();
    EXPECT_NEAR(p.data<float>()[0], expect, 1e-6);
  }
}

TEST(OptimAdam, MatchesTorchFormulasOverThreeSteps) {
  struct Case {
    double weight_decay;
    bool amsgrad;
  };
  for (const Case c : {Case{0.0, false}, Case{0.0, true}, Case{0.1, false}, Case{0.05, true}}) {
    const int64_t n = 70001;
    OptVec w = opt_random(n, 2);
    Tensor p = opt_param(w);
    optim::Adam opt({p}, 2e-3, {0.8, 0.99}, 1e-6, c.weight_decay, c.amsgrad);
    OptAdamRef ref{2e-3, 0.8, 0.99, 1e-6, c.weight_decay, c.amsgrad, false, {}, {}, {}};
    for (int s = 0; s < 3; ++s) {
      // Shrinking gradients make amsgrad's running max differ from v.
      const OptVec g = opt_random(n, 200 + s, s == 0 ? 3.0f : 0.3f);
      p.set_grad(tensor(g));
      opt.step();
      ref.step(w, g);
    }
    SCOPED_TRACE("Adam wd=" + std::to_string(c.weight_decay) + " amsgrad=" + std::to_string(c.amsgrad));
    opt_expect_matches(p, w, "Adam weights");
    opt_expect_matches(opt.state(0).buffers.at("exp_avg"), ref.m, "exp_avg");
    opt_expect_matches(opt.state(0).buffers.at("exp_avg_sq"), ref.v, "exp_avg_sq");
    if (c.amsgrad) opt_expect_matches(opt.state(0).buffers.at("max_exp_avg_sq"), ref.vmax, "max_exp_avg_sq");
    EXPECT_EQ(opt.state(0).step, 3);
  }
}

TEST(OptimAdam, AdamWMatchesTorchFormulasOverThreeSteps) {
  for (bool amsgrad : {false, true}) {
    const int64_t n = 5000;
    OptVec w = opt_random(n, 3);
    Tensor p = opt_param(w);
    optim::AdamW opt({p}, 1e-2, {0.9, 0.999}, 1e-8, 0.1, amsgrad);
    OptAdamRef ref{1e-2, 0.9, 0.999, 1e-8, 0.1, amsgrad, true, {}, {}, {}};
    for (int s = 0; s < 3; ++s) {
      const OptVec g = opt_random(n, 300 + s, s == 0 ? 2.0f : 0.5f);
      p.set_grad(tensor(g));
      opt.step();
      ref.step(w, g);
    }
    opt_expect_matches(p, w, amsgrad ? "AdamW amsgrad" : "AdamW");
  }
  // The default decay is 1e-2, decoupled: with zero gradients only w *= 1 - lr*wd acts.
  Tensor q = opt_param({2.0f});
  optim::AdamW opt2({q}, 0.1);
  q.set_grad(zeros({1}));
  opt2.step();
  EXPECT_FLOAT_EQ(q.data<float>()[0], 2.0f * static_cast<float>(1 - 0.1 * 1e-2));
  EXPECT_STREQ(opt2.name(), "AdamW");
}

TEST(OptimAdam, FirstStepMovesByLr) {
  // m_hat / sqrt(v_hat) = sign(g) on the first step.
  Tensor p = opt_param({1.0f, -1.0f});
  optim::Adam opt({p}, 1e-3);
  p.set_grad(tensor({0.5f, -2.0f}));
  opt.step();
  EXPECT_NEAR(p.data<float>()[0], 1.0f - 1e-3f, 1e-7);
  EXPECT_NEAR(p.data<float>()[1], -1.0f + 1e-3f, 1e-7);
}

TEST(OptimGroups, PerGroupLearningRates) {
  Tensor a = opt_param({1.0f, 2.0f}), b = opt_param({3.0f}), c = opt_param({4.0f});
  std::vector<optim::ParamGroup> groups(2);
  groups[0].params = {a};
  groups[0].lr = 0.1;
  groups[1].params = {b, c};  // lr from the constructor
  optim::SGD opt(groups, 0.5);
  ASSERT_EQ(opt.param_groups().size(), 2u);
  EXPECT_EQ(opt.param_groups()[1].lr, 0.5);
  EXPECT_EQ(opt.param_groups()[1].momentum, 0.0);
  for (Tensor t : {a, b, c}) t.set_grad(ones(t.sizes()));
  opt.step();
  EXPECT_FLOAT_EQ(a.data<float>()[0], 0.9f);
  EXPECT_FLOAT_EQ(a.data<float>()[1], 1.9f);
  EXPECT_FLOAT_EQ(b.data<float>()[0], 2.5f);
  EXPECT_FLOAT_EQ(c.data<float>()[0], 3.5f);
  opt.param_groups()[0].lr = 0.2;
  opt.param_groups()[1].lr = 0.25;
  opt.step();
  EXPECT_FLOAT_EQ(a.data<float>()[0], 0.7f);
  EXPECT_FLOAT_EQ(b.data<float>()[0], 2.25f);
  // A parameter without a gradient is left alone.
  c.set_grad(Tensor());
  opt.step();
  EXPECT_FLOAT_EQ(c.data<float>()[0], 3.25f);
  EXPECT_EQ(opt.state(2).step, 2);
  // add_param_group, as torch.
  Tensor d = opt_param({1.0f});
  optim::ParamGroup g3;
  g3.params = {d};
  g3.lr = 1.0;
  opt.add_param_group(g3);
  d.set_grad(ones({1}));
  opt.step();
  EXPECT_FLOAT_EQ(d.data<float>()[0], 0.0f);
  // Changing a group's parameter list behind the optimizer's back is refused.
  opt.param_groups()[0].params.push_back(opt_param({0.0f}));
  EXPECT_THROW(opt.step(), Error);
}

TEST(OptimGroups, ZeroGrad) {
  Tensor p = opt_param({1.0f, 2.0f});
  optim::SGD opt({p}, 0.1);
  const Tensor x = tensor({3.0f, 4.0f});
  sum(mul(p, x)).backward();
  ASSERT_TRUE(p.grad().defined());
  const Tensor g = p.grad();
  opt.zero_grad(false);
  ASSERT_TRUE(p.grad().defined());
  EXPECT_TRUE(p.grad().is_same(g));
  EXPECT_EQ(opt_values(p.grad()), (OptVec{0.0f, 0.0f}));
  sum(mul(p, x)).backward();
  EXPECT_EQ(opt_values(p.grad()), (OptVec{3.0f, 4.0f}));
  opt.zero_grad();
  EXPECT_FALSE(p.grad().defined());
  opt.step();  // no gradients: nothing happens
  EXPECT_EQ(opt_values(p), (OptVec{1.0f, 2.0f}));
}

TEST(OptimMaster, Bfloat16UpdatesBelowHalfAnUlpAccumulate) {
  // 1e-3 is a quarter of bf16's ulp below 1.0 (2^-8): without master weights nothing moves.
  Tensor p = full({1}, 1.0, DType::BFloat16);
  p.requires_grad_();
  optim::SGD opt({p}, 1e-3);
  ASSERT_TRUE(opt.master_weight(0).defined());
  EXPECT_EQ(opt.master_weight(0).dtype(), DType::Float32);
  for (int i = 0; i < 1000; ++i) {
    p.set_grad(ones({1}, DType::BFloat16));
    opt.step();
  }
  EXPECT_EQ(p.dtype(), DType::BFloat16);
  EXPECT_NEAR(opt.master_weight(0).data<float>()[0], 0.0f, 1e-4);
  EXPECT_NEAR(static_cast<float>(p.data<bfloat16>()[0]), 0.0f, 1e-4);

  Tensor q = full({1}, 1.0, DType::BFloat16);
  for (int i = 0; i < 1000; ++i) q = sub(q, mul(ones({1}, DType::BFloat16), 1e-3));
  EXPECT_EQ(q.dtype(), DType::BFloat16);
  EXPECT_EQ(static_cast<float>(q.data<bfloat16>()[0]), 1.0f);
}

TEST(OptimMaster, SixteenBitParamsFollowTheFloat32Trajectory) {
  // Same (16-bit representable) start and gradients: the master must equal the float32 run
  // bit for bit, and the parameter must be its rounding.
  for (DType d : {DType::BFloat16, DType::Float16}) {
    const int64_t n = 70001;
    const OptVec w0 = opt_values(tensor(opt_random(n, 4)).to(d));
    Tensor p16 = opt_param(w0, d), p32 = opt_param(w0);
    optim::Adam a16({p16}, 1e-2, {0.9, 0.999}, 1e-8, 0.01, true);
    optim::Adam a32({p32}, 1e-2, {0.9, 0.999}, 1e-8, 0.01, true);
    for (int s = 0; s < 3; ++s) {
      const Tensor g = tensor(opt_random(n, 400 + s)).to(d);
      p16.set_grad(g);
      p32.set_grad(g.to(DType::Float32));
      a16.step();
      a32.step();
    }
    opt_expect_matches(a16.master_weight(0), opt_values(p32), "master vs float32 run");
    EXPECT_EQ(std::memcmp(p16.data_ptr(), p32.to(d).data_ptr(), n * 2), 0) << "16-bit parameter is not the rounded master";
  }
}

TEST(OptimMaster, ExternalWritesAreAdoptedAndEmaRoundTripKeepsMasterBits) {
  Tensor p = full({4}, 1.0, DType::BFloat16);
  p.requires_grad_();
  optim::SGD opt({p}, 1e-3);
  p.set_grad(ones({4}, DType::BFloat16));
  opt.step();
  const float m = opt.master_weight(0).data<float>()[0];
  EXPECT_NEAR(m, 0.999f, 1e-6);
  EXPECT_EQ(static_cast<float>(p.data<bfloat16>()[0]), 1.0f);  // the rounding hides the progress

  // apply()/restore() writes the parameter twice, bit-identically at the end: the master keeps its bits.
  optim::EMA ema({p}, 0.5);
  p.set_grad(zeros({4}, DType::BFloat16));
  ema.apply();
  ema.restore();
  opt.step();
  EXPECT_EQ(opt.master_weight(0).data<float>()[0], m);

  // A genuine write (loading weights) wins where it differs from the rounded master.
  {
    no_grad ng;
    p.narrow(0, 0, 2).fill_(0.5);
  }
  opt.step();
  EXPECT_EQ(opt.master_weight(0).data<float>()[0], 0.5f);
  EXPECT_EQ(opt.master_weight(0).data<float>()[3], m);
}

TEST(OptimStateDict, RoundTripContinuesIdentically) {
  const OptVec w0 = opt_values(tensor(opt_random(300, 5)).to(DType::BFloat16));
  Tensor p1 = opt_param(w0, DType::BFloat16), p2 = opt_param(w0, DType::BFloat16), b1 = opt_param({0.5f}), b2 = opt_param({0.5f});
  optim::Adam o1({p1, b1}, 1e-2, {0.9, 0.99}, 1e-8, 0.0, true);
  for (int s = 0; s < 2; ++s) {
    p1.set_grad(tensor(opt_random(300, 500 + s)).to(DType::BFloat16));
    b1.set_grad(full({1}, 0.25));
    o1.step();
  }
  o1.param_groups()[0].lr = 5e-3;
  const optim::StateDict sd = o1.state_dict();
  ASSERT_NE(sd.tensor("state.0.exp_avg"), nullptr);
  ASSERT_NE(sd.tensor("state.0.max_exp_avg_sq"), nullptr);
  ASSERT_NE(sd.tensor("state.0.master_weight"), nullptr);
  EXPECT_EQ(sd.tensor("state.1.master_weight"), nullptr);  // float32 parameter: no master
  EXPECT_EQ(sd.tensor("state.0.exp_avg")->dtype(), DType::Float32);
  EXPECT_EQ(sd.scalar("state.0.step"), 2.0);
  EXPECT_EQ(sd.scalar("param_groups.0.lr"), 5e-3);
  EXPECT_EQ(sd.scalar("param_groups.0.amsgrad"), 1.0);
  EXPECT_EQ(sd.scalar("param_groups.0.num_params"), 2.0);

  {
    no_grad ng;
    p2.copy_(p1);
    b2.copy_(b1);
  }
  optim::Adam o2({p2, b2});  // different defaults: the state dict brings the options
  o2.load_state_dict(sd);
  EXPECT_EQ(o2.param_groups()[0].lr, 5e-3);
  EXPECT_EQ(*o2.param_groups()[0].amsgrad, true);
  EXPECT_EQ(o2.state(0).step, 2);
  EXPECT_FALSE(o2.state(0).buffers.at("exp_avg").is_same(o1.state(0).buffers.at("exp_avg")));  // deep copy
  for (int s = 0; s < 2; ++s) {
    const Tensor g = tensor(opt_random(300, 600 + s)).to(DType::BFloat16);
    p1.set_grad(g);
    p2.set_grad(g);
    b1.set_grad(full({1}, 0.125));
    b2.set_grad(full({1}, 0.125));
    o1.step();
    o2.step();
  }
  EXPECT_EQ(std::memcmp(p1.data_ptr(), p2.data_ptr(), p1.nbytes()), 0);
  EXPECT_EQ(std::memcmp(o1.master_weight(0).data_ptr(), o2.master_weight(0).data_ptr(), 300 * 4), 0);
  EXPECT_EQ(b1.data<float>()[0], b2.data<float>()[0]);
}

TEST(OptimStateDict, RejectsMismatches) {
  Tensor p = opt_param({1.0f, 2.0f});
  optim::SGD o({p}, 0.1, 0.9);
  p.set_grad(ones({2}));
  o.step();
  optim::StateDict sd = o.state_dict();
  ASSERT_NE(sd.tensor("state.0.momentum_buffer"), nullptr);

  Tensor q = opt_param({1.0f, 2.0f, 3.0f});
  optim::SGD wrong_shape({q}, 0.1, 0.9);
  EXPECT_THROW(wrong_shape.load_state_dict(sd), Error);

  std::vector<optim::ParamGroup> gs(2);
  gs[0].params = {opt_param({1.0f, 2.0f})};
  gs[1].params = {opt_param({1.0f})};
  optim::SGD two_groups(gs, 0.1);
  try {
    two_groups.load_state_dict(sd);
    ADD_FAILURE() << "loaded a one-group state into two groups";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parameter groups"), std::string::npos) << e.what();
  }

  optim::StateDict bogus = sd;
  bogus.tensors.emplace_back("state.0.exp_avg", zeros({2}));  // Adam state into SGD
  Tensor r = opt_param({1.0f, 2.0f});
  optim::SGD o2({r}, 0.1, 0.9);
  r.set_grad(full({2}, 2.0));
  o2.step();
  EXPECT_THROW(o2.load_state_dict(bogus), Error);
  EXPECT_EQ(opt_values(o2.state(0).buffers.at("momentum_buffer")), (OptVec{2.0f, 2.0f}));  // nothing half-loaded
  o2.load_state_dict(sd);
  EXPECT_EQ(opt_values(o2.state(0).buffers.at("momentum_buffer")), (OptVec{1.0f, 1.0f}));
}

TEST(OptimValidation, PyTorchStyleErrors) {
  auto msg = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  Tensor p = opt_param({1.0f});
  EXPECT_NE(msg([&] { optim::SGD({p}, -1.0); }).find("Invalid learning rate: -1"), std::string::npos);
  EXPECT_NE(msg([&] { optim::SGD({p}, 0.1, -0.5); }).find("Invalid momentum value"), std::string::npos);
  EXPECT_NE(msg([&] { optim::SGD({p}, 0.1, 0.0, 0.0, 0.0, true); }).find("Nesterov momentum requires a momentum and zero dampening"),
            std::string::npos);
  EXPECT_NE(msg([&] { optim::Adam({p}, 1e-3, {1.0, 0.999}); }).find("Invalid beta parameter at index 0"), std::string::npos);
  EXPECT_NE(msg([&] { optim::Adam({p}, 1e-3, {0.9, -0.1}); }).find("Invalid beta parameter at index 1"), std::string::npos);
  EXPECT_NE(msg([&] { optim::AdamW({p}, 1e-3, {0.9, 0.999}, -1.0); }).find("Invalid epsilon value"), std::string::npos);
  EXPECT_NE(msg([&] { optim::Adam({p}, 1e-3, {0.9, 0.999}, 1e-8, -1.0); }).find("Invalid weight_decay value"), std::string::npos);
  EXPECT_NE(msg([&] { optim::SGD(std::vector<Tensor>{}, 0.1); }).find("empty parameter list"), std::string::npos);
  EXPECT_NE(msg([&] { optim::SGD({p, p}, 0.1); }).find("appears twice"), std::string::npos);
  EXPECT_NE(msg([&] { optim::SGD({zeros({2}, DType::Float64)}, 0.1); }).find("float64"), std::string::npos);
  const Tensor nonleaf = mul(p, 2.0);
  EXPECT_NE(msg([&] { optim::SGD({nonleaf}, 0.1); }).find("non-leaf"), std::string::npos);
  EXPECT_NE(msg([&] { optim::SGD({zeros({3, 2}).t()}, 0.1); }).find("not contiguous"), std::string::npos);
  // A group edited into an invalid state is caught at step().
  optim::SGD ok({p}, 0.1);
  ok.param_groups()[0].lr = -3;
  p.set_grad(ones({1}));
  EXPECT_THROW(ok.step(), Error);
}

TEST(OptimEMA, MathApplyRestore) {
  Tensor p = opt_param({0.0f, 10.0f});
  optim::EMA ema({p}, 0.9);
  OptVec s = {0.0f, 10.0f};
  for (float v : {1.0f, 2.0f, 4.0f}) {
    {
      no_grad ng;
      p.fill_(v);
    }
    ema.update();
    for (float& x : s) x = x + 0.1f * (v - x);  // lerp(s, p, 0.1), the < 0.5 branch
  }
  opt_expect_matches(ema.shadow()[0], s, "EMA shadow");
  // Closed form: s3 = 0.9^3 s0 + 0.1 (0.9^2 * 1 + 0.9 * 2 + 4).
  EXPECT_NEAR(ema.shadow()[0].data<float>()[0], 0.1 * (0.81 + 1.8 + 4), 1e-5);
  EXPECT_NEAR(ema.shadow()[0].data<float>()[1], 7.29 + 0.1 * (0.81 + 1.8 + 4), 1e-5);
  EXPECT_EQ(ema.num_updates(), 3);

  const uint64_t v0 = p.version();
  ema.apply();
  EXPECT_GT(p.version(), v0);  // autograd and the optimizer see the write
  EXPECT_EQ(opt_values(p), s);
  EXPECT_THROW(ema.apply(), Error);
  EXPECT_THROW(ema.update(), Error);
  ema.restore();
  EXPECT_EQ(opt_values(p), (OptVec{4.0f, 4.0f}));
  EXPECT_THROW(ema.restore(), Error);

  // 16-bit parameters average in float32: 0.001 steps accumulate although bf16 cannot show them.
  Tensor b = full({1}, 1.0, DType::BFloat16);
  optim::ModelEMA e16({b}, 0.999);
  {
    no_grad ng;
    b.fill_(2.0);
  }
  e16.update();
  EXPECT_NEAR(e16.shadow()[0].data<float>()[0], 1.001f, 1e-6);
  e16.apply();
  EXPECT_EQ(static_cast<float>(b.data<bfloat16>()[0]), 1.0f);
  e16.restore();
  EXPECT_EQ(static_cast<float>(b.data<bfloat16>()[0]), 2.0f);

  // State round trip.
  optim::EMA other({opt_param({0.0f, 0.0f})}, 0.5);
  other.load_state_dict(ema.state_dict());
  EXPECT_EQ(opt_values(other.shadow()[0]), s);
  EXPECT_EQ(other.decay(), 0.9);
  EXPECT_EQ(other.num_updates(), 3);
}

TEST(OptimClip, GradNormMatchesHandComputation) {
  Tensor a = opt_param({0.0f, 0.0f}), b = opt_param({0.0f});
  auto set = [&] {
    a.set_grad(tensor({3.0f, -4.0f}));
    b.set_grad(full({1}, 12.0));
  };
  set();
  double n = optim::clip_grad_norm_({a, b}, 6.5);
  EXPECT_DOUBLE_EQ(n, 13.0);
  const float coef = static_cast<float>(6.5 / (13.0 + 1e-6));
  EXPECT_EQ(opt_values(a.grad()), (OptVec{3.0f * coef, -4.0f * coef}));
  EXPECT_EQ(opt_values(b.grad()), (OptVec{12.0f * coef}));

  set();
  EXPECT_DOUBLE_EQ(optim::clip_grad_norm_({a, b}, 100.0, 1.0), 19.0);
  EXPECT_EQ(opt_values(a.grad()), (OptVec{3.0f, -4.0f}));  // under the limit: untouched
  EXPECT_DOUBLE_EQ(optim::clip_grad_norm_({a, b}, 100.0, INFINITY), 12.0);
  EXPECT_NEAR(optim::clip_grad_norm_({a, b}, 100.0, 3.0), std::cbrt(27.0 + 64.0 + 1728.0), 1e-9);

  // A parameter without a gradient is skipped; 16-bit gradients are read and scaled in float.
  Tensor h = opt_param({0.0f, 0.0f}, DType::Float16), none = opt_param({0.0f});
  h.set_grad(tensor({3.0f, 4.0f}).to(DType::Float16));
  EXPECT_DOUBLE_EQ(optim::clip_grad_norm_({h, none}, 1.0), 5.0);
  EXPECT_EQ(h.grad().dtype(), DType::Float16);
  EXPECT_NEAR(static_cast<float>(h.grad().data<half>()[0]), 0.6f, 1e-3);

  // Non-finite norms: an error on request, else the norm comes back and the gradients are scaled by 0.
  a.set_grad(tensor({INFINITY, 1.0f}));
  EXPECT_THROW(optim::clip_grad_norm_({a}, 1.0, 2.0, true), Error);
  EXPECT_TRUE(std::isinf(optim::clip_grad_norm_({a}, 1.0)));
  EXPECT_EQ(a.grad().data<float>()[1], 0.0f);
}

TEST(OptimClip, GradValue) {
  Tensor a = opt_param({0.0f, 0.0f, 0.0f});
  a.set_grad(tensor({-5.0f, 0.25f, 3.0f}));
  optim::clip_grad_value_({a}, 1.0);
  EXPECT_EQ(opt_values(a.grad()), (OptVec{-1.0f, 0.25f, 1.0f}));
  optim::SGD opt({a}, 1.0);
  a.set_grad(tensor({-5.0f, 0.25f, 3.0f}));
  optim::clip_grad_value_(opt, 0.5);
  EXPECT_EQ(opt_values(a.grad()), (OptVec{-0.5f, 0.25f, 0.5f}));
}
