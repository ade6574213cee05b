#pragma once
// Convolutions, NCHW. One geometry (ConvGeom) and three kernels -- forward, input-backward
// (col2im), weight-backward -- serve conv1d, conv2d and conv_transpose2d (whose forward is
// conv2d's input-backward). Each kernel is im2col + GEMM per group; small images are batched
// into one wider GEMM, and the batch is split across threads (or, with too few samples, the
// GEMM threads itself). 16-bit tensors stay 16-bit through im2col and go to gemm_16bit (vdpbf16ps
// for bfloat16: twice the float32 rate), accumulating in float32; only the GEMM results and
// col2im's sums are float32, rounded once on store. Without gemm_16bit they are widened per chunk.
#include <array>
#include <cstring>
#include <mutex>

#include "mixprec/backends/cpu/conv.hpp"
#include "mixprec/ops/linalg.hpp"

namespace mixprec {

namespace detail {

// "input" [N, C, H, W] -> "output" [N, O, OH, OW] through weight [O, C/G, KH, KW].
// conv_transpose2d uses the same geometry with input and output swapped.
struct ConvGeom {
  int64_t N = 0, C = 0, H = 0, W = 0, O = 0, OH = 0, OW = 0;
  int64_t KH = 1, KW = 1, SH = 1, SW = 1, PH = 0, PW = 0, DH = 1, DW = 1, G = 1;
  int64_t Cg() const { return C / G; }
  int64_t Og() const { return O / G; }
  int64_t K() const { return Cg() * KH * KW; }  // GEMM reduction length (rows of the column matrix)
  int64_t L() const { return OH * OW; }
  int64_t HW() const { return H * W; }
  // The input already is its own column matrix.
  bool pointwise() const { return KH == 1 && KW == 1 && SH == 1 && SW == 1 && PH == 0 && PW == 0 && OH == H && OW == W; }
};

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

// n values of src into dst, widening 16-bit to float (vectorised).
template <class A, class T>
void load_acc(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<A, T>) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  else convert(src, dst, n);
}
template <class T, class A>
void store_acc(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<A, T>) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  else convert(src, dst, n);
}

