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

// Reduces each row of plan.rows with (init, step, finish) in accumulator type Acc.
template <class T, class Acc, class Step, class Finish>
void reduce_rows(const ReducePlan& p, Acc init, Step step, Finish finish, const Tensor& out) {
  const T* x = p.rows.data<T>();
  using Out = T;
  Out* o = out.data<Out>();
  const int64_t M = p.M, R = p.R;
  if (M == 1 && R >= 2 * kParallelGrain && cpu::num_threads() > 1) {
    std::vector<Acc> partial(static_cast<std::size_t>(cpu::num_threads()), init);
    std::vector<int64_t> filled(partial.size(), 0);
    cpu::parallel_for(0, R, kParallelGrain, [&](int64_t b, int64_t e) {
      Acc a = init;
      for (int64_t i = b; i < e; ++i) a = step(a, static_cast<acc_t<T>>(x[i]));
#if defined(_OPENMP)
      const std::size_t t = static_cast<std::size_t>(omp_get_thread_num());
#else
      const std::size_t t = 0;
#endif
      partial[t] = a;
      filled[t] = 1;
    });
    Acc a = init;
    for (std::size_t t = 0; t < partial.size(); ++t)
      if (filled[t]) a = step.combine(a, partial[t]);
    o[0] = static_cast<Out>(finish(a, R));
    return;
  }
  cpu::parallel_for(0, M, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(R, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      Acc a = init;
      const T* row = x + m * R;
      for (int64_t i = 0; i < R; ++i) a = step(a, static_cast<acc_t<T>>(row[i]));
      o[m] = static_cast<Out>(finish(a, R));
    }
  });
}

