#pragma once
// fp8 autocast with delayed scaling, as TransformerEngine's DelayedScaling recipe:
//
//   amp::fp8_autocast guard(amp::DelayedScaling{});   // forward of one training step
//   Tensor loss = model->loss(x, y);                    // its nn::Linear layers run in fp8
//   loss.backward();                                    // after the scope, as with TE
//
// Under the scope every nn::Linear quantizes its input and weight to E4M3 and, in backward, the
// output gradient to E5M2 (HYBRID; E4M3 everywhere with Fp8Format::E4M3), each with its own
// per-tensor scale, and multiplies them with float32 accumulation: D = (s_x s_w)^-1 (x_q W_q^T).
// Why delayed: the scale a tensor is quantized with at step t comes from the amax history of
// steps before t, so quantizing needs no extra pass over the data to find this step's amax first
// (on a GPU the amax is a by-product of the kernel that writes the tensor). Each nn::Linear keeps
// that history in its Fp8LinearMeta (checkpointed with amp::fp8_state_dict, amp/fp8_state.hpp).
//
// CPU: emulated -- quantize to real float8 tensors (bit-exact OCP encodings, dtype/float8.hpp),
// decode and multiply with the float32 GEMM; with power-of-two scales every product of two fp8
// values and every rescale is exact, so this differs from a tensor-core fp8 GEMM only in the
// float32 summation order. CUDA: backends/cuda/gemm_plan.hpp plans the cuBLASLt fp8 GEMM (scale
// pointers, E4M3 x E4M3 and E5M2 x E4M3, TN layout, sm_89+); it is compiled and plan-tested on
// the host only, so fp8_linear refuses device tensors for now.
//
// Unlike TE: the amax is not all-reduced across data-parallel ranks, and only nn::Linear (and
// amp::fp8_linear called directly) computes in fp8; plain linear()/matmul have no module to keep
// an amax history in and run as they would outside the scope.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/ops/linalg.hpp"

namespace mixprec::amp {

// TE's Format: E4M3 everywhere, or HYBRID (E4M3 forward operands, E5M2 gradients: gradients need
// range more than precision).
enum class Fp8Format { E4M3, HYBRID };

// TE's DelayedScaling (transformer_engine.common.recipe), same defaults.
struct DelayedScaling {
  int margin = 0;                          // scale = 2^(floor(log2(fp8_max / amax)) - margin)
  Fp8Format fp8_format = Fp8Format::HYBRID;
  int amax_history_len = 1024;             // steps of amax kept per tensor
  std::string amax_compute_algo = "max";   // "max" over the history, or "most_recent"

  void validate(const char* who) const {
    MIXPREC_CHECK(amax_history_len >= 1, who, ": amax_history_len must be at least 1, got ", amax_history_len);
    MIXPREC_CHECK(margin >= 0 && margin <= 64, who, ": margin must be in [0, 64], got ", margin);
    MIXPREC_CHECK(amax_compute_algo == "max" || amax_compute_algo == "most_recent", who,
                  ": amax_compute_algo must be \"max\" or \"most_recent\", got \"", amax_compute_algo, "\"");
  }
  DType forward_dtype() const { return DType::Float8E4M3FN; }
  DType backward_dtype() const { return fp8_format == Fp8Format::HYBRID ? DType::Float8E5M2 : DType::Float8E4M3FN; }
};

inline float fp8_max(DType d) {
  MIXPREC_CHECK(is_float8(d), "fp8_max: ", d, " is not a float8 dtype");
  return d == DType::Float8E4M3FN ? float(std::numeric_limits<float8_e4m3fn>::max()) : float(std::numeric_limits<float8_e5m2>::max());
}

// One tensor's delayed-scaling state (a row of TE's FP8TensorMeta).
struct Fp8TensorMeta {
  std::vector<float> amax_history;  // [0]: the step being recorded (while pending), then older steps
  float scale = 1.0f;               // what quantizing multiplies by (TE starts at 1 too)
  bool pending = false;             // amax_history[0] holds a step not yet folded into scale
  int64_t pending_step = -1;

