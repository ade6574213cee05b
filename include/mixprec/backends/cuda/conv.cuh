#pragma once
// 2-D convolution through cuDNN 9: forward, backward-data and backward-filter, NCHW float32 and
// NHWC float16/bfloat16 (the tensor-core layout), with float32 accumulation. Each direction's
// algorithm candidates come from cuDNN's heuristic once per shape and are cached; workspaces
// come from the caching allocator on the current stream.
#include <algorithm>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

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

// Each direction's heuristic candidates (algorithm, workspace bytes), best first. cuDNN's
// heuristic lists some algorithms that the call itself then rejects for the shape (seen on an
// H200: BAD_PARAM from backward-data of a grouped conv), so a call tries them in order and
// drops the rejected ones from the cache.
template <class Algo>
using ConvCandidates = std::vector<std::pair<Algo, size_t>>;
struct ConvAlgos {
  ConvCandidates<cudnnConvolutionFwdAlgo_t> fwd;
  ConvCandidates<cudnnConvolutionBwdDataAlgo_t> bwd_data;
  ConvCandidates<cudnnConvolutionBwdFilterAlgo_t> bwd_filter;
};

namespace detail {
using ConvKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int, int, bool>;
inline ConvKey conv_key(const ConvShape& s) {
  return {s.N,  s.C,  s.H,  s.W,  s.O,  s.KH, s.KW, s.SH, s.SW, s.PH, s.PW, s.DH, s.DW, s.G, static_cast<int>(s.dtype),
          static_cast<int>(s.layout), s.allow_tf32};
}
inline std::mutex& conv_cache_mutex() {
  static std::mutex mu;
  return mu;
}

inline std::string describe(const ConvShape& s) {
  std::ostringstream o;
  o << "x [" << s.N << ", " << s.C << ", " << s.H << ", " << s.W << "], " << s.O << " filters " << s.KH << "x" << s.KW << ", stride "
    << s.SH << "x" << s.SW << ", padding " << s.PH << "x" << s.PW << ", dilation " << s.DH << "x" << s.DW << ", groups " << s.G << ", "
    << s.dtype << (s.layout == ConvLayout::NHWC ? " NHWC" : " NCHW");
  return o.str();
}

// One direction's candidates: `get` is its cudnnGetConvolution*Algorithm_v7 (named `api`), asked
// for up to Count of them (Perf records) with the direction's descriptors, in its order; those
// that succeeded and fit the workspace limit are kept.
template <class Perf, int Count, class Get, class... Descs>
auto find_algorithms(Get get, const char* api, const char* what, const ConvShape& s, cudnnHandle_t h, Descs... descs) {
  Perf perf[Count];
  int n = 0;
  check_cudnn(get(h, descs..., Count, &n, perf), api);
  ConvCandidates<decltype(perf[0].algo)> out;
  for (int i = 0; i < n; ++i)
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= kConvWorkspaceLimit) out.emplace_back(perf[i].algo, perf[i].memory);
  MIXPREC_CHECK(!out.empty(), "cudnn conv2d: no ", what, " algorithm fits ", kConvWorkspaceLimit, " bytes of workspace for ", describe(s));
  return out;
}
}  // namespace detail

