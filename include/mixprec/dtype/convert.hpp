#pragma once
// Bulk conversions between dtypes. float <-> half/bfloat16 take a SIMD path chosen at run time;
// every path is bit-identical to the scalar detail::*_bits functions for all inputs, so results
// never depend on the CPU the program lands on.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/core/config.hpp"
#include "mixprec/core/cpu_features.hpp"
#include "mixprec/dtype/dtype.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDA_ARCH__)
#define MIXPREC_X86_SIMD 1
#include <immintrin.h>
#endif

#if defined(MIXPREC_X86_SIMD)
#define MIXPREC_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define MIXPREC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
#endif

namespace mixprec {

enum class SimdPath { Scalar, AVX2, AVX512 };

inline const char* to_string(SimdPath p) {
  switch (p) {
    case SimdPath::AVX512: return "avx512";
    case SimdPath::AVX2: return "avx2";
    case SimdPath::Scalar: break;
  }
  return "scalar";
}

namespace detail {

inline bool simd_path_supported(SimdPath p, const CpuFeatures& f) {
  switch (p) {
    case SimdPath::Scalar: return true;
    case SimdPath::AVX2: return f.avx2 && f.f16c;
    case SimdPath::AVX512: return f.avx512f && f.avx512bw && f.avx512vl && f.f16c;
  }
  return false;
}
inline bool simd_path_supported(SimdPath p) { return simd_path_supported(p, cpu_features()); }

inline SimdPath select_convert_path(const CpuFeatures& f) {
  if (simd_path_supported(SimdPath::AVX512, f)) return SimdPath::AVX512;
  if (simd_path_supported(SimdPath::AVX2, f)) return SimdPath::AVX2;
  return SimdPath::Scalar;
}

// ---- scalar: the definition of the results ----

inline void convert_f32_to_f16_scalar(const float* src, half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half::from_bits(float_to_half_bits(src[i]));
}
inline void convert_f16_to_f32_scalar(const half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i].x);
}
inline void convert_f32_to_bf16_scalar(const float* src, bfloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bfloat16::from_bits(float_to_bfloat16_bits(src[i]));
}
inline void convert_bf16_to_f32_scalar(const bfloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bfloat16_bits_to_float(src[i].x);
}

#if defined(MIXPREC_X86_SIMD)

// The caller must have checked simd_path_supported(); these fault (SIGILL) otherwise.
// F16C is unaffected by MXCSR FTZ/DAZ (checked), so -ffast-math callers get the same bits.

// ---- AVX2 + F16C, 8 lanes, scalar tail ----

MIXPREC_TARGET_AVX2 inline void convert_f32_to_f16_avx2(const float* src, half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  convert_f32_to_f16_scalar(src + i, dst + i, n - i);
}

MIXPREC_TARGET_AVX2 inline void convert_f16_to_f32_avx2(const half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  convert_f16_to_f32_scalar(src + i, dst + i, n - i);
}

// Same integer RNE as float_to_bfloat16_bits: vcvtneps2bf16 would flush subnormal inputs.
MIXPREC_TARGET_AVX2 inline __m256i bf16_round_avx2(__m256i x) {
  const __m256i abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));  // abs >= 0: signed ok
  const __m256i hi = _mm256_srli_epi32(x, 16);
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, bias), 16);
  const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

MIXPREC_TARGET_AVX2 inline void convert_f32_to_bf16_avx2(const float* src, bfloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i r = bf16_round_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    // Lanes hold 0..0xffff, so unsigned saturation is exact; packing the two 128-bit halves
    // keeps element order.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
  convert_f32_to_bf16_scalar(src + i, dst + i, n - i);
}

MIXPREC_TARGET_AVX2 inline void convert_bf16_to_f32_avx2(const bfloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(w, 16));
  }
  convert_bf16_to_f32_scalar(src + i, dst + i, n - i);
}

// ---- AVX-512, 16 lanes, masked tail ----
// Zero-masked forms throughout: GCC 12's unmasked ones warn -Wmaybe-uninitialized (PR105593).
// Full vectors use plain loads/stores (mask 0xffff); only the tail pays for a computed mask.

