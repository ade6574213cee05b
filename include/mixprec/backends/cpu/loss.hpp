#pragma once
// The CPU's loss kernels behind its kernel table (backends/device.hpp):
// - cross_entropy / cross_entropy_backward: the fused kernel. Forward keeps only the per-row
//   log-sum-exp; backward rebuilds softmax from it (softmax - smoothed one-hot). Computed in
//   float32 for 16-bit and float32 logits, float64 for float64.
// - class_weights / clamp_indices: the row weights and index clamps that let a device report a
//   bad target or index lazily. The CPU's ops check targets and indices on the host first (an
//   Error at once), so here they only ever count what a caller passes unchecked.
// - loss_terms / loss_terms_backward: the element-wise losses (mse, binary cross entropy with and
//   without logits), one entry per direction with a DeviceLoss kind, since they share the maps and
//   the chaining with the upstream gradient; loss_sum: every loss's Sum / Mean reduction, in
//   double; nll_loss / nll_loss_backward: the one-element-per-row gather and scatter.
#include <array>
#include <cmath>
#include <atomic>
#include <limits>
#include <vector>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/backends/cpu/vec_math.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/loss.hpp"

namespace mixprec::cpu {

// DeviceKernels::cross_entropy: x [N, C, S] contiguous, target [N * S] contiguous and checked.
inline std::array<Tensor, 2> cross_entropy_forward(const Tensor& x, const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore_index,
                                                   double ls) {
  const int64_t R = N * S;
  const DType ad = mixprec::detail::loss_acc_dtype(x.dtype());
  Tensor L = empty({R}, ad), lse = empty({R}, ad);
  if (R > 0)
    dispatch_floating(x.dtype(), "cross_entropy", [&]<class T>() {
      using A = acc_t<T>;
      const T* xp = x.data<T>();
      const int64_t* tp = target.data<int64_t>();
      A* lp = L.data<A>();
      A* ep = lse.data<A>();
      const A a_nll = static_cast<A>(1.0 - ls), a_smooth = static_cast<A>(ls / static_cast<double>(C));
      parallel_for(0, R, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
        std::vector<A> in(static_cast<std::size_t>(C)), sh(static_cast<std::size_t>(C)), ex(static_cast<std::size_t>(C));
        for (int64_t r = b; r < e; ++r) {
          // The row of C logits, contiguous in A (classes are strided by S for spatial inputs).
          const T* row = xp + (r / S) * C * S + r % S;
          const A* v = S == 1 ? vec::load_row(row, C, in) : in.data();
          if (S != 1)
            for (int64_t c = 0; c < C; ++c) in[c] = static_cast<A>(row[c * S]);
          A m = -std::numeric_limits<A>::infinity();
          for (int64_t c = 0; c < C; ++c) m = std::max(m, v[c]);
          for (int64_t c = 0; c < C; ++c) sh[c] = v[c] - m;
          cpu::vec::act_exp(sh.data(), ex.data(), C);
          const A se = vec::sum(ex.data(), C);
          const A sx = ls > 0 ? vec::sum(v, C) : A(0);
          const A l = m + std::log(se);
          ep[r] = l;
          const int64_t t = tp[r];
          if (t == ignore_index) {
            lp[r] = 0;
            continue;
          }
          A loss = a_nll * (l - static_cast<A>(row[t * S]));
          if (ls > 0) loss += a_smooth * (static_cast<A>(C) * l - sx);
          lp[r] = loss;
        }
      });
    });
  return {L, lse};
}

// DeviceKernels::cross_entropy_backward.
inline Tensor cross_entropy_backward(const Tensor& x, const Tensor& target, const Tensor& lse, const Tensor& grad_rows, double grad_scale,
                                     int64_t N, int64_t C, int64_t S, int64_t ignore_index, double ls) {
  const int64_t R = N * S;
  Tensor gx = empty(x.sizes(), x.dtype());
  if (R > 0)
    dispatch_floating(x.dtype(), "cross_entropy_backward", [&]<class T>() {
      using A = acc_t<T>;
      const T* xp = x.data<T>();
      T* o = gx.data<T>();
      const int64_t* tp = target.data<int64_t>();
      const A* ep = lse.data<A>();
      const A* gp = grad_rows.defined() ? grad_rows.data<A>() : nullptr;
      const A a_nll = static_cast<A>(1.0 - ls), a_smooth = static_cast<A>(ls / static_cast<double>(C));
      parallel_for(0, R, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
        std::vector<A> sh(static_cast<std::size_t>(C)), p(static_cast<std::size_t>(C));
        for (int64_t r = b; r < e; ++r) {
          const int64_t base = (r / S) * C * S + r % S;
          const int64_t t = tp[r];
          if (t == ignore_index) {
            for (int64_t c = 0; c < C; ++c) o[base + c * S] = static_cast<T>(0.0f);
            continue;
          }
          const A sc = gp ? gp[r] : static_cast<A>(grad_scale);
          for (int64_t c = 0; c < C; ++c) sh[c] = static_cast<A>(xp[base + c * S]) - ep[r];
          cpu::vec::act_exp(sh.data(), p.data(), C);  // softmax
          p[t] -= a_nll;
          for (int64_t c = 0; c < C; ++c) o[base + c * S] = static_cast<T>(sc * (p[c] - a_smooth));
        }
      });
    });
  return gx;
}

