#pragma once
// 2-D convolution through cuDNN 9: forward, backward-data and backward-filter, NCHW float32 and
// NHWC float16/bfloat16 (the tensor-core layout), with float32 accumulation. The algorithm for
// each direction is chosen once per shape (cuDNN's heuristic, first one that fits the workspace
// limit) and cached; workspaces come from the caching allocator on the current stream.
#include <map>
#include <mutex>
#include <tuple>

#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/backends/cuda/cudnn_desc.hpp"

namespace mixprec::gpu {

// One handle per host thread, bound to the current stream on every use.
inline cudnnHandle_t cudnn_handle() {
  struct Holder {
    cudnnHandle_t h = nullptr;
    Holder() { check_cudnn(cudnnCreate(&h), "cudnnCreate"); }
    ~Holder() { cudnnDestroy(h); }
  };
  thread_local Holder holder;
  check_cudnn(cudnnSetStream(holder.h, current_stream()), "cudnnSetStream");
  return holder.h;
}

inline constexpr size_t kConvWorkspaceLimit = size_t{1} << 30;

struct ConvAlgos {
  cudnnConvolutionFwdAlgo_t fwd{};
  cudnnConvolutionBwdDataAlgo_t bwd_data{};
  cudnnConvolutionBwdFilterAlgo_t bwd_filter{};
  size_t fwd_ws = 0, bwd_data_ws = 0, bwd_filter_ws = 0;
};

namespace detail {
using ConvKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int, int, bool>;
inline ConvKey conv_key(const ConvShape& s) {
  return {s.N,  s.C,  s.H,  s.W,  s.O,  s.KH, s.KW, s.SH, s.SW, s.PH, s.PW, s.DH, s.DW, s.G, static_cast<int>(s.dtype),
          static_cast<int>(s.layout), s.allow_tf32};
}

// The first heuristic candidate that succeeded and fits the workspace limit.
template <class Perf>
const Perf& pick(const Perf* perf, int n, const char* what) {
  for (int i = 0; i < n; ++i)
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= kConvWorkspaceLimit) return perf[i];
  fail("cudnn conv2d: no ", what, " algorithm fits ", kConvWorkspaceLimit, " bytes of workspace");
}

// One direction's algorithm: `get` is its cudnnGetConvolution*Algorithm_v7 (named `api`), asked
// for up to Count candidates (Perf records) with the direction's descriptors, in its order.
template <class Perf, int Count, class Get, class... Descs>
Perf find_algorithm(Get get, const char* api, const char* what, cudnnHandle_t h, Descs... descs) {
  Perf perf[Count];
  int n = 0;
  check_cudnn(get(h, descs..., Count, &n, perf), api);
  return pick(perf, n, what);
}
}  // namespace detail

inline ConvAlgos conv_algorithms(const ConvShape& s, const ConvDescriptors& d) {
  static std::mutex mu;
  static std::map<detail::ConvKey, ConvAlgos> cache;
  const detail::ConvKey key = detail::conv_key(s);
  {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  cudnnHandle_t h = cudnn_handle();
  const auto fwd = detail::find_algorithm<cudnnConvolutionFwdAlgoPerf_t, CUDNN_CONVOLUTION_FWD_ALGO_COUNT>(
      cudnnGetConvolutionForwardAlgorithm_v7, "cudnnGetConvolutionForwardAlgorithm_v7", "forward", h, d.x.get(), d.w.get(),
      d.conv.get(), d.y.get());
  const auto bwd_data = detail::find_algorithm<cudnnConvolutionBwdDataAlgoPerf_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT>(
      cudnnGetConvolutionBackwardDataAlgorithm_v7, "cudnnGetConvolutionBackwardDataAlgorithm_v7", "backward-data", h, d.w.get(),
      d.y.get(), d.conv.get(), d.x.get());
  const auto bwd_filter = detail::find_algorithm<cudnnConvolutionBwdFilterAlgoPerf_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT>(
      cudnnGetConvolutionBackwardFilterAlgorithm_v7, "cudnnGetConvolutionBackwardFilterAlgorithm_v7", "backward-filter", h, d.x.get(),
      d.y.get(), d.conv.get(), d.w.get());
  const ConvAlgos a{fwd.algo, bwd_data.algo, bwd_filter.algo, fwd.memory, bwd_data.memory, bwd_filter.memory};
  std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, a);
  return a;
}

