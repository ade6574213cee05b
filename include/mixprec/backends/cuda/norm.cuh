#pragma once
// Softmax / log-softmax and batch norm through cuDNN (which computes in float32 for 16-bit
// storage). Softmax sees the input as [outer, D, inner] with D the reduced dim, as the CPU kernel.
// Layer norm, which cuDNN's legacy API lacks, is ours: one block per row, float32 statistics.
#include <cub/block/block_reduce.cuh>

#include "mixprec/backends/cuda/conv.cuh"

namespace mixprec::gpu {

namespace detail {
// [outer, D, inner, 1] in NCHW: cuDNN's channel-mode softmax reduces over D.
inline TensorDescriptor softmax_descriptor(const Tensor& x, int64_t dim) {
  const int64_t d = x.wrap_dim(dim, "cuda softmax");
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= x.size(i);
  for (int64_t i = d + 1; i < x.dim(); ++i) inner *= x.size(i);
  return make_tensor_descriptor(outer, x.dim() ? x.size(d) : 1, inner, 1, x.dtype(), ConvLayout::NCHW);
}
}  // namespace detail

inline Tensor softmax(const Tensor& x, int64_t dim, bool log = false) {
  const char* op = log ? "gpu::log_softmax" : "gpu::softmax";
  require_cuda_tensor(op, x);
  const Tensor xc = contiguous(x);
  Tensor y = empty(x.sizes(), x.dtype(), Device::CUDA);
  if (x.numel() == 0) return y;
  const TensorDescriptor desc = detail::softmax_descriptor(xc, dim);
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnSoftmaxForward(cudnn_handle(), log ? CUDNN_SOFTMAX_LOG : CUDNN_SOFTMAX_ACCURATE, CUDNN_SOFTMAX_MODE_CHANNEL, &one,
                                  desc.get(), xc.data_ptr(), &zero, desc.get(), y.data_ptr()),
              "cudnnSoftmaxForward");
  return y;
}

// dx from the forward output y and its gradient dy.
inline Tensor softmax_backward(const Tensor& y, const Tensor& dy, int64_t dim, bool log = false) {
  const char* op = log ? "gpu::log_softmax_backward" : "gpu::softmax_backward";
  require_cuda_tensor(op, y);
  require_cuda_tensor(op, dy);
  MIXPREC_CHECK(y.sizes() == dy.sizes() && y.dtype() == dy.dtype(), op, ": y ", y.dtype(), " ", y.sizes(), " and dy ", dy.dtype(), " ",
                dy.sizes(), " differ");
  const Tensor yc = contiguous(y), gc = contiguous(dy);
  Tensor dx = empty(y.sizes(), y.dtype(), Device::CUDA);
  if (y.numel() == 0) return dx;
  const TensorDescriptor desc = detail::softmax_descriptor(yc, dim);
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnSoftmaxBackward(cudnn_handle(), log ? CUDNN_SOFTMAX_LOG : CUDNN_SOFTMAX_ACCURATE, CUDNN_SOFTMAX_MODE_CHANNEL, &one,
                                   desc.get(), yc.data_ptr(), desc.get(), gc.data_ptr(), &zero, desc.get(), dx.data_ptr()),
              "cudnnSoftmaxBackward");
  return dx;
}

// Batch norm over x [N, C, H, W] (NCHW, contiguous). weight, bias, running stats and the
// saved statistics are float32 [C] whatever x's dtype, as cuDNN derives them.
struct BatchNormResult {
  Tensor y, save_mean, save_invstd;
};

