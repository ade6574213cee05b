#pragma once
// Packed float32-accumulating GEMM for AVX-512 CPUs, selected at run time. The library is built
// without -march, so Eigen's kernels are compiled for SSE2 only; this one carries its own target
// attributes. BLIS loop order: B in KC x NC blocks, A in MC x KC blocks, a 12 x 32 register
// tile (24 zmm accumulators). 16-bit inputs are converted while packing, so they cost no
// separate float32 copy.
//
// bfloat16 x bfloat16 has a second microkernel on vdpbf16ps (avx512_bf16): k in pairs, two
// products per lane per instruction. Products of bfloat16 values are exact in float32, so it
// only differs from the float32 path by summation order and by flushing subnormals; on the
// development CPU (Zen 5) it runs 1.7-2x the float32 kernel's rate (benchmarks/NOTES.md).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/dtype/convert.hpp"

#if defined(MIXPREC_X86_SIMD)
#define MIXPREC_TARGET_GEMM512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define MIXPREC_TARGET_GEMM512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))
#endif

namespace mixprec::cpu::avx512 {

inline constexpr int64_t kMR = 12, kNR = 32;  // register tile
inline constexpr int64_t kKC = 256;           // B micro-panel kKC x kNR floats = 32 KiB: L1
inline constexpr int64_t kMC = 144;           // A block kMC x kKC floats = 144 KiB: L2
inline constexpr int64_t kNC = 2048;          // B block kKC x kNC floats = 2 MiB: L3

// A hook run on each finished tile of the final result -- the 16-bit output, or C for float32 --
// while the tile is still in L1: `tile` is its first element (the result's leading dimension),
// mr x nr of it. linear's fused activations (backends/cpu/linalg.hpp) are such hooks, so an
// activation costs no pass over memory and the GEMM knows nothing of them.
struct TileEpilogue {
  void (*fn)(const void* ctx, void* tile, int64_t mr, int64_t nr) = nullptr;
  const void* ctx = nullptr;
  void operator()(void* tile, int64_t mr, int64_t nr) const { fn(ctx, tile, mr, nr); }
};

inline bool available() { return mixprec::detail::simd_path_supported(SimdPath::AVX512) && cpu_features().fma; }
inline bool bf16_dot_available() { return available() && cpu_features().avx512_bf16; }

// Strided read-only matrix view: element (r, c) at p[r * s0 + c * s1].
template <class T>
struct View {
  const T* p;
  int64_t s0, s1;
  const T& at(int64_t r, int64_t c) const { return p[r * s0 + c * s1]; }
};

namespace detail {

// 64-byte aligned per-thread packing buffers, grown on demand and kept.
struct PackBuffer {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> mem;
  std::size_t bytes = 0;
  void* get(std::size_t n) {
    if (n > bytes) {
      n = (n + 63) / 64 * 64;
      mem.reset(std::aligned_alloc(64, n));
      MIXPREC_CHECK(mem != nullptr, "gemm: cannot allocate a ", n, "-byte packing buffer");
      bytes = n;
    }
    return mem.get();
  }
};
inline PackBuffer& pack_a_buffer() {
  thread_local PackBuffer b;
  return b;
}
inline PackBuffer& pack_b_buffer() {
  thread_local PackBuffer b;
  return b;
}

#if defined(MIXPREC_X86_SIMD)

MIXPREC_TARGET_GEMM512 inline float to_f32(float v) { return v; }
MIXPREC_TARGET_GEMM512 inline float to_f32(bfloat16 v) { return mixprec::detail::bfloat16_bits_to_float(v.x); }
MIXPREC_TARGET_GEMM512 inline float to_f32(half v) { return _cvtsh_ss(v.x); }

// 16 consecutive elements (lanes past `m` zero) as float32.
MIXPREC_TARGET_GEMM512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MIXPREC_TARGET_GEMM512 inline __m512 load16(const bfloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
MIXPREC_TARGET_GEMM512 inline __m512 load16(const half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

MIXPREC_TARGET_GEMM512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1u);
}

// B[k0:k0+kc, j0:j0+nc] -> panels of kNR columns, each kc x kNR, zero-padded past nc.
// Rows contiguous: each row is read from start to end, panel after panel (as pack_b_bf16).
template <class T>
MIXPREC_TARGET_GEMM512 void pack_b(View<T> b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  if (b.s1 == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      const T* row = &b.at(k0 + k, j0);
      float* o = out + k * kNR;
      for (int64_t jp = 0; jp < nc; jp += kNR, o += kc * kNR) {
        const int64_t w = std::min(kNR, nc - jp);
        _mm512_store_ps(o, load16(row + jp, lanes(w)));
        _mm512_store_ps(o + 16, load16(row + jp + 16, lanes(w - 16)));
      }
    }
    return;
  }
  for (int64_t jp = 0; jp < nc; jp += kNR, out += kc * kNR) {
    const int64_t w = std::min(kNR, nc - jp);
    for (int64_t j = 0; j < kNR; ++j)
      for (int64_t k = 0; k < kc; ++k) out[k * kNR + j] = j < w ? to_f32(b.at(k0 + k, j0 + jp + j)) : 0.0f;
  }
}

// One row of an A panel as float32: out[k * kMR] = row[k * s1] for k < kc.
template <class T>
MIXPREC_TARGET_GEMM512 void pack_a_row(const T* row, int64_t s1, int64_t kc, float* out) {
  if (s1 == 1) {
    for (int64_t k = 0; k < kc; k += 16) {
      alignas(64) float t[16];
      _mm512_store_ps(t, load16(row + k, lanes(kc - k)));
      const int64_t n = std::min<int64_t>(16, kc - k);
      for (int64_t q = 0; q < n; ++q) out[(k + q) * kMR] = t[q];
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) out[k * kMR] = to_f32(row[k * s1]);
  }
}

inline uint32_t bf16_pair(const bfloat16* lo, const bfloat16* hi) {
  return static_cast<uint32_t>(lo ? lo->x : 0) | (static_cast<uint32_t>(hi ? hi->x : 0) << 16);
}
inline uint32_t load_pair(const bfloat16* p) {  // p[0], p[1] adjacent in memory
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One row of an A panel as bfloat16 pairs (vdpbf16ps): out[p * kMR] = (row[2p], row[2p + 1]) for
// p < ceil(kc / 2), the odd k's partner zero.
inline void pack_a_row(const bfloat16* row, int64_t s1, int64_t kc, uint32_t* out) {
  const int64_t kp = (kc + 1) / 2;
  int64_t p = 0;
  if (s1 == 1)  // rows contiguous: a pair is one 32-bit load
    for (; 2 * p + 1 < kc; ++p) out[p * kMR] = load_pair(row + 2 * p);
  for (; p < kp; ++p) out[p * kMR] = bf16_pair(row + 2 * p * s1, 2 * p + 1 < kc ? row + (2 * p + 1) * s1 : nullptr);
}

// Pairs 2 p0 .. 2 p0 + 31 of up to 16 bfloat16 rows (n of them; row i at rows[i], unit stride) as
// 32-bit pairs transposed: out[q * ld + i] = (rows[i][2 (p0 + q)], rows[i][2 (p0 + q) + 1]) for
// q < 16, i < n. One 16 x 16 transpose of 32-bit lanes in registers (unpack, then 128-bit
// shuffles) instead of 16 n scalar loads and stores: packing a bfloat16 panel from rows (A as
// activations, B as a transposed weight) was 11% of a GPT-mini bf16 step.
MIXPREC_TARGET_GEMM512 inline void transpose_pairs16(const bfloat16* const* rows, int n, int64_t p0, uint32_t* out, int64_t ld) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < n ? _mm512_loadu_si512(rows[i] + 2 * p0) : _mm512_setzero_si512();
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // lane L of r[4k + j]: column 4L + j of rows 4k .. 4k + 3
    r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  for (int j = 0; j < 4; ++j) {
    const __m512i x0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), y0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    const __m512i x1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), y1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    _mm512_mask_storeu_epi32(out + j * ld, m, _mm512_shuffle_i32x4(x0, x1, 0x88));
    _mm512_mask_storeu_epi32(out + (4 + j) * ld, m, _mm512_shuffle_i32x4(y0, y1, 0x88));
    _mm512_mask_storeu_epi32(out + (8 + j) * ld, m, _mm512_shuffle_i32x4(x0, x1, 0xdd));
    _mm512_mask_storeu_epi32(out + (12 + j) * ld, m, _mm512_shuffle_i32x4(y0, y1, 0xdd));
  }
}

