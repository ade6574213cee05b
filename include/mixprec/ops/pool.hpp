#pragma once
// 2-D pooling, NCHW (or unbatched CHW), with torch.nn.functional's semantics and output sizes.
// The ops hold the geometry, the checks and autograd; the kernels are the device's
// (DeviceKernels::pool2d / pool2d_backward, one entry for max, avg and adaptive avg; the CPU's in
// backends/cpu/pool.hpp).
#include <array>
#include <limits>

#include "mixprec/ops/conv.hpp"

namespace mixprec {

namespace detail {

struct PoolGeom {
  int64_t P = 0, H = 0, W = 0, OH = 0, OW = 0;  // P planes of H x W -> OH x OW
  int64_t KH = 1, KW = 1, SH = 1, SW = 1, PH = 0, PW = 0, DH = 1, DW = 1;
  bool ceil_mode = false;
  bool count_include_pad = true;  // avg_pool2d's divisor
};

inline int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

// PyTorch's pooling_output_shape: in ceil mode the last window must start inside the input
// or the left padding.
inline int64_t pool_out_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil_mode) {
  int64_t out = floor_div(in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0), stride) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

inline void check_pool_input(const char* op, const Tensor& x) {
  require_cpu(op, x);
  MIXPREC_CHECK(x.dim() == 3 || x.dim() == 4, op, ": expected a 3-D (unbatched) or 4-D (batched) input, got shape ", x.sizes());
  MIXPREC_CHECK(x.size(-1) > 0 && x.size(-2) > 0 && x.size(-3) > 0, op, ": expected non-zero channel and spatial sizes, got input shape ",
                x.sizes());
  MIXPREC_CHECK(x.is_floating_point(), op, ": expected a floating-point input, got ", x.dtype());
}

inline PoolGeom make_pool_geom(const char* op, const Tensor& x, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride,
                               std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation, bool ceil_mode) {
  check_pool_input(op, x);
  MIXPREC_CHECK(kernel[0] > 0 && kernel[1] > 0, op, ": kernel size must be positive, got ", kernel);
  if (stride[0] == 0 && stride[1] == 0) stride = kernel;  // PyTorch's stride=None
  MIXPREC_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive (or {0, 0} for the kernel size), got ", stride);
  MIXPREC_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  MIXPREC_CHECK(padding[0] >= 0 && padding[1] >= 0 && padding[0] <= kernel[0] / 2 && padding[1] <= kernel[1] / 2, op,
                ": padding ", padding, " must be non-negative and at most half the kernel size ", kernel);
  PoolGeom g;
  g.H = x.size(-2), g.W = x.size(-1);
  g.P = x.numel() / (g.H * g.W);
  g.KH = kernel[0], g.KW = kernel[1], g.SH = stride[0], g.SW = stride[1], g.PH = padding[0], g.PW = padding[1];
  g.DH = dilation[0], g.DW = dilation[1], g.ceil_mode = ceil_mode;
  g.OH = pool_out_size(g.H, g.KH, g.PH, g.SH, g.DH, ceil_mode);
  g.OW = pool_out_size(g.W, g.KW, g.PW, g.SW, g.DW, ceil_mode);
  MIXPREC_CHECK(g.OH >= 1 && g.OW >= 1, op, ": input of shape ", x.sizes(), " with kernel ", kernel, ", stride ", stride, ", padding ",
                padding, " and dilation ", dilation, " gives an empty output (", g.OH, " x ", g.OW, ")");
  return g;
}

inline Shape pool_out_shape(const Tensor& x, int64_t OH, int64_t OW) {
  Shape s = x.sizes();
  s[s.size() - 2] = OH;
  s[s.size() - 1] = OW;
  return s;
}

}  // namespace detail

// torch.nn.functional.max_pool2d(..., return_indices=True): values and the flat index h * W + w
// of each maximum within its input plane. stride {0, 0} means stride = kernel. NaN wins.
inline std::pair<Tensor, Tensor> max_pool2d_with_indices(const Tensor& input, std::array<int64_t, 2> kernel,
                                                         std::array<int64_t, 2> stride = {0, 0}, std::array<int64_t, 2> padding = {0, 0},
                                                         std::array<int64_t, 2> dilation = {1, 1}, bool ceil_mode = false) {
  return dispatch(OpId::max_pool2d, [=](const Tensor& x) {
    const detail::PoolGeom g = detail::make_pool_geom("max_pool2d", x, kernel, stride, padding, dilation, ceil_mode);
    const auto [y, idx] = detail::device_kernel("max_pool2d", x, &DeviceKernels::pool2d)(DevicePool::Max, g, detail::contiguous_raw(x));
    if (autograd::should_record({x}))
      autograd::record("max_pool2d", {x}, {y}, [g, idx, dt = x.dtype()](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor gy = detail::contiguous_raw(detail::as_dtype_raw(grads[0], dt));
        return {detail::device_kernel("max_pool2d_backward", gy, &DeviceKernels::pool2d_backward)(DevicePool::Max, g, gy, idx)};
      });
    return std::make_pair(y, idx);
  }, input);
}

