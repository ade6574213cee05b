#pragma once
// The CUDA entries of the device kernel table (backends/device.hpp), registered when this header
// is included: from then on the ops (matmul, linear, conv2d, softmax, batch_norm, layer_norm,
// embedding, dropout, the activations, exp/log, add/mul/div, sum/mean, casts and copies; attention
// and cross_entropy composed from these; the optimizers' and GradScaler's fused updates) run
// CUDA tensors here, with the CPU's autograd, autocast and checks around them. Ops
// without an entry refuse CUDA tensors by name.
#include "mixprec/backends/cuda/amp.cuh"
#include "mixprec/backends/cuda/elementwise.cuh"
#include "mixprec/backends/cuda/embedding.cuh"
#include "mixprec/backends/cuda/gemm.cuh"
#include "mixprec/backends/cuda/norm.cuh"

namespace mixprec::gpu {

namespace detail {
inline StridedLayout layout_of(const Shape& sizes, const Shape& strides, const char* op) {
  MIXPREC_CHECK(sizes.size() <= 8, op, ": CUDA kernels take at most 8 dimensions, got shape ", sizes);
  StridedLayout l;
  l.nd = static_cast<int>(sizes.size());
  for (int d = 0; d < l.nd; ++d) {
    l.sizes[d] = sizes[static_cast<std::size_t>(d)];
    l.strides[d] = strides[static_cast<std::size_t>(d)];
  }
  return l;
}
inline StridedLayout layout_of(const Tensor& t, const char* op) { return layout_of(t.sizes(), t.strides(), op); }

MIXPREC_HOST_DEVICE int64_t offset_of(const StridedLayout& l, int64_t i) {
  int64_t off = 0;
  for (int d = l.nd - 1; d >= 0; --d) {
    off += (i % l.sizes[d]) * l.strides[d];
    i /= l.sizes[d];
  }
  return off;
}

template <class To, class From>
__global__ void copy_kernel(To* __restrict__ dst, StridedLayout ld, const From* __restrict__ src, StridedLayout ls, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[offset_of(ld, i)] = convert_value<To>(src[offset_of(ls, i)]);
}

template <class T>
__global__ void fill_kernel(T* __restrict__ dst, StridedLayout l, T value, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[offset_of(l, i)] = value;
}

// Values load into float and round once on store, as the CPU's binary_kernel does.
template <class T>
__global__ void binary_kernel(T* __restrict__ out, const T* __restrict__ a, StridedLayout la, const T* __restrict__ b,
                              StridedLayout lb, int64_t n, DeviceBinary op, float alpha) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = static_cast<float>(a[offset_of(la, i)]), y = static_cast<float>(b[offset_of(lb, i)]);
    out[i] = T(op == DeviceBinary::Add ? x + alpha * y : op == DeviceBinary::Mul ? x * y : x / y);
  }
}

// t viewed with `shape` (stride 0 on broadcast dims).
inline StridedLayout broadcast_layout(const Tensor& t, const Shape& shape, const char* op) {
  const auto off = static_cast<int64_t>(shape.size()) - t.dim();
  Shape st(shape.size(), 0);
  for (int64_t i = 0; i < t.dim(); ++i) st[static_cast<std::size_t>(off + i)] = t.size(i) == 1 ? 0 : t.stride(i);
  return layout_of(shape, st, op);
}

inline Activation activation_of(DeviceUnary u) {
  switch (u) {
    case DeviceUnary::Relu: return Activation::Relu;
    case DeviceUnary::Gelu: return Activation::Gelu;
    case DeviceUnary::GeluTanh: return Activation::GeluTanh;
    case DeviceUnary::Silu: return Activation::Silu;
    case DeviceUnary::Sigmoid: return Activation::Sigmoid;
    case DeviceUnary::Tanh: return Activation::Tanh;
    case DeviceUnary::Exp: return Activation::Exp;
    case DeviceUnary::Log: return Activation::Log;
  }
  fail("gpu: unknown activation ", static_cast<int>(u));
}

inline ConvShape conv_shape(const mixprec::detail::ConvGeom& g, DType dtype) {
  ConvShape s;
  s.N = g.N, s.C = g.C, s.H = g.H, s.W = g.W, s.O = g.O, s.KH = g.KH, s.KW = g.KW;
  s.SH = g.SH, s.SW = g.SW, s.PH = g.PH, s.PW = g.PW, s.DH = g.DH, s.DW = g.DW, s.G = g.G;
  s.dtype = dtype;
  return s;
}
}  // namespace detail

