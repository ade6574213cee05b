#pragma once
// The CPU backend's convolutions (the conv_* entries of its kernel table, backends/cpu/kernels.hpp).
// - Channels-last activations of a dtype oneDNN has (float32, bfloat16) go to oneDNN's NHWC
//   kernels when that optional component is linked (backends/cpu/onednn.hpp).
// - Everything else runs the own kernels: im2col + GEMM per group on NCHW (a channels-last
//   operand is reordered first, its result back), 16-bit operands through gemm_16bit.
// Raw AVX-512 pieces of the own kernels, selected at run time (the library is built without -march):
// - add: col2im's accumulation; the plain loop compiles to SSE2, 4 floats per add.
// - gather_even / add_even: stride-2 rows of im2col and col2im, scalar element by element else.
// - gemm_abt_bf16: the weight gradient gy[O, n] * cols[K, n]^T, reduction contiguous in both.
//   Through gemm_16bit the second operand is transposed while packing one 32-bit pair at a
//   time, which cost more than the vdpbf16ps products (ResNet-20: n = 25k-100k, K = 9-576);
//   here 16 x 16 blocks of pairs are transposed in registers.
#include <algorithm>
#include <cstdint>

#include <mutex>

#include "mixprec/backends/cpu/gemm.hpp"
#include "mixprec/backends/cpu/gemm_avx512.hpp"
#include "mixprec/backends/cpu/onednn.hpp"
#include "mixprec/ops/conv.hpp"

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

// The own kernels on NCHW tensors, moved here from the op layer (they use its helpers).
namespace mixprec::cpu::conv_impl {
using namespace ::mixprec::detail;  // ConvGeom, contiguous_raw, dispatch_floating, acc_t, ...

// Below this many GEMM columns Eigen's packing overhead shows: batch samples up to it.
inline constexpr int64_t kConvTargetCols = 512;
// Per-thread column buffer cap (elements) when deciding how many samples to batch.
inline constexpr int64_t kConvWorkspaceElems = int64_t{1} << 23;

struct ConvChunks {
  int64_t nb = 1;     // samples per chunk
  int64_t count = 0;  // chunks
  bool parallel = false;  // chunks across threads (else: one chunk at a time, threads inside)
};

inline ConvChunks plan_conv_chunks(const ConvGeom& g) {
  ConvChunks c;
  if (g.N == 0) return c;
  const int64_t nt = cpu::num_threads();
  const int64_t L = std::max<int64_t>(g.L(), 1);
  int64_t nb = std::max<int64_t>(1, kConvTargetCols / L);
  nb = std::min(nb, std::max<int64_t>(1, kConvWorkspaceElems / std::max<int64_t>(1, g.K() * L)));
  if (nt > 1) nb = std::min(nb, std::max<int64_t>(1, g.N / nt));  // every thread gets a chunk
  nb = std::min(nb, g.N);
  c.nb = nb;
  c.count = (g.N + nb - 1) / nb;
  c.parallel = nt > 1 && c.count >= nt;
  return c;
}

// Runs body(first_chunk, end_chunk, par) over all chunks. par is false when threads already
// split the chunks, true when one caller walks them all (then loops inside may thread).
template <class F>
void for_conv_chunks(const ConvChunks& ch, F&& body) {
  if (ch.count == 0) return;
  if (ch.parallel) cpu::parallel_for(0, ch.count, 1, [&](int64_t b, int64_t e) { body(b, e, false); });
  else body(0, ch.count, true);
}

template <class F>
void maybe_parallel(bool on, int64_t n, int64_t work_per_item, F&& f) {
  if (on) cpu::parallel_for(0, n, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(work_per_item, 1)), f);
  else f(0, n);
}

// With unit strides and OW == W (3x3 pad 1: most layers), row r of one sample's columns is its
// input plane shifted by a constant offset: one copy (or add) over the valid span, the few
// elements that wrapped around a row edge zeroed, instead of a short copy per output row
// (measured: per-row AVX-512 masked copies are no faster at W = 14-28, per-row adds slower).
inline bool conv_shifted_planes(const ConvGeom& g) { return g.SH == 1 && g.SW == 1 && g.OW == g.W; }