// DeviceKernels::class_weights, in float32 or float64 (the dtype's arithmetic, as CUDA's kernel).
inline std::array<Tensor, 2> class_weights(const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore_index, double ls,
                                           DType dtype, const Tensor& bad) {
  constexpr const char* op = "cross_entropy";
  MIXPREC_CHECK(target.dtype() == DType::Int64 && target.is_contiguous() && target.numel() == N * S, op,
                ": expected contiguous int64 targets of ", N * S, " elements, got ", target.dtype(), " of shape ", target.sizes());
  MIXPREC_CHECK(bad.dtype() == DType::Float32 && bad.numel() == 1, op, ": the error count must be one float32 value");
  MIXPREC_CHECK(dtype == DType::Float32 || dtype == DType::Float64, op, ": class weights are float32 or float64, got ", dtype);
  Tensor w = zeros({N, C, S}, dtype);
  const int64_t* tp = target.data<int64_t>();
  int64_t counted = 0, wrong = 0;
  mixprec::detail::loss_dispatch_acc(dtype, [&]<class A>() {
    A* wp = w.data<A>();
    for (int64_t r = 0; r < N * S; ++r) {
      const int64_t t = tp[r];
      if (t == ignore_index) continue;
      ++counted;
      A* row = wp + (r / S) * C * S + r % S;
      const bool ok = t >= 0 && t < C;
      wrong += !ok;
      const A off = ok ? static_cast<A>(ls / static_cast<double>(C)) : std::numeric_limits<A>::quiet_NaN();
      for (int64_t c = 0; c < C; ++c) row[c * S] = off;
      if (ok) row[t * S] += static_cast<A>(1.0 - ls);
    }
  });
  *bad.data<float>() += static_cast<float>(wrong);
  return {w, scalar_tensor(static_cast<double>(counted), DType::Float32)};
}

// DeviceKernels::clamp_indices.
inline void clamp_indices(const Tensor& idx, int64_t V, const Tensor& bad) {
  MIXPREC_CHECK(idx.dtype() == DType::Int64 && idx.is_contiguous() && bad.dtype() == DType::Float32 && bad.numel() == 1,
                "embedding: expected contiguous int64 indices and a float32 count");
  int64_t* ip = idx.data<int64_t>();
  int64_t wrong = 0;
  for (int64_t i = 0; i < idx.numel(); ++i)
    if (ip[i] < 0 || ip[i] >= V) {
      ip[i] = 0;
      ++wrong;
    }
  *bad.data<float>() += static_cast<float>(wrong);
}

namespace loss_detail {
// log(1 + exp(-x)) without overflow.
template <class A>
A softplus_neg(A x) {
  return std::max(-x, A(0)) + std::log1p(std::exp(-std::abs(x)));
}
template <class A>
A sigmoid(A x) {
  if (x >= 0) return A(1) / (A(1) + std::exp(-x));
  const A e = std::exp(x);
  return e / (A(1) + e);
}

// f(a, b) over the broadcast shape (one compute dtype A), in the layout of an operand of the full
// shape, as the element-wise ops lay out their results.
template <class A, class F>
Tensor map_broadcast(const Tensor& a, const Tensor& b, F f) {
  const Shape shape = broadcast_shapes(a.sizes(), b.sizes(), "mse_loss");
  const MemoryFormat layout = a.sizes() == shape ? a.suggest_memory_format() : b.sizes() == shape ? b.suggest_memory_format()
                                                                                               : MemoryFormat::Contiguous;
  Tensor out = empty(shape, a.dtype(), Device::CPU, layout);
  map<A, A, A>(out, f, mixprec::detail::expand_raw(a, shape), mixprec::detail::expand_raw(b, shape));
  return out;
}

// d times the upstream gradient: element-wise grad (d's shape, contiguous) or the scalar s.
template <class A>
Tensor chain(const Tensor& d, const Tensor& grad, double s) {
  if (grad.defined()) {
    Tensor out = empty(d.sizes(), d.dtype(), Device::CPU, d.suggest_memory_format());
    map<A, A, A>(out, [](A p, A q) { return p * q; }, d, grad);
    return out;
  }
  Tensor out = mixprec::empty_like_layout(d, d.dtype());
  map<A, A>(out, [s](A p) { return p * static_cast<A>(s); }, d);
  return out;
}
}  // namespace loss_detail

