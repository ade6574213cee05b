// The linalg area's CPU kernels behind the CPU's kernel table (backends/cpu/linalg.hpp,
// attention.hpp, loss.hpp): the table has them, the ops reach them through the table on the CPU
// (counted by wrapping entries of a copy of the table), and an op whose entry is missing throws
// naming itself -- or takes its documented fallback.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cpu/linalg.hpp>  // the kernels it tests directly (also in the compiled mode)

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::error_of;

namespace cpu_table_linalg_test {  // the test executables are unity builds: keep these names apart

using mixprec::testing::calls;
using mixprec::testing::real;

// A copy of the CPU table, registered for the scope and replaced by the previous one at its end,
// whatever an assertion does in between. Entries of `t` may be changed while it is registered.
struct SwappedCpuTable {
  DeviceKernels t = *device_kernels(Device::CPU);
  const DeviceKernels* prev = set_device_kernels(Device::CPU, &t);
  SwappedCpuTable() { calls().clear(); }
  ~SwappedCpuTable() { set_device_kernels(Device::CPU, prev); }
  SwappedCpuTable(const SwappedCpuTable&) = delete;
  SwappedCpuTable& operator=(const SwappedCpuTable&) = delete;

  // Every entry of this area counted under its own name.
  void count_all() {
    t.matmul = [](const Tensor& a, const Tensor& b, const Tensor& bias) {
      ++calls()["matmul"];
      return real().matmul(a, b, bias);
    };
    t.sdpa_forward = [](const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale, double p, uint64_t seed) {
      ++calls()["sdpa_forward"];
      return real().sdpa_forward(q, k, v, causal, scale, p, seed);
    };
    t.sdpa_backward = [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                         bool causal, double scale, double p, uint64_t seed) {
      ++calls()["sdpa_backward"];
      return real().sdpa_backward(g, q, k, v, o, lse, causal, scale, p, seed);
    };
    t.sdpa_forward_into = [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& m, bool causal, double scale, double p,
                             uint64_t seed, const Tensor& out) {
      ++calls()["sdpa_forward_into"];
      return real().sdpa_forward_into(q, k, v, m, causal, scale, p, seed, out);
    };
    t.sdpa_backward_into = [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& m, const Tensor& o,
                              const Tensor& lse, bool causal, double scale, double p, uint64_t seed, const Tensor& dq, const Tensor& dk,
                              const Tensor& dv, const Tensor& dm) {
      ++calls()["sdpa_backward_into"];
      real().sdpa_backward_into(g, q, k, v, m, o, lse, causal, scale, p, seed, dq, dk, dv, dm);
    };
    t.cross_entropy = [](const Tensor& x, const Tensor& tg, int64_t N, int64_t C, int64_t S, int64_t ig, double ls) {
      ++calls()["cross_entropy"];
      return real().cross_entropy(x, tg, N, C, S, ig, ls);
    };
    t.cross_entropy_backward = [](const Tensor& x, const Tensor& tg, const Tensor& lse, const Tensor& gr, double gs, int64_t N, int64_t C,
                                  int64_t S, int64_t ig, double ls) {
      ++calls()["cross_entropy_backward"];
      return real().cross_entropy_backward(x, tg, lse, gr, gs, N, C, S, ig, ls);
    };
    t.class_weights = [](const Tensor& tg, int64_t N, int64_t C, int64_t S, int64_t ig, double ls, DType d, const Tensor& bad) {
      ++calls()["class_weights"];
      return real().class_weights(tg, N, C, S, ig, ls, d, bad);
    };
    t.linear_gelu = [](const Tensor& x, const Tensor& w1, const Tensor& b1, DeviceUnary act) {
      ++calls()["linear_gelu"];
      return real().linear_gelu(x, w1, b1, act);
    };
    t.linear_dgelu = [](const Tensor& g, const Tensor& w2, const Tensor& pre, DeviceUnary act) {
      ++calls()["linear_dgelu"];
      return real().linear_dgelu(g, w2, pre, act);
    };
  }
};

bool same(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes() || a.dtype() != b.dtype()) return false;
  const Tensor x = a.detach().to(DType::Float64).contiguous(), y = b.detach().to(DType::Float64).contiguous();
  for (int64_t i = 0; i < x.numel(); ++i)
    if (x.data<double>()[i] != y.data<double>()[i]) return false;
  return true;
}

}  // namespace cpu_table_linalg_test

