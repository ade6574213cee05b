#pragma once
// cuDNN descriptors for a 2-D convolution: plain host code (cudnn.h), because cuDNN creates and
// checks descriptors without a GPU. The CPU tests build them for a grid of shapes and compare
// cuDNN's output shape with the CPU conv2d's; conv.cuh runs the kernels with the same objects.
#include <array>
#include <cstddef>
#include <functional>
#include <utility>
#include <vector>

#include <cudnn.h>

#include "mixprec/core/error.hpp"
#include "mixprec/dtype/dtype.hpp"

namespace mixprec::gpu {

inline void check_cudnn(cudnnStatus_t s, const char* what) {
  if (s != CUDNN_STATUS_SUCCESS) fail(what, ": cuDNN error ", static_cast<int>(s), " (", cudnnGetErrorString(s), ")");
}

// NCHW is mixprec's CPU layout and cuDNN's float32 path; NHWC is where cuDNN's float16/bfloat16
// tensor-core kernels run without transposing.
enum class ConvLayout : uint8_t { NCHW, NHWC };

// x [N, C, H, W] -> y [N, O, OH, OW] through w [O, C/G, KH, KW], in the logical NCHW order
// whatever the memory layout.
struct ConvShape {
  int64_t N = 1, C = 1, H = 1, W = 1, O = 1, KH = 1, KW = 1;
  int64_t SH = 1, SW = 1, PH = 0, PW = 0, DH = 1, DW = 1, G = 1;
  DType dtype = DType::Float32;
  ConvLayout layout = ConvLayout::NCHW;
  bool allow_tf32 = false;  // float32 only: let cuDNN round inputs to tf32 on tensor cores
  bool operator==(const ConvShape&) const = default;  // the per-shape cache's key
};

struct ConvShapeHash {
  std::size_t operator()(const ConvShape& s) const {
    std::size_t h = 0;
    for (int64_t v : {s.N, s.C, s.H, s.W, s.O, s.KH, s.KW, s.SH, s.SW, s.PH, s.PW, s.DH, s.DW, s.G})
      h ^= std::hash<int64_t>{}(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h ^ (static_cast<std::size_t>(s.dtype) << 3 | static_cast<std::size_t>(s.layout) << 1 | static_cast<std::size_t>(s.allow_tf32));
  }
};

inline cudnnDataType_t cudnn_data_type(DType d, const char* op) {
  switch (d) {
    case DType::Float32: return CUDNN_DATA_FLOAT;
    case DType::Float16: return CUDNN_DATA_HALF;
    case DType::BFloat16: return CUDNN_DATA_BFLOAT16;
    default: fail(op, ": cuDNN takes float32, float16 or bfloat16 tensors, got ", d);
  }
}

namespace detail {
template <class T, cudnnStatus_t (*Create)(T*), cudnnStatus_t (*Destroy)(T)>
class CudnnHandle {
 public:
  CudnnHandle() { check_cudnn(Create(&h_), "cudnn descriptor create"); }
  ~CudnnHandle() {
    if (h_) Destroy(h_);
  }
  CudnnHandle(CudnnHandle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  CudnnHandle& operator=(CudnnHandle&& o) noexcept {
    std::swap(h_, o.h_);
    return *this;
  }
  CudnnHandle(const CudnnHandle&) = delete;
  CudnnHandle& operator=(const CudnnHandle&) = delete;
  T get() const { return h_; }

 private:
  T h_ = nullptr;
};

inline int to_int(int64_t v, const char* what) {
  MIXPREC_CHECK(v >= 0 && v <= 0x7fffffff, "cudnn conv: ", what, " = ", v, " does not fit cuDNN's int");
  return static_cast<int>(v);
}
}  // namespace detail

using TensorDescriptor = detail::CudnnHandle<cudnnTensorDescriptor_t, cudnnCreateTensorDescriptor, cudnnDestroyTensorDescriptor>;
using FilterDescriptor = detail::CudnnHandle<cudnnFilterDescriptor_t, cudnnCreateFilterDescriptor, cudnnDestroyFilterDescriptor>;
using ConvolutionDescriptor =
    detail::CudnnHandle<cudnnConvolutionDescriptor_t, cudnnCreateConvolutionDescriptor, cudnnDestroyConvolutionDescriptor>;

inline cudnnTensorFormat_t cudnn_format(ConvLayout l) { return l == ConvLayout::NHWC ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW; }

// A 4-D activation descriptor [n, c, h, w] in `layout`.
inline TensorDescriptor make_tensor_descriptor(int64_t n, int64_t c, int64_t h, int64_t w, DType dtype, ConvLayout layout) {
  TensorDescriptor d;
  check_cudnn(cudnnSetTensor4dDescriptor(d.get(), cudnn_format(layout), cudnn_data_type(dtype, "cudnn tensor"),
                                         detail::to_int(n, "N"), detail::to_int(c, "C"), detail::to_int(h, "H"),
                                         detail::to_int(w, "W")),
              "cudnnSetTensor4dDescriptor");
  return d;
}

struct ConvDescriptors {
  TensorDescriptor x, y;
  FilterDescriptor w;
  ConvolutionDescriptor conv;
  std::array<int64_t, 4> y_shape{};  // [N, O, OH, OW] as cuDNN computed it
  cudnnDataType_t data_type = CUDNN_DATA_FLOAT;
};

// Validates like the CPU conv2d, then builds every descriptor and asks cuDNN for the output shape.
inline ConvDescriptors make_conv_descriptors(const ConvShape& s) {
  const char* op = "cudnn conv2d";
  MIXPREC_CHECK(s.SH > 0 && s.SW > 0 && s.DH > 0 && s.DW > 0 && s.PH >= 0 && s.PW >= 0 && s.G > 0, op,
                ": need positive stride/dilation/groups and non-negative padding, got stride (", s.SH, ", ", s.SW,
                "), padding (", s.PH, ", ", s.PW, "), dilation (", s.DH, ", ", s.DW, "), groups ", s.G);
  MIXPREC_CHECK(s.C % s.G == 0 && s.O % s.G == 0, op, ": channels in ", s.C, " and out ", s.O, " must be divisible by groups ",
                s.G);
  MIXPREC_CHECK(s.H + 2 * s.PH >= s.DH * (s.KH - 1) + 1 && s.W + 2 * s.PW >= s.DW * (s.KW - 1) + 1, op, ": input ", s.H, "x",
                s.W, " with padding (", s.PH, ", ", s.PW, ") is smaller than the dilated kernel ", s.DH * (s.KH - 1) + 1, "x",
                s.DW * (s.KW - 1) + 1);
  MIXPREC_CHECK(!s.allow_tf32 || s.dtype == DType::Float32, op, ": tf32 applies to float32 only, got ", s.dtype);
  ConvDescriptors d;
  d.data_type = cudnn_data_type(s.dtype, op);
  d.x = make_tensor_descriptor(s.N, s.C, s.H, s.W, s.dtype, s.layout);
  check_cudnn(cudnnSetFilter4dDescriptor(d.w.get(), d.data_type, cudnn_format(s.layout), detail::to_int(s.O, "O"),
                                         detail::to_int(s.C / s.G, "C/G"), detail::to_int(s.KH, "KH"), detail::to_int(s.KW, "KW")),
              "cudnnSetFilter4dDescriptor");
  // Accumulate in float32 for every storage type (16-bit inputs: tensor cores with fp32 accumulation).
  check_cudnn(cudnnSetConvolution2dDescriptor(d.conv.get(), detail::to_int(s.PH, "PH"), detail::to_int(s.PW, "PW"),
                                              detail::to_int(s.SH, "SH"), detail::to_int(s.SW, "SW"), detail::to_int(s.DH, "DH"),
                                              detail::to_int(s.DW, "DW"), CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
              "cudnnSetConvolution2dDescriptor");
  check_cudnn(cudnnSetConvolutionGroupCount(d.conv.get(), detail::to_int(s.G, "groups")), "cudnnSetConvolutionGroupCount");
  // float32 without tf32 must stay float32 (cuDNN's default math would use tf32 on Ampere+).
  const cudnnMathType_t math = s.dtype == DType::Float32 && !s.allow_tf32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH;
  check_cudnn(cudnnSetConvolutionMathType(d.conv.get(), math), "cudnnSetConvolutionMathType");
  int n = 0, c = 0, h = 0, w = 0;
  check_cudnn(cudnnGetConvolution2dForwardOutputDim(d.conv.get(), d.x.get(), d.w.get(), &n, &c, &h, &w),
              "cudnnGetConvolution2dForwardOutputDim");
  d.y_shape = {n, c, h, w};
  d.y = make_tensor_descriptor(n, c, h, w, s.dtype, s.layout);
  return d;
}

// The math type a call runs an algorithm with. cuDNN documents that the mathType an algorithm
// was found with must be set on the convolution descriptor before the call (tensor-core
// algorithms are refused, or silently not used, under another); float32 without tf32 stays
// CUDNN_FMA_MATH whatever was found, since DEFAULT_MATH lets Ampere and newer round to tf32.
inline cudnnMathType_t conv_math_type(const ConvShape& s, cudnnMathType_t found) {
  return s.dtype == DType::Float32 && !s.allow_tf32 ? CUDNN_FMA_MATH : found;
}

// One algorithm a direction's call may run: cuDNN's enum, its workspace and its math type.
template <class Algo>
struct ConvCandidate {
  Algo algo;
  std::size_t workspace;
  cudnnMathType_t math;
  bool operator==(const ConvCandidate&) const = default;
};
template <class Algo>
using ConvCandidates = std::vector<ConvCandidate<Algo>>;

// cudnnFind*AlgorithmEx's (or the _v7 heuristic's) records, best first, as the candidates a call
// tries in order: those that ran, fit `workspace_limit` bytes and are allowed the shape's math.
// One algorithm found with two math types stays as two candidates; exact repeats are dropped.
template <class Perf>
auto conv_candidates(const Perf* perf, int n, const ConvShape& s, std::size_t workspace_limit) {
  ConvCandidates<decltype(perf[0].algo)> out;
  for (int i = 0; i < n; ++i) {
    if (perf[i].status != CUDNN_STATUS_SUCCESS || perf[i].memory > workspace_limit) continue;
    // float32 without tf32: an algorithm measured on tensor cores is not the one this call runs.
    if (s.dtype == DType::Float32 && !s.allow_tf32 && perf[i].mathType != CUDNN_FMA_MATH && perf[i].mathType != CUDNN_DEFAULT_MATH)
      continue;
    const ConvCandidate<decltype(perf[0].algo)> c{perf[i].algo, perf[i].memory, conv_math_type(s, perf[i].mathType)};
    bool seen = false;
    for (const auto& o : out) seen = seen || o == c;
    if (!seen) out.push_back(c);
  }
  return out;
}

}  // namespace mixprec::gpu
