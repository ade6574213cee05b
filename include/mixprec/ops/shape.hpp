#pragma once
// Joining, splitting and indexing: cat, stack, split, chunk, index_select, gather, embedding,
// cumsum, tril/triu. Index backward passes (index_add, scatter_add, embedding) accumulate in
// acc_t (float for 16-bit) so repeated indices round once. The kernels are the device kernel
// table's (cat, index, cumsum, embedding; the CPU's in backends/cpu/shape.hpp and elementwise.hpp),
// reached on every device; the op bodies check the arguments and the indices first.
#include <cstring>
#include <span>

#include "mixprec/ops/linalg.hpp"

namespace mixprec {

namespace detail {
// (outer, n, inner) of `sizes` around dimension `dim`.
struct DimSplit {
  int64_t outer = 1, n = 1, inner = 1;
};
inline DimSplit split_at(const Shape& sizes, int64_t dim) {
  DimSplit s;
  for (int64_t i = 0; i < static_cast<int64_t>(sizes.size()); ++i) {
    if (i < dim) s.outer *= sizes[i];
    else if (i == dim) s.n = sizes[i];
    else s.inner *= sizes[i];
  }
  return s;
}

// Indices as a new contiguous int64 tensor (never the caller's storage: a backward reads them
// later), checked against [0, bound) before any kernel runs (kernels run inside parallel regions,
// where an exception cannot propagate), on x's device.
inline Tensor read_indices(const char* op, const Tensor& index, int64_t bound, const char* what, Device d) {
  MIXPREC_CHECK(index.dtype() == DType::Int64 || index.dtype() == DType::Int32, op, ": ", what,
                " must be int64 or int32, got ", index.dtype(), " of shape ", index.sizes());
  require_cpu(op, index);
  Tensor c = empty(index.sizes(), DType::Int64);
  copy_kernel(c, index);
  const int64_t* p = c.data<int64_t>();
  for (int64_t i = 0, n = c.numel(); i < n; ++i)
    MIXPREC_CHECK(p[i] >= 0 && p[i] < bound, op, ": ", what, " ", p[i], " (at position ", i,
                  ") is out of range for a dimension of size ", bound);
  return move_raw(c, d, op);
}

// The concatenation of `ts` along `dim` in dtype `dt` by the `cat` kernel of their device (all on
// one, checked here), without cat's legacy empty 1-D inputs (`skip`).
inline Tensor device_cat(const char* op, const std::vector<Tensor>& ts, const std::vector<bool>& skip, int64_t dim, DType dt,
                         const Shape& out_shape) {
  const auto f = device_kernel(op, ts[0], &DeviceKernels::cat);
  std::vector<Tensor> kept;
  kept.reserve(ts.size());
  for (std::size_t i = 0; i < ts.size(); ++i) {
    MIXPREC_CHECK(ts[i].device() == ts[0].device(), op, ": expected all tensors on one device, got ", ts[0].device(), " (tensor 0 of shape ",
                  ts[0].sizes(), ") and ", ts[i].device(), " (tensor ", i, " of shape ", ts[i].sizes(), ")");
    if (!skip[i]) kept.push_back(ts[i]);
  }
  return f(kept, dim, dt, out_shape);
}
}  // namespace detail

// torch.cat. Mixed dtypes promote; 1-D empty tensors are skipped, as in PyTorch.
inline Tensor cat(const std::vector<Tensor>& tensors, int64_t dim = 0) {
  return dispatch(OpId::cat, [dim](const std::vector<Tensor>& ts) {
    MIXPREC_CHECK(!ts.empty(), "cat: expected a non-empty list of tensors");
    for (std::size_t i = 0; i < ts.size(); ++i) {
      MIXPREC_CHECK(ts[i].defined(), "cat: tensor ", i, " is undefined");
    }
    std::vector<bool> skip(ts.size());
    std::optional<std::size_t> ref;
    for (std::size_t i = 0; i < ts.size(); ++i) {
      skip[i] = ts[i].dim() == 1 && ts[i].size(0) == 0;
      if (!skip[i] && !ref) ref = i;
    }
    const Tensor& r = ts[ref.value_or(0)];
    if (!ref) std::fill(skip.begin(), skip.end(), false);
    MIXPREC_CHECK(r.dim() > 0, "cat: zero-dimensional tensor (at position ", ref.value_or(0), ") cannot be concatenated");
    const int64_t d = r.wrap_dim(dim, "cat");
    DType dt = ts[0].dtype();
    Shape shape = r.sizes();
    shape[d] = 0;
    for (std::size_t i = 0; i < ts.size(); ++i) {
      dt = promote_types(dt, ts[i].dtype());
      if (skip[i]) continue;
      const Tensor& t = ts[i];
      MIXPREC_CHECK(t.dim() == r.dim(), "cat: tensors must have the same number of dimensions: tensor ", *ref, " has shape ",
                    r.sizes(), " but tensor ", i, " has shape ", t.sizes());
      for (int64_t k = 0; k < r.dim(); ++k)
        MIXPREC_CHECK(k == d || t.size(k) == r.size(k), "cat: sizes must match except in dimension ", d, ": tensor ", *ref,
                      " has shape ", r.sizes(), " but tensor ", i, " has shape ", t.sizes());
      shape[d] += t.size(d);
    }
    Tensor out = detail::device_cat("cat", ts, skip, d, dt, shape);
    if (autograd::should_record(ts)) {
      std::vector<std::pair<Shape, DType>> meta;
      for (const Tensor& t : ts) meta.emplace_back(t.sizes(), t.dtype());
      autograd::record("cat", ts, {out}, [meta, skip, d](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        std::vector<Tensor> grads;
        int64_t off = 0;
        for (std::size_t i = 0; i < meta.size(); ++i) {
          const auto& [sizes, dtype] = meta[i];
          if (!is_floating_point(dtype)) {
            grads.emplace_back();
          } else if (skip[i]) {
            grads.push_back(zeros(sizes, dtype));
          } else {
            grads.push_back(detail::as_dtype_raw(g[0].narrow(d, off, sizes[d]), dtype));
            off += sizes[d];
          }
        }
        return grads;
      });
    }
    return out;
  }, tensors);
}

// torch.stack: all tensors have one shape; the new dimension is inserted at `dim`.
inline Tensor stack(const std::vector<Tensor>& tensors, int64_t dim = 0) {
  return dispatch(OpId::stack, [dim](const std::vector<Tensor>& ts) {
    MIXPREC_CHECK(!ts.empty(), "stack: expected a non-empty list of tensors");
    for (std::size_t i = 0; i < ts.size(); ++i) {
      MIXPREC_CHECK(ts[i].defined(), "stack: tensor ", i, " is undefined");
      MIXPREC_CHECK(ts[i].sizes() == ts[0].sizes(), "stack: expects each tensor to be equal size, but got ", ts[0].sizes(),
                    " at entry 0 and ", ts[i].sizes(), " at entry ", i);
    }
    const int64_t nd = ts[0].dim();
    MIXPREC_CHECK(dim >= -nd - 1 && dim <= nd, "stack: dimension ", dim, " out of range for tensors of shape ", ts[0].sizes());
    const int64_t d = dim < 0 ? dim + nd + 1 : dim;
    Shape one = ts[0].sizes();
    one.insert(one.begin() + d, 1);
    std::vector<Tensor> raw;
    DType dt = ts[0].dtype();
    for (const Tensor& t : ts) {
      dt = promote_types(dt, t.dtype());
      Shape st = t.strides();
      st.insert(st.begin() + d, 0);
      raw.push_back(detail::make_view(t, one, st, t.storage_offset()));
    }
    Shape shape = ts[0].sizes();
    shape.insert(shape.begin() + d, static_cast<int64_t>(ts.size()));
    Tensor out = detail::device_cat("stack", raw, std::vector<bool>(ts.size(), false), d, dt, shape);
    if (autograd::should_record(ts)) {
      std::vector<DType> dtypes;
      for (const Tensor& t : ts) dtypes.push_back(t.dtype());
      autograd::record("stack", ts, {out}, [dtypes, d](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        std::vector<Tensor> grads;
        for (std::size_t i = 0; i < dtypes.size(); ++i)
          grads.push_back(is_floating_point(dtypes[i]) ? detail::as_dtype_raw(g[0].select(d, static_cast<int64_t>(i)), dtypes[i])
                                                       : Tensor());
        return grads;
      });
    }
    return out;
  }, tensors);
}

// Views of consecutive pieces of `split_size` along dim (the last may be shorter).
inline std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim = 0) {
  MIXPREC_CHECK(x.dim() > 0, "split: expects a tensor with at least one dimension, got shape ", x.sizes());
  const int64_t d = x.wrap_dim(dim, "split");
  const int64_t n = x.size(d);
  if (n == 0) return {x.narrow(d, 0, 0)};
  MIXPREC_CHECK(split_size > 0, "split: split_size must be positive, got ", split_size, " for dimension ", d,
                " of shape ", x.sizes());
  std::vector<Tensor> out;
  for (int64_t s = 0; s < n; s += split_size) out.push_back(x.narrow(d, s, std::min(split_size, n - s)));
  return out;
}

