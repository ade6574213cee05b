#pragma once
// The one element-wise loop every CUDA copy, cast, fill, binary op and activation runs through:
// `launch_loop(op, shape, f, out, inputs...)` computes out[i] = f(inputs[i]...) over any strides
// and broadcasts. The plan (loop_plan.hpp, CPU-tested) coalesces dimensions and picks the vector
// width; here each thread moves one 16-byte vector per operand per step, with 32-bit offsets from
// multiply-high division, and a plain 64-bit path for tensors past 2^31 elements.
#if !defined(__CUDACC__) || !defined(MIXPREC_CUDA)
#error "mixprec's .cuh headers need nvcc and MIXPREC_CUDA (link mixprec::cuda); include <mixprec/cuda.hpp>"
#endif

#include <algorithm>
#include <utility>

#include <cuda_runtime.h>

#include "mixprec/backends/cuda/loop_plan.hpp"
#include "mixprec/backends/cuda/runtime.hpp"

namespace mixprec::gpu {

namespace detail {

template <int NT>
struct LoopArgs {
  int nd;
  unsigned broadcast_inner;
  uint32_t size[kLoopMaxDims];
  uint32_t magic[kLoopMaxDims];
  uint32_t shift[kLoopMaxDims];
  uint32_t stride[kLoopMaxDims][NT];
};
template <int NT>
struct LoopArgs64 {
  int nd;
  int64_t size[kLoopMaxDims];
  int64_t stride[kLoopMaxDims][NT];
};

template <int V, class T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, bool broadcast) {
  Pack<T, V> r;
  if constexpr (V == 1) {
    r.v[0] = *p;
  } else if (broadcast) {
    const T x = *p;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = x;
  } else {
    r = *reinterpret_cast<const Pack<T, V>*>(p);
  }
  return r;
}

template <int V, class F, class Out, class... P>
__device__ __forceinline__ void apply_packs(Out* out, const F& f, const P&... p) {
  Pack<Out, V> o;
#pragma unroll
  for (int j = 0; j < V; ++j) o.v[j] = f(p.v[j]...);
  *reinterpret_cast<Pack<Out, V>*>(out) = o;
}

template <int V, class F, class Out, class... In, std::size_t... K>
__device__ __forceinline__ void loop_body(const uint32_t* off, unsigned bcast, const F& f, Out* out, std::index_sequence<K...>,
                                          const In*... in) {
  apply_packs<V>(out + off[0], f, load_pack<V>(in + off[K + 1], ((bcast >> (K + 1)) & 1u) != 0)...);
}

template <int V, class F, class Out, class... In>
__global__ void __launch_bounds__(256) loop_kernel(LoopArgs<1 + sizeof...(In)> a, uint32_t n, F f, Out* __restrict__ out,
                                                   const In* __restrict__... in) {
  constexpr int NT = 1 + sizeof...(In);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    uint32_t off[NT];
    if (a.nd == 1) {  // contiguous or uniformly strided: no division
#pragma unroll
      for (int t = 0; t < NT; ++t) off[t] = i * a.stride[0][t];
    } else {
#pragma unroll
      for (int t = 0; t < NT; ++t) off[t] = 0;
      uint32_t rem = i;
      for (int d = 0; d < a.nd; ++d) {
        const uint32_t q = (__umulhi(rem, a.magic[d]) + rem) >> a.shift[d];
        const uint32_t r = rem - q * a.size[d];
#pragma unroll
        for (int t = 0; t < NT; ++t) off[t] += r * a.stride[d][t];
        rem = q;
      }
    }
    loop_body<V>(off, a.broadcast_inner, f, out, std::index_sequence_for<In...>{}, in...);
  }
}

