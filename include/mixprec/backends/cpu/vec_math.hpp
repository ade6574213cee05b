#pragma once
// Branch-free float32 exp, erf and tanh for the CPU element-wise kernels. libm's expf/erff/tanhf
// are calls, so a loop over them stays scalar; these are plain arithmetic, bit casts and selects,
// so GCC inlines them into the AVX-512/AVX2 loops of cpu::map and cpu::simd (simd.hpp) and vectorises them
// (16 lanes), and the same code is the portable path. No FMA is assumed (the vector loops are
// compiled with fp-contract=off so every CPU gets the same bits): the polynomials are accurate
// without one.
//
// Accuracy against a float64 reference, max over all 2^32 float32 inputs (subnormal results in
// units of the subnormal spacing; the AVX-512 and portable paths give the same bits): exp 0.952
// ulp, erf 1.382 ulp, tanh 1.330 ulp. tests/ops/test_activation.cpp (VecMath) holds them to 1, 2
// and 2 ulp on a sweep, and gelu / gelu_grad (below) to their measured bounds.
// exp overflows to inf above 88.72 and flushes to +0 below -103.97 as expf; erf saturates to
// +-1 and tanh to +-1; NaN propagates through every function.
//
// The coefficients are Chebyshev interpolants (computed in long double, rounded to float) of:
// exp: (e^r - 1 - r) / r^2 on |r| <= ln2/2; erf: erf(x)/x - 1 in s = x^2 on |x| <= 0.9277 and
// log(erfc(t)) on 0.9277 <= t <= 3.92 (erf(t) rounds to 1 beyond); tanh: (tanh(x) - x)/x^3 in
// s = x^2 on |x| <= 0.625 (above it, 1 - 2 / (e^2|x| + 1) loses under a bit to cancellation).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "mixprec/backends/cpu/simd.hpp"
#include "mixprec/dtype/convert.hpp"

