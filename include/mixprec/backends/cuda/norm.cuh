#pragma once
// Softmax / log-softmax and batch norm through cuDNN (which computes in float32 for 16-bit
// storage). Softmax sees the input as [outer, D, inner] with D the reduced dim, as the CPU kernel.
// Layer norm, which cuDNN's legacy API lacks, is ours: one block per row, float32 statistics,
// input and output dtypes chosen apart (no cast copies around it under autocast).
#include <initializer_list>
#include <optional>

#include <cub/block/block_reduce.cuh>

#include "mixprec/backends/cuda/channels_last.hpp"
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

// Batch norm over x [N, C, H, W], NCHW-contiguous or channels-last (DeviceKernels::channels_last):
// a channels-last x is described to cuDNN as NHWC and read in place, and y / dx come back
// channels-last (channels_last.hpp says which mode each layout runs and why). weight, bias,
// running stats and the saved statistics are float32 [C] whatever x's dtype, as cuDNN derives them.
struct BatchNormResult {
  Tensor y, save_mean, save_invstd;
};

namespace detail {
inline void check_bn_param(const char* op, const Tensor& t, int64_t C) {
  require_cuda_tensor(op, t);
  MIXPREC_CHECK(t.dim() == 1 && t.size(0) == C && t.dtype() == DType::Float32 && t.is_contiguous(), op,
                ": expected a contiguous float32 [", C, "] tensor, got ", t.dtype(), " ", t.sizes());
}

// The forward passes' input checks: x a 4-D CUDA tensor, NCHW-contiguous or channels-last, eps
// within cuDNN's range. Returns the layout cuDNN reads it in.
inline ConvLayout check_bn_input(const char* op, const Tensor& x, double eps) {
  require_cuda_tensor(op, x);
  const ConvLayout layout = activation_layout(x);
  MIXPREC_CHECK(x.dim() == 4 && (layout == ConvLayout::NHWC || x.is_contiguous()), op,
                ": expected a contiguous NCHW or channels-last [N, C, H, W] tensor, got ", x.dtype(), " ", x.sizes(), " with strides ",
                x.dim() == 4 ? x.strides() : Shape{});
  MIXPREC_CHECK(eps >= CUDNN_BN_MIN_EPSILON, op, ": eps ", eps, " is below cuDNN's minimum ", CUDNN_BN_MIN_EPSILON);
  return layout;
}

inline BatchNormDescriptors batch_norm_descriptors(const Tensor& x, ConvLayout layout, cudnnBatchNormMode_t mode) {
  return make_batch_norm_descriptors(x.size(0), x.size(1), x.size(2), x.size(3), x.dtype(), layout, mode);
}
// x's shape in its own layout: y and dx are allocated as x is.
inline Tensor empty_in_layout(const Tensor& x, ConvLayout layout) {
  return empty(x.sizes(), x.dtype(), Device::CUDA, layout == ConvLayout::NHWC ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous);
}

// call(mode) with the layout's mode; where cuDNN refuses SPATIAL_PERSISTENT for a dtype
// (NOT_SUPPORTED), SPATIAL runs instead, and this thread remembers it for that dtype.
template <class Call>
void run_batch_norm(const char* api, const Tensor& x, ConvLayout layout, bool training, Call call) {
  thread_local std::array<bool, 3> persistent_refused{};  // float32, float16, bfloat16
  const std::size_t slot = x.dtype() == DType::Float32 ? 0 : x.dtype() == DType::Float16 ? 1 : 2;
  cudnnBatchNormMode_t mode = batch_norm_mode(layout, training);
  if (mode == CUDNN_BATCHNORM_SPATIAL_PERSISTENT && persistent_refused[slot]) mode = CUDNN_BATCHNORM_SPATIAL;
  cudnnStatus_t st = call(mode);
  if (st == CUDNN_STATUS_NOT_SUPPORTED && mode == CUDNN_BATCHNORM_SPATIAL_PERSISTENT) {
    persistent_refused[slot] = true;
    st = call(CUDNN_BATCHNORM_SPATIAL);
  }
  if (st != CUDNN_STATUS_SUCCESS)
    fail(api, ": cuDNN error ", static_cast<int>(st), " (", cudnnGetErrorString(st), ") for x ", x.dtype(), " ", x.sizes(),
         layout == ConvLayout::NHWC ? " channels-last" : " NCHW");
}
}  // namespace detail

