#pragma once
// The CUDA entries of the device kernel table (backends/device.hpp), registered when this header
// is included: from then on the ops (matmul, linear and its GELU epilogues, conv2d, softmax,
// batch_norm, layer_norm, embedding, dropout, the activations, exp/log, add/mul/div, sum/mean,
// casts and copies, fused attention; attention with a mask and cross_entropy composed from
// these; the optimizers' and GradScaler's fused updates, and the graphs of CapturedStep) run
// CUDA tensors here, with the CPU's autograd, autocast and checks around them. Ops
// without an entry refuse CUDA tensors by name.
#include "mixprec/backends/cuda/amp.cuh"
#include "mixprec/backends/cuda/attention.cuh"
#include "mixprec/backends/cuda/elementwise.cuh"
#include "mixprec/backends/cuda/embedding.cuh"
#include "mixprec/backends/cuda/gemm.cuh"
#include "mixprec/backends/cuda/norm.cuh"
#include "mixprec/backends/cuda/training.cuh"
#include "mixprec/backends/cuda/graph.cuh"
#include "mixprec/backends/cuda/streams.hpp"

namespace mixprec::gpu {

namespace detail {
template <class T>
struct FillWith {
  T value;
  __device__ T operator()() const { return value; }
};

// Values load into float and round once on store, as the CPU's binary_kernel does; operands of
// two dtypes (a 16-bit branch added to a float32 residual stream) are widened in the same pass.
struct BinaryFn {
  DeviceBinary op;
  float alpha;
  template <class A, class B>
  __device__ float operator()(A a, B b) const {
    const float x = static_cast<float>(a), y = static_cast<float>(b);
    return op == DeviceBinary::Add ? x + alpha * y : op == DeviceBinary::Mul ? x * y : x / y;
  }
};

// The scalar is rounded to T first, as the CPU rounds a 0-dim operand to the tensor's dtype.
struct BinaryScalarFn {
  DeviceBinary op;
  float alpha, s;
  bool reversed;
  template <class T>
  __device__ T operator()(T a) const {
    const float x = reversed ? s : static_cast<float>(a), y = reversed ? static_cast<float>(a) : s;
    return T(op == DeviceBinary::Add ? x + alpha * y : op == DeviceBinary::Mul ? x * y : x / y);
  }
};

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

inline ConvShape conv_shape(const mixprec::detail::ConvGeom& g, DType dtype, ConvLayout layout = ConvLayout::NCHW) {
  ConvShape s;
  s.N = g.N, s.C = g.C, s.H = g.H, s.W = g.W, s.O = g.O, s.KH = g.KH, s.KW = g.KW;
  s.SH = g.SH, s.SW = g.SW, s.PH = g.PH, s.PW = g.PW, s.DH = g.DH, s.DW = g.DW, s.G = g.G;
  s.dtype = dtype;
  s.layout = layout;
  return s;
}

// w [O, C/G, KH, KW] (contiguous, from the op) as cuDNN's NHWC filter [O, KH, KW, C/G]: a view for
// 1x1 and depthwise filters, else one small permuted copy per call (channels_last.hpp).
inline Tensor nhwc_filter(const Tensor& w) {
  const Tensor v = filter_nhwc_order(w);
  return v.is_contiguous() ? v : contiguous(v);
}
// A tensor brought to `layout` (a copy only when it is not in it yet).
inline Tensor in_layout(const Tensor& t, ConvLayout layout) {
  if (layout == ConvLayout::NCHW) return contiguous(t);
  if (t.is_contiguous(MemoryFormat::ChannelsLast)) return t;
  Tensor out = empty(t.sizes(), t.dtype(), Device::CUDA, MemoryFormat::ChannelsLast);
  dispatch_storage(t.dtype(), "cuda conv2d", [&]<class T>() { convert_into<T, T>("cuda conv2d", out, t); });
  return out;
}
}  // namespace detail

// The table's convolution entries (DeviceKernels::channels_last). A channels-last activation (x,
// or gy for the input gradient) runs cuDNN with NHWC descriptors on its own bytes and the result
// comes back as a channels-last [N, C, H, W] view of cuDNN's NHWC output; an NCHW one runs the NCHW
// path as before. float32 takes NHWC too: cuDNN has float32 NHWC algorithms (FMA math, no tf32),
// Find benchmarks them as it does NCHW's, and the alternative -- reordering activation and result
// around every call -- costs two extra passes over both, which for ResNet-sized convolutions is
// comparable to the convolution itself.
inline Tensor conv_forward_entry(const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
  const Tensor bc = b.defined() ? contiguous(b, x.dtype()) : b;
  if (activation_layout(x) == ConvLayout::NCHW) return conv2d_forward(detail::conv_shape(g, x.dtype()), x, w, bc);
  const char* op = "conv2d (cuda, channels-last)";
  const Tensor y = conv2d_forward(detail::conv_shape(g, x.dtype(), ConvLayout::NHWC), nhwc_view(op, x), detail::nhwc_filter(w), bc);
  return channels_last_view(op, y);
}
inline Tensor conv_backward_input_entry(const mixprec::detail::ConvGeom& g, const Tensor& gy, const Tensor& w) {
  if (activation_layout(gy) == ConvLayout::NCHW) return conv2d_backward_data(detail::conv_shape(g, gy.dtype()), gy, w);
  const char* op = "conv2d_backward (cuda, channels-last)";
  const Tensor gx =
      conv2d_backward_data(detail::conv_shape(g, gy.dtype(), ConvLayout::NHWC), nhwc_view(op, gy), detail::nhwc_filter(w));
  return channels_last_view(op, gx);
}
// x and gy in x's layout (the op passes them so; gy is brought to it otherwise); the weight
// gradient contiguous [O, C/G, KH, KW] in x's dtype, as the contract says: from NHWC, a view for
// 1x1 and depthwise filters, else one small permuted copy.
inline Tensor conv_backward_weight_entry(const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& gy) {
  const ConvLayout layout = activation_layout(x);
  if (layout == ConvLayout::NCHW) return conv2d_backward_filter(detail::conv_shape(g, x.dtype()), x, gy);
  const char* op = "conv2d_backward (cuda, channels-last)";
  const Tensor dw = conv2d_backward_filter(detail::conv_shape(g, x.dtype(), ConvLayout::NHWC), nhwc_view(op, x),
                                           nhwc_view(op, detail::in_layout(gy, layout)));
  const Tensor v = filter_nchw_order(dw);
  return v.is_contiguous() ? v : contiguous(v);
}

inline void copy(const Tensor& dst, const Tensor& src) {
  const char* op = "gpu::copy_";
  require_cuda_tensor(op, dst);
  require_cuda_tensor(op, src);
  const int64_t n = dst.numel();
  if (n == 0) return;
  // One memcpy where both hold the same dense layout (contiguous, or both channels-last).
  if (dst.dtype() == src.dtype() && dst.sizes() == src.sizes() &&
      ((dst.is_contiguous() && src.is_contiguous()) || (dst.strides() == src.strides() && is_dense(dst)))) {
    check(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), static_cast<std::size_t>(dst.nbytes()), cudaMemcpyDeviceToDevice,
                          current_stream()),
          op);
    return;
  }
  const DType d = dst.dtype();
  if (d == src.dtype() && d != DType::Float32 && d != DType::Float16 && d != DType::BFloat16) {
    // Integers, bool, float64 to the same dtype: the bits, moved by element size.
    switch (dst.element_size()) {
      case 1: convert_into<uint8_t, uint8_t>(op, dst, src); break;
      case 4: convert_into<uint32_t, uint32_t>(op, dst, src); break;
      default: convert_into<uint64_t, uint64_t>(op, dst, src); break;
    }
  } else {  // conversions between the float kernel types
    dispatch_storage(d, op, [&]<class To>() { dispatch_storage(src.dtype(), op, [&]<class From>() { convert_into<To, From>(op, dst, src); }); });
  }
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
  dispatch_all(t.dtype(), op, [&]<class T>() {  // every dtype: counters (int64) are filled too
    launch_loop(op, t.sizes(), detail::FillWith<T>{convert_value<T>(value)}, LoopTensor<T>{t.data<T>(), t.strides()});
  });
}

