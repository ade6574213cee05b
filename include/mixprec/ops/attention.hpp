#pragma once
// scaled_dot_product_attention, fused and memory-lean (FlashAttention-2 style on the CPU):
// queries are processed in blocks with an online softmax, so the [L, S] probability matrix is
// never stored; backward recomputes each block's probabilities from the saved row logsumexp.
// Everything is computed in acc_t (float for 16-bit inputs, double for double) through the
// shared GEMM, and rounded once on store. Dropout uses a counter-based hash of (seed, position),
// so backward regenerates the same mask without saving it and the result does not depend on
// how blocks are split across threads.
#include <algorithm>
#include <limits>

#include "mixprec/ops/activation.hpp"
#include "mixprec/ops/shape.hpp"

namespace mixprec {

namespace detail {
inline constexpr int64_t kSdpaBlockQ = 64;   // query rows per task: one [64, E] panel of Q
inline constexpr int64_t kSdpaBlockK = 128;  // keys per step: the score block stays in L2

// Attention's dropout is dropout's rule (ops/activation.hpp), on host and device alike: the CUDA
// kernel (backends/cuda/attention.cuh) drops the very same elements of the flattened [B, L, S]
// probabilities.
MIXPREC_HOST_DEVICE uint64_t sdpa_hash(uint64_t seed, uint64_t i) { return dropout_hash(seed, i); }
inline bool sdpa_dropout_keep(uint64_t seed, uint64_t i, double p) { return dropout_keep(seed, i, p); }
// The same rule in integers, for kernels: keep iff (hash >> 11) >= this. Exact, since
// x * 2^-53 >= p  <=>  x >= ceil(p * 2^53) for an integer x, and p * 2^53 is exact in double.
inline uint64_t sdpa_dropout_threshold(double p) { return p <= 0 ? 0 : static_cast<uint64_t>(std::ceil(std::ldexp(p, 53))); }

// A batch of matrices with unit column stride: element (b, r, c) is at data + off[b] + r * rs + c.
template <class C>
struct SdpaMat {
  Tensor keep;  // owns the (possibly converted) data
  const C* data = nullptr;
  std::vector<int64_t> off;
  int64_t rs = 0;
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

template <class C>
SdpaMat<C> sdpa_mat(const Tensor& t, const Shape& batch) {
  const int64_t rows = t.size(-2), cols = t.size(-1);
  const bool usable = t.dtype() == dtype_of<C> && (t.stride(-1) == 1 || cols <= 1) &&
                      (rows <= 1 || t.stride(-2) >= std::max<int64_t>(cols, 1));
  SdpaMat<C> m;
  m.keep = usable ? t : contiguous_raw(t, dtype_of<C>);
  Shape full = batch;
  full.push_back(rows);
  full.push_back(cols);
  const Tensor e = expand_raw(m.keep, full);
  m.data = m.keep.template data<C>();
  m.off = sdpa_batch_offsets(e, batch);
  m.rs = e.stride(-2);
  return m;
}

template <class C>
struct SdpaProblem {
  int64_t B = 0, L = 0, S = 0, E = 0, Ev = 0;
  SdpaMat<C> q, k, v;
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
    cpu::gemm<C>(q.data + q.off[b] + i0 * q.rs, q.rs, 1, k.data + k.off[b] + j0 * k.rs, 1, k.rs, s, nq, nk, E, false);
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
        for (int64_t c = 0; c < nk; ++c) row[c] *= scale;
      }
      if (causal)
        for (int64_t c = std::max<int64_t>(0, i - j0 + 1); c < nk; ++c) row[c] = ninf;
    }
  }
};

// Runs f(task, scratch) for tasks [0, n), dealt round-robin to threads: causal blocks grow
// with the row index, and round-robin keeps the threads' shares even.
template <class C, class F>
void sdpa_for_tasks(int64_t n, double flops_per_task, std::size_t scratch, F f) {
  const bool small = flops_per_task * static_cast<double>(n) < 2e5;
  const int64_t nt = small ? 1 : std::min<int64_t>(cpu::num_threads(), n);
  cpu::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    std::vector<C> buf(scratch);
    for (int64_t slot = b; slot < e; ++slot)
      for (int64_t t = slot; t < n; t += nt) f(t, buf.data());
  });
}

