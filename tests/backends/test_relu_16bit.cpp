// ReLU and its gradient on 16-bit bits (backends/cpu/elementwise.hpp) give the bits of the float
// path (widen, relu, round), special values included, in contiguous and channels-last layouts.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <cstring>
#include <vector>

using namespace mixprec;

namespace {
// Every 16-bit pattern, 4 times over, in [4, 4, 64, 64] (a strided view of it takes the generic path).
Tensor all_patterns(DType d, uint32_t multiplier = 40503u) {
  Tensor t = empty({4, 4, 64, 64}, d);
  auto* p = static_cast<uint16_t*>(t.data_ptr());
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<uint16_t>(i * multiplier);  // odd: a permutation of 2^16
  return t;
}
std::vector<uint16_t> bits_of(const Tensor& t) {
  const Tensor c = t.contiguous();
  std::vector<uint16_t> v(static_cast<std::size_t>(c.numel()));
  std::memcpy(v.data(), c.data_ptr(), v.size() * 2);
  return v;
}
// The same values through the generic (widening) map: a non-dense view of a 2x wider copy.
Tensor strided_copy(const Tensor& t) {
  Shape s = t.sizes();
  s.back() *= 2;
  Tensor wide = zeros(s, t.dtype());
  Tensor view = wide.slice(-1, 0, s.back(), 2);
  view.copy_(t);
  return view;
}
}  // namespace

TEST(Relu16Bit, BitsMatchTheFloatPath) {
  const DeviceKernels* k = device_kernels(Device::CPU);
  for (DType d : {kBFloat16, kFloat16})
    for (MemoryFormat f : {MemoryFormat::Contiguous, MemoryFormat::ChannelsLast}) {
      const Tensor x = all_patterns(d).contiguous(f);
      const Tensor xs = strided_copy(x);
      ASSERT_FALSE(xs.is_contiguous());
      const Tensor y = k->unary(DeviceUnary::Relu, x), ys = k->unary(DeviceUnary::Relu, xs);
      EXPECT_TRUE(y.is_contiguous(f)) << name(d);
      EXPECT_EQ(bits_of(y), bits_of(ys)) << name(d);
      // The gradient: every g pattern against y patterns in another order (sign, zero, NaN, inf).
      const Tensor g = all_patterns(d, 30011u).contiguous(f), yv = all_patterns(d, 52057u).contiguous(f);
      const Tensor gx = k->unary_backward(DeviceUnary::Relu, g, yv, yv);
      const Tensor gxs = k->unary_backward(DeviceUnary::Relu, strided_copy(g), strided_copy(yv), strided_copy(yv));
      EXPECT_TRUE(gx.is_contiguous(f)) << name(d);
      EXPECT_EQ(bits_of(gx), bits_of(gxs)) << name(d);
    }
}
