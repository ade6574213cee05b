// The CPU backend's element-wise entries of the device kernel table (backends/cpu/elementwise.hpp,
// backends/cpu/reduce.hpp): the table has them, the ops reach them through the table on the CPU
// (a copy of the table with counting entries is swapped in), and an op whose entry is missing
// refuses by name. Plus the CPU kernels' own contracts where the ops alone do not show them (the
// scalar operand's bits, dropout's decisions, embedding's saved indices).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::error_of;

namespace cpu_table_elementwise_test {  // the test executables are unity builds: keep these names apart

struct Counts {
  int copy = 0, fill = 0, binary = 0, binary_scalar = 0, unary = 0, unary_backward = 0, sum = 0, softmax = 0, softmax_backward = 0,
      masked_scale = 0, dropout = 0, embedding = 0, embedding_backward = 0;
};
Counts& counts() {
  static Counts c;
  return c;
}
// The CPU table being wrapped; the counting entries call through it.
const DeviceKernels*& original() {
  static const DeviceKernels* o = nullptr;
  return o;
}

// A copy of the CPU table whose entries count their calls, swapped in for the guard's lifetime
// (restored even when an assertion fails); table() may clear entries.
class CountingTable {
 public:
  CountingTable() : prev_(device_kernels(Device::CPU)) {
    original() = prev_;
    counts() = {};
    table_ = *prev_;
    table_.copy = [](const Tensor& d, const Tensor& s) { ++counts().copy, original()->copy(d, s); };
    table_.fill = [](const Tensor& t, double v) { ++counts().fill, original()->fill(t, v); };
    table_.binary = [](DeviceBinary k, const Tensor& a, const Tensor& b, double alpha) {
      ++counts().binary;
      return original()->binary(k, a, b, alpha);
    };
    table_.binary_scalar = [](DeviceBinary k, const Tensor& a, double s, double alpha, bool reversed) {
      ++counts().binary_scalar;
      return original()->binary_scalar(k, a, s, alpha, reversed);
    };
    table_.unary = [](DeviceUnary u, const Tensor& x) {
      ++counts().unary;
      return original()->unary(u, x);
    };
    table_.unary_backward = [](DeviceUnary u, const Tensor& g, const Tensor& x, const Tensor& y) {
      ++counts().unary_backward;
      return original()->unary_backward(u, g, x, y);
    };
    table_.sum = [](const Tensor& x, const Shape& dims) {
      ++counts().sum;
      return original()->sum(x, dims);
    };
    table_.softmax = [](const Tensor& x, int64_t dim, bool log) {
      ++counts().softmax;
      return original()->softmax(x, dim, log);
    };
    table_.softmax_backward = [](const Tensor& y, const Tensor& g, int64_t dim, bool log) {
      ++counts().softmax_backward;
      return original()->softmax_backward(y, g, dim, log);
    };
    table_.masked_scale = [](const Tensor& x, const Tensor& keep, double scale) {
      ++counts().masked_scale;
      return original()->masked_scale(x, keep, scale);
    };
    table_.dropout = [](const Tensor& x, uint64_t seed, double p, double scale, const Tensor& replay) {
      ++counts().dropout;
      return original()->dropout(x, seed, p, scale, replay);
    };
    table_.embedding = [](const Tensor& w, const Tensor& idx) {
      ++counts().embedding;
      return original()->embedding(w, idx);
    };
    table_.embedding_backward = [](const Tensor& g, const Tensor& idx, int64_t V, int64_t pad) {
      ++counts().embedding_backward;
      return original()->embedding_backward(g, idx, V, pad);
    };
    set_device_kernels(Device::CPU, &table_);
  }
  ~CountingTable() { set_device_kernels(Device::CPU, prev_); }
  CountingTable(const CountingTable&) = delete;
  CountingTable& operator=(const CountingTable&) = delete;
  DeviceKernels& table() { return table_; }

 private:
  const DeviceKernels* prev_;
  DeviceKernels table_;
};

// Bit-exact equality of two tensors of one dtype and shape (NaNs compared by bits too).
bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.sizes() != b.sizes()) return false;
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), static_cast<std::size_t>(ac.nbytes())) == 0;
}

void expect_names(const std::string& msg, const char* op) {
  EXPECT_NE(msg.find(op), std::string::npos) << msg;
  EXPECT_NE(msg.find("cpu"), std::string::npos) << msg;
}