template <class C>
void sdpa_forward_kernel(const SdpaProblem<C>& P, C* out, C* lse) {
  constexpr int64_t BQ = kSdpaBlockQ, BK = kSdpaBlockK;
  const int64_t nqb = (P.L + BQ - 1) / BQ;
  const std::size_t scratch = static_cast<std::size_t>(BQ * BK + BQ * P.Ev + 2 * BQ);
  const double flops = 2.0 * static_cast<double>(BQ * P.S * (P.E + P.Ev));
  sdpa_for_tasks<C>(P.B * nqb, flops, scratch, [&](int64_t t, C* buf) {
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
        // NaN-propagating max: a NaN score must reach the output (overflow checks rely on it),
        // not be skipped as if the row were masked.
        auto nanmax = [](C a, C b) { return a != a || a > b ? a : b; };
        C mx = ninf;
        for (int64_t c = 0; c < nk; ++c) mx = nanmax(mx, row[c]);
        const C mnew = nanmax(m[r], mx);
        if (mnew == ninf) {  // everything so far is masked: contributes nothing
          std::fill(row, row + nk, C(0));
          continue;
        }
        const C alpha = std::exp(m[r] - mnew);
        C sum = 0;
        for (int64_t c = 0; c < nk; ++c) {
          const C e = std::exp(row[c] - mnew);
          sum += e;
          row[c] = e;
        }
        if (P.p > 0)
          for (int64_t c = 0; c < nk; ++c) row[c] = P.keep(b, i0 + r, j0 + c) ? row[c] * P.keep_scale : C(0);
        l[r] = l[r] * alpha + sum;
        if (alpha != C(1))
          for (int64_t c = 0; c < P.Ev; ++c) o[r * P.Ev + c] *= alpha;
        m[r] = mnew;
      }
      cpu::gemm<C>(s, nk, 1, P.v.data + P.v.off[b] + j0 * P.v.rs, P.v.rs, 1, o, nq, P.Ev, nk, true);
    }
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t row = b * P.L + i0 + r;
      // A fully masked row attends to nothing: output 0, and lse = +inf makes its
      // recomputed probabilities 0 in backward.
      const C inv = l[r] > 0 ? C(1) / l[r] : C(0);
      for (int64_t c = 0; c < P.Ev; ++c) out[row * P.Ev + c] = o[r * P.Ev + c] * inv;
      lse[row] = l[r] > 0 ? m[r] + std::log(l[r]) : std::numeric_limits<C>::infinity();
    }
  });
}

// Gradients of one (query block, key block) pair. dq/dk/dv/dm are [B, L|S, ...] buffers; a
// caller passes want_dq / want_dkv so that no two threads write the same rows.
template <class C>
struct SdpaBackward {
  const SdpaProblem<C>& P;
  const C* dout;  // [B, L, Ev] contiguous
  const C* lse;   // [B, L]
  const C* D;     // [B, L]: rowsum(dout * out)
  C *dq, *dk, *dv, *dm;

