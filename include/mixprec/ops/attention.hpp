#pragma once
// scaled_dot_product_attention: the checks, the autograd and the choice of kernel; the kernels are
// the device's (DeviceKernels::sdpa_*; the CPU's in backends/cpu/attention.hpp, CUDA's in
// backends/cuda/attention.cuh), picked in this order:
// - sdpa_forward / sdpa_backward, the fused entries, where they take the call (no mask; on CUDA a
//   head dim the kernels store, sdpa_fused_supported): one kernel each way, fresh results;
// - sdpa_forward_into / sdpa_backward_into, a device's general kernels (the CPU's): masks, and
//   results written into the caller's strided tensors, so the packed entry splits and merges
//   heads without copies;
// - else composed from routed ops (matmul, softmax, ...), masks and dropout built on the host.
// Dropout uses a counter-based hash of (seed, position), so backward regenerates the same mask
// without saving it, every device drops the same elements, and the result does not depend on
// how a kernel splits its blocks across threads.
#include <algorithm>
#include <limits>

#include "mixprec/ops/activation.hpp"
#include "mixprec/ops/shape.hpp"

namespace mixprec {

namespace detail {

// Attention's dropout is dropout's rule (ops/activation.hpp), on host and device alike: the CUDA
// kernel (backends/cuda/attention.cuh) drops the very same elements of the flattened [B, L, S]
// probabilities.
MIXPREC_HOST_DEVICE uint64_t sdpa_hash(uint64_t seed, uint64_t i) { return dropout_hash(seed, i); }
inline bool sdpa_dropout_keep(uint64_t seed, uint64_t i, double p) { return dropout_keep(seed, i, p); }
// The same rule in integers, for kernels: keep iff (hash >> 11) >= this. Exact, since
// x * 2^-53 >= p  <=>  x >= ceil(p * 2^53) for an integer x, and p * 2^53 is exact in double.
inline uint64_t sdpa_dropout_threshold(double p) { return p <= 0 ? 0 : static_cast<uint64_t>(std::ceil(std::ldexp(p, 53))); }

// [B, H, n, D] heads of columns [off, off + H * D) of t [B, n, *] (unit stride along its last
// dim), by strides alone: how the packed entry splits q, k, v and merges the output.
inline Tensor sdpa_heads(const Tensor& t, int64_t H, int64_t D, int64_t off) {
  return make_view(t, {t.size(0), H, t.size(1), D}, {t.stride(0), D, t.stride(1), 1}, t.storage_offset() + off);
}

// Whether the device's fused attention entries take this call (their contract in
// backends/device.hpp): no mask; on CUDA one head dim E == Ev that is a multiple of 8 up to 128,
// and a dtype the device kernels store (the CPU's kernels take any head dims, and float64).
inline bool sdpa_fused_supported(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  const DeviceKernels* kt = device_kernels(q.device());
  if (!kt || !kt->sdpa_forward || !kt->sdpa_backward || mask.defined()) return false;
  if (q.device() == Device::CPU) return true;
  const int64_t E = q.size(-1);
  const DType d = q.dtype();
  return k.size(-1) == E && v.size(-1) == E && E > 0 && E % 8 == 0 && E <= 128 &&
         (d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16);
}

// Whether the device has the general kernels (masks, results into strided tensors).
inline bool sdpa_into_supported(const Tensor& q) {
  const DeviceKernels* kt = device_kernels(q.device());
  return kt && kt->sdpa_forward_into && kt->sdpa_backward_into;
}

// The op's one dropout draw, where every path makes it: after the checks. A captured graph would
// replay the seed recorded here, one dropout mask for every replay (the kernels do not mix in the
// replay counter yet): refused before the draw, as the composed path refuses its host-built mask.
inline uint64_t sdpa_seed(const Tensor& q, double dropout_p) {
  MIXPREC_CHECK(!(dropout_p > 0 && capturing()), "scaled_dot_product_attention: dropout_p ", dropout_p, " on query ", q.sizes(),
                " inside a CapturedStep is not supported yet; use dropout_p = 0 in the captured step");
  return dropout_p > 0 ? default_generator().next_u64() : 0;
}

// t expanded to the batch shape (stride 0 on broadcast dims), as the kernels take q, k and v.
inline Tensor sdpa_expanded(const Tensor& t, const Shape& batch) {
  Shape s = batch;
  s.push_back(t.size(-2));
  s.push_back(t.size(-1));
  return expand_raw(t, s);
}

// The fused entries: one kernel each way and one graph node.
inline Tensor sdpa_fused(const Tensor& q, const Tensor& k, const Tensor& v, const Shape& batch, bool is_causal, double sc,
                         double dropout_p) {
  constexpr const char* op = "scaled_dot_product_attention";
  const auto forward = device_kernel(op, q, &DeviceKernels::sdpa_forward);
  const uint64_t seed = sdpa_seed(q, dropout_p);
  const std::array<Tensor, 2> fwd =
      forward(sdpa_expanded(q, batch), sdpa_expanded(k, batch), sdpa_expanded(v, batch), is_causal, sc, dropout_p, seed);
  const Tensor &out = fwd[0], &lse = fwd[1];
  if (autograd::should_record({q, k, v})) {
    autograd::record(op, {q, k, v}, {out},
                     [sq = autograd::SavedTensor(q), sk = autograd::SavedTensor(k), sv = autograd::SavedTensor(v),
                      so = autograd::SavedTensor(out), lse, batch, is_causal, sc, dropout_p,
                      seed](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       const Tensor& q = sq.get(op);
                       const Tensor& k = sk.get(op);
                       const Tensor& v = sv.get(op);
                       // The CPU's kernel reads grad in any floating dtype as it reads q (float16
                       // widened, not rounded to float16 first); other devices' take out's dtype.
                       const Tensor grad =
                           g[0].dtype() == q.dtype() || q.device() == Device::CPU ? g[0] : as_dtype_raw(g[0], q.dtype());
                       const auto [dq, dk, dv] = device_kernel(op, q, &DeviceKernels::sdpa_backward)(
                           grad, sdpa_expanded(q, batch), sdpa_expanded(k, batch), sdpa_expanded(v, batch), so.get(op), lse, is_causal,
                           sc, dropout_p, seed);
                       // Broadcast dims summed, then rounded (the CPU's gradients come in the
                       // accumulation dtype where a dim is broadcast).
                       auto finish = [](const Tensor& gr, const Tensor& in) { return as_dtype_raw(sum_to(gr, in.sizes()), in.dtype()); };
                       return {finish(dq, q), finish(dk, k), finish(dv, v)};
                     });
  }
  return out;
}

// The general entries: masks, and the gradient of a float mask.
inline Tensor sdpa_into(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch, bool is_causal,
                        double sc, double dropout_p) {
  constexpr const char* op = "scaled_dot_product_attention";
  const auto forward = device_kernel(op, q, &DeviceKernels::sdpa_forward_into);
  const uint64_t seed = sdpa_seed(q, dropout_p);
  auto full = [batch](const Tensor& t, int64_t rows) {  // copied: backward runs after this frame
    Shape s = batch;
    s.insert(s.end(), {rows, t.size(-1)});
    return s;
  };
  const Tensor out = empty(full(v, q.size(-2)), q.dtype(), q.device());
  const Tensor lse = forward(sdpa_expanded(q, batch), sdpa_expanded(k, batch), sdpa_expanded(v, batch), mask, is_causal, sc, dropout_p,
                             seed, out);
  if (autograd::should_record({q, k, v, mask})) {
    autograd::record(op, {q, k, v, mask}, {out},
                     [sq = autograd::SavedTensor(q), sk = autograd::SavedTensor(k), sv = autograd::SavedTensor(v),
                      sm = autograd::SavedTensor(mask), so = autograd::SavedTensor(out), lse, batch, full, is_causal, sc, dropout_p, seed,
                      mask_grad = mask.defined() && mask.is_floating_point() && mask.requires_grad()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       const Tensor& q = sq.get(op);
                       const Tensor& k = sk.get(op);
                       const Tensor& v = sv.get(op);
                       const Tensor& mask = sm.get(op);
                       const int64_t L = q.size(-2), S = k.size(-2);
                       // The inputs' dtype, unless a broadcast batch dim is still to be summed (in the accumulation dtype).
                       const bool broadcast = q.sizes() != full(q, L) || k.sizes() != full(k, S) || v.sizes() != full(v, S);
                       const DType gd = broadcast ? lse.dtype() : q.dtype();
                       const Device dev = q.device();
                       const Tensor dq = empty(full(q, L), gd, dev), dk = empty(full(k, S), gd, dev), dv = empty(full(v, S), gd, dev);
                       Shape ms = batch;
                       ms.insert(ms.end(), {L, S});
                       const Tensor dm = mask_grad ? zeros(ms, lse.dtype(), dev) : Tensor();
                       device_kernel(op, q, &DeviceKernels::sdpa_backward_into)(g[0], sdpa_expanded(q, batch), sdpa_expanded(k, batch),
                                                                              sdpa_expanded(v, batch), mask, so.get(op), lse, is_causal, sc,
                                                                              dropout_p, seed, dq, dk, dv, dm);
                       auto finish = [](const Tensor& gr, const Tensor& in) { return as_dtype_raw(sum_to(gr, in.sizes()), in.dtype()); };
                       return {finish(dq, q), finish(dk, k), finish(dv, v), mask_grad ? finish(dm, mask) : Tensor()};
                     });
  }
  return out;
}
}  // namespace detail

namespace detail {
// scaled_dot_product_attention composed from routed ops that each have their own backward, on a
// device whose attention entries do not take the call: (q * scale) k^T in the inputs' dtype
// (float32 accumulation, rounded on store, as PyTorch's math path under autocast), masked and
// softmaxed in float32, the probabilities rounded back for the product with v. It holds the
// [..., L, S] scores where a fused kernel holds one block. Masks and dropout are built on the host
// with the CPU kernel's rules and draws (the same keys dropped, rows with no key left giving 0 and
// no gradient) and copied over. Masking adds -inf where the CPU's kernel skips the key, so a
// non-finite score at a masked position (an input that has already overflowed) makes its row NaN
// here.
inline Tensor sdpa_composed(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch, bool is_causal,
                            double sc, double dropout_p) {
  constexpr const char* op = "scaled_dot_product_attention";
  const Device dev = q.device();
  (void)device_kernel(op, q, &DeviceKernels::softmax);  // no backend: refuse here, by this op's name
  const int64_t L = q.size(-2), S = k.size(-2), B = numel_of(batch);
  Shape full = batch;
  full.push_back(L);
  full.push_back(S);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  Tensor additive;  // float32 on the host: 0 or -inf (bool, causal) or the mask's values
  Tensor live;      // float32 [batch..., L, 1] on the host: 0 for a row with no key left, else 1
  bool mask_on_graph = false;  // a float mask that needs its gradient goes in through the graph
  if (is_causal) {
    additive = empty({L, S}, DType::Float32);
    float* a = additive.data<float>();
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < S; ++j) a[i * S + j] = j <= i ? 0.0f : kNegInf;  // key 0 stays: no row is empty
  } else if (mask.defined()) {
    const Tensor mh = expand_raw(move_raw(mask, Device::CPU, op), full);
    additive = empty(full, DType::Float32);
    float* a = additive.data<float>();
    if (mask.dtype() == DType::Bool) {
      const Tensor mb = contiguous_raw(mh);
      const bool* m = mb.data<bool>();
      for (int64_t i = 0; i < additive.numel(); ++i) a[i] = m[i] ? 0.0f : kNegInf;
    } else {
      detail::copy_kernel(additive, mh);
    }
    bool any_dead = false;
    Shape rows = batch;
    rows.insert(rows.end(), {L, 1});
    live = empty(rows, DType::Float32);
    float* lv = live.data<float>();
    for (int64_t r = 0; r < B * L; ++r) {
      float* row = a + r * S;
      const bool dead = S > 0 && std::all_of(row, row + S, [](float x) { return x == kNegInf; });
      lv[r] = dead ? 0.0f : 1.0f;
      if (dead) std::fill(row, row + S, 0.0f);  // softmax over zeros, then zeroed by `live`
      any_dead = any_dead || dead;
    }
    if (!any_dead) live = Tensor();
    mask_on_graph = mask.is_floating_point() && autograd::should_record({mask});
    MIXPREC_CHECK(!(mask_on_graph && any_dead), op, ": on ", dev, ", a float attn_mask that requires grad may not mask every key of "
                  "a row (shape ", mask.sizes(), "); use a bool mask, or detach it");
  }
  // Every refusal is behind us: the op's one draw, where the CPU makes it.
  const uint64_t seed = dropout_p > 0 ? default_generator().next_u64() : 0;
  Tensor factor = live;  // what the probabilities are multiplied by: live rows, dropout's keep / (1 - p)
  if (dropout_p > 0) {
    const float keep_scale = dropout_p < 1 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.0f;
    factor = empty(full, DType::Float32);
    float* f = factor.data<float>();
    const float* lv = live.defined() ? live.data<float>() : nullptr;  // one value per row of S
    cpu::parallel_for(0, factor.numel(), kParallelGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        f[i] = sdpa_dropout_keep(seed, static_cast<uint64_t>(i), dropout_p) ? keep_scale * (lv ? lv[i / S] : 1.0f) : 0.0f;
    });
  }
  // q is scaled first, so 16-bit scores stay in range where q k^T alone might overflow float16.
  Tensor scores = cast(matmul(mul(q, sc), k.transpose(-2, -1)), DType::Float32);
  if (mask_on_graph) scores = add(scores, cast(mask, DType::Float32).to(dev));
  else if (additive.defined()) scores = add(scores, move_raw(additive, dev, op));
  Tensor probs = softmax(scores, -1);
  if (factor.defined()) probs = mul(probs, move_raw(factor, dev, op));
  return matmul(cast(probs, q.dtype()), v);
}

