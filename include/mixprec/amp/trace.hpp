#pragma once
// Precision trace: an opt-in, thread-local recorder of what autocast did, op by op -- how many
// calls ran in each dtype, and how many outputs held inf/NaN or values a 16-bit dtype cannot
// hold (overflow to inf, or underflow to zero). This is how a user audits a mixed-precision step.
//
// Auto-pin (opt-in, trace.auto_pin({.overflow_steps = K, .window = N})): an op whose 16-bit
// outputs overflowed -- inf/NaN from finite inputs, so not a NaN passed along -- in K of the last
// N steps runs in float32 from then on, while the trace is attached: the pin is an override read
// by amp::policy_of (amp/policy.hpp), autocast's one policy lookup. Pins are per op (every call
// of `linear`, not one layer), reported once to the sink (std::cerr unless set) and listed by
// pinned(). A step ends at each GradScaler::update() on this thread (float16 training has one),
// or at trace.step() -- call that yourself only where no GradScaler updates.
#include <array>
#include <bit>
#include <functional>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "mixprec/dtype/dispatch.hpp"
#include "mixprec/amp/policy.hpp"

namespace mixprec::amp {

struct OpTrace {
  std::array<int64_t, kNumDTypes> calls_by_dtype{};  // by output dtype
  int64_t nonfinite_outputs = 0;                      // outputs holding inf or NaN
  int64_t overflow_outputs = 0;                       // finite values beyond the low dtype's max
  int64_t underflow_outputs = 0;                      // non-zero values below its smallest subnormal
};

class PrecisionTrace;

struct AutoPinOptions {
  int64_t overflow_steps = 2;  // K: steps with an overflow ...
  int64_t window = 10;         // N: ... among the last N steps (at most 64) pin the op
  std::function<void(const std::string&)> sink;  // the one-time report; std::cerr when unset
};

// An op auto-pin pinned: when, and the report made.
struct PinEvent {
  std::string op;
  int64_t step;  // steps ended when it was pinned: it runs in float32 from the next one
  std::string message;
};

namespace detail {
inline PrecisionTrace*& active_trace() {
  thread_local PrecisionTrace* t = nullptr;
  return t;
}
}  // namespace detail

inline bool trace_active() { return detail::active_trace() != nullptr; }

class PrecisionTrace {
 public:
  // `low` is the 16-bit dtype whose range the over/underflow counts refer to.
  explicit PrecisionTrace(DType low = DType::Float16) : low_(low), prev_(detail::active_trace()) {
    MIXPREC_CHECK(is_low_precision(low), "PrecisionTrace: low dtype must be float16 or bfloat16, got ", low);
    detail::active_trace() = this;
  }
  ~PrecisionTrace() {
    detail::active_trace() = prev_;
    if (auto_pin_) detail::float32_pins() = prev_pins_;
  }
  PrecisionTrace(const PrecisionTrace&) = delete;
  PrecisionTrace& operator=(const PrecisionTrace&) = delete;

  const std::map<std::string, OpTrace>& ops() const { return ops_; }
  const OpTrace& op(const std::string& name) const {
    auto it = ops_.find(name);
    MIXPREC_CHECK(it != ops_.end(), "PrecisionTrace::op: no call of '", name, "' was recorded");
    return it->second;
  }
  void clear() { ops_.clear(); }

