#pragma once
// The CPU's 2-D pooling kernels, the CPU backend's entries pool2d and pool2d_backward
// (backends/device.hpp): max, avg and adaptive avg share the plane loops below, so they are one
// entry with a DevicePool kind. ops/pool.hpp keeps the geometry, the checks and autograd.
//
// Every (sample, channel) plane is independent: planes run in parallel. 16-bit planes are widened
// once (vectorised) instead of per window element, compared / summed in float and rounded once on
// store; gradients of overlapping windows accumulate in float too.
#include <algorithm>
#include <array>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/pool.hpp"

namespace mixprec::cpu {

namespace pool_detail {
using mixprec::detail::PoolGeom;

inline int64_t pool_grain(int64_t work_per_plane) { return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(work_per_plane, 1)); }

// f(state, p, plane) for every input plane, read in the compute type. state = make_state(), once
// per thread.
template <class T, class MakeState, class F>
void for_each_plane(int64_t P, int64_t HW, int64_t work, const T* x, MakeState make_state, F f) {
  using A = acc_t<T>;
  parallel_for(0, P, pool_grain(work), [&](int64_t p0, int64_t p1) {
    auto state = make_state();
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(HW));
    for (int64_t p = p0; p < p1; ++p) {
      const A* xp;
      if constexpr (std::is_same_v<T, A>) xp = x + p * HW;
      else {
        mixprec::detail::load_acc(x + p * HW, buf.data(), HW);
        xp = buf.data();
      }
      f(state, p, xp);
    }
  });
}

// gx[p] = scatter(state, p, plane p of gy, acc): scatter adds into a zeroed plane in the compute
// type, which is rounded once into gx. state = make_state(), once per thread.
template <class T, class MakeState, class Scatter>
void pool_backward_planes(int64_t P, int64_t HW, int64_t OHW, int64_t work, const T* gy, T* gx, MakeState make_state, Scatter scatter) {
  using A = acc_t<T>;
  parallel_for(0, P, pool_grain(work), [&](int64_t p0, int64_t p1) {
    auto state = make_state();
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(HW));
    for (int64_t p = p0; p < p1; ++p) {
      A* acc = std::is_same_v<T, A> ? reinterpret_cast<A*>(gx + p * HW) : buf.data();
      std::fill(acc, acc + HW, A(0));
      scatter(state, p, gy + p * OHW, acc);
      if constexpr (!std::is_same_v<T, A>) mixprec::detail::store_acc(acc, gx + p * HW, HW);
    }
  });
}

struct NoState {};
inline NoState no_state() { return {}; }

// Max of each window of one plane and the flat position it came from. Window position outer,
// output column inner, branch-free: real data changes the running max unpredictably, and the
// mispredicted branches cost 3-4x. Each output still sees its window in PyTorch's order (first
// maximum wins). Rows whose windows hold a NaN are rare and redone with PyTorch's exact rule
// (any NaN wins, the last one's index).
template <class A, class T>
void max_pool_plane(const PoolGeom g, const A* xp, T* yp, int64_t* ip, A* __restrict bv, int64_t* __restrict bi) {
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    std::fill(bv, bv + g.OW, -std::numeric_limits<A>::infinity());
    std::fill(bi, bi + g.OW, int64_t{-1});
    bool nan = false;
    for (int64_t i = 0; i < g.KH; ++i) {
      const int64_t ih = oh * g.SH - g.PH + i * g.DH;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.KW; ++j) {
        const int64_t off = j * g.DW - g.PW, base = ih * g.W + off, SW = g.SW;
        const auto [lo, hi] = mixprec::detail::conv_valid_range(off, SW, g.W, g.OW);
        for (int64_t ow = lo; ow < hi; ++ow) {
          const A v = xp[base + ow * SW], cur = bv[ow];
          const bool gt = v > cur;
          const int64_t take = -static_cast<int64_t>(gt);  // a mask: compilers turn ?: back into a branch here
          bi[ow] ^= (bi[ow] ^ (base + ow * SW)) & take;
          bv[ow] = gt ? v : cur;
          nan |= v != v;
        }
      }
    }
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      int64_t hs = oh * g.SH - g.PH, ws = ow * g.SW - g.PW;
      while (hs < 0) hs += g.DH;
      while (ws < 0) ws += g.DW;
      A best = bv[ow];
      int64_t at = bi[ow] >= 0 ? bi[ow] : hs * g.W + ws;  // all -inf: the first valid position, as PyTorch
      if (nan) {
        const int64_t he = std::min(oh * g.SH - g.PH + (g.KH - 1) * g.DH + 1, g.H);
        const int64_t we = std::min(ow * g.SW - g.PW + (g.KW - 1) * g.DW + 1, g.W);
        best = -std::numeric_limits<A>::infinity();
        at = hs * g.W + ws;
        for (int64_t ih = hs; ih < he; ih += g.DH)
          for (int64_t iw = ws; iw < we; iw += g.DW) {
            const A v = xp[ih * g.W + iw];
            if (v > best || v != v) {
              best = v;
              at = ih * g.W + iw;
            }
          }
      }
      yp[oh * g.OW + ow] = static_cast<T>(best);
      ip[oh * g.OW + ow] = at;
    }
  }
}