namespace detail {
inline void check_bn_param(const char* op, const Tensor& t, int64_t C) {
  require_cuda_tensor(op, t);
  MIXPREC_CHECK(t.dim() == 1 && t.size(0) == C && t.dtype() == DType::Float32 && t.is_contiguous(), op,
                ": expected a contiguous float32 [", C, "] tensor, got ", t.dtype(), " ", t.sizes());
}

// The forward passes' input checks: x a contiguous NCHW CUDA tensor, eps within cuDNN's range.
inline void check_bn_input(const char* op, const Tensor& x, double eps) {
  require_cuda_tensor(op, x);
  MIXPREC_CHECK(x.dim() == 4 && x.is_contiguous(), op, ": expected a contiguous NCHW tensor, got ", x.sizes());
  MIXPREC_CHECK(eps >= CUDNN_BN_MIN_EPSILON, op, ": eps ", eps, " is below cuDNN's minimum ", CUDNN_BN_MIN_EPSILON);
}

// x [N, C, H, W] (NCHW) and the float32 [C] descriptor cuDNN derives from it for the
// per-channel tensors (weight, bias, running and saved statistics).
struct BatchNormDescriptors {
  TensorDescriptor x, param;
};
inline BatchNormDescriptors batch_norm_descriptors(const Tensor& x) {
  BatchNormDescriptors d{make_tensor_descriptor(x.size(0), x.size(1), x.size(2), x.size(3), x.dtype(), ConvLayout::NCHW), {}};
  check_cudnn(cudnnDeriveBNTensorDescriptor(d.param.get(), d.x.get(), CUDNN_BATCHNORM_SPATIAL), "cudnnDeriveBNTensorDescriptor");
  return d;
}
}  // namespace detail

// Training mode: normalises with the batch statistics and updates the running ones in place
// (running = (1 - momentum) running + momentum batch; the variance unbiased, as PyTorch).
inline BatchNormResult batch_norm_training(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                           const Tensor& running_var, double momentum, double eps) {
  const char* op = "gpu::batch_norm";
  detail::check_bn_input(op, x, eps);
  const int64_t C = x.size(1);
  for (const Tensor* t : {&weight, &bias, &running_mean, &running_var}) detail::check_bn_param(op, *t, C);
  const detail::BatchNormDescriptors d = detail::batch_norm_descriptors(x);
  BatchNormResult r{empty(x.sizes(), x.dtype(), Device::CUDA), empty({C}, DType::Float32, Device::CUDA),
                    empty({C}, DType::Float32, Device::CUDA)};
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnBatchNormalizationForwardTraining(cudnn_handle(), CUDNN_BATCHNORM_SPATIAL, &one, &zero, d.x.get(), x.data_ptr(),
                                                     d.x.get(), r.y.data_ptr(), d.param.get(), weight.data_ptr(), bias.data_ptr(),
                                                     momentum, running_mean.data_ptr(), running_var.data_ptr(), eps,
                                                     r.save_mean.data_ptr(), r.save_invstd.data_ptr()),
              "cudnnBatchNormalizationForwardTraining");
  return r;
}

inline Tensor batch_norm_inference(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                   const Tensor& running_var, double eps) {
  const char* op = "gpu::batch_norm (eval)";
  detail::check_bn_input(op, x, eps);
  const int64_t C = x.size(1);
  for (const Tensor* t : {&weight, &bias, &running_mean, &running_var}) detail::check_bn_param(op, *t, C);
  const detail::BatchNormDescriptors d = detail::batch_norm_descriptors(x);
  Tensor y = empty(x.sizes(), x.dtype(), Device::CUDA);
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnBatchNormalizationForwardInference(cudnn_handle(), CUDNN_BATCHNORM_SPATIAL, &one, &zero, d.x.get(), x.data_ptr(),
                                                      d.x.get(), y.data_ptr(), d.param.get(), weight.data_ptr(), bias.data_ptr(),
                                                      running_mean.data_ptr(), running_var.data_ptr(), eps),
              "cudnnBatchNormalizationForwardInference");
  return y;
}

struct BatchNormGrads {
  Tensor dx, dweight, dbias;
};