  float scale_inv() const { return 1.0f / scale; }

  // The step's scale: a pending amax of an earlier step is folded in first (TE updates after each
  // step; doing it at the next use gives the same scales without a hook at the end of backward).
  void begin_use(int64_t step, const DelayedScaling& recipe, float max_value) {
    if (static_cast<int>(amax_history.size()) != recipe.amax_history_len) amax_history.resize(static_cast<std::size_t>(recipe.amax_history_len), 0.0f);
    if (pending && pending_step != step) update(recipe, max_value);
  }
  // Several uses within one step keep the largest amax.
  void record(float amax, int64_t step) {
    amax_history[0] = pending ? std::max(amax_history[0], amax) : amax;
    if (std::isnan(amax)) amax_history[0] = amax;
    pending = true;
    pending_step = step;
  }
  void update(const DelayedScaling& recipe, float max_value) {
    float amax = amax_history[0];
    if (recipe.amax_compute_algo == "max")
      for (float a : amax_history) amax = (std::isnan(a) || a > amax) ? a : amax;
    // An amax of 0 (all zeros) or inf/NaN (an overflowed step) leaves the scale as it was (TE).
    if (amax > 0.0f && std::isfinite(amax)) {
      const int e = static_cast<int>(std::floor(std::log2(static_cast<double>(max_value) / amax))) - recipe.margin;
      scale = std::ldexp(1.0f, std::clamp(e, -126, 126));
    }
    std::rotate(amax_history.rbegin(), amax_history.rbegin() + 1, amax_history.rend());  // [0] -> [1], oldest dropped
    amax_history[0] = 0.0f;
    pending = false;
  }
};

// One Linear's state, TE's fp8_meta: forward input and weight, backward output gradient.
struct Fp8LinearMeta {
  enum Slot { Input = 0, Weight = 1, GradOutput = 2 };
  static constexpr int kSlots = 3;
  std::array<Fp8TensorMeta, kSlots> tensors;
};

namespace detail {
struct Fp8State {
  bool enabled = false;
  DelayedScaling recipe;
  int nesting = 0;
};
inline Fp8State& fp8_state() {
  thread_local Fp8State s;
  return s;
}
// Steps of delayed scaling: one per outermost fp8_autocast scope, on any thread.
inline std::atomic<int64_t>& fp8_step_counter() {
  static std::atomic<int64_t> n{0};
  return n;
}
}  // namespace detail

// amp::fp8_autocast guard(recipe);  amp::fp8_autocast off(recipe, false);
class fp8_autocast {
 public:
  MIXPREC_GUARD explicit fp8_autocast(const DelayedScaling& recipe = {}, bool enabled = true) {
    recipe.validate("fp8_autocast");
    auto& s = detail::fp8_state();
    prev_enabled_ = s.enabled;
    prev_recipe_ = s.recipe;
    if (s.nesting++ == 0) detail::fp8_step_counter().fetch_add(1);
    s.enabled = enabled;
    s.recipe = recipe;
  }
  ~fp8_autocast() {
    auto& s = detail::fp8_state();
    s.enabled = prev_enabled_;
    s.recipe = prev_recipe_;
    --s.nesting;
  }
  fp8_autocast(const fp8_autocast&) = delete;
  fp8_autocast& operator=(const fp8_autocast&) = delete;

  static bool is_enabled() { return detail::fp8_state().enabled; }
  static const DelayedScaling& recipe() { return detail::fp8_state().recipe; }