namespace detail {
inline Tensor conv_workspace(size_t bytes) {
  return bytes ? empty({static_cast<int64_t>(bytes)}, DType::UInt8, Device::CUDA) : Tensor();
}
inline void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The memory shape of a logical [n, c, h, w] tensor in `layout`.
inline Shape layout_shape(ConvLayout l, int64_t n, int64_t c, int64_t h, int64_t w) {
  return l == ConvLayout::NHWC ? Shape{n, h, w, c} : Shape{n, c, h, w};
}

inline void check_operand(const char* op, const Tensor& t, const Shape& expect, DType dtype) {
  require_cuda_tensor(op, t);
  MIXPREC_CHECK(t.sizes() == expect && t.is_contiguous() && t.dtype() == dtype, op, ": expected a contiguous ", dtype, " tensor of shape ",
                expect, ", got ", t.dtype(), " ", t.sizes(), " with strides ", t.strides());
}
}  // namespace detail

// y = conv(x, w) (+ bias [O]). Shapes are in `s.layout`'s memory order: NCHW x [N, C, H, W],
// w [O, C/G, KH, KW]; NHWC x [N, H, W, C], w [O, KH, KW, C/G].
inline Tensor conv2d_forward(const ConvShape& s, const Tensor& x, const Tensor& w, const Tensor& bias = Tensor()) {
  const char* op = "gpu::conv2d_forward";
  const ConvDescriptors d = make_conv_descriptors(s);
  detail::check_operand(op, x, detail::layout_shape(s.layout, s.N, s.C, s.H, s.W), s.dtype);
  detail::check_operand(op, w, detail::layout_shape(s.layout, s.O, s.C / s.G, s.KH, s.KW), s.dtype);
  const auto& ys = d.y_shape;
  Tensor y = empty(detail::layout_shape(s.layout, ys[0], ys[1], ys[2], ys[3]), s.dtype, Device::CUDA);
  const ConvAlgos a = conv_algorithms(s, d);
  const Tensor ws = detail::conv_workspace(a.fwd_ws);
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnConvolutionForward(cudnn_handle(), &one, d.x.get(), x.data_ptr(), d.w.get(), w.data_ptr(), d.conv.get(), a.fwd,
                                      detail::ptr(ws), a.fwd_ws, &zero, d.y.get(), y.data_ptr()),
              "cudnnConvolutionForward");
  if (bias.defined()) {
    detail::check_operand(op, bias, {s.O}, s.dtype);
    const TensorDescriptor bd = make_tensor_descriptor(1, s.O, 1, 1, s.dtype, s.layout);
    check_cudnn(cudnnAddTensor(cudnn_handle(), &one, bd.get(), bias.data_ptr(), &one, d.y.get(), y.data_ptr()), "cudnnAddTensor");
  }
  return y;
}

// dx from dy (the output's gradient) and w.
inline Tensor conv2d_backward_data(const ConvShape& s, const Tensor& dy, const Tensor& w) {
  const char* op = "gpu::conv2d_backward_data";
  const ConvDescriptors d = make_conv_descriptors(s);
  const auto& ys = d.y_shape;
  detail::check_operand(op, dy, detail::layout_shape(s.layout, ys[0], ys[1], ys[2], ys[3]), s.dtype);
  detail::check_operand(op, w, detail::layout_shape(s.layout, s.O, s.C / s.G, s.KH, s.KW), s.dtype);
  Tensor dx = empty(detail::layout_shape(s.layout, s.N, s.C, s.H, s.W), s.dtype, Device::CUDA);
  const ConvAlgos a = conv_algorithms(s, d);
  const Tensor ws = detail::conv_workspace(a.bwd_data_ws);
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnConvolutionBackwardData(cudnn_handle(), &one, d.w.get(), w.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(),
                                           a.bwd_data, detail::ptr(ws), a.bwd_data_ws, &zero, d.x.get(), dx.data_ptr()),
              "cudnnConvolutionBackwardData");
  return dx;
}

// dw from x and dy.
inline Tensor conv2d_backward_filter(const ConvShape& s, const Tensor& x, const Tensor& dy) {
  const char* op = "gpu::conv2d_backward_filter";
  const ConvDescriptors d = make_conv_descriptors(s);
  const auto& ys = d.y_shape;
  detail::check_operand(op, x, detail::layout_shape(s.layout, s.N, s.C, s.H, s.W), s.dtype);
  detail::check_operand(op, dy, detail::layout_shape(s.layout, ys[0], ys[1], ys[2], ys[3]), s.dtype);
  Tensor dw = empty(detail::layout_shape(s.layout, s.O, s.C / s.G, s.KH, s.KW), s.dtype, Device::CUDA);
  const ConvAlgos a = conv_algorithms(s, d);
  const Tensor ws = detail::conv_workspace(a.bwd_filter_ws);
  const float one = 1.0f, zero = 0.0f;
  check_cudnn(cudnnConvolutionBackwardFilter(cudnn_handle(), &one, d.x.get(), x.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(),
                                             a.bwd_filter, detail::ptr(ws), a.bwd_filter_ws, &zero, d.w.get(), dw.data_ptr()),
              "cudnnConvolutionBackwardFilter");
  return dw;
}

}  // namespace mixprec::gpu
