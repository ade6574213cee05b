#pragma once
// Channels-last activations on CUDA (DeviceKernels::channels_last): the host-side decisions of the
// conv, batch-norm and reduction entries (kernels.cuh, norm.cuh), in plain C++ (cudnn.h, no CUDA
// kernels) so that the CPU tests check them on CPU tensors of the same shapes and strides.
//
// Why: a channels-last [N, C, H, W] tensor (PyTorch's strides) IS an NHWC [N, H, W, C] buffer, the
// layout of cuDNN's 16-bit tensor-core kernels. Described to cuDNN as NHWC it is read in place;
// reordered to NCHW by the op first, cuDNN then transposed it back internally (ResNet-20 in bf16
// ran slower than in fp32 on an H200: 9.8 vs 5.5 ms/step, mostly in those transposes).
#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "mixprec/backends/cuda/cudnn_desc.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::gpu {

// The layout an entry runs a 4-D activation in: the op layer's own choice (detail::kernel_layout,
// i.e. suggest_memory_format), so that the entry reads what the op passed without a copy and
// returns what the op expects. Everything else (and every NCHW tensor) takes the NCHW path.
inline ConvLayout activation_layout(const Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == MemoryFormat::ChannelsLast ? ConvLayout::NHWC : ConvLayout::NCHW;
}

// The contiguous NHWC [N, H, W, C] view of a channels-last [N, C, H, W] tensor: the same bytes.
inline Tensor nhwc_view(const char* op, const Tensor& t) {
  MIXPREC_CHECK(t.dim() == 4 && t.is_contiguous(MemoryFormat::ChannelsLast), op, ": expected a channels-last [N, C, H, W] tensor, got ",
                t.dtype(), " ", t.sizes(), " with strides ", t.strides());
  Shape s{t.size(0), t.size(2), t.size(3), t.size(1)};
  Shape st = contiguous_strides(s);
  return mixprec::detail::make_view(t, std::move(s), std::move(st), t.storage_offset());
}

// The channels-last [N, C, H, W] view of a contiguous NHWC [N, H, W, C] result: the same bytes.
inline Tensor channels_last_view(const char* op, const Tensor& t) {
  MIXPREC_CHECK(t.dim() == 4 && t.is_contiguous(), op, ": expected a contiguous NHWC [N, H, W, C] tensor, got ", t.dtype(), " ",
                t.sizes(), " with strides ", t.strides());
  Shape s{t.size(0), t.size(3), t.size(1), t.size(2)};
  Shape st = channels_last_strides(s);
  return mixprec::detail::make_view(t, std::move(s), std::move(st), t.storage_offset());
}

// cuDNN's NHWC filter is [O, KH, KW, C/G]; the op passes weights as contiguous [O, C/G, KH, KW].
// 1x1 filters (ResNet's projections) and depthwise ones (C/G = 1) hold the same bytes in both
// orders: a view. Others need one permuted copy per call (O*C/G*KH*KW elements, small next to the
// activations; the weights change every step, so nothing is cached).
inline bool filter_bytes_match_nhwc(const Tensor& w) {
  return w.dim() == 4 && w.is_contiguous() && (w.size(2) * w.size(3) == 1 || w.size(1) == 1);
}
// w [O, C/G, KH, KW] seen as [O, KH, KW, C/G]: contiguous when filter_bytes_match_nhwc, else a
// strided view for the copy kernel to gather from.
inline Tensor filter_nhwc_order(const Tensor& w) {
  MIXPREC_CHECK(w.dim() == 4, "cuda conv2d: expected a 4-D weight [O, C/G, KH, KW], got ", w.sizes());
  Shape s{w.size(0), w.size(2), w.size(3), w.size(1)};
  Shape st = filter_bytes_match_nhwc(w) ? contiguous_strides(s) : Shape{w.stride(0), w.stride(2), w.stride(3), w.stride(1)};
  return mixprec::detail::make_view(w, std::move(s), std::move(st), w.storage_offset());
}
// An NHWC filter [O, KH, KW, C/G] (cuDNN's weight gradient) seen as [O, C/G, KH, KW]: contiguous
// when the bytes match (1x1, depthwise), else a strided view that one copy makes contiguous.
inline Tensor filter_nchw_order(const Tensor& w) {
  MIXPREC_CHECK(w.dim() == 4 && w.is_contiguous(), "cuda conv2d: expected a contiguous NHWC filter [O, KH, KW, C/G], got ", w.sizes(),
                " with strides ", w.strides());
  Shape s{w.size(0), w.size(3), w.size(1), w.size(2)};
  const bool same = w.size(1) * w.size(2) == 1 || w.size(3) == 1;
  Shape st = same ? contiguous_strides(s) : Shape{w.stride(0), w.stride(3), w.stride(1), w.stride(2)};
  return mixprec::detail::make_view(w, std::move(s), std::move(st), w.storage_offset());
}