  void block(int64_t b, int64_t i0, int64_t nq, int64_t j0, int64_t nk, bool want_dq, bool want_dkv, C* s, C* dp) const {
    P.logits(b, i0, nq, j0, nk, s);
    for (int64_t r = 0; r < nq; ++r) {
      const C z = lse[b * P.L + i0 + r];
      for (int64_t c = 0; c < nk; ++c) s[r * nk + c] = std::exp(s[r * nk + c] - z);
    }
    const C* go = dout + (b * P.L + i0) * P.Ev;
    const bool drop = P.p > 0;
    if (want_dkv) {
      const C* pd = s;
      if (drop) {
        for (int64_t r = 0; r < nq; ++r)
          for (int64_t c = 0; c < nk; ++c)
            dp[r * nk + c] = P.keep(b, i0 + r, j0 + c) ? s[r * nk + c] * P.keep_scale : C(0);
        pd = dp;
      }
      cpu::gemm<C>(pd, 1, nk, go, P.Ev, 1, dv + (b * P.S + j0) * P.Ev, nk, P.Ev, nq, true);
    }
    cpu::gemm<C>(go, P.Ev, 1, P.v.data + P.v.off[b] + j0 * P.v.rs, 1, P.v.rs, dp, nq, nk, P.Ev, false);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r;
      const C Di = D[b * P.L + i];
      for (int64_t c = 0; c < nk; ++c) {
        C d = dp[r * nk + c];
        if (drop) d = P.keep(b, i, j0 + c) ? d * P.keep_scale : C(0);
        const C ds = s[r * nk + c] * (d - Di);
        if (dm && want_dkv) dm[(b * P.L + i) * P.S + j0 + c] = ds;
        dp[r * nk + c] = ds * P.scale;
      }
    }
    if (want_dq) cpu::gemm<C>(dp, nk, 1, P.k.data + P.k.off[b] + j0 * P.k.rs, P.k.rs, 1, dq + (b * P.L + i0) * P.E, nq, P.E, nk, true);
    if (want_dkv) cpu::gemm<C>(dp, 1, nk, P.q.data + P.q.off[b] + i0 * P.q.rs, P.q.rs, 1, dk + (b * P.S + j0) * P.E, nk, P.E, nq, true);
  }

  void run() const {
    constexpr int64_t BQ = kSdpaBlockQ, BK = kSdpaBlockK;
    const int64_t nqb = (P.L + BQ - 1) / BQ, nkb = (P.S + BK - 1) / BK;
    const std::size_t scratch = static_cast<std::size_t>(2 * BQ * BK);
    const double block_flops = 2.0 * static_cast<double>(BQ * BK * (2 * P.E + 3 * P.Ev));
    if (P.B >= cpu::num_threads()) {
      // One batch entry per task: every buffer row is written by one thread.
      sdpa_for_tasks<C>(P.B, block_flops * static_cast<double>(nqb * nkb), scratch, [&](int64_t b, C* buf) {
        for (int64_t kb = 0; kb < nkb; ++kb)
          for (int64_t qb = 0; qb < nqb; ++qb) {
            const int64_t i0 = qb * BQ, nq = std::min(BQ, P.L - i0), j0 = kb * BK;
            if (P.key_end(i0 + nq) <= j0) continue;
            block(b, i0, nq, j0, std::min(BK, P.key_end(i0 + nq) - j0), true, true, buf, buf + BQ * BK);
          }
      });
      return;
    }
    // Few batch entries: split over key blocks for dK/dV, then over query blocks for dQ
    // (recomputing the scores once more beats serialising on a shared dQ).
    sdpa_for_tasks<C>(P.B * nkb, block_flops * static_cast<double>(nqb), scratch, [&](int64_t t, C* buf) {
      const int64_t b = t / nkb, j0 = (t % nkb) * BK;
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * BQ, nq = std::min(BQ, P.L - i0);
        if (P.key_end(i0 + nq) <= j0) continue;
        block(b, i0, nq, j0, std::min(BK, P.key_end(i0 + nq) - j0), false, true, buf, buf + BQ * BK);
      }
    });
    sdpa_for_tasks<C>(P.B * nqb, block_flops * static_cast<double>(nkb), scratch, [&](int64_t t, C* buf) {
      const int64_t b = t / nqb, i0 = (t % nqb) * BQ, nq = std::min(BQ, P.L - i0);
      const int64_t kend = P.key_end(i0 + nq);
      for (int64_t j0 = 0; j0 < kend; j0 += BK) block(b, i0, nq, j0, std::min(BK, kend - j0), true, false, buf, buf + BQ * BK);
    });
  }
};

template <class C>
SdpaProblem<C> sdpa_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch,
                            bool causal, double scale, double p, uint64_t seed) {
  SdpaProblem<C> P;
  P.B = numel_of(batch);
  P.L = q.size(-2);
  P.S = k.size(-2);
  P.E = q.size(-1);
  P.Ev = v.size(-1);
  P.q = sdpa_mat<C>(q, batch);
  P.k = sdpa_mat<C>(k, batch);
  P.v = sdpa_mat<C>(v, batch);
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
}  // namespace detail