MIXPREC_TARGET_AVX512 inline __mmask16 tail_mask16(int64_t left) {
  return static_cast<__mmask16>((1u << left) - 1u);  // left in 1..15
}

MIXPREC_TARGET_AVX512 inline void f32_to_f16_block_avx512(const float* src, half* dst, __mmask16 m) {
  const __m256i h =
      _mm512_maskz_cvtps_ph(m, _mm512_maskz_loadu_ps(m, src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_mask_storeu_epi16(dst, m, h);
}
MIXPREC_TARGET_AVX512 inline void convert_f32_to_f16_avx512(const float* src, half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) f32_to_f16_block_avx512(src + i, dst + i, 0xffff);
  if (i < n) f32_to_f16_block_avx512(src + i, dst + i, tail_mask16(n - i));
}

MIXPREC_TARGET_AVX512 inline void f16_to_f32_block_avx512(const half* src, float* dst, __mmask16 m) {
  _mm512_mask_storeu_ps(dst, m, _mm512_maskz_cvtph_ps(m, _mm256_maskz_loadu_epi16(m, src)));
}
MIXPREC_TARGET_AVX512 inline void convert_f16_to_f32_avx512(const half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) f16_to_f32_block_avx512(src + i, dst + i, 0xffff);
  if (i < n) f16_to_f32_block_avx512(src + i, dst + i, tail_mask16(n - i));
}

// Same integer RNE as float_to_bfloat16_bits (see the AVX2 version for why not vcvtneps2bf16).
// The bits of 16 floats' bfloat16 roundings, one per 32-bit lane (lanes outside m zero); also the
// GEMM's epilogue, which rounds its accumulators in registers.
MIXPREC_TARGET_AVX512 inline __m512i bf16_round_avx512(__m512i x, __mmask16 m) {
  const __m512i abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f800000));
  const __m512i hi = _mm512_maskz_srli_epi32(m, x, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  __m512i r = _mm512_maskz_srli_epi32(m, _mm512_add_epi32(x, bias), 16);
  return _mm512_mask_or_epi32(r, is_nan, hi, _mm512_set1_epi32(0x40));
}
MIXPREC_TARGET_AVX512 inline void f32_to_bf16_block_avx512(const float* src, bfloat16* dst, __mmask16 m) {
  // vpmovdw truncates; lanes are < 2^16
  _mm512_mask_cvtepi32_storeu_epi16(dst, m, bf16_round_avx512(_mm512_maskz_loadu_epi32(m, src), m));
}
MIXPREC_TARGET_AVX512 inline void convert_f32_to_bf16_avx512(const float* src, bfloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) f32_to_bf16_block_avx512(src + i, dst + i, 0xffff);
  if (i < n) f32_to_bf16_block_avx512(src + i, dst + i, tail_mask16(n - i));
}

MIXPREC_TARGET_AVX512 inline void bf16_to_f32_block_avx512(const bfloat16* src, float* dst, __mmask16 m) {
  const __m512i w = _mm512_maskz_cvtepu16_epi32(m, _mm256_maskz_loadu_epi16(m, src));
  _mm512_mask_storeu_epi32(dst, m, _mm512_maskz_slli_epi32(m, w, 16));
}
MIXPREC_TARGET_AVX512 inline void convert_bf16_to_f32_avx512(const bfloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) bf16_to_f32_block_avx512(src + i, dst + i, 0xffff);
  if (i < n) bf16_to_f32_block_avx512(src + i, dst + i, tail_mask16(n - i));
}

#else  // no x86 SIMD: same names so callers and tests compile everywhere; never selected

