#pragma once
// The CPU's matmul entry (DeviceKernels::matmul): the batched product behind matmul, mm, bmm,
// linear, every backward and the composed attention, on the raw GEMMs of gemm.hpp. Here, not in
// ops/linalg.hpp, so the op body holds its checks and autograd and reaches this through the CPU's
// kernel table like any other device's kernel. 16-bit inputs accumulate in float32 and round
// once on store; float64 stays float64.
#include <algorithm>

#include "mixprec/backends/cpu/gemm.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/linalg.hpp"

namespace mixprec::cpu {

// A GELU fused into a linear's GEMM (the MLP's linear_gelu / linear_dgelu entries), applied to
// each tile of the result as it leaves the microkernel (avx512::TileEpilogue), so the GELU and its
// backward cost no pass over memory. Forward: pre receives the product (+ bias) as rounded to the
// output dtype and the tile becomes gelu(pre); backward: the tile (the hidden gradient, rounded)
// becomes tile * gelu'(pre). The same float math and the same roundings as gelu() and its
// backward after an unfused GEMM, so the results are bit-identical to the three ops.
struct GeluEpilogue {
  bool tanh = false, backward = false;
  Tensor pre;  // forward: allocated and written by the kernel; backward: read, the result's layout
};

namespace detail {
template <class T>
struct GeluTile {
  T* base;   // where the GEMM writes: the pre-activation (forward) or the hidden gradient (backward)
  T* other;  // forward: the result gelu(pre); backward: the saved pre-activation
  int64_t ld;
  bool tanh, backward;
};
// The whole tile (<= 12 x 32) is gathered into float32 buffers, computed in one vectorised loop and
// written back: per-row calls (a conversion and a loop of two vectors each) cost more than the
// GELU. bfloat16 widens and rounds inline (the scalar conversions' formulas, which the SIMD
// conversions match bit for bit); float16 goes through the bulk conversions. Forward, the GEMM
// has written the rounded pre-activation where the backward will read it, and the GELU goes to
// the result: no copy of the tile.
template <class T, bool Tanh, bool Backward>
void gelu_tile(const void* ctx, void* tile, int64_t mr, int64_t nr) {
  const auto& g = *static_cast<const GeluTile<T>*>(ctx);
  T* const t = static_cast<T*>(tile);
  T* const o = g.other + (t - g.base);
  T* const dst = Backward ? t : o;
  const int64_t ld = g.ld;
  alignas(64) float v[avx512::kMR * avx512::kNR], d[avx512::kMR * avx512::kNR];
  const int64_t n = mr * nr;
  simd([&]() MIXPREC_SIMD_BODY {
    for (int64_t i = 0; i < mr; ++i) {
      const T* row = t + i * ld;
      const T* orow = o + i * ld;
      float* vr = v + i * nr;
      float* dr = d + i * nr;
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t j = 0; j < nr; ++j) vr[j] = row[j];
        if constexpr (Backward)
          for (int64_t j = 0; j < nr; ++j) dr[j] = orow[j];
      } else if constexpr (std::is_same_v<T, bfloat16>) {
        for (int64_t j = 0; j < nr; ++j) vr[j] = mixprec::detail::bfloat16_bits_to_float(row[j].x);
        if constexpr (Backward)
          for (int64_t j = 0; j < nr; ++j) dr[j] = mixprec::detail::bfloat16_bits_to_float(orow[j].x);
      }
    }
  });
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, bfloat16>) {
    for (int64_t i = 0; i < mr; ++i) {
      convert(t + i * ld, v + i * nr, nr);
      if constexpr (Backward) convert(o + i * ld, d + i * nr, nr);
    }
  }
  simd([&]() MIXPREC_SIMD_BODY {
    for (int64_t k = 0; k < n; ++k) {
      if constexpr (Backward) v[k] = v[k] * (Tanh ? fn::gelu_tanh_grad(d[k]) : fn::gelu_grad(d[k]));
      else v[k] = Tanh ? fn::gelu_tanh(v[k]) : fn::gelu(v[k]);
    }
    for (int64_t i = 0; i < mr; ++i) {
      T* row = dst + i * ld;
      const float* vr = v + i * nr;
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t j = 0; j < nr; ++j) row[j] = vr[j];
      } else if constexpr (std::is_same_v<T, bfloat16>) {
        for (int64_t j = 0; j < nr; ++j) row[j] = bfloat16::from_bits(mixprec::detail::float_to_bfloat16_bits(vr[j]));
      }
    }
  });
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, bfloat16>)
    for (int64_t i = 0; i < mr; ++i) convert(v + i * nr, dst + i * ld, nr);
}
// Where the GEMM writes and what the hook reads or writes beside it: forward, the GEMM writes the
// pre-activation (kept for the backward) and the hook the result; backward, the GEMM writes the
// result and the hook reads pre. Without a GELU, base is the result.
template <class T>
GeluTile<T> gelu_context(const GeluEpilogue* epi, const Tensor& out, int64_t N) {
  T* const res = out.data<T>();
  if (!epi) return {res, nullptr, N, false, false};
  T* const pre = epi->pre.data<T>();
  return epi->backward ? GeluTile<T>{res, pre, N, epi->tanh, true} : GeluTile<T>{pre, res, N, epi->tanh, false};
}
template <class T>
avx512::TileEpilogue gelu_epilogue(const GeluTile<T>& ctx) {
  using Fn = void (*)(const void*, void*, int64_t, int64_t);
  const Fn f = ctx.backward ? (ctx.tanh ? Fn(&gelu_tile<T, true, true>) : Fn(&gelu_tile<T, false, true>))
                            : (ctx.tanh ? Fn(&gelu_tile<T, true, false>) : Fn(&gelu_tile<T, false, false>));
  return {f, &ctx};
}
}  // namespace detail