// Training mode: normalises with the batch statistics and updates the running ones in place
// (running = (1 - momentum) running + momentum batch; the variance unbiased, as PyTorch).
inline BatchNormResult batch_norm_training(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                           const Tensor& running_var, double momentum, double eps) {
  const char* op = "gpu::batch_norm";
  const ConvLayout layout = detail::check_bn_input(op, x, eps);
  const int64_t C = x.size(1);
  for (const Tensor* t : {&weight, &bias, &running_mean, &running_var}) detail::check_bn_param(op, *t, C);
  BatchNormResult r{detail::empty_in_layout(x, layout), empty({C}, DType::Float32, Device::CUDA), empty({C}, DType::Float32, Device::CUDA)};
  const float one = 1.0f, zero = 0.0f;
  detail::run_batch_norm("cudnnBatchNormalizationForwardTraining", x, layout, true, [&](cudnnBatchNormMode_t mode) {
    const BatchNormDescriptors d = detail::batch_norm_descriptors(x, layout, mode);
    return cudnnBatchNormalizationForwardTraining(cudnn_handle(), mode, &one, &zero, d.x.get(), x.data_ptr(), d.x.get(), r.y.data_ptr(),
                                                  d.param.get(), weight.data_ptr(), bias.data_ptr(), momentum, running_mean.data_ptr(),
                                                  running_var.data_ptr(), eps, r.save_mean.data_ptr(), r.save_invstd.data_ptr());
  });
  return r;
}

inline Tensor batch_norm_inference(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                   const Tensor& running_var, double eps) {
  const char* op = "gpu::batch_norm (eval)";
  const ConvLayout layout = detail::check_bn_input(op, x, eps);
  const int64_t C = x.size(1);
  for (const Tensor* t : {&weight, &bias, &running_mean, &running_var}) detail::check_bn_param(op, *t, C);
  Tensor y = detail::empty_in_layout(x, layout);
  const float one = 1.0f, zero = 0.0f;
  detail::run_batch_norm("cudnnBatchNormalizationForwardInference", x, layout, false, [&](cudnnBatchNormMode_t mode) {
    const BatchNormDescriptors d = detail::batch_norm_descriptors(x, layout, mode);
    return cudnnBatchNormalizationForwardInference(cudnn_handle(), mode, &one, &zero, d.x.get(), x.data_ptr(), d.x.get(), y.data_ptr(),
                                                   d.param.get(), weight.data_ptr(), bias.data_ptr(), running_mean.data_ptr(),
                                                   running_var.data_ptr(), eps);
  });
  return y;
}

struct BatchNormGrads {
  Tensor dx, dweight, dbias;
};

// dx in x's layout; dy is brought to it when it differs (the op passes both in one layout).
inline BatchNormGrads batch_norm_backward(const Tensor& x, const Tensor& dy, const Tensor& weight, const Tensor& save_mean,
                                          const Tensor& save_invstd, double eps) {
  const char* op = "gpu::batch_norm_backward";
  require_cuda_tensor(op, x);
  require_cuda_tensor(op, dy);
  const ConvLayout layout = activation_layout(x);
  MIXPREC_CHECK(x.dim() == 4 && (layout == ConvLayout::NHWC || x.is_contiguous()) && dy.sizes() == x.sizes() && dy.dtype() == x.dtype(), op,
                ": x ", x.dtype(), " ", x.sizes(), " and dy ", dy.dtype(), " ", dy.sizes(),
                " must be equal-shaped, x contiguous NCHW or channels-last");
  Tensor dyl = dy;
  if (layout == ConvLayout::NHWC ? !dy.is_contiguous(MemoryFormat::ChannelsLast) : !dy.is_contiguous()) {
    dyl = detail::empty_in_layout(x, layout);
    dispatch_storage(x.dtype(), op, [&]<class T>() { convert_into<T, T>(op, dyl, dy); });
  }
  const int64_t C = x.size(1);
  for (const Tensor* t : {&weight, &save_mean, &save_invstd}) detail::check_bn_param(op, *t, C);
  BatchNormGrads g{detail::empty_in_layout(x, layout), empty({C}, DType::Float32, Device::CUDA), empty({C}, DType::Float32, Device::CUDA)};
  const float one = 1.0f, zero = 0.0f;
  detail::run_batch_norm("cudnnBatchNormalizationBackward", x, layout, true, [&](cudnnBatchNormMode_t mode) {
    const BatchNormDescriptors d = detail::batch_norm_descriptors(x, layout, mode);
    return cudnnBatchNormalizationBackward(cudnn_handle(), mode, &one, &zero, &one, &zero, d.x.get(), x.data_ptr(), d.x.get(),
                                           dyl.data_ptr(), d.x.get(), g.dx.data_ptr(), d.param.get(), weight.data_ptr(),
                                           g.dweight.data_ptr(), g.dbias.data_ptr(), eps, save_mean.data_ptr(), save_invstd.data_ptr());
  });
  return g;
}