namespace mixprec::cpu::vec {

namespace detail {
// Horner's rule over float coefficients, highest degree last.
template <std::size_t N>
inline float poly(float x, const float (&c)[N]) {
  float r = c[N - 1];
  for (std::size_t i = N - 1; i-- > 0;) r = r * x + c[i];
  return r;
}
inline float abs(float x) { return std::bit_cast<float>(std::bit_cast<uint32_t>(x) & 0x7fffffffu); }
// |mag| with the sign of s.
inline float with_sign_of(float mag, float s) {
  return std::bit_cast<float>((std::bit_cast<uint32_t>(mag) & 0x7fffffffu) | (std::bit_cast<uint32_t>(s) & 0x80000000u));
}
}  // namespace detail

// e^x = 2^n e^r with n = round(x / ln2), r = x - n ln2 (Cody-Waite, ln2 split in two so n ln2_hi
// is exact). 2^n is applied as two factors so that results in the subnormal range round once.
inline float exp(float x) {
  constexpr float kLog2e = 0x1.715476p+0f, kLn2Hi = 0x1.62e4p-1f, kLn2Lo = 0x1.7f7d1cp-20f;
  constexpr float kRound = 0x1.8p23f;  // adding it rounds |v| < 2^22 to an integer in the low bits
  constexpr float c[] = {0x1p-1f, 0x1.555556p-3f, 0x1.5554eap-5f, 0x1.1110ep-7f, 0x1.6d432p-10f, 0x1.a124eep-13f};
  // Clamped so n stays in [-152, 129]: 89 overflows and -105 rounds to +0, as the true values
  // do. The comparisons are false for NaN, which passes through.
  x = x > 89.0f ? 89.0f : x;
  x = x < -105.0f ? -105.0f : x;
  const float k = x * kLog2e + kRound;
  const float n = k - kRound;
  const int32_t ni = static_cast<int32_t>(std::bit_cast<uint32_t>(k) - std::bit_cast<uint32_t>(kRound));
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  const float p = 1.0f + (r + r * r * detail::poly(r, c));
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const float s1 = std::bit_cast<float>(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = std::bit_cast<float>(static_cast<uint32_t>(n2 + 127) << 23);
  return p * s1 * s2;
}

// erf(x) = x + x P(x^2) for |x| <= 0.9277; 1 - e^{Q(|x|)} with the sign of x above (Q
// approximates log erfc, so the exp carries the steep decay and the polynomial stays smooth).
inline float erf(float x) {
  constexpr float kSplit = 0.927734375f, kSat = 3.92f;
  constexpr float p[] = {0x1.06eba6p-3f, -0x1.8126e4p-2f, 0x1.ce1a26p-4f, -0x1.b685fap-6f, 0x1.471578p-8f, -0x1.39659cp-11f};
  constexpr float q[] = {0x1.730ed4p-12f, -0x1.2161fep+0f, -0x1.43501cp-1f, -0x1.c49bb8p-4f, 0x1.b5e6p-6f,
                         -0x1.414cep-8f,  0x1.4f71aep-11f, -0x1.c5cafp-15f, 0x1.4dd28cp-19f, -0x1.4d9f9cp-25f};
  const float a = detail::abs(x);
  const float small = x + x * detail::poly(x * x, p);
  const float t = a > kSat ? kSat : a;  // NaN stays NaN
  const float large = detail::with_sign_of(1.0f - vec::exp(detail::poly(t, q)), x);
  return a <= kSplit ? small : large;
}

// tanh(x) = x + x^3 P(x^2) for |x| < 0.625, else 1 - 2 / (e^{2|x|} + 1) with the sign of x
// (e^{2|x|} = inf for large |x| gives exactly 1).
inline float tanh(float x) {
  constexpr float p[] = {-0x1.555556p-2f, 0x1.1110eap-3f, -0x1.ba08c4p-5f, 0x1.64a976p-6f, -0x1.116a16p-7f, 0x1.2c83cp-9f};
  const float a = detail::abs(x);
  const float s = x * x;
  const float small = detail::with_sign_of(x + x * s * detail::poly(s, p), x);  // keeps tanh(-0) = -0
  const float large = detail::with_sign_of(1.0f - 2.0f / (vec::exp(2.0f * a) + 1.0f), x);
  return a < 0.625f ? small : large;
}

// GELU (the erf form) and its derivative with one exp and no cancellation. With t = |x|/sqrt2,
// erfc(t) = e^{-t^2} S(u), S the scaled complementary error function in u = 1/(1 + t/2): smooth
// and bounded, so a polynomial of degree 11 (a Chebyshev interpolant on t in [0, 10.5], where
// e^{-t^2} reaches float32's subnormals) carries it. Then Phi(x) = 1 - h for x >= 0 and h below,
// h = e^{-x^2/2} S / 2: gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x e^{-x^2/2} / sqrt(2 pi), the
// same exp. Against 0.5 x (1 + erf(x/sqrt2)) this saves erf's second branch and, in the
// derivative, a second exp, and it keeps Phi's relative accuracy for x < 0, where 1 + erf cancels.
namespace detail {
// h = e^{-x^2/2} S(u) / 2 and e = e^{-x^2/2}.
inline float gelu_tail(float x, float& e) {
  constexpr float s[] = {0x1.99978ep-18f, 0x1.20aeb4p-2f, 0x1.232ff0p-2f,  0x1.d7b2a8p-3f, 0x1.027930p-2f,  -0x1.2d08f8p-3f,
                         0x1.d12f48p-2f,  -0x1.3d981ep-1f, 0x1.274d94p-2f, 0x1.5832a2p-6f, -0x1.ecd274p-5f, 0x1.e387dep-7f};
  const float u = 1.0f / (1.0f + abs(x) * 0x1.6a09e6p-2f);  // t/2 = |x| / (2 sqrt2)
  e = vec::exp(-0.5f * (x * x));
  return 0.5f * (e * poly(u, s));
}
}  // namespace detail
inline float gelu(float x) {
  float e;
  const float h = detail::gelu_tail(x, e);
  return x * (x >= 0.0f ? 1.0f - h : h);  // NaN propagates through h
}
inline float gelu_grad(float x) {
  float e;
  const float h = detail::gelu_tail(x, e);
  return (x >= 0.0f ? 1.0f - h : h) + x * (e * 0x1.988454p-2f);  // 1/sqrt(2 pi)
}

// Reduction over n elements with 16 independent partials, so it vectorises without -ffast-math
// (which reordering one running sum or max would need); step(acc, i) folds element i into a
// partial, combine folds the partials at the end.
template <class A, class Step, class Combine>
MIXPREC_SIMD_BODY inline A reduce(int64_t n, A init, Step step, Combine combine) {
  constexpr int64_t kLanes = 16;
  A acc[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) acc[k] = init;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] = step(acc[k], i + k);
  for (; i < n; ++i) acc[0] = step(acc[0], i);
  A r = acc[0];
  for (int64_t k = 1; k < kLanes; ++k) r = combine(r, acc[k]);
  return r;
}
template <class A>
A sum(const A* p, int64_t n) {
  return reduce<A>(n, A(0), [p](A a, int64_t i) { return a + p[i]; }, [](A a, A b) { return a + b; });
}
// The larger of a and b, ignoring a NaN b (as std::max(a, b)); a select, so it vectorises.
template <class A>
MIXPREC_SIMD_BODY inline A max_of(A a, A b) {
  return b > a ? b : a;
}

// A contiguous run of T as A: the data itself when T == A, else converted into buf (SIMD for
// 16-bit). store_row writes a run computed in A back (nothing to do when it was computed in place).
template <class T, class A>
const A* load_row(const T* p, int64_t n, std::vector<A>& buf) {
  if constexpr (std::is_same_v<T, A>) {
    return p;
  } else {
    convert(p, buf.data(), n);
    return buf.data();
  }
}
template <class T, class A>
void store_row(const A* v, T* p, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if (v != p) std::copy(v, v + n, p);
  } else {
    convert(v, p, n);
  }
}

// out = exp(in) over a contiguous run, for the softmax-like kernels: float takes exp() above (exact
// zeros for masked -inf logits, vectorised), double std::exp.
template <class A>
void act_exp(const A* in, A* out, int64_t n) {
  if constexpr (std::is_same_v<A, float>) {
    simd([&]() MIXPREC_SIMD_BODY {
      for (int64_t i = 0; i < n; ++i) out[i] = vec::exp(in[i]);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::exp(in[i]);
  }
}

}  // namespace mixprec::cpu::vec