// Output columns [lo, hi) whose input column ow*S + off lies inside [0, W).
inline std::pair<int64_t, int64_t> conv_valid_range(int64_t off, int64_t S, int64_t W, int64_t OW) {
  const int64_t lo = off >= 0 ? 0 : (-off + S - 1) / S;
  const int64_t hi = W - off <= 0 ? 0 : std::min(OW, (W - off + S - 1) / S);
  return {std::min(lo, OW), std::max(std::min(lo, OW), hi)};
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

// y [N, O, OH, OW] in x's dtype.
inline Tensor conv_forward(const ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
  if (x.device() != Device::CPU)
    return device_kernel("conv2d", x, &DeviceKernels::conv_forward)(g, contiguous_raw(x), contiguous_raw(w), b);
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

// x [N, C, H, W] in y's dtype; b (optional) is added per channel C.
inline Tensor conv_backward_input(const ConvGeom& g, const Tensor& y, const Tensor& w, const Tensor& b = Tensor()) {
  if (y.device() != Device::CPU) {
    Tensor x = device_kernel("conv2d_backward", y, &DeviceKernels::conv_backward_input)(g, contiguous_raw(y), contiguous_raw(w));
    if (!b.defined()) return x;
    return device_binary("conv_transpose2d", DeviceBinary::Add, x, make_view(b, {1, g.C, 1, 1}, {0, b.stride(0), 0, 0}, b.storage_offset()));
  }
  Tensor x = empty({g.N, g.C, g.H, g.W}, y.dtype());
  if (x.numel() == 0) return x;
  const bool direct = conv_direct_16bit(y.dtype());
  const Tensor yc = contiguous_raw(y), wa = direct ? contiguous_raw(w) : conv_acc_operand(w), ba = conv_acc_operand(b);
  dispatch_floating(y.dtype(), "conv2d_backward", [&]<class T>() {
    if (g.L() == 0) {
      // Nothing reaches the input: it is the bias alone.
      const acc_t<T>* bp = acc_ptr<T>(ba);
      T* xp = x.data<T>();
      for (int64_t p = 0; p < g.N * g.C; ++p) std::fill(xp + p * g.HW(), xp + (p + 1) * g.HW(), static_cast<T>(bp ? bp[p % g.C] : 0));
      return;
    }
    if constexpr (conv_reads_16bit<T>)
      if (direct) return conv_backward_input_kernel<T, T>(g, yc.data<T>(), wa.data<T>(), acc_ptr<T>(ba), x.data<T>());
    conv_backward_input_kernel<T, acc_t<T>>(g, yc.data<T>(), acc_ptr<T>(wa), acc_ptr<T>(ba), x.data<T>());
  });
  return x;
}

// Gradient of the weight [O, C/G, KH, KW] in `dtype`.
inline Tensor conv_backward_weight(const ConvGeom& g, const Tensor& x, const Tensor& y, DType dtype) {
  if (x.device() != Device::CPU)
    return as_dtype_raw(device_kernel("conv2d_backward", x, &DeviceKernels::conv_backward_weight)(g, contiguous_raw(x), contiguous_raw(y)),
                        dtype);
  const DType ad = dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  Tensor gw = zeros({g.O, g.Cg(), g.KH, g.KW}, ad);
  if (gw.numel() > 0 && g.N > 0 && g.L() > 0) {
    const bool direct = conv_direct_16bit(x.dtype());
    const Tensor xc = contiguous_raw(x), yc = contiguous_raw(y);
    dispatch_floating(x.dtype(), "conv2d_backward", [&]<class T>() {
      if constexpr (conv_reads_16bit<T>)
        if (direct) return conv_backward_weight_kernel<T, T>(g, xc.data<T>(), yc.data<T>(), gw.data<acc_t<T>>());
      conv_backward_weight_kernel<T, acc_t<T>>(g, xc.data<T>(), yc.data<T>(), gw.data<acc_t<T>>());
    });
  }
  return as_dtype_raw(gw, dtype);
}

// Sum of y [N, Ch, ...] over everything but dim 1, accumulated in double.
inline Tensor conv_bias_grad(const Tensor& y, DType dtype) {
  if (y.device() != Device::CPU) return as_dtype_raw(device_kernel("conv2d_backward", y, &DeviceKernels::sum)(y, {0, 2, 3}), dtype);
  const Tensor yc = contiguous_raw(y);
  const int64_t N = yc.size(0), Ch = yc.size(1), L = Ch == 0 || N == 0 ? 0 : yc.numel() / (N * Ch);
  Tensor gb = empty({Ch}, DType::Float64);
  double* out = gb.data<double>();
  dispatch_floating(yc.dtype(), "conv2d_backward", [&]<class T>() {
    const T* p = yc.data<T>();
    cpu::parallel_for(0, Ch, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(N * L, 1)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* row = p + (n * Ch + c) * L;
          acc_t<T> r = 0;
          for (int64_t l = 0; l < L; ++l) r += static_cast<acc_t<T>>(row[l]);
          s += static_cast<double>(r);
        }
        out[c] = s;
      }
    });
  });
  return as_dtype_raw(gb, dtype);
}

inline void check_conv_params(const char* op, std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                              std::array<int64_t, 2> dilation, int64_t groups) {
  MIXPREC_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  MIXPREC_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  MIXPREC_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  MIXPREC_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
}

inline void check_conv_dtypes(const char* op, const Tensor& x, const Tensor& w, const Tensor& b) {
  common_device(op, {&x, &w, &b});
  MIXPREC_CHECK(x.is_floating_point(), op, ": expected a floating-point input, got ", x.dtype());
  MIXPREC_CHECK(x.dtype() == w.dtype() && (!b.defined() || b.dtype() == w.dtype()), op, ": dtypes differ: input ", x.dtype(),
                ", weight ", w.dtype(), b.defined() ? ", bias " : "", b.defined() ? name(b.dtype()) : "",
                " (cast them, or use autocast)");
}