// p[oh * OW + ow] = 0 for oh in [hlo, hhi) and ow outside [lo, hi): a column or two, so the
// loops run down columns; along rows the compiler would call memset for every element or two.
template <class S>
void conv_zero_edges(S* p, int64_t OW, int64_t hlo, int64_t hhi, int64_t lo, int64_t hi) {
  for (int64_t ow = 0; ow < lo; ++ow)
    for (int64_t oh = hlo; oh < hhi; ++oh) p[oh * OW + ow] = S(0);
  for (int64_t ow = hi; ow < OW; ++ow)
    for (int64_t oh = hlo; oh < hhi; ++oh) p[oh * OW + ow] = S(0);
}

// dst[i] = src[2 i] for i < n through the AVX-512 kernel of S's width.
template <class S>
void conv_gather_even(const S* src, S* dst, int64_t n) {
  if constexpr (sizeof(S) == 2)
    cpu::conv_kernels::gather_even(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), n);
  else if constexpr (std::is_same_v<S, float>)
    cpu::conv_kernels::gather_even(src, dst, n);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = src[2 * i];
}

// col[r, b*L + l] for group grp of nb samples; x points at the chunk's first sample [nb, C, H, W].
template <class S>
void im2col(const ConvGeom& g, const S* x, int64_t nb, int64_t grp, S* col, bool par) {
  const int64_t L = g.L(), cols = nb * L, K = g.K(), KK = g.KH * g.KW;
  const bool shifted = conv_shifted_planes(g);
  // Stride-2 rows of 16- or 32-bit elements: AVX-512 gathers (backends/cpu/conv.hpp); measured
  // no faster than the scalar loop for rows under 8 outputs (ResNet-20's 14 -> 7 layer).
  const bool vec_even = g.SW == 2 && g.OW >= 8 && sizeof(S) <= 4 && cpu::conv_kernels::available();
  maybe_parallel(par, K, cols, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / KK, i = (r / g.KW) % g.KH, j = r % g.KW;
      const int64_t woff = j * g.DW - g.PW, hoff = i * g.DH - g.PH;
      const auto [lo, hi] = conv_valid_range(woff, g.SW, g.W, g.OW);
      const auto [hlo, hhi] = conv_valid_range(hoff, g.SH, g.H, g.OH);
      const bool empty_rows = hlo >= hhi || lo >= hi;
      for (int64_t b = 0; b < nb; ++b) {
        const S* src = x + (b * g.C + grp * g.Cg() + c) * g.HW();
        S* dst = col + r * cols + b * L;
        if (empty_rows) {
          std::fill(dst, dst + L, S(0));
          continue;
        }
        std::fill(dst, dst + hlo * g.OW, S(0));
        std::fill(dst + hhi * g.OW, dst + L, S(0));
        if (shifted) {
          const int64_t first = hlo * g.OW + lo, last = (hhi - 1) * g.OW + hi, shift = hoff * g.W + woff;
          std::memcpy(dst + first, src + first + shift, static_cast<std::size_t>(last - first) * sizeof(S));
          conv_zero_edges(dst, g.OW, hlo, hhi, lo, hi);
          continue;
        }
        for (int64_t oh = hlo; oh < hhi; ++oh) {
          S* d = dst + oh * g.OW;
          const S* row = src + (oh * g.SH + hoff) * g.W + woff;
          std::fill(d, d + lo, S(0));
          if (g.SW == 1) std::memcpy(d + lo, row + lo, static_cast<std::size_t>(hi - lo) * sizeof(S));
          else if (vec_even) conv_gather_even(row + 2 * lo, d + lo, hi - lo);
          else
            for (int64_t ow = lo; ow < hi; ++ow) d[ow] = row[ow * g.SW];
          std::fill(d + hi, d + g.OW, S(0));
        }
      }
    }
  });
}

