#pragma once
// What every mixprec CUDA kernel header shares: the nvcc-only guard, dtype dispatch over the
// three floating storage types, launch shapes, and the strided gather that makes any CUDA view
// contiguous (with a dtype cast on the way).
#if !defined(__CUDACC__) || !defined(MIXPREC_CUDA)
#error "mixprec's .cuh headers need nvcc and MIXPREC_CUDA (link mixprec::cuda); include <mixprec/cuda.hpp>"
#endif

#include <algorithm>
#include <array>
#include <type_traits>

#include <cuda_runtime.h>

#include "mixprec/backends/cuda/copy.hpp"
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

// Up to 8 dims: sizes and element strides, passed by value to the gather kernel.
struct StridedLayout {
  int nd = 0;
  int64_t sizes[8] = {};
  int64_t strides[8] = {};
};

// One element converted as the CPU's copy does: integers and doubles directly (through float
// they would lose bits past 2^24), 16-bit floats through float.
template <class To, class From>
MIXPREC_HOST_DEVICE To convert_value(From v) {
  if constexpr (std::is_same_v<To, From>) return v;
  else if constexpr (std::is_arithmetic_v<To> && std::is_arithmetic_v<From>) return static_cast<To>(v);
  else if constexpr (std::is_arithmetic_v<From>) return To(static_cast<float>(v));
  else return static_cast<To>(static_cast<float>(v));
}

template <class To, class From>
__global__ void gather_kernel(To* __restrict__ dst, const From* __restrict__ src, StridedLayout l, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem = i, off = 0;
    for (int d = l.nd - 1; d >= 0; --d) {
      off += (rem % l.sizes[d]) * l.strides[d];
      rem /= l.sizes[d];
    }
    dst[i] = convert_value<To>(src[off]);
  }
}

// A contiguous CUDA tensor with t's values in `dtype` (t's own dtype by default).
inline Tensor contiguous(const Tensor& t, std::optional<DType> dtype = std::nullopt) {
  require_cuda_tensor("gpu::contiguous", t);
  const DType to = dtype.value_or(t.dtype());
  if (to == t.dtype() && t.is_contiguous()) return t;
  MIXPREC_CHECK(t.dim() <= 8, "gpu::contiguous: at most 8 dimensions, got shape ", t.sizes());
  Tensor out = empty(t.sizes(), to, Device::CUDA);
  const int64_t n = t.numel();
  if (n == 0) return out;
  StridedLayout l;
  l.nd = static_cast<int>(t.dim());
  for (int d = 0; d < l.nd; ++d) {
    l.sizes[d] = t.size(d);
    l.strides[d] = t.stride(d);
  }
  dispatch_storage(to, "gpu::contiguous", [&]<class To>() {
    dispatch_storage(t.dtype(), "gpu::contiguous", [&]<class From>() {
      gather_kernel<To, From><<<grid_for(n), kThreads, 0, current_stream()>>>(out.data<To>(), t.data<From>(), l, n);
    });
  });
  check_launch("gpu::contiguous");
  return out;
}

}  // namespace mixprec::gpu
