#pragma once
// The CPU's loss kernels behind its kernel table (backends/device.hpp):
// - cross_entropy / cross_entropy_backward: the fused kernel. Forward keeps only the per-row
//   log-sum-exp; backward rebuilds softmax from it (softmax - smoothed one-hot). Computed in
//   float32 for 16-bit and float32 logits, float64 for float64.
// - class_weights / clamp_indices: the row weights and index clamps that let a device report a
//   bad target or index lazily. The CPU's ops check targets and indices on the host first (an
//   Error at once), so here they only ever count what a caller passes unchecked.
#include <array>
#include <cmath>
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
          mixprec::detail::act_exp(sh.data(), ex.data(), C);
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
          mixprec::detail::act_exp(sh.data(), p.data(), C);  // softmax
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

inline void fill_loss_kernels(DeviceKernels& t) {
  t.cross_entropy = cross_entropy_forward;
  t.cross_entropy_backward = cross_entropy_backward;
  t.class_weights = class_weights;
  t.clamp_indices = clamp_indices;
}

}  // namespace mixprec::cpu