// img[b, grp*Cg + c, ...] += the columns of col (the adjoint of im2col; col is scratch and is
// overwritten). Parallel over channels: rows of one channel touch the same pixels.
template <class A>
void col2im(const ConvGeom& g, A* col, int64_t nb, int64_t grp, A* img, bool par) {
  const int64_t L = g.L(), cols = nb * L, KK = g.KH * g.KW;
  // float32 adds take the AVX-512 kernel (backends/cpu/conv.hpp) where the CPU has it.
  const bool shifted = conv_shifted_planes(g), vec_add = std::is_same_v<A, float> && cpu::conv_kernels::available();
  maybe_parallel(par, g.Cg(), cols * KK, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = 0; i < g.KH; ++i)
        for (int64_t j = 0; j < g.KW; ++j) {
          const int64_t r = (c * g.KH + i) * g.KW + j;
          const int64_t woff = j * g.DW - g.PW, hoff = i * g.DH - g.PH;
          const auto [lo, hi] = conv_valid_range(woff, g.SW, g.W, g.OW);
          const auto [hlo, hhi] = conv_valid_range(hoff, g.SH, g.H, g.OH);
          if (hlo >= hhi || lo >= hi) continue;
          for (int64_t b = 0; b < nb; ++b) {
            A* dst = img + (b * g.C + grp * g.Cg() + c) * g.HW();
            A* src = col + r * cols + b * L;
            if (shifted) {
              // Zero the wrapped-around elements, then one add over the shifted span.
              conv_zero_edges(src, g.OW, hlo, hhi, lo, hi);
              const int64_t first = hlo * g.OW + lo, last = (hhi - 1) * g.OW + hi;
              A* d = dst + first + hoff * g.W + woff;
              const A* s = src + first;
              if constexpr (std::is_same_v<A, float>)
                if (vec_add) {
                  cpu::conv_kernels::add(s, d, last - first);
                  continue;
                }
              for (int64_t k = 0; k < last - first; ++k) d[k] += s[k];
              continue;
            }
            for (int64_t oh = hlo; oh < hhi; ++oh) {
              const A* s = src + oh * g.OW;
              A* row = dst + (oh * g.SH + hoff) * g.W + woff;
              if constexpr (std::is_same_v<A, float>)
                if (vec_add && g.SW <= 2) {
                  if (g.SW == 1) cpu::conv_kernels::add(s + lo, row + lo, hi - lo);
                  else cpu::conv_kernels::add_even(s + lo, row + 2 * lo, hi - lo);
                  continue;
                }
              if (g.SW == 1)
                for (int64_t ow = lo; ow < hi; ++ow) row[ow] += s[ow];
              else
                for (int64_t ow = lo; ow < hi; ++ow) row[ow * g.SW] += s[ow];
            }
          }
        }
  });
}

// The chunk's output-side tensor [nb, O, L] as a [O, nb*L] matrix in S. Returns the pointer and
// its row stride; no copy when it already has that layout and type.
template <class T, class S>
std::pair<const S*, int64_t> gather_rows(const ConvGeom& g, const T* y, int64_t n0, int64_t nb, S* buf, bool par) {
  const int64_t L = g.L(), cols = nb * L;
  if constexpr (std::is_same_v<T, S>)
    if (nb == 1) return {y + n0 * g.O * L, L};
  maybe_parallel(par, g.O, cols, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t b = 0; b < nb; ++b) load_acc(y + ((n0 + b) * g.O + o) * L, buf + o * cols + b * L, L);
  });
  return {buf, cols};
}

// The chunk's input-side samples [nb, C, H, W] in S.
template <class T, class S>
const S* load_input(const ConvGeom& g, const T* x, int64_t n0, int64_t nb, S* buf) {
  if constexpr (std::is_same_v<T, S>) return x + n0 * g.C * g.HW();
  else {
    load_acc(x + n0 * g.C * g.HW(), buf, nb * g.C * g.HW());
    return buf;
  }
}

template <class A>
A* workspace(Tensor& t, int64_t n) {
  t = empty({n}, dtype_of<A>);
  return t.data<A>();
}

// The GEMMs below read S -- T itself, or acc_t<T> when 16-bit T is widened -- and write acc_t<T>.
template <class T>
inline constexpr bool conv_reads_16bit = std::is_same_v<T, bfloat16> || std::is_same_v<T, half>;

// C[M, N] (+)= A[M, K] B[K, N] in acc_t<S>: float32/double directly, 16-bit through gemm_16bit.
template <class S>
void conv_gemm(const S* a, int64_t as0, int64_t as1, const S* b, int64_t bs0, int64_t bs1, acc_t<S>* c, int64_t M, int64_t N,
               int64_t K, bool accumulate) {
  if constexpr (conv_reads_16bit<S>) cpu::gemm_16bit<S>(a, as0, as1, b, bs0, bs1, c, M, N, K, accumulate);
  else cpu::gemm<S>(a, as0, as1, b, bs0, bs1, c, M, N, K, accumulate);
}

