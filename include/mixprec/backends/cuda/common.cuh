#pragma once
// What every mixprec CUDA kernel header shares: the nvcc-only guard, dtype dispatch over the
// three floating storage types, launch shapes, and `contiguous`, which makes any CUDA view
// contiguous (with a dtype cast on the way) through the element-wise loop (loops.cuh).
#if !defined(__CUDACC__) || !defined(MIXPREC_CUDA)
#error "mixprec's .cuh headers need nvcc and MIXPREC_CUDA (link mixprec::cuda); include <mixprec/cuda.hpp>"
#endif

#include <algorithm>
#include <array>
#include <type_traits>

#include <cuda_runtime.h>

#include "mixprec/backends/cuda/copy.hpp"
#include "mixprec/backends/cuda/loops.cuh"
#include "mixprec/dtype/bfloat16.hpp"
#include "mixprec/dtype/half.hpp"

namespace mixprec::gpu {

// f.template operator()<T>() for T in {float, half, bfloat16}: the storage types the GPU kernels take.
template <class F>
decltype(auto) dispatch_storage(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float16: return f.template operator()<half>();
    case DType::BFloat16: return f.template operator()<bfloat16>();
    default: fail(op, ": CUDA kernels take float32, float16 or bfloat16, got ", d);
  }
}

inline void require_cuda_tensor(const char* op, const Tensor& t) {
  MIXPREC_CHECK(t.device() == Device::CUDA, op, ": tensor of shape ", t.sizes(), " is on ", t.device(), ", expected cuda");
}

inline constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill any current GPU, never more than the work needs.
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + threads - 1) / threads, 1, 65535));
}
inline void check_launch(const char* op) { check(cudaGetLastError(), op); }

// One element converted as the CPU's copy does: integers and doubles directly (through float
// they would lose bits past 2^24), 16-bit floats through float.
template <class To, class From>
MIXPREC_HOST_DEVICE To convert_value(From v) {
  if constexpr (std::is_same_v<To, From>) return v;
  else if constexpr (std::is_arithmetic_v<To> && std::is_arithmetic_v<From>) return static_cast<To>(v);
  else if constexpr (std::is_arithmetic_v<From>) return To(static_cast<float>(v));
  else return static_cast<To>(static_cast<float>(v));
}

template <class To>
struct ConvertTo {
  template <class From>
  __device__ To operator()(From v) const {
    return convert_value<To>(v);
  }
};

// t's element strides seen from `shape` (t broadcast to it): 0 on the dims t repeats.
inline Shape broadcast_strides(const Tensor& t, const Shape& shape) {
  const auto off = static_cast<int64_t>(shape.size()) - t.dim();
  Shape st(shape.size(), 0);
  for (int64_t i = 0; i < t.dim(); ++i) st[static_cast<std::size_t>(off + i)] = t.size(i) == 1 ? 0 : t.stride(i);
  return st;
}

// dst = src converted element-wise; src broadcast to dst's shape, any strides on both sides.
template <class To, class From>
void convert_into(const char* op, const Tensor& dst, const Tensor& src) {
  launch_loop(op, dst.sizes(), ConvertTo<To>{}, LoopTensor<To>{static_cast<To*>(dst.data_ptr()), dst.strides()},
              LoopTensor<const From>{static_cast<const From*>(src.data_ptr()), broadcast_strides(src, dst.sizes())});
}

// A contiguous CUDA tensor with t's values in `dtype` (t's own dtype by default).
inline Tensor contiguous(const Tensor& t, std::optional<DType> dtype = std::nullopt) {
  require_cuda_tensor("gpu::contiguous", t);
  const DType to = dtype.value_or(t.dtype());
  if (to == t.dtype() && t.is_contiguous()) return t;
  Tensor out = empty(t.sizes(), to, Device::CUDA);
  if (t.numel() == 0) return out;
  dispatch_storage(to, "gpu::contiguous", [&]<class To>() {
    dispatch_storage(t.dtype(), "gpu::contiguous", [&]<class From>() { convert_into<To, From>("gpu::contiguous", out, t); });
  });
  return out;
}

}  // namespace mixprec::gpu
