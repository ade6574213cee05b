#pragma once
// bfloat16: the top half of a float32, bit-compatible with CUDA's __nv_bfloat16.
#include "mixprec/dtype/half.hpp"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace mixprec {
namespace detail {

// Round-to-nearest-even on the integer bits; subnormals are kept (not flushed).
// NaN: sign and top payload bits kept, quiet bit (0x40) set -- as PyTorch and vcvtneps2bf16 do.
MIXPREC_HOST_DEVICE constexpr uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  const uint32_t rounding_bias = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding_bias) >> 16);
}

MIXPREC_HOST_DEVICE constexpr float bfloat16_bits_to_float(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace detail

struct alignas(2) bfloat16 {
  uint16_t x = 0;

  bfloat16() = default;
  struct from_bits_t {};
  MIXPREC_HOST_DEVICE constexpr bfloat16(uint16_t bits, from_bits_t) : x(bits) {}
  MIXPREC_HOST_DEVICE static constexpr bfloat16 from_bits(uint16_t bits) { return bfloat16(bits, from_bits_t{}); }

  MIXPREC_HOST_DEVICE constexpr bfloat16(float f) : x(detail::float_to_bfloat16_bits(f)) {}
  MIXPREC_HOST_DEVICE constexpr bfloat16(double d) : bfloat16(static_cast<float>(d)) {}
  template <class I>
    requires std::is_integral_v<I>
  MIXPREC_HOST_DEVICE constexpr bfloat16(I i) : bfloat16(static_cast<float>(i)) {}
  MIXPREC_HOST_DEVICE constexpr operator float() const { return detail::bfloat16_bits_to_float(x); }

#if defined(__CUDACC__)
  MIXPREC_HOST_DEVICE bfloat16(const __nv_bfloat16& h) : x(__bfloat16_as_ushort(h)) {}
  MIXPREC_HOST_DEVICE operator __nv_bfloat16() const { return __ushort_as_bfloat16(x); }
#endif
};

static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == 2);

MIXPREC_16BIT_OPS(bfloat16)

}  // namespace mixprec

namespace std {
template <>
class numeric_limits<mixprec::bfloat16> {
  using B = mixprec::bfloat16;

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
  static constexpr bool is_iec559 = false;
  static constexpr bool is_bounded = true;
  static constexpr bool is_modulo = false;
  static constexpr int digits = 8;
  static constexpr int digits10 = 2;
  static constexpr int max_digits10 = 4;
  static constexpr int radix = 2;
  static constexpr int min_exponent = -125;
  static constexpr int min_exponent10 = -37;
  static constexpr int max_exponent = 128;
  static constexpr int max_exponent10 = 38;
  static constexpr bool traps = false;
  static constexpr bool tinyness_before = false;
  static constexpr B min() noexcept { return B::from_bits(0x0080); }
  static constexpr B lowest() noexcept { return B::from_bits(0xff7f); }
  static constexpr B max() noexcept { return B::from_bits(0x7f7f); }
  static constexpr B epsilon() noexcept { return B::from_bits(0x3c00); }
  static constexpr B round_error() noexcept { return B::from_bits(0x3f00); }
  static constexpr B infinity() noexcept { return B::from_bits(0x7f80); }
  static constexpr B quiet_NaN() noexcept { return B::from_bits(0x7fc0); }
  static constexpr B signaling_NaN() noexcept { return B::from_bits(0x7f80 | 0x0001); }
  static constexpr B denorm_min() noexcept { return B::from_bits(0x0001); }
};
}  // namespace std
