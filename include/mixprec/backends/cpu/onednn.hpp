#pragma once
// oneDNN's convolutions for the CPU backend: an optional component (the mixprec::onednn target
// defines MIXPREC_WITH_ONEDNN and links libdnnl 2.x); without it, or where oneDNN declines a
// case, the own im2col + GEMM kernels of backends/cpu/conv.hpp run.
//
// Why: on channels-last (NHWC) tensors oneDNN's JIT convolutions run at the bf16 GEMM's rate on
// ResNet-20's small channel counts (measured on the development VM, 2 threads, batch 128:
// forward and input-backward 620-830 GFLOP/s, weight-backward 190-580, where im2col + GEMM gets
// 80-230) -- it is to the CPU what cuDNN is to the GPU. On NCHW they fall back to a GEMM of
// their own no faster than ours, so they are used for channels-last activations only.
//
// Primitives are created once per geometry and dtype (oneDNN compiles each at creation: about a
// millisecond) and kept for the program's life; each call brings its own scratchpad, so one
// primitive may run on several threads at once. Weights are reordered per call into the layout
// the primitive chose (they are small: at most O*C*KH*KW elements).
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

#if defined(MIXPREC_WITH_ONEDNN)
#include <oneapi/dnnl/dnnl.hpp>
#if DNNL_VERSION_MAJOR != 2
#error "mixprec's oneDNN component is written against the oneDNN 2.x API (Debian 12: libdnnl-dev 2.6)"
#endif
#endif

#include "mixprec/ops/conv.hpp"

