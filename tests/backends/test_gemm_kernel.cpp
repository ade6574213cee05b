// The packed AVX-512 GEMM (float32, 16-bit converted while packing, bfloat16 with vdpbf16ps)
// against a float64 reference, over tile edges, strides and accumulation; then matmul/linear
// on 16-bit tensors, which now reach the kernel without a float32 copy.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cpu/gemm.hpp>  // the kernels it tests directly (also in the compiled mode)
#include <mixprec/backends/cpu/gemm_avx512.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::rel_error;
namespace a5 = mixprec::cpu::avx512;

namespace {

double rel_err(const std::vector<float>& c, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < c.size(); ++i) {
    if (!std::isfinite(c[i])) return INFINITY;  // NaN never passes
    num += (c[i] - ref[i]) * (c[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Values exactly representable in bfloat16 and float16, so every path sees the same inputs and
// the only error is float32 accumulation.
std::vector<float> values(int64_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(static_cast<int>(s >> 24) - 128) / 64.0f;  // k/64, |k| <= 128
  }
  return v;
}

struct Case {
  int64_t M, N, K;
  bool at, bt, acc;  // A or B stored transposed (column-major); C accumulated onto
};

template <class T>
std::vector<T> store(const std::vector<float>& v, int64_t r, int64_t c, bool transposed) {
  std::vector<T> out(v.size());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) out[transposed ? j * r + i : i * c + j] = static_cast<T>(v[i * c + j]);
  return out;
}

template <class T, class Run>
void check(const Case& t, Run&& run) {
  const auto A = values(t.M * t.K, 1), B = values(t.K * t.N, 2), C0 = values(t.M * t.N, 3);
  std::vector<double> ref(t.M * t.N);
  for (int64_t i = 0; i < t.M; ++i)
    for (int64_t j = 0; j < t.N; ++j) {
      double s = t.acc ? C0[i * t.N + j] : 0.0;
      for (int64_t k = 0; k < t.K; ++k) s += static_cast<double>(A[i * t.K + k]) * B[k * t.N + j];
      ref[i * t.N + j] = s;
    }
  const auto As = store<T>(A, t.M, t.K, t.at), Bs = store<T>(B, t.K, t.N, t.bt);
  const a5::View<T> av{As.data(), t.at ? 1 : t.K, t.at ? t.M : 1}, bv{Bs.data(), t.bt ? 1 : t.N, t.bt ? t.K : 1};
  std::vector<float> c = t.acc ? C0 : std::vector<float>(t.M * t.N, NAN);  // non-accumulating must overwrite
  run(av, bv, c.data());
  EXPECT_LT(rel_err(c, ref), 1e-6) << "M=" << t.M << " N=" << t.N << " K=" << t.K << " at=" << t.at << " bt=" << t.bt << " acc=" << t.acc;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  // Around the 12 x 32 register tile and the 256-deep K block; 300 x 260 splits across threads.
  for (int64_t M : {1, 11, 12, 13, 150, 300})
    for (int64_t N : {1, 31, 32, 33, 70, 260})
      for (int64_t K : {1, 2, 255, 257, 513}) {
        if (M * N * K > 300 * 260 * 257) continue;
        out.push_back({M, N, K, (M + K) % 2 == 1, (N + K) % 3 == 0, (M + N + K) % 2 == 0});
      }
  for (bool at : {false, true})
    for (bool bt : {false, true})
      for (bool acc : {false, true}) out.push_back({37, 45, 300, at, bt, acc});
  return out;
}

#define SKIP_WITHOUT_AVX512() \
  if (!a5::available()) GTEST_SKIP() << "no AVX-512 on this CPU: " << cpu_features_string()

}  // namespace

TEST(GemmAvx512, Float32MatchesFloat64) {
  SKIP_WITHOUT_AVX512();
  for (const Case& t : cases())
    check<float>(t, [&](auto a, auto b, float* c) { a5::gemm<float>(a, b, c, t.N, t.M, t.N, t.K, t.acc); });
}

TEST(GemmAvx512, BFloat16ConvertedWhilePackingMatchesFloat64) {
  SKIP_WITHOUT_AVX512();
  for (const Case& t : cases())
    check<bfloat16>(t, [&](auto a, auto b, float* c) { a5::gemm<bfloat16>(a, b, c, t.N, t.M, t.N, t.K, t.acc); });
}

TEST(GemmAvx512, Float16ConvertedWhilePackingMatchesFloat64) {
  SKIP_WITHOUT_AVX512();
  for (const Case& t : cases())
    check<half>(t, [&](auto a, auto b, float* c) { a5::gemm<half>(a, b, c, t.N, t.M, t.N, t.K, t.acc); });
}

TEST(GemmAvx512, BFloat16DotProductMatchesFloat64) {
  if (!a5::bf16_dot_available()) GTEST_SKIP() << "no avx512_bf16 on this CPU: " << cpu_features_string();
  for (const Case& t : cases())
    check<bfloat16>(t, [&](auto a, auto b, float* c) { a5::gemm_dpbf16(a, b, c, t.N, t.M, t.N, t.K, t.acc); });
}

// Leading dimensions larger than the row: sub-blocks of bigger matrices, as conv and attention pass.
TEST(GemmAvx512, DispatchRespectsLeadingDimensions) {
  const int64_t M = 20, N = 40, K = 30, lda = 35, ldb = 47;
  const auto A = values(M * lda, 4), B = values(K * ldb, 5);
  std::vector<float> c(M * N);
  cpu::gemm<float>(A.data(), lda, 1, B.data(), ldb, 1, c.data(), M, N, K, false);
  std::vector<double> ref(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) ref[i * N + j] += static_cast<double>(A[i * lda + k]) * B[k * ldb + j];
  EXPECT_LT(rel_err(c, ref), 1e-6);
}

TEST(GemmAvx512, NonFiniteInputsPropagate) {
  SKIP_WITHOUT_AVX512();
  std::vector<bfloat16> a(4 * 4, bfloat16(1.0f)), b(4 * 4, bfloat16(1.0f));
  a[5] = bfloat16(INFINITY);  // row 1
  b[2] = bfloat16(NAN);       // column 2
  for (int path = 0; path < 2; ++path) {
    if (path == 1 && !a5::bf16_dot_available()) continue;
    std::vector<float> c(16, 0.0f);
    if (path == 0) a5::gemm<bfloat16>({a.data(), 4, 1}, {b.data(), 4, 1}, c.data(), 4, 4, 4, 4, false);
    else a5::gemm_dpbf16({a.data(), 4, 1}, {b.data(), 4, 1}, c.data(), 4, 4, 4, 4, false);
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < 4; ++j) {
        const float v = c[i * 4 + j];
        if (j == 2) EXPECT_TRUE(std::isnan(v)) << path << " " << i << "," << j;
        else if (i == 1) EXPECT_TRUE(std::isinf(v) && v > 0) << path << " " << i << "," << j;
        else EXPECT_EQ(v, 4.0f) << path << " " << i << "," << j;
      }
  }
}

