#pragma once
// The CPU's attention kernels, fused and memory-lean (FlashAttention-2 style), behind the CPU's
// DeviceKernels::sdpa_forward / sdpa_backward (no mask, fresh results) and sdpa_forward_into /
// sdpa_backward_into (masks, results written into the caller's strided tensors): queries are
// processed in blocks with an online softmax, so the [L, S] probability matrix is never stored;
// backward recomputes each block's probabilities from the saved row logsumexp.
// The kernel reads q, k, v and writes its results through strides (unit stride along the head
// dim only), so heads split off a packed projection, and merged back, cost no copies
// (scaled_dot_product_attention_packed). Scores, softmax statistics and gradient accumulators
// are in acc_t (float32; float64 for float64). bfloat16 inputs are read as they are: the
// products run on the 16-bit GEMM (vdpbf16ps where the CPU has it), with the probabilities P and
// their gradients dS rounded to bfloat16 for the products that take them, as FlashAttention does
// on tensor cores. float16 is widened to float32: its GEMM runs float32 FMAs anyway, and P or dS
// rounded to float16 would lose small values to subnormals. Results are rounded once on store.
// Dropout is ops/attention.hpp's counter-based rule (detail::sdpa_dropout_keep), so backward
// regenerates the same mask without saving it and the result does not depend on how blocks are
// split across threads.
#include <algorithm>
#include <array>
#include <limits>

#include "mixprec/backends/cpu/gemm.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/attention.hpp"

namespace mixprec::cpu::sdpa {
using namespace mixprec::detail;  // the op layer's raw helpers (expand_raw, contiguous_raw, ...)

inline constexpr int64_t kSdpaBlockQ = 64;   // query rows per task: one [64, E] panel of Q
inline constexpr int64_t kSdpaBlockK = 128;  // keys per step: the score block stays in L2

// What the CPU kernel accumulates in for element type T: double for double, else float.
template <class T>
using sdpa_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A batch of matrices with unit column stride: element (b, r, c) is at row(b, r)[c].
template <class T>
struct SdpaMat {
  Tensor keep;  // owns the data (a converted copy where an input could not be read in place)
  T* data = nullptr;
  std::vector<int64_t> off;
  int64_t rs = 0;
  T* row(int64_t b, int64_t r) const { return data + off[static_cast<std::size_t>(b)] + r * rs; }
};

// Offsets of each flattened batch index of `t` (already expanded to batch + 2 matrix dims).
inline std::vector<int64_t> sdpa_batch_offsets(const Tensor& t, const Shape& batch) {
  const int64_t B = numel_of(batch), nd = static_cast<int64_t>(batch.size());
  std::vector<int64_t> off(static_cast<std::size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t rem = b, o = 0;
    for (int64_t d = nd - 1; d >= 0; --d) {
      o += (rem % batch[d]) * t.stride(d);
      rem /= batch[d];
    }
    off[static_cast<std::size_t>(b)] = o;
  }
  return off;
}

// Whether the kernel can address t's matrices as they are: unit stride along the last dim,
// rows that do not overlap.
inline bool sdpa_layout_ok(const Tensor& t) {
  const int64_t rows = t.size(-2), cols = t.size(-1);
  return (t.stride(-1) == 1 || cols <= 1) && (rows <= 1 || t.stride(-2) >= std::max<int64_t>(cols, 1));
}

// t's matrices, broadcast to the batch (t already has sdpa_layout_ok and T's dtype).
template <class T>
SdpaMat<T> sdpa_view(const Tensor& t, const Shape& batch) {
  Shape full = batch;
  full.push_back(t.size(-2));
  full.push_back(t.size(-1));
  const Tensor e = expand_raw(t, full);
  SdpaMat<T> m;
  m.keep = t;
  m.data = t.template data<std::remove_const_t<T>>();
  m.off = sdpa_batch_offsets(e, batch);
  m.rs = e.stride(-2);
  return m;
}

// An input: read in place where the layout allows (a head of a packed projection is a strided
// view), else a contiguous copy in T -- of one slice of each broadcast dim (stride 0), as the
// caller's tensor held it before the op expanded it, not of the expanded shape.
template <class T>
SdpaMat<const T> sdpa_mat(const Tensor& t, const Shape& batch) {
  if (t.dtype() == dtype_of<T> && sdpa_layout_ok(t)) return sdpa_view<const T>(t, batch);
  Shape s = t.sizes();
  for (int64_t d = 0; d + 2 < t.dim(); ++d)
    if (t.stride(d) == 0) s[static_cast<std::size_t>(d)] = 1;
  return sdpa_view<const T>(contiguous_raw(make_view(t, s, t.strides(), t.storage_offset()), dtype_of<T>), batch);
}

// c (+)= a b on the kernel's element type: the float / double GEMM, or bfloat16 read directly
// with float32 accumulation (sdpa_dispatch picks bfloat16 only where cpu::gemm_16bit runs).
template <class T, class C>
void sdpa_gemm(const T* a, int64_t as0, int64_t as1, const T* b, int64_t bs0, int64_t bs1, C* c, int64_t M, int64_t N, int64_t K,
               bool accumulate) {
  if constexpr (std::is_same_v<T, C>) cpu::gemm<C>(a, as0, as1, b, bs0, bs1, c, M, N, K, accumulate);
  else cpu::gemm_16bit<T>(a, as0, as1, b, bs0, bs1, c, M, N, K, accumulate);
}

// dst[0, n) = src[0, n), rounded once where T is narrower than C.
template <class T, class C>
void sdpa_store(const C* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, C>) std::copy(src, src + n, dst);
  else convert(src, dst, n);
}

