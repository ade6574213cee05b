#pragma once
// Activations and reductions on CUDA tensors. The activation formulas are mixprec::fn's
// (ops/elementwise.hpp), the very functions the CPU kernels call; values load into float, and
// round once on store, as on the CPU. Reductions go through CUB, accumulating in float32.
#include <cub/device/device_reduce.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include "mixprec/backends/cuda/channels_last.hpp"
#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/ops/elementwise.hpp"

namespace mixprec::gpu {

enum class Activation : uint8_t { Relu, Gelu, GeluTanh, Silu, Sigmoid, Tanh, Exp, Log };

MIXPREC_HOST_DEVICE float activate(Activation a, float v) {
  switch (a) {
    case Activation::Relu: return fn::relu(v);
    case Activation::Gelu: return fn::gelu(v);
    case Activation::GeluTanh: return fn::gelu_tanh(v);
    case Activation::Silu: return fn::silu(v);
    case Activation::Sigmoid: return fn::sigmoid(v);
    case Activation::Tanh: return std::tanh(v);
    case Activation::Exp: return std::exp(v);
    case Activation::Log: return std::log(v);
  }
  return v;
}
// d activation / dx from the input x and the output y (each formula uses the cheaper one).
MIXPREC_HOST_DEVICE float activate_grad(Activation a, float x, float y) {
  switch (a) {
    case Activation::Relu: return fn::relu_grad(x);
    case Activation::Gelu: return fn::gelu_grad(x);
    case Activation::GeluTanh: return fn::gelu_tanh_grad(x);
    case Activation::Silu: return fn::silu_grad(x);
    case Activation::Sigmoid: return fn::sigmoid_grad_y(y);
    case Activation::Tanh: return fn::tanh_grad_y(y);
    case Activation::Exp: return y;
    case Activation::Log: return 1.0f / x;
  }
  return 0.0f;
}

namespace detail {
// One functor per common activation (A), so each kernel holds one formula: no switch per
// element, the elements of a vector interleave, and an operand the derivative does not use
// (GELU's and ReLU's output y) is never loaded. A = kAnyActivation: one kernel for the rest,
// switching on `a` (uniformly) per element. Why: bf16 GELU ran at 44% of the copy rate with the
// switch (PyTorch's 72%): the PTX of that bf16 kernel held all eight formulas, 198 branches;
// GELU's own has 22.
inline constexpr int kAnyActivation = -1;
template <int A>
MIXPREC_HOST_DEVICE Activation which(Activation a) {
  return A == kAnyActivation ? a : static_cast<Activation>(A);
}
template <int A>
struct ActivationFn {
  Activation a;
  template <class T>
  __device__ T operator()(T x) const {
    return T(activate(which<A>(a), static_cast<float>(x)));
  }
};
template <int A>
struct ActivationGradFn {
  Activation a;
  template <class T>
  __device__ T operator()(T g, T x, T y) const {
    return T(static_cast<float>(g) * activate_grad(which<A>(a), static_cast<float>(x), static_cast<float>(y)));
  }
};
// f.template operator()<A>() with A = a for the activations of transformers and CNNs, else kAnyActivation.
template <class F>
void dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Relu: return f.template operator()<static_cast<int>(Activation::Relu)>();
    case Activation::Gelu: return f.template operator()<static_cast<int>(Activation::Gelu)>();
    case Activation::GeluTanh: return f.template operator()<static_cast<int>(Activation::GeluTanh)>();
    case Activation::Silu: return f.template operator()<static_cast<int>(Activation::Silu)>();
    default: return f.template operator()<kAnyActivation>();
  }
}
}  // namespace detail

// f(x) into a new tensor in x's layout (channels-last stays so, as on the CPU; anything else
// contiguous); x may be any view (read through its strides).
inline Tensor activation(Activation a, const Tensor& x) {
  const char* op = "gpu::activation";
  require_cuda_tensor(op, x);
  Tensor y = empty_like_layout(x, x.dtype());
  if (x.numel() == 0) return y;
  dispatch_storage(x.dtype(), op, [&]<class T>() {
    detail::dispatch_activation(a, [&]<int A>() {
      launch_loop(op, x.sizes(), detail::ActivationFn<A>{a}, LoopTensor<T>{y.data<T>(), y.strides()},
                  LoopTensor<const T>{x.data<T>(), x.strides()});
    });
  });
  return y;
}

// grad * f'(x, y), all four of one dtype and shape (any strides); the result in x's layout (the
// CPU's: that of the saved tensor the derivative reads, which the op passes as x).
inline Tensor activation_backward(Activation a, const Tensor& grad, const Tensor& x, const Tensor& y) {
  const char* op = "gpu::activation_backward";
  for (const Tensor* t : {&grad, &x, &y}) {
    require_cuda_tensor(op, *t);
    MIXPREC_CHECK(t->sizes() == x.sizes() && t->dtype() == x.dtype(), op, ": expected ", x.dtype(), " ", x.sizes(), ", got ",
                  t->dtype(), " ", t->sizes());
  }
  Tensor gx = empty_like_layout(x, x.dtype());
  if (x.numel() == 0) return gx;
  dispatch_storage(x.dtype(), op, [&]<class T>() {
    detail::dispatch_activation(a, [&]<int A>() {
      launch_loop(op, x.sizes(), detail::ActivationGradFn<A>{a}, LoopTensor<T>{gx.data<T>(), gx.strides()},
                  LoopTensor<const T>{grad.data<T>(), grad.strides()}, LoopTensor<const T>{x.data<T>(), x.strides()},
                  LoopTensor<const T>{y.data<T>(), y.strides()});
    });
  });
  return gx;
}