// The kernel for this call (see the top of this file), after the device checks.
inline Tensor sdpa_route(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Shape& batch, bool is_causal,
                         double sc, double dropout_p) {
  constexpr const char* op = "scaled_dot_product_attention";
  const Device dev = common_device(op, {&q, &k, &v});
  MIXPREC_CHECK(!mask.defined() || mask.device() == Device::CPU || mask.device() == dev, op, ": query on ", dev,
                " and attn_mask on ", mask.device());
  if (sdpa_fused_supported(q, k, v, mask)) return sdpa_fused(q, k, v, batch, is_causal, sc, dropout_p);
  if (sdpa_into_supported(q)) return sdpa_into(q, k, v, mask, batch, is_causal, sc, dropout_p);
  return sdpa_composed(q, k, v, mask, batch, is_causal, sc, dropout_p);
}
}  // namespace detail
namespace detail {
// The checks both entries make, by `op`'s name; returns the broadcast batch shape.
inline Shape sdpa_check(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, double dropout_p,
                        bool is_causal) {
  for (const Tensor* t : {&q, &k, &v}) MIXPREC_CHECK(t->defined(), op, ": query, key and value must be defined");
  const bool on_device = q.device() != Device::CPU;
  if (!on_device)
    for (const Tensor* t : {&k, &v}) require_cpu(op, *t);
  MIXPREC_CHECK(q.dim() >= 2 && k.dim() >= 2 && v.dim() >= 2, op, ": query, key and value need at least 2 dimensions, got ",
                q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  MIXPREC_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype(), op, ": query, key and value must have one dtype, got ",
                q.dtype(), ", ", k.dtype(), " and ", v.dtype());
  MIXPREC_CHECK(q.is_floating_point(), op, ": expected floating-point inputs, got ", q.dtype());
  MIXPREC_CHECK(q.size(-1) == k.size(-1), op, ": query [..., L, E] ", q.sizes(), " and key [..., S, E] ", k.sizes(),
                " disagree on E");
  MIXPREC_CHECK(k.size(-2) == v.size(-2), op, ": key [..., S, E] ", k.sizes(), " and value [..., S, Ev] ", v.sizes(),
                " disagree on S");
  MIXPREC_CHECK(dropout_p >= 0 && dropout_p <= 1, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  MIXPREC_CHECK(!(mask.defined() && is_causal), op, ": specify either attn_mask or is_causal, not both");
  const Shape qb(q.sizes().begin(), q.sizes().end() - 2), kb(k.sizes().begin(), k.sizes().end() - 2),
      vb(v.sizes().begin(), v.sizes().end() - 2);
  const Shape batch = broadcast_shapes(broadcast_shapes(qb, kb, op), vb, op);
  if (mask.defined()) {
    if (!on_device) require_cpu(op, mask);
    MIXPREC_CHECK(mask.dtype() == DType::Bool || mask.is_floating_point(), op,
                  ": attn_mask must be bool (true = attend) or floating-point (added to the scores), got ", mask.dtype());
    Shape full = batch;
    full.push_back(q.size(-2));
    full.push_back(k.size(-2));
    bool ok = mask.dim() <= static_cast<int64_t>(full.size());
    for (int64_t i = 0; ok && i < mask.dim(); ++i) {
      const int64_t m = mask.size(mask.dim() - 1 - i);
      ok = m == 1 || m == full[full.size() - 1 - static_cast<std::size_t>(i)];
    }
    MIXPREC_CHECK(ok, op, ": attn_mask of shape ", mask.sizes(), " does not broadcast to the attention shape ", full, " (query ",
                  q.sizes(), ", key ", k.sizes(), ")");
  }
  return batch;
}

inline double sdpa_scale(std::optional<double> scale, int64_t E) {
  return scale.value_or(E > 0 ? 1.0 / std::sqrt(static_cast<double>(E)) : 1.0);
}
}  // namespace detail

// softmax(q k^T * scale + mask) v over the last two dims, batch dims broadcast, as
// torch.nn.functional.scaled_dot_product_attention: q [..., L, E], k [..., S, E], v [..., S, Ev]
// -> [..., L, Ev]. attn_mask is bool (true = take part) or additive float, broadcastable to
// [..., L, S]; is_causal keeps key j for query i when j <= i (top-left aligned when L != S).
// scale defaults to 1/sqrt(E). Rows with every key masked give 0 (and no gradient), as
// PyTorch's math backend since 2.5. The device's kernels read q, k and v with unit stride along
// their last dim in place, whatever their other strides.
inline Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& attn_mask = Tensor(),
                                           double dropout_p = 0.0, bool is_causal = false,
                                           std::optional<double> scale = std::nullopt) {
  return dispatch(OpId::scaled_dot_product_attention, [dropout_p, is_causal, scale](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
    constexpr const char* op = "scaled_dot_product_attention";
    const Shape batch = detail::sdpa_check(op, q, k, v, mask, dropout_p, is_causal);
    const double sc = detail::sdpa_scale(scale, q.size(-1));
    return detail::sdpa_route(q, k, v, mask, batch, is_causal, sc, dropout_p);
  }, q, k, v, attn_mask);
}