// Window [start, end) of output i along one dim, clipped to the input (avg_pool2d's rule);
// `full` is the window size counting padding.
struct AvgWindow {
  int64_t start, end, full;
};
inline AvgWindow avg_window(int64_t i, int64_t stride, int64_t pad, int64_t k, int64_t in) {
  int64_t s = i * stride - pad;
  int64_t e = std::min(s + k, in + pad);
  const int64_t full = e - s;
  return {std::max<int64_t>(s, 0), std::min(e, in), full};
}

// avg_pool2d's divisor is separable: divisor(oh, ow) = factor(oh) * factor(ow), 0 for a window
// lying wholly in the (ceil-mode) padding, whose output is 0.
inline int64_t avg_factor(const AvgWindow& w, bool count_include_pad) {
  if (w.start >= w.end) return 0;
  return count_include_pad ? w.full : w.end - w.start;
}
// The row and column factors of g's outputs.
inline std::pair<std::vector<int64_t>, std::vector<int64_t>> avg_factors(const PoolGeom& g) {
  std::vector<int64_t> fh(static_cast<std::size_t>(g.OH)), fw(static_cast<std::size_t>(g.OW));
  for (int64_t oh = 0; oh < g.OH; ++oh) fh[oh] = avg_factor(avg_window(oh, g.SH, g.PH, g.KH, g.H), g.count_include_pad);
  for (int64_t ow = 0; ow < g.OW; ++ow) fw[ow] = avg_factor(avg_window(ow, g.SW, g.PW, g.KW, g.W), g.count_include_pad);
  return {std::move(fh), std::move(fw)};
}
// row(base, lo, hi) for each input row of output row oh's windows: output column ow reads
// base + ow * SW for ow in [lo, hi) (output column inner, vectorised).
template <class Row>
void avg_window_rows(const PoolGeom& g, int64_t oh, Row&& row) {
  const AvgWindow h = avg_window(oh, g.SH, g.PH, g.KH, g.H);
  for (int64_t ih = h.start; ih < h.end; ++ih)
    for (int64_t j = 0; j < g.KW; ++j) {
      const int64_t off = j - g.PW;
      const auto [lo, hi] = mixprec::detail::conv_valid_range(off, g.SW, g.W, g.OW);
      row(ih * g.W + off, lo, hi);
    }
}

// PyTorch's adaptive pooling bounds: [floor(i*in/out), ceil((i+1)*in/out)).
inline int64_t adaptive_start(int64_t i, int64_t out, int64_t in) { return (i / out) * in + ((i % out) * in) / out; }
inline int64_t adaptive_end(int64_t i, int64_t out, int64_t in) { return 1 + ((i + 1) * in - 1) / out; }
// Work per plane of an adaptive pool (its parallel grain).
inline int64_t adaptive_work(const PoolGeom& g) { return (g.H / g.OH + 2) * (g.W / g.OW + 2) * g.OH * g.OW; }

