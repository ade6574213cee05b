#pragma once
// The CPU backend's `cat`, `index` and `cumsum` entries of the device kernel table
// (backends/device.hpp), reached by cat, stack, index_select, gather, cumsum and max/min's
// backward (ops/shape.hpp, ops/reduce.hpp) on every device; index_add_rows also serves the
// embedding gradient (backends/cpu/elementwise.hpp). Why the index backward kinds accumulate in
// their own float32/float64 tensor and are split over rows (or columns) that no two threads share:
// repeated indices then round once, and no atomics are needed.
#include <cstring>
#include <span>

#include "mixprec/backends/cpu/loops.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/shape.hpp"

namespace mixprec::cpu {

// dst[o, idx[k], :] += src[o, k, :] for k < K, skipping idx == skip. Threads split over `outer`
// or over columns, so no element is written by two threads.
template <class A>
void index_add_rows(A* dst, const A* src, std::span<const int64_t> idx, int64_t outer, int64_t n, int64_t inner, int64_t skip = -1) {
  const int64_t K = static_cast<int64_t>(idx.size());
  auto rows = [&](int64_t o, int64_t c0, int64_t c1) {
    for (int64_t k = 0; k < K; ++k) {
      if (idx[k] == skip) continue;
      A* d = dst + (o * n + idx[k]) * inner;
      const A* s = src + (o * K + k) * inner;
      for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
    }
  };
  if (outer * K * inner < kParallelGrain) {
    for (int64_t o = 0; o < outer; ++o) rows(o, 0, inner);
  } else if (outer >= cpu::num_threads()) {
    cpu::parallel_for(0, outer, 1, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) rows(o, 0, inner);
    });
  } else {
    cpu::parallel_for(0, inner, 16, [&](int64_t b, int64_t e) {
      for (int64_t o = 0; o < outer; ++o) rows(o, b, e);
    });
  }
}

// The concatenation of ts along dim, in dtype dt: each input, made contiguous in dt, is copied
// as one block per outer index.
inline Tensor cat_tensors(const std::vector<Tensor>& ts, int64_t dim, DType dt, const Shape& out_shape) {
  Tensor out = empty(out_shape, dt);
  if (out.numel() == 0) return out;
  const mixprec::detail::DimSplit os = mixprec::detail::split_at(out_shape, dim);
  const auto item = static_cast<int64_t>(itemsize(dt));
  char* dst = static_cast<char*>(out.data_ptr());
  int64_t off = 0;
  for (const Tensor& t : ts) {
    const int64_t len = t.size(dim);
    if (len == 0) continue;
    const Tensor c = mixprec::detail::contiguous_raw(t, dt);
    const char* src = static_cast<const char*>(c.data_ptr());
    const int64_t chunk = len * os.inner * item, row = os.n * os.inner * item, at = off * os.inner * item;
    cpu::parallel_for(0, os.outer, std::max<int64_t>(1, kParallelGrain * 4 / std::max<int64_t>(chunk, 1)), [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) std::memcpy(dst + o * row + at, src + o * chunk, static_cast<std::size_t>(chunk));
    });
    off += len;
  }
  return out;
}

namespace detail {
// gather's walk: row r is one position of the index's dims other than `dim`, and walks `dim`
// (K steps); rows touch disjoint fibres of the indexed tensor, so they split over threads.
struct GatherPlan {
  Shape other;       // index sizes outside dim
  Shape x_st, i_st;  // matching strides of the (contiguous) indexed tensor and of the index
  int64_t K = 1, x_step = 0, i_step = 0, rows = 1;
};
inline GatherPlan gather_plan(Shape xs, Shape is, int64_t d) {
  if (xs.empty()) xs = {1};  // a 0-dim tensor as [1]
  if (is.empty()) is = {1};
  GatherPlan p;
  const Shape xst = contiguous_strides(xs), ist = contiguous_strides(is);
  for (int64_t k = 0; k < static_cast<int64_t>(is.size()); ++k) {
    if (k == d) continue;
    p.other.push_back(is[k]);
    p.x_st.push_back(xst[k]);
    p.i_st.push_back(ist[k]);
    p.rows *= is[k];
  }
  p.K = is[d];
  p.x_step = xst[d];
  p.i_step = ist[d];
  return p;
}
template <class Body>
void gather_rows(const GatherPlan& p, Body&& body) {
  cpu::parallel_for(0, p.rows, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(p.K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t lin = r, ox = 0, oi = 0;
      for (int64_t k = static_cast<int64_t>(p.other.size()) - 1; k >= 0; --k) {
        const int64_t c = lin % p.other[k];
        lin /= p.other[k];
        ox += c * p.x_st[k];
        oi += c * p.i_st[k];
      }
      body(ox, oi);
    }
  });
}
}  // namespace detail

