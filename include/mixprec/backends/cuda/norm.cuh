#pragma once
// Softmax / log-softmax and batch norm through cuDNN (which computes in float32 for 16-bit
// storage). Softmax sees the input as [outer, D, inner] with D the reduced dim, as the CPU kernel.
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

}  // namespace mixprec::gpu
