// The CPU kernel table's training entries (backends/cpu/norm.hpp, backends/cpu/training.hpp):
// the table has them, batch_norm / layer_norm, the optimizers, GradScaler and clip_grad_norm_
// reach them through the table on the CPU (a swapped-in copy counts the calls), and an op whose
// entry is missing throws a mixprec::Error naming itself.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::error_of;

namespace cpu_table_training_test {  // the test executables are unity builds: keep these names apart

using mixprec::testing::calls;
using mixprec::testing::real;

// A copy of the CPU table installed for the guard's lifetime (restored even when an assert fails),
// with the training entries wrapped by counters that call the real CPU kernels.
struct SwappedCpuTable {
  DeviceKernels k = real();
  const DeviceKernels* prev;
  SwappedCpuTable() {
    calls().clear();
    k.batch_norm = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rm, const Tensor& rv, bool tr, double mom,
                      double eps) {
      ++calls()["batch_norm"];
      return real().batch_norm(x, w, b, rm, rv, tr, mom, eps);
    };
    k.batch_norm_backward = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& m, const Tensor& r, double eps) {
      ++calls()["batch_norm_backward"];
      return real().batch_norm_backward(x, g, w, m, r, eps);
    };
    k.batch_norm_backward_eval = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& m, const Tensor& r) {
      ++calls()["batch_norm_backward_eval"];
      return real().batch_norm_backward_eval(x, g, w, m, r);
    };
    k.layer_norm = [](const Tensor& x, const Tensor& w, const Tensor& b, double eps) {
      ++calls()["layer_norm"];
      return real().layer_norm(x, w, b, eps);
    };
    k.layer_norm_backward = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& m, const Tensor& r) {
      ++calls()["layer_norm_backward"];
      return real().layer_norm_backward(x, g, w, m, r);
    };
    k.layer_norm_to = [](const Tensor& x, const Tensor& w, const Tensor& b, double eps, DType out) {
      ++calls()["layer_norm_to"];
      return real().layer_norm_to(x, w, b, eps, out);
    };
    k.adam = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::AdamHyper& h, const Tensor& f) {
      ++calls()["adam"];
      real().adam(ps, h, f);
    };
    k.sgd = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::SgdScalars& s, const Tensor& f) {
      ++calls()["sgd"];
      real().sgd(ps, s, f);
    };
    k.unscale = [](const std::vector<Tensor>& g, const std::vector<Tensor>& m, const Tensor& s, const Tensor& f) {
      ++calls()["unscale"];
      real().unscale(g, m, s, f);
    };
    k.update_scale = [](const Tensor& s, const Tensor& t, const std::vector<Tensor>& f, double g, double b, int64_t i, const Tensor& sk) {
      ++calls()["update_scale"];
      real().update_scale(s, t, f, g, b, i, sk);
    };
    k.grad_norm = [](const std::vector<Tensor>& g) {
      ++calls()["grad_norm"];
      return real().grad_norm(g);
    };
    k.clip_grads = [](const std::vector<Tensor>& g, const Tensor& n, double m) {
      ++calls()["clip_grads"];
      real().clip_grads(g, n, m);
    };
    prev = set_device_kernels(Device::CPU, &k);
  }
  ~SwappedCpuTable() { set_device_kernels(Device::CPU, prev); }
  SwappedCpuTable(const SwappedCpuTable&) = delete;
  SwappedCpuTable& operator=(const SwappedCpuTable&) = delete;
};

Tensor leaf(Tensor t) { return t.requires_grad_(); }

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.sizes() != b.sizes()) return false;
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), static_cast<std::size_t>(ac.nbytes())) == 0;
}

TEST(CpuTableTraining, HasEntries) {
  const DeviceKernels* k = device_kernels(Device::CPU);
  ASSERT_NE(k, nullptr);
  EXPECT_NE(k->batch_norm, nullptr);
  EXPECT_NE(k->batch_norm_backward, nullptr);
  EXPECT_NE(k->batch_norm_backward_eval, nullptr);
  EXPECT_NE(k->layer_norm, nullptr);
  EXPECT_NE(k->layer_norm_backward, nullptr);
  EXPECT_NE(k->layer_norm_to, nullptr);
  EXPECT_NE(k->adam, nullptr);
  EXPECT_NE(k->sgd, nullptr);
  EXPECT_NE(k->unscale, nullptr);
  EXPECT_NE(k->update_scale, nullptr);
  EXPECT_NE(k->grad_norm, nullptr);
  EXPECT_NE(k->clip_grads, nullptr);
}