 private:
  bool prev_enabled_ = false;
  DelayedScaling prev_recipe_;
};

namespace detail {

// x (float32, contiguous) * scale rounded to the float8 dtype `d`, saturating (TE's cast: an
// amax that grew since the scale was chosen clips instead of turning into NaN/inf). Returns the
// float8 tensor; *amax gets max |x| (NaN if x holds one: the step's scale update is then skipped).
inline Tensor fp8_quantize(const Tensor& x, float scale, DType d, float* amax) {
  Tensor q = empty(x.sizes(), d);
  const float* src = x.data<float>();
  auto* dst = static_cast<uint8_t*>(q.data_ptr());
  const mixprec::detail::Fp8Format& fmt = d == DType::Float8E4M3FN ? mixprec::detail::kE4M3FN : mixprec::detail::kE5M2;
  const int64_t n = x.numel();
  const int64_t chunks = std::max<int64_t>(1, (n + kParallelGrain - 1) / kParallelGrain);
  std::vector<float> part(static_cast<std::size_t>(chunks), 0.0f);
  cpu::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float m = 0.0f;
      for (int64_t i = c * kParallelGrain, e = std::min(n, (c + 1) * kParallelGrain); i < e; ++i) {
        const float v = src[i];
        m = (std::isnan(v) || std::fabs(v) > m) ? std::fabs(v) : m;
        dst[i] = mixprec::detail::float_to_fp8_bits(v * scale, fmt, Fp8Saturate::Yes);
      }
      part[static_cast<std::size_t>(c)] = m;
    }
  });
  float m = 0.0f;
  for (float p : part) m = (std::isnan(p) || p > m) ? p : m;
  *amax = m;
  return q;
}

// float32 values of a float8 tensor times scale_inv: exact for power-of-two scales.
inline Tensor fp8_dequantize(const Tensor& q, float scale_inv) {
  Tensor out = empty(q.sizes(), DType::Float32);
  const auto* src = static_cast<const uint8_t*>(q.data_ptr());
  float* dst = out.data<float>();
  const mixprec::detail::Fp8Format& fmt = q.dtype() == DType::Float8E4M3FN ? mixprec::detail::kE4M3FN : mixprec::detail::kE5M2;
  cpu::parallel_for(0, q.numel(), kParallelGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = mixprec::detail::fp8_bits_to_float(src[i], fmt) * scale_inv;
  });
  return out;
}

// One operand through its meta: the step's scale, the quantized tensor, the amax recorded.
struct Fp8Operand {
  Tensor q;  // float8
  float scale_inv;
};
inline Fp8Operand fp8_operand(const Tensor& x32, Fp8TensorMeta& m, int64_t step, const DelayedScaling& recipe, DType d) {
  m.begin_use(step, recipe, fp8_max(d));
  float amax = 0.0f;
  Fp8Operand op{fp8_quantize(x32, m.scale, d, &amax), m.scale_inv()};
  m.record(amax, step);
  return op;
}

}  // namespace detail