using namespace cpu_table_linalg_test;

TEST(CpuTableLinalg, TheCpuTableHasTheAreasEntries) {
  const DeviceKernels* k = device_kernels(Device::CPU);
  ASSERT_NE(k, nullptr);
  EXPECT_NE(k->matmul, nullptr);
  EXPECT_NE(k->sdpa_forward, nullptr);
  EXPECT_NE(k->sdpa_backward, nullptr);
  EXPECT_NE(k->sdpa_forward_into, nullptr);
  EXPECT_NE(k->sdpa_backward_into, nullptr);
  EXPECT_NE(k->cross_entropy, nullptr);
  EXPECT_NE(k->cross_entropy_backward, nullptr);
  EXPECT_NE(k->class_weights, nullptr);
  EXPECT_NE(k->clamp_indices, nullptr);
  // The MLP's GELU in the GEMMs' tile hook (undefined results where the CPU lacks AVX-512).
  EXPECT_NE(k->linear_gelu, nullptr);
  EXPECT_NE(k->linear_dgelu, nullptr);
}

TEST(CpuTableLinalg, MatmulAndLinearRouteThroughTheTable) {
  Generator g(1);
  for (DType dt : {DType::Float32, DType::BFloat16, DType::Float64}) {
    SCOPED_TRACE(name(dt));
    const Tensor a = randn({2, 3, 5}, DType::Float32, g).to(dt).requires_grad_(), b = randn({5, 4}, DType::Float32, g).to(dt).requires_grad_();
    const Tensor w = randn({6, 5}, DType::Float32, g).to(dt).requires_grad_(), bias = randn({6}, DType::Float32, g).to(dt).requires_grad_();
    const Tensor ref = matmul(a, b), ref_lin = linear(a, w, bias);
    SwappedCpuTable s;
    s.count_all();
    const Tensor y = matmul(a, b);
    EXPECT_EQ(calls()["matmul"], 1);
    EXPECT_TRUE(same(y, ref));
    sum(y).backward();
    EXPECT_EQ(calls()["matmul"], 3);  // the gradients of a and b
    calls().clear();
    const Tensor z = linear(a, w, bias);
    EXPECT_EQ(calls()["matmul"], 1);
    EXPECT_TRUE(same(z, ref_lin));
    sum(z).backward();
    EXPECT_EQ(calls()["matmul"], 3);
    calls().clear();
    (void)mm(randn({2, 3}, DType::Float32, g).to(dt), randn({3, 2}, DType::Float32, g).to(dt));
    (void)bmm(randn({2, 2, 3}, DType::Float32, g).to(dt), randn({2, 3, 2}, DType::Float32, g).to(dt));
    EXPECT_EQ(calls()["matmul"], 2);
  }
}

TEST(CpuTableLinalg, MatmulWithoutItsEntryThrowsNamingTheOp) {
  const Tensor a = randn({2, 3}), b = randn({3, 4});
  SwappedCpuTable s;
  s.t.matmul = nullptr;
  for (const auto& [op, f] : std::vector<std::pair<std::string, std::function<void()>>>{
           {"matmul", [&] { matmul(a, b); }}, {"mm", [&] { mm(a, b); }}, {"linear", [&] { linear(a, b.t()); }}}) {
    const std::string msg = error_of(f);
    EXPECT_EQ(msg.rfind(op + ":", 0), 0u) << msg;
    EXPECT_NE(msg.find("has no cpu kernel"), std::string::npos) << msg;
  }
  // Argument errors stay the op's own, ahead of the kernel.
  const std::string msg = error_of([&] { bmm(randn({2, 2, 3}), randn({3, 3, 2})); });
  EXPECT_NE(msg.find("bmm"), std::string::npos) << msg;
  const std::string bc = error_of([&] { baddbmm(randn({2, 2, 2}), randn({2, 2, 3}), randn({3, 3, 2})); });
  EXPECT_EQ(bc.rfind("baddbmm", 0), 0u) << bc;
}

