// The CPU kernel table's pooling, group norm and loss entries (backends/cpu/pool.hpp, norm.hpp,
// loss.hpp): the table has them, the ops reach them through the table on the CPU (a swapped-in
// copy counts the calls, forward and backward), and an op whose entry is missing throws a
// mixprec::Error naming itself.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::error_of;
using mixprec::testing::ScopedKernels;
using mixprec::testing::to_doubles;

namespace cpu_table_poolnorm_test {  // the test executables are unity builds: keep these names apart

using mixprec::testing::calls;
using mixprec::testing::real;

// The CPU table with this group's entries wrapped by counters that call the real kernels.
DeviceKernels counting() {
  calls().clear();
  DeviceKernels k = real();
  k.pool2d = [](DevicePool kind, const detail::PoolGeom& g, const Tensor& x) {
    ++calls()["pool2d"];
    return real().pool2d(kind, g, x);
  };
  k.pool2d_backward = [](DevicePool kind, const detail::PoolGeom& g, const Tensor& gy, const Tensor& idx) {
    ++calls()["pool2d_backward"];
    return real().pool2d_backward(kind, g, gy, idx);
  };
  k.group_norm = [](const Tensor& x, const Tensor& w, const Tensor& b, int64_t G, double eps) {
    ++calls()["group_norm"];
    return real().group_norm(x, w, b, G, eps);
  };
  k.group_norm_backward = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& m, const Tensor& r, int64_t G) {
    ++calls()["group_norm_backward"];
    return real().group_norm_backward(x, g, w, m, r, G);
  };
  k.loss_terms = [](DeviceLoss kind, const Tensor& a, const Tensor& b, const Tensor& w) {
    ++calls()["loss_terms"];
    return real().loss_terms(kind, a, b, w);
  };
  k.loss_terms_backward = [](DeviceLoss kind, const Tensor& a, const Tensor& b, const Tensor& w, const Tensor& g, double s, bool nb,
                             bool nw) {
    ++calls()["loss_terms_backward"];
    return real().loss_terms_backward(kind, a, b, w, g, s, nb, nw);
  };
  k.loss_sum = [](const Tensor& t, double divisor, DType out) {
    ++calls()["loss_sum"];
    return real().loss_sum(t, divisor, out);
  };
  k.nll_loss = [](const Tensor& x, const Tensor& t, int64_t N, int64_t C, int64_t S, int64_t ig) {
    ++calls()["nll_loss"];
    return real().nll_loss(x, t, N, C, S, ig);
  };
  k.nll_loss_backward = [](const Tensor& t, const Tensor& g, double s, const Shape& sizes, DType dt, int64_t N, int64_t C, int64_t S,
                           int64_t ig) {
    ++calls()["nll_loss_backward"];
    return real().nll_loss_backward(t, g, s, sizes, dt, N, C, S, ig);
  };
  return k;
}

Tensor plane4x4() { return arange(0.0, 16.0, 1.0, DType::Float32).reshape({1, 1, 4, 4}).requires_grad_(); }

TEST(CpuTablePoolNorm, HasEntries) {
  const DeviceKernels* k = device_kernels(Device::CPU);
  ASSERT_NE(k, nullptr);
  for (const bool has : {k->pool2d != nullptr, k->pool2d_backward != nullptr, k->group_norm != nullptr, k->group_norm_backward != nullptr,
                         k->loss_terms != nullptr, k->loss_terms_backward != nullptr, k->loss_sum != nullptr, k->nll_loss != nullptr,
                         k->nll_loss_backward != nullptr})
    EXPECT_TRUE(has);
}

TEST(CpuTablePoolNorm, PoolingRoutesThroughTheTable) {
  const ScopedKernels swap(Device::CPU, counting());
  const Tensor x = plane4x4();
  const auto [ym, idx] = max_pool2d_with_indices(x, {2, 2});
  EXPECT_EQ(to_doubles(ym), (std::vector<double>{5, 7, 13, 15}));
  EXPECT_EQ(to_doubles(idx), (std::vector<double>{5, 7, 13, 15}));
  const Tensor ya = avg_pool2d(x, {2, 2});
  EXPECT_EQ(to_doubles(ya), (std::vector<double>{2.5, 4.5, 10.5, 12.5}));
  const Tensor yd = adaptive_avg_pool2d(x, {1, 1});
  EXPECT_EQ(to_doubles(yd), (std::vector<double>{7.5}));
  EXPECT_EQ(calls()["pool2d"], 3);
  sum(add(add(sum(ym), sum(ya)), sum(yd))).backward();
  EXPECT_EQ(calls()["pool2d_backward"], 3);
  // Each input: 1 where it is a window's max, + 1/4 (its avg window) + 1/16 (the global average).
  const std::vector<double> gx = to_doubles(x.grad());
  EXPECT_DOUBLE_EQ(gx[5], 1.3125);
  EXPECT_DOUBLE_EQ(gx[0], 0.3125);
}

TEST(CpuTablePoolNorm, GroupNormRoutesThroughTheTable) {
  const ScopedKernels swap(Device::CPU, counting());
  Generator g(5);
  const Tensor x = randn({2, 4, 3}, DType::Float32, g).requires_grad_();
  const Tensor w = ones({4}).requires_grad_(), b = zeros({4}).requires_grad_();
  const Tensor y = group_norm(x, 2, w, b);
  EXPECT_EQ(calls()["group_norm"], 1);
  sum(mul(y, y)).backward();
  EXPECT_EQ(calls()["group_norm_backward"], 1);
  // Every group of 6 values is normalised: its squares sum to 6 var / (var + eps), nearly 6.
  EXPECT_NEAR(sum(mul(y, y)).item<double>(), 24.0, 1e-2);
  EXPECT_TRUE(w.grad().defined() && b.grad().defined());
}