// DeviceKernels::index: index_select and gather, and their backward passes into zeros.
inline Tensor index_op(DeviceIndex k, const Tensor& src, int64_t dim, const Tensor& index, const Shape& out_sizes) {
  namespace md = mixprec::detail;
  const int64_t* ix = index.data<int64_t>();
  const std::span<const int64_t> idx(ix, static_cast<std::size_t>(index.numel()));
  switch (k) {
    case DeviceIndex::Select: {
      const auto K = static_cast<int64_t>(idx.size());
      const md::DimSplit s = md::split_at(src.sizes(), dim);
      Shape shape = src.sizes();
      shape[dim] = K;
      Tensor out = empty(shape, src.dtype());
      const Tensor xc = md::contiguous_raw(src, src.dtype());
      dispatch_all(src.dtype(), "index_select", [&]<class T>() {
        const T* xp = xc.data<T>();
        T* op = out.data<T>();
        cpu::parallel_for(0, s.outer * K, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(s.inner, 1)), [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) {
            const int64_t o = r / K, j = r % K;
            const T* from = xp + (o * s.n + idx[j]) * s.inner;
            std::copy(from, from + s.inner, op + r * s.inner);
          }
        });
      });
      return out;
    }
    case DeviceIndex::SelectAdd: {
      Tensor acc = zeros(out_sizes, src.dtype());
      const md::DimSplit s = md::split_at(out_sizes, dim);
      dispatch_floating(src.dtype(), "index_select_backward", [&]<class A>() {
        index_add_rows<A>(acc.data<A>(), src.data<A>(), idx, s.outer, s.n, s.inner);
      });
      return acc;
    }
    case DeviceIndex::Gather: {
      Tensor out = empty(index.sizes(), src.dtype());
      if (out.numel() == 0) return out;
      const detail::GatherPlan p = detail::gather_plan(src.sizes(), index.sizes(), dim);
      const Tensor xc = md::contiguous_raw(src, src.dtype());
      dispatch_all(src.dtype(), "gather", [&]<class T>() {
        const T* xp = xc.data<T>();
        T* op = out.data<T>();
        detail::gather_rows(p, [&](int64_t ox, int64_t oi) {
          for (int64_t j = 0; j < p.K; ++j) op[oi + j * p.i_step] = xp[ox + ix[oi + j * p.i_step] * p.x_step];
        });
      });
      return out;
    }
    case DeviceIndex::ScatterAdd:
    case DeviceIndex::Scatter: {
      Tensor acc = zeros(out_sizes, src.dtype());
      if (src.numel() == 0) return acc;
      const detail::GatherPlan p = detail::gather_plan(out_sizes, index.sizes(), dim);
      const bool add = k == DeviceIndex::ScatterAdd;
      dispatch_floating(src.dtype(), add ? "gather_backward" : "max_backward", [&]<class A>() {
        A* ap = acc.data<A>();
        const A* gp = src.data<A>();
        if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
          if (add) {
            detail::gather_rows(p, [&](int64_t ox, int64_t oi) {
              for (int64_t j = 0; j < p.K; ++j) ap[ox + ix[oi + j * p.i_step] * p.x_step] += gp[oi + j * p.i_step];
            });
            return;
          }
        }
        MIXPREC_CHECK(!add, "index: scatter_add accumulates in float32 or float64, got ", src.dtype(), " of shape ", src.sizes());
        detail::gather_rows(p, [&](int64_t ox, int64_t oi) {
          for (int64_t j = 0; j < p.K; ++j) ap[ox + ix[oi + j * p.i_step] * p.x_step] = gp[oi + j * p.i_step];
        });
      });
      return acc;
    }
  }
  MIXPREC_CHECK(false, "index: unknown kind ", static_cast<int>(k), " for a tensor of shape ", src.sizes());
  return {};
}

// Running sum along dim (from the end when `reverse`): floating inputs accumulate in double and
// keep their dtype; integers and bool give int64, as torch.cumsum. Blocks of columns carry their
// running sums across the walk along dim.
inline Tensor cumsum_op(const Tensor& x, int64_t dim, bool reverse) {
  const int64_t d = x.wrap_dim(dim, "cumsum");
  const DType od = x.is_floating_point() ? x.dtype() : DType::Int64;
  Tensor out = empty(x.sizes(), od);
  if (x.numel() == 0) return out;
  const mixprec::detail::DimSplit s = mixprec::detail::split_at(x.sizes(), d);
  const Tensor xc = mixprec::detail::contiguous_raw(x, x.dtype());
  dispatch_all(x.dtype(), "cumsum", [&]<class T>() {
    using O = std::conditional_t<is_floating_v<T>, T, int64_t>;
    using A = std::conditional_t<is_floating_v<T>, double, int64_t>;
    constexpr int64_t kBlock = 64;  // columns carried at once: running sums stay in registers/L1
    const int64_t nb = (s.inner + kBlock - 1) / kBlock;
    const T* xp = xc.data<T>();
    O* op = out.data<O>();
    cpu::parallel_for(0, s.outer * nb, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(s.n * kBlock, 1)), [&](int64_t b, int64_t e) {
      A acc[kBlock];
      for (int64_t t = b; t < e; ++t) {
        const int64_t o = t / nb, c0 = (t % nb) * kBlock, c1 = std::min(s.inner, c0 + kBlock);
        std::fill(acc, acc + kBlock, A(0));
        for (int64_t step = 0; step < s.n; ++step) {
          const int64_t k = reverse ? s.n - 1 - step : step;
          const int64_t base = (o * s.n + k) * s.inner;
          for (int64_t c = c0; c < c1; ++c) {
            acc[c - c0] += static_cast<A>(static_cast<acc_t<T>>(xp[base + c]));
            op[base + c] = static_cast<O>(acc[c - c0]);
          }
        }
      }
    });
  });
  return out;
}

inline void fill_shape_kernels(DeviceKernels& t) {
  t.cat = cat_tensors;
  t.index = index_op;
  t.cumsum = cumsum_op;
}

}  // namespace mixprec::cpu