template <class A>
struct SumStep {
  A operator()(A a, auto v) const { return a + static_cast<A>(v); }
  A combine(A a, A b) const { return a + b; }
};
struct NormStep {
  double p;
  bool inf;
  template <class V>
  double operator()(double a, V v) const {
    const double av = std::fabs(static_cast<double>(v));
    if (inf) return av > a || av != av ? av : a;
    return a + (p == 2.0 ? av * av : (p == 1.0 ? av : std::pow(av, p)));
  }
  double combine(double a, double b) const { return inf ? std::max(a, b) : a + b; }
};
template <class T>
using sum_acc_t = std::conditional_t<is_floating_v<T>, double, int64_t>;

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
    const bool cpu = x.device() == Device::CPU;
    const detail::ReducePlan p = detail::plan_reduce(x, dims, keepdim, "mean", cpu);
    Tensor out;
    if (cpu) {
      out = empty(p.out_shape, x.dtype());
      dispatch_floating(x.dtype(), "mean", [&]<class T>() {
        detail::reduce_rows<T, double>(p, 0.0, detail::SumStep<double>{}, [](double a, int64_t n) { return a / static_cast<double>(n); }, out);
      });
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
    const detail::ReducePlan p = detail::plan_reduce(x, dims, keepdim, "var");
    Tensor out = empty(p.out_shape, x.dtype());
    Tensor mu = empty(p.out_shape, DType::Float64);
    dispatch_floating(x.dtype(), "var", [&]<class T>() {
      const T* xs = p.rows.data<T>();
      T* o = out.data<T>();
      double* m = mu.data<double>();
      cpu::parallel_for(0, p.M, 1, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const T* row = xs + r * p.R;
          double s = 0;
          for (int64_t i = 0; i < p.R; ++i) s += static_cast<double>(static_cast<acc_t<T>>(row[i]));
          const double mean = s / static_cast<double>(p.R);
          double ss = 0;
          for (int64_t i = 0; i < p.R; ++i) {
            const double d = static_cast<double>(static_cast<acc_t<T>>(row[i])) - mean;
            ss += d * d;
          }
          m[r] = mean;
          const double denom = static_cast<double>(p.R - correction);
          o[r] = static_cast<T>(denom > 0 ? ss / denom : std::numeric_limits<double>::quiet_NaN());
        }
      });
    });
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
    const detail::ReducePlan plan = detail::plan_reduce(x, dims, keepdim, "norm");
    Tensor out = empty(plan.out_shape, x.dtype());
    const bool inf = std::isinf(p);
    dispatch_floating(x.dtype(), "norm", [&]<class T>() {
      detail::reduce_rows<T, double>(plan, 0.0, detail::NormStep{p, inf}, [p, inf](double a, int64_t) {
        return inf ? a : (p == 2.0 ? std::sqrt(a) : (p == 1.0 ? a : std::pow(a, 1.0 / p)));
      }, out);
    });
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
                           d = div(mul(detail::unary_kernel("sign", x, [](auto v) { return static_cast<decltype(v)>((v > 0) - (v < 0)); }), is_max), count);
                         } else {
                           // x |x|^(p-2) / y^(p-1), defined as 0 where the norm is 0.
                           d = detail::binary_kernel("norm_backward", x, y, [p](auto v, auto n) {
                             using T = decltype(v);
                             if (n == 0) return T(0);
                             if (p == 1.0) return static_cast<T>((v > 0) - (v < 0));
                             if (p == 2.0) return v / n;
                             return static_cast<T>(v * std::pow(std::fabs(v), p - 2) / std::pow(n, p - 1));
                           });
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
    const ReducePlan p = plan_reduce(x, {dim}, keepdim, name);
    Tensor values = empty(p.out_shape, x.dtype());
    Tensor indices = empty(p.out_shape, DType::Int64);
    dispatch_all(x.dtype(), name, [&]<class T>() {
      const T* xs = p.rows.data<T>();
      T* v = values.data<T>();
      int64_t* ix = indices.data<int64_t>();
      cpu::parallel_for(0, p.M, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(p.R, 1)), [&](int64_t b, int64_t e) {
        for (int64_t m = b; m < e; ++m) {
          const T* row = xs + m * p.R;
          int64_t best = 0;
          auto bv = static_cast<acc_t<T>>(row[0]);
          for (int64_t i = 1; i < p.R; ++i) {
            const auto c = static_cast<acc_t<T>>(row[i]);
            if (bv != bv) break;  // NaN wins, first one
            if (c != c || (IsMax ? c > bv : c < bv)) {
              bv = c;
              best = i;
            }
          }
          v[m] = row[best];
          ix[m] = best;
        }
      });
    });
    if (autograd::should_record({x}))
      autograd::record(name, {x}, {values}, [p, in = x.sizes(), dt = x.dtype(), indices, dim = x.wrap_dim(dim, name)](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        // Scatter each output gradient to the position that won.
        Tensor gin = zeros(in, dt);
        const Tensor gg = as_dtype_raw(g[0], dt).contiguous();
        dispatch_floating(dt, "max_backward", [&]<class T>() {
          T* o = gin.data<T>();
          const T* gs = gg.data<T>();
          const int64_t* ix = indices.contiguous().data<int64_t>();
          const Shape& st = gin.strides();
          // Output position m enumerates the kept dims in order; walk them with a cursor.
          Shape kept;
          Shape kept_strides;
          for (int64_t d = 0; d < static_cast<int64_t>(in.size()); ++d)
            if (d != dim) {
              kept.push_back(in[d]);
              kept_strides.push_back(st[d]);
            }
          Shape idx(kept.size(), 0);
          for (int64_t m = 0; m < p.M; ++m) {
            int64_t off = 0;
            for (std::size_t k = 0; k < kept.size(); ++k) off += idx[k] * kept_strides[k];
            o[off + ix[m] * (in.empty() ? 0 : st[dim])] = gs[m];
            for (int64_t k = static_cast<int64_t>(kept.size()) - 1; k >= 0 && ++idx[k] == kept[k]; --k) idx[k] = 0;
          }
        });
        return {gin};
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