TEST(CpuTablePoolNorm, LossesRouteThroughTheTable) {
  const ScopedKernels swap(Device::CPU, counting());
  const Tensor lp = tensor({-1.0f, -2.0f, -3.0f, -4.0f}, {2, 2}).requires_grad_();
  const Tensor nll = nll_loss(lp, tensor(std::vector<int64_t>{1, 0}));
  EXPECT_EQ(nll.item<double>(), 2.5);
  const Tensor a = tensor({1.0f, 2.0f}).requires_grad_(), t = tensor({0.0f, 0.0f});
  const Tensor mse = mse_loss(a, t);
  EXPECT_EQ(mse.item<double>(), 2.5);
  const Tensor p = tensor({0.5f}).requires_grad_(), one = tensor({1.0f});
  const Tensor bce = binary_cross_entropy(p, one, Reduction::Sum);
  EXPECT_NEAR(bce.item<double>(), std::log(2.0), 1e-6);
  const Tensor bcel = binary_cross_entropy_with_logits(tensor({0.0f}).requires_grad_(), one, Reduction::None, tensor({2.0f}));
  EXPECT_NEAR(bcel.item<double>(), 2 * std::log(2.0), 1e-6);
  EXPECT_EQ(calls()["nll_loss"], 1);
  EXPECT_EQ(calls()["loss_terms"], 3);
  EXPECT_EQ(calls()["loss_sum"], 3);  // None does not reduce
  add(add(nll, mse), add(bce, sum(bcel))).backward();
  EXPECT_EQ(calls()["nll_loss_backward"], 1);
  EXPECT_EQ(calls()["loss_terms_backward"], 3);
  EXPECT_EQ(to_doubles(lp.grad()), (std::vector<double>{0, -0.5, -0.5, 0}));
  EXPECT_EQ(to_doubles(a.grad()), (std::vector<double>{1, 2}));
  EXPECT_NEAR(to_doubles(p.grad())[0], -2.0, 1e-6);
  (void)cross_entropy(tensor({1.0f, 2.0f}, {1, 2}), tensor(std::vector<int64_t>{1}, {1}));  // its reduction too
  EXPECT_EQ(calls()["loss_sum"], 4);
}

TEST(CpuTablePoolNorm, MissingEntriesNameTheOp) {
  const Tensor x4 = randn({1, 2, 4, 4}), lp = tensor({-1.0f, -2.0f}, {1, 2}), idx = tensor(std::vector<int64_t>{1}, {1});
  const Tensor v = tensor({0.25f, 0.5f}), t = tensor({0.0f, 1.0f});
  using Entry = std::function<void(DeviceKernels&)>;
  const std::vector<std::tuple<Entry, std::function<void()>, std::string>> cases{
      {[](DeviceKernels& k) { k.pool2d = nullptr; }, [&] { (void)max_pool2d(x4, {2, 2}); }, "max_pool2d"},
      {[](DeviceKernels& k) { k.pool2d = nullptr; }, [&] { (void)avg_pool2d(x4, {2, 2}); }, "avg_pool2d"},
      {[](DeviceKernels& k) { k.pool2d = nullptr; }, [&] { (void)adaptive_avg_pool2d(x4, {1, 1}); }, "adaptive_avg_pool2d"},
      {[](DeviceKernels& k) { k.pool2d_backward = nullptr; },
       [&] { sum(max_pool2d(x4.detach().requires_grad_(), {2, 2})).backward(); }, "max_pool2d_backward"},
      {[](DeviceKernels& k) { k.group_norm = nullptr; }, [&] { (void)group_norm(x4, 1); }, "group_norm"},
      {[](DeviceKernels& k) { k.group_norm_backward = nullptr; },
       [&] { sum(group_norm(x4.detach().requires_grad_(), 2)).backward(); }, "group_norm_backward"},
      {[](DeviceKernels& k) { k.loss_terms = nullptr; }, [&] { (void)mse_loss(v, t); }, "mse_loss"},
      {[](DeviceKernels& k) { k.loss_terms_backward = nullptr; },
       [&] { binary_cross_entropy(v.detach().requires_grad_(), t).backward(); }, "binary_cross_entropy_backward"},
      {[](DeviceKernels& k) { k.loss_sum = nullptr; }, [&] { (void)binary_cross_entropy_with_logits(v, t); },
       "binary_cross_entropy_with_logits"},
      {[](DeviceKernels& k) { k.nll_loss = nullptr; }, [&] { (void)nll_loss(lp, idx); }, "nll_loss"},
      {[](DeviceKernels& k) { k.nll_loss_backward = nullptr; }, [&] { nll_loss(lp.detach().requires_grad_(), idx).backward(); },
       "nll_loss_backward"},
  };
  for (const auto& [remove, run, op] : cases) {
    DeviceKernels missing = real();
    remove(missing);
    const ScopedKernels swap(Device::CPU, missing);
    const std::string err = error_of(run);
    EXPECT_NE(err.find(op), std::string::npos) << op << ": " << err;
  }
}

}  // namespace cpu_table_poolnorm_test