// A[i0:i0+mc, k0:k0+kc] -> panels of kMR rows, zero-padded past mc, for either kernel: float32
// (P = float, each panel kc x kMR) or bfloat16 pairs (P = uint32_t, each ceil(kc/2) x kMR).
// A stored by columns (a.s0 == 1, as g^T in a linear layer's weight gradient): a panel's kMR
// rows at one k are adjacent, so each k (each pair of k's) is one or two masked vector loads,
// not kMR strided gathers. Lanes past h (the panel's rows) are zero, as the padding wants.
template <class T, class P>
MIXPREC_TARGET_GEMM512 void pack_a_by_columns(View<T> a, int64_t i0, int64_t h, int64_t k0, int64_t kc, P* out) {
  const __mmask16 m = lanes(h), panel = lanes(kMR);
  if constexpr (std::is_same_v<P, uint32_t>) {  // bfloat16 pairs: (A[i][2p], A[i][2p + 1])
    for (int64_t p = 0; 2 * p < kc; ++p) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, &a.at(i0, k0 + 2 * p)));
      const __m512i hi = 2 * p + 1 < kc ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, &a.at(i0, k0 + 2 * p + 1)))
                                        : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(out + p * kMR, panel, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) _mm512_mask_storeu_ps(out + k * kMR, panel, load16(&a.at(i0, k0 + k), m));
  }
}