TEST(CpuTableTraining, BatchNormRoutesThroughTheTable) {
  Generator g(3);
  for (DType dt : {DType::Float32, DType::BFloat16, DType::Float64}) {
    SCOPED_TRACE(name(dt));
    const SwappedCpuTable table;
    const Tensor x = leaf(randn({4, 3, 5}, DType::Float32, g).to(dt));
    const Tensor w = leaf(randn({3}, DType::Float32, g)), b = leaf(randn({3}, DType::Float32, g));
    Tensor rm = zeros({3}), rv = ones({3});
    const uint64_t v0 = rm.version();
    sum(batch_norm(x, rm, rv, w, b, true)).backward();
    EXPECT_EQ(calls()["batch_norm"], 1);
    EXPECT_EQ(calls()["batch_norm_backward"], 1);
    EXPECT_EQ(rm.version(), v0 + 1);  // bumped once, by the op
    EXPECT_TRUE(x.grad().defined() && w.grad().defined() && b.grad().defined());
    // Eval mode: its own backward entry.
    sum(batch_norm(x, rm, rv, w, b, false)).backward();
    EXPECT_EQ(calls()["batch_norm"], 2);
    EXPECT_EQ(calls()["batch_norm_backward_eval"], 1);
  }
}

TEST(CpuTableTraining, LayerNormRoutesThroughTheTable) {
  Generator g(4);
  for (DType dt : {DType::Float32, DType::Float16, DType::Float64}) {
    SCOPED_TRACE(name(dt));
    const SwappedCpuTable table;
    const Tensor x = leaf(randn({2, 3, 8}, DType::Float32, g).to(dt));
    const Tensor w = leaf(randn({8}, DType::Float32, g)), b = leaf(randn({8}, DType::Float32, g));
    sum(layer_norm(x, {8}, w, b)).backward();
    EXPECT_EQ(calls()["layer_norm"], 1);
    EXPECT_EQ(calls()["layer_norm_backward"], 1);
    EXPECT_EQ(calls()["layer_norm_to"], 0);  // the CPU keeps the float32 autocast policy
  }
}

// layer_norm_to writes y in another dtype with layer_norm's arithmetic: bit for bit the float32
// layer_norm rounded once, and its backward takes the gradient in y's dtype.
TEST(CpuTableTraining, LayerNormToMatchesLayerNorm) {
  Generator g(5);
  const DeviceKernels& k = *device_kernels(Device::CPU);
  for (auto [xd, yd] : {std::pair{DType::Float32, DType::BFloat16}, std::pair{DType::BFloat16, DType::Float32},
                        std::pair{DType::Float16, DType::BFloat16}}) {
    SCOPED_TRACE(std::string(name(xd)) + " -> " + std::string(name(yd)));
    const Tensor x = randn({5, 24}, DType::Float32, g).to(xd), w = randn({24}, DType::Float32, g), b = randn({24}, DType::Float32, g);
    // Every dtype here is normalised in float32: the float32 norm, rounded once to y's dtype.
    const auto same = k.layer_norm(x.to(DType::Float32), w, b, 1e-5);
    const auto to = k.layer_norm_to(x, w, b, 1e-5, yd);
    EXPECT_TRUE(same_bits(to[0], same[0].to(yd)));
    EXPECT_TRUE(same_bits(to[1], same[1]));
    EXPECT_TRUE(same_bits(to[2], same[2]));
    // The gradient in y's dtype reads as it does widened to float32 first (exactly).
    const Tensor gy = randn({5, 24}, DType::Float32, g).to(yd);
    const auto gt = k.layer_norm_backward(x, gy, w, to[1], to[2]);
    const auto gf = k.layer_norm_backward(x, gy.to(DType::Float32), w, to[1], to[2]);
    EXPECT_EQ(gt[0].dtype(), xd);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(same_bits(gt[i], gf[i])) << i;
  }
}

TEST(CpuTableTraining, NormsWithoutTheirEntryThrow) {
  Generator g(6);
  const Tensor x = leaf(randn({4, 3, 2, 2}, DType::Float32, g)), w = leaf(ones({3})), b = leaf(zeros({3}));
  const Tensor rm = zeros({3}), rv = ones({3});
  {
    SwappedCpuTable table;
    table.k.batch_norm = nullptr;
    EXPECT_NE(error_of([&] { (void)batch_norm(x, rm, rv, w, b, true); }).find("batch_norm"), std::string::npos);
  }
  {
    SwappedCpuTable table;
    table.k.batch_norm_backward = nullptr;
    const Tensor y = batch_norm(x, rm, rv, w, b, true);
    EXPECT_NE(error_of([&] { sum(y).backward(); }).find("batch_norm_backward"), std::string::npos);
  }
  {
    SwappedCpuTable table;
    table.k.batch_norm_backward_eval = nullptr;
    const Tensor y = batch_norm(x, rm, rv, w, b, false);
    EXPECT_NE(error_of([&] { sum(y).backward(); }).find("batch_norm: backward in eval mode"), std::string::npos);
  }
  const Tensor xl = leaf(randn({3, 8}, DType::Float32, g));
  {
    SwappedCpuTable table;
    table.k.layer_norm = nullptr;
    EXPECT_NE(error_of([&] { (void)layer_norm(xl, {8}); }).find("layer_norm"), std::string::npos);
  }
  {
    SwappedCpuTable table;
    table.k.layer_norm_backward = nullptr;
    const Tensor y = layer_norm(xl, {8});
    EXPECT_NE(error_of([&] { sum(y).backward(); }).find("layer_norm_backward"), std::string::npos);
  }
}

