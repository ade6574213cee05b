#pragma once
// Convolutions: the ops (checks, autocast policy, autograd) over one geometry (ConvGeom) and
// three kernels of the device's table -- forward, input-backward, weight-backward -- which serve
// conv1d, conv2d and conv_transpose2d (whose forward is conv2d's input-backward). Activations
// are NCHW, or channels-last (MemoryFormat::ChannelsLast) where the backend takes it: the CPU's
// kernels (backends/cpu/conv.hpp) then run oneDNN's NHWC convolutions when that component is
// linked, and results keep the input's layout.
#include <array>
#include <cstring>
#include <mutex>

#include "mixprec/backends/device.hpp"
#include "mixprec/ops/linalg.hpp"

namespace mixprec {

namespace detail {

// "input" [N, C, H, W] -> "output" [N, O, OH, OW] through weight [O, C/G, KH, KW].
// conv_transpose2d uses the same geometry with input and output swapped.
struct ConvGeom {
  int64_t N = 0, C = 0, H = 0, W = 0, O = 0, OH = 0, OW = 0;
  int64_t KH = 1, KW = 1, SH = 1, SW = 1, PH = 0, PW = 0, DH = 1, DW = 1, G = 1;
  int64_t Cg() const { return C / G; }
  int64_t Og() const { return O / G; }
  int64_t K() const { return Cg() * KH * KW; }  // GEMM reduction length (rows of the column matrix)
  int64_t L() const { return OH * OW; }
  int64_t HW() const { return H * W; }
  // The input already is its own column matrix.
  bool pointwise() const { return KH == 1 && KW == 1 && SH == 1 && SW == 1 && PH == 0 && PW == 0 && OH == H && OW == W; }
};

// CPU helpers shared by the convolution and pooling kernels.
// n values of src into dst, widening 16-bit to float (vectorised).
template <class A, class T>
void load_acc(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<A, T>) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  else convert(src, dst, n);
}
template <class T, class A>
void store_acc(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<A, T>) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  else convert(src, dst, n);
}

// Output columns [lo, hi) whose input column ow*S + off lies inside [0, W).
inline std::pair<int64_t, int64_t> conv_valid_range(int64_t off, int64_t S, int64_t W, int64_t OW) {
  const int64_t lo = off >= 0 ? 0 : (-off + S - 1) / S;
  const int64_t hi = W - off <= 0 ? 0 : std::min(OW, (W - off + S - 1) / S);
  return {std::min(lo, OW), std::max(std::min(lo, OW), hi)};
}

// The layout in which t's device's kernels take an activation: a backend with channels_last
// (its conv and batch-norm entries) takes channels-last tensors as they are and returns results
// in the layout of its activation input; others get NCHW-contiguous tensors.
inline MemoryFormat kernel_layout(const Tensor& t) {
  const DeviceKernels* k = device_kernels(t.device());
  return k && k->channels_last ? t.suggest_memory_format() : MemoryFormat::Contiguous;
}
// t in layout f (no autograd): t itself when it already is.
inline Tensor layout_raw(const Tensor& t, MemoryFormat f) {
  if (f == MemoryFormat::Contiguous) return contiguous_raw(t);
  if (t.is_contiguous(f)) return t;
  Tensor out = empty(t.sizes(), t.dtype(), t.device(), f);
  copy_kernel(out, t);
  return out;
}

// y [N, O, OH, OW] in x's dtype and layout.
inline Tensor conv_forward(const ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
  const MemoryFormat f = kernel_layout(x);
  return device_kernel("conv2d", x, &DeviceKernels::conv_forward)(g, layout_raw(x, f), contiguous_raw(w), b);
}

// x [N, C, H, W] in y's dtype and layout; b (optional, conv_transpose2d's) is added per channel C.
inline Tensor conv_backward_input(const ConvGeom& g, const Tensor& y, const Tensor& w, const Tensor& b = Tensor()) {
  const MemoryFormat f = kernel_layout(y);
  Tensor x = device_kernel("conv2d_backward", y, &DeviceKernels::conv_backward_input)(g, layout_raw(y, f), contiguous_raw(w));
  if (!b.defined()) return x;
  return device_kernel("conv_transpose2d", x, &DeviceKernels::binary)(
      DeviceBinary::Add, x, make_view(b, {1, g.C, 1, 1}, {0, b.stride(0), 0, 0}, b.storage_offset()), 1.0);
}

