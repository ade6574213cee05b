// The reduceshape area's CPU kernels behind the CPU's kernel table (backends/cpu/reduce.hpp,
// pointwise.hpp, shape.hpp): the table has the entries, the ops reach them through it on the CPU
// (forward and backward, counted by wrapping the entries of a swapped copy), and an op whose
// entry is missing throws naming itself.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <string>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::error_of;
using mixprec::testing::ScopedKernels;

namespace cpu_table_reduceshape_test {  // the test executables are unity builds: keep these names apart

using mixprec::testing::calls;
using mixprec::testing::real;

// The CPU table with every entry of this area counted under its own name.
DeviceKernels counted() {
  calls().clear();
  DeviceKernels t = real();
  t.reduce = [](DeviceReduce k, const Tensor& x, const Shape& d, double a) { ++calls()["reduce"]; return real().reduce(k, x, d, a); };
  t.compare = [](DeviceCompare k, const Tensor& a, const Tensor& b) { ++calls()["compare"]; return real().compare(k, a, b); };
  t.pointwise = [](DevicePointwise k, const Tensor& a, const Tensor& b, const Tensor& c, double s0, double s1) {
    ++calls()["pointwise"];
    return real().pointwise(k, a, b, c, s0, s1);
  };
  t.cat = [](const std::vector<Tensor>& ts, int64_t d, DType dt, const Shape& s) { ++calls()["cat"]; return real().cat(ts, d, dt, s); };
  t.index = [](DeviceIndex k, const Tensor& s, int64_t d, const Tensor& i, const Shape& o) { ++calls()["index"]; return real().index(k, s, d, i, o); };
  t.cumsum = [](const Tensor& x, int64_t d, bool r) { ++calls()["cumsum"]; return real().cumsum(x, d, r); };
  t.param_op = [](DeviceParamOp k, const Tensor& d, const Tensor& s, double v) { ++calls()["param_op"]; real().param_op(k, d, s, v); };
  return t;
}

std::vector<double> values(const Tensor& t) {
  const Tensor c = t.detach().to(DType::Float64).contiguous();
  return {c.data<double>(), c.data<double>() + c.numel()};
}

// One op per entry (forward, then backward where it has one): the entry's calls for each.
struct Case {
  std::string op, entry;
  std::function<Tensor(const Tensor&)> f;  // of a leaf [2, 3] float32 requiring grad
  int forward, backward;                   // calls of `entry`; backward -1: no gradient
};
std::vector<Case> cases() {
  const Tensor i1 = tensor(std::vector<int64_t>{2, 0, 2});
  const Tensor i2 = tensor(std::vector<int64_t>{1, 0, 0, 2}, {2, 2});
  return {
      {"mean", "reduce", [](const Tensor& x) { return mean(x, {1}); }, 1, 0},
      {"var", "reduce", [](const Tensor& x) { return var(x, {0}); }, 1, 0},
      {"norm", "reduce", [](const Tensor& x) { return norm(x, 3.0, {1}); }, 1, 0},
      {"max", "reduce", [](const Tensor& x) { return max(x, 1).first; }, 1, 0},
      {"max", "index", [](const Tensor& x) { return max(x, 1).first; }, 0, 1},  // the Scatter backward
      {"eq", "compare", [](const Tensor& x) { return eq(x, x); }, 1, -1},
      {"sqrt", "pointwise", [](const Tensor& x) { return sqrt(abs(x)); }, 2, 2},
      {"where", "pointwise", [](const Tensor& x) { return where(gt(x, 0.0), x, zeros({}, DType::Float32)); }, 1, 2},
      {"masked_fill", "pointwise", [](const Tensor& x) { return masked_fill(x, lt(x, 0.0), 0.0); }, 1, 1},
      {"clamp", "pointwise", [](const Tensor& x) { return clamp(x, -0.5, 0.5); }, 1, 1},
      {"maximum", "pointwise", [](const Tensor& x) { return maximum(x, neg(x)); }, 2, 3},
      {"pow", "pointwise", [](const Tensor& x) { return pow(x, 2.0); }, 1, 1},
      {"prelu", "pointwise", [](const Tensor& x) { return prelu(x, full({3}, 0.25)); }, 1, 2},
      {"cat", "cat", [](const Tensor& x) { return cat({x, x}, 1); }, 1, 0},
      {"stack", "cat", [](const Tensor& x) { return stack({x, x}); }, 1, 0},
      {"index_select", "index", [i1](const Tensor& x) { return index_select(x, 1, i1); }, 1, 1},
      {"gather", "index", [i2](const Tensor& x) { return gather(x, 1, i2); }, 1, 1},
      {"cumsum", "cumsum", [](const Tensor& x) { return cumsum(x, 1); }, 1, 1},
  };
}

}  // namespace cpu_table_reduceshape_test

namespace rs = cpu_table_reduceshape_test;

TEST(CpuTableReduceShape, TheCpuTableHasTheAreasEntries) {
  const DeviceKernels* k = device_kernels(Device::CPU);
  ASSERT_NE(k, nullptr);
  EXPECT_NE(k->reduce, nullptr);
  EXPECT_NE(k->compare, nullptr);
  EXPECT_NE(k->pointwise, nullptr);
  EXPECT_NE(k->cat, nullptr);
  EXPECT_NE(k->index, nullptr);
  EXPECT_NE(k->cumsum, nullptr);
  EXPECT_NE(k->param_op, nullptr);
}

