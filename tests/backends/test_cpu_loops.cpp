// The CPU element-wise loops (backends/cpu/loops.hpp): maps and copies over every layout the op
// layer produces (contiguous, permuted, broadcast, strided output), each element checked against
// a plain per-element loop over raw strides; the vector paths against the portable one bit for bit;
// and sums over leading dims against float64.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;

namespace {

// Element `i` (row-major over t's sizes) read through t's own strides: no library loop involved.
template <class T>
T element(const Tensor& t, int64_t i) {
  int64_t off = 0;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    off += (i % t.size(d)) * t.stride(d);
    i /= t.size(d);
  }
  return t.data<T>()[off];
}

template <class T>
Tensor random_tensor(const Shape& s, uint64_t seed) {
  Generator g(seed);
  return randn(s, DType::Float32, g).to(dtype_of<T>);
}

// The layouts map() sees: {out sizes, a view builder per operand}.
struct Layout {
  const char* name;
  Shape out;
  std::function<Tensor(const Tensor&)> a, b;  // from a contiguous base of shape `base`
  Shape base_a, base_b;
};

std::vector<Layout> layouts() {
  return {
      {"contiguous", {3, 5, 7}, [](const Tensor& t) { return t; }, [](const Tensor& t) { return t; }, {3, 5, 7}, {3, 5, 7}},
      {"permuted", {7, 3, 5}, [](const Tensor& t) { return t.permute({2, 0, 1}); }, [](const Tensor& t) { return t.permute({2, 0, 1}); },
       {3, 5, 7}, {3, 5, 7}},
      {"bias broadcast", {4, 6, 5, 9}, [](const Tensor& t) { return t; },
       [](const Tensor& t) { return detail::expand_raw(t, {4, 6, 5, 9}); }, {4, 6, 5, 9}, {1, 6, 1, 1}},
      {"row broadcast, sliced", {9, 300}, [](const Tensor& t) { return t.narrow(1, 2, 300); },
       [](const Tensor& t) { return detail::expand_raw(t, {9, 300}); }, {9, 310}, {300}},
      {"transposed vs contiguous, long rows", {600, 3}, [](const Tensor& t) { return t.transpose(0, 1); }, [](const Tensor& t) { return t; },
       {3, 600}, {600, 3}},
  };
}

template <class T>
void check_map(bool strided_out) {
  for (const Layout& l : layouts()) {
    const Tensor a = l.a(random_tensor<T>(l.base_a, 1)), b = l.b(random_tensor<T>(l.base_b, 2));
    // A strided output: every other column of a wider buffer.
    Shape wide = l.out;
    wide.back() *= 2;
    const Tensor out = strided_out ? empty(wide, dtype_of<T>).slice(-1, 0, l.out.back() * 2, 2)
                                   : empty(l.out, dtype_of<T>);
    ASSERT_EQ(out.sizes(), l.out);
    auto f = [](auto x, auto y) { return x * y + decltype(x)(0.5) * x; };
    cpu::map<T, T, T>(out, f, a, b);
    for (int64_t i = 0; i < out.numel(); ++i) {
      const T want = static_cast<T>(f(static_cast<acc_t<T>>(element<T>(a, i)), static_cast<acc_t<T>>(element<T>(b, i))));
      const T got = element<T>(out, i);
      ASSERT_EQ(std::memcmp(&want, &got, sizeof(T)), 0) << l.name << " " << dtype_of<T> << " element " << i << ": "
                                                        << static_cast<double>(static_cast<acc_t<T>>(got)) << " vs "
                                                        << static_cast<double>(static_cast<acc_t<T>>(want));
    }
  }
}

}  // namespace

TEST(CpuLoops, MapMatchesThePerElementLoopOnEveryLayoutAndDtype) {
  for (bool strided_out : {false, true}) {
    check_map<float>(strided_out);
    check_map<double>(strided_out);
    check_map<bfloat16>(strided_out);
    check_map<half>(strided_out);
  }
}