// y[N, O, OH, OW] = conv(x, w) + bias. w: [O, K] in S; bias: [O] in acc_t<T> or null.
template <class T, class S>
void conv_forward_kernel(const ConvGeom& g, const T* x, const S* w, const acc_t<T>* bias, T* y) {
  using A = acc_t<T>;
  constexpr bool same = std::is_same_v<T, A>, read_x = std::is_same_v<T, S>;
  const ConvChunks ch = plan_conv_chunks(g);
  const int64_t K = g.K(), L = g.L(), Og = g.Og();
  const bool direct_out = same && ch.nb == 1;  // GEMM writes y in place
  const bool skip_cols = g.pointwise() && ch.nb == 1;
  for_conv_chunks(ch, [&](int64_t c0, int64_t c1, bool par) {
    Tensor tx, tc, to;
    S* xbuf = read_x ? nullptr : workspace<S>(tx, ch.nb * g.C * g.HW());
    S* col = skip_cols ? nullptr : workspace<S>(tc, K * ch.nb * L);
    A* obuf = direct_out ? nullptr : workspace<A>(to, Og * ch.nb * L);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t n0 = chunk * ch.nb, nb = std::min(ch.nb, g.N - n0), cols = nb * L;
      const S* xs = load_input<T, S>(g, x, n0, nb, xbuf);
      for (int64_t grp = 0; grp < g.G; ++grp) {
        const S* B = xs + grp * g.Cg() * g.HW();
        if (!skip_cols) {
          im2col(g, xs, nb, grp, col, par);
          B = col;
        }
        const S* Wg = w + grp * Og * K;
        if (direct_out) {
          A* out = reinterpret_cast<A*>(y) + (n0 * g.O + grp * Og) * L;  // same type here
          if (bias)
            for (int64_t o = 0; o < Og; ++o) std::fill(out + o * L, out + (o + 1) * L, bias[grp * Og + o]);
          conv_gemm<S>(Wg, K, 1, B, cols, 1, out, Og, cols, K, bias != nullptr);
          continue;
        }
        conv_gemm<S>(Wg, K, 1, B, cols, 1, obuf, Og, cols, K, false);
        maybe_parallel(par, Og, cols, [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o) {
            A* src = obuf + o * cols;
            if (bias) {
              const A bv = bias[grp * Og + o];
              for (int64_t k = 0; k < cols; ++k) src[k] += bv;
            }
            for (int64_t b = 0; b < nb; ++b) store_acc(src + b * L, y + ((n0 + b) * g.O + grp * Og + o) * L, L);
          }
        });
      }
    }
  });
}

// x[N, C, H, W] = conv's adjoint applied to y[N, O, OH, OW] (+ bias [C], for conv_transpose2d).
// w: [O, K] in S. The columns and the image accumulate in acc_t<T>.
template <class T, class S>
void conv_backward_input_kernel(const ConvGeom& g, const T* y, const S* w, const acc_t<T>* bias, T* x) {
  using A = acc_t<T>;
  constexpr bool same = std::is_same_v<T, A>, read_y = std::is_same_v<T, S>;
  const ConvChunks ch = plan_conv_chunks(g);
  const int64_t K = g.K(), L = g.L(), Og = g.Og(), CHW = g.C * g.HW();
  const bool skip_cols = g.pointwise() && ch.nb == 1;
  for_conv_chunks(ch, [&](int64_t c0, int64_t c1, bool par) {
    Tensor tg, tc, ti;
    S* gbuf = (read_y && ch.nb == 1) ? nullptr : workspace<S>(tg, g.O * ch.nb * L);
    A* col = skip_cols ? nullptr : workspace<A>(tc, K * ch.nb * L);
    A* ibuf = same ? nullptr : workspace<A>(ti, ch.nb * CHW);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t n0 = chunk * ch.nb, nb = std::min(ch.nb, g.N - n0), cols = nb * L;
      const auto [gy, ld] = gather_rows<T, S>(g, y, n0, nb, gbuf, par);
      A* img = same ? reinterpret_cast<A*>(x) + n0 * CHW : ibuf;
      // Start from the bias (or zero): the GEMM / col2im accumulate onto it.
      maybe_parallel(par, nb * g.C, g.HW(), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) std::fill(img + p * g.HW(), img + (p + 1) * g.HW(), bias ? bias[p % g.C] : A(0));
      });
      for (int64_t grp = 0; grp < g.G; ++grp) {
        const S* WgT = w + grp * Og * K;  // read transposed: [K, Og] with strides (1, K)
        if (skip_cols) {
          conv_gemm<S>(WgT, 1, K, gy + grp * Og * ld, ld, 1, img + grp * g.Cg() * g.HW(), K, cols, Og, true);
          continue;
        }
        conv_gemm<S>(WgT, 1, K, gy + grp * Og * ld, ld, 1, col, K, cols, Og, false);
        col2im(g, col, nb, grp, img, par);
      }
      if constexpr (!same) store_acc(ibuf, x + n0 * CHW, nb * CHW);
    }
  });
}