// The kernels' row loops. The bfloat16 kernel runs only where cpu::gemm_16bit_available() (an
// AVX-512 CPU with FMA), so its loops take 16 lanes at a time with no dispatch of their own;
// float32 and float64 keep the plain loops and std::exp, and with them their exact results.
#if defined(MIXPREC_X86_SIMD)
// exp(x) = 2^n e^r with x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-5 polynomial for e^r:
// about 1 ulp, far below bfloat16's rounding. -inf gives 0, +inf gives inf, NaN stays NaN (the
// clamps pass a NaN second operand through).
MIXPREC_TARGET_GEMM512 inline __m512 sdpa_exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}
MIXPREC_TARGET_GEMM512 inline float sdpa_row_max16(const float* row, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = ninf;
  __mmask16 nan = 0;
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 x = _mm512_mask_loadu_ps(ninf, cpu::avx512::detail::lanes(n - c), row + c);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, x);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
}
MIXPREC_TARGET_GEMM512 inline float sdpa_exp_sum16(float* row, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = cpu::avx512::detail::lanes(n - c);
    const __m512 e = sdpa_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + c), mv));
    sum = _mm512_mask_add_ps(sum, k, sum, e);
    _mm512_mask_storeu_ps(row + c, k, e);
  }
  return _mm512_reduce_add_ps(sum);
}
MIXPREC_TARGET_GEMM512 inline void sdpa_scale16(float* row, int64_t n, float a) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = cpu::avx512::detail::lanes(n - c);
    _mm512_mask_storeu_ps(row + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + c), av));
  }
}
// dp[c] = s[c] * (dp[c] - d) * scale: dS from dP, scaled for the products that take it.
MIXPREC_TARGET_GEMM512 inline void sdpa_ds16(const float* s, float* dp, int64_t n, float d, float scale) {
  const __m512 dv = _mm512_set1_ps(d), sv = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = cpu::avx512::detail::lanes(n - c);
    const __m512 ds = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + c), _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + c), dv));
    _mm512_mask_storeu_ps(dp + c, k, _mm512_mul_ps(ds, sv));
  }
}
#endif

// NaN-propagating row max: a NaN score must reach the output (overflow checks rely on it), not
// be skipped as if the row were masked.
template <class T, class C>
C sdpa_row_max(const C* row, int64_t n) {
#if defined(MIXPREC_X86_SIMD)
  if constexpr (!std::is_same_v<T, C>) return sdpa_row_max16(row, n);
#endif
  auto nanmax = [](C a, C b) { return a != a || a > b ? a : b; };
  C mx = -std::numeric_limits<C>::infinity();
  for (int64_t c = 0; c < n; ++c) mx = nanmax(mx, row[c]);
  return mx;
}
// row[c] = exp(row[c] - m); returns their sum.
template <class T, class C>
C sdpa_exp_sum(C* row, int64_t n, C m) {
#if defined(MIXPREC_X86_SIMD)
  if constexpr (!std::is_same_v<T, C>) return sdpa_exp_sum16(row, n, m);
#endif
  C sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    const C e = std::exp(row[c] - m);
    sum += e;
    row[c] = e;
  }
  return sum;
}
template <class T, class C>
void sdpa_scale_row(C* row, int64_t n, C a) {
#if defined(MIXPREC_X86_SIMD)
  if constexpr (!std::is_same_v<T, C>) return sdpa_scale16(row, n, a);
#endif
  for (int64_t c = 0; c < n; ++c) row[c] *= a;
}