// y = x W^T + b computed from fp8 operands with float32 accumulation and the delayed scales in
// `meta` (see the top of this file). x [..., in] and W [out, in] of any floating dtype (read as
// float32), b [out] optional (added in float32); y in x's dtype. Backward: the output gradient is
// quantized to recipe.backward_dtype() and both GEMMs (dgrad, wgrad) read fp8 operands; the bias
// gradient is summed from the unquantized gradient. Quantization is straight-through: W and x
// get the gradient of the GEMM they took part in. Must run inside amp::fp8_autocast, which marks
// the steps of delayed scaling.
// Out of line in the compiled mode (core/config.hpp): every nn::Linear names it.
MIXPREC_OUTLINE Tensor fp8_linear(const Tensor& x, const Tensor& w, const Tensor& b, const std::shared_ptr<Fp8LinearMeta>& meta);
#if MIXPREC_HEADER_DEFINITIONS
MIXPREC_OUTLINE Tensor fp8_linear(const Tensor& x, const Tensor& w, const Tensor& b, const std::shared_ptr<Fp8LinearMeta>& meta) {
  const char* op = "fp8_linear";
  MIXPREC_CHECK(meta != nullptr, op, ": no Fp8LinearMeta given");
  MIXPREC_CHECK(detail::fp8_state().nesting > 0, op, ": call it inside amp::fp8_autocast (the scope marks the steps of delayed scaling)");
  MIXPREC_CHECK(x.defined() && w.defined() && w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), op, ": input of shape ",
                x.defined() ? x.sizes() : Shape{}, " does not match weight of shape ", w.defined() ? w.sizes() : Shape{},
                " (expected input [..., ", w.defined() && w.dim() == 2 ? w.size(1) : -1, "])");
  MIXPREC_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)), op, ": bias of shape ", b.sizes(),
                " does not match weight of shape ", w.sizes());
  for (const Tensor* t : {&x, &w, &b})
    MIXPREC_CHECK(!t->defined() || (t->is_floating_point() && !is_float8(t->dtype())), op,
                  ": expected float32/float64/float16/bfloat16 input, weight and bias, got ", t->dtype());
  (void)mixprec::detail::common_device(op, {&x, &w, &b});
  MIXPREC_CHECK(x.device() == Device::CPU, op, ": runs on the CPU (emulated); the CUDA fp8 GEMM (cuBLASLt, sm_89+) is planned but "
                "not wired to tensors yet, got a ", x.device(), " input");
  const DelayedScaling recipe = fp8_autocast::recipe();
  const int64_t step = detail::fp8_step_counter().load();
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / std::max<int64_t>(K, 1);
  namespace md = mixprec::detail;
  const Tensor x32 = md::reshape_raw(md::contiguous_raw(x, DType::Float32), {M, K});
  const Tensor w32 = md::contiguous_raw(w, DType::Float32);
  const DType fwd = recipe.forward_dtype();
  const detail::Fp8Operand xq = detail::fp8_operand(x32, meta->tensors[Fp8LinearMeta::Input], step, recipe, fwd);
  const detail::Fp8Operand wq = detail::fp8_operand(w32, meta->tensors[Fp8LinearMeta::Weight], step, recipe, fwd);
  const Tensor b32 = b.defined() ? md::contiguous_raw(b, DType::Float32) : Tensor();
  // Raw kernels (no graph); the op's one node is recorded below.
  const Tensor y = md::matmul_kernel(op, detail::fp8_dequantize(xq.q, xq.scale_inv), md::mT(detail::fp8_dequantize(wq.q, wq.scale_inv)), b32);
  Shape os(x.sizes().begin(), x.sizes().end() - 1);
  os.push_back(N);
  const Tensor out = md::reshape_raw(md::as_dtype_raw(y, x.dtype()), os);
  if (autograd::should_record({x, w, b}))
    autograd::record(op, {x, w, b}, {out},
                     [xq, wq, meta, recipe, step, M, N, K, xs = x.sizes(), xd = x.dtype(), wd = w.dtype(),
                      bd = b.defined() ? std::optional<DType>(b.dtype()) : std::nullopt](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       const char* op = "fp8_linear";
                       const Tensor g32 = md::reshape_raw(md::contiguous_raw(g[0], DType::Float32), {M, N});
                       const DType bwd = recipe.backward_dtype();
                       const detail::Fp8Operand gq = detail::fp8_operand(g32, meta->tensors[Fp8LinearMeta::GradOutput], step, recipe, bwd);
                       const Tensor gd = detail::fp8_dequantize(gq.q, gq.scale_inv);
                       const Tensor gx = md::matmul_kernel(op, gd, detail::fp8_dequantize(wq.q, wq.scale_inv));               // dgrad
                       const Tensor gw = md::matmul_kernel(op, md::mT(gd), detail::fp8_dequantize(xq.q, xq.scale_inv));        // wgrad
                       Tensor gb = bd ? md::as_dtype_raw(sum(g32, {0}), *bd) : Tensor();
                       return {md::reshape_raw(md::as_dtype_raw(gx, xd), xs), md::as_dtype_raw(gw, wd), gb};
                     });
  return out;
}
#endif  // MIXPREC_HEADER_DEFINITIONS

}  // namespace mixprec::amp
