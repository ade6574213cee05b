#pragma once
// Anomaly mode: the tool for a float16 run that diverges. Inside a detect_anomaly scope every op
// output (forward, at the dispatch point) and every gradient a backward node returns (engine) is
// scanned, and the first op that *produced* inf/NaN -- from inputs that were all finite -- is
// named with the dtypes and shapes it ran on. Ops that merely pass along an inf they were given
// (a -inf attention mask, masked_fill(x, m, -inf)) are not blamed. Off, it costs one
// thread-local load per op and per backward node.
//
//   { detect_anomaly guard; loss = model(x); loss.backward(); }   // throws mixprec::Error
//   detect_anomaly rec{detect_anomaly::Action::Record};            // or keep the first report
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mixprec/amp/policy.hpp"
#include "mixprec/dtype/dispatch.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec {

struct Anomaly {
  std::string op;       // the op's name (a backward anomaly names its forward op)
  bool backward = false;
  std::string message;  // what mixprec::Error carries in Throw mode
};

class detect_anomaly;

namespace anomaly::detail {
inline detect_anomaly*& active() {
  thread_local detect_anomaly* a = nullptr;
  return a;
}
}  // namespace anomaly::detail

inline bool anomaly_mode_enabled() { return anomaly::detail::active() != nullptr; }

// Thread-local and nestable: the innermost guard decides (enabled=false switches checks off
// inside an outer guard); its destructor restores the outer one.
class detect_anomaly {
 public:
  enum class Action { Throw, Record };
  MIXPREC_GUARD explicit detect_anomaly(Action action = Action::Throw, bool enabled = true)
      : action_(action), prev_(anomaly::detail::active()) {
    anomaly::detail::active() = enabled ? this : nullptr;
  }
  MIXPREC_GUARD explicit detect_anomaly(bool enabled) : detect_anomaly(Action::Throw, enabled) {}
  ~detect_anomaly() { anomaly::detail::active() = prev_; }
  detect_anomaly(const detect_anomaly&) = delete;
  detect_anomaly& operator=(const detect_anomaly&) = delete;

  // Record mode: the first anomaly seen in this scope, if any.
  const std::optional<Anomaly>& first() const { return first_; }
  // Record mode keeps only the first anomaly: later ops are not scanned.
  bool wants_more() const { return action_ == Action::Throw || !first_; }
  void report(Anomaly a) {
    if (action_ == Action::Throw) throw Error(a.message);
    if (!first_) first_ = std::move(a);
  }

 private:
  Action action_;
  detect_anomaly* prev_;
  std::optional<Anomaly> first_;
};