template <class T>
struct SdpaProblem {
  using C = sdpa_acc_t<T>;
  // bfloat16: P and dS are rounded to T for the products that take them.
  static constexpr bool kNarrow = !std::is_same_v<T, C>;
  int64_t B = 0, L = 0, S = 0, E = 0, Ev = 0;
  SdpaMat<const T> q, k, v;
  // Mask: bool (true = keep) or additive, element (b, i, j) at moff[b] + i * mr + j * mc.
  Tensor mask_keep;
  const bool* mb = nullptr;
  const C* mf = nullptr;
  std::vector<int64_t> moff;
  int64_t mr = 0, mc = 0;
  bool causal = false;
  C scale = 1;
  double p = 0;
  uint64_t seed = 0;
  C keep_scale = 1;

  // Keys visible to query rows below i1: causal attention stops at the diagonal.
  int64_t key_end(int64_t i1) const { return causal ? std::min(S, i1) : S; }
  bool keep(int64_t b, int64_t i, int64_t j) const {
    return sdpa_dropout_keep(seed, static_cast<uint64_t>((b * L + i) * S + j), p);
  }

  // s[r * nk + c] = scaled, masked logit of query i0 + r and key j0 + c (-inf when masked).
  void logits(int64_t b, int64_t i0, int64_t nq, int64_t j0, int64_t nk, C* s) const {
    sdpa_gemm<T, C>(q.row(b, i0), q.rs, 1, k.row(b, j0), 1, k.rs, s, nq, nk, E, false);
    constexpr C ninf = -std::numeric_limits<C>::infinity();
    for (int64_t r = 0; r < nq; ++r) {
      C* row = s + r * nk;
      const int64_t i = i0 + r;
      if (mb) {
        const bool* m = mb + moff[b] + i * mr + j0 * mc;
        for (int64_t c = 0; c < nk; ++c) row[c] = m[c * mc] ? row[c] * scale : ninf;
      } else if (mf) {
        const C* m = mf + moff[b] + i * mr + j0 * mc;
        for (int64_t c = 0; c < nk; ++c) row[c] = row[c] * scale + m[c * mc];
      } else {
        sdpa_scale_row<T>(row, nk, scale);
      }
      if (causal)
        for (int64_t c = std::max<int64_t>(0, i - j0 + 1); c < nk; ++c) row[c] = ninf;
    }
  }
};

// Runs f(task, scratch, narrow scratch) for tasks [0, n), dealt round-robin to threads: causal
// blocks grow with the row index, and round-robin keeps the threads' shares even.
template <class C, class T, class F>
void sdpa_for_tasks(int64_t n, double flops_per_task, std::size_t scratch, std::size_t narrow_scratch, F f) {
  const bool small = flops_per_task * static_cast<double>(n) < 2e5;
  const int64_t nt = small ? 1 : std::min<int64_t>(cpu::num_threads(), n);
  cpu::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    std::vector<C> buf(scratch);
    std::vector<T> nbuf(narrow_scratch);
    for (int64_t slot = b; slot < e; ++slot)
      for (int64_t t = slot; t < n; t += nt) f(t, buf.data(), nbuf.data());
  });
}