// The cached candidates for this shape (std::map nodes are stable: the reference stays valid).
inline ConvAlgos& conv_algorithms(const ConvShape& s, const ConvDescriptors& d) {
  static std::map<detail::ConvKey, ConvAlgos> cache;
  const detail::ConvKey key = detail::conv_key(s);
  {
    std::lock_guard<std::mutex> lock(detail::conv_cache_mutex());
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  cudnnHandle_t h = cudnn_handle();
  ConvAlgos a;
  a.fwd = detail::find_algorithms<cudnnConvolutionFwdAlgoPerf_t, CUDNN_CONVOLUTION_FWD_ALGO_COUNT>(
      cudnnGetConvolutionForwardAlgorithm_v7, "cudnnGetConvolutionForwardAlgorithm_v7", "forward", s, h, d.x.get(), d.w.get(),
      d.conv.get(), d.y.get());
  a.bwd_data = detail::find_algorithms<cudnnConvolutionBwdDataAlgoPerf_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT>(
      cudnnGetConvolutionBackwardDataAlgorithm_v7, "cudnnGetConvolutionBackwardDataAlgorithm_v7", "backward-data", s, h, d.w.get(),
      d.y.get(), d.conv.get(), d.x.get());
  a.bwd_filter = detail::find_algorithms<cudnnConvolutionBwdFilterAlgoPerf_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT>(
      cudnnGetConvolutionBackwardFilterAlgorithm_v7, "cudnnGetConvolutionBackwardFilterAlgorithm_v7", "backward-filter", s, h,
      d.x.get(), d.y.get(), d.conv.get(), d.w.get());
  std::lock_guard<std::mutex> lock(detail::conv_cache_mutex());
  return cache.emplace(key, std::move(a)).first->second;
}

namespace detail {
inline Tensor conv_workspace(size_t bytes) {
  return bytes ? empty({static_cast<int64_t>(bytes)}, DType::UInt8, Device::CUDA) : Tensor();
}
inline void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// call(algo, workspace, bytes) with each candidate until one is accepted; the rejected ones
// before it leave the cache. Any other error, or no candidate left, throws naming the shape.
// (A descriptor that every algorithm rejects with BAD_PARAM shows as "every candidate ... was
// rejected".) The list is copied under the lock, and trimmed only if no other thread has.
template <class Algo, class Call>
void run_candidates(ConvCandidates<Algo>& cached, const char* api, const ConvShape& s, Call call) {
  ConvCandidates<Algo> cands;
  {
    std::lock_guard<std::mutex> lock(conv_cache_mutex());
    cands = cached;
  }
  cudnnStatus_t st = CUDNN_STATUS_NOT_SUPPORTED;
  std::size_t i = 0;
  for (; i < cands.size(); ++i) {
    const auto [algo, bytes] = cands[i];
    const Tensor ws = conv_workspace(bytes);
    st = call(algo, ptr(ws), bytes);
    if (st != CUDNN_STATUS_NOT_SUPPORTED && st != CUDNN_STATUS_BAD_PARAM) break;
  }
  if (i > 0 && i < cands.size() && st == CUDNN_STATUS_SUCCESS) {
    std::lock_guard<std::mutex> lock(conv_cache_mutex());
    if (cached.size() >= i && std::equal(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(i), cached.begin()))
      cached.erase(cached.begin(), cached.begin() + static_cast<std::ptrdiff_t>(i));
  }
  if (st != CUDNN_STATUS_SUCCESS)
    fail(api, ": cuDNN error ", static_cast<int>(st), " (", cudnnGetErrorString(st), ") for ", describe(s),
         i == cands.size() ? " (every candidate algorithm was rejected)" : "");
}

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
  const float one = 1.0f, zero = 0.0f;
  detail::run_candidates(conv_algorithms(s, d).fwd, "cudnnConvolutionForward", s, [&](auto algo, void* ws, size_t bytes) {
    return cudnnConvolutionForward(cudnn_handle(), &one, d.x.get(), x.data_ptr(), d.w.get(), w.data_ptr(), d.conv.get(), algo, ws, bytes,
                                   &zero, d.y.get(), y.data_ptr());
  });
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
  const float one = 1.0f, zero = 0.0f;
  detail::run_candidates(conv_algorithms(s, d).bwd_data, "cudnnConvolutionBackwardData", s, [&](auto algo, void* ws, size_t bytes) {
    return cudnnConvolutionBackwardData(cudnn_handle(), &one, d.w.get(), w.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(), algo, ws,
                                        bytes, &zero, d.x.get(), dx.data_ptr());
  });
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
  const float one = 1.0f, zero = 0.0f;
  detail::run_candidates(conv_algorithms(s, d).bwd_filter, "cudnnConvolutionBackwardFilter", s, [&](auto algo, void* ws, size_t bytes) {
    return cudnnConvolutionBackwardFilter(cudnn_handle(), &one, d.x.get(), x.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(), algo, ws,
                                          bytes, &zero, d.w.get(), dw.data_ptr());
  });
  return dw;
}

}  // namespace mixprec::gpu