// Gradient of the weight [O, C/G, KH, KW] in `dtype`; x and y in one layout.
inline Tensor conv_backward_weight(const ConvGeom& g, const Tensor& x, const Tensor& y, DType dtype) {
  const MemoryFormat f = kernel_layout(x);
  return as_dtype_raw(device_kernel("conv2d_backward", x, &DeviceKernels::conv_backward_weight)(g, layout_raw(x, f), layout_raw(y, f)),
                      dtype);
}

// Sum of y [N, Ch, H, W] over everything but dim 1 (accumulated in float32, double for float64).
inline Tensor conv_bias_grad(const Tensor& y, DType dtype) {
  return as_dtype_raw(device_kernel("conv2d_backward", y, &DeviceKernels::sum)(y, {0, 2, 3}), dtype);
}

inline void check_conv_params(const char* op, std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                              std::array<int64_t, 2> dilation, int64_t groups) {
  MIXPREC_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  MIXPREC_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  MIXPREC_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  MIXPREC_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
}

inline void check_conv_dtypes(const char* op, const Tensor& x, const Tensor& w, const Tensor& b) {
  common_device(op, {&x, &w, &b});
  MIXPREC_CHECK(x.is_floating_point(), op, ": expected a floating-point input, got ", x.dtype());
  MIXPREC_CHECK(x.dtype() == w.dtype() && (!b.defined() || b.dtype() == w.dtype()), op, ": dtypes differ: input ", x.dtype(),
                ", weight ", w.dtype(), b.defined() ? ", bias " : "", b.defined() ? name(b.dtype()) : "",
                " (cast them, or use autocast)");
}

// conv2d on a 4-D input with autograd; x, w, b already validated by the caller's dimension checks.
inline Tensor conv2d_nchw(const char* op, const Tensor& x, const Tensor& w, const Tensor& b, std::array<int64_t, 2> stride,
                          std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation, int64_t groups) {
  ConvGeom g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = w.size(0), g.KH = w.size(2), g.KW = w.size(3);
  g.SH = stride[0], g.SW = stride[1], g.PH = padding[0], g.PW = padding[1], g.DH = dilation[0], g.DW = dilation[1], g.G = groups;
  g.OH = (g.H + 2 * g.PH - g.DH * (g.KH - 1) - 1) / g.SH + 1;
  g.OW = (g.W + 2 * g.PW - g.DW * (g.KW - 1) - 1) / g.SW + 1;
  const Tensor xc = layout_raw(x, kernel_layout(x));
  Tensor y = conv_forward(g, xc, w, b);
  if (autograd::should_record({x, w, b})) {
    const bool need_x = autograd::tensor_requires_grad(x), need_w = autograd::tensor_requires_grad(w),
               need_b = autograd::tensor_requires_grad(b);
    autograd::record(op, {x, w, b}, {y},
                     [op, g, need_x, need_w, need_b, sx = autograd::SavedTensor(xc), sw = autograd::SavedTensor(w)](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
                       const Tensor& x = sx.get(op);
                       const Tensor& w = sw.get(op);
                       const Tensor gy = layout_raw(as_dtype_raw(grads[0], x.dtype()), kernel_layout(x));
                       Tensor gx = need_x ? conv_backward_input(g, gy, w) : Tensor();
                       Tensor gw = need_w ? conv_backward_weight(g, x, gy, w.dtype()) : Tensor();
                       Tensor gb = need_b ? conv_bias_grad(gy, w.dtype()) : Tensor();
                       return {gx, gw, gb};
                     });
  }
  return y;
}
}  // namespace detail