TEST(CpuTableReduceShape, OpsRouteThroughTheTableForwardAndBackward) {
  Generator g(3);
  const Tensor init = randn({2, 3}, DType::Float32, g);
  for (const rs::Case& c : rs::cases()) {
    SCOPED_TRACE(c.op + " -> " + c.entry);
    const Tensor ref = c.f(init.clone().requires_grad_());
    const ScopedKernels s(Device::CPU, rs::counted());
    const Tensor x = init.clone().requires_grad_();
    const Tensor y = c.f(x);
    EXPECT_EQ(rs::calls()[c.entry], c.forward);
    EXPECT_EQ(rs::values(y), rs::values(ref));
    if (c.backward < 0) continue;
    rs::calls().clear();
    sum(y).backward();
    EXPECT_EQ(rs::calls()[c.entry], c.backward);
  }
}

TEST(CpuTableReduceShape, RoutedResultsKeepTheirValues) {
  const ScopedKernels s(Device::CPU, rs::counted());
  const Tensor x = tensor(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(rs::values(mean(x, {1})), (std::vector<double>{2, 5}));
  EXPECT_EQ(rs::values(var(x, {1})), (std::vector<double>{1, 1}));
  const auto [v, i] = min(x, 0);
  EXPECT_EQ(rs::values(v), (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(rs::values(i), (std::vector<double>{0, 0, 0}));
  EXPECT_EQ(rs::values(cumsum(x, 1)), (std::vector<double>{1, 3, 6, 4, 9, 15}));
  EXPECT_EQ(rs::values(gather(x, 1, tensor(std::vector<int64_t>{2, 0}, {2, 1}))), (std::vector<double>{3, 4}));
  EXPECT_EQ(rs::values(cat({x, x}, 0)).size(), 12u);
  EXPECT_EQ(rs::values(ge(x, 3.0)), (std::vector<double>{0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(rs::values(clamp(x, 2.0, 4.0)), (std::vector<double>{2, 2, 3, 4, 4, 4}));
  EXPECT_GT(rs::calls()["reduce"], 0);
}

TEST(CpuTableReduceShape, WithoutItsEntryAnOpThrowsNamingItself) {
  const Tensor x = randn({2, 3});
  const Tensor idx = tensor(std::vector<int64_t>{0});
  for (const auto& [op, entry, f] : std::vector<std::tuple<std::string, DeviceKernels, std::function<void()>>>{
           {"mean", [] { DeviceKernels t = rs::real(); t.reduce = nullptr; return t; }(), [&] { mean(x); }},
           {"max", [] { DeviceKernels t = rs::real(); t.reduce = nullptr; return t; }(), [&] { max(x, 0); }},
           {"eq", [] { DeviceKernels t = rs::real(); t.compare = nullptr; return t; }(), [&] { eq(x, x); }},
           {"sqrt", [] { DeviceKernels t = rs::real(); t.pointwise = nullptr; return t; }(), [&] { mixprec::sqrt(x); }},
           {"where", [] { DeviceKernels t = rs::real(); t.pointwise = nullptr; return t; }(), [&] { where(gt(x, 0.0), x, x); }},
           {"cat", [] { DeviceKernels t = rs::real(); t.cat = nullptr; return t; }(), [&] { cat({x, x}); }},
           {"index_select", [] { DeviceKernels t = rs::real(); t.index = nullptr; return t; }(), [&] { index_select(x, 0, idx); }},
           {"cumsum", [] { DeviceKernels t = rs::real(); t.cumsum = nullptr; return t; }(), [&] { cumsum(x, 0); }},
           {"clip_grad_value_", [] { DeviceKernels t = rs::real(); t.param_op = nullptr; return t; }(), [&] {
              Tensor p = randn({2}).requires_grad_();
              p.set_grad(ones({2}));
              optim::clip_grad_value_({p}, 0.5);
            }},
       }) {
    const ScopedKernels s(Device::CPU, entry);
    const std::string msg = error_of(f);
    EXPECT_EQ(msg.rfind(op + ":", 0), 0u) << msg;
    EXPECT_NE(msg.find("has no cpu kernel"), std::string::npos) << msg;
  }
}

// clip_grad_value_, clip_grad_norm_ (norms other than 2), EMA.update and a master adopting a
// changed 16-bit parameter: one param_op call per tensor.
TEST(CpuTableReduceShape, OptimPassesRouteThroughParamOp) {
  const ScopedKernels s(Device::CPU, rs::counted());
  Tensor p = tensor(std::vector<float>{3, -4}).requires_grad_();
  p.set_grad(tensor(std::vector<float>{3, -4}));
  EXPECT_DOUBLE_EQ(static_cast<double>(optim::clip_grad_norm_({p}, 100.0, 1.0)), 7.0);
  EXPECT_EQ(rs::calls()["param_op"], 1);
  optim::clip_grad_value_({p}, 0.5);
  EXPECT_EQ(rs::calls()["param_op"], 2);
  EXPECT_EQ(rs::values(p.grad()), (std::vector<double>{0.5, -0.5}));
  optim::EMA ema({p}, 0.5);
  ema.update();
  EXPECT_EQ(rs::calls()["param_op"], 3);

  Tensor q = full({1}, 1.0, DType::BFloat16).requires_grad_();
  optim::SGD opt({q}, 1e-3);
  q.set_grad(ones({1}, DType::BFloat16));
  opt.step();
  {
    no_grad ng;
    q.fill_(2.0);  // another writer: the master adopts it at the next step
  }
  q.set_grad(ones({1}, DType::BFloat16));
  rs::calls().clear();
  opt.step();
  EXPECT_EQ(rs::calls()["param_op"], 1);
  EXPECT_NEAR(opt.master_weight(0).data<float>()[0], 2.0f - 1e-3f, 1e-6);
}