inline void copy(const Tensor& dst, const Tensor& src) {
  const char* op = "gpu::copy_";
  require_cuda_tensor(op, dst);
  require_cuda_tensor(op, src);
  const int64_t n = dst.numel();
  if (n == 0) return;
  if (dst.dtype() == src.dtype() && dst.sizes() == src.sizes() && dst.is_contiguous() && src.is_contiguous()) {
    check(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), static_cast<std::size_t>(dst.nbytes()), cudaMemcpyDeviceToDevice,
                          current_stream()),
          op);
    return;
  }
  const StridedLayout ld = detail::layout_of(dst, op), ls = detail::broadcast_layout(src, dst.sizes(), op);
  auto launch = [&]<class To, class From>() {
    detail::copy_kernel<To, From><<<grid_for(n), kThreads, 0, current_stream()>>>(static_cast<To*>(dst.data_ptr()), ld,
                                                                                  static_cast<const From*>(src.data_ptr()), ls, n);
  };
  const DType d = dst.dtype();
  if (d == src.dtype() && d != DType::Float32 && d != DType::Float16 && d != DType::BFloat16) {
    // Integers, bool, float64 to the same dtype: the bits, moved by element size.
    switch (dst.element_size()) {
      case 1: launch.template operator()<uint8_t, uint8_t>(); break;
      case 4: launch.template operator()<uint32_t, uint32_t>(); break;
      default: launch.template operator()<uint64_t, uint64_t>(); break;
    }
  } else {  // conversions between the float kernel types
    dispatch_storage(d, op, [&]<class To>() { dispatch_storage(src.dtype(), op, [&]<class From>() { launch.template operator()<To, From>(); }); });
  }
  check_launch(op);
}

inline void fill(const Tensor& t, double value) {
  const char* op = "gpu::fill_";
  require_cuda_tensor(op, t);
  const int64_t n = t.numel();
  if (n == 0) return;
  if (value == 0.0 && t.is_contiguous()) {  // all-zero bits in every dtype
    check(cudaMemsetAsync(t.data_ptr(), 0, static_cast<std::size_t>(t.nbytes()), current_stream()), op);
    return;
  }
  const StridedLayout l = detail::layout_of(t, op);
  dispatch_all(t.dtype(), op, [&]<class T>() {  // every dtype: counters (int64) are filled too
    detail::fill_kernel<T><<<grid_for(n), kThreads, 0, current_stream()>>>(t.data<T>(), l, convert_value<T>(value), n);
  });
  check_launch(op);
}

inline Tensor binary(DeviceBinary kind, const Tensor& a, const Tensor& b, double alpha) {
  const char* op = "gpu::binary";
  require_cuda_tensor(op, a);
  require_cuda_tensor(op, b);
  MIXPREC_CHECK(a.dtype() == b.dtype(), op, ": operands must share a dtype, got ", a.dtype(), " and ", b.dtype());
  const Shape shape = broadcast_shapes(a.sizes(), b.sizes(), op);
  Tensor out = empty(shape, a.dtype(), Device::CUDA);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const StridedLayout la = detail::broadcast_layout(a, shape, op), lb = detail::broadcast_layout(b, shape, op);
  dispatch_storage(a.dtype(), op, [&]<class T>() {
    detail::binary_kernel<T><<<grid_for(n), kThreads, 0, current_stream()>>>(out.data<T>(), a.data<T>(), la, b.data<T>(), lb, n, kind,
                                                                             static_cast<float>(alpha));
  });
  check_launch(op);
  return out;
}

// Reduced dims moved last and made contiguous, [M, R] @ ones[R, 1] on cuBLASLt: a float32-
// accumulated row sum with no reduction kernel of its own.
inline Tensor sum_dims(const Tensor& x, const Shape& dims) {
  const char* op = "gpu::sum";
  require_cuda_tensor(op, x);
  std::vector<bool> reduced(static_cast<std::size_t>(x.dim()), dims.empty());
  for (int64_t d : dims) reduced[static_cast<std::size_t>(x.wrap_dim(d, op))] = true;
  Shape perm, kept;
  int64_t M = 1, R = 1;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (!reduced[static_cast<std::size_t>(d)]) {
      perm.push_back(d);
      kept.push_back(x.size(d));
      M *= x.size(d);
    }
  for (int64_t d = 0; d < x.dim(); ++d)
    if (reduced[static_cast<std::size_t>(d)]) {
      perm.push_back(d);
      R *= x.size(d);
    }
  if (R == 0 || M == 0) {
    Tensor out = empty(kept, x.dtype(), Device::CUDA);
    fill(out, 0.0);
    return out;
  }
  Shape ps, pst;
  for (int64_t d : perm) {
    ps.push_back(x.size(d));
    pst.push_back(x.stride(d));
  }
  const Tensor rows = contiguous(mixprec::detail::make_view(x, ps, pst, x.storage_offset())).view({M, R});
  Tensor ones = empty({R, 1}, x.dtype(), Device::CUDA);
  fill(ones, 1.0);
  const Tensor s = matmul(rows, ones, DType::Float32).view(kept);
  return s.dtype() == x.dtype() ? s : contiguous(s, x.dtype());
}