inline Tensor binary(DeviceBinary kind, const Tensor& a, const Tensor& b, double alpha) {
  const char* op = "gpu::binary";
  require_cuda_tensor(op, a);
  require_cuda_tensor(op, b);
  const DType ct = promote_types(a.dtype(), b.dtype());
  const Shape shape = broadcast_shapes(a.sizes(), b.sizes(), op);
  // The result takes the layout of an operand of its full shape, as the CPU's binary_kernel: a
  // residual add of channels-last activations stays channels-last (one run in the loop plan).
  const MemoryFormat layout = a.sizes() == shape ? a.suggest_memory_format() : b.sizes() == shape ? b.suggest_memory_format()
                                                                                               : MemoryFormat::Contiguous;
  Tensor out = empty(shape, ct, Device::CUDA, layout);
  if (out.numel() == 0) return out;
  const detail::BinaryFn f{kind, static_cast<float>(alpha)};
  auto run = [&]<class O, class A, class B>() {
    launch_loop(op, shape, f, LoopTensor<O>{out.data<O>(), out.strides()}, LoopTensor<const A>{a.data<A>(), broadcast_strides(a, shape)},
                LoopTensor<const B>{b.data<B>(), broadcast_strides(b, shape)});
  };
  if (a.dtype() == b.dtype()) {
    dispatch_storage(ct, op, [&]<class T>() { run.template operator()<T, T, T>(); });
  } else if (a.dtype() == DType::Float32) {  // float32 with a 16-bit operand: one pass
    dispatch_storage(b.dtype(), op, [&]<class B>() { run.template operator()<float, float, B>(); });
  } else if (b.dtype() == DType::Float32) {
    dispatch_storage(a.dtype(), op, [&]<class A>() { run.template operator()<float, A, float>(); });
  } else {  // float16 with bfloat16: both widened first
    return binary(kind, contiguous(a, ct), contiguous(b, ct), alpha);
  }
  return out;
}

