#pragma once
// Element-wise loops over strided, possibly broadcast (stride 0) operands, and same-dtype copies.
//
// Why this shape: the library is compiled without -march, so a plain loop runs SSE2 code. Here
// the dims are first merged wherever every operand is contiguous across them (a contiguous
// tensor is one run; [N,C,H,W] + [1,C,1,1] is runs of H*W against a stride-0 bias), then each
// run is cut into chunks of kMapChunk: 16-bit inputs widen to float32 with the SIMD converters,
// the functor runs over plain float arrays in a loop compiled for AVX-512 or AVX2 (picked at run
// time by cpu::simd), and the results round once on store. So one generic functor -- relu, its
// backward, an add, a cast -- becomes vector code on whatever CPU the program lands on, with the
// same bits on every path (simd.hpp).
#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/backends/cpu/simd.hpp"
#include "mixprec/dtype/convert.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::cpu {

template <class>
using TensorFor = Tensor;  // one Tensor parameter per input element type

namespace detail {

inline constexpr int64_t kMapChunk = 256;  // per-operand float buffers stay in L1

// Operands' dims after dropping size-1 dims and merging neighbours that are contiguous in every
// operand; at least one dim. The last dim is the run the kernels stream through.
template <std::size_t K>
struct LoopDims {
  Shape sizes;
  std::array<Shape, K> strides;
};

// The dims are first put in the order of operand 0's strides, largest first (stable, so a
// row-major output keeps its order): a channels-last output [N, C, H, W] is walked as
// [N, H, W, C], its runs are unit-stride and, with operands of the same layout, merge into one.
template <std::size_t K>
LoopDims<K> coalesce(const Shape& sizes, const std::array<const Shape*, K>& st) {
  LoopDims<K> d;
  std::array<std::size_t, 8> small{};
  std::vector<std::size_t> big;
  std::size_t* order = small.data();
  if (sizes.size() > small.size()) {
    big.resize(sizes.size());
    order = big.data();
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) order[i] = i;
  const Shape& s0 = *st[0];
  std::stable_sort(order, order + sizes.size(), [&](std::size_t a, std::size_t b) { return s0[a] > s0[b]; });
  for (std::size_t oi = 0; oi < sizes.size(); ++oi) {
    const std::size_t i = order[oi];
    if (sizes[i] == 1) continue;
    bool merge = !d.sizes.empty();
    for (std::size_t k = 0; k < K && merge; ++k) merge = d.strides[k].back() == (*st[k])[i] * sizes[i];
    if (merge) {
      d.sizes.back() *= sizes[i];
      for (std::size_t k = 0; k < K; ++k) d.strides[k].back() = (*st[k])[i];
      continue;
    }
    d.sizes.push_back(sizes[i]);
    for (std::size_t k = 0; k < K; ++k) d.strides[k].push_back((*st[k])[i]);
  }
  if (d.sizes.empty()) {
    d.sizes.push_back(1);
    for (std::size_t k = 0; k < K; ++k) d.strides[k].push_back(0);
  }
  return d;
}

// run(offsets, len) for every piece of a last-dim run inside elements [b, e) (row-major order);
// offsets are in elements, one per operand.
template <std::size_t K, class Run>
void for_each_run(const LoopDims<K>& d, int64_t b, int64_t e, Run&& run) {
  const std::size_t nd = d.sizes.size();
  const int64_t inner = d.sizes[nd - 1];
  std::array<int64_t, K> off{};
  Shape idx(nd, 0);
  int64_t row = b / inner;
  const int64_t col0 = b % inner;
  for (std::size_t j = nd - 1; j-- > 0;) {
    idx[j] = row % d.sizes[j];
    row /= d.sizes[j];
    for (std::size_t k = 0; k < K; ++k) off[k] += idx[j] * d.strides[k][j];
  }
  for (int64_t col = col0; b < e; col = 0) {
    const int64_t len = std::min(inner - col, e - b);
    std::array<int64_t, K> o;
    for (std::size_t k = 0; k < K; ++k) o[k] = off[k] + col * d.strides[k][nd - 1];
    run(o, len);
    b += len;
    for (std::size_t j = nd - 1; j-- > 0;) {
      for (std::size_t k = 0; k < K; ++k) off[k] += d.strides[k][j];
      if (++idx[j] < d.sizes[j]) break;
      for (std::size_t k = 0; k < K; ++k) off[k] -= idx[j] * d.strides[k][j];
      idx[j] = 0;
    }
  }
}

template <class T>
inline constexpr bool is_16bit_v = std::is_same_v<T, bfloat16> || std::is_same_v<T, half>;

// n values of p (stride s) as acc_t<T>: p itself when it already is that, else widened into buf.
template <class T, class A = acc_t<T>>
const A* load_run(const T* p, int64_t s, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    if (s == 1) return p;
  }
  if (s == 0) {
    std::fill(buf, buf + n, static_cast<A>(p[0]));
  } else if (s == 1) {
    if constexpr (is_16bit_v<T>) convert(p, buf, n);
    else for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(p[i * s]);
  }
  return buf;
}

