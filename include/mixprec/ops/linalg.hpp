#pragma once
// matmul and friends. One batched kernel (the device's DeviceKernels::matmul, reached through
// detail::matmul_kernel; the CPU's in backends/cpu/linalg.hpp) serves every entry point and every
// backward; 16-bit inputs accumulate in float32 and round once on store.
#include <string_view>

#include "mixprec/core/config.hpp"
#if MIXPREC_HEADER_DEFINITIONS  // compiled mode: the kernels, and Eigen with them, stay in the library
#include "mixprec/backends/cpu/gemm.hpp"  // for the ops that include this header for it (conv)
#endif
#include "mixprec/ops/reduce.hpp"

namespace mixprec {

namespace detail {
// a[..., M, K] @ b[..., K, N] with broadcast batch dims; no autograd. If `bias` is given it is
// broadcast into the output first and the product accumulated onto it (linear's fused bias).
// The checks, by the caller's name, then the device's matmul kernel (the CPU's in
// backends/cpu/linalg.hpp).
inline Tensor matmul_kernel(const char* op, const Tensor& a, const Tensor& b, const Tensor& bias = Tensor()) {
  (void)common_device(op, {&a, &b, &bias});
  MIXPREC_CHECK(a.dim() >= 2 && b.dim() >= 2, op, ": expected tensors with >= 2 dimensions, got ", a.sizes(), " and ", b.sizes());
  MIXPREC_CHECK(a.size(-1) == b.size(-2), op, ": shapes ", a.sizes(), " and ", b.sizes(), " cannot be multiplied (",
                a.size(-1), " != ", b.size(-2), ")");
  MIXPREC_CHECK(a.dtype() == b.dtype(), op, ": expected both operands to have the same dtype, got ", a.dtype(), " and ",
                b.dtype(), " (cast one, or use autocast)");
  MIXPREC_CHECK(a.is_floating_point(), op, ": expected floating-point operands, got ", a.dtype());
  // The batch dims must broadcast: refused here by the caller's name on every device.
  (void)broadcast_shapes(Shape(a.sizes().begin(), a.sizes().end() - 2), Shape(b.sizes().begin(), b.sizes().end() - 2), op);
  return device_kernel(op, a, &DeviceKernels::matmul)(a, b, bias);
}

inline Tensor mT(const Tensor& t) { return t.transpose(-2, -1); }

// The autograd-aware batched product every public entry uses.
inline Tensor matmul_nd(const char* op, const Tensor& a, const Tensor& b) {
  Tensor out = matmul_kernel(op, a, b);
  if (autograd::should_record({a, b}))
    autograd::record(op, {a, b}, {out}, [sa = autograd::SavedTensor(a), sb = autograd::SavedTensor(b), op](const std::vector<Tensor>& g) -> std::vector<Tensor> {
      const Tensor& a = sa.get(op);
      const Tensor& b = sb.get(op);
      const Tensor gg = as_dtype_raw(g[0], a.dtype());
      Tensor ga, gb;
      ga = sum_to(matmul_kernel(op, gg, mT(b)), a.sizes());
      gb = sum_to(matmul_kernel(op, mT(a), gg), b.sizes());
      return {ga, gb};
    });
  return out;
}
}  // namespace detail

// numpy/torch matmul semantics: 1-D operands are promoted to matrices and the added dim removed.
inline Tensor matmul(const Tensor& a, const Tensor& b) {
  return dispatch(OpId::matmul, [](const Tensor& a, const Tensor& b) {
    MIXPREC_CHECK(a.dim() >= 1 && b.dim() >= 1, "matmul: both arguments need at least 1 dimension, got ", a.sizes(), " and ", b.sizes());
    const Tensor a2 = a.dim() == 1 ? a.unsqueeze(0) : a;
    const Tensor b2 = b.dim() == 1 ? b.unsqueeze(1) : b;
    Tensor out = detail::matmul_nd("matmul", a2, b2);
    if (a.dim() == 1) out = out.squeeze(-2);
    if (b.dim() == 1) out = out.squeeze(-1);
    return out;
  }, a, b);
}

inline Tensor mm(const Tensor& a, const Tensor& b) {
  return dispatch(OpId::mm, [](const Tensor& a, const Tensor& b) {
    MIXPREC_CHECK(a.dim() == 2 && b.dim() == 2, "mm: expected 2-D tensors, got ", a.sizes(), " and ", b.sizes());
    return detail::matmul_nd("mm", a, b);
  }, a, b);
}

inline Tensor bmm(const Tensor& a, const Tensor& b) {
  return dispatch(OpId::bmm, [](const Tensor& a, const Tensor& b) {
    MIXPREC_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0), "bmm: expected 3-D tensors with equal batch, got ",
                  a.sizes(), " and ", b.sizes());
    return detail::matmul_nd("bmm", a, b);
  }, a, b);
}