  // Turns auto-pin on (see the top of this file); the pins apply on this thread from now on.
  void auto_pin(AutoPinOptions o = {}) {
    MIXPREC_CHECK(o.window >= 1 && o.window <= 64 && o.overflow_steps >= 1 && o.overflow_steps <= o.window,
                  "PrecisionTrace::auto_pin: need 1 <= overflow_steps <= window <= 64, got ", o.overflow_steps, " and ", o.window);
    MIXPREC_CHECK(detail::active_trace() == this, "PrecisionTrace::auto_pin: the trace must be the one attached on this thread");
    if (!auto_pin_) prev_pins_ = detail::float32_pins();
    detail::float32_pins() = &pins_;
    pin_options_ = std::move(o);
    auto_pin_ = true;
  }
  bool auto_pin_enabled() const { return auto_pin_; }
  // Ends a step: each op's overflow this step enters its window, and an op reaching K of N is pinned.
  void step() {
    ++steps_;
    if (!auto_pin_) return;
    const uint64_t mask = pin_options_.window == 64 ? ~uint64_t{0} : (uint64_t{1} << pin_options_.window) - 1;
    for (std::size_t i = 0; i < window_.size(); ++i) {
      const bool over = i < overflowed_.size() && overflowed_[i];
      window_[i] = ((window_[i] << 1) | (over ? 1u : 0u)) & mask;
      if (over) overflowed_[i] = 0;
      if ((i < pins_.size() && pins_[i]) || std::popcount(window_[i]) < pin_options_.overflow_steps) continue;
      pin(static_cast<OpId>(i));
    }
  }
  int64_t steps() const { return steps_; }
  // The ops auto-pin has pinned, in the order it pinned them, with their reports.
  const std::vector<PinEvent>& pinned() const { return pin_events_; }
  bool is_pinned(OpId id) const { return static_cast<std::size_t>(id) < pins_.size() && pins_[static_cast<std::size_t>(id)]; }

  void record(std::string_view op, const Tensor& out) { (void)record_output(ops_[std::string(op)], out); }

  // What autocast's dispatch calls: `out` is one of op `id`'s outputs, `inputs_finite` says
  // whether all its floating inputs were finite (asked only when the output is not).
  template <class InputsFinite>
  void record(OpId id, const std::string& op, const Tensor& out, InputsFinite&& inputs_finite) {
    if (!record_output(ops_[op], out) || !auto_pin_ || !is_low_precision(out.dtype()) || is_pinned(id)) return;
    if (!inputs_finite()) return;  // a NaN passed along is not this op's overflow
    const auto i = static_cast<std::size_t>(id);
    if (overflowed_.size() <= i) overflowed_.resize(i + 1, 0);
    if (window_.size() <= i) window_.resize(i + 1, 0);
    overflowed_[i] = 1;
  }

  // Whether every floating value of t is finite (CPU tensors; others count as finite).
  static bool all_finite(const Tensor& t) {
    if (!t.defined() || !t.is_floating_point() || t.device() != Device::CPU) return true;
    bool ok = true;
    dispatch_floating(t.dtype(), "PrecisionTrace", [&]<class T>() {
      const Tensor c = t.contiguous();
      const T* p = c.data<T>();
      for (int64_t i = 0, n = c.numel(); i < n && ok; ++i) ok = std::isfinite(static_cast<double>(static_cast<acc_t<T>>(p[i])));
    });
    return ok;
  }

 private:
  // Counts one output; true when it held inf/NaN.
  bool record_output(OpTrace& t, const Tensor& out) {
    if (!out.defined()) return false;
    ++t.calls_by_dtype[static_cast<int>(out.dtype())];
    if (!out.is_floating_point() || out.device() != Device::CPU) return false;
    const double max = low_ == DType::Float16 ? 65504.0 : 3.3895313892515355e38;
    const double tiny = low_ == DType::Float16 ? 5.9604644775390625e-08 : 9.183549615799121e-41;
    bool nonfinite = false, over = false, under = false;
    dispatch_floating(out.dtype(), "PrecisionTrace", [&]<class T>() {
      const Tensor c = out.is_contiguous() ? out : Tensor();
      auto visit = [&](double v) {
        if (!std::isfinite(v)) nonfinite = true;
        else if (std::fabs(v) > max) over = true;
        else if (v != 0 && std::fabs(v) < tiny * 0.5) under = true;
      };
      if (c.defined()) {
        const T* p = c.data<T>();
        for (int64_t i = 0, n = c.numel(); i < n; ++i) visit(static_cast<double>(static_cast<acc_t<T>>(p[i])));
      } else {
        walk<T>(out, visit);
      }
    });
    t.nonfinite_outputs += nonfinite;
    t.overflow_outputs += over;
    t.underflow_outputs += under;
    return nonfinite;
  }

