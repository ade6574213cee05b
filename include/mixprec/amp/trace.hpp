#pragma once
// Precision trace: an opt-in, thread-local recorder of what autocast did, op by op -- how many
// calls ran in each dtype, and how many outputs held inf/NaN or values a 16-bit dtype cannot
// hold (overflow to inf, or underflow to zero). This is how a user audits a mixed-precision step.
#include <array>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <map>
#include <string>

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
  ~PrecisionTrace() { detail::active_trace() = prev_; }
  PrecisionTrace(const PrecisionTrace&) = delete;
  PrecisionTrace& operator=(const PrecisionTrace&) = delete;

  const std::map<std::string, OpTrace>& ops() const { return ops_; }
  const OpTrace& op(const std::string& name) const {
    auto it = ops_.find(name);
    MIXPREC_CHECK(it != ops_.end(), "PrecisionTrace::op: no call of '", name, "' was recorded");
    return it->second;
  }
  void clear() { ops_.clear(); }

  void record(std::string_view op, const Tensor& out) {
    if (!out.defined()) return;
    OpTrace& t = ops_[std::string(op)];
    ++t.calls_by_dtype[static_cast<int>(out.dtype())];
    if (!out.is_floating_point() || out.device() != Device::CPU) return;
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
  }

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
};

namespace detail {
template <class Out>
void trace_record(OpId id, const Out& out) {
  PrecisionTrace* t = active_trace();
  if (!t) return;
  const std::string name = op_name_of(id);
  if constexpr (std::is_same_v<Out, Tensor>) t->record(name, out);
  else if constexpr (requires { std::get<0>(out); }) t->record(name, std::get<0>(out));
  else if constexpr (std::is_same_v<Out, std::vector<Tensor>>) for (const Tensor& o : out) t->record(name, o);
}
}  // namespace detail

}  // namespace mixprec::amp