template <class T>
void sdpa_forward_kernel(const SdpaProblem<T>& P, const SdpaMat<T>& out, sdpa_acc_t<T>* lse) {
  using C = sdpa_acc_t<T>;
  constexpr int64_t BQ = kSdpaBlockQ, BK = kSdpaBlockK;
  const int64_t nqb = (P.L + BQ - 1) / BQ;
  const std::size_t scratch = static_cast<std::size_t>(BQ * BK + BQ * P.Ev + 2 * BQ);
  const std::size_t narrow = SdpaProblem<T>::kNarrow ? static_cast<std::size_t>(BQ * BK) : 0;
  const double flops = 2.0 * static_cast<double>(BQ * P.S * (P.E + P.Ev));
  sdpa_for_tasks<C, T>(P.B * nqb, flops, scratch, narrow, [&](int64_t t, C* buf, T* pn) {
    const int64_t b = t / nqb, i0 = (t % nqb) * BQ, nq = std::min(BQ, P.L - i0);
    C* s = buf;
    C* o = s + BQ * BK;
    C* m = o + BQ * P.Ev;
    C* l = m + BQ;
    constexpr C ninf = -std::numeric_limits<C>::infinity();
    std::fill(m, m + nq, ninf);
    std::fill(l, l + nq, C(0));
    std::fill(o, o + nq * P.Ev, C(0));
    const int64_t kend = P.key_end(i0 + nq);
    for (int64_t j0 = 0; j0 < kend; j0 += BK) {
      const int64_t nk = std::min(BK, kend - j0);
      P.logits(b, i0, nq, j0, nk, s);
      for (int64_t r = 0; r < nq; ++r) {
        C* row = s + r * nk;
        const C mx = sdpa_row_max<T>(row, nk);
        const C mnew = m[r] != m[r] || m[r] > mx ? m[r] : mx;  // NaN-propagating, as sdpa_row_max
        if (mnew == ninf) {  // everything so far is masked: contributes nothing
          std::fill(row, row + nk, C(0));
          continue;
        }
        const C alpha = std::exp(m[r] - mnew);
        const C sum = sdpa_exp_sum<T>(row, nk, mnew);
        if (P.p > 0)
          for (int64_t c = 0; c < nk; ++c) row[c] = P.keep(b, i0 + r, j0 + c) ? row[c] * P.keep_scale : C(0);
        l[r] = l[r] * alpha + sum;
        if (alpha != C(1)) sdpa_scale_row<T>(o + r * P.Ev, P.Ev, alpha);
        m[r] = mnew;
      }
      if constexpr (SdpaProblem<T>::kNarrow) {
        sdpa_store(s, pn, nq * nk);
        sdpa_gemm<T, C>(pn, nk, 1, P.v.row(b, j0), P.v.rs, 1, o, nq, P.Ev, nk, true);
      } else {
        sdpa_gemm<T, C>(s, nk, 1, P.v.row(b, j0), P.v.rs, 1, o, nq, P.Ev, nk, true);
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      // A fully masked row attends to nothing: output 0, and lse = +inf makes its
      // recomputed probabilities 0 in backward.
      const C inv = l[r] > 0 ? C(1) / l[r] : C(0);
      C* orow = o + r * P.Ev;
      sdpa_scale_row<T>(orow, P.Ev, inv);
      sdpa_store(orow, out.row(b, i0 + r), P.Ev);
      lse[b * P.L + i0 + r] = l[r] > 0 ? m[r] + std::log(l[r]) : std::numeric_limits<C>::infinity();
    }
  });
}

// Backward, FlashAttention-2 style: each task accumulates its gradient rows in float scratch
// and stores them once, rounded, into the caller's (possibly strided) gradient tensors.
template <class T>
struct SdpaBackward {
  using C = sdpa_acc_t<T>;
  const SdpaProblem<T>& P;
  SdpaMat<const T> dout;  // [B, L, Ev]
  const C* lse;           // [B, L]
  const C* D;             // [B, L]: rowsum(dout * out)
  C* dm;                  // [B, L, S] mask gradient, or null

  // One (query block, key block) pair into accumulators: dq_acc holds query rows i0.. (E wide),
  // dk_acc and dv_acc key rows j0.. (E and Ev wide); a null one is not wanted, and callers pick
  // them so that no two threads write the same rows. dm is written with dk / dv: once per pair.
  void block(int64_t b, int64_t i0, int64_t nq, int64_t j0, int64_t nk, C* dq_acc, C* dk_acc, C* dv_acc, C* s, C* dp, T* pn) const {
    constexpr bool narrow = SdpaProblem<T>::kNarrow;
    P.logits(b, i0, nq, j0, nk, s);
    for (int64_t r = 0; r < nq; ++r) sdpa_exp_sum<T>(s + r * nk, nk, lse[b * P.L + i0 + r]);
    const T* go = dout.row(b, i0);
    const bool drop = P.p > 0;
    if (dv_acc) {
      const C* pd = s;
      if (drop) {
        for (int64_t r = 0; r < nq; ++r)
          for (int64_t c = 0; c < nk; ++c)
            dp[r * nk + c] = P.keep(b, i0 + r, j0 + c) ? s[r * nk + c] * P.keep_scale : C(0);
        pd = dp;
      }
      if constexpr (narrow) {
        sdpa_store(pd, pn, nq * nk);
        sdpa_gemm<T, C>(pn, 1, nk, go, dout.rs, 1, dv_acc, nk, P.Ev, nq, true);
      } else {
        sdpa_gemm<T, C>(pd, 1, nk, go, dout.rs, 1, dv_acc, nk, P.Ev, nq, true);
      }
    }
    sdpa_gemm<T, C>(go, dout.rs, 1, P.v.row(b, j0), 1, P.v.rs, dp, nq, nk, P.Ev, false);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r;
      const C Di = D[b * P.L + i];
#if defined(MIXPREC_X86_SIMD)
      if constexpr (narrow) {
        if (!drop && !(dm && dk_acc)) {
          sdpa_ds16(s + r * nk, dp + r * nk, nk, Di, P.scale);
          continue;
        }
      }
#endif
      for (int64_t c = 0; c < nk; ++c) {
        C d = dp[r * nk + c];
        if (drop) d = P.keep(b, i, j0 + c) ? d * P.keep_scale : C(0);
        const C ds = s[r * nk + c] * (d - Di);
        if (dm && dk_acc) dm[(b * P.L + i) * P.S + j0 + c] = ds;
        dp[r * nk + c] = ds * P.scale;
      }
    }
    const T* ds = nullptr;
    if constexpr (narrow) {
      sdpa_store(dp, pn, nq * nk);
      ds = pn;
    } else {
      ds = dp;
    }
    if (dq_acc) sdpa_gemm<T, C>(ds, nk, 1, P.k.row(b, j0), P.k.rs, 1, dq_acc, nq, P.E, nk, true);
    if (dk_acc) sdpa_gemm<T, C>(ds, 1, nk, P.q.row(b, i0), P.q.rs, 1, dk_acc, nk, P.E, nq, true);
  }

  // Writes every row of dq, dk, dv (G: T, or C where the caller still sums over broadcast dims).
  template <class G>
  void run(const SdpaMat<G>& dq, const SdpaMat<G>& dk, const SdpaMat<G>& dv) const {
    constexpr int64_t BQ = kSdpaBlockQ, BK = kSdpaBlockK;
    const int64_t L = P.L, S = P.S, E = P.E, Ev = P.Ev;
    const int64_t nqb = (L + BQ - 1) / BQ, nkb = (S + BK - 1) / BK;
    const int64_t blocks = 2 * BQ * BK;  // s and dp
    const std::size_t narrow = SdpaProblem<T>::kNarrow ? static_cast<std::size_t>(BQ * BK) : 0;
    const double block_flops = 2.0 * static_cast<double>(BQ * BK * (2 * E + 3 * Ev));
    auto store = [](const C* acc, const SdpaMat<G>& g, int64_t b, int64_t r0, int64_t rows, int64_t w) {
      for (int64_t r = 0; r < rows; ++r) sdpa_store(acc + r * w, g.row(b, r0 + r), w);
    };
    if (P.B >= cpu::num_threads()) {
      // One batch entry per task, its gradients accumulated in the task's scratch.
      const int64_t acc = L * E + S * (E + Ev);
      sdpa_for_tasks<C, T>(P.B, block_flops * static_cast<double>(nqb * nkb), static_cast<std::size_t>(blocks + acc), narrow,
                           [&](int64_t b, C* buf, T* pn) {
                             C* dqa = buf + blocks;
                             C* dka = dqa + L * E;
                             C* dva = dka + S * E;
                             std::fill(dqa, dqa + acc, C(0));
                             for (int64_t kb = 0; kb < nkb; ++kb)
                               for (int64_t qb = 0; qb < nqb; ++qb) {
                                 const int64_t i0 = qb * BQ, nq = std::min(BQ, L - i0), j0 = kb * BK;
                                 if (P.key_end(i0 + nq) <= j0) continue;
                                 block(b, i0, nq, j0, std::min(BK, P.key_end(i0 + nq) - j0), dqa + i0 * E, dka + j0 * E,
                                       dva + j0 * Ev, buf, buf + BQ * BK, pn);
                               }
                             store(dqa, dq, b, 0, L, E);
                             store(dka, dk, b, 0, S, E);
                             store(dva, dv, b, 0, S, Ev);
                           });
      return;
    }
    // Few batch entries: split over key blocks for dK/dV, then over query blocks for dQ
    // (recomputing the scores once more beats serialising on a shared dQ).
    sdpa_for_tasks<C, T>(P.B * nkb, block_flops * static_cast<double>(nqb), static_cast<std::size_t>(blocks + BK * (E + Ev)), narrow,
                         [&](int64_t t, C* buf, T* pn) {
                           const int64_t b = t / nkb, j0 = (t % nkb) * BK, rows = std::min(BK, S - j0);
                           C* dka = buf + blocks;
                           C* dva = dka + BK * E;
                           std::fill(dka, dka + BK * (E + Ev), C(0));
                           for (int64_t qb = 0; qb < nqb; ++qb) {
                             const int64_t i0 = qb * BQ, nq = std::min(BQ, L - i0);
                             if (P.key_end(i0 + nq) <= j0) continue;
                             block(b, i0, nq, j0, std::min(BK, P.key_end(i0 + nq) - j0), nullptr, dka, dva, buf, buf + BQ * BK, pn);
                           }
                           store(dka, dk, b, j0, rows, E);
                           store(dva, dv, b, j0, rows, Ev);
                         });
    sdpa_for_tasks<C, T>(P.B * nqb, block_flops * static_cast<double>(nkb), static_cast<std::size_t>(blocks + BQ * E), narrow,
                         [&](int64_t t, C* buf, T* pn) {
                           const int64_t b = t / nqb, i0 = (t % nqb) * BQ, nq = std::min(BQ, L - i0);
                           C* dqa = buf + blocks;
                           std::fill(dqa, dqa + BQ * E, C(0));
                           const int64_t kend = P.key_end(i0 + nq);
                           for (int64_t j0 = 0; j0 < kend; j0 += BK)
                             block(b, i0, nq, j0, std::min(BK, kend - j0), dqa, nullptr, nullptr, buf, buf + BQ * BK, pn);
                           store(dqa, dq, b, i0, nq, E);
                         });
  }
};