// matmul/linear on 16-bit tensors: batched, broadcast, transposed operands, fused bias; the
// result is the float64 product rounded once to the 16-bit type.
TEST(GemmAvx512, MatmulAndLinearOn16BitTensorsMatchFloat64) {
  for (DType dt : {DType::BFloat16, DType::Float16}) {
    const double tol = dt == DType::BFloat16 ? 1e-2 : 1e-3;
    const Tensor a = randn({3, 1, 50, 70}).to(dt), b = randn({4, 90, 70}).to(dt);
    const Tensor got = matmul(a, b.transpose(-2, -1));
    EXPECT_EQ(got.dtype(), dt);
    EXPECT_LT(rel_error(got, matmul(a.to(DType::Float64), b.to(DType::Float64).transpose(-2, -1))), tol) << dt;

    const Tensor x = randn({33, 70}).to(dt), w = randn({45, 70}).to(dt), bias = randn({45}).to(dt);
    EXPECT_LT(rel_error(linear(x, w, bias), linear(x.to(DType::Float64), w.to(DType::Float64), bias.to(DType::Float64))), tol) << dt;
  }
}

// A 16-bit linear whose rows span several of matmul's row blocks: every element is the kernel's
// float32 result (bias included) rounded once, exactly as computing all of C and then casting.
TEST(GemmAvx512, SixteenBitLinearRoundsEachRowBlockLikeOneWholeProduct) {
  if (!cpu::gemm_16bit_available()) GTEST_SKIP() << "no 16-bit GEMM kernel on this CPU";
  for (DType dt : {DType::BFloat16, DType::Float16}) {
    const int64_t M = 4000, N = 300, K = 70;  // rows per block: 2^19 / 300 = 1747, so three blocks
    const Tensor x = randn({M, K}).to(dt), w = randn({N, K}).to(dt), bias = randn({N}).to(dt);
    const Tensor got = linear(x, w, bias);
    ASSERT_EQ(got.dtype(), dt);
    dispatch_floating(dt, "test", [&]<class T>() {
      if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
        std::vector<float> c(static_cast<std::size_t>(M * N));
        const Tensor b32 = bias.to(DType::Float32);
        for (int64_t i = 0; i < M; ++i) std::copy(b32.data<float>(), b32.data<float>() + N, c.begin() + i * N);
        cpu::gemm_16bit<T>(x.data<T>(), K, 1, w.data<T>(), 1, K, c.data(), M, N, K, true);
        for (int64_t i = 0; i < M * N; ++i)
          ASSERT_EQ(got.data<T>()[i].x, T(c[static_cast<std::size_t>(i)]).x) << dt << " element " << i;
      }
    });
    EXPECT_LT(rel_error(got, linear(x.to(DType::Float64), w.to(DType::Float64), bias.to(DType::Float64))), mixprec::testing::low_tolerance(dt)) << dt;
  }
}