// gw[O, K] (zeroed by the caller) += sum over samples of y_n @ im2col(x_n)^T.
template <class T, class S>
void conv_backward_weight_kernel(const ConvGeom& g, const T* x, const T* y, acc_t<T>* gw) {
  using A = acc_t<T>;
  constexpr bool read_direct = std::is_same_v<T, S>;
  const ConvChunks ch = plan_conv_chunks(g);
  const int64_t K = g.K(), L = g.L(), Og = g.Og();
  const bool skip_cols = g.pointwise() && ch.nb == 1;
  // bfloat16 with vdpbf16ps: the columns are read in place of transposed (backends/cpu/conv.hpp).
  [[maybe_unused]] const bool abt = std::is_same_v<S, bfloat16> && cpu::avx512::bf16_dot_available();
  std::mutex merge;
  for_conv_chunks(ch, [&](int64_t c0, int64_t c1, bool par) {
    Tensor tx, tg, tc, tw;
    S* xbuf = read_direct ? nullptr : workspace<S>(tx, ch.nb * g.C * g.HW());
    S* gbuf = (read_direct && ch.nb == 1) ? nullptr : workspace<S>(tg, g.O * ch.nb * L);
    S* col = skip_cols ? nullptr : workspace<S>(tc, K * ch.nb * L);
    // Threads that split the chunks accumulate privately and merge once.
    const bool private_acc = !par;
    A* acc = gw;
    if (private_acc) {
      acc = workspace<A>(tw, g.O * K);
      std::fill(acc, acc + g.O * K, A(0));
    }
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t n0 = chunk * ch.nb, nb = std::min(ch.nb, g.N - n0), cols = nb * L;
      const S* xs = load_input<T, S>(g, x, n0, nb, xbuf);
      const auto [gy, ld] = gather_rows<T, S>(g, y, n0, nb, gbuf, par);
      for (int64_t grp = 0; grp < g.G; ++grp) {
        const S* B = xs + grp * g.Cg() * g.HW();
        if (!skip_cols) {
          im2col(g, xs, nb, grp, col, par);
          B = col;
        }
#if defined(MIXPREC_X86_SIMD)
        if constexpr (std::is_same_v<S, bfloat16>)
          if (abt) {
            cpu::conv_kernels::gemm_abt_bf16(gy + grp * Og * ld, ld, B, cols, acc + grp * Og * K, K, Og, K, cols);
            continue;
          }
#endif
        conv_gemm<S>(gy + grp * Og * ld, ld, 1, B, 1, cols, acc + grp * Og * K, Og, K, cols, true);
      }
    }
    if (private_acc) {
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t i = 0; i < g.O * K; ++i) gw[i] += acc[i];
    }
  });
}

// A weight or bias as the kernels read it: contiguous, in the compute type.
inline Tensor conv_acc_operand(const Tensor& t) {
  if (!t.defined()) return t;
  return contiguous_raw(as_dtype_raw(t, t.dtype() == DType::Float64 ? DType::Float64 : DType::Float32));
}

template <class T>
const acc_t<T>* acc_ptr(const Tensor& t) {
  return t.defined() ? t.data<acc_t<T>>() : nullptr;
}

// Whether the kernels read this dtype as it is (S = T) rather than widened to float32.
inline bool conv_direct_16bit(DType dt) { return is_low_precision(dt) && cpu::gemm_16bit_available(); }

// y [N, O, OH, OW] NCHW in x's dtype; x contiguous NCHW.
inline Tensor forward(const ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
  Tensor y = empty({g.N, g.O, g.OH, g.OW}, x.dtype());
  if (y.numel() == 0) return y;
  const bool direct = conv_direct_16bit(x.dtype());
  const Tensor xc = contiguous_raw(x), wa = direct ? contiguous_raw(w) : conv_acc_operand(w), ba = conv_acc_operand(b);
  dispatch_floating(x.dtype(), "conv2d", [&]<class T>() {
    if constexpr (conv_reads_16bit<T>)
      if (direct) return conv_forward_kernel<T, T>(g, xc.data<T>(), wa.data<T>(), acc_ptr<T>(ba), y.data<T>());
    conv_forward_kernel<T, acc_t<T>>(g, xc.data<T>(), acc_ptr<T>(wa), acc_ptr<T>(ba), y.data<T>());
  });
  return y;
}