template <class T>
SdpaProblem<T> sdpa_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch,
                            bool causal, double scale, double p, uint64_t seed) {
  using C = sdpa_acc_t<T>;
  SdpaProblem<T> P;
  P.B = numel_of(batch);
  P.L = q.size(-2);
  P.S = k.size(-2);
  P.E = q.size(-1);
  P.Ev = v.size(-1);
  P.q = sdpa_mat<T>(q, batch);
  P.k = sdpa_mat<T>(k, batch);
  P.v = sdpa_mat<T>(v, batch);
  P.causal = causal;
  P.scale = static_cast<C>(scale);
  P.p = p;
  P.seed = seed;
  P.keep_scale = p < 1 ? static_cast<C>(1.0 / (1.0 - p)) : C(0);
  if (mask.defined()) {
    Shape full = batch;
    full.push_back(P.L);
    full.push_back(P.S);
    P.mask_keep = mask.dtype() == DType::Bool ? mask : as_dtype_raw(mask, dtype_of<C>);
    const Tensor e = expand_raw(P.mask_keep, full);
    P.moff = sdpa_batch_offsets(e, batch);
    P.mr = e.stride(-2);
    P.mc = e.stride(-1);
    if (mask.dtype() == DType::Bool) P.mb = e.data<bool>();
    else P.mf = e.data<C>();
  }
  return P;
}