// mlp_gelu: the GELU applied to each GEMM tile as it is stored, forward and backward, gives exactly
// the bits of linear, gelu, linear -- in float32, bfloat16 and float16, both GELUs, with and without
// the second bias, over shapes that leave partial 12 x 32 tiles and (K = 520) two bf16 K blocks.
TEST(CpuTableLinalg, MlpGeluFusedIsBitIdenticalToTheThreeOps) {
  if (!cpu::linear_gelu_supported(DType::Float32)) GTEST_SKIP() << "no AVX-512: mlp_gelu composes (next test)";
  Generator g(2);
  struct Case { Shape x; int64_t H, D; bool b2; };
  for (const Case& c : {Case{{4, 8}, 16, 8, false}, Case{{3, 37, 520}, 72, 40, true}, Case{{50, 64}, 96, 33, true}})
    for (DType dt : {DType::Float32, DType::BFloat16, DType::Float16})
      for (const char* approx : {"none", "tanh"}) {
        SCOPED_TRACE(std::string(name(dt)) + " " + approx + " K " + std::to_string(c.x.back()));
        const int64_t K = c.x.back();
        auto param = [&](Shape s, double scale) { return (randn(s, DType::Float32, g) * scale).to(dt).requires_grad_(); };
        const Tensor x = param(c.x, 1.0), w1 = param({c.H, K}, 1.0 / std::sqrt(double(K))), b1 = param({c.H}, 0.5),
                     w2 = param({c.D, c.H}, 1.0 / std::sqrt(double(c.H))), b2 = c.b2 ? param({c.D}, 0.5) : Tensor();
        const Tensor gy = randn([&] { Shape s = c.x; s.back() = c.D; return s; }(), DType::Float32, g).to(dt);
        auto run = [&](bool fused) {
          for (const Tensor& t : {x, w1, b1, w2, b2})
            if (t.defined()) t.set_grad(Tensor());
          const Tensor y = fused ? mlp_gelu(x, w1, b1, w2, b2, approx) : linear(gelu(linear(x, w1, b1), approx), w2, b2);
          y.backward(gy);
          std::vector<Tensor> r{y.detach()};
          for (const Tensor& t : {x, w1, b1, w2, b2})
            if (t.defined()) r.push_back(t.grad().detach().clone());
          return r;
        };
        const std::vector<Tensor> ref = run(false);
        SwappedCpuTable s;
        s.count_all();
        const std::vector<Tensor> got = run(true);
        EXPECT_EQ(calls()["linear_gelu"], 1);
        EXPECT_EQ(calls()["linear_dgelu"], 1);
        EXPECT_EQ(calls()["matmul"], 4);  // the second linear, and gw2, gw1, gx
        ASSERT_EQ(got.size(), ref.size());
        for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same(got[i], ref[i])) << "output/gradient " << i;
      }
}

// Under bf16 autocast with float32 weights, as a GPT block runs it: the bits of the three ops.
TEST(CpuTableLinalg, MlpGeluUnderAutocastMatchesTheThreeOps) {
  if (!cpu::linear_gelu_supported(DType::BFloat16)) GTEST_SKIP() << "no AVX-512";
  Generator g(4);
  const Tensor x = randn({2, 24, 64}, DType::Float32, g).requires_grad_(), w1 = (randn({256, 64}, DType::Float32, g) * 0.125).requires_grad_(),
               b1 = randn({256}, DType::Float32, g).requires_grad_(), w2 = (randn({64, 256}, DType::Float32, g) * 0.0625).requires_grad_(),
               b2 = randn({64}, DType::Float32, g).requires_grad_();
  auto run = [&](bool fused) {
    for (const Tensor& t : {x, w1, b1, w2, b2}) t.set_grad(Tensor());
    Tensor y;
    {
      autocast ac(Device::CPU, DType::BFloat16);
      y = fused ? mlp_gelu(x, w1, b1, w2, b2) : linear(gelu(linear(x, w1, b1)), w2, b2);
    }
    sum(y.to(DType::Float32) * y.to(DType::Float32)).backward();
    std::vector<Tensor> r{y.detach()};
    for (const Tensor& t : {x, w1, b1, w2, b2}) r.push_back(t.grad().detach().clone());
    return r;
  };
  const std::vector<Tensor> ref = run(false), got = run(true);
  EXPECT_EQ(got[0].dtype(), DType::BFloat16);
  for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same(got[i], ref[i])) << "output/gradient " << i;
}

