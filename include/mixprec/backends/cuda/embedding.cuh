#pragma once
// Embedding rows on CUDA: a gather forward, and a backward that adds each gradient row into its
// weight row with float32 atomics (repeated indices accumulate; the order, and so the last bits,
// may vary between runs, as PyTorch's non-deterministic CUDA embedding backward). The indices
// arrive range-checked by the op (ops/shape.hpp).
#include "mixprec/backends/cuda/common.cuh"

namespace mixprec::gpu {

namespace detail {
template <class T>
__global__ void embedding_kernel(const T* __restrict__ w, const int64_t* __restrict__ idx, T* __restrict__ out, int64_t n, int64_t D) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = w[idx[i / D] * D + i % D];
}
template <int = 0>  // a template, so that several units including this header link
__global__ void embedding_backward_kernel(const float* __restrict__ g, const int64_t* __restrict__ idx, float* __restrict__ acc,
                                          int64_t n, int64_t D, int64_t pad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx[i / D];
    if (row != pad) atomicAdd(acc + row * D + i % D, g[i]);
  }
}

inline void check_indices(const char* op, const Tensor& idx) {
  require_cuda_tensor(op, idx);
  MIXPREC_CHECK(idx.dtype() == DType::Int64 && idx.dim() == 1 && idx.is_contiguous(), op,
                ": indices must be contiguous int64 [N], got ", idx.dtype(), " ", idx.sizes());
}
}  // namespace detail

// weight [V, D] rows at idx [N] -> [N, D], weight's dtype.
inline Tensor embedding(const Tensor& weight, const Tensor& idx) {
  const char* op = "gpu::embedding";
  require_cuda_tensor(op, weight);
  detail::check_indices(op, idx);
  MIXPREC_CHECK(weight.dim() == 2, op, ": weight must be [V, D], got ", weight.sizes());
  const Tensor wc = contiguous(weight);
  const int64_t N = idx.size(0), D = weight.size(1);
  Tensor out = empty({N, D}, weight.dtype(), Device::CUDA);
  const int64_t n = N * D;
  if (n == 0) return out;
  dispatch_storage(weight.dtype(), op, [&]<class T>() {
    detail::embedding_kernel<T><<<grid_for(n), kThreads, 0, current_stream()>>>(wc.data<T>(), idx.data<int64_t>(), out.data<T>(), n, D);
  });
  check_launch(op);
  return out;
}

// float32 grad [N, D] summed into the rows idx of a float32 [V, D] of zeros; row `pad` (-1:
// none) stays zero.
inline Tensor embedding_backward(const Tensor& grad, const Tensor& idx, int64_t num_weights, int64_t pad) {
  const char* op = "gpu::embedding_backward";
  require_cuda_tensor(op, grad);
  detail::check_indices(op, idx);
  MIXPREC_CHECK(grad.dtype() == DType::Float32 && grad.dim() == 2 && grad.size(0) == idx.size(0) && grad.is_contiguous(), op,
                ": grad must be contiguous float32 [", idx.size(0), ", D], got ", grad.dtype(), " ", grad.sizes());
  const int64_t D = grad.size(1);
  Tensor acc = empty({num_weights, D}, DType::Float32, Device::CUDA);
  if (acc.numel() > 0) check(cudaMemsetAsync(acc.data_ptr(), 0, static_cast<std::size_t>(acc.nbytes()), current_stream()), op);
  const int64_t n = grad.numel();
  if (n == 0) return acc;
  detail::embedding_backward_kernel<<<grid_for(n), kThreads, 0, current_stream()>>>(grad.data<float>(), idx.data<int64_t>(),
                                                                                   acc.data<float>(), n, D, pad);
  check_launch(op);
  return acc;
}

}  // namespace mixprec::gpu