// conv2d on a 4-D input with autograd; x, w, b already validated by the caller's dimension checks.
inline Tensor conv2d_nchw(const char* op, const Tensor& x, const Tensor& w, const Tensor& b, std::array<int64_t, 2> stride,
                          std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation, int64_t groups) {
  ConvGeom g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = w.size(0), g.KH = w.size(2), g.KW = w.size(3);
  g.SH = stride[0], g.SW = stride[1], g.PH = padding[0], g.PW = padding[1], g.DH = dilation[0], g.DW = dilation[1], g.G = groups;
  g.OH = (g.H + 2 * g.PH - g.DH * (g.KH - 1) - 1) / g.SH + 1;
  g.OW = (g.W + 2 * g.PW - g.DW * (g.KW - 1) - 1) / g.SW + 1;
  const Tensor xc = contiguous_raw(x);
  Tensor y = conv_forward(g, xc, w, b);
  if (autograd::should_record({x, w, b})) {
    const bool need_x = autograd::tensor_requires_grad(x), need_w = autograd::tensor_requires_grad(w),
               need_b = autograd::tensor_requires_grad(b);
    autograd::record(op, {x, w, b}, {y},
                     [op, g, need_x, need_w, need_b, sx = autograd::SavedTensor(xc), sw = autograd::SavedTensor(w)](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
                       const Tensor& x = sx.get(op);
                       const Tensor& w = sw.get(op);
                       const Tensor gy = contiguous_raw(as_dtype_raw(grads[0], x.dtype()));
                       Tensor gx = need_x ? conv_backward_input(g, gy, w) : Tensor();
                       Tensor gw = need_w ? conv_backward_weight(g, x, gy, w.dtype()) : Tensor();
                       Tensor gb = need_b ? conv_bias_grad(gy, w.dtype()) : Tensor();
                       return {gx, gw, gb};
                     });
  }
  return y;
}
}  // namespace detail

// torch.nn.functional.conv2d: input [N, C, H, W] (or unbatched [C, H, W]), weight
// [O, C/groups, kH, kW], bias [O] (optional).
inline Tensor conv2d(const Tensor& input, const Tensor& weight, const Tensor& bias = Tensor(), std::array<int64_t, 2> stride = {1, 1},
                     std::array<int64_t, 2> padding = {0, 0}, std::array<int64_t, 2> dilation = {1, 1}, int64_t groups = 1) {
  return dispatch(OpId::conv2d, [=](const Tensor& x, const Tensor& w, const Tensor& b) {
    detail::check_conv_params("conv2d", stride, padding, dilation, groups);
    MIXPREC_CHECK(x.dim() == 3 || x.dim() == 4, "conv2d: expected a 3-D (unbatched) or 4-D (batched) input, got shape ", x.sizes());
    MIXPREC_CHECK(w.dim() == 4, "conv2d: expected a 4-D weight [out_channels, in_channels/groups, kH, kW], got shape ", w.sizes());
    detail::check_conv_dtypes("conv2d", x, w, b);
    const int64_t C = x.size(-3), H = x.size(-2), W = x.size(-1);
    MIXPREC_CHECK(w.size(0) % groups == 0, "conv2d: out_channels (", w.size(0), ", weight of shape ", w.sizes(),
                  ") must be divisible by groups=", groups);
    MIXPREC_CHECK(C == w.size(1) * groups, "conv2d: given groups=", groups, ", weight of shape ", w.sizes(), " expects input ",
                  x.sizes(), " to have ", w.size(1) * groups, " channels, but it has ", C);
    MIXPREC_CHECK(w.size(2) > 0 && w.size(3) > 0, "conv2d: empty kernel in weight of shape ", w.sizes());
    MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)), "conv2d: bias of shape ", b.sizes(),
                  " does not match weight of shape ", w.sizes(), " (expected [", w.size(0), "])");
    const int64_t ekh = dilation[0] * (w.size(2) - 1) + 1, ekw = dilation[1] * (w.size(3) - 1) + 1;
    MIXPREC_CHECK(H + 2 * padding[0] >= ekh && W + 2 * padding[1] >= ekw, "conv2d: padded input size (", H + 2 * padding[0], " x ",
                  W + 2 * padding[1], ") of input ", x.sizes(), " is smaller than the dilated kernel (", ekh, " x ", ekw,
                  ") of weight ", w.sizes());
    if (x.dim() == 3) return detail::conv2d_nchw("conv2d", x.unsqueeze(0), w, b, stride, padding, dilation, groups).squeeze(0);
    return detail::conv2d_nchw("conv2d", x, w, b, stride, padding, dilation, groups);
  }, input, weight, bias);
}