// Optimizers: one kernel call per group and step on the CPU; the step count is the kernel's.
TEST(CpuTableTraining, OptimizersRouteThroughTheTable) {
  Generator g(7);
  for (int kind = 0; kind < 3; ++kind) {
    SCOPED_TRACE(kind);
    const SwappedCpuTable table;
    Tensor p = leaf(randn({5, 4}, DType::Float32, g)), q = leaf(randn({3}, DType::Float32, g).to(DType::BFloat16));
    std::unique_ptr<optim::Optimizer> opt;
    if (kind == 0) opt = std::make_unique<optim::Adam>(std::vector<Tensor>{p, q}, 1e-2, std::pair{0.9, 0.999}, 1e-8, 0.0, true);
    else if (kind == 1) opt = std::make_unique<optim::AdamW>(std::vector<Tensor>{p, q}, 1e-2);
    else opt = std::make_unique<optim::SGD>(std::vector<Tensor>{p, q}, 0.1, 0.9, 0.0, 1e-3, true);
    for (int it = 0; it < 2; ++it) {
      opt->zero_grad();
      add(sum(mul(p, p)), sum(q.to(DType::Float32))).backward();
      opt->step();
    }
    EXPECT_EQ(calls()[kind == 2 ? "sgd" : "adam"], 2);
    EXPECT_EQ(opt->state(0).step, 2);
    EXPECT_EQ(opt->state(1).step, 2);
  }
}

TEST(CpuTableTraining, OptimizersWithoutTheirEntryThrowAndChangeNothing) {
  Generator g(8);
  for (bool sgd : {false, true}) {
    SCOPED_TRACE(sgd ? "SGD" : "Adam");
    Tensor p = leaf(randn({6}, DType::Float32, g));
    std::unique_ptr<optim::Optimizer> opt;
    if (sgd) opt = std::make_unique<optim::SGD>(std::vector<Tensor>{p}, 0.1, 0.9);
    else opt = std::make_unique<optim::Adam>(std::vector<Tensor>{p}, 0.1);
    sum(mul(p, p)).backward();
    const Tensor before = p.detach().clone();
    SwappedCpuTable table;
    if (sgd) table.k.sgd = nullptr;
    else table.k.adam = nullptr;
    EXPECT_NE(error_of([&] { opt->step(); }).find(sgd ? "SGD" : "Adam"), std::string::npos);
    EXPECT_TRUE(same_bits(p.detach(), before));
    EXPECT_EQ(opt->state(0).step, 0);
    EXPECT_TRUE(opt->state(0).buffers.empty());
  }
}

// A found_inf flag handed to step() on the CPU skips the whole update in the kernel.
TEST(CpuTableTraining, OptimizerStepSkipsOnACpuFlag) {
  Generator g(9);
  Tensor p = leaf(randn({6}, DType::Float32, g));
  optim::Adam opt({p}, 0.1);
  sum(mul(p, p)).backward();
  const Tensor before = p.detach().clone();
  opt.step(full({}, 1.0));
  EXPECT_TRUE(same_bits(p.detach(), before));
  EXPECT_EQ(opt.state(0).step, 0);
  opt.step(zeros({}));
  EXPECT_FALSE(same_bits(p.detach(), before));
  EXPECT_EQ(opt.state(0).step, 1);
}