inline BatchNormGrads batch_norm_backward(const Tensor& x, const Tensor& dy, const Tensor& weight, const Tensor& save_mean,
                                          const Tensor& save_invstd, double eps) {
  const char* op = "gpu::batch_norm_backward";
  require_cuda_tensor(op, x);
  MIXPREC_CHECK(x.dim() == 4 && x.is_contiguous() && dy.sizes() == x.sizes() && dy.dtype() == x.dtype() && dy.is_contiguous(), op,
                ": x ", x.dtype(), " ", x.sizes(), " and dy ", dy.dtype(), " ", dy.sizes(), " must be equal-shaped contiguous NCHW");
  const int64_t C = x.size(1);
  for (const Tensor* t : {&weight, &save_mean, &save_invstd}) detail::check_bn_param(op, *t, C);
  const detail::BatchNormDescriptors d = detail::batch_norm_descriptors(x);
  BatchNormGrads g{empty(x.sizes(), x.dtype(), Device::CUDA), empty({C}, DType::Float32, Device::CUDA),
                   empty({C}, DType::Float32, Device::CUDA)};
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnBatchNormalizationBackward(cudnn_handle(), CUDNN_BATCHNORM_SPATIAL, &one, &zero, &one, &zero, d.x.get(),
                                              x.data_ptr(), d.x.get(), dy.data_ptr(), d.x.get(), g.dx.data_ptr(), d.param.get(),
                                              weight.data_ptr(), g.dweight.data_ptr(), g.dbias.data_ptr(), eps, save_mean.data_ptr(),
                                              save_invstd.data_ptr()),
              "cudnnBatchNormalizationBackward");
  return g;
}

// Layer norm of x [M, D] (contiguous) over D. weight and bias: float32 [D] or undefined;
// mean and rstd (1 / sqrt(var + eps), biased variance): float32 [M], for the backward.
struct LayerNormResult {
  Tensor y, mean, rstd;
};
struct LayerNormGrads {
  Tensor dx, dweight, dbias;  // dweight, dbias: float32 [D]
};

namespace detail {
inline constexpr int kRowThreads = 256;

// The block's sum of v, returned to every thread; the shared storage is free again on return.
__device__ inline float block_sum(float v) {
  using Reduce = cub::BlockReduce<float, kRowThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float total;
  const float s = Reduce(tmp).Sum(v);
  if (threadIdx.x == 0) total = s;
  __syncthreads();
  const float out = total;
  __syncthreads();
  return out;
}

// Two passes over the row (mean, then squared deviations), as the CPU, so no cancellation.
template <class T>
__global__ void layer_norm_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b, T* __restrict__ y,
                                  float* __restrict__ mean, float* __restrict__ rstd, int64_t D, float eps) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * D;
  T* yr = y + r * D;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) s += static_cast<float>(xr[i]);
  const float mu = block_sum(s) / static_cast<float>(D);
  float q = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float d = static_cast<float>(xr[i]) - mu;
    q += d * d;
  }
  const float rs = rsqrtf(block_sum(q) / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float h = (static_cast<float>(xr[i]) - mu) * rs;
    yr[i] = T((w ? h * w[i] : h) + (b ? b[i] : 0.0f));
  }
}

// dx = rstd (g w - mean(g w) - xhat mean(g w xhat)) per row.
template <class T>
__global__ void layer_norm_grad_input_kernel(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ w,
                                             const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                                             int64_t D) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * D;
  const T* gr = g + r * D;
  const float mu = mean[r], rs = rstd[r];
  float s1 = 0.0f, s2 = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float gw = w ? static_cast<float>(gr[i]) * w[i] : static_cast<float>(gr[i]);
    s1 += gw;
    s2 += gw * (static_cast<float>(xr[i]) - mu) * rs;
  }
  const float a1 = block_sum(s1) / static_cast<float>(D), a2 = block_sum(s2) / static_cast<float>(D);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float gw = w ? static_cast<float>(gr[i]) * w[i] : static_cast<float>(gr[i]);
    const float h = (static_cast<float>(xr[i]) - mu) * rs;
    dx[r * D + i] = T(rs * (gw - a1 - h * a2));
  }
}

// dweight = sum_rows g xhat, dbias = sum_rows g: a thread per column over a slab of rows, the
// slabs' partial sums added with float32 atomics into zeroed outputs.
template <class T>
__global__ void layer_norm_grad_params_kernel(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, float* __restrict__ dw, float* __restrict__ db, int64_t M,
                                              int64_t D, int64_t rows) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= D) return;
  const int64_t r0 = blockIdx.y * rows, r1 = r0 + rows < M ? r0 + rows : M;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float gv = static_cast<float>(g[r * D + c]);
    sb += gv;
    sw += gv * (static_cast<float>(x[r * D + c]) - mean[r]) * rstd[r];
  }
  atomicAdd(dw + c, sw);
  atomicAdd(db + c, sb);
}

