#pragma once
// 2-D pooling, NCHW (or unbatched CHW), with torch.nn.functional's semantics and output sizes.
// Every (sample, channel) plane is independent: kernels run planes in parallel. 16-bit values
// are compared / summed in float and rounded once on store; gradients of overlapping windows
// accumulate in float too.
#include <array>
#include <limits>

#include "mixprec/ops/conv.hpp"

namespace mixprec {

namespace detail {

struct PoolGeom {
  int64_t P = 0, H = 0, W = 0, OH = 0, OW = 0;  // P planes of H x W -> OH x OW
  int64_t KH = 1, KW = 1, SH = 1, SW = 1, PH = 0, PW = 0, DH = 1, DW = 1;
  bool ceil_mode = false;
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

inline int64_t pool_grain(int64_t work_per_plane) { return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(work_per_plane, 1)); }

// f(state, p, plane) for every input plane, read in the compute type (16-bit planes are widened
// once, vectorised, instead of per window element). state = make_state(), once per thread.
template <class T, class MakeState, class F>
void for_each_plane(int64_t P, int64_t HW, int64_t work, const T* x, MakeState make_state, F f) {
  using A = acc_t<T>;
  cpu::parallel_for(0, P, pool_grain(work), [&](int64_t p0, int64_t p1) {
    auto state = make_state();
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(HW));
    for (int64_t p = p0; p < p1; ++p) {
      const A* xp;
      if constexpr (std::is_same_v<T, A>) xp = x + p * HW;
      else {
        load_acc(x + p * HW, buf.data(), HW);
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
  cpu::parallel_for(0, P, pool_grain(work), [&](int64_t p0, int64_t p1) {
    auto state = make_state();
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : static_cast<std::size_t>(HW));
    for (int64_t p = p0; p < p1; ++p) {
      A* acc = std::is_same_v<T, A> ? reinterpret_cast<A*>(gx + p * HW) : buf.data();
      std::fill(acc, acc + HW, A(0));
      scatter(state, p, gy + p * OHW, acc);
      if constexpr (!std::is_same_v<T, A>) store_acc(acc, gx + p * HW, HW);
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
        const auto [lo, hi] = conv_valid_range(off, SW, g.W, g.OW);
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

// PyTorch's adaptive pooling bounds: [floor(i*in/out), ceil((i+1)*in/out)).
inline int64_t adaptive_start(int64_t i, int64_t out, int64_t in) { return (i / out) * in + ((i % out) * in) / out; }
inline int64_t adaptive_end(int64_t i, int64_t out, int64_t in) { return 1 + ((i + 1) * in - 1) / out; }

}  // namespace detail

// torch.nn.functional.max_pool2d(..., return_indices=True): values and the flat index h * W + w
// of each maximum within its input plane. stride {0, 0} means stride = kernel. NaN wins.
inline std::pair<Tensor, Tensor> max_pool2d_with_indices(const Tensor& input, std::array<int64_t, 2> kernel,
                                                         std::array<int64_t, 2> stride = {0, 0}, std::array<int64_t, 2> padding = {0, 0},
                                                         std::array<int64_t, 2> dilation = {1, 1}, bool ceil_mode = false) {
  return dispatch(OpId::max_pool2d, [=](const Tensor& x) {
    const detail::PoolGeom g = detail::make_pool_geom("max_pool2d", x, kernel, stride, padding, dilation, ceil_mode);
    const Tensor xc = detail::contiguous_raw(x);
    Tensor y = empty(detail::pool_out_shape(x, g.OH, g.OW), x.dtype());
    Tensor idx = empty(y.sizes(), DType::Int64);
    const int64_t OHW = g.OH * g.OW, HW = g.H * g.W;
    dispatch_floating(x.dtype(), "max_pool2d", [&]<class T>() {
      using A = acc_t<T>;
      T* ys = y.data<T>();
      int64_t* is = idx.data<int64_t>();
      const auto n = static_cast<std::size_t>(g.OW);
      auto scratch = [n] { return std::make_pair(std::vector<A>(n), std::vector<int64_t>(n)); };
      detail::for_each_plane<T>(g.P, HW, OHW * g.KH * g.KW, xc.data<T>(), scratch, [&](auto& st, int64_t p, const A* xp) {
        detail::max_pool_plane<A, T>(g, xp, ys + p * OHW, is + p * OHW, st.first.data(), st.second.data());
      });
    });
    if (autograd::should_record({x}))
      autograd::record("max_pool2d", {x}, {y}, [g, idx, in = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor gy = detail::contiguous_raw(detail::as_dtype_raw(grads[0], dt));
        Tensor gx = empty(in, dt);
        const int64_t OHW = g.OH * g.OW;
        const int64_t* is = idx.data<int64_t>();
        dispatch_floating(dt, "max_pool2d_backward", [&]<class T>() {
          detail::pool_backward_planes<T>(g.P, g.H * g.W, OHW, OHW, gy.data<T>(), gx.data<T>(), detail::no_state, [&](auto&, int64_t p, const T* gp, acc_t<T>* acc) {
            const int64_t* ip = is + p * OHW;
            for (int64_t k = 0; k < OHW; ++k) acc[ip[k]] += static_cast<acc_t<T>>(gp[k]);
          });
        });
        return {gx};
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
    const detail::PoolGeom g = detail::make_pool_geom("avg_pool2d", x, kernel, stride, padding, {1, 1}, ceil_mode);
    const Tensor xc = detail::contiguous_raw(x);
    Tensor y = empty(detail::pool_out_shape(x, g.OH, g.OW), x.dtype());
    const int64_t OHW = g.OH * g.OW, HW = g.H * g.W;
    std::vector<int64_t> fh(static_cast<std::size_t>(g.OH)), fw(static_cast<std::size_t>(g.OW));
    for (int64_t oh = 0; oh < g.OH; ++oh) fh[oh] = detail::avg_factor(detail::avg_window(oh, g.SH, g.PH, g.KH, g.H), count_include_pad);
    for (int64_t ow = 0; ow < g.OW; ++ow) fw[ow] = detail::avg_factor(detail::avg_window(ow, g.SW, g.PW, g.KW, g.W), count_include_pad);
    // Output rows: sum the window row by row into acc[ow] (output column inner, vectorised).
    auto window_rows = [g](int64_t oh, auto&& row) {
      const detail::AvgWindow h = detail::avg_window(oh, g.SH, g.PH, g.KH, g.H);
      for (int64_t ih = h.start; ih < h.end; ++ih)
        for (int64_t j = 0; j < g.KW; ++j) {
          const int64_t off = j - g.PW;
          const auto [lo, hi] = detail::conv_valid_range(off, g.SW, g.W, g.OW);
          row(ih * g.W + off, lo, hi);
        }
    };
    dispatch_floating(x.dtype(), "avg_pool2d", [&]<class T>() {
      using A = acc_t<T>;
      T* ys = y.data<T>();
      auto scratch = [&] { return std::vector<A>(static_cast<std::size_t>(g.OW)); };
      detail::for_each_plane<T>(g.P, HW, OHW * g.KH * g.KW, xc.data<T>(), scratch, [&](std::vector<A>& st, int64_t p, const A* xp) {
        A* __restrict acc = st.data();
        const int64_t SW = g.SW;
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          std::fill(acc, acc + g.OW, A(0));
          window_rows(oh, [&](int64_t base, int64_t lo, int64_t hi) {
            for (int64_t ow = lo; ow < hi; ++ow) acc[ow] += xp[base + ow * SW];
          });
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const int64_t div = fh[oh] * fw[ow];
            ys[p * OHW + oh * g.OW + ow] = static_cast<T>(div == 0 ? A(0) : acc[ow] / static_cast<A>(div));
          }
        }
      });
    });
    if (autograd::should_record({x}))
      autograd::record("avg_pool2d", {x}, {y}, [g, fh, fw, window_rows, in = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor gy = detail::contiguous_raw(detail::as_dtype_raw(grads[0], dt));
        Tensor gx = empty(in, dt);
        const int64_t OHW = g.OH * g.OW;
        dispatch_floating(dt, "avg_pool2d_backward", [&]<class T>() {
          using A = acc_t<T>;
          auto scratch = [&] { return std::vector<A>(static_cast<std::size_t>(g.OW)); };
          detail::pool_backward_planes<T>(g.P, g.H * g.W, OHW, OHW * g.KH * g.KW, gy.data<T>(), gx.data<T>(), scratch,
                                          [&](std::vector<A>& st, int64_t, const T* gp, A* acc) {
            A* __restrict share = st.data();
            const int64_t SW = g.SW;
            for (int64_t oh = 0; oh < g.OH; ++oh) {
              for (int64_t ow = 0; ow < g.OW; ++ow) {
                const int64_t div = fh[oh] * fw[ow];
                share[ow] = div == 0 ? A(0) : static_cast<A>(gp[oh * g.OW + ow]) / static_cast<A>(div);
              }
              window_rows(oh, [&](int64_t base, int64_t lo, int64_t hi) {
                for (int64_t ow = lo; ow < hi; ++ow) acc[base + ow * SW] += share[ow];
              });
            }
          });
        });
        return {gx};
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
    const Tensor xc = detail::contiguous_raw(x);
    Tensor y = empty(detail::pool_out_shape(x, g.OH, g.OW), x.dtype());
    const int64_t OHW = g.OH * g.OW, HW = g.H * g.W;
    const int64_t work = (g.H / g.OH + 2) * (g.W / g.OW + 2) * OHW;
    dispatch_floating(x.dtype(), "adaptive_avg_pool2d", [&]<class T>() {
      using A = acc_t<T>;
      T* ys = y.data<T>();
      detail::for_each_plane<T>(g.P, HW, work, xc.data<T>(), detail::no_state, [&](auto&, int64_t p, const A* xp) {
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const int64_t hs = detail::adaptive_start(oh, g.OH, g.H), he = detail::adaptive_end(oh, g.OH, g.H);
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const int64_t ws = detail::adaptive_start(ow, g.OW, g.W), we = detail::adaptive_end(ow, g.OW, g.W);
            A s = 0;
            for (int64_t ih = hs; ih < he; ++ih)
              for (int64_t iw = ws; iw < we; ++iw) s += xp[ih * g.W + iw];
            ys[p * OHW + oh * g.OW + ow] = static_cast<T>(s / static_cast<A>((he - hs) * (we - ws)));
          }
        }
      });
    });
    if (autograd::should_record({x}))
      autograd::record("adaptive_avg_pool2d", {x}, {y}, [g, work, in = x.sizes(), dt = x.dtype()](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor gy = detail::contiguous_raw(detail::as_dtype_raw(grads[0], dt));
        Tensor gx = empty(in, dt);
        const int64_t OHW = g.OH * g.OW;
        dispatch_floating(dt, "adaptive_avg_pool2d_backward", [&]<class T>() {
          using A = acc_t<T>;
          detail::pool_backward_planes<T>(g.P, g.H * g.W, OHW, work, gy.data<T>(), gx.data<T>(), detail::no_state, [&](auto&, int64_t, const T* gp, A* acc) {
            for (int64_t oh = 0; oh < g.OH; ++oh) {
              const int64_t hs = detail::adaptive_start(oh, g.OH, g.H), he = detail::adaptive_end(oh, g.OH, g.H);
              for (int64_t ow = 0; ow < g.OW; ++ow) {
                const int64_t ws = detail::adaptive_start(ow, g.OW, g.W), we = detail::adaptive_end(ow, g.OW, g.W);
                const A v = static_cast<A>(gp[oh * g.OW + ow]) / static_cast<A>((he - hs) * (we - ws));
                for (int64_t ih = hs; ih < he; ++ih)
                  for (int64_t iw = ws; iw < we; ++iw) acc[ih * g.W + iw] += v;
              }
            }
          });
        });
        return {gx};
      });
    return y;
  }, input);
}

}  // namespace mixprec