namespace detail {
// The CPU forward: {out [batch..., L, Ev] in q's dtype, row logsumexp [batch..., L] in the
// accumulation dtype (float32, or float64 for float64)}.
inline std::array<Tensor, 2> sdpa_cpu_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch,
                                              bool is_causal, double sc, double dropout_p, uint64_t seed) {
  constexpr const char* op = "scaled_dot_product_attention";
  const int64_t L = q.size(-2), Ev = v.size(-1);
  Shape out_shape = batch;
  out_shape.push_back(L);
  out_shape.push_back(Ev);
  Shape lse_shape = batch;
  lse_shape.push_back(L);
  const DType T = q.dtype();
  const DType C = T == DType::Float64 ? DType::Float64 : DType::Float32;
  Tensor out = empty(out_shape, T);
  Tensor lse = empty(lse_shape, C);
  Tensor acc = T == C ? out : empty(out_shape, C);
  dispatch_floating(C, op, [&]<class CT>() {
    if constexpr (std::is_same_v<CT, float> || std::is_same_v<CT, double>) {
      const auto P = sdpa_problem<CT>(q, k, v, mask, batch, is_causal, sc, dropout_p, seed);
      if (P.B * L > 0) sdpa_forward_kernel<CT>(P, acc.data<CT>(), lse.data<CT>());
    }
  });
  if (!acc.is_same(out)) copy_kernel(out, acc);
  return {out, lse};
}

// The CPU backward from sdpa_cpu_forward's out and lse: {dq, dk, dv, dmask (when mask_grad)} in
// lse's dtype and the full batch shapes (broadcasts not yet summed).
inline std::array<Tensor, 4> sdpa_cpu_backward(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask,
                                               const Tensor& out, const Tensor& lse, const Shape& batch, bool is_causal, double sc,
                                               double dropout_p, uint64_t seed, bool mask_grad) {
  const DType C = lse.dtype();
  const int64_t B = numel_of(batch), L = q.size(-2), S = k.size(-2), E = q.size(-1), Ev = v.size(-1);
  Shape bq = batch, bk = batch, bv = batch, bm = batch;
  bq.insert(bq.end(), {L, E});
  bk.insert(bk.end(), {S, E});
  bv.insert(bv.end(), {S, Ev});
  bm.insert(bm.end(), {L, S});
  Tensor dq = zeros(bq, C), dk = zeros(bk, C), dv = zeros(bv, C);
  Tensor dm = mask_grad ? zeros(bm, C) : Tensor();
  const Tensor go = contiguous_raw(grad, C);
  const Tensor o = contiguous_raw(out, C);
  Tensor D = empty({B, L}, C);
  dispatch_floating(C, "scaled_dot_product_attention_backward", [&]<class CT>() {
    if constexpr (std::is_same_v<CT, float> || std::is_same_v<CT, double>) {
      if (B * L == 0 || S == 0) return;
      const CT* gp = go.data<CT>();
      const CT* op_ = o.data<CT>();
      CT* Dp = D.data<CT>();
      cpu::parallel_for(0, B * L, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(Ev, 1)), [&](int64_t b0, int64_t e0) {
        for (int64_t r = b0; r < e0; ++r) {
          CT s = 0;
          for (int64_t c = 0; c < Ev; ++c) s += gp[r * Ev + c] * op_[r * Ev + c];
          Dp[r] = s;
        }
      });
      const auto P = sdpa_problem<CT>(q, k, v, mask, batch, is_causal, sc, dropout_p, seed);
      SdpaBackward<CT>{P, gp, lse.data<CT>(), Dp, dq.data<CT>(), dk.data<CT>(), dv.data<CT>(), dm.defined() ? dm.data<CT>() : nullptr}.run();
    }
  });
  return {dq, dk, dv, dm};
}

// Whether a device's fused attention entries take this call (their contract in
// backends/device.hpp): no mask, one head dim E == Ev that is a multiple of 8 up to 128, and a
// dtype the device kernels store. Everything else takes the composed path.
inline bool sdpa_fused_supported(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  const DeviceKernels* kt = device_kernels(q.device());
  const int64_t E = q.size(-1);
  const DType d = q.dtype();
  return kt && kt->sdpa_forward && kt->sdpa_backward && !mask.defined() && k.size(-1) == E && v.size(-1) == E && E > 0 &&
         E % 8 == 0 && E <= 128 && (d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16);
}