TEST(CpuTableElementwise, EntriesAreRegistered) {
  const DeviceKernels* k = device_kernels(Device::CPU);
  ASSERT_NE(k, nullptr);
  EXPECT_NE(k->copy, nullptr);
  EXPECT_NE(k->fill, nullptr);
  EXPECT_NE(k->binary, nullptr);
  EXPECT_NE(k->binary_scalar, nullptr);
  EXPECT_NE(k->unary, nullptr);
  EXPECT_NE(k->unary_backward, nullptr);
  EXPECT_NE(k->sum, nullptr);
  EXPECT_NE(k->softmax, nullptr);
  EXPECT_NE(k->softmax_backward, nullptr);
  EXPECT_NE(k->masked_scale, nullptr);
  EXPECT_NE(k->dropout, nullptr);
  EXPECT_NE(k->embedding, nullptr);
  EXPECT_NE(k->embedding_backward, nullptr);
}

TEST(CpuTableElementwise, CopiesAndCastsRouteThroughTheTable) {
  const Tensor x = randn({3, 4});
  Tensor h;
  {
    CountingTable ct;
    h = x.to(DType::Float16);
    EXPECT_EQ(counts().copy, 1);
    const Tensor c = x.t().contiguous();
    EXPECT_EQ(counts().copy, 2);
    Tensor y = empty({3, 4});
    y.copy_(x);
    EXPECT_EQ(counts().copy, 3);
    Tensor b = empty({2, 3, 4}, DType::BFloat16);
    b.copy_(x);  // broadcast and convert in one kernel call
    EXPECT_EQ(counts().copy, 4);
    EXPECT_TRUE(same_bits(y, x));
    EXPECT_TRUE(same_bits(c.t().contiguous(), x));
    EXPECT_TRUE(same_bits(b.select(0, 1), x.to(DType::BFloat16)));
  }
  EXPECT_TRUE(same_bits(h, x.to(DType::Float16)));
  EXPECT_LT(mixprec::testing::rel_error(h, x), 1e-3);
  // A missing entry refuses by the caller's name.
  CountingTable ct;
  ct.table().copy = nullptr;
  expect_names(error_of([&] { (void)x.to(DType::Float16); }), "copy_");
  expect_names(error_of([&] { (void)x.t().contiguous(); }), "copy_");
}

TEST(CpuTableElementwise, FillsRouteThroughTheTable) {
  {
    CountingTable ct;
    const Tensor z = zeros({5, 3});
    EXPECT_EQ(counts().fill, 1);
    const Tensor f = full({4}, 2.5, DType::Float16);
    EXPECT_EQ(counts().fill, 2);
    EXPECT_EQ(f.select(0, 3).item<float>(), 2.5f);
    EXPECT_EQ(z.select(0, 4).select(0, 2).item<float>(), 0.0f);
    // -0.0 is not the all-zero bits fill: its sign survives.
    Tensor m = empty({3});
    m.fill_(-0.0);
    EXPECT_EQ(counts().fill, 3);
    EXPECT_TRUE(std::signbit(m.select(0, 1).item<float>()));
    // A strided fill writes only the view.
    Tensor w = zeros({4, 4}, DType::Int64);
    w.t().slice(0, 1, 3).fill_(7);
    EXPECT_EQ(sum(w).item<int64_t>(), 7 * 8);
  }
  CountingTable ct;
  ct.table().fill = nullptr;
  expect_names(error_of([] { (void)zeros({2}); }), "zeros");
  Tensor t = empty({2});
  expect_names(error_of([&] { t.fill_(1.0); }), "fill_");
}

TEST(CpuTableElementwise, AddMulDivRouteThroughTheTable) {
  Generator g(3);
  const Tensor a = randn({4, 5}, DType::Float32, g).requires_grad_();
  const Tensor b = randn({5}, DType::Float32, g).requires_grad_();
  {
    CountingTable ct;
    const Tensor y = div(mul(sub(a, b), b), add(b, 3.0));
    EXPECT_EQ(counts().binary, 3);
    EXPECT_EQ(counts().binary_scalar, 1);
    const int fwd = counts().binary + counts().binary_scalar;
    sum(y).backward();
    EXPECT_GT(counts().binary + counts().binary_scalar, fwd);
    // Integers too (the CPU kernel takes every dtype).
    const Tensor i = add(arange(6), arange(6), 2.0);
    EXPECT_EQ(i.dtype(), DType::Int64);
    EXPECT_EQ(i.select(0, 5).item<int64_t>(), 15);
  }
  CountingTable ct;
  ct.table().binary = nullptr;
  expect_names(error_of([&] { (void)add(a.detach(), b.detach()); }), "add");
  expect_names(error_of([&] { (void)mul(a.detach(), b.detach()); }), "mul");
  expect_names(error_of([&] { (void)div(a.detach(), b.detach()); }), "div");
}