TEST(CpuLoops, VectorPathsAreBitIdenticalToThePortableOne) {
  // a * b + c rounds twice on the portable path; a fused multiply-add would round once and differ
  // in some of these elements, so this also checks that the vector loops do not contract.
  const int64_t n = 4099;
  std::vector<float> a(n), b(n), c(n), want(n), got(n);
  Generator g(3);
  const Tensor r = randn({3, n}, DType::Float32, g);
  std::memcpy(a.data(), r.data<float>(), sizeof(float) * n);
  std::memcpy(b.data(), r.data<float>() + n, sizeof(float) * n);
  std::memcpy(c.data(), r.data<float>() + 2 * n, sizeof(float) * n);
  auto body = [&](std::vector<float>& o) {
    return [&]() MIXPREC_SIMD_BODY {
      for (int64_t i = 0; i < n; ++i) o[i] = a[i] * b[i] + c[i] + std::max(a[i], 0.0f) * 0.1f;
    };
  };
  cpu::detail::simd_portable(body(want));
  int64_t fused_would_differ = 0;
  for (int64_t i = 0; i < n; ++i) fused_would_differ += std::fma(a[i], b[i], c[i]) != a[i] * b[i] + c[i];
  ASSERT_GT(fused_would_differ, 0);  // the test can tell a fused path from an unfused one
#if defined(MIXPREC_X86_SIMD)
  if (detail::simd_path_supported(SimdPath::AVX512)) {
    cpu::detail::simd_avx512(body(got));
    EXPECT_EQ(std::memcmp(want.data(), got.data(), sizeof(float) * n), 0) << "avx512";
  }
  if (detail::simd_path_supported(SimdPath::AVX2)) {
    cpu::detail::simd_avx2(body(got));
    EXPECT_EQ(std::memcmp(want.data(), got.data(), sizeof(float) * n), 0) << "avx2";
  }
#endif
  cpu::simd(body(got));  // whichever this CPU picks
  EXPECT_EQ(std::memcmp(want.data(), got.data(), sizeof(float) * n), 0);
}

TEST(CpuLoops, CopyMovesEveryElementSizeThroughAnyStrides) {
  for (DType d : {DType::Bool, DType::UInt8, DType::BFloat16, DType::Float32, DType::Int64, DType::Float64}) {
    Generator g(4);
    const Tensor base = (abs(randn({6, 7, 40}, DType::Float32, g)) * 10.0).to(d);  // fits uint8
    const Tensor src = base.permute({2, 0, 1}).narrow(0, 3, 30);  // [30, 6, 7], no unit stride inner
    // dst strided too: a transposed view of a fresh buffer.
    const Tensor buf = empty({7, 6, 30}, d);
    const Tensor dst = buf.permute({2, 1, 0});
    detail::copy_kernel(dst, src);
    dispatch_all(d, "test", [&]<class T>() {
      for (int64_t i = 0; i < src.numel(); ++i) {
        const T s = element<T>(src, i), t = element<T>(dst, i);
        ASSERT_EQ(std::memcmp(&s, &t, sizeof(T)), 0) << d << " element " << i;
      }
    });
    // and a broadcast source into a contiguous destination
    const Tensor row = base.select(0, 2).select(0, 3);  // [40], contiguous
    const Tensor out = empty({5, 40}, d);
    detail::copy_kernel(out, row);
    dispatch_all(d, "test", [&]<class T>() {
      for (int64_t i = 0; i < out.numel(); ++i) {
        const T s = element<T>(row, i % 40), t = element<T>(out, i);
        ASSERT_EQ(std::memcmp(&s, &t, sizeof(T)), 0) << d << " broadcast element " << i;
      }
    });
  }
}

TEST(CpuLoops, CastingCopyIntoAStridedDestination) {
  Generator g(5);
  const Tensor src = randn({33, 17}, DType::Float32, g);
  const Tensor dst = empty({17, 33}, DType::BFloat16).t();
  detail::copy_kernel(dst, src);
  for (int64_t i = 0; i < src.numel(); ++i)
    ASSERT_EQ(element<bfloat16>(dst, i).x, bfloat16(element<float>(src, i)).x) << "element " << i;
}

TEST(CpuLoops, SumOverLeadingDimsMatchesFloat64) {
  // A bias gradient: [B, L, N] summed over B and L, for N around the 256-column block size.
  for (DType d : {DType::Float32, DType::BFloat16, DType::Float64}) {
    for (int64_t N : {1, 7, 256, 300, 1030}) {
      Generator g(6);
      const Tensor x = randn({4, 37, N}, DType::Float32, g).to(d);
      const Tensor s = sum(x, {0, 1});
      ASSERT_EQ(s.sizes(), Shape({N}));
      std::vector<double> ref(static_cast<std::size_t>(N), 0.0);
      const std::vector<double> xv = mixprec::testing::to_doubles(x);
      for (int64_t r = 0; r < 4 * 37; ++r)
        for (int64_t m = 0; m < N; ++m) ref[static_cast<std::size_t>(m)] += xv[static_cast<std::size_t>(r * N + m)];
      const double tol = d == DType::BFloat16 ? 1e-2 : d == DType::Float32 ? 1e-6 : 1e-12;
      EXPECT_LT(mixprec::testing::rel_error(s, ref), tol) << d << " N " << N;
      // keepdim and a single leading dim take the same path
      EXPECT_EQ(sum(x, {0}, true).sizes(), Shape({1, 37, N}));
    }
  }
}

TEST(CpuLoops, SumOverLeadingDimsHasTheSameGradient) {
  Generator g(7);
  Tensor x = randn({3, 4, 5}, DType::Float64, g);
  x.requires_grad_();
  const auto r = gradcheck([](const std::vector<Tensor>& in) { return sum(in[0], {0, 1}); }, {x});
  EXPECT_TRUE(r.ok) << r.message;
}
