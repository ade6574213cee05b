#pragma once
// 2-D convolution through cuDNN 9: forward, backward-data and backward-filter, NCHW float32 and
// NHWC float16/bfloat16 (the tensor-core layout), with float32 accumulation. Per shape the
// descriptors are built once and each direction's algorithms benchmarked once (cudnnFind*Ex, as
// cudnn.benchmark), each run with the math type it was measured with; the workspace is one
// buffer per thread and stream, grown to the largest need.
#include <algorithm>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/backends/cuda/cudnn_desc.hpp"
#include "mixprec/backends/cuda/plan_cache.hpp"

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

// A shape's descriptors and, per direction, its algorithms: benchmarked by cuDNN's
// cudnnFind*AlgorithmEx on the first call in that direction (as torch.backends.cudnn.benchmark),
// on that call's own buffers, fastest first. cuDNN also lists algorithms that the call itself then
// rejects for the shape (seen on an H200: BAD_PARAM from backward-data of a grouped conv), so a
// call tries them in order and drops the rejected ones. Each host thread keeps its own cache (as
// its own cuDNN handle): the math type is set on the cached descriptor per call.
struct ConvPlan {
  ConvDescriptors d;
  ConvCandidates<cudnnConvolutionFwdAlgo_t> fwd;
  ConvCandidates<cudnnConvolutionBwdDataAlgo_t> bwd_data;
  ConvCandidates<cudnnConvolutionBwdFilterAlgo_t> bwd_filter;
};