// torch.nn.functional.conv1d: input [N, C, L] (or [C, L]), weight [O, C/groups, K], bias [O].
// A view onto conv2d with a height-1 image.
inline Tensor conv1d(const Tensor& input, const Tensor& weight, const Tensor& bias = Tensor(), int64_t stride = 1, int64_t padding = 0,
                     int64_t dilation = 1, int64_t groups = 1) {
  return dispatch(OpId::conv1d, [=](const Tensor& x, const Tensor& w, const Tensor& b) {
    detail::check_conv_params("conv1d", {stride, stride}, {padding, padding}, {dilation, dilation}, groups);
    MIXPREC_CHECK(x.dim() == 2 || x.dim() == 3, "conv1d: expected a 2-D (unbatched) or 3-D (batched) input, got shape ", x.sizes());
    MIXPREC_CHECK(w.dim() == 3, "conv1d: expected a 3-D weight [out_channels, in_channels/groups, k], got shape ", w.sizes());
    detail::check_conv_dtypes("conv1d", x, w, b);
    const int64_t C = x.size(-2), L = x.size(-1);
    MIXPREC_CHECK(w.size(0) % groups == 0, "conv1d: out_channels (", w.size(0), ", weight of shape ", w.sizes(),
                  ") must be divisible by groups=", groups);
    MIXPREC_CHECK(C == w.size(1) * groups, "conv1d: given groups=", groups, ", weight of shape ", w.sizes(), " expects input ",
                  x.sizes(), " to have ", w.size(1) * groups, " channels, but it has ", C);
    MIXPREC_CHECK(w.size(2) > 0, "conv1d: empty kernel in weight of shape ", w.sizes());
    MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)), "conv1d: bias of shape ", b.sizes(),
                  " does not match weight of shape ", w.sizes(), " (expected [", w.size(0), "])");
    const int64_t ek = dilation * (w.size(2) - 1) + 1;
    MIXPREC_CHECK(L + 2 * padding >= ek, "conv1d: padded input length ", L + 2 * padding, " of input ", x.sizes(),
                  " is smaller than the dilated kernel (", ek, ") of weight ", w.sizes());
    const Tensor x4 = x.dim() == 2 ? x.unsqueeze(0).unsqueeze(2) : x.unsqueeze(2);
    Tensor y = detail::conv2d_nchw("conv1d", x4, w.unsqueeze(2), b, {1, stride}, {0, padding}, {1, dilation}, groups).squeeze(2);
    return x.dim() == 2 ? y.squeeze(0) : y;
  }, input, weight, bias);
}

