#pragma once
// CPU kernels of the convolutions in ops/conv.hpp, AVX-512 selected at run time (the library is
// built without -march):
// - add: col2im's accumulation; the plain loop compiles to SSE2, 4 floats per add.
// - gather_even / add_even: stride-2 rows of im2col and col2im, scalar element by element else.
// - gemm_abt_bf16: the weight gradient gy[O, n] * cols[K, n]^T, reduction contiguous in both.
//   Through gemm_16bit the second operand is transposed while packing one 32-bit pair at a
//   time, which cost more than the vdpbf16ps products (ResNet-20: n = 25k-100k, K = 9-576);
//   here 16 x 16 blocks of pairs are transposed in registers.
#include <algorithm>
#include <cstdint>

#include "mixprec/backends/cpu/gemm_avx512.hpp"

namespace mixprec::cpu::conv_kernels {

inline bool available() { return mixprec::detail::simd_path_supported(SimdPath::AVX512); }

#if defined(MIXPREC_X86_SIMD)
// dst[0, n) += src[0, n). Requires available().
MIXPREC_TARGET_AVX512 inline void add(const float* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, _mm512_add_ps(_mm512_loadu_ps(dst + k), _mm512_loadu_ps(src + k)));
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    _mm512_mask_storeu_ps(dst + k, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + k), _mm512_maskz_loadu_ps(m, src + k)));
  }
}

// dst[i] = src[2 i] for i < n, 16-bit elements. Only the even elements are read.
MIXPREC_TARGET_AVX512 inline void gather_even(const uint16_t* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const __mmask32 even = static_cast<__mmask32>(0x55555555u & ((uint64_t{1} << (2 * m)) - 1));
    // 32-bit lane j holds (src[2j], src[2j + 1]); vpmovdw keeps the low half, src[2j].
    const __m512i v = _mm512_maskz_loadu_epi16(even, src + 2 * i);
    _mm256_mask_storeu_epi16(dst + i, static_cast<__mmask16>((1u << m) - 1u), _mm512_cvtepi32_epi16(v));
  }
}
// The same for float32.
MIXPREC_TARGET_AVX512 inline void gather_even(const float* src, float* dst, int64_t n) {
  const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const uint64_t even = 0x55555555u & ((uint64_t{1} << (2 * m)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(even), src + 2 * i);
    const __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(even >> 16), src + 2 * i + 16);
    _mm512_mask_storeu_ps(dst + i, static_cast<__mmask16>((1u << m) - 1u), _mm512_permutex2var_ps(a, idx, b));
  }
}
// dst[2 i] += src[i] for i < n. The odd elements of dst are not touched.
MIXPREC_TARGET_AVX512 inline void add_even(const float* src, float* dst, int64_t n) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t m = std::min<int64_t>(8, n - i);
    const __mmask16 even = static_cast<__mmask16>(0x5555u & ((1u << (2 * m)) - 1u));
    const __m512 s = _mm512_castps256_ps512(_mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << m) - 1u), src + i));
    const __m512 v = _mm512_maskz_permutexvar_ps(even, idx, s);
    _mm512_mask_storeu_ps(dst + 2 * i, even, _mm512_add_ps(_mm512_maskz_loadu_ps(even, dst + 2 * i), v));
  }
}

namespace detail {
using avx512::kKC, avx512::kMC, avx512::kMR, avx512::kNC, avx512::kNR;

// out[q * ld + i] = r[i][q] for q < nq: a 16 x 16 transpose of 32-bit lanes (unpack 32, unpack 64,
// then two 128-bit lane shuffles).
MIXPREC_TARGET_GEMM512 inline void transpose16(const __m512i (&r)[16], uint32_t* out, int64_t ld, int64_t nq) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + q], 128-bit lane L: rows 4i..4i+3 of column 4L + q
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i x01 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x44), y01 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x44);
    const __m512i x23 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xee), y23 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xee);
    const __m512i cols[4] = {_mm512_shuffle_i32x4(x01, y01, 0x88), _mm512_shuffle_i32x4(x01, y01, 0xdd),
                             _mm512_shuffle_i32x4(x23, y23, 0x88), _mm512_shuffle_i32x4(x23, y23, 0xdd)};
    for (int L = 0; L < 4; ++L)
      if (4 * L + q < nq) _mm512_store_si512(out + (4 * L + q) * ld, cols[L]);
  }
}