// Multi-head self-attention on a packed projection, the way nn::MultiheadAttention runs it: qkv
// [B, L, 3E] holds q, k and v side by side, each num_heads heads of E / num_heads; the result is
// scaled_dot_product_attention of those heads ([B, heads, L, E / heads]) with the heads merged
// back, [B, L, E]. On a device with the general kernels (sdpa_forward_into; the CPU) the heads are
// strided views of qkv and the kernel writes the merged layout, so nothing is split, transposed or
// copied either way, and backward writes dq, dk and dv side by side into the one [B, L, 3E]
// gradient the projection wants. attn_mask
// broadcasts to [B, heads, L, L]; dropout, causal and scale as scaled_dot_product_attention
// (the same values, and the same dropout draws).
inline Tensor scaled_dot_product_attention_packed(const Tensor& qkv, int64_t num_heads, const Tensor& attn_mask = Tensor(),
                                                  double dropout_p = 0.0, bool is_causal = false,
                                                  std::optional<double> scale = std::nullopt) {
  return dispatch(OpId::scaled_dot_product_attention, [num_heads, dropout_p, is_causal, scale](const Tensor& qkv, const Tensor& mask) {
    constexpr const char* op = "scaled_dot_product_attention_packed";
    MIXPREC_CHECK(qkv.defined() && qkv.dim() == 3 && num_heads > 0 && qkv.size(2) % (3 * num_heads) == 0, op,
                  ": expected qkv of shape [batch, seq, 3 * heads * head_dim] for ", num_heads, " heads, got ",
                  qkv.defined() ? qkv.sizes() : Shape{});
    const int64_t B = qkv.size(0), L = qkv.size(1), E = qkv.size(2) / 3, H = num_heads, D = E / H;
    if (!detail::sdpa_into_supported(qkv)) {
      // Without the general kernels (CUDA): the same head views, through the graph, into
      // scaled_dot_product_attention (whose kernels take strided batch dims with unit stride
      // along D); the merge is a copy there.
      auto heads = [&](int64_t i) { return qkv.narrow(2, i * E, E).reshape({B, L, H, D}).transpose(1, 2); };
      return scaled_dot_product_attention(heads(0), heads(1), heads(2), mask, dropout_p, is_causal, scale).transpose(1, 2).reshape({B, L, E});
    }
    const Tensor x = qkv.stride(2) == 1 ? qkv : detail::contiguous_raw(qkv);
    const Tensor q = detail::sdpa_heads(x, H, D, 0), k = detail::sdpa_heads(x, H, D, E), v = detail::sdpa_heads(x, H, D, 2 * E);
    const Shape batch = detail::sdpa_check(op, q, k, v, mask, dropout_p, is_causal);
    const double sc = detail::sdpa_scale(scale, D);
    const auto forward = detail::device_kernel(op, qkv, &DeviceKernels::sdpa_forward_into);
    const uint64_t seed = detail::sdpa_seed(qkv, dropout_p);
    const Tensor out = empty({B, L, E}, qkv.dtype(), qkv.device());
    const Tensor lse = forward(q, k, v, mask, is_causal, sc, dropout_p, seed, detail::sdpa_heads(out, H, D, 0));
    if (autograd::should_record({qkv, mask})) {
      autograd::record(op, {qkv, mask}, {out},
                       [sx = autograd::SavedTensor(x), sm = autograd::SavedTensor(mask), so = autograd::SavedTensor(out), lse, batch, H, D,
                        E, is_causal, sc, dropout_p, seed,
                        mask_grad = mask.defined() && mask.is_floating_point() && mask.requires_grad()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                         const Tensor& x = sx.get(op);
                         const Tensor& mask = sm.get(op);
                         const Tensor go = g[0].stride(2) == 1 ? g[0] : detail::contiguous_raw(g[0]);
                         auto heads = [&](const Tensor& t, int64_t i) { return detail::sdpa_heads(t, H, D, i * E); };
                         const Tensor dx = empty(x.sizes(), x.dtype(), x.device());  // dq, dk, dv side by side
                         Shape ms = batch;
                         ms.insert(ms.end(), {x.size(1), x.size(1)});
                         const Tensor dm = mask_grad ? zeros(ms, lse.dtype(), x.device()) : Tensor();
                         detail::device_kernel(op, x, &DeviceKernels::sdpa_backward_into)(
                             heads(go, 0), heads(x, 0), heads(x, 1), heads(x, 2), mask, heads(so.get(op), 0), lse, is_causal, sc, dropout_p,
                             seed, heads(dx, 0), heads(dx, 1), heads(dx, 2), dm);
                         return {dx, mask_grad ? detail::as_dtype_raw(sum_to(dm, mask.sizes()), mask.dtype()) : Tensor()};
                       });
    }
    return out;
  }, qkv, attn_mask);
}

}  // namespace mixprec