inline void convert_f32_to_f16_avx2(const float* s, half* d, int64_t n) { convert_f32_to_f16_scalar(s, d, n); }
inline void convert_f16_to_f32_avx2(const half* s, float* d, int64_t n) { convert_f16_to_f32_scalar(s, d, n); }
inline void convert_f32_to_bf16_avx2(const float* s, bfloat16* d, int64_t n) { convert_f32_to_bf16_scalar(s, d, n); }
inline void convert_bf16_to_f32_avx2(const bfloat16* s, float* d, int64_t n) { convert_bf16_to_f32_scalar(s, d, n); }
inline void convert_f32_to_f16_avx512(const float* s, half* d, int64_t n) { convert_f32_to_f16_scalar(s, d, n); }
inline void convert_f16_to_f32_avx512(const half* s, float* d, int64_t n) { convert_f16_to_f32_scalar(s, d, n); }
inline void convert_f32_to_bf16_avx512(const float* s, bfloat16* d, int64_t n) { convert_f32_to_bf16_scalar(s, d, n); }
inline void convert_bf16_to_f32_avx512(const bfloat16* s, float* d, int64_t n) { convert_bf16_to_f32_scalar(s, d, n); }

#endif  // MIXPREC_X86_SIMD

template <class S, class D>
using ConvertFn = void (*)(const S*, D*, int64_t);

template <class S, class D>
ConvertFn<S, D> pick_convert(ConvertFn<S, D> scalar, ConvertFn<S, D> avx2, ConvertFn<S, D> avx512) {
  switch (select_convert_path(cpu_features())) {
    case SimdPath::AVX512: return avx512;
    case SimdPath::AVX2: return avx2;
    case SimdPath::Scalar: break;
  }
  return scalar;
}

// Conversion is memory-bound: threads only pay off once the data is well past the caches.
inline constexpr int64_t kConvertParallelThreshold = int64_t{1} << 20;
inline constexpr int64_t kConvertChunk = int64_t{1} << 18;

template <class S, class D>
void run_convert(ConvertFn<S, D> fn, const S* src, D* dst, int64_t n) {
  if (n > kConvertParallelThreshold) {
    cpu::parallel_for(0, n, kConvertChunk, [&](int64_t b, int64_t e) { fn(src + b, dst + b, e - b); });
    return;
  }
  fn(src, dst, n);
}

}  // namespace detail

// Path the fast overloads below use in this process (fixed at first use).
inline SimdPath convert_path() {
  static const SimdPath p = detail::select_convert_path(cpu_features());
  return p;
}

// Non-template, so overload resolution prefers them to the generic template below.
inline void convert(const float* src, half* dst, int64_t n) {
  static const auto fn = detail::pick_convert<float, half>(
      detail::convert_f32_to_f16_scalar, detail::convert_f32_to_f16_avx2, detail::convert_f32_to_f16_avx512);
  detail::run_convert(fn, src, dst, n);
}
inline void convert(const half* src, float* dst, int64_t n) {
  static const auto fn = detail::pick_convert<half, float>(
      detail::convert_f16_to_f32_scalar, detail::convert_f16_to_f32_avx2, detail::convert_f16_to_f32_avx512);
  detail::run_convert(fn, src, dst, n);
}
inline void convert(const float* src, bfloat16* dst, int64_t n) {
  static const auto fn = detail::pick_convert<float, bfloat16>(
      detail::convert_f32_to_bf16_scalar, detail::convert_f32_to_bf16_avx2, detail::convert_f32_to_bf16_avx512);
  detail::run_convert(fn, src, dst, n);
}
inline void convert(const bfloat16* src, float* dst, int64_t n) {
  static const auto fn = detail::pick_convert<bfloat16, float>(
      detail::convert_bf16_to_f32_scalar, detail::convert_bf16_to_f32_avx2, detail::convert_bf16_to_f32_avx512);
  detail::run_convert(fn, src, dst, n);
}

template <class To, class From>
void convert(const From* src, To* dst, int64_t n) {
  // Explicit convert<half, float>(...) calls land here: route them to the fast paths too.
  constexpr bool fast = (std::is_same_v<From, float> && (std::is_same_v<To, half> || std::is_same_v<To, bfloat16>)) ||
                        (std::is_same_v<To, float> && (std::is_same_v<From, half> || std::is_same_v<From, bfloat16>));
  if constexpr (fast) {
    convert(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<To, bool>) dst[i] = static_cast<acc_t<From>>(src[i]) != 0;
      else dst[i] = static_cast<To>(static_cast<acc_t<From>>(src[i]));
    }
  }
}

}  // namespace mixprec