// Whether t's elements fill [0, numel) of its storage from element 0 in some order of its dims
// (no gaps, no overlaps, non-negative strides): a contiguous or channels-last tensor, or a view
// that only splits or permutes dims of one. An order-free kernel (a sum over everything) reads it
// as a flat array, without a contiguous copy first.
inline bool is_dense(const Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) return true;
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t expect = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expect) return false;
    expect *= size;
  }
  return true;
}

// A sum over some dims of a dense, non-contiguous x (a channels-last activation, or a view that
// splits its dims) as GEMMs on x's own memory. In memory order (strides, largest first) the dims
// must come as [kept K1][reduced R][kept K2], the kept ones in their logical order: then the sum is
// ones[1, R] @ x[K1, R, K2] (batched over K1), shaped as the kept dims. A channels-last tensor's
// per-channel sum (conv bias gradient, sum over N, H, W) is K1 = 1, R = N*H*W, K2 = C; ResNet's
// global average pool (mean over H and W of a split view) is K1 = N, R = H*W, K2 = C. ok is false
// for anything else (the caller reorders a copy, as it does for NCHW).
struct MemorySumPlan {
  bool ok = false;
  int64_t K1 = 1, R = 1, K2 = 1;
};
inline MemorySumPlan plan_memory_sum(const Tensor& x, const std::vector<bool>& reduced) {
  MemorySumPlan p;
  if (static_cast<int64_t>(reduced.size()) != x.dim() || x.numel() == 0 || !is_dense(x)) return p;
  std::vector<int64_t> order;  // dims of size > 1, in memory order
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) != 1) order.push_back(d);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  int phase = 0;  // 0: K1, 1: R, 2: K2
  int64_t last_kept = -1;
  for (int64_t d : order) {
    if (reduced[static_cast<std::size_t>(d)]) {
      if (phase == 2) return p;
      phase = 1;
      p.R *= x.size(d);
    } else {
      if (d < last_kept) return p;  // the kept dims would come out permuted
      last_kept = d;
      if (phase == 1) phase = 2;
      (phase == 0 ? p.K1 : p.K2) *= x.size(d);
    }
  }
  p.ok = true;
  return p;
}

// The batch-norm mode for an activation in `layout`, training or not. NHWC training runs
// CUDNN_BATCHNORM_SPATIAL_PERSISTENT, as PyTorch does for channels-last: cuDNN documents it as
// "may be faster than CUDNN_BATCHNORM_SPATIAL" (an optimized path for float and half in
// cudnnBatchNormalizationForwardTraining and cudnnBatchNormalizationBackward, the saved mean and
// inverse variance required by the backward, which the entries always pass). Its numerics caveat
// (a scaled atomic integer reduction that can overflow to Inf/NaN on very large finite inputs,
// reported through cudnnQueryRuntimeError) is documented for NCHW mode, which never uses it here.
// Where cuDNN refuses it for a dtype (NOT_SUPPORTED: bfloat16 is not among the optimized types),
// norm.cuh runs CUDNN_BATCHNORM_SPATIAL for that dtype instead. Eval mode (one pass with given
// statistics, nothing to reduce) and NCHW keep CUDNN_BATCHNORM_SPATIAL.
inline cudnnBatchNormMode_t batch_norm_mode(ConvLayout layout, bool training) {
  return layout == ConvLayout::NHWC && training ? CUDNN_BATCHNORM_SPATIAL_PERSISTENT : CUDNN_BATCHNORM_SPATIAL;
}

// x [n, c, h, w] in `layout` and the float32 [c] descriptor cuDNN derives from it for the
// per-channel tensors (weight, bias, running and saved statistics) in `mode`.
struct BatchNormDescriptors {
  TensorDescriptor x, param;
};
inline BatchNormDescriptors make_batch_norm_descriptors(int64_t n, int64_t c, int64_t h, int64_t w, DType dtype, ConvLayout layout,
                                                        cudnnBatchNormMode_t mode) {
  BatchNormDescriptors d{make_tensor_descriptor(n, c, h, w, dtype, layout), {}};
  check_cudnn(cudnnDeriveBNTensorDescriptor(d.param.get(), d.x.get(), mode), "cudnnDeriveBNTensorDescriptor");
  return d;
}

}  // namespace mixprec::gpu