// a[..., M, K] @ b[..., K, N] with broadcast batch dims, any strides; a and b of one floating
// dtype (the op checked it). If `bias` is given it is broadcast into the output first and the
// product accumulated onto it (linear's fused bias). With epi (one 2-D product of float32 or
// 16-bit operands on an AVX-512 CPU: see linear_gelu_supported) the GELU is applied per tile.
inline bool linear_gelu_supported(DType d) { return gemm_16bit_available() && (d == DType::Float32 || is_low_precision(d)); }
inline Tensor matmul_kernel(Tensor a, Tensor b, const Tensor& bias, GeluEpilogue* epi = nullptr) {
  namespace md = mixprec::detail;
  constexpr const char* op = "matmul";
  const DType out_dtype = a.dtype();
  const bool low = is_low_precision(out_dtype);
  // The AVX-512 kernel reads 16-bit operands itself; elsewhere they are widened to float32 here.
  const bool direct16 = low && gemm_16bit_available();
  if (low && !direct16) {
    a = md::as_dtype_raw(a, DType::Float32);
    b = md::as_dtype_raw(b, DType::Float32);
  }
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  const Shape ba(a.sizes().begin(), a.sizes().end() - 2), bb(b.sizes().begin(), b.sizes().end() - 2);
  const Shape batch = broadcast_shapes(ba, bb, op);
  Shape out_shape = batch;
  out_shape.push_back(M);
  out_shape.push_back(N);
  auto prep = [&](Tensor t, int64_t r, int64_t c) {
    if (!gemm_compatible(t.stride(-2), t.stride(-1), r, c)) t = t.contiguous();
    Shape s = batch;
    s.push_back(r);
    s.push_back(c);
    return md::expand_raw(t, s);
  };
  const int64_t nb = numel_of(batch);
  const bool acc = bias.defined();
  MIXPREC_CHECK(!epi || (nb == 1 && K > 0 && linear_gelu_supported(out_dtype) && (!acc || bias.dim() <= 1)), op,
                ": a fused GELU needs one 2-D product with K > 0 of float32 or 16-bit operands on an AVX-512 CPU, got ", a.sizes(), " @ ",
                b.sizes(), " in ", out_dtype);
  if (epi && !epi->backward) epi->pre = empty(out_shape, out_dtype);
  if (epi && epi->backward)
    MIXPREC_CHECK(epi->pre.sizes() == out_shape && epi->pre.dtype() == out_dtype && epi->pre.is_contiguous(), op,
                  ": the GELU's input must be contiguous ", out_shape, " in ", out_dtype, ", got ", epi->pre.sizes(), " in ",
                  epi->pre.dtype());
  // A row-vector bias goes to the GEMM as its addend (float32 [N]), not written into the result
  // first: that pass wrote and re-read the whole float32 result. float64 keeps the pass.
  const bool row_bias = acc && bias.dim() <= 1 && (direct16 || out_dtype == DType::Float32);
  const Tensor bias_row = row_bias ? md::as_dtype_raw(md::expand_raw(bias, {N}), DType::Float32).contiguous() : Tensor();
  const float* const bias_ptr = row_bias ? bias_row.data<float>() : nullptr;
  const bool accumulate = acc && !row_bias;
  // One 16-bit product (linear): float32 accumulators for a block of rows at a time, in a scratch
  // that stays in cache, each tile rounded into the result as it finishes -- no float32 copy of
  // the whole result (its memory, and one more pass over it).
  if (direct16 && nb == 1 && M * N > 0 && (!acc || bias.dim() <= 1)) {
    Tensor out = empty(out_shape, out_dtype);
    const Tensor A = prep(a, M, K), B = prep(b, K, N);
    // <= 2 MiB of float32 (in L3, each thread's half near L2); B is packed again per block, so not smaller.
    const int64_t rows = std::min(M, std::max<int64_t>(48, (int64_t{1} << 19) / N));
    const Tensor scratch = empty({rows, N}, DType::Float32);
    dispatch_floating(a.dtype(), op, [&]<class T>() {
      if constexpr (!std::is_same_v<T, acc_t<T>>) {
        const detail::GeluTile<T> ctx = detail::gelu_context<T>(epi, out, N);
        const avx512::TileEpilogue hook = epi ? detail::gelu_epilogue(ctx) : avx512::TileEpilogue{};
        for (int64_t r0 = 0; r0 < M; r0 += rows)
          gemm_16bit<T>(A.data<T>() + r0 * A.stride(-2), A.stride(-2), A.stride(-1), B.data<T>(), B.stride(-2), B.stride(-1),
                        scratch.data<float>(), std::min(rows, M - r0), N, K, false, ctx.base + r0 * N, epi ? &hook : nullptr, bias_ptr);
      }
    });
    return out;
  }
  Tensor out = empty(out_shape, low ? DType::Float32 : a.dtype());
  if (accumulate) md::copy_kernel(out, md::as_dtype_raw(bias, out.dtype()));
  if (out.numel() == 0) return low ? md::as_dtype_raw(out, out_dtype) : out;
  const Tensor A = prep(a, M, K), B = prep(b, K, N);
  dispatch_floating(a.dtype(), op, [&]<class T>() {
    const T* pa = A.data<T>();
    const T* pb = B.data<T>();
    acc_t<T>* pc = out.data<acc_t<T>>();
    const int64_t nd = static_cast<int64_t>(batch.size());
    auto batch_offsets = [&](int64_t i, int64_t& oa, int64_t& ob) {
      oa = ob = 0;
      for (int64_t d = nd - 1; d >= 0; --d) {
        const int64_t ix = i % batch[d];
        i /= batch[d];
        oa += ix * A.stride(d);
        ob += ix * B.stride(d);
      }
    };
    auto one = [&](int64_t i) {
      int64_t oa, ob;
      batch_offsets(i, oa, ob);
      if constexpr (std::is_same_v<T, float>) {
        const detail::GeluTile<float> ctx = detail::gelu_context<float>(epi, out, N);  // epi: one product (nb == 1)
        const avx512::TileEpilogue hook = epi ? detail::gelu_epilogue(ctx) : avx512::TileEpilogue{};
        gemm<T>(pa + oa, A.stride(-2), A.stride(-1), pb + ob, B.stride(-2), B.stride(-1), ctx.base + i * M * N, M, N, K, accumulate,
                epi ? &hook : nullptr, bias_ptr);
      } else if constexpr (std::is_same_v<T, acc_t<T>>)
        gemm<T>(pa + oa, A.stride(-2), A.stride(-1), pb + ob, B.stride(-2), B.stride(-1), pc + i * M * N, M, N, K, accumulate);
      else
        gemm_16bit<T>(pa + oa, A.stride(-2), A.stride(-1), pb + ob, B.stride(-2), B.stride(-1), pc + i * M * N, M, N, K, accumulate,
                      nullptr, nullptr, bias_ptr);
    };
    // Small matrices (attention heads): one matrix per thread. Large: the GEMM threads inside.
    if (nb > 1 && M * N * K < (int64_t{1} << 21)) {
      parallel_for(0, nb, 1, [&](int64_t b0, int64_t e0) {
        for (int64_t i = b0; i < e0; ++i) one(i);
      });
    } else {
      for (int64_t i = 0; i < nb; ++i) one(i);
    }
  });
  return low ? md::as_dtype_raw(out, out_dtype) : out;
}

