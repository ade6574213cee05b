#pragma once
// 8-bit floats of the OCP 8-bit Floating Point spec (OFP8 v1.0), bit-compatible with CUDA's
// __nv_fp8_e4m3 / __nv_fp8_e5m2 and PyTorch's float8_e4m3fn / float8_e5m2:
//   float8_e4m3fn  S.EEEE.MMM, bias 7:  no infinities, NaN = S.1111.111 only, max 448, min subnormal 2^-9.
//   float8_e5m2    S.EEEEE.MM, bias 15: IEEE-like (inf S.11111.00, NaNs S.11111.{01,10,11}), max 57344.
// A storage format only (as in PyTorch): values compute in float.
//
// Encoding from float is round-to-nearest-even in one of two modes (OCP's "saturation" choice):
//   Fp8Saturate::No  (the default, what PyTorch's .to(float8) does): a value that rounds beyond
//     max is NaN for E4M3FN (it has no inf) and inf for E5M2; inf is NaN / inf likewise.
//   Fp8Saturate::Yes (what fp8 training quantizes with, CUDA's __NV_SATFINITE, PTX .satfinite,
//     TransformerEngine): a value that rounds beyond max, and +-inf, become +-max.
// NaN stays NaN in both modes, with its sign: S.1111.111 (E4M3FN) and S.11111.11 (E5M2), as PyTorch.
#include <bit>
#include <cstdint>
#include <limits>
#include <ostream>

#include "mixprec/core/config.hpp"

namespace mixprec {

enum class Fp8Saturate : bool { No = false, Yes = true };

namespace detail {

// The two formats differ only in these numbers; one encoder and one decoder serve both.
struct Fp8Format {
  int mant_bits;     // 3 (E4M3FN) or 2 (E5M2)
  int bias;          // 7 or 15
  uint32_t max_mag;  // bits of the largest finite magnitude: 0x7e (448) or 0x7b (57344)
  uint32_t ovf_mag;  // what overflow gives without saturation: 0x7f (NaN) or 0x7c (inf)
  uint32_t nan_mag;  // the NaN produced: 0x7f for both
};
inline constexpr Fp8Format kE4M3FN{3, 7, 0x7eu, 0x7fu, 0x7fu};
inline constexpr Fp8Format kE5M2{2, 15, 0x7bu, 0x7cu, 0x7fu};

// Integer-only, so it holds under any FPU mode (FTZ/DAZ, -ffast-math), like float_to_half_bits.
MIXPREC_HOST_DEVICE constexpr uint8_t float_to_fp8_bits(float f, Fp8Format fmt, Fp8Saturate sat) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 24) & 0x80u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint8_t>(sign | fmt.nan_mag);
  const uint32_t ovf = sat == Fp8Saturate::Yes ? fmt.max_mag : fmt.ovf_mag;
  if (a == 0x7f800000u) return static_cast<uint8_t>(sign | ovf);
  const int m = fmt.mant_bits;
  const uint32_t e = a >> 23;                        // biased float exponent
  const uint32_t e_min = static_cast<uint32_t>(128 - fmt.bias);  // float exponent of fp8's smallest normal
  uint32_t r;
  if (e >= e_min) {
    // Normal in fp8: rebias, then round the low 23 - m bits half-to-even; a carry moves into the
    // exponent, which is what the encoding needs. Far above max the result is large but not wrapped.
    const uint32_t shift = static_cast<uint32_t>(23 - m);
    if (e > e_min + 40) return static_cast<uint8_t>(sign | ovf);  // keeps the rebias below from wrapping
    const uint32_t rebased = a - ((e_min - 1) << 23);
    const uint32_t odd = (rebased >> shift) & 1u;
    r = (rebased + ((1u << (shift - 1)) - 1u) + odd) >> shift;
  } else {
    // Subnormal (or zero) in fp8: the significand with its hidden bit in units of fp8's smallest
    // subnormal, 2^(1 - bias - m). Float subnormals (e == 0) are far below that: they round to 0.
    if (e == 0 || e + static_cast<uint32_t>(m) + 2 < e_min) return static_cast<uint8_t>(sign);
    const uint32_t sig = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = static_cast<uint32_t>(23 - m) + (e_min - e);  // 24 - m .. 23 + 2
    r = sig >> shift;
    const uint32_t rem = sig & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
  }
  if (r > fmt.max_mag) r = ovf;
  return static_cast<uint8_t>(sign | r);
}

// Exact (every fp8 value is a float). NaN decodes to a quiet float NaN with the sign kept.
MIXPREC_HOST_DEVICE constexpr float fp8_bits_to_float(uint8_t b, Fp8Format fmt) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t mag = b & 0x7fu;
  const int m = fmt.mant_bits;
  if (mag > fmt.max_mag) {
    if (mag == fmt.ovf_mag && fmt.ovf_mag != fmt.nan_mag) return std::bit_cast<float>(sign | 0x7f800000u);  // E5M2 inf
    return std::bit_cast<float>(sign | 0x7fc00000u);
  }
  const uint32_t exp = mag >> m;
  const uint32_t mant = mag & ((1u << m) - 1u);
  if (exp == 0) {
    // mant * 2^(1 - bias - m): at least 2^-17, a normal float, so exact under FTZ as well.
    const float v = static_cast<float>(mant) * std::bit_cast<float>(static_cast<uint32_t>(127 + 1 - fmt.bias - m) << 23);
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(v));
  }
  return std::bit_cast<float>(sign | ((exp + static_cast<uint32_t>(127 - fmt.bias)) << 23) | (mant << (23 - m)));
}

