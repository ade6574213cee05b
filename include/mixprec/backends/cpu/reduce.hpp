#pragma once
// The CPU backend's `sum` and `reduce` entries of the device kernel table (backends/device.hpp),
// reached by sum, mean, var, norm, max and min (ops/reduce.hpp) on every device. Why two sum
// kernels: a bias gradient reduces the leading dims of a contiguous tensor, which sum_leading
// streams row by row with column accumulators (no transposing copy); any other reduction goes
// through the op layer's ReducePlan (kept dims first, a copy only when x is not laid out so) and
// reduce_rows, shared by sum, mean and norm; var and max/min walk the same rows with their own
// two-pass and arg loops.
#include <array>
#include <cmath>
#include <limits>

#include "mixprec/backends/cpu/loops.hpp"
#include "mixprec/backends/cpu/simd.hpp"
#include "mixprec/ops/reduce.hpp"

namespace mixprec::cpu {

namespace detail {
// Reduces each row of plan.rows with (init, step, finish) in accumulator type Acc.
template <class T, class Acc, class Step, class Finish>
void reduce_rows(const mixprec::detail::ReducePlan& p, Acc init, Step step, Finish finish, const Tensor& out) {
  const T* x = p.rows.data<T>();
  using Out = T;
  Out* o = out.data<Out>();
  const int64_t M = p.M, R = p.R;
  if (M == 1 && R >= 2 * kParallelGrain && cpu::num_threads() > 1) {
    std::vector<Acc> partial(static_cast<std::size_t>(cpu::num_threads()), init);
    std::vector<int64_t> filled(partial.size(), 0);
    cpu::parallel_for(0, R, kParallelGrain, [&](int64_t b, int64_t e) {
      Acc a = init;
      for (int64_t i = b; i < e; ++i) a = step(a, static_cast<acc_t<T>>(x[i]));
      const std::size_t t = static_cast<std::size_t>(cpu::thread_index());
      partial[t] = a;
      filled[t] = 1;
    });
    Acc a = init;
    for (std::size_t t = 0; t < partial.size(); ++t)
      if (filled[t]) a = step.combine(a, partial[t]);
    o[0] = static_cast<Out>(finish(a, R));
    return;
  }
  cpu::parallel_for(0, M, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(R, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      Acc a = init;
      const T* row = x + m * R;
      for (int64_t i = 0; i < R; ++i) a = step(a, static_cast<acc_t<T>>(row[i]));
      o[m] = static_cast<Out>(finish(a, R));
    }
  });
}

template <class A>
struct SumStep {
  A operator()(A a, auto v) const { return a + static_cast<A>(v); }
  A combine(A a, A b) const { return a + b; }
};
struct NormStep {
  double p;
  bool inf;
  template <class V>
  double operator()(double a, V v) const {
    const double av = std::fabs(static_cast<double>(v));
    if (inf) return av > a || av != av ? av : a;
    return a + (p == 2.0 ? av * av : (p == 1.0 ? av : std::pow(av, p)));
  }
  double combine(double a, double b) const { return inf ? std::max(a, b) : a + b; }
};
template <class T>
using sum_acc_t = std::conditional_t<is_floating_v<T>, double, int64_t>;

// Sums of a contiguous x viewed as [R, M] over its leading R rows (a bias gradient: the reduced
// dims come first): column accumulators in A, rows streamed in order, so no transposing copy.
template <class T, class A>
void sum_leading(const T* x, int64_t R, int64_t M, T* out) {
  constexpr int64_t W = 256;  // columns per block: accumulators and one widened row stay in L1
  cpu::parallel_for(0, M, std::max<int64_t>(W / 4, kParallelGrain / std::max<int64_t>(R, 1)), [&](int64_t b, int64_t e) {
    std::array<A, W> acc;
    std::array<acc_t<T>, W> buf;
    for (int64_t m0 = b; m0 < e; m0 += W) {
      const int64_t w = std::min(W, e - m0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t r = 0; r < R; ++r) {
        const acc_t<T>* v = detail::load_run(x + r * M + m0, 1, w, buf.data());
        cpu::simd([&]() MIXPREC_SIMD_BODY {
          for (int64_t i = 0; i < w; ++i) acc[i] += static_cast<A>(v[i]);
        });
      }
      for (int64_t i = 0; i < w; ++i) out[m0 + i] = static_cast<T>(acc[i]);
    }
  });
}
// True when x is contiguous and every reduced dim precedes every kept one.
inline bool reduces_leading_dims(const Tensor& x, const mixprec::detail::ReducePlan& p) {
  if (!x.is_contiguous() || p.M <= 1 || p.R <= 1) return false;
  bool kept_seen = false;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) == 1) continue;
    if (!p.reduced[static_cast<std::size_t>(d)]) kept_seen = true;
    else if (kept_seen) return false;
  }
  return true;
}

}  // namespace detail