template <class Out, class R>
void store_run(Out* p, int64_t s, const R* buf, int64_t n) {
  if constexpr (is_16bit_v<Out> && std::is_same_v<R, float>) {
    if (s == 1) return convert(buf, p, n);
  }
  for (int64_t i = 0; i < n; ++i) p[i * s] = static_cast<Out>(buf[i]);
}

// o[i] = f(a[i]...) over one chunk, vectorised.
template <class R, class F, class... A>
void map_chunk(R* o, int64_t n, const F& f, const A*... a) {
  simd([&]() MIXPREC_SIMD_BODY {
    for (int64_t i = 0; i < n; ++i) o[i] = f(a[i]...);
  });
}

}  // namespace detail

// out[i] = Out(f(acc(in_k[i])...)) over out's shape; inputs already have out's sizes (expanded
// views, stride 0 where broadcast); any strides on either side. out must not overlap an input
// except exactly (in place).
template <class Out, class... In, class F>
void map(const Tensor& out, F f, const TensorFor<In>&... in) {
  using R = decltype(f(std::declval<acc_t<In>>()...));
  constexpr std::size_t K = sizeof...(In) + 1;
  const int64_t n = out.numel();
  if (n == 0) return;
  const detail::LoopDims<K> d = detail::coalesce<K>(out.sizes(), {&out.strides(), &in.strides()...});
  Out* const o = out.data<Out>();
  const std::tuple<const In*...> ptrs{in.template data<In>()...};
  const std::size_t last = d.sizes.size() - 1;
  parallel_for(0, n, kParallelGrain, [&](int64_t b, int64_t e) {
    std::tuple<std::array<acc_t<In>, detail::kMapChunk>...> bufs;
    std::array<R, detail::kMapChunk> obuf;
    detail::for_each_run<K>(d, b, e, [&](const std::array<int64_t, K>& off, int64_t len) {
      for (int64_t c = 0; c < len; c += detail::kMapChunk) {
        const int64_t m = std::min(detail::kMapChunk, len - c);
        [&]<std::size_t... I>(std::index_sequence<I...>) {
          Out* dst = o + off[0] + c * d.strides[0][last];
          const bool direct = std::is_same_v<Out, R> && d.strides[0][last] == 1;
          R* r = direct ? reinterpret_cast<R*>(dst) : obuf.data();
          detail::map_chunk(r, m, f,
                            detail::load_run(std::get<I>(ptrs) + off[I + 1] + c * d.strides[I + 1][last], d.strides[I + 1][last], m,
                                             std::get<I>(bufs).data())...);
          if (!direct) detail::store_run(dst, d.strides[0][last], r, m);
        }(std::index_sequence_for<In...>{});
      }
    });
  });
}

// dst = src, one dtype, src already of dst's sizes (stride 0 where broadcast); any strides.
// Unit-stride runs are memcpy'd; others move elements as raw words of the element size.
inline void copy(const Tensor& dst, const Tensor& src) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const auto es = static_cast<int64_t>(dst.element_size());
  const detail::LoopDims<2> d = detail::coalesce<2>(dst.sizes(), {&dst.strides(), &src.strides()});
  auto* const o = static_cast<unsigned char*>(dst.data_ptr());
  const auto* const s = static_cast<const unsigned char*>(src.data_ptr());
  const int64_t so = d.strides[0].back(), ss = d.strides[1].back();
  auto words = [&]<class W>(W*, unsigned char* to, const unsigned char* from, int64_t len) {
    W* t = reinterpret_cast<W*>(to);
    const W* f = reinterpret_cast<const W*>(from);
    for (int64_t i = 0; i < len; ++i) t[i * so] = f[i * ss];
  };
  // A thread's share is at least 1 MiB: below that a copy is over before the threads wake.
  parallel_for(0, n, std::max<int64_t>(1, (int64_t{1} << 20) / es), [&](int64_t b, int64_t e) {
    detail::for_each_run<2>(d, b, e, [&](const std::array<int64_t, 2>& off, int64_t len) {
      unsigned char* to = o + off[0] * es;
      const unsigned char* from = s + off[1] * es;
      if (so == 1 && ss == 1) return static_cast<void>(std::memcpy(to, from, static_cast<std::size_t>(len * es)));
      switch (es) {
        case 1: return words(static_cast<uint8_t*>(nullptr), to, from, len);
        case 2: return words(static_cast<uint16_t*>(nullptr), to, from, len);
        case 4: return words(static_cast<uint32_t*>(nullptr), to, from, len);
        default: return words(static_cast<uint64_t*>(nullptr), to, from, len);
      }
    });
  });
}

}  // namespace mixprec::cpu