// beta * input + alpha * (a @ b)
inline Tensor addmm(const Tensor& input, const Tensor& a, const Tensor& b, double beta = 1.0, double alpha = 1.0) {
  return dispatch(OpId::addmm, [beta, alpha](const Tensor& input, const Tensor& a, const Tensor& b) {
    MIXPREC_CHECK(a.dim() == 2 && b.dim() == 2, "addmm: expected 2-D matrices, got ", a.sizes(), " and ", b.sizes());
    const Shape out{a.size(0), b.size(1)};
    MIXPREC_CHECK(input.dim() <= 2 && broadcast_shapes(input.sizes(), out, "addmm") == out, "addmm: input of shape ", input.sizes(),
                  " cannot be broadcast to the product's shape ", out);
    const Tensor p = detail::matmul_nd("addmm", a, b);
    return add(beta == 1.0 ? input : mul(input, beta), alpha == 1.0 ? p : mul(p, alpha));
  }, input, a, b);
}

inline Tensor baddbmm(const Tensor& input, const Tensor& a, const Tensor& b, double beta = 1.0, double alpha = 1.0) {
  return dispatch(OpId::baddbmm, [beta, alpha](const Tensor& input, const Tensor& a, const Tensor& b) {
    MIXPREC_CHECK(a.dim() == 3 && b.dim() == 3, "baddbmm: expected 3-D tensors, got ", a.sizes(), " and ", b.sizes());
    const Tensor p = detail::matmul_nd("baddbmm", a, b);
    return add(beta == 1.0 ? input : mul(input, beta), alpha == 1.0 ? p : mul(p, alpha));
  }, input, a, b);
}

// y = x W^T + b, x [..., in], W [out, in], b [out] (optional): the bias is fused into the GEMM.
inline Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b = Tensor()) {
  return dispatch(OpId::linear, [](const Tensor& x, const Tensor& w, const Tensor& b) {
    MIXPREC_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "linear: input of shape ", x.sizes(),
                  " does not match weight of shape ", w.sizes(), " (expected input [..., ", w.dim() == 2 ? w.size(1) : -1, "])");
    MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)), "linear: bias of shape ", b.sizes(),
                  " does not match weight of shape ", w.sizes());
    MIXPREC_CHECK(x.dtype() == w.dtype() && (!b.defined() || b.dtype() == w.dtype()), "linear: dtypes differ: input ", x.dtype(),
                  ", weight ", w.dtype(), b.defined() ? ", bias " : "", b.defined() ? name(b.dtype()) : "");
    const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
    Tensor out = detail::matmul_kernel("linear", x2, detail::mT(w), b);
    Shape os(x.sizes().begin(), x.sizes().end() - 1);
    os.push_back(w.size(0));
    out = detail::make_view(out, os, contiguous_strides(os), 0);
    if (autograd::should_record({x, w, b}))
      autograd::record("linear", {x, w, b}, {out},
                       [sx = autograd::SavedTensor(x), sw = autograd::SavedTensor(w), has_b = b.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("linear");
                         const Tensor& w = sw.get("linear");
                         const Tensor g2 = detail::as_dtype_raw(g[0], w.dtype()).reshape({-1, w.size(0)});
                         const Tensor x2 = x.reshape({-1, x.size(-1)});
                         Tensor gx = detail::matmul_kernel("linear", g2, w).reshape(x.sizes());
                         Tensor gw = detail::matmul_kernel("linear", detail::mT(g2), x2);
                         Tensor gb = has_b ? sum(g2, {0}) : Tensor();
                         return {gx, gw, gb};
                       });
    return out;
  }, x, w, b);
}

namespace detail {
// The fused MLP runs where the device has both GEMM entries, b1 is given and the hidden width is a
// multiple of 8 (cuBLASLt's rule for the aux matrix that keeps the GELU's input; the CPU's tile
// hook has none, and GPT's widths meet it).
inline bool mlp_gelu_fusable(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  if (!x.defined() || !b1.defined() || x.dim() < 1) return false;
  const DeviceKernels* k = device_kernels(x.device());
  if (!k || !k->linear_gelu || !k->linear_dgelu || w1.dim() != 2 || w2.dim() != 2) return false;
  if (x.size(-1) != w1.size(1) || w2.size(1) != w1.size(0) || w1.size(0) % 8 != 0 || b1.dim() != 1 || b1.size(0) != w1.size(0)) return false;
  for (const Tensor* t : {&w1, &b1, &w2, &b2})
    if (t->defined() && t->device() != x.device()) return false;
  return true;
}
}  // namespace detail

