#pragma once
// The CPU backend's `sum` entry of the device kernel table (backends/device.hpp), reached by the
// sum op (ops/reduce.hpp) on every device. Why two kernels: a bias gradient reduces the leading
// dims of a contiguous tensor, which sum_leading streams row by row with column accumulators (no
// transposing copy); any other reduction goes through the op layer's ReducePlan (kept dims first,
// a copy only when x is not laid out so) and reduce_rows, shared with mean, var and norm.
#include <array>

#include "mixprec/backends/cpu/loops.hpp"
#include "mixprec/backends/cpu/simd.hpp"
#include "mixprec/ops/reduce.hpp"

namespace mixprec::cpu {

namespace detail {
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
    using A = md::sum_acc_t<T>;
    md::reduce_rows<T, A>(p, A(0), md::SumStep<A>{}, [](A a, int64_t) { return a; }, out);
  });
  return out;
}

}  // namespace mixprec::cpu