namespace detail {
inline std::string describe(const ConvShape& s) {
  std::ostringstream o;
  o << "x [" << s.N << ", " << s.C << ", " << s.H << ", " << s.W << "], " << s.O << " filters " << s.KH << "x" << s.KW << ", stride "
    << s.SH << "x" << s.SW << ", padding " << s.PH << "x" << s.PW << ", dilation " << s.DH << "x" << s.DW << ", groups " << s.G << ", "
    << s.dtype << (s.layout == ConvLayout::NHWC ? " NHWC" : " NCHW");
  return o.str();
}

inline PlanCache<ConvShape, ConvPlan, ConvShapeHash>& conv_plans() {
  thread_local PlanCache<ConvShape, ConvPlan, ConvShapeHash> cache;
  return cache;
}
inline ConvPlan& conv_plan(const ConvShape& s) {
  return conv_plans().get(s, [&] { return ConvPlan{make_conv_descriptors(s), {}, {}, {}}; });
}

// One workspace per (host thread, stream), grown to the largest request and then reused: no
// allocation per call, and work queued on one stream never shares bytes with another's.
inline void* conv_workspace(size_t bytes) {
  if (bytes == 0) return nullptr;
  thread_local std::map<cudaStream_t, Tensor> spaces;
  Tensor& ws = spaces[current_stream()];
  if (!ws.defined() || static_cast<size_t>(ws.nbytes()) < bytes) {
    ws = Tensor();  // the old block goes back to the caching allocator first
    ws = empty({static_cast<int64_t>(bytes)}, DType::UInt8, Device::CUDA);
  }
  return ws.data_ptr();
}

// A direction's candidates, benchmarked once. `heuristic(count, &n, perf)`
// (cudnnGetConvolution*Algorithm_v7) bounds the workspace Find may use: the largest its
// candidates need, within the limit. `find(count, &n, perf, ws, bytes)` (cudnnFind*AlgorithmEx on
// this call's buffers, whose output it overwrites) then runs and times them.
template <class Perf, int Count, class Heuristic, class Find>
auto benchmark_algorithms(const char* what, const char* api, const ConvShape& s, Heuristic heuristic, Find find) {
  Perf perf[Count];
  int n = 0;
  check_cudnn(heuristic(Count, &n, perf), api);
  size_t bytes = 0;
  for (const auto& c : conv_candidates(perf, n, s, kConvWorkspaceLimit)) bytes = std::max(bytes, c.workspace);
  void* ws = conv_workspace(bytes);
  n = 0;
  check_cudnn(find(Count, &n, perf, ws, bytes), api);
  auto out = conv_candidates(perf, n, s, bytes);
  MIXPREC_CHECK(!out.empty(), "cudnn conv2d: no ", what, " algorithm ran within ", bytes, " bytes of workspace for ", describe(s));
  return out;
}

// call(algo, workspace, bytes) with each candidate, its math type set on the descriptor, until
// one is accepted; the rejected ones before it leave the cache. Any other error, or no candidate
// left, throws naming the shape. (A descriptor that every algorithm rejects with BAD_PARAM shows
// as "every candidate ... was rejected".)
template <class Algo, class Call>
void run_candidates(ConvCandidates<Algo>& cands, const ConvDescriptors& d, const char* api, const ConvShape& s, Call call) {
  cudnnStatus_t st = CUDNN_STATUS_NOT_SUPPORTED;
  std::size_t i = 0;
  for (; i < cands.size(); ++i) {
    const ConvCandidate<Algo> c = cands[i];
    check_cudnn(cudnnSetConvolutionMathType(d.conv.get(), c.math), "cudnnSetConvolutionMathType");
    st = call(c.algo, conv_workspace(c.workspace), c.workspace);
    if (st != CUDNN_STATUS_NOT_SUPPORTED && st != CUDNN_STATUS_BAD_PARAM) break;
  }
  if (i > 0 && i < cands.size() && st == CUDNN_STATUS_SUCCESS) cands.erase(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(i));
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
  ConvPlan& plan = detail::conv_plan(s);
  const ConvDescriptors& d = plan.d;
  detail::check_operand(op, x, detail::layout_shape(s.layout, s.N, s.C, s.H, s.W), s.dtype);
  detail::check_operand(op, w, detail::layout_shape(s.layout, s.O, s.C / s.G, s.KH, s.KW), s.dtype);
  const auto& ys = d.y_shape;
  Tensor y = empty(detail::layout_shape(s.layout, ys[0], ys[1], ys[2], ys[3]), s.dtype, Device::CUDA);
  cudnnHandle_t h = cudnn_handle();
  if (plan.fwd.empty())
    plan.fwd = detail::benchmark_algorithms<cudnnConvolutionFwdAlgoPerf_t, CUDNN_CONVOLUTION_FWD_ALGO_COUNT>(
        "forward", "cudnnFindConvolutionForwardAlgorithmEx", s,
        [&](int count, int* n, cudnnConvolutionFwdAlgoPerf_t* perf) {
          return cudnnGetConvolutionForwardAlgorithm_v7(h, d.x.get(), d.w.get(), d.conv.get(), d.y.get(), count, n, perf);
        },
        [&](int count, int* n, cudnnConvolutionFwdAlgoPerf_t* perf, void* ws, size_t bytes) {
          return cudnnFindConvolutionForwardAlgorithmEx(h, d.x.get(), x.data_ptr(), d.w.get(), w.data_ptr(), d.conv.get(), d.y.get(),
                                                        y.data_ptr(), count, n, perf, ws, bytes);
        });
  const float one = 1.0f, zero = 0.0f;
  detail::run_candidates(plan.fwd, d, "cudnnConvolutionForward", s, [&](auto algo, void* ws, size_t bytes) {
    return cudnnConvolutionForward(h, &one, d.x.get(), x.data_ptr(), d.w.get(), w.data_ptr(), d.conv.get(), algo, ws, bytes, &zero,
                                   d.y.get(), y.data_ptr());
  });
  if (bias.defined()) {
    detail::check_operand(op, bias, {s.O}, s.dtype);
    const TensorDescriptor bd = make_tensor_descriptor(1, s.O, 1, 1, s.dtype, s.layout);
    check_cudnn(cudnnAddTensor(h, &one, bd.get(), bias.data_ptr(), &one, d.y.get(), y.data_ptr()), "cudnnAddTensor");
  }
  return y;
}

// dx from dy (the output's gradient) and w.
inline Tensor conv2d_backward_data(const ConvShape& s, const Tensor& dy, const Tensor& w) {
  const char* op = "gpu::conv2d_backward_data";
  ConvPlan& plan = detail::conv_plan(s);
  const ConvDescriptors& d = plan.d;
  const auto& ys = d.y_shape;
  detail::check_operand(op, dy, detail::layout_shape(s.layout, ys[0], ys[1], ys[2], ys[3]), s.dtype);
  detail::check_operand(op, w, detail::layout_shape(s.layout, s.O, s.C / s.G, s.KH, s.KW), s.dtype);
  Tensor dx = empty(detail::layout_shape(s.layout, s.N, s.C, s.H, s.W), s.dtype, Device::CUDA);
  cudnnHandle_t h = cudnn_handle();
  if (plan.bwd_data.empty())
    plan.bwd_data = detail::benchmark_algorithms<cudnnConvolutionBwdDataAlgoPerf_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT>(
        "backward-data", "cudnnFindConvolutionBackwardDataAlgorithmEx", s,
        [&](int count, int* n, cudnnConvolutionBwdDataAlgoPerf_t* perf) {
          return cudnnGetConvolutionBackwardDataAlgorithm_v7(h, d.w.get(), d.y.get(), d.conv.get(), d.x.get(), count, n, perf);
        },
        [&](int count, int* n, cudnnConvolutionBwdDataAlgoPerf_t* perf, void* ws, size_t bytes) {
          return cudnnFindConvolutionBackwardDataAlgorithmEx(h, d.w.get(), w.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(),
                                                             d.x.get(), dx.data_ptr(), count, n, perf, ws, bytes);
        });
  const float one = 1.0f, zero = 0.0f;
  detail::run_candidates(plan.bwd_data, d, "cudnnConvolutionBackwardData", s, [&](auto algo, void* ws, size_t bytes) {
    return cudnnConvolutionBackwardData(h, &one, d.w.get(), w.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(), algo, ws, bytes, &zero,
                                        d.x.get(), dx.data_ptr());
  });
  return dx;
}

// dw from x and dy.
inline Tensor conv2d_backward_filter(const ConvShape& s, const Tensor& x, const Tensor& dy) {
  const char* op = "gpu::conv2d_backward_filter";
  ConvPlan& plan = detail::conv_plan(s);
  const ConvDescriptors& d = plan.d;
  const auto& ys = d.y_shape;
  detail::check_operand(op, x, detail::layout_shape(s.layout, s.N, s.C, s.H, s.W), s.dtype);
  detail::check_operand(op, dy, detail::layout_shape(s.layout, ys[0], ys[1], ys[2], ys[3]), s.dtype);
  Tensor dw = empty(detail::layout_shape(s.layout, s.O, s.C / s.G, s.KH, s.KW), s.dtype, Device::CUDA);
  cudnnHandle_t h = cudnn_handle();
  if (plan.bwd_filter.empty())
    plan.bwd_filter = detail::benchmark_algorithms<cudnnConvolutionBwdFilterAlgoPerf_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT>(
        "backward-filter", "cudnnFindConvolutionBackwardFilterAlgorithmEx", s,
        [&](int count, int* n, cudnnConvolutionBwdFilterAlgoPerf_t* perf) {
          return cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, d.x.get(), d.y.get(), d.conv.get(), d.w.get(), count, n, perf);
        },
        [&](int count, int* n, cudnnConvolutionBwdFilterAlgoPerf_t* perf, void* ws, size_t bytes) {
          return cudnnFindConvolutionBackwardFilterAlgorithmEx(h, d.x.get(), x.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(),
                                                               d.w.get(), dw.data_ptr(), count, n, perf, ws, bytes);
        });
  const float one = 1.0f, zero = 0.0f;
  detail::run_candidates(plan.bwd_filter, d, "cudnnConvolutionBackwardFilter", s, [&](auto algo, void* ws, size_t bytes) {
    return cudnnConvolutionBackwardFilter(h, &one, d.x.get(), x.data_ptr(), d.y.get(), dy.data_ptr(), d.conv.get(), algo, ws, bytes,
                                          &zero, d.w.get(), dw.data_ptr());
  });
  return dw;
}

// This thread's convolution plan cache: {hits, misses} (a miss builds the shape's descriptors).
inline std::pair<int64_t, int64_t> conv_plan_cache_stats() { return {detail::conv_plans().hits(), detail::conv_plans().misses()}; }

}  // namespace mixprec::gpu