// The scalar kernel gives the bits a 0-dim operand of the tensor's dtype gives through `binary`,
// either way round, with alpha, in every floating dtype and on a strided tensor.
TEST(CpuTableElementwise, ScalarOperandHasTheBitsOfATensorOperand) {
  Generator g(5);
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64}) {
    const Tensor x = randn({6, 7}, DType::Float32, g).to(d).t();
    for (double s : {0.1, -3.0, 1e-3}) {
      const Tensor st = scalar_tensor(s, d);
      CountingTable ct;
      const auto counting = ct.table().binary_scalar;
      ct.table().binary_scalar = nullptr;  // the tensor path, through `binary`
      const Tensor ref_add = add(x, st, 0.7), ref_radd = add(st, x, -1.5), ref_mul = mul(st, x), ref_div = div(x, st),
                   ref_rdiv = div(st, x);
      EXPECT_EQ(counts().binary, 5);
      ct.table().binary_scalar = counting;
      EXPECT_TRUE(same_bits(add(x, st, 0.7), ref_add)) << d << " " << s;
      EXPECT_TRUE(same_bits(add(st, x, -1.5), ref_radd)) << d << " " << s;
      EXPECT_TRUE(same_bits(mul(st, x), ref_mul)) << d << " " << s;
      EXPECT_TRUE(same_bits(div(x, st), ref_div)) << d << " " << s;
      EXPECT_TRUE(same_bits(div(st, x), ref_rdiv)) << d << " " << s;
      EXPECT_EQ(counts().binary_scalar, 5);
      EXPECT_EQ(counts().binary, 5);
    }
  }
}

TEST(CpuTableElementwise, ActivationsRouteThroughTheTable) {
  const Tensor x = randn({3, 8}).requires_grad_();
  {
    CountingTable ct;
    const Tensor y = add(add(relu(x), gelu(x, "tanh")), add(exp(x), tanh(x)));
    EXPECT_EQ(counts().unary, 4);
    sum(y).backward();
    EXPECT_EQ(counts().unary_backward, 4);
    (void)sqrt(abs(x.detach()));  // CPU-only ops, no table entry
    EXPECT_EQ(counts().unary, 4);
  }
  CountingTable ct;
  ct.table().unary = nullptr;
  expect_names(error_of([&] { (void)sigmoid(x); }), "sigmoid");
  ct.table().unary = original()->unary;
  ct.table().unary_backward = nullptr;
  const Tensor y = silu(x);
  expect_names(error_of([&] { sum(y).backward(); }), "silu");
}

TEST(CpuTableElementwise, SumRoutesThroughTheTable) {
  const Tensor x = randn({4, 3, 5}).requires_grad_();
  {
    CountingTable ct;
    const Tensor a = sum(x);
    const Tensor b = sum(x, {0}, true);  // leading dims of a contiguous tensor
    const Tensor c = sum(x, {-1});
    EXPECT_EQ(counts().sum, 3);
    EXPECT_EQ(b.sizes(), (Shape{1, 3, 5}));
    EXPECT_EQ(c.sizes(), (Shape{4, 3}));
    const Tensor total = add(add(a, sum(b)), sum(c));
    EXPECT_EQ(counts().sum, 5);
    total.backward();
    EXPECT_TRUE(x.grad().defined());
    EXPECT_LT(mixprec::testing::rel_error(x.grad(), full({4, 3, 5}, 3.0)), 1e-7);
    // Integers sum into int64 on the CPU.
    const int before = counts().sum;
    const Tensor i = sum(arange(5, DType::Int32));
    EXPECT_EQ(counts().sum, before + 1);
    EXPECT_EQ(i.dtype(), DType::Int64);
    EXPECT_EQ(i.item<int64_t>(), 10);
  }
  CountingTable ct;
  ct.table().sum = nullptr;
  expect_names(error_of([&] { (void)sum(x); }), "sum");
}

TEST(CpuTableElementwise, SoftmaxRoutesThroughTheTable) {
  const Tensor x = randn({3, 4, 5}).requires_grad_();
  {
    CountingTable ct;
    const Tensor y = add(softmax(x, -1), log_softmax(x, 1));
    EXPECT_EQ(counts().softmax, 2);
    sum(mul(y, y)).backward();
    EXPECT_EQ(counts().softmax_backward, 2);
  }
  CountingTable ct;
  ct.table().softmax = nullptr;
  expect_names(error_of([&] { (void)softmax(x, 0); }), "softmax");
  expect_names(error_of([&] { (void)log_softmax(x, 0); }), "log_softmax");
  ct.table().softmax = original()->softmax;
  ct.table().softmax_backward = nullptr;
  const Tensor y = log_softmax(x, 2);
  expect_names(error_of([&] { sum(y).backward(); }), "log_softmax");
}