// The MLP's GEMMs with the GELU applied per tile (GeluEpilogue); undefined results, so that
// mlp_gelu composes linear, gelu and linear, where the CPU lacks AVX-512 or the dtype is float64.
inline std::array<Tensor, 2> linear_gelu(const Tensor& x, const Tensor& w1, const Tensor& b1, DeviceUnary act) {
  if (!linear_gelu_supported(x.dtype()) || x.size(-1) == 0) return {};
  GeluEpilogue e{act == DeviceUnary::GeluTanh, false, {}};
  Tensor h = matmul_kernel(x, mixprec::detail::mT(w1), b1, &e);
  return {h, e.pre};
}
inline std::array<Tensor, 2> linear_dgelu(const Tensor& g, const Tensor& w2, const Tensor& pre, DeviceUnary act) {
  if (!linear_gelu_supported(g.dtype()) || g.size(-1) == 0 || !pre.is_contiguous()) return {};
  GeluEpilogue e{act == DeviceUnary::GeluTanh, true, pre};
  Tensor dpre = matmul_kernel(g, w2, Tensor(), &e);
  Tensor gb1 = sum(dpre, {0});  // as linear's backward sums its output gradient
  return {dpre, gb1};
}

inline void fill_linalg_kernels(DeviceKernels& t) {
  t.matmul = [](const Tensor& a, const Tensor& b, const Tensor& bias) { return matmul_kernel(a, b, bias); };
  t.linear_gelu = linear_gelu;
  t.linear_dgelu = linear_dgelu;
}

}  // namespace mixprec::cpu