// The fused path on a device: one kernel each way and one graph node, the seed drawn where the
// composed path and the CPU draw it.
inline Tensor sdpa_device_fused(const Tensor& q, const Tensor& k, const Tensor& v, const Shape& batch, bool is_causal, double sc,
                                double dropout_p) {
  constexpr const char* op = "scaled_dot_product_attention";
  // A captured graph would replay the seed recorded here, one dropout mask for every replay (the
  // kernels do not mix in the replay counter yet): refused before the draw, as the composed path
  // refuses its host-built mask.
  MIXPREC_CHECK(!(dropout_p > 0 && capturing()), op, ": dropout_p ", dropout_p, " on query ", q.sizes(),
                " inside a CapturedStep is not supported yet; use dropout_p = 0 in the captured step");
  const uint64_t seed = dropout_p > 0 ? default_generator().next_u64() : 0;
  auto expanded = [batch](const Tensor& t) {
    Shape s = batch;
    s.push_back(t.size(-2));
    s.push_back(t.size(-1));
    return expand_raw(t, s);
  };
  const std::array<Tensor, 2> fwd =
      device_kernel(op, q, &DeviceKernels::sdpa_forward)(expanded(q), expanded(k), expanded(v), is_causal, sc, dropout_p, seed);
  const Tensor &out = fwd[0], &lse = fwd[1];
  if (autograd::should_record({q, k, v})) {
    autograd::record(op, {q, k, v}, {out},
                     [sq = autograd::SavedTensor(q), sk = autograd::SavedTensor(k), sv = autograd::SavedTensor(v),
                      so = autograd::SavedTensor(out), lse, expanded, is_causal, sc, dropout_p,
                      seed](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       const Tensor& q = sq.get(op);
                       const Tensor& k = sk.get(op);
                       const Tensor& v = sv.get(op);
                       const Tensor grad = g[0].dtype() == q.dtype() ? g[0] : as_dtype_raw(g[0], q.dtype());
                       const auto [dq, dk, dv] = device_kernel(op, q, &DeviceKernels::sdpa_backward)(
                           grad, expanded(q), expanded(k), expanded(v), so.get(op), lse, is_causal, sc, dropout_p, seed);
                       return {sum_to(dq, q.sizes()), sum_to(dk, k.sizes()), sum_to(dv, v.sizes())};
                     });
  }
  return out;
}
}  // namespace detail