// Runs f.template operator()<T>() with T the element type the CPU kernel computes on for a
// floating dtype: bfloat16 stays bfloat16 where cpu::gemm_16bit runs; float16, and bfloat16
// without AVX-512, are widened to float32 (see the top of this file).
template <class F>
void sdpa_dispatch(DType d, F&& f) {
  if (d == DType::Float64) f.template operator()<double>();
  else if (d == DType::BFloat16 && cpu::gemm_16bit_available()) f.template operator()<bfloat16>();
  else f.template operator()<float>();
}

// A tensor the CPU kernel writes must cover the batch's full shape with rows it can address.
inline void sdpa_check_target(const char* what, const Tensor& t, const Shape& batch, int64_t rows, int64_t cols) {
  Shape full = batch;
  full.push_back(rows);
  full.push_back(cols);
  MIXPREC_CHECK(t.defined() && t.device() == Device::CPU && t.sizes() == full && sdpa_layout_ok(t), "scaled_dot_product_attention: ",
                what, " must be a CPU tensor of shape ", full, " with unit stride along its last dim, got ",
                t.defined() ? t.sizes() : Shape{}, " with strides ", t.defined() ? t.strides() : Shape{});
}

// The CPU forward: writes the attention into `out` ([batch..., L, Ev] in q's dtype, unit stride
// along Ev, any strides elsewhere: the caller picks the layout, e.g. heads merged) and returns
// the row logsumexp [batch..., L] in the accumulation dtype (float32, or float64 for float64).
inline Tensor sdpa_cpu_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch, bool is_causal,
                               double sc, double dropout_p, uint64_t seed, const Tensor& out) {
  const int64_t L = q.size(-2);
  sdpa_check_target("the output", out, batch, L, v.size(-1));
  MIXPREC_CHECK(out.dtype() == q.dtype(), "scaled_dot_product_attention: the output must be ", q.dtype(), ", got ", out.dtype());
  Shape lse_shape = batch;
  lse_shape.push_back(L);
  Tensor lse = empty(lse_shape, q.dtype() == DType::Float64 ? DType::Float64 : DType::Float32);
  sdpa_dispatch(q.dtype(), [&]<class T>() {
    const auto P = sdpa_problem<T>(q, k, v, mask, batch, is_causal, sc, dropout_p, seed);
    if (P.B * L == 0) return;
    const Tensor dst = out.dtype() == dtype_of<T> ? out : empty(out.sizes(), dtype_of<T>);  // widened inputs: staged
    sdpa_forward_kernel<T>(P, sdpa_view<T>(dst, batch), lse.data<sdpa_acc_t<T>>());
    if (!dst.is_same(out)) copy_kernel(out, dst);
  });
  return lse;
}