template <class T>
void max_pool_forward(const PoolGeom& g, const T* xs, T* ys, int64_t* is) {
  using A = acc_t<T>;
  const int64_t OHW = g.OH * g.OW;
  const auto n = static_cast<std::size_t>(g.OW);
  auto scratch = [n] { return std::make_pair(std::vector<A>(n), std::vector<int64_t>(n)); };
  for_each_plane<T>(g.P, g.H * g.W, OHW * g.KH * g.KW, xs, scratch, [&](auto& st, int64_t p, const A* xp) {
    max_pool_plane<A, T>(g, xp, ys + p * OHW, is + p * OHW, st.first.data(), st.second.data());
  });
}

template <class T>
void avg_pool_forward(const PoolGeom& g, const T* xs, T* ys) {
  using A = acc_t<T>;
  const int64_t OHW = g.OH * g.OW;
  const auto [fh, fw] = avg_factors(g);
  auto scratch = [&] { return std::vector<A>(static_cast<std::size_t>(g.OW)); };
  for_each_plane<T>(g.P, g.H * g.W, OHW * g.KH * g.KW, xs, scratch, [&](std::vector<A>& st, int64_t p, const A* xp) {
    A* __restrict acc = st.data();
    const int64_t SW = g.SW;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      std::fill(acc, acc + g.OW, A(0));
      avg_window_rows(g, oh, [&](int64_t base, int64_t lo, int64_t hi) {
        for (int64_t ow = lo; ow < hi; ++ow) acc[ow] += xp[base + ow * SW];
      });
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t div = fh[oh] * fw[ow];
        ys[p * OHW + oh * g.OW + ow] = static_cast<T>(div == 0 ? A(0) : acc[ow] / static_cast<A>(div));
      }
    }
  });
}

template <class T>
void adaptive_avg_pool_forward(const PoolGeom& g, const T* xs, T* ys) {
  using A = acc_t<T>;
  const int64_t OHW = g.OH * g.OW;
  for_each_plane<T>(g.P, g.H * g.W, adaptive_work(g), xs, no_state, [&](auto&, int64_t p, const A* xp) {
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const int64_t hs = adaptive_start(oh, g.OH, g.H), he = adaptive_end(oh, g.OH, g.H);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t ws = adaptive_start(ow, g.OW, g.W), we = adaptive_end(ow, g.OW, g.W);
        A s = 0;
        for (int64_t ih = hs; ih < he; ++ih)
          for (int64_t iw = ws; iw < we; ++iw) s += xp[ih * g.W + iw];
        ys[p * OHW + oh * g.OW + ow] = static_cast<T>(s / static_cast<A>((he - hs) * (we - ws)));
      }
    }
  });
}

template <class T>
void max_pool_backward(const PoolGeom& g, const T* gy, const int64_t* is, T* gx) {
  const int64_t OHW = g.OH * g.OW;
  pool_backward_planes<T>(g.P, g.H * g.W, OHW, OHW, gy, gx, no_state, [&](auto&, int64_t p, const T* gp, acc_t<T>* acc) {
    const int64_t* ip = is + p * OHW;
    for (int64_t k = 0; k < OHW; ++k) acc[ip[k]] += static_cast<acc_t<T>>(gp[k]);
  });
}