// Layer norm of x [M, D] (contiguous) over D, reading x in its dtype and writing y in `out`
// (x's by default): under autocast a 16-bit or float32 activation is normalised and rounded to the
// autocast dtype in this one kernel, where a float32 policy would add an upcast copy before it and
// the consuming GEMM a downcast copy after it. Statistics and arithmetic are float32. weight and
// bias: float32 [D] or undefined; mean and rstd (1 / sqrt(var + eps), biased variance): float32
// [M], for the backward.
struct LayerNormResult {
  Tensor y, mean, rstd;
};
struct LayerNormGrads {
  Tensor dx, dweight, dbias;  // dx in x's dtype; dweight, dbias: float32 [D]
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

// Rows move as Pack<T, V> (loops.cuh): V consecutive elements in one load or store, 16 bytes for
// 8 16-bit or 4 float32 values.

// Elements per Pack for a row kernel reading A and writing B: the widest that keeps each access
// <= 16 bytes, divides D and fits the pointers' alignment (1 when nothing wider does).
template <class A, class B>
inline int row_vector_width(int64_t D, std::initializer_list<const void*> ptrs) {
  int v = static_cast<int>(16 / std::max(sizeof(A), sizeof(B)));
  auto fits = [&](int w) {
    if (D % w != 0) return false;
    for (const void* p : ptrs)
      if (reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(w) * std::max(sizeof(A), sizeof(B))) != 0) return false;
    return true;
  };
  while (v > 1 && !fits(v)) v /= 2;
  return v;
}

// Two passes over the row (mean, then squared deviations), as the CPU, so no cancellation; the
// row is re-read from L1/L2, not from memory. A one-element row has mean == x exactly (a sum of x
// and zeros, divided by 1), so x - mean is 0 and y is exactly bias, as on the CPU.
template <class Tx, class Ty, int V>
__global__ void layer_norm_kernel(const Tx* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b, Ty* __restrict__ y,
                                  float* __restrict__ mean, float* __restrict__ rstd, int64_t D, float eps) {
  const int64_t r = blockIdx.x, P = D / V;
  const auto* xr = reinterpret_cast<const Pack<Tx, V>*>(x + r * D);
  auto* yr = reinterpret_cast<Pack<Ty, V>*>(y + r * D);
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const Pack<Tx, V> p = xr[i];
#pragma unroll
    for (int k = 0; k < V; ++k) s += static_cast<float>(p.v[k]);
  }
  const float mu = block_sum(s) / static_cast<float>(D);
  float q = 0.0f;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const Pack<Tx, V> p = xr[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = static_cast<float>(p.v[k]) - mu;
      q += d * d;
    }
  }
  const float rs = rsqrtf(block_sum(q) / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const Pack<Tx, V> p = xr[i];
    Pack<Ty, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = i * V + k;
      const float h = (static_cast<float>(p.v[k]) - mu) * rs;
      o.v[k] = Ty((w ? h * w[c] : h) + (b ? b[c] : 0.0f));
    }
    yr[i] = o;
  }
}

// dx = rstd (g w - mean(g w) - xhat mean(g w xhat)) per row; g in y's dtype, dx in x's. g w is
// rounded once (__fmul_rn: never contracted into an FMA), so in a one-element row g w - mean(g w)
// is exactly 0, as is dx, which the CPU computes: an FMA there left the product's rounding error
// (times rstd = 1/sqrt(eps)) as dx.
template <class Tx, class Tg, int V>
__global__ void layer_norm_grad_input_kernel(const Tx* __restrict__ x, const Tg* __restrict__ g, const float* __restrict__ w,
                                             const float* __restrict__ mean, const float* __restrict__ rstd, Tx* __restrict__ dx,
                                             int64_t D) {
  const int64_t r = blockIdx.x, P = D / V;
  const auto* xr = reinterpret_cast<const Pack<Tx, V>*>(x + r * D);
  const auto* gr = reinterpret_cast<const Pack<Tg, V>*>(g + r * D);
  auto* dr = reinterpret_cast<Pack<Tx, V>*>(dx + r * D);
  const float mu = mean[r], rs = rstd[r];
  float s1 = 0.0f, s2 = 0.0f;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const Pack<Tx, V> px = xr[i];
    const Pack<Tg, V> pg = gr[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gv = static_cast<float>(pg.v[k]);
      const float gw = w ? __fmul_rn(gv, w[i * V + k]) : gv;
      s1 += gw;
      s2 += gw * ((static_cast<float>(px.v[k]) - mu) * rs);
    }
  }
  const float a1 = block_sum(s1) / static_cast<float>(D), a2 = block_sum(s2) / static_cast<float>(D);
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const Pack<Tx, V> px = xr[i];
    const Pack<Tg, V> pg = gr[i];
    Pack<Tx, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gv = static_cast<float>(pg.v[k]);
      const float gw = w ? __fmul_rn(gv, w[i * V + k]) : gv;
      const float h = (static_cast<float>(px.v[k]) - mu) * rs;
      o.v[k] = Tx(rs * ((gw - a1) - h * a2));
    }
    dr[i] = o;
  }
}

