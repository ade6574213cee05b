// float8_e4m3fn / float8_e5m2 against the OCP 8-bit floating point spec (OFP8 v1.0): all 256
// patterns of each format decoded against the spec's formula, and every one of the 2^32 float
// patterns encoded in both modes (saturating and not) against a reference that shares no code
// with the library: the nearest of the format's values found by midpoints computed in double,
// ties to the even pattern, turned into a table of float-bit ranges so the 2^34 checks stay cheap.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "mixprec/dtype/float8.hpp"
#include "dtype/float_sweep.hpp"

namespace fp8_test {  // named: this file shares a unity build with test_conversion.cpp

using mixprec::Fp8Saturate;
using mixprec::float8_e4m3fn;
using mixprec::float8_e5m2;

// The spec's parameters, written out here rather than taken from the library.
struct Spec {
  int exp_bits, mant_bits, bias;
  bool has_inf;  // E5M2: S.11111.00 is inf, S.11111.xx NaN; E4M3FN: only S.1111.111 is NaN
};
constexpr Spec kE4M3{4, 3, 7, false};
constexpr Spec kE5M2{5, 2, 15, true};

enum class Kind { Finite, Inf, NaN };

// value = (-1)^s 2^(e - bias) (1 + m / 2^k), subnormals (e = 0) (-1)^s 2^(1 - bias) (m / 2^k).
Kind spec_decode(const Spec& sp, unsigned b, double& value) {
  const unsigned s = b >> 7, e = (b >> sp.mant_bits) & ((1u << sp.exp_bits) - 1), m = b & ((1u << sp.mant_bits) - 1);
  const unsigned e_all = (1u << sp.exp_bits) - 1, m_all = (1u << sp.mant_bits) - 1;
  if (sp.has_inf && e == e_all) {
    value = s ? -INFINITY : INFINITY;
    return m == 0 ? Kind::Inf : Kind::NaN;
  }
  if (!sp.has_inf && e == e_all && m == m_all) return Kind::NaN;
  const double frac = static_cast<double>(m) / static_cast<double>(1u << sp.mant_bits);
  const double mag = e == 0 ? std::ldexp(frac, 1 - sp.bias) : std::ldexp(1.0 + frac, static_cast<int>(e) - sp.bias);
  value = s ? -mag : mag;
  return Kind::Finite;
}

uint32_t fbits(float f) { return std::bit_cast<uint32_t>(f); }

template <class F8>
void check_decode_all(const Spec& sp) {
  int finite = 0, nans = 0, infs = 0;
  for (unsigned b = 0; b < 256; ++b) {
    double want = 0;
    const Kind k = spec_decode(sp, b, want);
    const float got = float(F8::from_bits(static_cast<uint8_t>(b)));
    SCOPED_TRACE(::testing::Message() << "pattern 0x" << std::hex << b);
    switch (k) {
      case Kind::NaN:
        ++nans;
        EXPECT_TRUE(std::isnan(got));
        EXPECT_EQ(std::signbit(got), (b & 0x80) != 0);
        EXPECT_TRUE(F8::from_bits(static_cast<uint8_t>(b)).isnan());
        break;
      case Kind::Inf:
        ++infs;
        EXPECT_EQ(static_cast<double>(got), want);
        EXPECT_TRUE(F8::from_bits(static_cast<uint8_t>(b)).isinf());
        break;
      case Kind::Finite:
        ++finite;
        EXPECT_EQ(static_cast<double>(got), want);
        EXPECT_EQ(std::signbit(got), (b & 0x80) != 0);  // -0 keeps its sign
        EXPECT_FALSE(F8::from_bits(static_cast<uint8_t>(b)).isnan());
        break;
    }
  }
  if (sp.has_inf) {
    EXPECT_EQ(nans, 6);  // S.11111.{01,10,11}
    EXPECT_EQ(infs, 2);
  } else {
    EXPECT_EQ(nans, 2);  // S.1111.111 only
    EXPECT_EQ(infs, 0);
  }
  EXPECT_EQ(finite + nans + infs, 256);
}

TEST(Float8, DecodesAll256PatternsAsTheSpecDefines) {
  check_decode_all<float8_e4m3fn>(kE4M3);
  check_decode_all<float8_e5m2>(kE5M2);
}

TEST(Float8, SpecConstantsAndLimits) {
  using L4 = std::numeric_limits<float8_e4m3fn>;
  using L5 = std::numeric_limits<float8_e5m2>;
  EXPECT_EQ(float(L4::max()), 448.0f);
  EXPECT_EQ(float(L4::lowest()), -448.0f);
  EXPECT_EQ(float(L4::min()), std::ldexp(1.0f, -6));
  EXPECT_EQ(float(L4::denorm_min()), std::ldexp(1.0f, -9));
  EXPECT_EQ(float(L4::epsilon()), 0.125f);
  EXPECT_FALSE(L4::has_infinity);
  EXPECT_TRUE(std::isnan(float(L4::quiet_NaN())));
  EXPECT_EQ(float(L5::max()), 57344.0f);
  EXPECT_EQ(float(L5::min()), std::ldexp(1.0f, -14));
  EXPECT_EQ(float(L5::denorm_min()), std::ldexp(1.0f, -16));
  EXPECT_EQ(float(L5::epsilon()), 0.25f);
  EXPECT_EQ(float(L5::infinity()), INFINITY);
  EXPECT_EQ(float(L4::round_error()), 0.5f);
  EXPECT_EQ(float(L5::round_error()), 0.5f);
  EXPECT_EQ(sizeof(float8_e4m3fn), 1u);
  EXPECT_EQ(sizeof(float8_e5m2), 1u);
  // The default conversion does not saturate, as PyTorch's .to(torch.float8_e4m3fn).
  EXPECT_TRUE(float8_e4m3fn(500.0f).isnan());
  EXPECT_EQ(float8_e4m3fn(464.0f).x, 0x7e);  // the tie between 448 and (480) goes to the even 448
  EXPECT_EQ(float8_e4m3fn::from_float(1e9f, Fp8Saturate::Yes).x, 0x7e);
  EXPECT_EQ(float8_e4m3fn::from_float(-INFINITY, Fp8Saturate::Yes).x, 0xfe);
  EXPECT_EQ(float8_e5m2(61440.0f).x, 0x7c);  // the tie between 57344 and 65536 goes to even: inf
  EXPECT_EQ(float8_e5m2(-INFINITY).x, 0xfc);
  EXPECT_EQ(float8_e5m2::from_float(INFINITY, Fp8Saturate::Yes).x, 0x7b);
  EXPECT_EQ(float8_e5m2(0.1).x, float8_e5m2(0.1f).x);
  EXPECT_EQ(float(float8_e4m3fn(3)), 3.0f);
}

// ---- the reference encoder: a table of float-bit ranges of |x| and the magnitude each encodes to ----

struct Segment {
  uint32_t start;  // first |x| bit pattern of the range
  uint8_t mag;
};

std::vector<Segment> reference_segments(const Spec& sp, Fp8Saturate sat) {
  // The format's non-negative finite values in increasing order (their patterns increase too),
  // then the value the next pattern would have with an unbounded exponent: the overflow candidate.
  std::vector<double> v;
  std::vector<unsigned> code;
  for (unsigned b = 0; b < 128; ++b) {
    double d = 0;
    if (spec_decode(sp, b, d) != Kind::Finite) break;
    v.push_back(d);
    code.push_back(b);
  }
  const unsigned max_code = code.back();
  const unsigned next = max_code + 1;
  v.push_back(std::ldexp(1.0 + static_cast<double>(next & ((1u << sp.mant_bits) - 1)) / (1u << sp.mant_bits),
                         static_cast<int>(next >> sp.mant_bits) - sp.bias));
  code.push_back(next);
  const unsigned nan_code = 0x7f;
  const unsigned overflow = sat == Fp8Saturate::Yes ? max_code : sp.has_inf ? next : nan_code;
  auto result = [&](unsigned c) { return static_cast<uint8_t>(c == next ? overflow : c); };

  std::vector<Segment> seg{{0u, result(code[0])}};
  for (std::size_t k = 0; k + 1 < v.size(); ++k) {
    const double mid = (v[k] + v[k + 1]) / 2;  // exact: one bit more than the format has
    const float midf = static_cast<float>(mid);
    EXPECT_EQ(static_cast<double>(midf), mid);
    const unsigned tie = (code[k] & 1u) == 0 ? code[k] : code[k + 1];
    seg.push_back({fbits(midf), result(tie)});
    seg.push_back({fbits(midf) + 1, result(code[k + 1])});
  }
  const unsigned inf_code = sat == Fp8Saturate::Yes ? max_code : sp.has_inf ? next : nan_code;
  seg.push_back({0x7f800000u, static_cast<uint8_t>(inf_code)});
  seg.push_back({0x7f800001u, static_cast<uint8_t>(nan_code)});
  return seg;
}

// The segment holding |x| = a, starting the walk at seg[i].
inline std::size_t advance(const std::vector<Segment>& seg, std::size_t i, uint32_t a) {
  while (i + 1 < seg.size() && seg[i + 1].start <= a) ++i;
  return i;
}

TEST(Float8, ReferenceTableAgreesWithSpotValues) {
  // The reference itself, checked on values whose encodings are known from the spec's tables.
  const auto e4 = reference_segments(kE4M3, Fp8Saturate::No);
  auto lookup = [](const std::vector<Segment>& s, float x) {
    return s[advance(s, 0, fbits(x) & 0x7fffffffu)].mag;
  };
  EXPECT_EQ(lookup(e4, 1.0f), 0x38);
  EXPECT_EQ(lookup(e4, 448.0f), 0x7e);
  EXPECT_EQ(lookup(e4, 470.0f), 0x7f);
  EXPECT_EQ(lookup(e4, std::ldexp(1.0f, -10)), 0x00);  // half the smallest subnormal: tie to 0
  EXPECT_EQ(lookup(e4, std::ldexp(1.5f, -10)), 0x01);
  const auto e5s = reference_segments(kE5M2, Fp8Saturate::Yes);
  EXPECT_EQ(lookup(e5s, 1e30f), 0x7b);
  EXPECT_EQ(lookup(e5s, INFINITY), 0x7b);
  EXPECT_EQ(lookup(e5s, 1.0f), 0x3c);
}

// Every float, both formats, both modes: 2^34 encodings, threaded; each thread walks its chunk
// in increasing |x| so the reference costs one comparison per input. Under the sanitizers every
// MIXPREC_TEST_FLOAT_STRIDE-th chunk and the special exponents' (dtype/float_sweep.hpp).
TEST(Float8, EncodesEveryFloatInBothModesAsTheReference) {
  const std::vector<Segment> ref[4] = {reference_segments(kE4M3, Fp8Saturate::No), reference_segments(kE4M3, Fp8Saturate::Yes),
                                       reference_segments(kE5M2, Fp8Saturate::No), reference_segments(kE5M2, Fp8Saturate::Yes)};
  constexpr int64_t kChunks = float_sweep::kNumChunks;  // of 2^20 patterns each
  const int64_t stride = float_sweep::chunk_stride();
  int64_t mismatches = 0;
  uint64_t first_bad = ~uint64_t{0};
#pragma omp parallel for schedule(dynamic, 16) reduction(+ : mismatches)
  for (int64_t c = 0; c < kChunks; ++c) {
    if (!float_sweep::chunk_selected(c, stride)) continue;
    const uint32_t begin = static_cast<uint32_t>(c) << 20;  // one sign per chunk: |x| increases along it
    std::size_t pos[4];
    for (int f = 0; f < 4; ++f) pos[f] = advance(ref[f], 0, begin & 0x7fffffffu);
    int64_t bad = 0;
    uint64_t bad_at = ~uint64_t{0};
    for (uint32_t i = 0; i < (1u << 20); ++i) {
      const uint32_t u = begin + i;
      const uint32_t a = u & 0x7fffffffu;
      const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
      const float x = std::bit_cast<float>(u);
      uint8_t want[4];
      for (int f = 0; f < 4; ++f) {
        pos[f] = advance(ref[f], pos[f], a);
        want[f] = static_cast<uint8_t>(sign | ref[f][pos[f]].mag);
      }
      const uint8_t got[4] = {float8_e4m3fn::from_float(x, Fp8Saturate::No).x, float8_e4m3fn::from_float(x, Fp8Saturate::Yes).x,
                              float8_e5m2::from_float(x, Fp8Saturate::No).x, float8_e5m2::from_float(x, Fp8Saturate::Yes).x};
      for (int f = 0; f < 4; ++f)
        if (got[f] != want[f]) {
          ++bad;
          bad_at = std::min<uint64_t>(bad_at, (uint64_t{u} << 2) | static_cast<uint64_t>(f));
        }
    }
    mismatches += bad;
    if (bad) {
#pragma omp critical
      first_bad = std::min(first_bad, bad_at);
    }
  }
  EXPECT_EQ(mismatches, 0) << "first: float bits 0x" << std::hex << (first_bad >> 2) << " in encoding #" << (first_bad & 3)
                           << " (0 e4m3fn, 1 e4m3fn saturating, 2 e5m2, 3 e5m2 saturating)";
}

// Decoding then encoding gives the pattern back for every non-NaN pattern (NaNs: a NaN).
TEST(Float8, RoundTripsEveryPattern) {
  for (unsigned b = 0; b < 256; ++b) {
    const auto p4 = float8_e4m3fn::from_bits(static_cast<uint8_t>(b));
    const auto p5 = float8_e5m2::from_bits(static_cast<uint8_t>(b));
    if (p4.isnan()) EXPECT_TRUE(float8_e4m3fn(float(p4)).isnan());
    else EXPECT_EQ(float8_e4m3fn(float(p4)).x, b);
    if (p5.isnan()) EXPECT_TRUE(float8_e5m2(float(p5)).isnan());
    else EXPECT_EQ(float8_e5m2(float(p5)).x, b);
  }
}

}  // namespace fp8_test
