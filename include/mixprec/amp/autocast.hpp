#pragma once
// autocast: a thread-local, per-device RAII scope that makes ops run in the dtype their policy
// (amp/policy.hpp) asks for. Float32 weights used by lower-precision ops are cast once per
// outermost scope and cached.
#include <array>
#include <optional>
#include <unordered_map>

#include "mixprec/amp/policy.hpp"
#include "mixprec/autograd/anomaly.hpp"
#include "mixprec/autograd/function.hpp"
#include "mixprec/core/capabilities.hpp"
#include "mixprec/amp/trace.hpp"

namespace mixprec {

// Defined with the ops (ops/tensor_ops.hpp): a differentiable dtype cast.
Tensor cast(const Tensor& t, DType d);

namespace amp::detail {

struct CacheEntry {
  std::weak_ptr<TensorImpl> source;  // detects a freed-and-reused address
  uint64_t version;                  // detects an in-place update of the weight
  Tensor cast;
};

struct AutocastState {
  std::array<bool, kNumDevices> enabled{false, false};
  std::array<DType, kNumDevices> dtype{DType::BFloat16, DType::Float16};  // CPU, CUDA: PyTorch's defaults
  int nesting = 0;     // autocast scopes entered on this thread
  int suppressed = 0;  // > 0 while an op body or backward runs: inner ops are not re-cast
  // Keyed by (weight, grad mode): a cast made under no_grad has no graph and must not be reused
  // with grad enabled (PyTorch #65766).
  std::unordered_map<const TensorImpl*, std::array<std::optional<CacheEntry>, 2>> cache;
  int64_t casts = 0;  // casts actually performed (cache misses included), for audits and tests
  int64_t cache_hits = 0;
};

inline AutocastState& state() {
  thread_local AutocastState s;
  return s;
}

inline bool any_enabled() {
  const auto& s = state();
  return s.enabled[0] || s.enabled[1];
}

// Only float32 leaves that require grad and own their whole storage (not views) are cached.
inline bool cacheable(const Tensor& t) {
  auto* m = autograd::meta_or_null(t);
  return t.dtype() == DType::Float32 && m && m->requires_grad && !m->grad_fn && t.storage_offset() == 0 &&
         t.is_contiguous() && t.nbytes() == t.storage()->nbytes;
}

inline Tensor cast_cached(const Tensor& t, DType to) {
  auto& s = state();
  if (!cacheable(t)) {
    ++s.casts;
    return cast(t, to);
  }
  auto& slot = s.cache[t.impl()][GradMode::is_enabled() ? 1 : 0];
  if (slot && !slot->source.expired() && slot->version == t.version() && slot->cast.dtype() == to) {
    ++s.cache_hits;
    return slot->cast;
  }
  ++s.casts;
  Tensor c = cast(t, to);
  slot = CacheEntry{t.impl_ptr(), t.version(), c};
  return c;
}

inline bool eligible(const Tensor& t, Device dev) {
  return t.defined() && t.device() == dev && t.is_floating_point() && t.dtype() != DType::Float64;
}

template <class A>
void visit_tensors(const A& a, auto&& f) {
  if constexpr (std::is_same_v<A, Tensor>) f(a);
  else if constexpr (std::is_same_v<A, std::vector<Tensor>>) for (const Tensor& t : a) f(t);
}

template <class A>
decltype(auto) cast_arg(const A& a, Device dev, DType to) {
  if constexpr (std::is_same_v<A, Tensor>) {
    return (eligible(a, dev) && a.dtype() != to) ? cast_cached(a, to) : a;
  } else if constexpr (std::is_same_v<A, std::vector<Tensor>>) {
    std::vector<Tensor> out;
    out.reserve(a.size());
    for (const Tensor& t : a) out.push_back((eligible(t, dev) && t.dtype() != to) ? cast_cached(t, to) : t);
    return out;
  } else {
    return (a);
  }
}

struct Suppress {
  Suppress() { ++state().suppressed; }
  ~Suppress() { --state().suppressed; }
  Suppress(const Suppress&) = delete;
  Suppress& operator=(const Suppress&) = delete;
};

// The dtype an op with policy `p` runs in, or nullopt for "leave the inputs as they are".
template <class... Args>
std::optional<DType> target_dtype(OpId id, Policy p, Device dev, DType low, const Args&... args) {
  switch (p) {
    case Policy::LowerPrecision: return low;
    case Policy::Float32: return DType::Float32;
    case Policy::BannedFloat16:
      MIXPREC_CHECK(low != DType::Float16, op_name_of(id),
                    " is unsafe to autocast in float16 (its gradient overflows easily). Use "
                    "binary_cross_entropy_with_logits, which fuses the sigmoid and is safe, or run it in an "
                    "autocast(enabled=false) region on float32 inputs");
      return DType::Float32;
    case Policy::Promote: {
      std::optional<DType> widest;
      (visit_tensors(args,
                     [&](const Tensor& t) {
                       if (eligible(t, dev)) widest = widest ? promote_types(*widest, t.dtype()) : t.dtype();
                     }),
       ...);
      return widest;
    }
    case Policy::Unlisted: return std::nullopt;
  }
  return std::nullopt;
}

template <class... Args>
Device device_of_args(const Args&... args) {
  std::optional<Device> d;
  (visit_tensors(args, [&](const Tensor& t) { if (!d && t.defined()) d = t.device(); }), ...);
  return d.value_or(Device::CPU);
}

}  // namespace amp::detail

// autocast ac{Device::CPU, DType::BFloat16};   autocast off{Device::CPU, false};
class autocast {
 public:
  MIXPREC_GUARD autocast(Device device, DType dtype, bool enabled = true) : device_(device) {
    MIXPREC_CHECK(is_low_precision(dtype), "autocast: dtype must be float16 or bfloat16, got ", dtype);
    enter(dtype, enabled);
  }
  MIXPREC_GUARD explicit autocast(Device device, bool enabled = true) : device_(device) {
    enter(amp::detail::state().dtype[static_cast<int>(device)], enabled);
  }
  ~autocast() {
    auto& s = amp::detail::state();
    s.enabled[static_cast<int>(device_)] = prev_enabled_;
    s.dtype[static_cast<int>(device_)] = prev_dtype_;
    if (--s.nesting == 0) s.cache.clear();
  }
  autocast(const autocast&) = delete;
  autocast& operator=(const autocast&) = delete;