// torch.nn.functional.max_pool2d. stride {0, 0} means stride = kernel.
inline Tensor max_pool2d(const Tensor& input, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride = {0, 0},
                         std::array<int64_t, 2> padding = {0, 0}, std::array<int64_t, 2> dilation = {1, 1}, bool ceil_mode = false) {
  return max_pool2d_with_indices(input, kernel, stride, padding, dilation, ceil_mode).first;
}

// torch.nn.functional.avg_pool2d. stride {0, 0} means stride = kernel.
inline Tensor avg_pool2d(const Tensor& input, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride = {0, 0},
                         std::array<int64_t, 2> padding = {0, 0}, bool ceil_mode = false, bool count_include_pad = true) {
  return dispatch(OpId::avg_pool2d, [=](const Tensor& x) {
    detail::PoolGeom g = detail::make_pool_geom("avg_pool2d", x, kernel, stride, padding, {1, 1}, ceil_mode);
    g.count_include_pad = count_include_pad;
    const Tensor y = detail::device_kernel("avg_pool2d", x, &DeviceKernels::pool2d)(DevicePool::Avg, g, detail::contiguous_raw(x))[0];
    if (autograd::should_record({x}))
      autograd::record("avg_pool2d", {x}, {y}, [g, dt = x.dtype()](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor gy = detail::contiguous_raw(detail::as_dtype_raw(grads[0], dt));
        return {detail::device_kernel("avg_pool2d_backward", gy, &DeviceKernels::pool2d_backward)(DevicePool::Avg, g, gy, Tensor())};
      });
    return y;
  }, input);
}

// torch.nn.functional.adaptive_avg_pool2d: output {oh, ow}; output (i, j) averages input rows
// [floor(i*H/oh), ceil((i+1)*H/oh)) and the same for columns.
inline Tensor adaptive_avg_pool2d(const Tensor& input, std::array<int64_t, 2> output_size) {
  return dispatch(OpId::adaptive_avg_pool2d, [=](const Tensor& x) {
    if (x.device() != Device::CPU) {
      // On a device: equal windows only (the global pool of ResNet heads), as a mean over blocks.
      const char* op = "adaptive_avg_pool2d";
      MIXPREC_CHECK(x.dim() == 3 || x.dim() == 4, op, ": expected a 3-D (unbatched) or 4-D (batched) input, got shape ", x.sizes());
      const int64_t H = x.size(-2), W = x.size(-1), OH = output_size[0], OW = output_size[1];
      MIXPREC_CHECK(OH > 0 && OW > 0 && H % OH == 0 && W % OW == 0, op, ": on ", x.device(), " the output size ", output_size,
                    " must divide the input's spatial size [", H, ", ", W, "] (unequal windows have only a CPU kernel)");
      Shape blocks(x.sizes().begin(), x.sizes().end() - 2);
      for (int64_t v : {OH, H / OH, OW, W / OW}) blocks.push_back(v);
      Shape out(x.sizes().begin(), x.sizes().end() - 2);
      out.push_back(OH);
      out.push_back(OW);
      const int64_t d = static_cast<int64_t>(blocks.size());
      return mean(x.reshape(blocks), {d - 3, d - 1}).reshape(out);
    }
    detail::check_pool_input("adaptive_avg_pool2d", x);
    MIXPREC_CHECK(output_size[0] > 0 && output_size[1] > 0, "adaptive_avg_pool2d: output size must be positive, got ", output_size);
    detail::PoolGeom g;
    g.H = x.size(-2), g.W = x.size(-1), g.P = x.numel() / (g.H * g.W), g.OH = output_size[0], g.OW = output_size[1];
    const Tensor y =
        detail::device_kernel("adaptive_avg_pool2d", x, &DeviceKernels::pool2d)(DevicePool::AdaptiveAvg, g, detail::contiguous_raw(x))[0];
    if (autograd::should_record({x}))
      autograd::record("adaptive_avg_pool2d", {x}, {y}, [g, dt = x.dtype()](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor gy = detail::contiguous_raw(detail::as_dtype_raw(grads[0], dt));
        return {detail::device_kernel("adaptive_avg_pool2d_backward", gy, &DeviceKernels::pool2d_backward)(DevicePool::AdaptiveAvg, g, gy,
                                                                                                           Tensor())};
      });
    return y;
  }, input);
}

}  // namespace mixprec
