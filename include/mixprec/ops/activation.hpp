#pragma once
// softmax / log_softmax, dropout and prelu (relu, gelu, silu, sigmoid and tanh live in
// elementwise.hpp). Softmax and dropout run through the device kernel table on every device; the
// CPU's kernels are in backends/cpu/elementwise.hpp.
#include <limits>
#include <vector>

#include "mixprec/ops/linalg.hpp"

namespace mixprec {

namespace detail {
// softmax / log_softmax through the `softmax` and `softmax_backward` kernels of x's device (the
// CPU's are in backends/cpu/elementwise.hpp).
template <bool Log>
Tensor act_softmax_op(OpId id, const char* name, const Tensor& x, int64_t dim) {
  return dispatch(id, [name, dim](const Tensor& x) {
    MIXPREC_CHECK(x.is_floating_point(), name, ": expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    const int64_t wd = x.wrap_dim(dim, name);
    Tensor y = device_kernel(name, x, &DeviceKernels::softmax)(x, wd, Log);
    if (autograd::should_record({x}))
      autograd::record(name, {x}, {y}, [sy = autograd::SavedTensor(y), wd, name](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const Tensor& y = sy.get(name);
        const Tensor gy = expand_raw(as_dtype_raw(g[0], y.dtype()), y.sizes());
        return {device_kernel(name, y, &DeviceKernels::softmax_backward)(y, gy, wd, Log)};
      });
    return y;
  }, x);
}

// Dropout's keep decision for element i of a call: a counter-based hash of (seed, i), with one
// draw of the caller's generator as the seed. Any device and any split of the work draws the
// same mask, and backward regenerates it instead of storing it on a device. The rule (splitmix64
// of seed + (i + 1) * golden ratio; the top 53 bits as a uniform in [0, 1), as Generator::uniform)
// is scaled_dot_product_attention's dropout rule (ops/attention.hpp).
MIXPREC_HOST_DEVICE uint64_t dropout_hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
MIXPREC_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t i, double p) {
  return static_cast<double>(dropout_hash(seed, i) >> 11) * 0x1.0p-53 >= p;
}
// The seed a call inside a captured graph uses on replay r: its capture-time draw mixed with r
// (read on the device), so that every replay drops different elements.
MIXPREC_HOST_DEVICE uint64_t dropout_seed(uint64_t seed, int64_t replay) {
  return dropout_hash(seed, ~static_cast<uint64_t>(replay));
}
}  // namespace detail

// Softmax along `dim`, computed in float (double for double) and rounded once on store.
inline Tensor softmax(const Tensor& x, int64_t dim) { return detail::act_softmax_op<false>(OpId::softmax, "softmax", x, dim); }
inline Tensor log_softmax(const Tensor& x, int64_t dim) {
  return detail::act_softmax_op<true>(OpId::log_softmax, "log_softmax", x, dim);
}

// Inverted dropout: kept elements are scaled by 1/(1-p) so the expectation is unchanged; the
// identity when !training or p == 0. The mask is drawn from `gen` (reproducible under a seed).
inline Tensor dropout(const Tensor& x, double p, bool training, Generator& gen = default_generator()) {
  return dispatch(OpId::dropout, [p, training, &gen](const Tensor& x) {
    MIXPREC_CHECK(p >= 0.0 && p <= 1.0, "dropout: probability has to be between 0 and 1, got ", p);
    MIXPREC_CHECK(x.is_floating_point(), "dropout: expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    if (!training || p == 0.0) return x;
    // p == 1 drops everything; a zero scale avoids inf * 0.
    const double scale = p == 1.0 ? 0.0 : 1.0 / (1.0 - p);
    // The keep decisions are made in the kernel from the seed (no mask is stored); the backward
    // regenerates them. Refused before the draw, so a refusal leaves the generator as it was.
    const auto kernel = detail::device_kernel("dropout", x, &DeviceKernels::dropout);
    MIXPREC_CHECK(x.device() == Device::CPU || x.dtype() != DType::Float64, "dropout: float64 tensors on ", x.device(),
                  " are not supported (shape ", x.sizes(), "); use float32, float16 or bfloat16");
    // The CPU kernel reads any strides in place; the other devices' take contiguous tensors.
    auto dense = [](const Tensor& t) { return t.device() == Device::CPU ? t : detail::contiguous_raw(t); };
    const uint64_t seed = gen.next_u64();
    const Tensor replay = detail::capture_state().replay_counter;  // inside a captured graph: new masks each replay
    Tensor y = kernel(dense(x), seed, p, scale, replay);
    if (autograd::should_record({x}))
      autograd::record("dropout", {x}, {y},
                       [seed, p, scale, replay, dense, shape = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor gg = dense(detail::expand_raw(detail::as_dtype_raw(g[0], dt), shape));
                         return {detail::device_kernel("dropout_backward", gg, &DeviceKernels::dropout)(gg, seed, p, scale, replay)};
                       });
    return y;
  }, x);
}

// y = x where x > 0, weight * x elsewhere; weight has 1 element or one per channel (dim 1).
inline Tensor prelu(const Tensor& x, const Tensor& weight) {
  return dispatch(OpId::prelu, [](const Tensor& x, const Tensor& weight) {
    MIXPREC_CHECK(x.defined() && weight.defined(), "prelu: input and weight must be defined");
    MIXPREC_CHECK(x.is_floating_point() && weight.is_floating_point(), "prelu: expected floating-point tensors, got input ",
                  x.dtype(), " and weight ", weight.dtype());
    MIXPREC_CHECK(weight.dim() <= 1, "prelu: weight must be 0-D or 1-D, got shape ", weight.sizes());
    const int64_t channels = x.dim() >= 2 ? x.size(1) : 1;
    MIXPREC_CHECK(weight.numel() == 1 || weight.numel() == channels, "prelu: weight of shape ", weight.sizes(),
                  " must have 1 element or one per channel (", channels, ") of input shape ", x.sizes());
    detail::require_cpu("prelu", x);
    detail::require_cpu("prelu", weight);
    // weight viewed as [1, C, 1, ...] (or all ones when shared) so it broadcasts against x.
    Shape ws(static_cast<std::size_t>(x.dim()), 1), wst(static_cast<std::size_t>(x.dim()), 0);
    if (weight.numel() > 1) {
      ws[1] = channels;
      wst[1] = weight.stride(0);
    }
    const Tensor wb = detail::make_view(weight, ws, wst, weight.storage_offset());
    const auto kernel = detail::device_kernel("prelu", x, &DeviceKernels::pointwise);
    Tensor y = kernel(DevicePointwise::Prelu, x, wb, Tensor(), 0.0, 0.0);
    if (autograd::should_record({x, weight}))
      autograd::record("prelu", {x, weight}, {y},
                       [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(weight), ws](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("prelu");
                         const Tensor& w = sw.get("prelu");
                         const DType ct = promote_types(x.dtype(), w.dtype());
                         const Tensor xc = detail::as_dtype_raw(x, ct);
                         const Tensor wb = detail::expand_raw(detail::as_dtype_raw(detail::make_view(w, ws, [&] {
                           Shape st(ws.size(), 0);
                           if (w.numel() > 1) st[1] = w.stride(0);
                           return st;
                         }(), w.storage_offset()), ct), x.sizes());
                         const Tensor gg = detail::expand_raw(detail::as_dtype_raw(g[0], ct), x.sizes());
                         const auto kernel = detail::device_kernel("prelu_backward", x, &DeviceKernels::pointwise);
                         const Tensor gx = kernel(DevicePointwise::PreluGradInput, gg, xc, wb, 0.0, 0.0);
                         const Tensor gw_full = kernel(DevicePointwise::PreluGradWeight, gg, xc, Tensor(), 0.0, 0.0);
                         Tensor gw = detail::grad_for(gw_full, ws, w.dtype()).reshape(w.sizes());
                         return {detail::as_dtype_raw(gx, x.dtype()), gw};
                       });
    return y;
  }, x, weight);
}

}  // namespace mixprec
