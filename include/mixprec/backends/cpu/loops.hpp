#pragma once
// Element-wise loops over strided, possibly broadcast (stride 0) inputs into a contiguous output.
// Values load into the compute type (float for 16-bit), the functor runs there, and the result
// rounds once on store.
#include <array>
#include <tuple>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::cpu {

// Walks a multi-index over `sizes`, advancing one element offset per operand.
template <std::size_t K>
struct StridedCursor {
  const Shape& sizes;
  std::array<const Shape*, K> strides;
  Shape idx;
  std::array<int64_t, K> off{};

  StridedCursor(const Shape& s, std::array<const Shape*, K> st, int64_t linear) : sizes(s), strides(st), idx(s.size(), 0) {
    for (int64_t d = static_cast<int64_t>(s.size()) - 1; d >= 0; --d) {
      idx[d] = s[d] ? linear % s[d] : 0;
      linear = s[d] ? linear / s[d] : 0;
      for (std::size_t k = 0; k < K; ++k) off[k] += idx[d] * (*st[k])[d];
    }
  }
  void next() {
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      for (std::size_t k = 0; k < K; ++k) off[k] += (*strides[k])[d];
      if (++idx[d] < sizes[d]) return;
      for (std::size_t k = 0; k < K; ++k) off[k] -= idx[d] * (*strides[k])[d];
      idx[d] = 0;
    }
  }
};

template <class>
using TensorFor = Tensor;  // one Tensor parameter per input element type

// out[i] = Out(f(acc(in_k[i])...)); every input already has out's sizes (expanded views).
template <class Out, class... In, class F>
void map(const Tensor& out, F f, const TensorFor<In>&... in) {
  const int64_t n = out.numel();
  Out* o = out.data<Out>();
  const std::tuple<const In*...> ptrs{in.template data<In>()...};
  const bool contiguous = out.is_contiguous() && (in.is_contiguous() && ...);
  if (contiguous) {
    parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
      std::apply(
          [&](const In*... p) {
            for (int64_t i = b; i < e; ++i) o[i] = static_cast<Out>(f(static_cast<acc_t<In>>(p[i])...));
          },
          ptrs);
    });
    return;
  }
  constexpr std::size_t K = sizeof...(In) + 1;
  const std::array<const Shape*, K> strides{&out.strides(), &in.strides()...};
  parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
    StridedCursor<K> c(out.sizes(), strides, b);
    for (int64_t i = b; i < e; ++i, c.next()) {
      [&]<std::size_t... I>(std::index_sequence<I...>) {
        o[c.off[0]] = static_cast<Out>(f(static_cast<acc_t<In>>(std::get<I>(ptrs)[c.off[I + 1]])...));
      }(std::index_sequence_for<In...>{});
    }
  });
}

}  // namespace mixprec::cpu