// The CPU backward from sdpa_cpu_forward's out and lse: writes the gradients into dq, dk, dv
// (the full batch shapes, unit stride along the last dim, one dtype: the inputs', or the
// accumulation dtype where the caller still sums over broadcast dims) and, when defined, the
// mask gradient into dm (zeros of [batch..., L, S] in the accumulation dtype, contiguous).
inline void sdpa_cpu_backward(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& out,
                              const Tensor& lse, const Shape& batch, bool is_causal, double sc, double dropout_p, uint64_t seed,
                              const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dm) {
  const int64_t B = numel_of(batch), L = q.size(-2), S = k.size(-2), E = q.size(-1), Ev = v.size(-1);
  sdpa_check_target("dq", dq, batch, L, E);
  sdpa_check_target("dk", dk, batch, S, E);
  sdpa_check_target("dv", dv, batch, S, Ev);
  MIXPREC_CHECK(dk.dtype() == dq.dtype() && dv.dtype() == dq.dtype(), "scaled_dot_product_attention: dq, dk and dv must share a dtype, got ",
                dq.dtype(), ", ", dk.dtype(), " and ", dv.dtype());
  sdpa_dispatch(q.dtype(), [&]<class T>() {
    using C = sdpa_acc_t<T>;
    MIXPREC_CHECK(lse.dtype() == dtype_of<C> && !(dm.defined() && (dm.dtype() != dtype_of<C> || !dm.is_contiguous())),
                  "scaled_dot_product_attention: logsumexp and mask gradient must be contiguous ", dtype_of<C>);
    const auto P = sdpa_problem<T>(q, k, v, mask, batch, is_causal, sc, dropout_p, seed);
    const SdpaMat<const T> go = sdpa_mat<T>(grad, batch), o = sdpa_mat<T>(out, batch);
    Tensor D = empty({B, L}, dtype_of<C>);
    C* Dp = D.data<C>();
    cpu::parallel_for(0, B * L, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(Ev, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = go.row(r / L, r % L);
        const T* y = o.row(r / L, r % L);
        C s = 0;
        for (int64_t c = 0; c < Ev; ++c) s += static_cast<C>(g[c]) * static_cast<C>(y[c]);
        Dp[r] = s;
      }
    });
    const SdpaBackward<T> bw{P, go, lse.data<C>(), Dp, dm.defined() ? dm.data<C>() : nullptr};
    auto run = [&]<class G>(const Tensor& gq, const Tensor& gk, const Tensor& gv) {
      bw.template run<G>(sdpa_view<G>(gq, batch), sdpa_view<G>(gk, batch), sdpa_view<G>(gv, batch));
    };
    if (dq.dtype() == dtype_of<T>) {
      run.template operator()<T>(dq, dk, dv);
    } else if (dq.dtype() == dtype_of<C>) {
      run.template operator()<C>(dq, dk, dv);
    } else {  // widened inputs: staged in C, then rounded into the caller's tensors
      const Tensor sq = empty(dq.sizes(), dtype_of<C>), sk = empty(dk.sizes(), dtype_of<C>), sv = empty(dv.sizes(), dtype_of<C>);
      run.template operator()<C>(sq, sk, sv);
      copy_kernel(dq, sq);
      copy_kernel(dk, sk);
      copy_kernel(dv, sv);
    }
  });
}

}  // namespace mixprec::cpu::sdpa