// Views of pieces with the given sizes, which must add up to the dimension's size.
inline std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) {
  MIXPREC_CHECK(x.dim() > 0, "split: expects a tensor with at least one dimension, got shape ", x.sizes());
  const int64_t d = x.wrap_dim(dim, "split");
  int64_t total = 0;
  for (int64_t s : sizes) {
    MIXPREC_CHECK(s >= 0, "split: split sizes must be non-negative, got ", sizes);
    total += s;
  }
  MIXPREC_CHECK(total == x.size(d), "split: split sizes ", sizes, " add up to ", total, " but dimension ", d,
                " of shape ", x.sizes(), " has size ", x.size(d));
  std::vector<Tensor> out;
  int64_t start = 0;
  for (int64_t s : sizes) {
    out.push_back(x.narrow(d, start, s));
    start += s;
  }
  return out;
}

// torch.chunk: pieces of ceil(n / chunks); may return fewer than `chunks` pieces.
inline std::vector<Tensor> chunk(const Tensor& x, int64_t chunks, int64_t dim = 0) {
  MIXPREC_CHECK(chunks > 0, "chunk: number of chunks must be positive, got ", chunks);
  MIXPREC_CHECK(x.dim() > 0, "chunk: expects a tensor with at least one dimension, got shape ", x.sizes());
  const int64_t d = x.wrap_dim(dim, "chunk");
  const int64_t n = x.size(d);
  if (n == 0) return split(x, std::vector<int64_t>(static_cast<std::size_t>(chunks), 0), d);
  return split(x, (n + chunks - 1) / chunks, d);
}

