#pragma once
// Shared helpers for op tests: relative norm error against a reference (NaN never passes).
#include <cmath>
#include <map>
#include <functional>
#include <string>
#include <limits>
#include <vector>

#include <mixprec/mixprec.hpp>

namespace mixprec::testing {

inline std::vector<double> to_doubles(const Tensor& t) {
  const Tensor c = t.detach().to(DType::Float64).contiguous();
  return std::vector<double>(c.data<double>(), c.data<double>() + c.numel());
}

// ||a - ref|| / ||ref||; infinity if any value is NaN or the sizes differ.
inline double rel_error(const Tensor& a, const std::vector<double>& ref) {
  const std::vector<double> v = to_doubles(a);
  if (v.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (std::isnan(v[i]) || std::isnan(ref[i])) return std::numeric_limits<double>::infinity();
    num += (v[i] - ref[i]) * (v[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}
inline double rel_error(const Tensor& a, const Tensor& ref) { return rel_error(a, to_doubles(ref)); }

// The message of the mixprec::Error that f throws; empty if it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Tolerances for 16-bit inputs against a float32 result (relative norm error).
inline double low_tolerance(DType d) { return d == DType::BFloat16 ? 1e-2 : 2e-3; }

// A copy of device d's kernel table, registered for the scope and replaced by the previous one at
// its end whatever an assertion does in between; edit `table` to wrap or remove entries.
struct ScopedKernels {
  Device device;
  DeviceKernels table;
  const DeviceKernels* prev;
  ScopedKernels(Device d, const DeviceKernels& t) : device(d), table(t), prev(set_device_kernels(d, &table)) {}
  ScopedKernels(const ScopedKernels&) = delete;
  ScopedKernels& operator=(const ScopedKernels&) = delete;
  ~ScopedKernels() { set_device_kernels(device, prev); }
};

// The kernel-table routing tests (tests/backends/test_cpu_table_*.cpp): wrappers installed with
// ScopedKernels count their calls here by entry name and forward to the real CPU table.
inline std::map<std::string, int>& calls() {
  static std::map<std::string, int> c;
  return c;
}
inline const DeviceKernels& real() { return cpu::detail::cpu_kernel_table(); }

}  // namespace mixprec::testing