namespace mixprec::cpu {

// q, k, v (and grad, out) come expanded to one batch shape (the entries' contract); the kernels
// address them by strides with the batch taken from q.
inline Shape sdpa_batch(const Tensor& q) { return Shape(q.sizes().begin(), q.sizes().end() - 2); }

// DeviceKernels::sdpa_forward_into: attention into `out`, logsumexp returned.
inline Tensor sdpa_forward_into(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, bool causal, double scale,
                                double dropout_p, uint64_t seed, const Tensor& out) {
  return sdpa::sdpa_cpu_forward(q, k, v, mask, sdpa_batch(q), causal, scale, dropout_p, seed, out);
}

// DeviceKernels::sdpa_backward_into: gradients into dq, dk, dv and, when defined, dmask.
inline void sdpa_backward_into(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& out,
                               const Tensor& lse, bool causal, double scale, double dropout_p, uint64_t seed, const Tensor& dq,
                               const Tensor& dk, const Tensor& dv, const Tensor& dmask) {
  sdpa::sdpa_cpu_backward(grad, q, k, v, mask, out, lse, sdpa_batch(q), causal, scale, dropout_p, seed, dq, dk, dv, dmask);
}

// DeviceKernels::sdpa_forward: {out, contiguous in q's dtype; logsumexp}.
inline std::array<Tensor, 2> sdpa_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale, double dropout_p,
                                          uint64_t seed) {
  Shape s = sdpa_batch(q);
  s.insert(s.end(), {q.size(-2), v.size(-1)});
  const Tensor out = empty(s, q.dtype());
  return {out, sdpa_forward_into(q, k, v, Tensor(), causal, scale, dropout_p, seed, out)};
}

// DeviceKernels::sdpa_backward: {dq, dk, dv} of the expanded shapes, in q's dtype -- or, where a
// batch dim of q, k or v is broadcast (stride 0, size > 1), in the accumulation dtype, so that
// the op's sum over it rounds once, after the sum.
inline std::array<Tensor, 3> sdpa_backward(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                           const Tensor& lse, bool causal, double scale, double dropout_p, uint64_t seed) {
  bool broadcast = false;
  for (const Tensor* t : {&q, &k, &v})
    for (int64_t d = 0; d + 2 < t->dim(); ++d) broadcast = broadcast || (t->stride(d) == 0 && t->size(d) > 1);
  const DType gd = broadcast ? lse.dtype() : q.dtype();
  const Tensor dq = empty(q.sizes(), gd), dk = empty(k.sizes(), gd), dv = empty(v.sizes(), gd);
  sdpa_backward_into(grad, q, k, v, Tensor(), out, lse, causal, scale, dropout_p, seed, dq, dk, dv, Tensor());
  return {dq, dk, dv};
}

inline void fill_attention_kernels(DeviceKernels& t) {
  t.sdpa_forward = sdpa_forward;
  t.sdpa_backward = sdpa_backward;
  t.sdpa_forward_into = sdpa_forward_into;
  t.sdpa_backward_into = sdpa_backward_into;
}

}  // namespace mixprec::cpu