// x's slices at `index` (1-D, int64/int32) along dim; backward adds into zeros (repeats sum).
inline Tensor index_select(const Tensor& x, int64_t dim, const Tensor& index) {
  return dispatch(OpId::index_select, [dim](const Tensor& x, const Tensor& index) {
    const auto f = detail::device_kernel("index_select", x, &DeviceKernels::index);
    MIXPREC_CHECK(x.dim() > 0, "index_select: expects a tensor with at least one dimension, got shape ", x.sizes());
    MIXPREC_CHECK(index.dim() <= 1, "index_select: index must be 1-D, got shape ", index.sizes());
    const int64_t d = x.wrap_dim(dim, "index_select");
    const Tensor idx = detail::read_indices("index_select", index, x.size(d), "index", x.device());
    Tensor out = f(DeviceIndex::Select, x, d, idx, {});
    if (autograd::should_record({x}))
      autograd::record("index_select", {x}, {out}, [idx, d, in = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const DType at = dt == DType::Float64 ? dt : DType::Float32;
        const Tensor gc = detail::contiguous_raw(g[0], at);
        const auto f = detail::device_kernel("index_select_backward", gc, &DeviceKernels::index);
        return {detail::as_dtype_raw(f(DeviceIndex::SelectAdd, gc, d, idx, in), dt)};
      });
    return out;
  }, x, index);
}