template <class T, class P>
MIXPREC_TARGET_GEMM512 void pack_a(View<T> a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, P* out) {
  const int64_t depth = std::is_same_v<P, uint32_t> ? (kc + 1) / 2 : kc;
  const bool by_columns = a.s0 == 1 && a.s1 != 1;
  for (int64_t ip = 0; ip < mc; ip += kMR, out += depth * kMR) {
    const int64_t h = std::min(kMR, mc - ip);
    if (by_columns) {
      pack_a_by_columns(a, i0 + ip, h, k0, kc, out);
      continue;
    }
    int64_t done = 0;  // pairs already packed for every row of the panel
    if constexpr (std::is_same_v<P, uint32_t>) {
      if (a.s1 == 1) {  // rows contiguous: 16 pairs of all kMR rows at a time
        const bfloat16* rows[kMR];
        for (int64_t i = 0; i < kMR; ++i) rows[i] = &a.at(i0 + ip + std::min(i, h - 1), k0);
        for (; 2 * (done + 16) <= kc; done += 16) transpose_pairs16(rows, static_cast<int>(h), done, out + done * kMR, kMR);
      }
    }
    for (int64_t i = 0; i < kMR; ++i) {
      if (i >= h) {
        for (int64_t k = 0; k < depth; ++k) out[k * kMR + i] = 0;
        continue;
      }
      pack_a_row(&a.at(i0 + ip + i, k0 + 2 * done), a.s1, kc - 2 * done, out + done * kMR + i);
    }
  }
}