// linear(gelu(linear(x, w1, b1), approximate), w2, b2): a transformer's MLP, x [..., K], w1 [H, K],
// b1 [H], w2 [D, H], b2 [D] (optional); approximate "none" (erf) or "tanh", as gelu(). Without
// the fused entries exactly those three ops. Where the device fuses (CUDA: cuBLASLt, tanh only;
// the CPU: both GELUs, float32 and 16-bit, on AVX-512; H % 8 == 0, b1 given) one autograd node:
// the first GEMM adds b1, applies the GELU and keeps its input for the backward as it stores the
// result (no GELU pass, no bias pass); in the backward the GEMM that makes the hidden gradient
// also applies the GELU's derivative (no GELU-backward pass). Same values as the three ops.
inline Tensor mlp_gelu(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2 = Tensor(),
                       std::string_view approximate = "none") {
  MIXPREC_CHECK(approximate == "none" || approximate == "tanh", "mlp_gelu: approximate must be \"none\" or \"tanh\", got \"",
                approximate, "\"");
  if (!detail::mlp_gelu_fusable(x, w1, b1, w2, b2)) return linear(gelu(linear(x, w1, b1), approximate), w2, b2);
  const DeviceUnary act = approximate == "tanh" ? DeviceUnary::GeluTanh : DeviceUnary::Gelu;
  // As linear under autocast (its policy): every operand in the autocast dtype.
  return dispatch(OpId::linear, [act, approximate](const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
    const DType d = x.dtype();
    for (const Tensor* t : {&w1, &b1, &w2, &b2})
      MIXPREC_CHECK(!t->defined() || t->dtype() == d, "mlp_gelu: dtypes differ: input ", d, ", weights and biases ", w1.dtype(), " ",
                    b1.dtype(), " ", w2.dtype(), b2.defined() ? " " : "", b2.defined() ? name(b2.dtype()) : "");
    MIXPREC_CHECK(!b2.defined() || (b2.dim() == 1 && b2.size(0) == w2.size(0)), "mlp_gelu: bias of shape ", b2.sizes(),
                  " does not match the second weight's shape ", w2.sizes());
    const int64_t K = x.size(-1), D = w2.size(0);
    const Tensor x2 = detail::reshape_raw(x, {x.numel() / std::max<int64_t>(K, 1), K});
    const auto [h, pre] = detail::device_kernel("mlp_gelu", x, &DeviceKernels::linear_gelu)(x2, w1, b1, act);
    if (!h.defined()) return linear(gelu(linear(x, w1, b1), approximate), w2, b2);  // no fused kernel for these operands
    Shape os(x.sizes().begin(), x.sizes().end() - 1);
    os.push_back(D);
    const Tensor out = detail::reshape_raw(detail::matmul_kernel("mlp_gelu", h, detail::mT(w2), b2), os);
    if (autograd::should_record({x, w1, b1, w2, b2}))
      autograd::record("mlp_gelu", {x, w1, b1, w2, b2}, {out},
                       [sx = autograd::SavedTensor(x), sw1 = autograd::SavedTensor(w1), sw2 = autograd::SavedTensor(w2), h, pre,
                        has_b2 = b2.defined(), act](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("mlp_gelu");
                         const Tensor& w1 = sw1.get("mlp_gelu");
                         const Tensor& w2 = sw2.get("mlp_gelu");
                         const Tensor g2 = detail::reshape_raw(detail::as_dtype_raw(g[0], w2.dtype()), {h.size(0), w2.size(0)});
                         const Tensor x2 = detail::reshape_raw(x, {h.size(0), x.size(-1)});
                         Tensor gw2 = detail::matmul_kernel("mlp_gelu", detail::mT(g2), h);
                         Tensor gb2 = has_b2 ? sum(g2, {0}) : Tensor();
                         auto [dpre, gb1] = detail::device_kernel("mlp_gelu", x, &DeviceKernels::linear_dgelu)(g2, w2, pre, act);
                         if (!dpre.defined()) {  // no fused kernel: the hidden gradient, then the GELU's backward, unfused
                           const Tensor gh = detail::matmul_kernel("mlp_gelu", g2, w2);
                           dpre = detail::device_kernel("mlp_gelu", x, &DeviceKernels::unary_backward)(act, gh, pre, h);
                           gb1 = sum(dpre, {0});
                         }
                         Tensor gw1 = detail::matmul_kernel("mlp_gelu", detail::mT(dpre), x2);
                         Tensor gx = detail::reshape_raw(detail::matmul_kernel("mlp_gelu", dpre, w1), x.sizes());
                         return {gx, gw1, gb1, gw2, gb2};
                       });
    return out;
  }, x, w1, b1, w2, b2);
}

// mlp_gelu with the tanh GELU (cuBLASLt's epilogue).
inline Tensor mlp_gelu_tanh(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2 = Tensor()) {
  return mlp_gelu(x, w1, b1, w2, b2, "tanh");
}

}  // namespace mixprec