// Sum over dims (wrapped; none: all), which are removed. Floating x accumulates in double and
// keeps its dtype; integers and bool give int64 (mixprec::detail::sum_dtype). Reduced dims that
// lead a contiguous x (bias gradients) are summed down the rows in place; otherwise the kept
// dims are moved first (a copy only when x is not already laid out so).
inline Tensor sum_dims(const Tensor& x, const Shape& dims) {
  namespace md = mixprec::detail;
  md::ReducePlan p = md::plan_reduce(x, dims, false, "sum", false);
  if (x.is_floating_point() && detail::reduces_leading_dims(x, p)) {
    Tensor out = empty(p.out_shape, x.dtype());
    dispatch_floating(x.dtype(), "sum", [&]<class T>() { detail::sum_leading<T, double>(x.data<T>(), p.R, p.M, out.data<T>()); });
    return out;
  }
  p = md::plan_reduce(x, dims, false, "sum", true);
  if (x.dtype() != md::sum_dtype(x.dtype())) p.rows = md::as_dtype_raw(p.rows, DType::Int64);
  Tensor out = empty(p.out_shape, p.rows.dtype());
  dispatch_all(p.rows.dtype(), "sum", [&]<class T>() {
    using A = detail::sum_acc_t<T>;
    detail::reduce_rows<T, A>(p, A(0), detail::SumStep<A>{}, [](A a, int64_t) { return a; }, out);
  });
  return out;
}

namespace detail {
// Variance of each row in two passes (the mean first, then squared deviations), both in double;
// the row means are kept (float64) for the backward.
inline std::array<Tensor, 2> var_rows(const mixprec::detail::ReducePlan& p, DType dt, int64_t correction) {
  Tensor out = empty(p.out_shape, dt);
  Tensor mu = empty(p.out_shape, DType::Float64);
  dispatch_floating(dt, "var", [&]<class T>() {
    const T* xs = p.rows.data<T>();
    T* o = out.data<T>();
    double* m = mu.data<double>();
    cpu::parallel_for(0, p.M, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* row = xs + r * p.R;
        double s = 0;
        for (int64_t i = 0; i < p.R; ++i) s += static_cast<double>(static_cast<acc_t<T>>(row[i]));
        const double mean = s / static_cast<double>(p.R);
        double ss = 0;
        for (int64_t i = 0; i < p.R; ++i) {
          const double d = static_cast<double>(static_cast<acc_t<T>>(row[i])) - mean;
          ss += d * d;
        }
        m[r] = mean;
        const double denom = static_cast<double>(p.R - correction);
        o[r] = static_cast<T>(denom > 0 ? ss / denom : std::numeric_limits<double>::quiet_NaN());
      }
    });
  });
  return {out, mu};
}

// The largest (IsMax) or smallest value of each row and its first position; a NaN wins.
template <bool IsMax>
std::array<Tensor, 2> extremum_rows(const mixprec::detail::ReducePlan& p, DType dt, const char* name) {
  Tensor values = empty(p.out_shape, dt);
  Tensor indices = empty(p.out_shape, DType::Int64);
  dispatch_all(dt, name, [&]<class T>() {
    const T* xs = p.rows.data<T>();
    T* v = values.data<T>();
    int64_t* ix = indices.data<int64_t>();
    cpu::parallel_for(0, p.M, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(p.R, 1)), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        const T* row = xs + m * p.R;
        int64_t best = 0;
        auto bv = static_cast<acc_t<T>>(row[0]);
        for (int64_t i = 1; i < p.R; ++i) {
          const auto c = static_cast<acc_t<T>>(row[i]);
          if (bv != bv) break;  // NaN wins, first one
          if (c != c || (IsMax ? c > bv : c < bv)) {
            bv = c;
            best = i;
          }
        }
        v[m] = row[best];
        ix[m] = best;
      }
    });
  });
  return {values, indices};
}
}  // namespace detail

// mean, var, norm, max and min over dims (DeviceKernels::reduce); the reduced dims are removed.
inline std::array<Tensor, 2> reduce_op(DeviceReduce k, const Tensor& x, const Shape& dims, double arg) {
  namespace md = mixprec::detail;
  switch (k) {
    case DeviceReduce::Mean: {
      const md::ReducePlan p = md::plan_reduce(x, dims, false, "mean");
      Tensor out = empty(p.out_shape, x.dtype());
      dispatch_floating(x.dtype(), "mean", [&]<class T>() {
        detail::reduce_rows<T, double>(p, 0.0, detail::SumStep<double>{}, [](double a, int64_t n) { return a / static_cast<double>(n); }, out);
      });
      return {out, Tensor()};
    }
    case DeviceReduce::Var: return detail::var_rows(md::plan_reduce(x, dims, false, "var"), x.dtype(), static_cast<int64_t>(arg));
    case DeviceReduce::Norm: {
      const double p = arg;
      const md::ReducePlan plan = md::plan_reduce(x, dims, false, "norm");
      Tensor out = empty(plan.out_shape, x.dtype());
      const bool inf = std::isinf(p);
      dispatch_floating(x.dtype(), "norm", [&]<class T>() {
        detail::reduce_rows<T, double>(plan, 0.0, detail::NormStep{p, inf}, [p, inf](double a, int64_t) {
          return inf ? a : (p == 2.0 ? std::sqrt(a) : (p == 1.0 ? a : std::pow(a, 1.0 / p)));
        }, out);
      });
      return {out, Tensor()};
    }
    case DeviceReduce::Max: return detail::extremum_rows<true>(md::plan_reduce(x, dims, false, "max"), x.dtype(), "max");
    case DeviceReduce::Min: return detail::extremum_rows<false>(md::plan_reduce(x, dims, false, "min"), x.dtype(), "min");
  }
  MIXPREC_CHECK(false, "reduce: unknown reduction ", static_cast<int>(k), " of a tensor of shape ", x.sizes());
  return {};
}

inline void fill_reduce_kernels(DeviceKernels& t) { t.reduce = reduce_op; }

}  // namespace mixprec::cpu