// The tile's addend, added to the finished sums: C's rows (from the second K block on, or when
// accumulating) or the bias row (the tile's nr columns of it, as rows with ldc 0, on the first K
// block) -- the order of C = bias, C += A B, without writing the bias into C first.
MIXPREC_TARGET_GEMM512 inline void add_rows(__m512 (&acc)[kMR][2], const float* c, int64_t ldc, int64_t mr, int64_t nr) {
  const __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) {
    if (i >= mr) break;
    acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_maskz_loadu_ps(m0, c + i * ldc));
    acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_maskz_loadu_ps(m1, c + i * ldc + 16));
  }
}

// The end of both microkernels: C[mr x nr] (=|+=) the 12 x 32 accumulator tile.
MIXPREC_TARGET_GEMM512 inline void store_tile(__m512 (&acc)[kMR][2], float* c, int64_t ldc, int64_t mr, int64_t nr, bool add) {
  if (add) add_rows(acc, c, ldc, mr, nr);
  const __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) {
    if (i >= mr) break;
    float* row = c + i * ldc;
    _mm512_mask_storeu_ps(row, m0, acc[i][0]);
    _mm512_mask_storeu_ps(row + 16, m1, acc[i][1]);
  }
}

// 16 accumulators rounded to a 16-bit type and stored (lanes in m).
MIXPREC_TARGET_GEMM512 inline void store_rounded(bfloat16* p, __m512 v, __mmask16 m) {
  _mm512_mask_cvtepi32_storeu_epi16(p, m, mixprec::detail::bf16_round_avx512(_mm512_castps_si512(v), m));
}
MIXPREC_TARGET_GEMM512 inline void store_rounded(half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_maskz_cvtps_ph(m, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The end of a tile's last K block when the caller wants the 16-bit result: (C +) acc rounded
// straight into out (C's layout, leading dimension ldc) -- C itself is not written, so the float32
// result never makes the round trip through memory that a separate rounding pass costs.
template <class T>
MIXPREC_TARGET_GEMM512 void store_tile_rounded(__m512 (&acc)[kMR][2], const float* c, T* out, int64_t ldc, int64_t mr, int64_t nr,
                                               bool add) {
  if (add) add_rows(acc, c, ldc, mr, nr);
  const __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) {
    if (i >= mr) break;
    store_rounded(out + i * ldc, acc[i][0], m0);
    store_rounded(out + i * ldc + 16, acc[i][1], m1);
  }
}

// C[mr x nr] (=|+=) Apanel * Bpanel (+ bias); with out (16-bit T), (C +) the product rounded into out instead.
template <class T = float>
MIXPREC_TARGET_GEMM512 inline void micro_f32(int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c, int64_t ldc,
                                             int64_t mr, int64_t nr, bool add, T* out = nullptr, const TileEpilogue* epi = nullptr,
                                             const float* bias = nullptr) {
  __m512 acc[kMR][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, ap += kMR, bp += kNR) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMR; ++i) {
      const __m512 av = _mm512_set1_ps(ap[i]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  if (bias) add_rows(acc, bias, 0, mr, nr);
  if constexpr (!std::is_same_v<T, float>) {
    if (out) {
      store_tile_rounded(acc, c, out, ldc, mr, nr, add);
      if (epi) (*epi)(out, mr, nr);
      return;
    }
  }
  store_tile(acc, c, ldc, mr, nr, add);
  if (epi) (*epi)(c, mr, nr);
}

// One thread's share: C[M, N] (ldc) (=|+=) A[M, K] * B[K, N] (+ bias[N], with !accumulate). With
// out (16-bit T only), the last K block writes the result rounded into out (C's layout) and leaves
// that part of C alone. epi runs on each tile of the result after its last K block.
template <class T>
MIXPREC_TARGET_GEMM512 void gemm_serial(View<T> a, View<T> b, float* c, int64_t ldc, int64_t M, int64_t N, int64_t K, bool accumulate,
                                        T* out = nullptr, const TileEpilogue* epi = nullptr, const float* bias = nullptr) {
  float* bpack = static_cast<float*>(pack_b_buffer().get(sizeof(float) * kKC * ((std::min(N, kNC) + kNR - 1) / kNR * kNR)));
  float* apack = static_cast<float*>(pack_a_buffer().get(sizeof(float) * kKC * ((std::min(M, kMC) + kMR - 1) / kMR * kMR)));
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    for (int64_t pc = 0; pc < K; pc += kKC) {
      const int64_t kc = std::min(kKC, K - pc);
      const bool add = accumulate || pc > 0, last = pc + kc >= K;
      pack_b(b, pc, kc, jc, nc, bpack);
      for (int64_t ic = 0; ic < M; ic += kMC) {
        const int64_t mc = std::min(kMC, M - ic);
        pack_a(a, ic, mc, pc, kc, apack);
        for (int64_t jr = 0; jr < nc; jr += kNR)
          for (int64_t ir = 0; ir < mc; ir += kMR)
            micro_f32<T>(kc, apack + ir * kc, bpack + jr * kc, c + (ic + ir) * ldc + jc + jr, ldc, std::min(kMR, mc - ir),
                         std::min(kNR, nc - jr), add, last && out ? out + (ic + ir) * ldc + jc + jr : nullptr, last ? epi : nullptr,
                         bias && pc == 0 ? bias + jc + jr : nullptr);
      }
    }
  }
}

// ---- bfloat16 x bfloat16 with vdpbf16ps: k runs in pairs ----

// B[k0:k0+kc, j0:j0+nc] -> panels, each ceil(kc/2) x kNR pairs (b[k][j], b[k+1][j]).
MIXPREC_TARGET_GEMM512BF16 inline void pack_b_bf16(View<bfloat16> b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, uint32_t* out) {
  const int64_t kp = (kc + 1) / 2;
  if (b.s1 == 1) {  // rows contiguous: interleave two rows, 16 columns at a time
    // Each pair of rows is read from start to end, one panel's 32 columns after the other: the
    // two rows stream through memory (panel by panel, every load was another row, and a cache
    // miss the prefetcher did not see coming: most of this function's time).
    for (int64_t p = 0; p < kp; ++p) {
      const bfloat16* r0 = &b.at(k0 + 2 * p, j0);
      const bfloat16* r1 = 2 * p + 1 < kc ? &b.at(k0 + 2 * p + 1, j0) : nullptr;
      uint32_t* o = out + p * kNR;
      for (int64_t jp = 0; jp < nc; jp += kNR, o += kp * kNR) {
        const int64_t w = std::min(kNR, nc - jp);
        for (int64_t h = 0; h < kNR; h += 16) {
          const __mmask16 m = lanes(w - h);
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + jp + h));
          const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + jp + h)) : _mm512_setzero_si512();
          _mm512_store_si512(o + h, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
    }
    return;
  }
  for (int64_t jp = 0; jp < nc; jp += kNR, out += kp * kNR) {
    const int64_t w = std::min(kNR, nc - jp);
    int64_t done = 0;  // pairs already packed for every column of the panel
    if (b.s0 == 1) {   // columns contiguous (a transposed weight): 16 pairs of 16 columns at a time
      const bfloat16* cols[kNR];
      for (int64_t j = 0; j < kNR; ++j) cols[j] = &b.at(k0, j0 + jp + std::min(j, w - 1));
      for (; 2 * (done + 16) <= kc; done += 16)
        for (int64_t h = 0; h < w; h += 16)
          transpose_pairs16(cols + h, static_cast<int>(std::min<int64_t>(16, w - h)), done, out + done * kNR + h, kNR);
    }
    for (int64_t j = 0; j < kNR; ++j) {
      if (j >= w) {
        for (int64_t p = 0; p < kp; ++p) out[p * kNR + j] = 0;
        continue;
      }
      const bfloat16* col = &b.at(k0, j0 + jp + j);
      int64_t p = done;
      if (b.s0 == 1)  // columns contiguous: a pair is one 32-bit load
        for (; 2 * p + 1 < kc; ++p) out[p * kNR + j] = load_pair(col + 2 * p);
      for (; p < kp; ++p) out[p * kNR + j] = bf16_pair(col + 2 * p * b.s0, 2 * p + 1 < kc ? col + (2 * p + 1) * b.s0 : nullptr);
    }
  }
}