  void pin(OpId id) {
    const auto i = static_cast<std::size_t>(id);
    if (pins_.size() <= i) pins_.resize(i + 1, 0);
    pins_[i] = 1;
    const std::string op = op_name_of(id);
    std::ostringstream msg;
    msg << "mixprec autocast: pinned '" << op << "' to float32 from step " << steps_ << ": its 16-bit outputs overflowed in "
        << std::popcount(window_[i]) << " of the last " << pin_options_.window << " steps (amp::PrecisionTrace auto-pin)";
    pin_events_.push_back({op, steps_, msg.str()});
    if (pin_options_.sink) pin_options_.sink(msg.str());
    else std::cerr << msg.str() << '\n';
  }


 public:
  void print(std::ostream& os = std::cout) const {
    os << std::left << std::setw(32) << "op" << std::setw(9) << "float32" << std::setw(9) << "float64" << std::setw(9)
       << "float16" << std::setw(9) << "bfloat16" << std::setw(9) << "other" << std::setw(10) << "inf/nan" << std::setw(10)
       << "overflow" << "underflow (vs " << low_ << ")\n";
    for (const auto& [name, t] : ops_) {
      int64_t other = 0;
      for (int d = 4; d < kNumDTypes; ++d) other += t.calls_by_dtype[d];
      os << std::left << std::setw(32) << name;
      for (int d = 0; d < 4; ++d) os << std::setw(9) << t.calls_by_dtype[d];
      os << std::setw(9) << other << std::setw(10) << t.nonfinite_outputs << std::setw(10) << t.overflow_outputs
         << t.underflow_outputs << '\n';
    }
  }

 private:
  template <class T, class F>
  static void walk(const Tensor& t, F&& f) {
    const T* base = t.data<T>();
    const auto& s = t.sizes();
    const auto& st = t.strides();
    Shape idx(s.size(), 0);
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      int64_t off = 0;
      for (std::size_t d = 0; d < s.size(); ++d) off += idx[d] * st[d];
      f(static_cast<double>(static_cast<acc_t<T>>(base[off])));
      for (int64_t d = static_cast<int64_t>(s.size()) - 1; d >= 0 && ++idx[d] == s[d]; --d) idx[d] = 0;
    }
  }
  std::map<std::string, OpTrace> ops_;
  DType low_;
  PrecisionTrace* prev_;
  // Auto-pin, all indexed by OpId.
  bool auto_pin_ = false;
  AutoPinOptions pin_options_;
  std::vector<uint8_t> pins_;        // installed as this thread's float32 pins (detail::float32_pins)
  std::vector<uint8_t> overflowed_;  // in the current step
  std::vector<uint64_t> window_;     // bit k: overflowed k steps ago
  std::vector<PinEvent> pin_events_;
  const std::vector<uint8_t>* prev_pins_ = nullptr;
  int64_t steps_ = 0;
};

namespace detail {
// `args` are the op's arguments as the caller passed them (before autocast's casts): a float32
// input beyond float16's range that the cast made inf counts as the op's overflow.
template <class Out, class... Args>
void trace_record(OpId id, const Out& out, const Args&... args) {
  PrecisionTrace* t = active_trace();
  if (!t) return;
  const std::string name = op_name_of(id);
  auto inputs_finite = [&] {
    bool ok = true;
    auto visit = [&](const auto& a) {
      using A = std::decay_t<decltype(a)>;
      if constexpr (std::is_same_v<A, Tensor>) ok = ok && PrecisionTrace::all_finite(a);
      else if constexpr (std::is_same_v<A, std::vector<Tensor>>) for (const Tensor& x : a) ok = ok && PrecisionTrace::all_finite(x);
    };
    (visit(args), ...);
    return ok;
  };
  if constexpr (std::is_same_v<Out, Tensor>) t->record(id, name, out, inputs_finite);
  else if constexpr (requires { std::get<0>(out); }) t->record(id, name, std::get<0>(out), inputs_finite);
  else if constexpr (std::is_same_v<Out, std::vector<Tensor>>) for (const Tensor& o : out) t->record(id, name, o, inputs_finite);
}
}  // namespace detail

}  // namespace mixprec::amp
