#pragma once
// IEEE binary16, bit-compatible with CUDA's __half (alignas(2), one uint16_t).
// Arithmetic goes through float: 16-bit values are a storage format, float is the compute format.
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <ostream>

#include "mixprec/core/config.hpp"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace mixprec {
namespace detail {

// Round-to-nearest-even, integer-only so it holds under any FPU mode (FTZ/DAZ, -ffast-math).
// NaN: sign kept, quiet bit set, top 9 payload bits kept -- what x86 F16C (vcvtps2ph) produces.
MIXPREC_HOST_DEVICE constexpr uint16_t float_to_half_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                                // below 2^-14: subnormal half
    const uint32_t e = a >> 23;
    if (e < 102) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t r = (a - (112u << 23) + 0xfffu + odd) >> 13;
  return static_cast<uint16_t>(sign | r);
}

// Exact. NaN: payload kept, quiet bit set (as x86 F16C vcvtph2ps does).
MIXPREC_HOST_DEVICE constexpr float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits = 0;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      uint32_t e = 113;  // normalise the subnormal
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

}  // namespace detail

struct alignas(2) half {
  uint16_t x = 0;

  half() = default;
  struct from_bits_t {};
  MIXPREC_HOST_DEVICE constexpr half(uint16_t bits, from_bits_t) : x(bits) {}
  MIXPREC_HOST_DEVICE static constexpr half from_bits(uint16_t bits) { return half(bits, from_bits_t{}); }

  MIXPREC_HOST_DEVICE constexpr half(float f) : x(0) {
#if defined(__CUDA_ARCH__)
    x = __half_as_ushort(__float2half_rn(f));
#else
    x = detail::float_to_half_bits(f);
#endif
  }
  MIXPREC_HOST_DEVICE constexpr half(double d) : half(static_cast<float>(d)) {}
  template <class I>
    requires std::is_integral_v<I>
  MIXPREC_HOST_DEVICE constexpr half(I i) : half(static_cast<float>(i)) {}

  MIXPREC_HOST_DEVICE constexpr operator float() const {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(x));
#else
    return detail::half_bits_to_float(x);
#endif
  }

#if defined(__CUDACC__)
  MIXPREC_HOST_DEVICE half(const __half& h) : x(__half_as_ushort(h)) {}
  MIXPREC_HOST_DEVICE operator __half() const { return __ushort_as_half(x); }
#endif
};

static_assert(sizeof(half) == 2 && alignof(half) == 2);

#define MIXPREC_16BIT_OPS(T)                                                                          \
  MIXPREC_HOST_DEVICE T operator+(T a, T b) { return T(float(a) + float(b)); }                       \
  MIXPREC_HOST_DEVICE T operator-(T a, T b) { return T(float(a) - float(b)); }                       \
  MIXPREC_HOST_DEVICE T operator*(T a, T b) { return T(float(a) * float(b)); }                       \
  MIXPREC_HOST_DEVICE T operator/(T a, T b) { return T(float(a) / float(b)); }                       \
  MIXPREC_HOST_DEVICE T operator-(T a) { return T::from_bits(static_cast<uint16_t>(a.x ^ 0x8000u)); } \
  MIXPREC_HOST_DEVICE T& operator+=(T& a, T b) { return a = a + b; }                                 \
  MIXPREC_HOST_DEVICE T& operator-=(T& a, T b) { return a = a - b; }                                 \
  MIXPREC_HOST_DEVICE T& operator*=(T& a, T b) { return a = a * b; }                                 \
  MIXPREC_HOST_DEVICE T& operator/=(T& a, T b) { return a = a / b; }                                 \
  MIXPREC_HOST_DEVICE bool operator==(T a, T b) { return float(a) == float(b); }                     \
  MIXPREC_HOST_DEVICE bool operator<(T a, T b) { return float(a) < float(b); }                       \
  MIXPREC_HOST_DEVICE bool operator>(T a, T b) { return float(a) > float(b); }                       \
  MIXPREC_HOST_DEVICE bool operator<=(T a, T b) { return float(a) <= float(b); }                     \
  MIXPREC_HOST_DEVICE bool operator>=(T a, T b) { return float(a) >= float(b); }                     \
  inline std::ostream& operator<<(std::ostream& os, T v) { return os << float(v); }

MIXPREC_16BIT_OPS(half)

}  // namespace mixprec

namespace std {
template <>
class numeric_limits<mixprec::half> {
  using H = mixprec::half;

 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr bool has_signaling_NaN = true;
  static constexpr float_denorm_style has_denorm = denorm_present;
  static constexpr bool has_denorm_loss = false;
  static constexpr float_round_style round_style = round_to_nearest;
  static constexpr bool is_iec559 = true;
  static constexpr bool is_bounded = true;
  static constexpr bool is_modulo = false;
  static constexpr int digits = 11;
  static constexpr int digits10 = 3;
  static constexpr int max_digits10 = 5;
  static constexpr int radix = 2;
  static constexpr int min_exponent = -13;
  static constexpr int min_exponent10 = -4;
  static constexpr int max_exponent = 16;
  static constexpr int max_exponent10 = 4;
  static constexpr bool traps = false;
  static constexpr bool tinyness_before = false;
  static constexpr H min() noexcept { return H::from_bits(0x0400); }
  static constexpr H lowest() noexcept { return H::from_bits(0xfbff); }
  static constexpr H max() noexcept { return H::from_bits(0x7bff); }
  static constexpr H epsilon() noexcept { return H::from_bits(0x1400); }
  static constexpr H round_error() noexcept { return H::from_bits(0x3800); }
  static constexpr H infinity() noexcept { return H::from_bits(0x7c00); }
  static constexpr H quiet_NaN() noexcept { return H::from_bits(0x7e00); }
  static constexpr H signaling_NaN() noexcept { return H::from_bits(0x7d00); }
  static constexpr H denorm_min() noexcept { return H::from_bits(0x0001); }
};
}  // namespace std