// store_tile_rounded for bfloat16 on an avx512_bf16 CPU: vcvtne2ps2bf16 rounds a row's 32 sums
// (round to nearest even, NaN quieted: the software rounding's bits) into one 64-byte store, where
// the portable form takes ~6 integer operations and a narrowing store per 16. The one difference:
// float32 subnormals (|x| < 2^-126) become zero, as vdpbf16ps already treats its inputs.
MIXPREC_TARGET_GEMM512BF16 inline void store_tile_bf16(__m512 (&acc)[kMR][2], const float* c, bfloat16* out, int64_t ldc, int64_t mr,
                                                       int64_t nr, bool add) {
  if (add) add_rows(acc, c, ldc, mr, nr);
  const __mmask32 m = nr >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint32_t{1} << nr) - 1u);
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) {
    if (i >= mr) break;
    _mm512_mask_storeu_epi16(out + i * ldc, m, (__m512i)_mm512_cvtne2ps_pbh(acc[i][1], acc[i][0]));
  }
}

MIXPREC_TARGET_GEMM512BF16 inline void micro_bf16(int64_t kp, const uint32_t* __restrict ap, const uint32_t* __restrict bp, float* c,
                                                  int64_t ldc, int64_t mr, int64_t nr, bool add, bfloat16* out = nullptr,
                                                  const TileEpilogue* epi = nullptr, const float* bias = nullptr) {
  __m512 acc[kMR][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p, ap += kMR, bp += kNR) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bp), b1 = (__m512bh)_mm512_load_si512(bp + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
    }
  }
  if (bias) add_rows(acc, bias, 0, mr, nr);
  if (out) {
    store_tile_bf16(acc, c, out, ldc, mr, nr, add);
    if (epi) (*epi)(out, mr, nr);
    return;
  }
  store_tile(acc, c, ldc, mr, nr, add);
  if (epi) (*epi)(c, mr, nr);
}