namespace anomaly::detail {

struct NonFinite {
  int64_t inf = 0, nan = 0, first = -1;  // counts, and the first flat index holding either
  bool any() const { return inf + nan > 0; }
};

// Out of line in the compiled mode (core/config.hpp): a debugging pass every op's dispatch names.
MIXPREC_OUTLINE NonFinite scan(const Tensor& t);
#if MIXPREC_HEADER_DEFINITIONS
MIXPREC_OUTLINE NonFinite scan(const Tensor& t) {
  NonFinite r;
  if (!t.defined() || !t.is_floating_point() || t.device() != Device::CPU || t.numel() == 0) return r;
  dispatch_floating(t.dtype(), "detect_anomaly", [&]<class T>() {
    auto visit = [&](int64_t i, T x) {
      const auto v = static_cast<acc_t<T>>(x);
      if (std::isnan(v)) ++r.nan;
      else if (std::isinf(v)) ++r.inf;
      else return;
      if (r.first < 0) r.first = i;
    };
    const T* base = t.data<T>();
    const int64_t n = t.numel();
    if (t.is_contiguous()) {
      for (int64_t i = 0; i < n; ++i) visit(i, base[i]);
      return;
    }
    const Shape& s = t.sizes();
    const Shape& st = t.strides();
    Shape idx(s.size(), 0);
    for (int64_t i = 0; i < n; ++i) {
      int64_t off = 0;
      for (std::size_t d = 0; d < s.size(); ++d) off += idx[d] * st[d];
      visit(i, base[off]);
      for (int64_t d = static_cast<int64_t>(s.size()) - 1; d >= 0 && ++idx[d] == s[d]; --d) idx[d] = 0;
    }
  });
  return r;
}
#endif  // MIXPREC_HEADER_DEFINITIONS

inline void describe(std::ostringstream& os, const Tensor& t) {
  if (!t.defined()) {
    os << "undefined";
    return;
  }
  os << t.dtype() << ' ';
  mixprec::detail::stream_all(os, t.sizes());
}

// Tensors among an op's arguments, in order (Tensor and std::vector<Tensor> arguments).
template <class A>
void collect(std::vector<Tensor>& out, const A& a) {
  if constexpr (std::is_same_v<A, Tensor>) out.push_back(a);
  else if constexpr (std::is_same_v<A, std::vector<Tensor>>) out.insert(out.end(), a.begin(), a.end());
}
template <class O>
std::vector<Tensor> outputs_of(const O& out) {
  std::vector<Tensor> v;
  if constexpr (std::is_same_v<O, Tensor> || std::is_same_v<O, std::vector<Tensor>>) collect(v, out);
  else if constexpr (requires { std::tuple_size<O>::value; }) std::apply([&](const auto&... e) { (collect(v, e), ...); }, out);
  return v;
}
// A non-finite scalar argument (masked_fill's -inf, clamp's bound) asks for inf/NaN on purpose.
template <class A>
bool nonfinite_scalar(const A& a) {
  if constexpr (std::is_floating_point_v<A>) return !std::isfinite(a);
  else return false;
}

inline void describe_list(std::ostringstream& os, const std::vector<Tensor>& ts, bool with_counts) {
  for (std::size_t i = 0; i < ts.size(); ++i) {
    if (i) os << ", ";
    describe(os, ts[i]);
    if (with_counts) {
      const NonFinite r = scan(ts[i]);
      if (r.any()) os << " (" << r.inf << " inf, " << r.nan << " NaN)";
    }
  }
  if (ts.empty()) os << "none";
}

// Index of the first tensor in `ts` holding inf/NaN, with its counts; nullopt if none does.
inline std::optional<std::pair<std::size_t, NonFinite>> first_nonfinite(const std::vector<Tensor>& ts) {
  for (std::size_t i = 0; i < ts.size(); ++i) {
    const NonFinite r = scan(ts[i]);
    if (r.any()) return std::make_pair(i, r);
  }
  return std::nullopt;
}

inline bool all_finite(const std::vector<Tensor>& ts) { return !first_nonfinite(ts).has_value(); }

// Called by mixprec::dispatch with the arguments the kernel ran on (after autocast's casts).
template <class Out, class... Args>
void check_forward(OpId id, std::optional<DType> autocast_to, const Out& out, const Args&... args) {
  detect_anomaly* guard = active();
  if (!guard || !guard->wants_more()) return;
  const auto bad = first_nonfinite(outputs_of(out));
  if (!bad || (nonfinite_scalar(args) || ...)) return;
  std::vector<Tensor> inputs;
  (collect(inputs, args), ...);
  if (!all_finite(inputs)) return;  // passed along, not produced, here
  const std::string op = amp::op_name_of(id);
  const std::vector<Tensor> outs = outputs_of(out);
  std::ostringstream os;
  os << "detect_anomaly: forward of '" << op << "' produced " << bad->second.inf << " inf and " << bad->second.nan
     << " NaN in output " << bad->first << " (";
  describe(os, outs[bad->first]);
  os << ", first at flat index " << bad->second.first << ") from finite inputs: ";
  describe_list(os, inputs, false);
  if (autocast_to) os << " (autocast ran it in " << *autocast_to << ")";
  guard->report({op, false, os.str()});
}

// Called by the engine after a node's backward: `grad_in` are the gradients it received,
// `grad_out` those it returned (one per forward input).
inline void check_backward(const std::string& op, const std::vector<Tensor>& grad_in, const std::vector<Tensor>& grad_out) {
  detect_anomaly* guard = active();
  if (!guard || !guard->wants_more()) return;
  const auto bad = first_nonfinite(grad_out);
  if (!bad || !all_finite(grad_in)) return;
  std::ostringstream os;
  os << "detect_anomaly: backward of '" << op << "' produced " << bad->second.inf << " inf and " << bad->second.nan
     << " NaN in the gradient of input " << bad->first << " (";
  describe(os, grad_out[bad->first]);
  os << ", first at flat index " << bad->second.first << ") from finite incoming gradients: ";
  describe_list(os, grad_in, false);
  os << "; gradients returned for its inputs: ";
  describe_list(os, grad_out, true);
  guard->report({op, true, os.str()});
}

// Two finite gradients of one tensor can still sum to inf in float16.
inline void check_accumulation(const std::string& op, const Tensor& a, const Tensor& b, const Tensor& sum) {
  detect_anomaly* guard = active();
  if (!guard || !guard->wants_more()) return;
  const NonFinite r = scan(sum);
  if (!r.any() || scan(a).any() || scan(b).any()) return;
  std::ostringstream os;
  os << "detect_anomaly: backward: summing two finite gradients flowing into '" << op << "' produced " << r.inf
     << " inf and " << r.nan << " NaN (";
  describe(os, sum);
  os << " from ";
  describe(os, a);
  os << " + ";
  describe(os, b);
  os << ")";
  guard->report({op, true, os.str()});
}

}  // namespace anomaly::detail
}  // namespace mixprec