namespace mixprec::cpu::onednn {

// Whether the convolutions may take oneDNN's kernels: compiled in, and not turned off by
// MIXPREC_ONEDNN=0 in the environment or by set_enabled(false) (tests compare both paths).
inline bool& enabled_flag() {
  static bool on = [] {
    const char* e = std::getenv("MIXPREC_ONEDNN");
    return !(e && e[0] == '0');
  }();
  return on;
}
inline bool compiled() {
#if defined(MIXPREC_WITH_ONEDNN)
  return true;
#else
  return false;
#endif
}
inline bool enabled() { return compiled() && enabled_flag(); }
inline void set_enabled(bool on) { enabled_flag() = on; }

#if defined(MIXPREC_WITH_ONEDNN)
namespace detail {
using mixprec::detail::ConvGeom;
using md = dnnl::memory::desc;
using dims = dnnl::memory::dims;

inline dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

inline std::optional<dnnl::memory::data_type> dnnl_type(DType d) {
  if (d == DType::Float32) return dnnl::memory::data_type::f32;
  if (d == DType::BFloat16) return dnnl::memory::data_type::bf16;
  return std::nullopt;  // float16 has no oneDNN kernel on CPUs without avx512_fp16; float64 none at all
}

// Activations [N, C, H, W] stored channels-last; weights [O, C/G, KH, KW] (grouped: [G, O/G, ...]).
inline md act_md(int64_t N, int64_t C, int64_t H, int64_t W, dnnl::memory::data_type t) {
  return md({N, C, H, W}, t, dnnl::memory::format_tag::nhwc);
}
inline md user_weights_md(const ConvGeom& g, dnnl::memory::data_type t) {
  if (g.G == 1) return md({g.O, g.C, g.KH, g.KW}, t, dnnl::memory::format_tag::oihw);
  return md({g.G, g.Og(), g.Cg(), g.KH, g.KW}, t, dnnl::memory::format_tag::goihw);
}
inline md any_weights_md(const ConvGeom& g, dnnl::memory::data_type t) {
  if (g.G == 1) return md({g.O, g.C, g.KH, g.KW}, t, dnnl::memory::format_tag::any);
  return md({g.G, g.Og(), g.Cg(), g.KH, g.KW}, t, dnnl::memory::format_tag::any);
}

// The forward descriptor (also the backward primitives' hint). padding_r makes oneDNN's output
// size PyTorch's floor((H + 2P - D(K-1) - 1) / S) + 1.
inline dnnl::convolution_forward::desc forward_desc(const ConvGeom& g, dnnl::memory::data_type t, bool bias) {
  const dims strides{g.SH, g.SW}, dil{g.DH - 1, g.DW - 1}, pl{g.PH, g.PW},
      pr{(g.OH - 1) * g.SH + (g.KH - 1) * g.DH + 1 - g.H - g.PH, (g.OW - 1) * g.SW + (g.KW - 1) * g.DW + 1 - g.W - g.PW};
  const auto pk = dnnl::prop_kind::forward_training;
  const auto alg = dnnl::algorithm::convolution_direct;
  if (bias)
    return dnnl::convolution_forward::desc(pk, alg, act_md(g.N, g.C, g.H, g.W, t), any_weights_md(g, t),
                                           md({g.O}, t, dnnl::memory::format_tag::x), act_md(g.N, g.O, g.OH, g.OW, t), strides, dil, pl, pr);
  return dnnl::convolution_forward::desc(pk, alg, act_md(g.N, g.C, g.H, g.W, t), any_weights_md(g, t), act_md(g.N, g.O, g.OH, g.OW, t),
                                         strides, dil, pl, pr);
}

inline dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr a;
  a.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return a;
}

enum class Kind : int { Forward, BackwardData, BackwardWeights };

// One created primitive with the descriptors its callers need.
struct Plan {
  dnnl::primitive prim;
  md weights;     // the layout the primitive reads (or, for BackwardWeights, writes) the weights in
  md scratchpad;
};

using Key = std::tuple<int, int, bool, std::array<int64_t, 15>>;

inline Key key_of(Kind k, const ConvGeom& g, DType d, bool bias) {
  return {static_cast<int>(k), static_cast<int>(d), bias,
          std::array<int64_t, 15>{g.N, g.C, g.H, g.W, g.O, g.OH, g.OW, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH * 65536 + g.DW, g.G}};
}

// The plan for (k, g, d), created on first use; nullptr where oneDNN has no implementation.
inline const Plan* plan(Kind k, const ConvGeom& g, DType d, bool bias) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plan>> cache;
  const Key key = key_of(k, g, d, bias);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(key); it != cache.end()) return it->second.get();
  std::unique_ptr<Plan> p;
  const auto t = *dnnl_type(d);
  try {
    const auto fd = forward_desc(g, t, bias && k == Kind::Forward);
    const auto attr = user_scratchpad();
    const dnnl::convolution_forward::primitive_desc fpd(fd, attr, engine());
    const dims strides{g.SH, g.SW}, dil{g.DH - 1, g.DW - 1}, pl{g.PH, g.PW},
        pr{(g.OH - 1) * g.SH + (g.KH - 1) * g.DH + 1 - g.H - g.PH, (g.OW - 1) * g.SW + (g.KW - 1) * g.DW + 1 - g.W - g.PW};
    p = std::make_unique<Plan>();
    if (k == Kind::Forward) {
      p->prim = dnnl::convolution_forward(fpd);
      p->weights = fpd.weights_desc();
      p->scratchpad = fpd.scratchpad_desc();
    } else if (k == Kind::BackwardData) {
      const dnnl::convolution_backward_data::desc bd(dnnl::algorithm::convolution_direct, act_md(g.N, g.C, g.H, g.W, t),
                                                     any_weights_md(g, t), act_md(g.N, g.O, g.OH, g.OW, t), strides, dil, pl, pr);
      const dnnl::convolution_backward_data::primitive_desc pd(bd, attr, engine(), fpd);
      p->prim = dnnl::convolution_backward_data(pd);
      p->weights = pd.weights_desc();
      p->scratchpad = pd.scratchpad_desc();
    } else {
      // The weight gradient in float32 whatever the activations' dtype: the op rounds it once.
      const dnnl::convolution_backward_weights::desc bw(dnnl::algorithm::convolution_direct, act_md(g.N, g.C, g.H, g.W, t),
                                                        any_weights_md(g, dnnl::memory::data_type::f32),
                                                        act_md(g.N, g.O, g.OH, g.OW, t), strides, dil, pl, pr);
      const dnnl::convolution_backward_weights::primitive_desc pd(bw, attr, engine(), fpd);
      p->prim = dnnl::convolution_backward_weights(pd);
      p->weights = pd.diff_weights_desc();
      p->scratchpad = pd.scratchpad_desc();
    }
  } catch (const dnnl::error&) {
    p.reset();  // unimplemented for this CPU, dtype or geometry: the own kernels run
  }
  return cache.emplace(key, std::move(p)).first->second.get();
}

inline dnnl::memory wrap(const md& d, const Tensor& t) { return dnnl::memory(d, engine(), t.data_ptr()); }

// A buffer for a descriptor oneDNN chose (weights, scratchpad), as a byte tensor.
inline Tensor buffer_for(const md& d) { return empty({static_cast<int64_t>(d.get_size())}, DType::UInt8); }

// w (contiguous [O, C/G, KH, KW]) in the layout `want`: reordered into a new buffer, or w itself.
inline std::pair<dnnl::memory, Tensor> weights_in(const ConvGeom& g, const Tensor& w, const md& want, dnnl::stream& s) {
  const auto t = *dnnl_type(w.dtype());
  dnnl::memory user = wrap(user_weights_md(g, t), w);
  if (want == user.get_desc()) return {user, Tensor()};
  Tensor buf = buffer_for(want);
  dnnl::memory m(want, engine(), buf.data_ptr());
  dnnl::reorder(user, m).execute(s, user, m);
  return {m, buf};
}
}  // namespace detail

// Whether oneDNN runs this convolution: enabled, a dtype it has, and activations channels-last.
inline bool takes(const mixprec::detail::ConvGeom& g, DType d) {
  return enabled() && detail::dnnl_type(d).has_value() && g.N > 0 && g.L() > 0 && g.HW() > 0;
}