template <class T>
void avg_pool_backward(const PoolGeom& g, const T* gy, T* gx) {
  using A = acc_t<T>;
  const int64_t OHW = g.OH * g.OW;
  const auto [fh, fw] = avg_factors(g);
  auto scratch = [&] { return std::vector<A>(static_cast<std::size_t>(g.OW)); };
  pool_backward_planes<T>(g.P, g.H * g.W, OHW, OHW * g.KH * g.KW, gy, gx, scratch, [&](std::vector<A>& st, int64_t, const T* gp, A* acc) {
    A* __restrict share = st.data();
    const int64_t SW = g.SW;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t div = fh[oh] * fw[ow];
        share[ow] = div == 0 ? A(0) : static_cast<A>(gp[oh * g.OW + ow]) / static_cast<A>(div);
      }
      avg_window_rows(g, oh, [&](int64_t base, int64_t lo, int64_t hi) {
        for (int64_t ow = lo; ow < hi; ++ow) acc[base + ow * SW] += share[ow];
      });
    }
  });
}

template <class T>
void adaptive_avg_pool_backward(const PoolGeom& g, const T* gy, T* gx) {
  using A = acc_t<T>;
  pool_backward_planes<T>(g.P, g.H * g.W, g.OH * g.OW, adaptive_work(g), gy, gx, no_state, [&](auto&, int64_t, const T* gp, A* acc) {
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const int64_t hs = adaptive_start(oh, g.OH, g.H), he = adaptive_end(oh, g.OH, g.H);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t ws = adaptive_start(ow, g.OW, g.W), we = adaptive_end(ow, g.OW, g.W);
        const A v = static_cast<A>(gp[oh * g.OW + ow]) / static_cast<A>((he - hs) * (we - ws));
        for (int64_t ih = hs; ih < he; ++ih)
          for (int64_t iw = ws; iw < we; ++iw) acc[ih * g.W + iw] += v;
      }
    }
  });
}

inline const char* pool_name(DevicePool kind) {
  return kind == DevicePool::Max ? "max_pool2d" : kind == DevicePool::Avg ? "avg_pool2d" : "adaptive_avg_pool2d";
}
}  // namespace pool_detail

// DeviceKernels::pool2d: x contiguous [..., H, W], floating.
inline std::array<Tensor, 2> pool2d(DevicePool kind, const mixprec::detail::PoolGeom& g, const Tensor& x) {
  namespace pd = pool_detail;
  const char* op = pd::pool_name(kind);
  Tensor y = empty(mixprec::detail::pool_out_shape(x, g.OH, g.OW), x.dtype());
  Tensor idx = kind == DevicePool::Max ? empty(y.sizes(), DType::Int64) : Tensor();
  dispatch_floating(x.dtype(), op, [&]<class T>() {
    const T* xs = x.data<T>();
    T* ys = y.data<T>();
    switch (kind) {
      case DevicePool::Max: return pd::max_pool_forward<T>(g, xs, ys, idx.data<int64_t>());
      case DevicePool::Avg: return pd::avg_pool_forward<T>(g, xs, ys);
      case DevicePool::AdaptiveAvg: return pd::adaptive_avg_pool_forward<T>(g, xs, ys);
    }
  });
  return {y, idx};
}

// DeviceKernels::pool2d_backward: gy contiguous [..., OH, OW] in the input's dtype.
inline Tensor pool2d_backward(DevicePool kind, const mixprec::detail::PoolGeom& g, const Tensor& gy, const Tensor& indices) {
  namespace pd = pool_detail;
  const std::string op = std::string(pd::pool_name(kind)) + "_backward";
  Tensor gx = empty(mixprec::detail::pool_out_shape(gy, g.H, g.W), gy.dtype());
  dispatch_floating(gy.dtype(), op.c_str(), [&]<class T>() {
    const T* gp = gy.data<T>();
    T* gxp = gx.data<T>();
    switch (kind) {
      case DevicePool::Max: return pd::max_pool_backward<T>(g, gp, indices.data<int64_t>(), gxp);
      case DevicePool::Avg: return pd::avg_pool_backward<T>(g, gp, gxp);
      case DevicePool::AdaptiveAvg: return pd::adaptive_avg_pool_backward<T>(g, gp, gxp);
    }
  });
  return gx;
}

inline void fill_pool_kernels(DeviceKernels& t) {
  t.pool2d = pool2d;
  t.pool2d_backward = pool2d_backward;
}

}  // namespace mixprec::cpu