// torch.nn.functional.conv_transpose2d (the adjoint of conv2d): input [N, C_in, H, W] (or
// unbatched), weight [C_in, C_out/groups, kH, kW], bias [C_out]. Output size per dim:
// (H - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1.
// Note the argument order follows conv2d (dilation before groups), unlike PyTorch's.
inline Tensor conv_transpose2d(const Tensor& input, const Tensor& weight, const Tensor& bias = Tensor(),
                               std::array<int64_t, 2> stride = {1, 1}, std::array<int64_t, 2> padding = {0, 0},
                               std::array<int64_t, 2> output_padding = {0, 0}, std::array<int64_t, 2> dilation = {1, 1},
                               int64_t groups = 1) {
  return dispatch(OpId::conv_transpose2d, [=](const Tensor& x_in, const Tensor& w, const Tensor& b) {
    const char* op = "conv_transpose2d";
    detail::check_conv_params(op, stride, padding, dilation, groups);
    MIXPREC_CHECK(x_in.dim() == 3 || x_in.dim() == 4, op, ": expected a 3-D (unbatched) or 4-D (batched) input, got shape ", x_in.sizes());
    MIXPREC_CHECK(w.dim() == 4, op, ": expected a 4-D weight [in_channels, out_channels/groups, kH, kW], got shape ", w.sizes());
    detail::check_conv_dtypes(op, x_in, w, b);
    for (int d = 0; d < 2; ++d)
      MIXPREC_CHECK(output_padding[d] >= 0 && (output_padding[d] < stride[d] || output_padding[d] < dilation[d]), op,
                    ": output_padding ", output_padding, " must be non-negative and smaller than either stride ", stride,
                    " or dilation ", dilation);
    const Tensor x = x_in.dim() == 3 ? x_in.unsqueeze(0) : x_in;
    MIXPREC_CHECK(x.size(1) == w.size(0), op, ": weight of shape ", w.sizes(), " expects input ", x_in.sizes(), " to have ", w.size(0),
                  " channels, but it has ", x.size(1));
    MIXPREC_CHECK(w.size(0) % groups == 0, op, ": in_channels (", w.size(0), ", weight of shape ", w.sizes(),
                  ") must be divisible by groups=", groups);
    MIXPREC_CHECK(w.size(2) > 0 && w.size(3) > 0, op, ": empty kernel in weight of shape ", w.sizes());
    const int64_t Cout = w.size(1) * groups;
    MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == Cout), op, ": bias of shape ", b.sizes(), " does not match weight of shape ",
                  w.sizes(), " (expected [", Cout, "])");
    detail::ConvGeom g;
    g.N = x.size(0), g.C = Cout, g.O = w.size(0), g.OH = x.size(2), g.OW = x.size(3);
    g.KH = w.size(2), g.KW = w.size(3);
    g.SH = stride[0], g.SW = stride[1], g.PH = padding[0], g.PW = padding[1], g.DH = dilation[0], g.DW = dilation[1], g.G = groups;
    g.H = (g.OH - 1) * g.SH - 2 * g.PH + g.DH * (g.KH - 1) + output_padding[0] + 1;
    g.W = (g.OW - 1) * g.SW - 2 * g.PW + g.DW * (g.KW - 1) + output_padding[1] + 1;
    MIXPREC_CHECK(g.H > 0 && g.W > 0, op, ": input ", x_in.sizes(), " with weight ", w.sizes(), ", stride ", stride, ", padding ",
                  padding, " and dilation ", dilation, " gives a non-positive output size (", g.H, " x ", g.W, ")");
    const Tensor xc = detail::contiguous_raw(x);
    Tensor y = detail::conv_backward_input(g, xc, w, b);
    if (autograd::should_record({x, w, b})) {
      const bool need_x = autograd::tensor_requires_grad(x), need_w = autograd::tensor_requires_grad(w),
                 need_b = autograd::tensor_requires_grad(b);
      autograd::record(op, {x, w, b}, {y},
                       [op, g, need_x, need_w, need_b, sx = autograd::SavedTensor(xc), sw = autograd::SavedTensor(w)](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
                         const Tensor& x = sx.get(op);
                         const Tensor& w = sw.get(op);
                         const Tensor gy = detail::contiguous_raw(detail::as_dtype_raw(grads[0], x.dtype()));
                         Tensor gx = need_x ? detail::conv_forward(g, gy, w, Tensor()) : Tensor();
                         Tensor gw = need_w ? detail::conv_backward_weight(g, gy, x, w.dtype()) : Tensor();
                         Tensor gb = need_b ? detail::conv_bias_grad(gy, w.dtype()) : Tensor();
                         return {gx, gw, gb};
                       });
    }
    return x_in.dim() == 3 ? y.squeeze(0) : y;
  }, input, weight, bias);
}

}  // namespace mixprec