// GradScaler on the CPU: unscale_ and update() through the table; a skipped step does not touch
// the optimizer (no state created), and the scale stays a number read on the host.
TEST(CpuTableTraining, GradScalerRoutesThroughTheTable) {
  Generator g(10);
  const SwappedCpuTable table;
  Tensor p = leaf(randn({4}, DType::Float32, g)), h = leaf(randn({4}, DType::Float32, g).to(DType::Float16));
  optim::Adam opt({p, h}, 1e-2);
  amp::GradScaler scaler(1024.0, 2.0, 0.5, 1);
  // A clean step.
  scaler.scale(sum(add(mul(p, p), h.to(DType::Float32)))).backward();
  amp::StepResult r = scaler.step(opt);
  EXPECT_TRUE(r.known_on_host());
  EXPECT_TRUE(r.stepped());
  scaler.update();
  EXPECT_EQ(calls()["unscale"], 1);
  EXPECT_EQ(calls()["adam"], 1);
  EXPECT_EQ(calls()["update_scale"], 1);
  EXPECT_EQ(scaler.get_scale(), 2048.0);
  EXPECT_EQ(scaler.skipped_steps(), 0);
  // An overflowing step: skipped on the host, the optimizer untouched.
  opt.zero_grad();
  const Tensor before = p.detach().clone();
  scaler.scale(mul(sum(mul(p, p)), 1e38)).backward();
  r = scaler.step(opt);
  EXPECT_TRUE(r.known_on_host());
  EXPECT_FALSE(r.stepped());
  EXPECT_TRUE(scaler.found_inf(opt));
  scaler.update();
  EXPECT_EQ(calls()["unscale"], 2);
  EXPECT_EQ(calls()["adam"], 1);
  EXPECT_EQ(calls()["update_scale"], 2);
  EXPECT_TRUE(same_bits(p.detach(), before));
  EXPECT_EQ(opt.state(0).step, 1);
  EXPECT_EQ(scaler.get_scale(), 1024.0);
  EXPECT_EQ(scaler.get_growth_tracker(), 0);
  EXPECT_EQ(scaler.skipped_steps(), 1);
}

TEST(CpuTableTraining, GradScalerWithoutItsEntriesThrows) {
  Generator g(11);
  Tensor p = leaf(randn({4}, DType::Float32, g));
  optim::SGD opt({p}, 0.1);
  amp::GradScaler scaler;
  scaler.scale(sum(mul(p, p))).backward();
  {
    SwappedCpuTable table;
    table.k.unscale = nullptr;
    EXPECT_NE(error_of([&] { scaler.unscale_(opt); }).find("GradScaler.unscale_"), std::string::npos);
  }
  scaler.unscale_(opt);
  (void)scaler.step(opt);
  {
    SwappedCpuTable table;
    table.k.update_scale = nullptr;
    EXPECT_NE(error_of([&] { scaler.update(); }).find("GradScaler.update"), std::string::npos);
  }
}

// clip_grad_norm_: the 2-norm and the scaling through the table, other norms' scaling too; no
// scaling call when the factor is >= 1. The norm is a double computed in double.
TEST(CpuTableTraining, ClipGradNormRoutesThroughTheTable) {
  Generator g(12);
  Tensor a = leaf(randn({7}, DType::Float32, g)), b = leaf(randn({3}, DType::Float32, g).to(DType::BFloat16));
  auto grads = [&] {
    a.set_grad(mul(ones({7}), 3.0));
    b.set_grad(full({3}, 4.0, DType::BFloat16));
  };
  const SwappedCpuTable table;
  grads();
  const optim::GradNorm n = optim::clip_grad_norm_({a, b}, 1e6);
  EXPECT_FALSE(n.tensor().defined());
  EXPECT_EQ(n.value(), std::sqrt(7 * 9.0 + 3 * 16.0));
  EXPECT_EQ(calls()["grad_norm"], 1);
  EXPECT_EQ(calls()["clip_grads"], 0);
  const double clipped = optim::clip_grad_norm_({a, b}, 1.0);
  EXPECT_EQ(clipped, std::sqrt(7 * 9.0 + 3 * 16.0));
  EXPECT_EQ(calls()["grad_norm"], 2);
  EXPECT_EQ(calls()["clip_grads"], 1);
  const float coef = static_cast<float>(1.0 / (clipped + 1e-6));
  EXPECT_EQ(a.grad().data<float>()[0], 3.0f * coef);
  grads();
  EXPECT_EQ(static_cast<double>(optim::clip_grad_norm_({a, b}, 1.0, 1.0)), 7 * 3.0 + 3 * 4.0);
  EXPECT_EQ(calls()["grad_norm"], 2);  // the 1-norm is the op's own
  EXPECT_EQ(calls()["clip_grads"], 2);
}

TEST(CpuTableTraining, ClipGradNormWithoutItsEntriesThrows) {
  Tensor a = leaf(ones({4}));
  a.set_grad(ones({4}));
  for (bool norm : {true, false}) {
    SwappedCpuTable table;
    if (norm) table.k.grad_norm = nullptr;
    else table.k.clip_grads = nullptr;
    EXPECT_NE(error_of([&] { (void)optim::clip_grad_norm_({a}, 0.5); }).find("clip_grad_norm_"), std::string::npos);
  }
}

}  // namespace cpu_table_training_test