namespace detail {
inline const DeviceKernels& cuda_kernel_table() {
  static const DeviceKernels k = [] {
    DeviceKernels t;
    t.to_device = [](const Tensor& c) { return gpu::to_device(c); };
    t.to_host = [](const Tensor& d) { return gpu::to_host(gpu::contiguous(d)); };
    t.copy = [](const Tensor& dst, const Tensor& src) { gpu::copy(dst, src); };
    t.fill = [](const Tensor& x, double v) { gpu::fill(x, v); };
    t.binary = [](DeviceBinary k, const Tensor& a, const Tensor& b, double alpha) { return gpu::binary(k, a, b, alpha); };
    t.unary = [](DeviceUnary u, const Tensor& x) { return activation(activation_of(u), x); };
    t.unary_backward = [](DeviceUnary u, const Tensor& g, const Tensor& x, const Tensor& y) {
      return activation_backward(activation_of(u), g, x, y);
    };
    t.sum = [](const Tensor& x, const Shape& dims) { return sum_dims(x, dims); };
    t.matmul = [](const Tensor& a, const Tensor& b, const Tensor& bias) { return gpu::matmul(a, b, std::nullopt, bias); };
    t.softmax = [](const Tensor& x, int64_t dim, bool log) { return gpu::softmax(x, dim, log); };
    t.softmax_backward = [](const Tensor& y, const Tensor& g, int64_t dim, bool log) { return gpu::softmax_backward(y, g, dim, log); };
    t.conv_forward = [](const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
      return conv2d_forward(conv_shape(g, x.dtype()), x, w, b.defined() ? contiguous(b, x.dtype()) : b);
    };
    t.conv_backward_input = [](const mixprec::detail::ConvGeom& g, const Tensor& gy, const Tensor& w) {
      return conv2d_backward_data(conv_shape(g, gy.dtype()), gy, w);
    };
    t.conv_backward_weight = [](const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& gy) {
      return conv2d_backward_filter(conv_shape(g, x.dtype()), x, gy);
    };
    t.batch_norm = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rm, const Tensor& rv, bool training,
                      double momentum, double eps) -> std::array<Tensor, 3> {
      if (!training) return {batch_norm_inference(x, w, b, rm, rv, eps), Tensor(), Tensor()};
      BatchNormResult r = batch_norm_training(x, w, b, rm, rv, momentum, eps);
      return {r.y, r.save_mean, r.save_invstd};
    };
    t.batch_norm_backward = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& mean, const Tensor& invstd,
                               double eps) -> std::array<Tensor, 3> {
      BatchNormGrads r = gpu::batch_norm_backward(x, g, w, mean, invstd, eps);
      return {r.dx, r.dweight, r.dbias};
    };
    t.layer_norm = [](const Tensor& x, const Tensor& w, const Tensor& b, double eps) -> std::array<Tensor, 3> {
      LayerNormResult r = gpu::layer_norm(x, w, b, eps);
      return {r.y, r.mean, r.rstd};
    };
    t.layer_norm_backward = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& mean,
                               const Tensor& rstd) -> std::array<Tensor, 3> {
      LayerNormGrads r = gpu::layer_norm_backward(x, g, w, mean, rstd);
      return {r.dx, r.dweight, r.dbias};
    };
    t.embedding = [](const Tensor& w, const Tensor& idx) { return gpu::embedding(w, idx); };
    t.embedding_backward = [](const Tensor& g, const Tensor& idx, int64_t V, int64_t pad) {
      return gpu::embedding_backward(g, idx, V, pad);
    };
    t.masked_scale = [](const Tensor& x, const Tensor& keep, double scale) { return gpu::masked_scale(x, keep, scale); };
    t.adam = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::AdamHyper& h) { adam_updates(ps, h); };
    t.sgd = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::SgdScalars& sc) { sgd_updates(ps, sc); };
    t.unscale = [](const std::vector<Tensor>& g, const std::vector<Tensor>& m, double scale) { return unscale_grads(g, m, scale); };
    return t;
  }();
  return k;
}
// Registered at static initialisation of every program that includes this header.
inline const bool kCudaKernelsRegistered = (set_device_kernels(Device::CUDA, &cuda_kernel_table()), true);
}  // namespace detail

}  // namespace mixprec::gpu
