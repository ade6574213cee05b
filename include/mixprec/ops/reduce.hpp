#pragma once
// Reductions over dimensions. Floating sums accumulate in double (they are memory-bound, so the
// wider accumulator is free and keeps 16-bit and large float32 sums exact to the last bit kept).
#include <limits>

#include "mixprec/ops/elementwise.hpp"

namespace mixprec {

namespace detail {
struct ReducePlan {
  Tensor rows;       // contiguous [M, R]: kept dims first, reduced dims last
  int64_t M = 1, R = 1;
  Shape keep_shape;  // output shape with keepdim=true
  Shape out_shape;   // output shape as requested
  std::vector<bool> reduced;
};

// With rows == false (device kernels) only the shapes are planned; rows stays undefined.
inline ReducePlan plan_reduce(const Tensor& x, const Shape& dims, bool keepdim, const char* op, bool rows = true) {
  if (rows) require_cpu(op, x);
  ReducePlan p;
  const int64_t n = x.dim();
  p.reduced.assign(static_cast<std::size_t>(std::max<int64_t>(n, 1)), dims.empty());
  for (int64_t d : dims) {
    const int64_t w = x.wrap_dim(d, op);
    MIXPREC_CHECK(!p.reduced[w] || dims.empty(), op, ": dimension ", d, " repeated in ", dims);
    p.reduced[w] = true;
  }
  Shape perm;
  for (int64_t d = 0; d < n; ++d)
    if (!p.reduced[d]) perm.push_back(d);
  for (int64_t d = 0; d < n; ++d)
    if (p.reduced[d]) perm.push_back(d);
  for (int64_t d = 0; d < n; ++d) {
    if (p.reduced[d]) {
      p.R *= x.size(d);
      p.keep_shape.push_back(1);
      if (keepdim) p.out_shape.push_back(1);
    } else {
      p.M *= x.size(d);
      p.keep_shape.push_back(x.size(d));
      p.out_shape.push_back(x.size(d));
    }
  }
  if (!rows) return p;
  Shape ps, pst;
  for (int64_t d : perm) {
    ps.push_back(x.size(d));
    pst.push_back(x.stride(d));
  }
  Tensor v = make_view(x, ps, pst, x.storage_offset());
  if (!v.is_contiguous()) {
    Tensor c = empty(ps, x.dtype());
    copy_kernel(c, v);
    v = c;
  }
  p.rows = v;
  return p;
}

// The output dtype of sum: floating stays, integers and bool widen to int64 (as PyTorch).
inline DType sum_dtype(DType d) { return is_floating_point(d) ? d : DType::Int64; }

// sum over the plan's reduced dims by the `sum` kernel of x's device, shaped as the plan says.
// The CPU's sums every dtype (integers into int64, sum_dtype); the others take floating x.
inline Tensor device_sum(const char* op, const Tensor& x, const ReducePlan& p) {
  MIXPREC_CHECK(x.device() == Device::CPU || x.is_floating_point(), op, ": ", x.device(), " kernels take floating-point tensors, got ",
                x.dtype(), " of shape ", x.sizes());
  Shape rd;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (p.reduced[static_cast<std::size_t>(d)]) rd.push_back(d);
  return device_kernel(op, x, &DeviceKernels::sum)(x, rd).reshape(p.out_shape);
}

// The `reduce` kernel of x's device for kind k over dims, shaped as the plan says (keepdim).
inline std::array<Tensor, 2> device_reduce(const char* op, DeviceReduce k, const Tensor& x, const Shape& dims, const ReducePlan& p,
                                           double arg = 0.0) {
  std::array<Tensor, 2> r = device_kernel(op, x, &DeviceKernels::reduce)(k, x, dims, arg);
  for (Tensor& t : r)
    if (t.defined()) t = t.reshape(p.out_shape);
  return r;
}

// Gradient of a reduction, broadcast back over the reduced dims of the input.
inline Tensor expand_reduced_grad(const Tensor& g, const ReducePlan& p, const Shape& in_sizes) {
  return expand_raw(g.reshape(p.keep_shape), in_sizes);
}
}  // namespace detail

inline Tensor sum(const Tensor& x, const Shape& dims = {}, bool keepdim = false) {
  return dispatch(OpId::sum, [&dims, keepdim](const Tensor& x) {
    const detail::ReducePlan p = detail::plan_reduce(x, dims, keepdim, "sum", false);
    Tensor out = detail::device_sum("sum", x, p);
    if (autograd::should_record({x}))
      autograd::record("sum", {x}, {out}, [p, in = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        return {detail::as_dtype_raw(detail::expand_reduced_grad(g[0], p, in), dt).contiguous()};
      });
    return out;
  }, x);
}

inline Tensor mean(const Tensor& x, const Shape& dims = {}, bool keepdim = false) {
  return dispatch(OpId::mean, [&dims, keepdim](const Tensor& x) {
    MIXPREC_CHECK(x.is_floating_point(), "mean: expected a floating-point tensor, got ", x.dtype(), " of shape ", x.sizes());
    const detail::ReducePlan p = detail::plan_reduce(x, dims, keepdim, "mean", false);
    // A device without a `reduce` kernel (CUDA so far) divides its sum.
    const DeviceKernels* k = device_kernels(x.device());
    Tensor out;
    if (x.device() == Device::CPU || (k && k->reduce)) {
      out = detail::device_reduce("mean", DeviceReduce::Mean, x, dims, p)[0];
    } else {
      out = detail::device_binary("mean", DeviceBinary::Div, detail::device_sum("mean", x, p),
                                  scalar_tensor(static_cast<double>(p.R), x.dtype()));
    }
    if (autograd::should_record({x}))
      autograd::record("mean", {x}, {out}, [p, in = x.sizes()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        return {div(detail::expand_reduced_grad(g[0], p, in), static_cast<double>(p.R))};
      });
    return out;
  }, x);
}

// Unbiased by default (correction=1), as torch.var.
inline Tensor var(const Tensor& x, const Shape& dims = {}, int64_t correction = 1, bool keepdim = false) {
  return dispatch(OpId::var, [&dims, correction, keepdim](const Tensor& x) {
    MIXPREC_CHECK(x.is_floating_point(), "var: expected a floating-point tensor, got ", x.dtype());
    const detail::ReducePlan p = detail::plan_reduce(x, dims, keepdim, "var", false);
    const std::array<Tensor, 2> r = detail::device_reduce("var", DeviceReduce::Var, x, dims, p, static_cast<double>(correction));
    const Tensor &out = r[0], &mu = r[1];
    if (autograd::should_record({x}))
      autograd::record("var", {x}, {out}, [p, sx = autograd::SavedTensor(x), mu, correction](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const Tensor& x = sx.get("var");
        const Tensor centered = sub(x, detail::expand_reduced_grad(detail::as_dtype_raw(mu, x.dtype()), p, x.sizes()));
        const double scale = 2.0 / static_cast<double>(p.R - correction);
        return {mul(mul(detail::expand_reduced_grad(g[0], p, x.sizes()), centered), scale)};
      });
    return out;
  }, x);
}

// p-norm over dims (p > 0, or infinity); the default is the 2-norm of all elements.
inline Tensor norm(const Tensor& x, double p = 2.0, const Shape& dims = {}, bool keepdim = false) {
  return dispatch(OpId::norm, [p, &dims, keepdim](const Tensor& x) {
    MIXPREC_CHECK(x.is_floating_point(), "norm: expected a floating-point tensor, got ", x.dtype());
    MIXPREC_CHECK(p > 0, "norm: p must be positive (or infinity), got ", p);
    const detail::ReducePlan plan = detail::plan_reduce(x, dims, keepdim, "norm", false);
    const Tensor out = detail::device_reduce("norm", DeviceReduce::Norm, x, dims, plan, p)[0];
    const bool inf = std::isinf(p);
    if (autograd::should_record({x}))
      autograd::record("norm", {x}, {out},
                       [plan, p, inf, sx = autograd::SavedTensor(x), sy = autograd::SavedTensor(out)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get("norm");
                         const Tensor y = detail::expand_reduced_grad(sy.get("norm"), plan, x.sizes());
                         const Tensor ge = detail::expand_reduced_grad(g[0], plan, x.sizes());
                         Tensor d;
                         if (inf) {
                           // Ties at the max share the gradient evenly.
                           const Tensor is_max = detail::as_dtype_raw(eq(abs(x), y), x.dtype());
                           const Tensor count = detail::expand_reduced_grad(sum(is_max, [&] { Shape ds; for (int64_t i = 0; i < x.dim(); ++i) if (plan.reduced[i]) ds.push_back(i); return ds; }(), true), plan, x.sizes());
                           d = div(mul(detail::device_pointwise("norm_backward", DevicePointwise::Sign, x), is_max), count);
                         } else {
                           // x |x|^(p-2) / y^(p-1), defined as 0 where the norm is 0.
                           d = detail::device_pointwise("norm_backward", DevicePointwise::NormGrad, x, y, {}, p);
                         }
                         return {mul(ge, d)};
                       });
    return out;
  }, x);
}

// Reduces a broadcast gradient back to `shape` (sums over broadcast dims).
inline Tensor sum_to(const Tensor& t, const Shape& shape) {
  if (t.sizes() == shape) return t;
  const int64_t lead = t.dim() - static_cast<int64_t>(shape.size());
  MIXPREC_CHECK(lead >= 0, "sum_to: cannot reduce shape ", t.sizes(), " to ", shape);
  Shape dims;
  for (int64_t i = 0; i < t.dim(); ++i)
    if (i < lead || (shape[i - lead] == 1 && t.size(i) != 1)) dims.push_back(i);
  if (dims.empty()) return t.reshape(shape);
  return sum(t, dims, true).reshape(shape);
}

// max/min along a dim: (values, indices), as torch.max(x, dim).
namespace detail {
template <bool IsMax>
std::pair<Tensor, Tensor> extremum_dim(OpId id, const char* name, const Tensor& x, int64_t dim, bool keepdim) {
  return dispatch(id, [name, dim, keepdim](const Tensor& x) {
    MIXPREC_CHECK(x.numel() > 0, name, ": cannot reduce an empty tensor of shape ", x.sizes());
    const ReducePlan p = plan_reduce(x, {dim}, keepdim, name, false);
    const std::array<Tensor, 2> r = device_reduce(name, IsMax ? DeviceReduce::Max : DeviceReduce::Min, x, {dim}, p);
    const Tensor &values = r[0], &indices = r[1];
    if (autograd::should_record({x}))
      autograd::record(name, {x}, {values}, [p, in = x.sizes(), dt = x.dtype(), indices, dim = x.wrap_dim(dim, name)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        // Each output gradient goes to the position that won (one per output: written, not added).
        const Tensor gg = contiguous_raw(as_dtype_raw(g[0], dt));
        return {device_kernel("max_backward", gg, &DeviceKernels::index)(DeviceIndex::Scatter, gg, dim, reshape_raw(indices, p.keep_shape), in)};
      });
    return std::make_pair(values, indices);
  }, x);
}
}  // namespace detail

inline std::pair<Tensor, Tensor> max(const Tensor& x, int64_t dim, bool keepdim = false) {
  return detail::extremum_dim<true>(OpId::max, "max", x, dim, keepdim);
}
inline std::pair<Tensor, Tensor> min(const Tensor& x, int64_t dim, bool keepdim = false) {
  return detail::extremum_dim<false>(OpId::min, "min", x, dim, keepdim);
}
// Over all elements.
inline Tensor max(const Tensor& x) { return max(x.reshape({-1}), 0).first; }
inline Tensor min(const Tensor& x) { return min(x.reshape({-1}), 0).first; }

inline Tensor argmax(const Tensor& x, std::optional<int64_t> dim = std::nullopt, bool keepdim = false) {
  return dispatch(OpId::argmax, [dim, keepdim](const Tensor& x) {
    // Checked here so that the error names argmax, not the max it is computed with.
    MIXPREC_CHECK(x.numel() > 0, "argmax: cannot reduce an empty tensor of shape ", x.sizes());
    if (dim) x.wrap_dim(*dim, "argmax");
    no_grad ng;
    if (!dim) return max(x.reshape({-1}), 0).second;
    return max(x, *dim, keepdim).second;
  }, x);
}

}  // namespace mixprec