// out[i][j][k] = x[i][index[i][j][k]][k] for dim 1 (and so on); index has x's rank and is no
// larger than x outside `dim`. Backward scatter-adds.
inline Tensor gather(const Tensor& x, int64_t dim, const Tensor& index) {
  return dispatch(OpId::gather, [dim](const Tensor& x, const Tensor& index) {
    const auto f = detail::device_kernel("gather", x, &DeviceKernels::index);
    MIXPREC_CHECK(index.dim() == x.dim(), "gather: index of shape ", index.sizes(), " must have as many dimensions as the input ",
                  x.sizes());
    const int64_t d = x.wrap_dim(dim, "gather");
    const Shape xs = x.dim() == 0 ? Shape{1} : x.sizes();
    const Shape is = index.dim() == 0 ? Shape{1} : index.sizes();
    for (std::size_t k = 0; k < xs.size(); ++k)
      MIXPREC_CHECK(static_cast<int64_t>(k) == d || is[k] <= xs[k], "gather: index of shape ", index.sizes(),
                    " is larger than the input ", x.sizes(), " in dimension ", k);
    const Tensor idx = detail::read_indices("gather", index, xs[d], "index", x.device());
    Tensor out = f(DeviceIndex::Gather, x, d, idx, {});
    if (autograd::should_record({x}))
      autograd::record("gather", {x}, {out}, [idx, d, in = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        const DType at = dt == DType::Float64 ? dt : DType::Float32;
        const Tensor gc = detail::contiguous_raw(g[0], at);
        const auto f = detail::device_kernel("gather_backward", gc, &DeviceKernels::index);
        return {detail::as_dtype_raw(f(DeviceIndex::ScatterAdd, gc, d, idx, in), dt)};
      });
    return out;
  }, x, index);
}

namespace detail {
inline void embedding_check_indices(const int64_t* ip, int64_t N, const Tensor& weight) {
  const int64_t V = weight.size(0);
  for (int64_t i = 0; i < N; ++i)
    MIXPREC_CHECK(ip[i] >= 0 && ip[i] < V, "embedding: index ", ip[i], " (at position ", i,
                  ") is out of range for num_embeddings V = ", V, " (weight shape ", weight.sizes(), ")");
}

// embedding through the `embedding` and `embedding_backward` kernels of the weight's device.
// Indices on the host are range-checked there first (an Error at once). Off the CPU, contiguous
// int64 indices on the device stay there, checked by a kernel (DeviceKernels::clamp_indices)
// whose count the next host read reports, as cross_entropy's targets, so a training step never
// waits for the host; other device indices are copied back. Either way the kernels never see an
// index out of range.
inline Tensor embedding_impl(const Tensor& weight, const Tensor& indices, int64_t pad) {
  const char* op = "embedding";
  const Device dev = weight.device();
  MIXPREC_CHECK(indices.device() == Device::CPU || indices.device() == dev, op, ": weight on ", dev, " and indices on ",
                indices.device());
  const auto gather = device_kernel(op, weight, &DeviceKernels::embedding);  // refuse by name before any copy
  const int64_t V = weight.size(0), D = weight.size(1), N = indices.numel();
  const DeviceKernels* k = device_kernels(dev);
  const bool grad = autograd::should_record({weight});
  Tensor idx;  // the backward needs these very indices: never the caller's own storage then
  if (dev != Device::CPU && indices.device() == dev && indices.dtype() == DType::Int64 && indices.is_contiguous() && k->clamp_indices &&
      k->copy) {
    idx = empty({N}, DType::Int64, dev);
    if (N > 0) k->copy(idx, reshape_raw(indices, {N}));
    const Tensor bad = zeros({}, DType::Float32, dev);
    k->clamp_indices(idx, V, bad);
    add_device_check(bad, std::string(op) + ": an index is out of range for num_embeddings V = " + std::to_string(V) +
                              " (weight shape [" + std::to_string(V) + ", " + std::to_string(D) + "]); it read row 0");
  } else {
    const Tensor ih = contiguous_raw(move_raw(indices, Device::CPU, op), DType::Int64);
    embedding_check_indices(ih.data<int64_t>(), N, weight);
    idx = move_raw(reshape_raw(ih, {N}), dev, op);
    if (grad && N > 0 && idx.storage() == indices.storage()) {  // CPU int64 indices, used as they are
      Tensor own = empty({N}, DType::Int64);
      std::memcpy(own.data_ptr(), idx.data_ptr(), static_cast<std::size_t>(N) * sizeof(int64_t));
      idx = own;
    }
  }
  Shape shape = indices.sizes();
  shape.push_back(D);
  const Tensor out = reshape_raw(gather(contiguous_raw(weight), idx), shape);
  if (grad)
    autograd::record(op, {weight}, {out}, [idx, V, D, N, pad, dt = weight.dtype(), dev](const std::vector<Tensor>& g) -> std::vector<Tensor> {
      // Summed in float32; float64 weights in float64 on the CPU, whose kernel takes those.
      const DType at = dt == DType::Float64 && dev == Device::CPU ? dt : DType::Float32;
      const Tensor gc = reshape_raw(contiguous_raw(g[0], at), {N, D});
      return {as_dtype_raw(device_kernel("embedding_backward", gc, &DeviceKernels::embedding_backward)(gc, idx, V, pad), dt)};
    });
  return out;
}
}  // namespace detail