template <class T>
__global__ void masked_scale_kernel(const T* __restrict__ x, const bool* __restrict__ keep, T* __restrict__ y, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = T(static_cast<float>(x[i]) * (keep[i] ? scale : 0.0f));
}

// x * (keep ? scale : 0) in float, rounded once: dropout's forward and backward, as the CPU's.
inline Tensor masked_scale(const Tensor& x, const Tensor& keep, double scale) {
  const char* op = "gpu::dropout";
  require_cuda_tensor(op, x);
  require_cuda_tensor(op, keep);
  MIXPREC_CHECK(keep.dtype() == DType::Bool && keep.sizes() == x.sizes() && keep.is_contiguous(), op, ": mask ", keep.dtype(), " ",
                keep.sizes(), " must be contiguous bool of the input's shape ", x.sizes());
  const Tensor xc = contiguous(x);
  Tensor y = empty(x.sizes(), x.dtype(), Device::CUDA);
  const int64_t n = x.numel();
  if (n == 0) return y;
  dispatch_storage(x.dtype(), op, [&]<class T>() {
    masked_scale_kernel<T><<<grid_for(n), kThreads, 0, current_stream()>>>(xc.data<T>(), keep.data<bool>(), y.data<T>(), n,
                                                                           static_cast<float>(scale));
  });
  check_launch(op);
  return y;
}

namespace detail {
template <class T>
struct ToFloat {
  __device__ float operator()(const T& v) const { return static_cast<float>(v); }
};
template <class T>
struct AbsFloat {
  __device__ float operator()(const T& v) const { return fabsf(static_cast<float>(v)); }
};
// NaN-propagating max, so a NaN anywhere shows in the result.
struct NanMax {
  __device__ float operator()(float a, float b) const { return (a > b || a != a) ? a : b; }
};

// Item i of a dense array for CUB: up to V elements read as one 16-byte load where whole, reduced
// into one float. Item 0 is the lead up to the first 16-byte boundary (often empty), item i > 0
// elements [lead + (i-1) V, lead + i V), the last one cut at n. Why: CUB vectorises its loads only
// for raw pointers of primitive types; through a widening iterator bf16 went 2 bytes a load (63%
// of the copy rate on an H200, where float32 made 89%).
template <class T, template <class> class Load, class Op>
struct PackItem {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  const T* p;
  int64_t n, lead;
  Op red;
  float init;
  __device__ float operator()(int64_t i) const {
    const int64_t b = i == 0 ? 0 : lead + (i - 1) * V;
    const int64_t e = i == 0 ? lead : (b + V < n ? b + V : n);
    float acc = init;
    if (i > 0 && e - b == V) {
      const Pack<T, V> k = *reinterpret_cast<const Pack<T, V>*>(p + b);
#pragma unroll
      for (int j = 0; j < V; ++j) acc = red(acc, Load<T>()(k.v[j]));
    } else {
      for (int64_t j = b; j < e; ++j) acc = red(acc, Load<T>()(p[j]));
    }
    return acc;
  }
};

// One CUB reduction of x through `Load` and `Op` into a 0-dim float32 CUDA tensor. A dense x
// (contiguous, channels-last: is_dense) is read as the flat array it is, in memory order; others
// are made contiguous first. `init` is Op's identity.
template <template <class> class Load, class Op>
Tensor reduce_all(const char* op, const Tensor& x, Op red, float init) {
  require_cuda_tensor(op, x);
  const Tensor xc = is_dense(x) ? x : contiguous(x);
  Tensor out = empty({}, DType::Float32, Device::CUDA);
  dispatch_storage(x.dtype(), op, [&]<class T>() {
    using Item = PackItem<T, Load, Op>;
    const T* p = xc.data<T>();
    const int64_t n = xc.numel();
    const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
    const int64_t lead = std::min<int64_t>(n, misalign == 0 ? 0 : (16 - misalign) / static_cast<int64_t>(sizeof(T)));
    const int64_t items = 1 + (n - lead + Item::V - 1) / Item::V;
    const auto in = thrust::make_transform_iterator(thrust::counting_iterator<int64_t>(0), Item{p, n, lead, red, init});
    size_t bytes = 0;
    check(cub::DeviceReduce::Reduce(nullptr, bytes, in, out.data<float>(), items, red, init, current_stream()), op);
    const Tensor tmp = empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, DType::UInt8, Device::CUDA);
    check(cub::DeviceReduce::Reduce(tmp.data_ptr(), bytes, in, out.data<float>(), items, red, init, current_stream()), op);
  });
  return out;
}
struct Plus {
  __device__ float operator()(float a, float b) const { return a + b; }
};
}  // namespace detail

// Sum of all elements, accumulated in float32: a 0-dim float32 CUDA tensor.
inline Tensor sum(const Tensor& x) { return detail::reduce_all<detail::ToFloat>("gpu::sum", x, detail::Plus{}, 0.0f); }
// max |x| (NaN if any element is NaN): a 0-dim float32 CUDA tensor.
inline Tensor max_abs(const Tensor& x) { return detail::reduce_all<detail::AbsFloat>("gpu::max_abs", x, detail::NanMax{}, 0.0f); }

}  // namespace mixprec::gpu