inline Tensor binary_scalar(DeviceBinary kind, const Tensor& a, double s, double alpha, bool reversed) {
  const char* op = "gpu::binary_scalar";
  require_cuda_tensor(op, a);
  Tensor out = empty_like_layout(a, a.dtype());  // channels-last stays so, as on the CPU
  if (out.numel() == 0) return out;
  dispatch_storage(a.dtype(), op, [&]<class T>() {
    const detail::BinaryScalarFn f{kind, static_cast<float>(alpha), static_cast<float>(T(s)), reversed};
    launch_loop(op, a.sizes(), f, LoopTensor<T>{out.data<T>(), out.strides()}, LoopTensor<const T>{a.data<T>(), a.strides()});
  });
  return out;
}

// Row sums on cuBLASLt, float32-accumulated, with no reduction kernel of its own: reduced dims
// leading in a contiguous x (bias gradients) as ones[1, R] @ x[R, M] with no copy; a dense
// non-contiguous x (channels-last: a conv bias gradient, the global average pool) whose memory
// order is [kept][reduced][kept] as ones[1, R] @ x[K1, R, K2] with no copy (plan_memory_sum);
// otherwise the reduced dims moved last and made contiguous, x'[M, R] @ ones[R, 1].
inline Tensor sum_dims(const Tensor& x, const Shape& dims) {
  const char* op = "gpu::sum";
  require_cuda_tensor(op, x);
  std::vector<bool> reduced(static_cast<std::size_t>(x.dim()), dims.empty());
  for (int64_t d : dims) reduced[static_cast<std::size_t>(x.wrap_dim(d, op))] = true;
  Shape perm, kept;
  int64_t M = 1, R = 1;
  bool leading = true;  // every reduced dim comes before every kept one
  for (int64_t d = 0; d < x.dim(); ++d)
    if (!reduced[static_cast<std::size_t>(d)]) {
      perm.push_back(d);
      kept.push_back(x.size(d));
      M *= x.size(d);
    } else if (!perm.empty()) {
      leading = false;
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
  if (M == 1) {  // everything: CUB's tree reduction (a GEMV with one output would run on one SM)
    const Tensor s = gpu::sum(x).view(kept);
    return s.dtype() == x.dtype() ? s : contiguous(s, x.dtype());
  }
  if (leading && x.is_contiguous()) {
    Tensor ones = empty({1, R}, x.dtype(), Device::CUDA);
    fill(ones, 1.0);
    const Tensor s = matmul(ones, x.view({R, M}), DType::Float32).view(kept);
    return s.dtype() == x.dtype() ? s : contiguous(s, x.dtype());
  }
  if (!x.is_contiguous()) {
    if (const MemorySumPlan mp = plan_memory_sum(x, reduced); mp.ok) {
      Tensor ones = empty({1, mp.R}, x.dtype(), Device::CUDA);
      fill(ones, 1.0);
      const Shape xs{mp.K1, mp.R, mp.K2};
      const Tensor xv = mixprec::detail::make_view(x, xs, contiguous_strides(xs), x.storage_offset());
      const Tensor s = matmul(ones, xv, DType::Float32).view(kept);
      return s.dtype() == x.dtype() ? s : contiguous(s, x.dtype());
    }
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
    t.binary_scalar = [](DeviceBinary k, const Tensor& a, double s, double alpha, bool reversed) {
      return gpu::binary_scalar(k, a, s, alpha, reversed);
    };
    t.unary = [](DeviceUnary u, const Tensor& x) { return activation(activation_of(u), x); };
    t.unary_backward = [](DeviceUnary u, const Tensor& g, const Tensor& x, const Tensor& y) {
      return activation_backward(activation_of(u), g, x, y);
    };
    t.sum = [](const Tensor& x, const Shape& dims) { return sum_dims(x, dims); };
    t.matmul = [](const Tensor& a, const Tensor& b, const Tensor& bias) { return gpu::matmul(a, b, std::nullopt, bias); };
    t.softmax = [](const Tensor& x, int64_t dim, bool log) { return gpu::softmax(x, dim, log); };
    t.softmax_backward = [](const Tensor& y, const Tensor& g, int64_t dim, bool log) { return gpu::softmax_backward(y, g, dim, log); };
    // Convolutions and batch norm take channels-last activations as they are (NHWC in cuDNN).
    t.channels_last = true;
    t.conv_forward = &conv_forward_entry;
    t.conv_backward_input = &conv_backward_input_entry;
    t.conv_backward_weight = &conv_backward_weight_entry;
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
    t.layer_norm_to = [](const Tensor& x, const Tensor& w, const Tensor& b, double eps, DType out) -> std::array<Tensor, 3> {
      LayerNormResult r = gpu::layer_norm(x, w, b, eps, out);
      return {r.y, r.mean, r.rstd};
    };
    // cuBLASLt's GELU epilogues are the tanh form: the exact GELU composes (undefined results).
    t.linear_gelu = [](const Tensor& x, const Tensor& w1, const Tensor& b1, DeviceUnary act) -> std::array<Tensor, 2> {
      if (act != DeviceUnary::GeluTanh) return {};
      LinearGeluResult r = linear_gelu_aux(x, w1, b1);
      return {r.y, r.pre};
    };
    t.linear_dgelu = [](const Tensor& g, const Tensor& w2, const Tensor& pre, DeviceUnary act) -> std::array<Tensor, 2> {
      if (act != DeviceUnary::GeluTanh) return {};
      LinearDGeluResult r = linear_dgelu_bgrad(g, w2, pre);
      return {r.dpre, r.dbias};
    };
    t.embedding = [](const Tensor& w, const Tensor& idx) { return gpu::embedding(w, idx); };
    t.embedding_backward = [](const Tensor& g, const Tensor& idx, int64_t V, int64_t pad) {
      return gpu::embedding_backward(g, idx, V, pad);
    };
    t.masked_scale = [](const Tensor& x, const Tensor& keep, double scale) { return gpu::masked_scale(x, keep, scale); };
    t.sdpa_forward = [](const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale, double p, uint64_t seed) {
      return gpu::sdpa_forward(q, k, v, causal, scale, p, seed);
    };
    t.sdpa_backward = [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse, bool causal,
                         double scale, double p, uint64_t seed) { return gpu::sdpa_backward(g, q, k, v, o, lse, causal, scale, p, seed); };
    // The training step without host syncs (amp.cuh, training.cuh) and its capture (graph.cuh).
    t.adam = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::AdamHyper& h, const Tensor& f) { adam_updates(ps, h, f); };
    t.sgd = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::SgdScalars& sc, const Tensor& f) { sgd_updates(ps, sc, f); };
    t.unscale = [](const std::vector<Tensor>& g, const std::vector<Tensor>& m, const Tensor& s, const Tensor& f) { unscale_grads(g, m, s, f); };
    t.update_scale = [](const Tensor& s, const Tensor& tr, const std::vector<Tensor>& f, double g, double b, int64_t i, const Tensor& sk) {
      update_scale_on(s, tr, f, g, b, i, sk);
    };
    t.grad_norm = [](const std::vector<Tensor>& g) { return gpu::grad_norm(g); };
    t.clip_grads = [](const std::vector<Tensor>& g, const Tensor& n, double m) { gpu::clip_grads(g, n, m); };
    t.dropout = [](const Tensor& x, uint64_t seed, double p, double s, const Tensor& r) { return dropout_apply(x, seed, p, s, r); };
    t.class_weights = [](const Tensor& tg, int64_t N, int64_t C, int64_t S, int64_t ig, double ls, DType d, const Tensor& bad) {
      return gpu::class_weights(tg, N, C, S, ig, ls, d, bad);
    };
    t.clamp_indices = [](const Tensor& idx, int64_t V, const Tensor& bad) { gpu::clamp_indices(idx, V, bad); };
    t.make_graph = []() -> std::unique_ptr<DeviceGraph> { return std::make_unique<CudaGraph>(); };
    t.make_stream = []() -> std::unique_ptr<DeviceStream> { return std::make_unique<CudaStream>(); };
    t.make_event = []() -> std::unique_ptr<DeviceEvent> { return std::make_unique<CudaEvent>(); };
    return t;
  }();
  return k;
}
// Registered at static initialisation of every program that includes this header.
inline const bool kCudaKernelsRegistered = (set_device_kernels(Device::CUDA, &cuda_kernel_table()), true);
}  // namespace detail

}  // namespace mixprec::gpu