inline void check_ln_param(const char* op, const Tensor& t, int64_t D) {
  if (!t.defined()) return;
  require_cuda_tensor(op, t);
  MIXPREC_CHECK(t.dim() == 1 && t.size(0) == D && t.dtype() == DType::Float32 && t.is_contiguous(), op,
                ": expected a contiguous float32 [", D, "] tensor, got ", t.dtype(), " ", t.sizes());
}
}  // namespace detail

inline LayerNormResult layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  const char* op = "gpu::layer_norm";
  require_cuda_tensor(op, x);
  MIXPREC_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": expected a contiguous [M, D] tensor, got ", x.sizes());
  const int64_t M = x.size(0), D = x.size(1);
  MIXPREC_CHECK(M <= int64_t{0x7fffffff}, op, ": at most 2^31 - 1 rows (one block each), got ", M);
  detail::check_ln_param(op, weight, D);
  detail::check_ln_param(op, bias, D);
  LayerNormResult r{empty(x.sizes(), x.dtype(), Device::CUDA), empty({M}, DType::Float32, Device::CUDA),
                    empty({M}, DType::Float32, Device::CUDA)};
  if (M == 0 || D == 0) return r;
  dispatch_storage(x.dtype(), op, [&]<class T>() {
    detail::layer_norm_kernel<T><<<static_cast<unsigned>(M), detail::kRowThreads, 0, current_stream()>>>(
        x.data<T>(), weight.defined() ? weight.data<float>() : nullptr, bias.defined() ? bias.data<float>() : nullptr, r.y.data<T>(),
        r.mean.data<float>(), r.rstd.data<float>(), D, static_cast<float>(eps));
  });
  check_launch(op);
  return r;
}

inline LayerNormGrads layer_norm_backward(const Tensor& x, const Tensor& dy, const Tensor& weight, const Tensor& mean,
                                          const Tensor& rstd) {
  const char* op = "gpu::layer_norm_backward";
  require_cuda_tensor(op, x);
  MIXPREC_CHECK(x.dim() == 2 && x.is_contiguous() && dy.sizes() == x.sizes() && dy.dtype() == x.dtype() && dy.is_contiguous(), op,
                ": x ", x.dtype(), " ", x.sizes(), " and dy ", dy.dtype(), " ", dy.sizes(), " must be equal-shaped contiguous [M, D]");
  require_cuda_tensor(op, dy);
  const int64_t M = x.size(0), D = x.size(1);
  MIXPREC_CHECK(M <= int64_t{0x7fffffff}, op, ": at most 2^31 - 1 rows (one block each), got ", M);
  detail::check_ln_param(op, weight, D);
  for (const Tensor* t : {&mean, &rstd}) {
    require_cuda_tensor(op, *t);
    MIXPREC_CHECK(t->dtype() == DType::Float32 && t->numel() == M && t->is_contiguous(), op, ": statistics must be float32 [", M,
                  "], got ", t->dtype(), " ", t->sizes());
  }
  LayerNormGrads g{empty(x.sizes(), x.dtype(), Device::CUDA), empty({D}, DType::Float32, Device::CUDA),
                   empty({D}, DType::Float32, Device::CUDA)};
  for (const Tensor* t : {&g.dweight, &g.dbias})
    if (D > 0) check(cudaMemsetAsync(t->data_ptr(), 0, static_cast<std::size_t>(t->nbytes()), current_stream()), op);
  if (M == 0 || D == 0) return g;
  const int64_t rows = std::max<int64_t>(64, (M + 65534) / 65535);
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>((M + rows - 1) / rows));
  dispatch_storage(x.dtype(), op, [&]<class T>() {
    detail::layer_norm_grad_input_kernel<T><<<static_cast<unsigned>(M), detail::kRowThreads, 0, current_stream()>>>(
        x.data<T>(), dy.data<T>(), weight.defined() ? weight.data<float>() : nullptr, mean.data<float>(), rstd.data<float>(),
        g.dx.data<T>(), D);
    detail::layer_norm_grad_params_kernel<T><<<grid, kThreads, 0, current_stream()>>>(
        x.data<T>(), dy.data<T>(), mean.data<float>(), rstd.data<float>(), g.dweight.data<float>(), g.dbias.data<float>(), M, D, rows);
  });
  check_launch(op);
  return g;
}

}  // namespace mixprec::gpu