MIXPREC_TARGET_GEMM512BF16 inline void gemm_serial_dpbf16(View<bfloat16> a, View<bfloat16> b, float* c, int64_t ldc, int64_t M, int64_t N,
                                                          int64_t K, bool accumulate, bfloat16* out = nullptr,
                                                          const TileEpilogue* epi = nullptr, const float* bias = nullptr) {
  constexpr int64_t kKP = kKC;  // pairs: a kKP x kNR micro-panel of B is the same 32 KiB as float32's
  uint32_t* bpack = static_cast<uint32_t*>(pack_b_buffer().get(sizeof(uint32_t) * kKP * ((std::min(N, kNC) + kNR - 1) / kNR * kNR)));
  uint32_t* apack = static_cast<uint32_t*>(pack_a_buffer().get(sizeof(uint32_t) * kKP * ((std::min(M, kMC) + kMR - 1) / kMR * kMR)));
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    for (int64_t pc = 0; pc < K; pc += 2 * kKP) {
      const int64_t kc = std::min(2 * kKP, K - pc), kp = (kc + 1) / 2;
      const bool add = accumulate || pc > 0, last = pc + kc >= K;
      pack_b_bf16(b, pc, kc, jc, nc, bpack);
      for (int64_t ic = 0; ic < M; ic += kMC) {
        const int64_t mc = std::min(kMC, M - ic);
        pack_a(a, ic, mc, pc, kc, apack);
        for (int64_t jr = 0; jr < nc; jr += kNR)
          for (int64_t ir = 0; ir < mc; ir += kMR)
            micro_bf16(kp, apack + ir * kp, bpack + jr * kp, c + (ic + ir) * ldc + jc + jr, ldc, std::min(kMR, mc - ir),
                       std::min(kNR, nc - jr), add, last && out ? out + (ic + ir) * ldc + jc + jr : nullptr, last ? epi : nullptr,
                       bias && pc == 0 ? bias + jc + jr : nullptr);
      }
    }
  }
}