// torch.nn.functional.conv2d: input [N, C, H, W] (or unbatched [C, H, W]), weight
// [O, C/groups, kH, kW], bias [O] (optional).
inline Tensor conv2d(const Tensor& input, const Tensor& weight, const Tensor& bias = Tensor(), std::array<int64_t, 2> stride = {1, 1},
                     std::array<int64_t, 2> padding = {0, 0}, std::array<int64_t, 2> dilation = {1, 1}, int64_t groups = 1) {
  return dispatch(OpId::conv2d, [=](const Tensor& x, const Tensor& w, const Tensor& b) {
    detail::check_conv_params("conv2d", stride, padding, dilation, groups);
    MIXPREC_CHECK(x.dim() == 3 || x.dim() == 4, "conv2d: expected a 3-D (unbatched) or 4-D (batched) input, got shape ", x.sizes());
    MIXPREC_CHECK(w.dim() == 4, "conv2d: expected a 4-D weight [out_channels, in_channels/groups, kH, kW], got shape ", w.sizes());
    detail::check_conv_dtypes("conv2d", x, w, b);
    const int64_t C = x.size(-3), H = x.size(-2), W = x.size(-1);
    MIXPREC_CHECK(w.size(0) % groups == 0, "conv2d: out_channels (", w.size(0), ", weight of shape ", w.sizes(),
                  ") must be divisible by groups=", groups);
    MIXPREC_CHECK(C == w.size(1) * groups, "conv2d: given groups=", groups, ", weight of shape ", w.sizes(), " expects input ",
                  x.sizes(), " to have ", w.size(1) * groups, " channels, but it has ", C);
    MIXPREC_CHECK(w.size(2) > 0 && w.size(3) > 0, "conv2d: empty kernel in weight of shape ", w.sizes());
    MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)), "conv2d: bias of shape ", b.sizes(),
                  " does not match weight of shape ", w.sizes(), " (expected [", w.size(0), "])");
    const int64_t ekh = dilation[0] * (w.size(2) - 1) + 1, ekw = dilation[1] * (w.size(3) - 1) + 1;
    MIXPREC_CHECK(H + 2 * padding[0] >= ekh && W + 2 * padding[1] >= ekw, "conv2d: padded input size (", H + 2 * padding[0], " x ",
                  W + 2 * padding[1], ") of input ", x.sizes(), " is smaller than the dilated kernel (", ekh, " x ", ekw,
                  ") of weight ", w.sizes());
    if (x.dim() == 3) return detail::conv2d_nchw("conv2d", x.unsqueeze(0), w, b, stride, padding, dilation, groups).squeeze(0);
    return detail::conv2d_nchw("conv2d", x, w, b, stride, padding, dilation, groups);
  }, input, weight, bias);
}

// torch.nn.functional.conv1d: input [N, C, L] (or [C, L]), weight [O, C/groups, K], bias [O].
// A view onto conv2d with a height-1 image.
inline Tensor conv1d(const Tensor& input, const Tensor& weight, const Tensor& bias = Tensor(), int64_t stride = 1, int64_t padding = 0,
                     int64_t dilation = 1, int64_t groups = 1) {
  return dispatch(OpId::conv1d, [=](const Tensor& x, const Tensor& w, const Tensor& b) {
    detail::check_conv_params("conv1d", {stride, stride}, {padding, padding}, {dilation, dilation}, groups);
    MIXPREC_CHECK(x.dim() == 2 || x.dim() == 3, "conv1d: expected a 2-D (unbatched) or 3-D (batched) input, got shape ", x.sizes());
    MIXPREC_CHECK(w.dim() == 3, "conv1d: expected a 3-D weight [out_channels, in_channels/groups, k], got shape ", w.sizes());
    detail::check_conv_dtypes("conv1d", x, w, b);
    const int64_t C = x.size(-2), L = x.size(-1);
    MIXPREC_CHECK(w.size(0) % groups == 0, "conv1d: out_channels (", w.size(0), ", weight of shape ", w.sizes(),
                  ") must be divisible by groups=", groups);
    MIXPREC_CHECK(C == w.size(1) * groups, "conv1d: given groups=", groups, ", weight of shape ", w.sizes(), " expects input ",
                  x.sizes(), " to have ", w.size(1) * groups, " channels, but it has ", C);
    MIXPREC_CHECK(w.size(2) > 0, "conv1d: empty kernel in weight of shape ", w.sizes());
    MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)), "conv1d: bias of shape ", b.sizes(),
                  " does not match weight of shape ", w.sizes(), " (expected [", w.size(0), "])");
    const int64_t ek = dilation * (w.size(2) - 1) + 1;
    MIXPREC_CHECK(L + 2 * padding >= ek, "conv1d: padded input length ", L + 2 * padding, " of input ", x.sizes(),
                  " is smaller than the dilated kernel (", ek, ") of weight ", w.sizes());
    const Tensor x4 = x.dim() == 2 ? x.unsqueeze(0).unsqueeze(2) : x.unsqueeze(2);
    Tensor y = detail::conv2d_nchw("conv1d", x4, w.unsqueeze(2), b, {1, stride}, {0, padding}, {1, dilation}, groups).squeeze(2);
    return x.dim() == 2 ? y.squeeze(0) : y;
  }, input, weight, bias);
}