namespace detail {
// scaled_dot_product_attention on a device: the device's fused kernels where they take the call
// (sdpa_fused_supported), else composed from routed ops that each have their own
// backward: (q * scale) k^T in the inputs' dtype (float32 accumulation, rounded on store, as
// PyTorch's math path under autocast), masked and softmaxed in float32, the probabilities rounded
// back for the product with v. It holds the [..., L, S] scores where the CPU's fused kernel holds
// one block. Masks and dropout are built on the host with the CPU's rules and draws (the same
// keys dropped, rows with no key left giving 0 and no gradient) and copied over. Masking adds
// -inf where the CPU skips the key, so a non-finite score at a masked position (an input that
// has already overflowed) makes its row NaN here.
inline Tensor sdpa_device(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch, bool is_causal,
                          double sc, double dropout_p) {
  constexpr const char* op = "scaled_dot_product_attention";
  const Device dev = common_device(op, {&q, &k, &v});
  MIXPREC_CHECK(!mask.defined() || mask.device() == Device::CPU || mask.device() == dev, op, ": query on ", dev,
                " and attn_mask on ", mask.device());
  (void)device_kernel(op, q, &DeviceKernels::softmax);  // no backend: refuse here, by this op's name
  if (sdpa_fused_supported(q, k, v, mask)) return sdpa_device_fused(q, k, v, batch, is_causal, sc, dropout_p);
  const int64_t L = q.size(-2), S = k.size(-2), B = numel_of(batch);
  Shape full = batch;
  full.push_back(L);
  full.push_back(S);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  Tensor additive;  // float32 on the host: 0 or -inf (bool, causal) or the mask's values
  Tensor live;      // float32 [batch..., L, 1] on the host: 0 for a row with no key left, else 1
  bool mask_on_graph = false;  // a float mask that needs its gradient goes in through the graph
  if (is_causal) {
    additive = empty({L, S}, DType::Float32);
    float* a = additive.data<float>();
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < S; ++j) a[i * S + j] = j <= i ? 0.0f : kNegInf;  // key 0 stays: no row is empty
  } else if (mask.defined()) {
    const Tensor mh = expand_raw(move_raw(mask, Device::CPU, op), full);
    additive = empty(full, DType::Float32);
    float* a = additive.data<float>();
    if (mask.dtype() == DType::Bool) {
      const Tensor mb = contiguous_raw(mh);
      const bool* m = mb.data<bool>();
      for (int64_t i = 0; i < additive.numel(); ++i) a[i] = m[i] ? 0.0f : kNegInf;
    } else {
      detail::copy_kernel(additive, mh);
    }
    bool any_dead = false;
    Shape rows = batch;
    rows.insert(rows.end(), {L, 1});
    live = empty(rows, DType::Float32);
    float* lv = live.data<float>();
    for (int64_t r = 0; r < B * L; ++r) {
      float* row = a + r * S;
      const bool dead = S > 0 && std::all_of(row, row + S, [](float x) { return x == kNegInf; });
      lv[r] = dead ? 0.0f : 1.0f;
      if (dead) std::fill(row, row + S, 0.0f);  // softmax over zeros, then zeroed by `live`
      any_dead = any_dead || dead;
    }
    if (!any_dead) live = Tensor();
    mask_on_graph = mask.is_floating_point() && autograd::should_record({mask});
    MIXPREC_CHECK(!(mask_on_graph && any_dead), op, ": on ", dev, ", a float attn_mask that requires grad may not mask every key of "
                  "a row (shape ", mask.sizes(), "); use a bool mask, or detach it");
  }
  // Every refusal is behind us: the op's one draw, where the CPU makes it.
  const uint64_t seed = dropout_p > 0 ? default_generator().next_u64() : 0;
  Tensor factor = live;  // what the probabilities are multiplied by: live rows, dropout's keep / (1 - p)
  if (dropout_p > 0) {
    const float keep_scale = dropout_p < 1 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.0f;
    factor = empty(full, DType::Float32);
    float* f = factor.data<float>();
    const float* lv = live.defined() ? live.data<float>() : nullptr;  // one value per row of S
    cpu::parallel_for(0, factor.numel(), kParallelGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        f[i] = sdpa_dropout_keep(seed, static_cast<uint64_t>(i), dropout_p) ? keep_scale * (lv ? lv[i / S] : 1.0f) : 0.0f;
    });
  }
  // q is scaled first, so 16-bit scores stay in range where q k^T alone might overflow float16.
  Tensor scores = cast(matmul(mul(q, sc), k.transpose(-2, -1)), DType::Float32);
  if (mask_on_graph) scores = add(scores, cast(mask, DType::Float32).to(dev));
  else if (additive.defined()) scores = add(scores, move_raw(additive, dev, op));
  Tensor probs = softmax(scores, -1);
  if (factor.defined()) probs = mul(probs, move_raw(factor, dev, op));
  return matmul(cast(probs, q.dtype()), v);
}
}  // namespace detail

