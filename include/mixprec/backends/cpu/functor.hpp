#pragma once
// The CPU backend's generic element-wise loops: a functor over broadcast operands, computed in
// acc_t of the promoted dtype (float for 16-bit) and rounded once on store. Why here and not with
// the table's other CPU kernels (included last, by backends/cpu/kernels.hpp): besides the CPU's
// binary, unary, compare and pointwise entries, CPU kernel code that the op layer still calls
// directly (prelu, the loss kernels) builds on them, so they must be declared before the op
// layer; they only need the raw tensor helpers of ops/tensor_ops.hpp. mixprec::detail re-exports
// them under their old names (ops/elementwise.hpp).
#include <optional>

#include "mixprec/backends/cpu/loops.hpp"
#include "mixprec/ops/tensor_ops.hpp"

namespace mixprec::cpu {

// out = f(a, b) over the broadcast shape, computed in the promoted dtype; `out_dtype` may be
// bool for comparisons. F receives acc_t values.
template <class F>
Tensor binary_kernel(const char* op, const Tensor& a, const Tensor& b, F f, std::optional<DType> out_dtype = {}) {
  namespace md = mixprec::detail;
  md::require_cpu(op, a);
  md::require_cpu(op, b);
  const Shape shape = broadcast_shapes(a.sizes(), b.sizes(), op);
  const DType ct = promote_types(a.dtype(), b.dtype());
  const Tensor ac = md::expand_raw(md::as_dtype_raw(a, ct), shape);
  const Tensor bc = md::expand_raw(md::as_dtype_raw(b, ct), shape);
  const DType od = out_dtype.value_or(ct);
  // The result takes the layout of an operand of its full shape (a channels-last one stays so).
  const MemoryFormat layout = a.sizes() == shape ? a.suggest_memory_format() : b.sizes() == shape ? b.suggest_memory_format()
                                                                                               : MemoryFormat::Contiguous;
  Tensor out = empty(shape, od, Device::CPU, layout);
  dispatch_all(ct, op, [&]<class T>() {
    if (od == DType::Bool) cpu::map<bool, T, T>(out, f, ac, bc);
    else cpu::map<T, T, T>(out, f, ac, bc);
  });
  return out;
}

template <class F>
Tensor unary_kernel(const char* op, const Tensor& x, F f, std::optional<DType> out_dtype = {}) {
  mixprec::detail::require_cpu(op, x);
  const DType od = out_dtype.value_or(x.dtype());
  Tensor out = empty_like_layout(x, od);
  dispatch_all(x.dtype(), op, [&]<class T>() {
    if (od == DType::Bool) cpu::map<bool, T>(out, f, x);
    else cpu::map<T, T>(out, f, x);
  });
  return out;
}

template <class F>
Tensor unary_floating_kernel(const char* op, const Tensor& x, F f) {
  MIXPREC_CHECK(x.is_floating_point(), op, ": expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
  return unary_kernel(op, x, f);
}

}  // namespace mixprec::cpu