// Rows of weight [V, D] at `indices` (any shape): output indices.shape + [D]. padding_idx's row
// gets no gradient (it may be negative, counted from the end, as in PyTorch).
inline Tensor embedding(const Tensor& weight, const Tensor& indices, std::optional<int64_t> padding_idx = std::nullopt) {
  return dispatch(OpId::embedding, [padding_idx](const Tensor& weight, const Tensor& indices) {
    MIXPREC_CHECK(weight.defined() && indices.defined(), "embedding: weight and indices must be defined");
    MIXPREC_CHECK(weight.dim() == 2, "embedding: weight must be 2-D [num_embeddings, embedding_dim], got shape ", weight.sizes());
    const int64_t V = weight.size(0);
    MIXPREC_CHECK(indices.dtype() == DType::Int64 || indices.dtype() == DType::Int32,
                  "embedding: indices must be int64 or int32, got ", indices.dtype(), " of shape ", indices.sizes());
    int64_t pad = -1;
    if (padding_idx) {
      MIXPREC_CHECK(*padding_idx >= -V && *padding_idx < V, "embedding: padding_idx ", *padding_idx,
                    " is out of range for num_embeddings V = ", V);
      pad = *padding_idx < 0 ? *padding_idx + V : *padding_idx;
    }
    return detail::embedding_impl(weight, indices, pad);
  }, weight, indices);
}

inline Tensor cumsum(const Tensor& x, int64_t dim) {
  return dispatch(OpId::cumsum, [dim](const Tensor& x) {
    const auto f = detail::device_kernel("cumsum", x, &DeviceKernels::cumsum);
    const int64_t d = x.wrap_dim(dim, "cumsum");
    if (x.dim() == 0) return cumsum(x.reshape({1}), 0).reshape({});
    // Floating x accumulates in double and keeps its dtype; integers and bool give int64.
    Tensor out = f(x, d, false);
    if (autograd::should_record({x}))
      autograd::record("cumsum", {x}, {out}, [d, dt = x.dtype()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
        return {detail::as_dtype_raw(detail::device_kernel("cumsum_backward", g[0], &DeviceKernels::cumsum)(g[0], d, true), dt)};
      });
    return out;
  }, x);
}

namespace detail {
// Zeros outside the band of the last two dims that `keep(row, col)` selects.
template <class Keep>
Tensor band(const char* op, const Tensor& x, Keep keep) {
  MIXPREC_CHECK(x.dim() >= 2, op, ": expects a tensor with at least 2 dimensions, got shape ", x.sizes());
  const int64_t R = x.size(-2), C = x.size(-1);
  Tensor drop = empty({R, C}, DType::Bool);
  bool* p = drop.data<bool>();
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) p[i * C + j] = !keep(i, j);
  return masked_fill(x, drop, 0.0);
}
}  // namespace detail

// Lower triangle of the last two dims: keeps col - row <= diagonal, as torch.tril.
inline Tensor tril(const Tensor& x, int64_t diagonal = 0) {
  return detail::band("tril", x, [diagonal](int64_t i, int64_t j) { return j - i <= diagonal; });
}
// Upper triangle: keeps col - row >= diagonal, as torch.triu.
inline Tensor triu(const Tensor& x, int64_t diagonal = 0) {
  return detail::band("triu", x, [diagonal](int64_t i, int64_t j) { return j - i >= diagonal; });
}

}  // namespace mixprec