// round_to is written by the microkernels from their registers on the last K block: bit for bit the
// float32 result rounded once, for one and several K blocks (float32 path: 256 deep, bfloat16 pairs:
// 512), with and without an addend in C, and tiles cut by M and N tails.
TEST(GemmAvx512, RoundToIsTheFloat32ResultRoundedOnce) {
  if (!cpu::gemm_16bit_available()) GTEST_SKIP() << "no 16-bit GEMM kernel on this CPU";
  for (DType dt : {DType::BFloat16, DType::Float16})
    dispatch_floating(dt, "test", [&]<class T>() {
      if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
        for (int64_t K : {70, 600, 1100})
          for (bool acc : {false, true}) {
            const int64_t M = 37, N = 45;
            const Tensor a = randn({M, K}).to(dt), b = randn({K, N}).to(dt), c0 = randn({M, N});
            std::vector<float> ref(c0.data<float>(), c0.data<float>() + M * N), scratch = ref;
            cpu::gemm_16bit<T>(a.data<T>(), K, 1, b.data<T>(), N, 1, ref.data(), M, N, K, acc);
            std::vector<T> out(static_cast<std::size_t>(M * N));
            cpu::gemm_16bit<T>(a.data<T>(), K, 1, b.data<T>(), N, 1, scratch.data(), M, N, K, acc, out.data());
            for (int64_t i = 0; i < M * N; ++i)
              ASSERT_EQ(out[static_cast<std::size_t>(i)].x, T(ref[static_cast<std::size_t>(i)]).x)
                  << dt << " K " << K << " accumulate " << acc << " element " << i;
          }
      }
    });
}

