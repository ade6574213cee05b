// float8 tensors: DType facts, casts through Tensor::to (bit-identical to the scalar encoder,
// contiguous or strided), fills, item, printing, safetensors files, and the clear refusal of
// arithmetic on float8 (PyTorch's rule) instead of undefined behaviour.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <unistd.h>

using namespace mixprec;

namespace {

template <class F8>
void expect_cast_matches_scalar(DType d) {
  // Every float8 value, its midpoints, out-of-range values, inf and NaN, as float32 and float64.
  std::vector<float> src;
  for (unsigned b = 0; b < 256; ++b) {
    const float v = float(F8::from_bits(static_cast<uint8_t>(b)));
    src.push_back(v);
    src.push_back(v * 1.0625f);
  }
  for (float v : {1e6f, -1e6f, INFINITY, -INFINITY, NAN, 1e-30f, 0.0f, -0.0f}) src.push_back(v);
  const Tensor t = tensor(src);
  const Tensor q = t.to(d);
  ASSERT_EQ(q.dtype(), d);
  EXPECT_EQ(q.element_size(), 1);
  EXPECT_EQ(q.nbytes(), static_cast<int64_t>(src.size()));
  const Tensor q64 = t.to(DType::Float64).to(d);
  const Tensor q16 = t.to(DType::BFloat16).to(d);
  for (std::size_t i = 0; i < src.size(); ++i) {
    EXPECT_EQ(q.data<F8>()[i].x, F8(src[i]).x) << "element " << i << " = " << src[i];
    EXPECT_EQ(q64.data<F8>()[i].x, F8(src[i]).x) << "from float64, element " << i;
    EXPECT_EQ(q16.data<F8>()[i].x, F8(float(bfloat16(src[i]))).x) << "from bfloat16, element " << i;
  }
  // Back to float32 is exact for every non-NaN.
  const Tensor back = q.to(DType::Float32);
  for (std::size_t i = 0; i < src.size(); ++i) {
    const float want = float(F8(src[i]));
    if (std::isnan(want)) EXPECT_TRUE(std::isnan(back.data<float>()[i]));
    else EXPECT_EQ(back.data<float>()[i], want);
  }
  // A strided source (transposed view) converts the same values.
  const Tensor m = t.narrow(0, 0, 512).reshape({16, 32});
  const Tensor mt = m.t().to(d).contiguous();
  const Tensor want = m.t().contiguous().to(d);
  ASSERT_EQ(mt.sizes(), want.sizes());
  for (int64_t i = 0; i < mt.numel(); ++i) EXPECT_EQ(mt.data<F8>()[i].x, want.data<F8>()[i].x);
}

}  // namespace

TEST(Float8Tensor, DTypeFacts) {
  EXPECT_EQ(name(kFloat8E4M3FN), "float8_e4m3fn");
  EXPECT_EQ(name(kFloat8E5M2), "float8_e5m2");
  EXPECT_EQ(itemsize(kFloat8E4M3FN), 1u);
  EXPECT_EQ(itemsize(kFloat8E5M2), 1u);
  EXPECT_TRUE(is_floating_point(kFloat8E4M3FN));
  EXPECT_TRUE(is_float8(kFloat8E5M2));
  EXPECT_FALSE(is_float8(kBFloat16));
  EXPECT_FALSE(is_low_precision(kFloat8E4M3FN));  // not an autocast compute dtype
  EXPECT_EQ(dtype_of<float8_e4m3fn>, kFloat8E4M3FN);
  EXPECT_EQ(dtype_of<float8_e5m2>, kFloat8E5M2);
  // Mixed with anything else float8 goes to float32 (float64 with float64).
  EXPECT_EQ(promote_types(kFloat8E4M3FN, kFloat8E4M3FN), kFloat8E4M3FN);
  EXPECT_EQ(promote_types(kFloat8E4M3FN, kFloat8E5M2), kFloat32);
  EXPECT_EQ(promote_types(kFloat8E5M2, kBFloat16), kFloat32);
  EXPECT_EQ(promote_types(kInt64, kFloat8E4M3FN), kFloat32);
  EXPECT_EQ(promote_types(kFloat8E4M3FN, kFloat64), kFloat64);
}

TEST(Float8Tensor, CastsAreBitIdenticalToTheScalarEncoder) {
  expect_cast_matches_scalar<float8_e4m3fn>(kFloat8E4M3FN);
  expect_cast_matches_scalar<float8_e5m2>(kFloat8E5M2);
}

TEST(Float8Tensor, FillItemCopyViewsAndPrint) {
  Tensor a = full({2, 3}, 0.3, kFloat8E4M3FN);  // 0.3 -> 0.3125 (the nearest E4M3 value)
  EXPECT_THROW((void)a.item<float>(), Error);   // 6 elements
  EXPECT_EQ(a.select(0, 1).select(0, 2).item<float>(), 0.3125f);
  EXPECT_EQ(a.data<float8_e4m3fn>()[5].x, float8_e4m3fn(0.3f).x);
  a.fill_(-1000.0);  // does not saturate (as .to): NaN
  EXPECT_TRUE(std::isnan(a.select(0, 0).select(0, 0).item<float>()));
  const Tensor z = zeros({4}, kFloat8E5M2);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(z.data<float8_e5m2>()[i].x, 0);
  // Views, clones and contiguous copies move the bytes.
  const Tensor v = tensor(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3}).to(kFloat8E5M2);
  const Tensor vt = v.t().contiguous();
  EXPECT_EQ(vt.sizes(), (Shape{3, 2}));
  EXPECT_EQ(float(vt.data<float8_e5m2>()[1]), 4.0f);
  EXPECT_EQ(sum(v.clone().to(kFloat32)).item<float>(), 21.0f);
  Tensor dst = empty({2, 3}, kFloat8E4M3FN);
  dst.copy_(v);  // float8 -> float8 of the other format, through float
  EXPECT_EQ(float(dst.data<float8_e4m3fn>()[4]), 5.0f);
  const std::string s = tensor(std::vector<float>{0.5f, -448.0f}).to(kFloat8E4M3FN).to_string();
  EXPECT_NE(s.find("0.5000"), std::string::npos) << s;
  EXPECT_NE(s.find("-448.0000"), std::string::npos) << s;
  EXPECT_NE(s.find("float8_e4m3fn"), std::string::npos) << s;
}

TEST(Float8Tensor, ArithmeticIsRefusedWithANamedError) {
  const Tensor a = ones({2, 2}).to(kFloat8E4M3FN);
  const Tensor b = ones({2, 2}).to(kFloat8E4M3FN);
  auto expect_refused = [](auto&& f, const std::string& op) {
    try {
      (void)f();
      ADD_FAILURE() << op << " accepted float8 operands";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(op), std::string::npos) << msg;
      EXPECT_NE(msg.find("float8_e4m3fn"), std::string::npos) << msg;
    }
  };
  expect_refused([&] { return add(a, b); }, "add");
  expect_refused([&] { return mul(a, 2.0); }, "mul");
  expect_refused([&] { return relu(a); }, "relu");
  expect_refused([&] { return sum(a); }, "sum");
  expect_refused([&] { return matmul(a, b); }, "matmul");
  expect_refused([&] { return softmax(a, -1); }, "softmax");
  // Mixed with float32 the operation is an explicit widening: float32 out, exact inputs.
  const Tensor c = add(a, ones({2, 2}));
  EXPECT_EQ(c.dtype(), kFloat32);
  EXPECT_EQ(sum(c).item<float>(), 8.0f);
}