// x [N, C, H, W] NCHW in y's dtype; y contiguous NCHW.
inline Tensor backward_input(const ConvGeom& g, const Tensor& y, const Tensor& w) {
  Tensor x = empty({g.N, g.C, g.H, g.W}, y.dtype());
  if (x.numel() == 0) return x;
  if (g.L() == 0) return x.zero_();  // nothing reaches the input
  const bool direct = conv_direct_16bit(y.dtype());
  const Tensor yc = contiguous_raw(y), wa = direct ? contiguous_raw(w) : conv_acc_operand(w);
  dispatch_floating(y.dtype(), "conv2d_backward", [&]<class T>() {
    if constexpr (conv_reads_16bit<T>)
      if (direct) return conv_backward_input_kernel<T, T>(g, yc.data<T>(), wa.data<T>(), nullptr, x.data<T>());
    conv_backward_input_kernel<T, acc_t<T>>(g, yc.data<T>(), acc_ptr<T>(wa), nullptr, x.data<T>());
  });
  return x;
}

// The weight's gradient [O, C/G, KH, KW] in float32 (float64 for float64); x, y contiguous NCHW.
inline Tensor backward_weight(const ConvGeom& g, const Tensor& x, const Tensor& y) {
  const DType ad = x.dtype() == DType::Float64 ? DType::Float64 : DType::Float32;
  Tensor gw = zeros({g.O, g.Cg(), g.KH, g.KW}, ad);
  if (gw.numel() == 0 || g.N == 0 || g.L() == 0) return gw;
  const bool direct = conv_direct_16bit(x.dtype());
  const Tensor xc = contiguous_raw(x), yc = contiguous_raw(y);
  dispatch_floating(x.dtype(), "conv2d_backward", [&]<class T>() {
    if constexpr (conv_reads_16bit<T>)
      if (direct) return conv_backward_weight_kernel<T, T>(g, xc.data<T>(), yc.data<T>(), gw.data<acc_t<T>>());
    conv_backward_weight_kernel<T, acc_t<T>>(g, xc.data<T>(), yc.data<T>(), gw.data<acc_t<T>>());
  });
  return gw;
}
}  // namespace mixprec::cpu::conv_impl

namespace mixprec::cpu {

// The table's entries: oneDNN for channels-last activations where it has the case, else the own
// kernels on NCHW with the result put back in the caller's layout.
inline Tensor conv_forward(const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
  const bool cl = x.is_contiguous(MemoryFormat::ChannelsLast);
  if (cl && onednn::takes(g, x.dtype()))
    if (Tensor y = onednn::conv_forward(g, x, w, b.defined() ? mixprec::detail::contiguous_raw(b) : b); y.defined()) return y;
  Tensor y = conv_impl::forward(g, x, w, b);
  return cl ? y.contiguous(MemoryFormat::ChannelsLast) : y;
}
inline Tensor conv_backward_input(const mixprec::detail::ConvGeom& g, const Tensor& gy, const Tensor& w) {
  const bool cl = gy.is_contiguous(MemoryFormat::ChannelsLast);
  if (cl && onednn::takes(g, gy.dtype()))
    if (Tensor gx = onednn::conv_backward_input(g, gy, w); gx.defined()) return gx;
  Tensor gx = conv_impl::backward_input(g, gy, w);
  return cl ? gx.contiguous(MemoryFormat::ChannelsLast) : gx;
}
inline Tensor conv_backward_weight(const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& gy) {
  if (x.is_contiguous(MemoryFormat::ChannelsLast) && gy.is_contiguous(MemoryFormat::ChannelsLast) && onednn::takes(g, x.dtype()))
    if (Tensor gw = onednn::conv_backward_weight(g, x, gy); gw.defined()) return gw;
  return conv_impl::backward_weight(g, x, gy);
}

inline void fill_conv_kernels(DeviceKernels& t) {
  t.channels_last = true;
  t.conv_forward = conv_forward;
  t.conv_backward_input = conv_backward_input;
  t.conv_backward_weight = conv_backward_weight;
}

}  // namespace mixprec::cpu