// DeviceKernels::loss_terms: a, b (and w) in the compute dtype A (float32 / float64).
inline Tensor loss_terms(DeviceLoss kind, const Tensor& a, const Tensor& b, const Tensor& w) {
  namespace ld = loss_detail;
  Tensor L;
  mixprec::detail::loss_dispatch_acc(a.dtype(), [&]<class A>() {
    switch (kind) {
      case DeviceLoss::Mse:
        L = ld::map_broadcast<A>(a, b, [](A x, A y) {
          const A d = x - y;
          return d * d;
        });
        return;
      case DeviceLoss::BceWithLogits:
        L = empty(a.sizes(), a.dtype());
        if (w.defined())
          map<A, A, A, A>(L, [](A v, A tv, A p) { return (1 - tv) * v + ((p - 1) * tv + 1) * ld::softplus_neg(v); }, a, b, w);
        else
          map<A, A, A>(L, [](A v, A tv) { return (1 - tv) * v + ld::softplus_neg(v); }, a, b);
        return;
      case DeviceLoss::Bce: {
        L = empty(a.sizes(), a.dtype());
        std::atomic<bool> out_of_range{false};
        map<A, A, A>(L, [&out_of_range](A pv, A tv) {
          if (!(pv >= 0 && pv <= 1)) out_of_range.store(true, std::memory_order_relaxed);
          const A lp = std::max(std::log(pv), A(-100)), l1p = std::max(std::log1p(-pv), A(-100));
          return -(tv * lp + (1 - tv) * l1p);
        }, a, b);
        // Checked after the map: a throw cannot leave a parallel region.
        MIXPREC_CHECK(!out_of_range.load(), "binary_cross_entropy: all elements of the input (shape ", a.sizes(),
                      ") should be probabilities between 0 and 1; use binary_cross_entropy_with_logits for raw scores");
        return;
      }
    }
  });
  return L;
}

// DeviceKernels::loss_terms_backward: each derivative map, then its product with the upstream
// gradient (two passes, as the composed ops made them: the same roundings).
inline std::array<Tensor, 3> loss_terms_backward(DeviceLoss kind, const Tensor& a, const Tensor& b, const Tensor& w, const Tensor& grad,
                                                 double grad_scale, bool need_b, bool need_w) {
  namespace ld = loss_detail;
  std::array<Tensor, 3> r;
  mixprec::detail::loss_dispatch_acc(a.dtype(), [&]<class A>() {
    auto chain = [&](const Tensor& d) { return ld::chain<A>(d, grad, grad_scale); };
    auto fresh = [&] { return empty(a.sizes(), a.dtype()); };
    switch (kind) {
      case DeviceLoss::Mse:
        r[0] = chain(ld::map_broadcast<A>(a, b, [](A x, A y) { return 2 * (x - y); }));
        if (need_b) {
          r[1] = mixprec::empty_like_layout(r[0], r[0].dtype());
          map<A, A>(r[1], [](A v) { return -v; }, r[0]);
        }
        return;
      case DeviceLoss::BceWithLogits: {
        Tensor dx = fresh(), dt, dp;
        if (w.defined()) {
          // d/dx = (1 - t) + (1 + (pw - 1) t) (sigmoid(x) - 1)
          map<A, A, A, A>(dx, [](A v, A tv, A p) { return (1 - tv) + ((p - 1) * tv + 1) * (ld::sigmoid(v) - 1); }, a, b, w);
          if (need_b) {
            dt = fresh();
            map<A, A, A>(dt, [](A v, A p) { return -v + (p - 1) * ld::softplus_neg(v); }, a, w);
          }
          if (need_w) {
            dp = fresh();
            map<A, A, A>(dp, [](A v, A tv) { return tv * ld::softplus_neg(v); }, a, b);
          }
        } else {
          map<A, A, A>(dx, [](A v, A tv) { return ld::sigmoid(v) - tv; }, a, b);
          if (need_b) {
            dt = fresh();
            map<A, A>(dt, [](A v) { return -v; }, a);
          }
        }
        r = {chain(dx), dt.defined() ? chain(dt) : Tensor(), dp.defined() ? chain(dp) : Tensor()};
        return;
      }
      case DeviceLoss::Bce: {
        // PyTorch's form: (p - t) / max(p (1 - p), 1e-12).
        Tensor dp = fresh(), dt;
        map<A, A, A>(dp, [](A pv, A tv) { return (pv - tv) / std::max(pv * (1 - pv), A(1e-12)); }, a, b);
        if (need_b) {
          dt = fresh();
          map<A, A>(dt, [](A pv) { return std::max(std::log1p(-pv), A(-100)) - std::max(std::log(pv), A(-100)); }, a);
        }
        r = {chain(dp), dt.defined() ? chain(dt) : Tensor(), Tensor()};
        return;
      }
    }
  });
  return r;
}