// Without the fused entries (or for float64, which they leave undefined) exactly linear, gelu, linear.
TEST(CpuTableLinalg, MlpGeluComposesWithoutFusedEntries) {
  Generator g(2);
  const Tensor x = randn({4, 8}, DType::Float32, g).requires_grad_(), w1 = randn({16, 8}, DType::Float32, g),
               b1 = randn({16}, DType::Float32, g), w2 = randn({8, 16}, DType::Float32, g);
  const Tensor ref = linear(gelu(linear(x, w1, b1), "tanh"), w2);
  {
    SwappedCpuTable s;
    s.count_all();
    s.t.linear_gelu = nullptr;
    const Tensor y = mlp_gelu_tanh(x, w1, b1, w2);
    EXPECT_EQ(calls()["matmul"], 2);
    EXPECT_TRUE(same(y, ref));
  }
  const Tensor x64 = x.detach().to(DType::Float64).requires_grad_(), w164 = w1.to(DType::Float64).requires_grad_(),
               b164 = b1.to(DType::Float64).requires_grad_(), w264 = w2.to(DType::Float64).requires_grad_();
  SwappedCpuTable s;
  s.count_all();
  const Tensor y64 = mlp_gelu(x64, w164, b164, w264);
  EXPECT_EQ(calls()["linear_gelu"], 1);  // asked, declined
  EXPECT_EQ(calls()["matmul"], 2);
  EXPECT_TRUE(same(y64, linear(gelu(linear(x64, w164, b164)), w264)));
  // The composed float64 path is what gradcheck holds to finite differences.
  const auto r = gradcheck([&](const std::vector<Tensor>& in) { return mlp_gelu(in[0], in[1], in[2], in[3]); }, {x64, w164, b164, w264});
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_NE(error_of([&] { mlp_gelu(x, w1, b1, w2, Tensor(), "fast"); }).find("mlp_gelu: approximate"), std::string::npos);
}

TEST(CpuTableLinalg, AttentionRoutesThroughTheTable) {
  Generator g(3);
  for (DType dt : {DType::Float32, DType::BFloat16, DType::Float64}) {
    SCOPED_TRACE(name(dt));
    const Tensor q = randn({2, 3, 5, 8}, DType::Float32, g).to(dt).requires_grad_(),
                 k = randn({1, 3, 6, 8}, DType::Float32, g).to(dt).requires_grad_(),
                 v = randn({2, 3, 6, 12}, DType::Float32, g).to(dt).requires_grad_();
    const Tensor mask = gt(rand({5, 6}, DType::Float32, g), 0.3);
    const Tensor fmask = randn({5, 6}, DType::Float32, g).to(dt).requires_grad_();
    SwappedCpuTable s;
    s.count_all();
    // No mask (any head dims, a broadcast key): the fused entries.
    sum(scaled_dot_product_attention(q, k, v, Tensor(), 0.1, true)).backward();
    EXPECT_EQ(calls()["sdpa_forward"], 1);
    EXPECT_EQ(calls()["sdpa_backward"], 1);
    EXPECT_EQ(calls()["sdpa_forward_into"] + calls()["sdpa_backward_into"], 0);
    EXPECT_EQ(calls()["matmul"], 0);
    ASSERT_TRUE(k.grad().defined());
    EXPECT_EQ(k.grad().sizes(), k.sizes());
    EXPECT_EQ(k.grad().dtype(), dt);
    // A mask: the general entries; a float mask gets its gradient.
    calls().clear();
    sum(scaled_dot_product_attention(q, k, v, mask)).backward();
    sum(scaled_dot_product_attention(q, k, v, fmask)).backward();
    EXPECT_EQ(calls()["sdpa_forward_into"], 2);
    EXPECT_EQ(calls()["sdpa_backward_into"], 2);
    EXPECT_EQ(calls()["sdpa_forward"] + calls()["sdpa_backward"] + calls()["matmul"], 0);
    ASSERT_TRUE(fmask.grad().defined());
    EXPECT_EQ(fmask.grad().dtype(), dt);
    // Packed heads: the general entries, results written in place.
    calls().clear();
    const Tensor qkv = randn({2, 5, 3 * 16}, DType::Float32, g).to(dt).requires_grad_();
    sum(scaled_dot_product_attention_packed(qkv, 2, Tensor(), 0.0, true)).backward();
    EXPECT_EQ(calls()["sdpa_forward_into"], 1);
    EXPECT_EQ(calls()["sdpa_backward_into"], 1);
    EXPECT_EQ(qkv.grad().sizes(), qkv.sizes());
  }
}