// Past 2^31 elements or offsets: one element per step, 64-bit division (rare, so kept simple).
template <class F, class Out, class... In, std::size_t... K>
__device__ __forceinline__ void loop_body64(const int64_t* off, const F& f, Out* out, std::index_sequence<K...>, const In*... in) {
  out[off[0]] = f(in[off[K + 1]]...);
}
template <class F, class Out, class... In>
__global__ void loop_kernel64(LoopArgs64<1 + sizeof...(In)> a, int64_t n, F f, Out* __restrict__ out, const In* __restrict__... in) {
  constexpr int NT = 1 + sizeof...(In);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t off[NT] = {};
    int64_t rem = i;
    for (int d = 0; d < a.nd; ++d) {
      const int64_t q = rem / a.size[d], r = rem - q * a.size[d];
#pragma unroll
      for (int t = 0; t < NT; ++t) off[t] += r * a.stride[d][t];
      rem = q;
    }
    loop_body64(off, f, out, std::index_sequence_for<In...>{}, in...);
  }
}

template <class T>
constexpr int max_element_size() {
  return sizeof(T);
}
template <class T, class U, class... R>
constexpr int max_element_size() {
  return std::max<int>(sizeof(T), max_element_size<U, R...>());
}

inline unsigned loop_grid(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + 255) / 256, 1, int64_t{1} << 20));
}
}  // namespace detail

// A typed operand of a loop: base pointer (at the tensor's first element) and element strides
// over the loop's shape.
template <class T>
struct LoopTensor {
  T* data;
  Shape strides;
};

// out[i] = f(in[i]...) over `shape`, on the current stream. f is a functor with a __device__
// call operator taking the inputs' element types and returning Out. An empty shape product
// launches nothing.
template <class F, class Out, class... In>
void launch_loop(const char* op, const Shape& shape, const F& f, const LoopTensor<Out>& out, const LoopTensor<const In>&... in) {
  constexpr int NT = 1 + sizeof...(In);
  static_assert(NT <= kLoopMaxTensors);
  std::array<LoopOperand, NT> ops{LoopOperand{out.strides, reinterpret_cast<uintptr_t>(out.data), int(sizeof(Out))},
                                  LoopOperand{in.strides, reinterpret_cast<uintptr_t>(in.data), int(sizeof(In))}...};
  constexpr int kVec = std::max(1, 16 / detail::max_element_size<Out, In...>());
  LoopPlan p = plan_loop(shape, ops.data(), NT, kVec);
  if (p.n == 0) return;
  if (!p.index32) {
    p = plan_loop(shape, ops.data(), NT, 1);  // element units
    detail::LoopArgs64<NT> a{};
    a.nd = p.nd;
    for (int d = 0; d < p.nd; ++d) {
      a.size[d] = p.sizes[d];
      for (int t = 0; t < NT; ++t) a.stride[d][t] = p.strides[d][t];
    }
    detail::loop_kernel64<<<detail::loop_grid(p.n), 256, 0, current_stream()>>>(a, p.n, f, out.data, in.data...);
  } else {
    detail::LoopArgs<NT> a{};
    a.nd = p.nd;
    a.broadcast_inner = p.broadcast_inner;
    for (int d = 0; d < p.nd; ++d) {
      const FastDivisor div(static_cast<uint32_t>(p.sizes[d]));
      a.size[d] = div.divisor;
      a.magic[d] = div.magic;
      a.shift[d] = div.shift;
      for (int t = 0; t < NT; ++t) a.stride[d][t] = static_cast<uint32_t>(p.strides[d][t]);
    }
    const auto n = static_cast<uint32_t>(p.n);
    if (p.vec == kVec)
      detail::loop_kernel<kVec><<<detail::loop_grid(p.n), 256, 0, current_stream()>>>(a, n, f, out.data, in.data...);
    else if constexpr (kVec > 1)
      detail::loop_kernel<1><<<detail::loop_grid(p.n), 256, 0, current_stream()>>>(a, n, f, out.data, in.data...);
  }
  check(cudaGetLastError(), op);
}

}  // namespace mixprec::gpu