// dweight = sum_rows g xhat, dbias = sum_rows g: a thread per column over a slab of rows, the
// slabs' partial sums added with float32 atomics into zeroed outputs.
template <class Tx, class Tg>
__global__ void layer_norm_grad_params_kernel(const Tx* __restrict__ x, const Tg* __restrict__ g, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, float* __restrict__ dw, float* __restrict__ db, int64_t M,
                                              int64_t D, int64_t rows) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= D) return;
  const int64_t r0 = blockIdx.y * rows, r1 = r0 + rows < M ? r0 + rows : M;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float gv = static_cast<float>(g[r * D + c]);
    sb += gv;
    sw += gv * ((static_cast<float>(x[r * D + c]) - mean[r]) * rstd[r]);
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

// f.template operator()<V>() for the vector widths the row kernels are built with.
template <class F>
void dispatch_width(int v, F&& f) {
  switch (v) {
    case 8: f.template operator()<8>(); break;
    case 4: f.template operator()<4>(); break;
    case 2: f.template operator()<2>(); break;
    default: f.template operator()<1>(); break;
  }
}
}  // namespace detail

inline LayerNormResult layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                                  std::optional<DType> out_dtype = std::nullopt) {
  const char* op = "gpu::layer_norm";
  require_cuda_tensor(op, x);
  MIXPREC_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": expected a contiguous [M, D] tensor, got ", x.sizes());
  const int64_t M = x.size(0), D = x.size(1);
  MIXPREC_CHECK(M <= int64_t{0x7fffffff}, op, ": at most 2^31 - 1 rows (one block each), got ", M);
  detail::check_ln_param(op, weight, D);
  detail::check_ln_param(op, bias, D);
  const DType od = out_dtype.value_or(x.dtype());
  LayerNormResult r{empty(x.sizes(), od, Device::CUDA), empty({M}, DType::Float32, Device::CUDA), empty({M}, DType::Float32, Device::CUDA)};
  if (M == 0 || D == 0) return r;
  dispatch_storage(x.dtype(), op, [&]<class Tx>() {
    dispatch_storage(od, op, [&]<class Ty>() {
      const int v = detail::row_vector_width<Tx, Ty>(D, {x.data_ptr(), r.y.data_ptr()});
      detail::dispatch_width(v, [&]<int V>() {
        detail::layer_norm_kernel<Tx, Ty, V><<<static_cast<unsigned>(M), detail::kRowThreads, 0, current_stream()>>>(
            x.data<Tx>(), weight.defined() ? weight.data<float>() : nullptr, bias.defined() ? bias.data<float>() : nullptr,
            r.y.data<Ty>(), r.mean.data<float>(), r.rstd.data<float>(), D, static_cast<float>(eps));
      });
    });
  });
  check_launch(op);
  return r;
}

// dy in y's dtype, which may differ from x's (layer_norm's out_dtype); dx comes in x's.
inline LayerNormGrads layer_norm_backward(const Tensor& x, const Tensor& dy, const Tensor& weight, const Tensor& mean,
                                          const Tensor& rstd) {
  const char* op = "gpu::layer_norm_backward";
  require_cuda_tensor(op, x);
  require_cuda_tensor(op, dy);
  MIXPREC_CHECK(x.dim() == 2 && x.is_contiguous() && dy.sizes() == x.sizes() && dy.is_contiguous(), op, ": x ", x.dtype(), " ",
                x.sizes(), " and dy ", dy.dtype(), " ", dy.sizes(), " must be equal-shaped contiguous [M, D]");
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
  dispatch_storage(x.dtype(), op, [&]<class Tx>() {
    dispatch_storage(dy.dtype(), op, [&]<class Tg>() {
      const int v = detail::row_vector_width<Tx, Tg>(D, {x.data_ptr(), dy.data_ptr(), g.dx.data_ptr()});
      detail::dispatch_width(v, [&]<int V>() {
        detail::layer_norm_grad_input_kernel<Tx, Tg, V><<<static_cast<unsigned>(M), detail::kRowThreads, 0, current_stream()>>>(
            x.data<Tx>(), dy.data<Tg>(), weight.defined() ? weight.data<float>() : nullptr, mean.data<float>(), rstd.data<float>(),
            g.dx.data<Tx>(), D);
      });
      detail::layer_norm_grad_params_kernel<Tx, Tg><<<grid, kThreads, 0, current_stream()>>>(
          x.data<Tx>(), dy.data<Tg>(), mean.data<float>(), rstd.data<float>(), g.dweight.data<float>(), g.dbias.data<float>(), M, D,
          rows);
    });
  });
  check_launch(op);
  return g;
}

}  // namespace mixprec::gpu
