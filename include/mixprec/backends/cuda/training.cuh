#pragma once
// Kernels a training step needs so that it never waits for the host: dropout that decides each
// element in the kernel from a counter-based hash (no mask is drawn on the host or copied over;
// the backward regenerates it from the same seed), and cross_entropy's class weights built from
// the targets on the device (out-of-range targets counted there, reported at the next host read).
//   defines: dropout_apply, class_weights, clamp_indices
#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/ops/activation.hpp"

namespace mixprec::gpu {

namespace detail {
template <class T>
__global__ void dropout_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t n, uint64_t seed, double p, float scale,
                               const int64_t* replay) {
  // Inside a captured graph the replay number is read here, at run time: new masks each replay.
  if (replay) seed = mixprec::detail::dropout_seed(seed, *replay);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = T(static_cast<float>(x[i]) * (mixprec::detail::dropout_keep(seed, static_cast<uint64_t>(i), p) ? scale : 0.0f));
}

// w [N, C, S] (zeroed by the caller) from targets [N * S]; count += rows not ignored; bad += rows
// whose target is outside [0, C), whose weights become NaN.
template <class A>
__global__ void class_weights_kernel(A* __restrict__ w, float* count, float* bad, const int64_t* __restrict__ target, int64_t N,
                                     int64_t C, int64_t S, int64_t ignore_index, double ls) {
  int counted = 0, wrong = 0;
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < N * S; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = target[r];
    if (t == ignore_index) continue;
    ++counted;
    A* row = w + (r / S) * C * S + r % S;
    const bool ok = t >= 0 && t < C;
    wrong += !ok;
    const A off = ok ? static_cast<A>(ls / static_cast<double>(C)) : static_cast<A>(__int_as_float(0x7fc00000));
    for (int64_t c = 0; c < C; ++c) row[c * S] = off;
    if (ok) row[t * S] += static_cast<A>(1.0 - ls);
  }
  // Integral counts below 2^24 add exactly in float whatever the order.
  if (counted) atomicAdd(count, static_cast<float>(counted));
  if (wrong) atomicAdd(bad, static_cast<float>(wrong));
}
template <int = 0>  // a template, so that several units including this header link
__global__ void clamp_indices_kernel(int64_t* idx, int64_t n, int64_t V, float* bad) {
  int wrong = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (idx[i] < 0 || idx[i] >= V) {
      idx[i] = 0;
      ++wrong;
    }
  if (wrong) atomicAdd(bad, static_cast<float>(wrong));
}
}  // namespace detail

// Embedding indices outside [0, V) counted in *bad and replaced by 0 (the next host read reports them).
inline void clamp_indices(const Tensor& idx, int64_t V, const Tensor& bad) {
  const char* op = "embedding";
  require_cuda_tensor(op, idx);
  require_cuda_tensor(op, bad);
  MIXPREC_CHECK(idx.dtype() == DType::Int64 && idx.is_contiguous() && bad.dtype() == DType::Float32 && bad.numel() == 1, op,
                ": expected contiguous int64 indices and a float32 count");
  const int64_t n = idx.numel();
  if (n == 0) return;
  detail::clamp_indices_kernel<<<grid_for(n), kThreads, 0, current_stream()>>>(idx.data<int64_t>(), n, V, bad.data<float>());
  check_launch(op);
}

// x * (keep(i) ? scale : 0), keep(i) = detail::dropout_keep(seed, i, p) over contiguous x.
inline Tensor dropout_apply(const Tensor& x, uint64_t seed, double p, double scale, const Tensor& replay) {
  const char* op = "gpu::dropout";
  require_cuda_tensor(op, x);
  MIXPREC_CHECK(x.is_contiguous(), op, ": tensor of shape ", x.sizes(), " is not contiguous");
  MIXPREC_CHECK(!replay.defined() || (replay.device() == Device::CUDA && replay.dtype() == DType::Int64), op,
                ": the replay counter must be an int64 cuda tensor");
  Tensor y = empty(x.sizes(), x.dtype(), Device::CUDA);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const int64_t* r = replay.defined() ? replay.data<int64_t>() : nullptr;
  dispatch_storage(x.dtype(), op, [&]<class T>() {
    detail::dropout_kernel<T><<<grid_for(n), kThreads, 0, current_stream()>>>(y.data<T>(), x.data<T>(), n, seed, p, static_cast<float>(scale), r);
  });
  check_launch(op);
  return y;
}

inline std::array<Tensor, 2> class_weights(const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore_index, double ls,
                                           DType dtype, const Tensor& bad) {
  const char* op = "cross_entropy";
  require_cuda_tensor(op, target);
  require_cuda_tensor(op, bad);
  MIXPREC_CHECK(target.dtype() == DType::Int64 && target.is_contiguous() && target.numel() == N * S, op,
                ": expected contiguous int64 targets of ", N * S, " elements, got ", target.dtype(), " of shape ", target.sizes());
  MIXPREC_CHECK(bad.dtype() == DType::Float32 && bad.numel() == 1, op, ": the error count must be one float32 value");
  MIXPREC_CHECK(dtype == DType::Float32, op, ": class weights on cuda are float32, got ", dtype);
  Tensor w = empty({N, C, S}, dtype, Device::CUDA), count = empty({}, DType::Float32, Device::CUDA);
  check(cudaMemsetAsync(w.data_ptr(), 0, static_cast<std::size_t>(w.nbytes()), current_stream()), op);
  check(cudaMemsetAsync(count.data_ptr(), 0, sizeof(float), current_stream()), op);
  if (N * S > 0)
    detail::class_weights_kernel<float><<<grid_for(N * S), kThreads, 0, current_stream()>>>(
        w.data<float>(), count.data<float>(), bad.data<float>(), target.data<int64_t>(), N, C, S, ignore_index, ls);
  check_launch(op);
  return {w, count};
}

}  // namespace mixprec::gpu