// torch.nn.functional.conv_transpose2d (the adjoint of conv2d): input [N, C_in, H, W] (or
// unbatched), weight [C_in, C_out/groups, kH, kW], bias [C_out]. Output size per dim:
// (H - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1.
// Note the argument order follows conv2d (dilation before groups), unlike PyTorch's.
inline Tensor conv_transpose2d(const Tensor& input, const Tensor& weight, const Tensor& bias = Tensor(),
                               std::array<int64_t, 2> stride = {1, 1}, std::array<int64_t, 2> padding = {0, 0},
                               std::array<int64_t, 2> output_padding = {0, 0}, std::array<int64_t, 2> dilation = {1, 1},
                               int64_t groups = 1) {
  return dispatch(OpId::conv_transpose2d, [=](const Tensor& x_in, const Tensor& w, const Tensor& b) {
    const char* op = "conv_transpose2d";
    detail::check_conv_params(op, stride, padding, dilation, groups);
    MIXPREC_CHECK(x_in.dim() == 3 || x_in.dim() == 4, op, ": expected a 3-D (unbatched) or 4-D (batched) input, got shape ", x_in.sizes());
    MIXPREC_CHECK(w.dim() == 4, op, ": expected a 4-D weight [in_channels, out_channels/groups, kH, kW], got shape ", w.sizes());
    detail::check_conv_dtypes(op, x_in, w, b);
    for (int d = 0; d < 2; ++d)
      MIXPREC_CHECK(output_padding[d] >= 0 && (output_padding[d] < stride[d] || output_padding[d] < dilation[d]), op,
                    ": output_padding ", output_padding, " must be non-negative and smaller than either stride ", stride,
                    " or dilation ", dilation);
    const Tensor x = x_in.dim() == 3 ? x_in.unsqueeze(0) : x_in;
    MIXPREC_CHECK(x.size(1) == w.size(0), op, ": weight of shape ", w.sizes(), " expects input ", x_in.sizes(), " to have ", w.size(0),
                  " channels, but it has ", x.size(1));
    MIXPREC_CHECK(w.size(0) % groups == 0, op, ": in_channels (", w.size(0), ", weight of shape ", w.sizes(),
                  ") must be divisible by groups=", groups);
    MIXPREC_CHECK(w.size(2) > 0 && w.size(3) > 0, op, ": empty kernel in weight of shape ", w.sizes());
    const int64_t Cout = w.size(1) * groups;
    MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == Cout), op, ": bias of shape ", b.sizes(), " does not match weight of shape ",
                  w.sizes(), " (expected [", Cout, "])");
    detail::ConvGeom g;
    g.N = x.size(0), g.C = Cout, g.O = w.size(0), g.OH = x.size(2), g.OW = x.size(3);
    g.KH = w.size(2), g.KW = w.size(3);
    g.SH = stride[0], g.SW = stride[1], g.PH = padding[0], g.PW = padding[1], g.DH = dilation[0], g.DW = dilation[1], g.G = groups;
    g.H = (g.OH - 1) * g.SH - 2 * g.PH + g.DH * (g.KH - 1) + output_padding[0] + 1;
    g.W = (g.OW - 1) * g.SW - 2 * g.PW + g.DW * (g.KW - 1) + output_padding[1] + 1;
    MIXPREC_CHECK(g.H > 0 && g.W > 0, op, ": input ", x_in.sizes(), " with weight ", w.sizes(), ", stride ", stride, ", padding ",
                  padding, " and dilation ", dilation, " gives a non-positive output size (", g.H, " x ", g.W, ")");
    const Tensor xc = detail::layout_raw(x, detail::kernel_layout(x));
    Tensor y = detail::conv_backward_input(g, xc, w, b);
    if (autograd::should_record({x, w, b})) {
      const bool need_x = autograd::tensor_requires_grad(x), need_w = autograd::tensor_requires_grad(w),
                 need_b = autograd::tensor_requires_grad(b);
      autograd::record(op, {x, w, b}, {y},
                       [op, g, need_x, need_w, need_b, sx = autograd::SavedTensor(xc), sw = autograd::SavedTensor(w)](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
                         const Tensor& x = sx.get(op);
                         const Tensor& w = sw.get(op);
                         const Tensor gy = detail::layout_raw(detail::as_dtype_raw(grads[0], x.dtype()), detail::kernel_layout(x));
                         Tensor gx = need_x ? detail::conv_forward(g, gy, w, Tensor()) : Tensor();
                         Tensor gw = need_w ? detail::conv_backward_weight(g, gy, x, w.dtype()) : Tensor();
                         Tensor gb = need_b ? detail::conv_bias_grad(gy, w.dtype()) : Tensor();
                         return {gx, gw, gb};
                       });
    }
    return x_in.dim() == 3 ? y.squeeze(0) : y;
  }, input, weight, bias);
}

}  // namespace mixprec