// Dropout draws detail::dropout_keep(seed, i, p) for element i in row-major order, on contiguous
// and strided inputs alike, and its backward draws the same decisions again from the seed.
TEST(CpuTableElementwise, DropoutRoutesThroughTheTable) {
  const double p = 0.3, scale = 1.0 / (1.0 - p);
  for (DType d : {DType::Float32, DType::BFloat16, DType::Float64}) {
    for (bool strided : {false, true}) {
      const Tensor base = randn({7, 9}, DType::Float32, default_generator()).to(d);
      const Tensor x = (strided ? base.t() : base).detach().requires_grad_();
      Generator gen(11);
      const uint64_t seed = Generator(11).next_u64();
      Tensor y;
      {
        CountingTable ct;
        y = dropout(x, p, true, gen);
        EXPECT_EQ(counts().dropout, 1);
        sum(y).backward();
        EXPECT_EQ(counts().dropout, 2);
      }
      // Expected bits: acc_t(x) * (keep ? scale : 0), rounded once to d.
      const bool f64 = d == DType::Float64;
      const DType at = f64 ? DType::Float64 : DType::Float32;
      const Tensor xa = x.detach().to(at).contiguous();
      const Tensor factor = empty(xa.sizes(), at);
      for (int64_t i = 0; i < xa.numel(); ++i) {
        const bool keep = detail::dropout_keep(seed, static_cast<uint64_t>(i), p);
        if (f64) factor.data<double>()[i] = keep ? scale : 0.0;
        else factor.data<float>()[i] = keep ? static_cast<float>(scale) : 0.0f;
      }
      EXPECT_TRUE(same_bits(y, mul(xa, factor).to(d).view(x.sizes()))) << d << " strided " << strided;
      EXPECT_TRUE(same_bits(x.grad().contiguous(), factor.to(d))) << d << " strided " << strided;
    }
  }
  CountingTable ct;
  ct.table().dropout = nullptr;
  Generator gen(2);
  const Tensor x = randn({4});
  expect_names(error_of([&] { (void)dropout(x, 0.5, true, gen); }), "dropout");
  EXPECT_EQ(gen.next_u64(), Generator(2).next_u64());  // refused before the draw
}

TEST(CpuTableElementwise, MaskedScaleKernel) {
  // No op reaches it on the CPU (dropout's kernel applies it to a strided input's decisions);
  // its contract: x * (keep ? scale : 0) in float, rounded once, any strides.
  const Tensor x = randn({5, 6}).to(DType::Float16).t();
  const Tensor keep = gt(randn({6, 5}), 0.0);
  const Tensor y = device_kernels(Device::CPU)->masked_scale(x, keep, 1.25);
  const Tensor want = mul(x.to(DType::Float32), where(keep, full({6, 5}, 1.25), zeros({6, 5}))).to(DType::Float16);
  EXPECT_TRUE(same_bits(y, want));
}

TEST(CpuTableElementwise, EmbeddingRoutesThroughTheTable) {
  const Tensor w = randn({6, 3}).requires_grad_();
  Tensor idx = tensor(std::vector<int64_t>{4, 1, 4, 0}, {2, 2});
  {
    CountingTable ct;
    const Tensor e = embedding(w, idx, 1);
    EXPECT_EQ(counts().embedding, 1);
    EXPECT_EQ(e.sizes(), (Shape{2, 2, 3}));
    EXPECT_TRUE(same_bits(e.select(0, 1).select(0, 0), w.detach().select(0, 4)));
    // The backward uses the indices of the forward, whatever the caller does to its tensor since.
    {
      no_grad ng;
      idx.fill_(2);
    }
    sum(e).backward();
    EXPECT_EQ(counts().embedding_backward, 1);
    const Tensor gw = w.grad();
    EXPECT_EQ(gw.select(0, 4).select(0, 0).item<float>(), 2.0f);
    EXPECT_EQ(gw.select(0, 0).select(0, 2).item<float>(), 1.0f);
    EXPECT_EQ(gw.select(0, 1).select(0, 1).item<float>(), 0.0f);  // padding_idx
    EXPECT_EQ(gw.select(0, 2).select(0, 1).item<float>(), 0.0f);
    // float64 weights keep their gradient in float64.
    const Tensor wd = randn({3, 2}, DType::Float64).requires_grad_();
    sum(embedding(wd, tensor(std::vector<int64_t>{2, 2}))).backward();
    EXPECT_EQ(wd.grad().dtype(), DType::Float64);
    EXPECT_EQ(wd.grad().select(0, 2).select(0, 1).item<double>(), 2.0);
  }
  CountingTable ct;
  ct.table().embedding = nullptr;
  expect_names(error_of([&] { (void)embedding(w, idx); }), "embedding");
  ct.table().embedding = original()->embedding;
  ct.table().embedding_backward = nullptr;
  const Tensor e = embedding(w, idx);
  expect_names(error_of([&] { sum(e).backward(); }), "embedding_backward");
}

}  // namespace cpu_table_elementwise_test