// y [N, O, OH, OW] channels-last = conv(x, w) + b; x channels-last, w and b contiguous in x's
// dtype. Empty where oneDNN has no kernel for the case.
inline Tensor conv_forward(const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
  const detail::Plan* p = detail::plan(detail::Kind::Forward, g, x.dtype(), b.defined());
  if (!p) return Tensor();
  dnnl::stream s(detail::engine());
  const auto t = *detail::dnnl_type(x.dtype());
  Tensor y = empty({g.N, g.O, g.OH, g.OW}, x.dtype(), Device::CPU, MemoryFormat::ChannelsLast);
  auto [wm, wbuf] = detail::weights_in(g, w, p->weights, s);
  Tensor scratch = detail::buffer_for(p->scratchpad);
  std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, detail::wrap(detail::act_md(g.N, g.C, g.H, g.W, t), x)},
                                             {DNNL_ARG_WEIGHTS, wm},
                                             {DNNL_ARG_DST, detail::wrap(detail::act_md(g.N, g.O, g.OH, g.OW, t), y)},
                                             {DNNL_ARG_SCRATCHPAD, detail::wrap(p->scratchpad, scratch)}};
  if (b.defined()) args.emplace(DNNL_ARG_BIAS, detail::wrap(detail::md({g.O}, t, dnnl::memory::format_tag::x), b));
  p->prim.execute(s, args);
  s.wait();
  return y;
}

// gx [N, C, H, W] channels-last from gy channels-last and w contiguous (one dtype).
inline Tensor conv_backward_input(const mixprec::detail::ConvGeom& g, const Tensor& gy, const Tensor& w) {
  const detail::Plan* p = detail::plan(detail::Kind::BackwardData, g, gy.dtype(), false);
  if (!p) return Tensor();
  dnnl::stream s(detail::engine());
  const auto t = *detail::dnnl_type(gy.dtype());
  Tensor gx = empty({g.N, g.C, g.H, g.W}, gy.dtype(), Device::CPU, MemoryFormat::ChannelsLast);
  auto [wm, wbuf] = detail::weights_in(g, w, p->weights, s);
  Tensor scratch = detail::buffer_for(p->scratchpad);
  p->prim.execute(s, {{DNNL_ARG_DIFF_DST, detail::wrap(detail::act_md(g.N, g.O, g.OH, g.OW, t), gy)},
                      {DNNL_ARG_WEIGHTS, wm},
                      {DNNL_ARG_DIFF_SRC, detail::wrap(detail::act_md(g.N, g.C, g.H, g.W, t), gx)},
                      {DNNL_ARG_SCRATCHPAD, detail::wrap(p->scratchpad, scratch)}});
  s.wait();
  return gx;
}

// The weight gradient, float32 contiguous [O, C/G, KH, KW], from x and gy channels-last.
inline Tensor conv_backward_weight(const mixprec::detail::ConvGeom& g, const Tensor& x, const Tensor& gy) {
  const detail::Plan* p = detail::plan(detail::Kind::BackwardWeights, g, x.dtype(), false);
  if (!p) return Tensor();
  dnnl::stream s(detail::engine());
  const auto t = *detail::dnnl_type(x.dtype());
  Tensor gw = empty({g.O, g.Cg(), g.KH, g.KW}, DType::Float32);
  const detail::md user = detail::user_weights_md(g, dnnl::memory::data_type::f32);
  Tensor wbuf = p->weights == user ? gw : detail::buffer_for(p->weights);
  Tensor scratch = detail::buffer_for(p->scratchpad);
  dnnl::memory wm = detail::wrap(p->weights, wbuf);
  p->prim.execute(s, {{DNNL_ARG_SRC, detail::wrap(detail::act_md(g.N, g.C, g.H, g.W, t), x)},
                      {DNNL_ARG_DIFF_DST, detail::wrap(detail::act_md(g.N, g.O, g.OH, g.OW, t), gy)},
                      {DNNL_ARG_DIFF_WEIGHTS, wm},
                      {DNNL_ARG_SCRATCHPAD, detail::wrap(p->scratchpad, scratch)}});
  if (wbuf.data_ptr() != gw.data_ptr()) {
    dnnl::memory out = detail::wrap(user, gw);
    dnnl::reorder(wm, out).execute(s, wm, out);
  }
  s.wait();
  return gw;
}
#else
inline bool takes(const mixprec::detail::ConvGeom&, DType) { return false; }
inline Tensor conv_forward(const mixprec::detail::ConvGeom&, const Tensor&, const Tensor&, const Tensor&) { return Tensor(); }
inline Tensor conv_backward_input(const mixprec::detail::ConvGeom&, const Tensor&, const Tensor&) { return Tensor(); }
inline Tensor conv_backward_weight(const mixprec::detail::ConvGeom&, const Tensor&, const Tensor&) { return Tensor(); }
#endif

}  // namespace mixprec::cpu::onednn