  static bool is_enabled(Device d) { return amp::detail::state().enabled[static_cast<int>(d)]; }
  static DType dtype(Device d) { return amp::detail::state().dtype[static_cast<int>(d)]; }

 private:
  void enter(DType dtype, bool enabled) {
    // As torch.autocast: refused up front rather than failing in the first kernel.
    MIXPREC_CHECK(!(enabled && device_ == Device::CUDA && dtype == DType::BFloat16 && cuda_is_available() &&
                    !is_bf16_supported(Device::CUDA)),
                  "autocast: bfloat16 on CUDA needs compute capability 8.0 or newer, and device 0 has ", detail::cuda_probe().major,
                  ".", detail::cuda_probe().minor, "; use float16 (with a GradScaler)");
    auto& s = amp::detail::state();
    const int i = static_cast<int>(device_);
    prev_enabled_ = s.enabled[i];
    prev_dtype_ = s.dtype[i];
    s.enabled[i] = enabled;
    s.dtype[i] = dtype;
    ++s.nesting;
  }
  Device device_;
  bool prev_enabled_ = false;
  DType prev_dtype_ = DType::Float32;
};

namespace amp {
struct CastStats {
  int64_t casts;
  int64_t cache_hits;
};
inline CastStats cast_stats() { return {detail::state().casts, detail::state().cache_hits}; }
inline void reset_cast_stats() { detail::state().casts = detail::state().cache_hits = 0; }
}  // namespace amp

// Every op body runs through here. Off the autocast/trace/anomaly path it is one thread-local load.
template <class Impl, class... Args>
decltype(auto) dispatch(OpId id, Impl&& impl, const Args&... args) {
  auto& s = amp::detail::state();
  if (s.suppressed > 0 || (!amp::detail::any_enabled() && !amp::trace_active() && !anomaly_mode_enabled())) [[likely]]
    return impl(args...);
  const Device dev = amp::detail::device_of_args(args...);
  std::optional<DType> to;
  if (s.enabled[static_cast<int>(dev)])
    to = amp::detail::target_dtype(id, amp::policy_of(id), dev, s.dtype[static_cast<int>(dev)], args...);
  amp::detail::Suppress inner;
  if (!to) {
    auto out = impl(args...);
    amp::detail::trace_record(id, out, args...);
    anomaly::detail::check_forward(id, to, out, args...);
    return out;
  }
  if (anomaly_mode_enabled()) {  // keep the cast arguments: the report names the dtypes the kernel ran on
    std::tuple<decltype(amp::detail::cast_arg(args, dev, *to))...> cast_args(amp::detail::cast_arg(args, dev, *to)...);
    auto out = std::apply(impl, cast_args);
    amp::detail::trace_record(id, out, args...);
    std::apply([&](const auto&... a) { anomaly::detail::check_forward(id, to, out, a...); }, cast_args);
    return out;
  }
  auto out = impl(amp::detail::cast_arg(args, dev, *to)...);
  amp::detail::trace_record(id, out, args...);
  return out;
}

}  // namespace mixprec