// The packed entry without the general kernels takes the head views through the graph into
// scaled_dot_product_attention (as on CUDA), with the same values; and a call that neither the
// fused nor the general entries take is refused by the op's name where the device cannot compose it.
TEST(CpuTableLinalg, AttentionFallbacksWithoutItsEntries) {
  Generator g(4);
  const Tensor qkv = randn({2, 7, 3 * 16}, DType::Float32, g);
  const Tensor ref = scaled_dot_product_attention_packed(qkv, 2, Tensor(), 0.0, true);
  {
    SwappedCpuTable s;
    s.count_all();
    s.t.sdpa_forward_into = nullptr;
    s.t.sdpa_backward_into = nullptr;
    const Tensor y = scaled_dot_product_attention_packed(qkv, 2, Tensor(), 0.0, true);
    EXPECT_EQ(calls()["sdpa_forward"], 1);
    EXPECT_LT(mixprec::testing::rel_error(y, ref), 1e-6);
    // A mask without the general entries: the composed path, which needs the device's softmax.
    s.t.softmax = nullptr;
    const Tensor q = randn({2, 4, 8}, DType::Float32, g), k = randn({2, 5, 8}, DType::Float32, g);
    const std::string msg = error_of([&] { scaled_dot_product_attention(q, k, k, gt(rand({4, 5}), 0.5)); });
    EXPECT_EQ(msg.rfind("scaled_dot_product_attention:", 0), 0u) << msg;
  }
  {
    SwappedCpuTable s;
    s.t.sdpa_forward = nullptr;
    s.t.sdpa_forward_into = nullptr;
    s.t.softmax = nullptr;
    const Tensor q = randn({2, 4, 8}, DType::Float32, g);
    const std::string msg = error_of([&] { scaled_dot_product_attention(q, q, q); });
    EXPECT_EQ(msg.rfind("scaled_dot_product_attention:", 0), 0u) << msg;
    EXPECT_NE(msg.find("has no cpu kernel"), std::string::npos) << msg;
  }
}

TEST(CpuTableLinalg, CrossEntropyRoutesThroughTheTable) {
  Generator g(5);
  const Tensor x = randn({4, 5, 3}, DType::Float32, g).requires_grad_();
  const Tensor t = tensor(std::vector<int64_t>{0, 4, 2, 1, -100, 3, 2, 2, 0, 1, 4, 4}).reshape({4, 3});
  const Tensor ref = cross_entropy(x, t, Reduction::Mean, -100, 0.1);
  SwappedCpuTable s;
  s.count_all();
  const Tensor l = cross_entropy(x, t, Reduction::Mean, -100, 0.1);
  EXPECT_EQ(calls()["cross_entropy"], 1);
  EXPECT_TRUE(same(l, ref));
  l.backward();
  EXPECT_EQ(calls()["cross_entropy_backward"], 1);
  EXPECT_EQ(calls()["class_weights"], 0);
  // Targets are still checked on the host, at once, before any kernel.
  calls().clear();
  const std::string msg = error_of([&] { cross_entropy(x, full({4, 3}, 7.0, DType::Int64)); });
  EXPECT_NE(msg.find("cross_entropy: target value 7 is out of range"), std::string::npos) << msg;
  EXPECT_EQ(calls()["cross_entropy"], 0);
}