// One struct per format; the format's constants come from Fmt.
template <const Fp8Format& Fmt>
struct alignas(1) float8_base {
  uint8_t x = 0;

  float8_base() = default;
  struct from_bits_t {};
  MIXPREC_HOST_DEVICE constexpr float8_base(uint8_t bits, from_bits_t) : x(bits) {}
  MIXPREC_HOST_DEVICE static constexpr float8_base from_bits(uint8_t bits) { return float8_base(bits, from_bits_t{}); }
  // Explicit rounding mode; the converting constructors below do not saturate (as PyTorch).
  MIXPREC_HOST_DEVICE static constexpr float8_base from_float(float f, Fp8Saturate sat) {
    return from_bits(float_to_fp8_bits(f, Fmt, sat));
  }

  MIXPREC_HOST_DEVICE constexpr float8_base(float f) : x(float_to_fp8_bits(f, Fmt, Fp8Saturate::No)) {}
  // double -> float -> fp8, as PyTorch: the float rounding can create a tie the double had not.
  MIXPREC_HOST_DEVICE constexpr float8_base(double d) : float8_base(static_cast<float>(d)) {}
  template <class I>
    requires std::is_integral_v<I>
  MIXPREC_HOST_DEVICE constexpr float8_base(I i) : float8_base(static_cast<float>(i)) {}
  MIXPREC_HOST_DEVICE constexpr operator float() const { return fp8_bits_to_float(x, Fmt); }

  MIXPREC_HOST_DEVICE constexpr bool isinf() const { return Fmt.ovf_mag != Fmt.nan_mag && (x & 0x7fu) == Fmt.ovf_mag; }
  MIXPREC_HOST_DEVICE constexpr bool isnan() const { return (x & 0x7fu) > Fmt.max_mag && !isinf(); }
};

}  // namespace detail

using float8_e4m3fn = detail::float8_base<detail::kE4M3FN>;
using float8_e5m2 = detail::float8_base<detail::kE5M2>;

static_assert(sizeof(float8_e4m3fn) == 1 && sizeof(float8_e5m2) == 1);

// Comparison and printing through float; no arithmetic operators: fp8 is not computed in (the
// autocast quantizes into it and GEMMs read it), so an accidental `a + b` in fp8 does not compile.
template <const detail::Fp8Format& F>
MIXPREC_HOST_DEVICE bool operator==(detail::float8_base<F> a, detail::float8_base<F> b) { return float(a) == float(b); }
template <const detail::Fp8Format& F>
MIXPREC_HOST_DEVICE bool operator<(detail::float8_base<F> a, detail::float8_base<F> b) { return float(a) < float(b); }
template <const detail::Fp8Format& F>
inline std::ostream& operator<<(std::ostream& os, detail::float8_base<F> v) { return os << float(v); }

}  // namespace mixprec

namespace std {
template <const mixprec::detail::Fp8Format& F>
class numeric_limits<mixprec::detail::float8_base<F>> {
  using T = mixprec::detail::float8_base<F>;
  static constexpr bool e4m3 = F.mant_bits == 3;

 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = !e4m3;
  static constexpr bool has_quiet_NaN = true;
  static constexpr bool has_signaling_NaN = false;
  static constexpr float_denorm_style has_denorm = denorm_present;
  static constexpr bool has_denorm_loss = false;
  static constexpr float_round_style round_style = round_to_nearest;
  static constexpr bool is_iec559 = false;
  static constexpr bool is_bounded = true;
  static constexpr bool is_modulo = false;
  static constexpr int digits = F.mant_bits + 1;
  static constexpr int digits10 = 0;
  static constexpr int max_digits10 = e4m3 ? 3 : 2;
  static constexpr int radix = 2;
  static constexpr int min_exponent = 2 - F.bias;
  static constexpr int min_exponent10 = e4m3 ? -1 : -4;
  static constexpr int max_exponent = e4m3 ? 9 : 16;
  static constexpr int max_exponent10 = e4m3 ? 2 : 4;
  static constexpr bool traps = false;
  static constexpr bool tinyness_before = false;
  static constexpr T min() noexcept { return T::from_bits(static_cast<uint8_t>(1u << F.mant_bits)); }
  static constexpr T lowest() noexcept { return T::from_bits(static_cast<uint8_t>(0x80u | F.max_mag)); }
  static constexpr T max() noexcept { return T::from_bits(static_cast<uint8_t>(F.max_mag)); }
  static constexpr T epsilon() noexcept { return T::from_bits(static_cast<uint8_t>((F.bias - F.mant_bits) << F.mant_bits)); }
  static constexpr T round_error() noexcept { return T::from_bits(static_cast<uint8_t>((F.bias - 1) << F.mant_bits)); }
  static constexpr T infinity() noexcept { return T::from_bits(static_cast<uint8_t>(F.ovf_mag)); }  // E4M3FN: NaN, as has_infinity says
  static constexpr T quiet_NaN() noexcept { return T::from_bits(static_cast<uint8_t>(F.nan_mag)); }
  static constexpr T signaling_NaN() noexcept { return T::from_bits(static_cast<uint8_t>(F.nan_mag)); }
  static constexpr T denorm_min() noexcept { return T::from_bits(0x01); }
};
}  // namespace std