// Rows [0, nr) of bt (ldb apart), elements [k0, k0 + kc) -> panels of kNR rows, each
// ceil(kc/2) x kNR pairs, as pack_b_bf16 lays out B = bt^T; rows past nr and an odd kc's
// missing partner are zero.
MIXPREC_TARGET_GEMM512 inline void pack_bt(const bfloat16* bt, int64_t ldb, int64_t nr, int64_t k0, int64_t kc, uint32_t* out) {
  const int64_t kp = (kc + 1) / 2, full = kc / 2;
  for (int64_t jp = 0; jp < nr; jp += kNR, out += kp * kNR)
    for (int64_t h = 0; h < kNR; h += 16)
      for (int64_t p0 = 0; p0 < kp; p0 += 16) {
        const int64_t nq = std::min<int64_t>(16, kp - p0);
        const __mmask16 m = avx512::detail::lanes(full - p0);
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t row = jp + h + i;
          if (row >= nr) {
            r[i] = _mm512_setzero_si512();
            continue;
          }
          const bfloat16* src = bt + row * ldb + k0 + 2 * p0;
          r[i] = _mm512_maskz_loadu_epi32(m, src);
          if (kc % 2 && p0 + nq == kp)  // the odd last element, its partner zero
            r[i] = _mm512_mask_set1_epi32(r[i], static_cast<__mmask16>(1u << (nq - 1)), src[2 * (nq - 1)].x);
        }
        transpose16(r, out + p0 * kNR + h, kNR, nq);
      }
}

// One thread's tile: C[M, N] (ldc) += A[M, n] * Bt[N, n]^T.
MIXPREC_TARGET_GEMM512BF16 inline void gemm_abt_serial(const bfloat16* a, int64_t lda, const bfloat16* bt, int64_t ldb, float* c, int64_t ldc,
                                                       int64_t M, int64_t N, int64_t n) {
  constexpr int64_t kKP = kKC;  // pairs per block, as gemm_serial_dpbf16
  uint32_t* bpack = static_cast<uint32_t*>(
      avx512::detail::pack_b_buffer().get(sizeof(uint32_t) * kKP * ((std::min(N, kNC) + kNR - 1) / kNR * kNR)));
  uint32_t* apack = static_cast<uint32_t*>(
      avx512::detail::pack_a_buffer().get(sizeof(uint32_t) * kKP * ((std::min(M, kMC) + kMR - 1) / kMR * kMR)));
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    for (int64_t pc = 0; pc < n; pc += 2 * kKP) {
      const int64_t kc = std::min(2 * kKP, n - pc), kp = (kc + 1) / 2;
      pack_bt(bt + jc * ldb, ldb, nc, pc, kc, bpack);
      for (int64_t ic = 0; ic < M; ic += kMC) {
        const int64_t mc = std::min(kMC, M - ic);
        avx512::detail::pack_a(avx512::View<bfloat16>{a, lda, 1}, ic, mc, pc, kc, apack);
        for (int64_t jr = 0; jr < nc; jr += kNR)
          for (int64_t ir = 0; ir < mc; ir += kMR)
            avx512::detail::micro_bf16(kp, apack + ir * kp, bpack + jr * kp, c + (ic + ir) * ldc + jc + jr, ldc, std::min(kMR, mc - ir),
                                       std::min(kNR, nc - jr), true);
      }
    }
  }
}
}  // namespace detail

// C[M, N] (row-major, ldc) += A[M, n] * Bt[N, n]^T for bfloat16 rows (lda, ldb apart), float32
// accumulation. Requires avx512::bf16_dot_available().
inline void gemm_abt_bf16(const bfloat16* a, int64_t lda, const bfloat16* bt, int64_t ldb, float* c, int64_t ldc, int64_t M, int64_t N,
                          int64_t n) {
  if (n == 0) return;
  avx512::detail::parallel_tiles(M, N, n, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    detail::gemm_abt_serial(a + m0 * lda, lda, bt + n0 * ldb, ldb, c + m0 * ldc + n0, ldc, m1 - m0, n1 - n0, n);
  });
}
#else  // no x86 SIMD: the same names so callers compile everywhere; never selected
inline void add(const float* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}
template <class E>
void gather_even(const E* src, E* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[2 * i];
}
inline void add_even(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[2 * i] += src[i];
}
#endif

}  // namespace mixprec::cpu::conv_kernels