// A bias handed to the GEMM is added to the finished sums, bit for bit as filling C with it and
// accumulating: float32 and both 16-bit paths, with and without round_to, one and several K
// blocks, tiles cut by M and N tails, and K = 0 (the result is the bias).
TEST(GemmAvx512, BiasAsAddendEqualsFillingCFirst) {
  if (!cpu::gemm_16bit_available()) GTEST_SKIP() << "no AVX-512 GEMM kernel on this CPU";
  for (int64_t K : {0, 70, 600, 1100}) {
    const int64_t M = 37, N = 45;
    const Tensor bias = randn({N});
    std::vector<float> filled(static_cast<std::size_t>(M * N));
    for (int64_t i = 0; i < M; ++i) std::copy(bias.data<float>(), bias.data<float>() + N, filled.begin() + i * N);
    {
      const Tensor a = randn({M, K}), b = randn({K, N});
      std::vector<float> ref = filled, got(static_cast<std::size_t>(M * N), NAN);
      cpu::gemm<float>(a.data<float>(), K, 1, b.data<float>(), N, 1, ref.data(), M, N, K, true);
      cpu::gemm<float>(a.data<float>(), K, 1, b.data<float>(), N, 1, got.data(), M, N, K, false, nullptr, bias.data<float>());
      for (int64_t i = 0; i < M * N; ++i) ASSERT_EQ(got[i], ref[i]) << "float32 K " << K << " element " << i;
    }
    for (DType dt : {DType::BFloat16, DType::Float16})
      dispatch_floating(dt, "test", [&]<class T>() {
        if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
          const Tensor a = randn({M, K}).to(dt), b = randn({N, K}).to(dt);  // B a transposed weight, as linear's
          std::vector<float> ref = filled, scratch(static_cast<std::size_t>(M * N), NAN), c(static_cast<std::size_t>(M * N), NAN);
          cpu::gemm_16bit<T>(a.data<T>(), K, 1, b.data<T>(), 1, K, ref.data(), M, N, K, true);
          cpu::gemm_16bit<T>(a.data<T>(), K, 1, b.data<T>(), 1, K, c.data(), M, N, K, false, nullptr, nullptr, bias.data<float>());
          std::vector<T> out(static_cast<std::size_t>(M * N));
          cpu::gemm_16bit<T>(a.data<T>(), K, 1, b.data<T>(), 1, K, scratch.data(), M, N, K, false, out.data(), nullptr, bias.data<float>());
          for (int64_t i = 0; i < M * N; ++i) {
            ASSERT_EQ(c[i], ref[i]) << dt << " K " << K << " element " << i;
            ASSERT_EQ(out[i].x, T(ref[i]).x) << dt << " round_to, K " << K << " element " << i;
          }
        }
      });
  }
  std::vector<float> c(4, 0.0f), b(2, 1.0f);
  EXPECT_THROW(cpu::gemm<float>(b.data(), 1, 1, b.data(), 2, 1, c.data(), 1, 2, 1, true, nullptr, b.data()), Error);
}

// round_to on non-finite sums: NaN stays NaN (quieted), infinities keep their sign -- the bits of
// rounding the float32 result, on both 16-bit paths.
TEST(GemmAvx512, RoundToKeepsNonFiniteResults) {
  if (!cpu::gemm_16bit_available()) GTEST_SKIP() << "no 16-bit GEMM kernel on this CPU";
  for (DType dt : {DType::BFloat16, DType::Float16})
    dispatch_floating(dt, "test", [&]<class T>() {
      if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
        const int64_t M = 13, N = 33, K = 8;
        std::vector<T> a(static_cast<std::size_t>(M * K), T(1.0f)), b(static_cast<std::size_t>(K * N), T(0.5f));
        a[1 * K + 3] = T(INFINITY);   // row 1: +inf
        a[2 * K + 3] = T(-INFINITY);  // row 2: -inf, and NaN where it meets column 5's NaN
        b[3 * N + 5] = T(NAN);
        std::vector<float> ref(static_cast<std::size_t>(M * N)), scratch(ref.size());
        std::vector<T> out(ref.size());
        cpu::gemm_16bit<T>(a.data(), K, 1, b.data(), N, 1, ref.data(), M, N, K, false);
        cpu::gemm_16bit<T>(a.data(), K, 1, b.data(), N, 1, scratch.data(), M, N, K, false, out.data());
        for (int64_t i = 0; i < M * N; ++i) ASSERT_EQ(out[i].x, T(ref[i]).x) << dt << " element " << i;
        EXPECT_TRUE(std::isinf(static_cast<float>(out[1 * N])) && static_cast<float>(out[1 * N]) > 0) << dt;
        EXPECT_TRUE(std::isinf(static_cast<float>(out[2 * N])) && static_cast<float>(out[2 * N]) < 0) << dt;
        EXPECT_TRUE(std::isnan(static_cast<float>(out[2 * N + 5]))) << dt;
      }
    });
}