// Without the fused entries cross_entropy composes log_softmax with class_weights, as on CUDA;
// the host check still comes first, and nothing is left to report lazily on the CPU.
TEST(CpuTableLinalg, CrossEntropyWithoutFusedEntriesUsesClassWeights) {
  Generator g(6);
  const Tensor x = randn({6, 5}, DType::Float32, g).requires_grad_();
  const Tensor t = tensor(std::vector<int64_t>{0, 4, -100, 1, 3, 2});
  const Tensor ref = cross_entropy(x, t, Reduction::Mean, -100, 0.2);
  SwappedCpuTable s;
  s.count_all();
  s.t.cross_entropy = nullptr;
  // The composed path asks for the device's softmax, copy and binary; where the CPU table does
  // not have them yet (the elementwise ops' own header fills them), they are never called on the
  // CPU here: the ops run their host code and no count is left to add to.
  if (!s.t.softmax) s.t.softmax = [](const Tensor& x, int64_t dim, bool log) { return log ? log_softmax(x, dim) : softmax(x, dim); };
  if (!s.t.copy) s.t.copy = [](const Tensor&, const Tensor&) { FAIL() << "copy"; };
  if (!s.t.binary) s.t.binary = [](DeviceBinary, const Tensor& a, const Tensor&, double) -> Tensor {
    ADD_FAILURE() << "binary";
    return a;
  };
  const Tensor l = cross_entropy(x, t, Reduction::Mean, -100, 0.2);
  EXPECT_EQ(calls()["class_weights"], 1);
  EXPECT_LT(mixprec::testing::rel_error(l, ref), 1e-6);
  EXPECT_TRUE(detail::device_checks().empty());
  l.backward();
  ASSERT_TRUE(x.grad().defined());
  const std::string msg = error_of([&] { cross_entropy(x, tensor(std::vector<int64_t>{0, 5, 0, 0, 0, 0})); });
  EXPECT_NE(msg.find("cross_entropy: target value 5 is out of range"), std::string::npos) << msg;
  s.t.class_weights = nullptr;
  const std::string none = error_of([&] { cross_entropy(x, t); });
  EXPECT_EQ(none.rfind("cross_entropy:", 0), 0u) << none;
  EXPECT_NE(none.find("has no cpu kernel"), std::string::npos) << none;
}

// class_weights and clamp_indices on the CPU keep the device contract: bad values are counted,
// made NaN (weights) or 0 (indices), for callers that did not check on the host.
TEST(CpuTableLinalg, ClassWeightsAndClampIndicesKeepTheDeviceContract) {
  const DeviceKernels& k = *device_kernels(Device::CPU);
  const Tensor bad = zeros({}, DType::Float32);
  const auto [w, count] = k.class_weights(tensor(std::vector<int64_t>{1, -100, 7, 0}), 2, 3, 2, -100, 0.3, DType::Float64, bad);
  EXPECT_EQ(w.sizes(), (Shape{2, 3, 2}));
  EXPECT_EQ(count.item<double>(), 3.0);
  EXPECT_EQ(bad.item<double>(), 1.0);
  const double* wp = w.data<double>();
  // Row 0 (n 0, s 0), target 1: 0.1 everywhere plus 0.7 at class 1. Row 1 ignored: zeros.
  EXPECT_DOUBLE_EQ(wp[0 * 2 + 0], 0.1);
  EXPECT_DOUBLE_EQ(wp[1 * 2 + 0], 0.1 + 0.7);
  EXPECT_EQ(wp[1 * 2 + 1], 0.0);
  EXPECT_TRUE(std::isnan(wp[6 + 0]));  // row 2 (n 1, s 0): target 7 of 3 classes
  EXPECT_DOUBLE_EQ(wp[6 + 1], 0.1 + 0.7);  // row 3 (n 1, s 1), target 0
  const Tensor idx = tensor(std::vector<int64_t>{3, -1, 5, 0});
  k.clamp_indices(idx, 5, bad);
  EXPECT_EQ(bad.item<double>(), 3.0);
  EXPECT_EQ(idx.data<int64_t>()[0], 3);
  EXPECT_EQ(idx.data<int64_t>()[1], 0);
  EXPECT_EQ(idx.data<int64_t>()[2], 0);
}