#endif  // MIXPREC_X86_SIMD

// Splits C into a tm x tn grid of near-square tiles, one per thread: threads share nothing,
// each packs the A rows and B columns of its own tile.
template <class F>
void parallel_tiles(int64_t M, int64_t N, int64_t K, F&& tile) {
  int nt = num_threads();
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, static_cast<int64_t>(flops / 4e6))));
  if (nt <= 1) {
    tile(0, M, 0, N);
    return;
  }
  int tm = 1;
  double best = 1e300;
  for (int d = 1; d <= nt; ++d) {
    if (nt % d) continue;
    const double cost = static_cast<double>(M) / d + static_cast<double>(N) / (nt / d);  // packing traffic per thread
    if (cost < best) best = cost, tm = d;
  }
  const int tn = nt / tm;
  auto split = [](int64_t n, int parts, int64_t unit, int idx) {
    const int64_t units = (n + unit - 1) / unit;
    const int64_t b = units * idx / parts * unit, e = units * (idx + 1) / parts * unit;
    return std::pair<int64_t, int64_t>{std::min(b, n), std::min(e, n)};
  };
  parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [m0, m1] = split(M, tm, kMR, static_cast<int>(t / tn));
      const auto [n0, n1] = split(N, tn, kNR, static_cast<int>(t % tn));
      if (m0 < m1 && n0 < n1) tile(m0, m1, n0, n1);
    }
  });
}

}  // namespace detail

#if defined(MIXPREC_X86_SIMD)
// C[M, N] (row-major, leading dimension ldc, float32) (=|+=) A[M, K] * B[K, N]. Requires available().
// For 16-bit T, round_to (optional, C's layout) receives the result rounded, written by the
// microkernels from their registers; C is then only scratch between K blocks (its contents
// afterwards unspecified). epi (optional) runs on each finished tile of the result (round_to, or C).
// bias (optional, N floats, only with !accumulate) is added as if C had been filled with it and
// accumulated onto: the same bits, without the pass that writes it.
template <class T>
void gemm(View<T> a, View<T> b, float* c, int64_t ldc, int64_t M, int64_t N, int64_t K, bool accumulate, T* round_to = nullptr,
          const TileEpilogue* epi = nullptr, const float* bias = nullptr) {
  if constexpr (std::is_same_v<T, float>) round_to = nullptr;
  detail::parallel_tiles(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    detail::gemm_serial<T>(View<T>{&a.at(m0, 0), a.s0, a.s1}, View<T>{&b.at(0, n0), b.s0, b.s1}, c + m0 * ldc + n0, ldc, m1 - m0,
                           n1 - n0, K, accumulate, round_to ? round_to + m0 * ldc + n0 : nullptr, epi, bias ? bias + n0 : nullptr);
  });
}

// The same with vdpbf16ps on bfloat16 pairs. Requires bf16_dot_available().
inline void gemm_dpbf16(View<bfloat16> a, View<bfloat16> b, float* c, int64_t ldc, int64_t M, int64_t N, int64_t K, bool accumulate,
                        bfloat16* round_to = nullptr, const TileEpilogue* epi = nullptr, const float* bias = nullptr) {
  detail::parallel_tiles(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    detail::gemm_serial_dpbf16(View<bfloat16>{&a.at(m0, 0), a.s0, a.s1}, View<bfloat16>{&b.at(0, n0), b.s0, b.s1}, c + m0 * ldc + n0,
                               ldc, m1 - m0, n1 - n0, K, accumulate, round_to ? round_to + m0 * ldc + n0 : nullptr, epi,
                               bias ? bias + n0 : nullptr);
  });
}
#endif

}  // namespace mixprec::cpu::avx512