// DeviceKernels::loss_sum: fixed chunks (at most one per thread) with 8 partial sums each, the
// chunk sums added in order, so the result does not depend on scheduling.
inline Tensor loss_sum(const Tensor& t, double divisor, DType out) {
  const int64_t n = t.numel();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (n + kParallelGrain - 1) / kParallelGrain));
  std::vector<double> part(static_cast<std::size_t>(chunks), 0.0);
  mixprec::detail::loss_dispatch_acc(t.dtype(), [&]<class T>() {
    const T* p = t.data<T>();
    parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
      for (int64_t k = kb; k < ke; ++k) {
        double a[8] = {};
        int64_t i = n * k / chunks;
        const int64_t e = n * (k + 1) / chunks;
        for (; i + 8 <= e; i += 8)
          for (int j = 0; j < 8; ++j) a[j] += static_cast<double>(static_cast<acc_t<T>>(p[i + j]));
        for (; i < e; ++i) a[0] += static_cast<double>(static_cast<acc_t<T>>(p[i]));
        part[k] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      }
    });
  });
  double s = 0;
  for (double v : part) s += v;
  return scalar_tensor(s / divisor, out);
}

// DeviceKernels::nll_loss: only one element per row is read, so the (possibly strided) input is
// indexed directly.
inline Tensor nll_loss(const Tensor& x, const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore_index) {
  (void)C;
  const int64_t R = N * S;
  Tensor L = empty(target.sizes(), mixprec::detail::loss_acc_dtype(x.dtype()));
  const Shape& xs = x.strides();
  const int64_t s0 = x.dim() == 1 ? 0 : xs[0], sc = x.dim() == 1 ? xs[0] : xs[1];
  Shape inner_sizes, inner_strides;
  for (int64_t d = 2; d < x.dim(); ++d) {
    inner_sizes.push_back(x.size(d));
    inner_strides.push_back(xs[d]);
  }
  auto offset_of = [=](int64_t r) {
    int64_t n = r / std::max<int64_t>(S, 1), s = r % std::max<int64_t>(S, 1), off = n * s0;
    for (int64_t d = static_cast<int64_t>(inner_sizes.size()) - 1; d >= 0; --d) {
      off += (s % inner_sizes[d]) * inner_strides[d];
      s /= inner_sizes[d];
    }
    return off;
  };
  if (R > 0)
    dispatch_floating(x.dtype(), "nll_loss", [&]<class T>() {
      using A = acc_t<T>;
      const T* xp = x.data<T>();
      const int64_t* tp = target.data<int64_t>();
      A* lp = L.data<A>();
      parallel_for(0, R, kParallelGrain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) lp[r] = tp[r] == ignore_index ? A(0) : -static_cast<A>(xp[offset_of(r) + tp[r] * sc]);
      });
    });
  return L;
}

// DeviceKernels::nll_loss_backward.
inline Tensor nll_loss_backward(const Tensor& target, const Tensor& grad_rows, double grad_scale, const Shape& sizes, DType dtype, int64_t N,
                                int64_t C, int64_t S, int64_t ignore_index) {
  const int64_t R = N * S;
  Tensor gx = zeros(sizes, dtype);
  if (R > 0)
    dispatch_floating(dtype, "nll_loss_backward", [&]<class T>() {
      using A = acc_t<T>;
      T* o = gx.data<T>();
      const int64_t* tp = target.data<int64_t>();
      const A* gp = grad_rows.defined() ? grad_rows.data<A>() : nullptr;
      parallel_for(0, R, kParallelGrain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          if (tp[r] == ignore_index) continue;
          o[(r / S) * C * S + tp[r] * S + r % S] = static_cast<T>(-(gp ? gp[r] : static_cast<A>(grad_scale)));
        }
      });
    });
  return gx;
}

inline void fill_loss_kernels(DeviceKernels& t) {
  t.cross_entropy = cross_entropy_forward;
  t.cross_entropy_backward = cross_entropy_backward;
  t.class_weights = class_weights;
  t.clamp_indices = clamp_indices;
  t.loss_terms = loss_terms;
  t.loss_terms_backward = loss_terms_backward;
  t.loss_sum = loss_sum;
  t.nll_loss = nll_loss;
  t.nll_loss_backward = nll_loss_backward;
}

}  // namespace mixprec::cpu