// softmax(q k^T * scale + mask) v over the last two dims, batch dims broadcast, as
// torch.nn.functional.scaled_dot_product_attention: q [..., L, E], k [..., S, E], v [..., S, Ev]
// -> [..., L, Ev]. attn_mask is bool (true = take part) or additive float, broadcastable to
// [..., L, S]; is_causal keeps key j for query i when j <= i (top-left aligned when L != S).
// scale defaults to 1/sqrt(E). Rows with every key masked give 0 (and no gradient), as
// PyTorch's math backend since 2.5.
inline Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& attn_mask = Tensor(),
                                           double dropout_p = 0.0, bool is_causal = false,
                                           std::optional<double> scale = std::nullopt) {
  return dispatch(OpId::scaled_dot_product_attention, [dropout_p, is_causal, scale](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
    constexpr const char* op = "scaled_dot_product_attention";
    for (const Tensor* t : {&q, &k, &v}) MIXPREC_CHECK(t->defined(), op, ": query, key and value must be defined");
    const bool on_device = q.device() != Device::CPU;
    if (!on_device)
      for (const Tensor* t : {&k, &v}) detail::require_cpu(op, *t);
    MIXPREC_CHECK(q.dim() >= 2 && k.dim() >= 2 && v.dim() >= 2, op, ": query, key and value need at least 2 dimensions, got ",
                  q.sizes(), ", ", k.sizes(), " and ", v.sizes());
    MIXPREC_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype(), op, ": query, key and value must have one dtype, got ",
                  q.dtype(), ", ", k.dtype(), " and ", v.dtype());
    MIXPREC_CHECK(q.is_floating_point(), op, ": expected floating-point inputs, got ", q.dtype());
    MIXPREC_CHECK(q.size(-1) == k.size(-1), op, ": query [..., L, E] ", q.sizes(), " and key [..., S, E] ", k.sizes(),
                  " disagree on E");
    MIXPREC_CHECK(k.size(-2) == v.size(-2), op, ": key [..., S, E] ", k.sizes(), " and value [..., S, Ev] ", v.sizes(),
                  " disagree on S");
    MIXPREC_CHECK(dropout_p >= 0 && dropout_p <= 1, op, ": dropout_p must be in [0, 1], got ", dropout_p);
    MIXPREC_CHECK(!(mask.defined() && is_causal), op, ": specify either attn_mask or is_causal, not both");
    const Shape qb(q.sizes().begin(), q.sizes().end() - 2), kb(k.sizes().begin(), k.sizes().end() - 2),
        vb(v.sizes().begin(), v.sizes().end() - 2);
    const Shape batch = broadcast_shapes(broadcast_shapes(qb, kb, op), vb, op);
    const int64_t L = q.size(-2), S = k.size(-2), E = q.size(-1);
    if (mask.defined()) {
      if (!on_device) detail::require_cpu(op, mask);
      MIXPREC_CHECK(mask.dtype() == DType::Bool || mask.is_floating_point(), op,
                    ": attn_mask must be bool (true = attend) or floating-point (added to the scores), got ", mask.dtype());
      Shape full = batch;
      full.push_back(L);
      full.push_back(S);
      bool ok = mask.dim() <= static_cast<int64_t>(full.size());
      for (int64_t i = 0; ok && i < mask.dim(); ++i) {
        const int64_t m = mask.size(mask.dim() - 1 - i);
        ok = m == 1 || m == full[full.size() - 1 - static_cast<std::size_t>(i)];
      }
      MIXPREC_CHECK(ok, op, ": attn_mask of shape ", mask.sizes(), " does not broadcast to the attention shape ", full,
                    " (query ", q.sizes(), ", key ", k.sizes(), ")");
    }
    const double sc = scale.value_or(E > 0 ? 1.0 / std::sqrt(static_cast<double>(E)) : 1.0);
    if (on_device) return detail::sdpa_device(q, k, v, mask, batch, is_causal, sc, dropout_p);
    const uint64_t seed = dropout_p > 0 ? default_generator().next_u64() : 0;
    const std::array<Tensor, 2> fwd = detail::sdpa_cpu_forward(q, k, v, mask, batch, is_causal, sc, dropout_p, seed);
    const Tensor &out = fwd[0], &lse = fwd[1];
    if (autograd::should_record({q, k, v, mask})) {
      autograd::record(op, {q, k, v, mask}, {out},
                       [sq = autograd::SavedTensor(q), sk = autograd::SavedTensor(k), sv = autograd::SavedTensor(v),
                        sm = autograd::SavedTensor(mask), so = autograd::SavedTensor(out), lse, batch, is_causal, sc, dropout_p, seed,
                        mask_grad = mask.defined() && mask.is_floating_point() && mask.requires_grad()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& q = sq.get(op);
                         const Tensor& k = sk.get(op);
                         const Tensor& v = sv.get(op);
                         const Tensor& mask = sm.get(op);
                         const auto [dq, dk, dv, dm] = detail::sdpa_cpu_backward(g[0], q, k, v, mask, so.get(op), lse, batch, is_causal,
                                                                                 sc, dropout_p, seed, mask_grad);
                         auto finish = [](const Tensor& gr, const Tensor& in) {
                           return detail::as_dtype_raw(sum_to(gr, in.sizes()), in.dtype());
                         };
                         return {finish(dq, q), finish(dk, k), finish(dv, v), mask_grad ? finish(dm, mask) : Tensor()};
                       });
    }
    return out;
  }, q, k, v, attn_mask);
}

}  // namespace mixprec
