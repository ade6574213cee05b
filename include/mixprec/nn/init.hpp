#pragma once
// nn::init: torch.nn.init's in-place initialisers. Each takes a tensor handle (views work too),
// writes through it and returns it. They run under no_grad, so they work on parameters that
// require grad, and draw from a seedable Generator in the tensor's row-major order.
#include <cmath>
#include <string_view>

#include "mixprec/nn/module.hpp"

namespace mixprec::nn::init {

namespace detail {
// Writes f() for each element in row-major order.
template <class F>
void fill_with(Tensor t, const char* op, F&& f) {
  MIXPREC_CHECK(t.defined() && t.is_floating_point(), "nn::init::", op, ": expected a floating-point tensor, got ",
                t.defined() ? name(t.dtype()) : "undefined");
  mixprec::detail::require_cpu(op, t);
  no_grad guard;
  if (t.is_contiguous()) {
    dispatch_floating(t.dtype(), op, [&]<class T>() {
      T* p = t.data<T>();
      for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(static_cast<acc_t<T>>(f()));
    });
  } else {
    Tensor v = empty(t.sizes(), DType::Float64);
    double* p = v.data<double>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = f();
    mixprec::detail::copy_kernel(t, v);
  }
  t.bump_version();
}
}  // namespace detail

// torch.nn.init.calculate_gain. `param` is leaky_relu's negative slope.
inline double calculate_gain(std::string_view nonlinearity, double param = 0.01) {
  if (nonlinearity == "linear" || nonlinearity == "identity" || nonlinearity == "sigmoid" || nonlinearity.rfind("conv", 0) == 0)
    return 1.0;
  if (nonlinearity == "tanh") return 5.0 / 3.0;
  if (nonlinearity == "relu") return std::sqrt(2.0);
  if (nonlinearity == "leaky_relu") return std::sqrt(2.0 / (1.0 + param * param));
  if (nonlinearity == "selu") return 3.0 / 4.0;
  fail("nn::init::calculate_gain: unsupported nonlinearity '", nonlinearity,
       "' (expected linear, conv*, sigmoid, tanh, relu, leaky_relu or selu)");
}

// (fan_in, fan_out) of a weight [out, in, *kernel]: in * receptive field, out * receptive field.
inline std::pair<int64_t, int64_t> fan_in_and_fan_out(const Tensor& t) {
  MIXPREC_CHECK(t.defined() && t.dim() >= 2, "nn::init: fan in and fan out cannot be computed for a tensor with fewer than 2 "
                "dimensions, got shape ", t.defined() ? t.sizes() : Shape{});
  int64_t receptive = 1;
  for (int64_t d = 2; d < t.dim(); ++d) receptive *= t.size(d);
  return {t.size(1) * receptive, t.size(0) * receptive};
}

inline int64_t select_fan(const Tensor& t, std::string_view mode) {
  MIXPREC_CHECK(mode == "fan_in" || mode == "fan_out", "nn::init: mode must be 'fan_in' or 'fan_out', got '", mode, "'");
  const auto [in, out] = fan_in_and_fan_out(t);
  return mode == "fan_in" ? in : out;
}

inline Tensor uniform_(Tensor t, double a = 0.0, double b = 1.0, Generator& gen = default_generator()) {
  MIXPREC_CHECK(a <= b, "nn::init::uniform_: lower bound ", a, " exceeds upper bound ", b);
  detail::fill_with(t, "uniform_", [&] { return a + (b - a) * gen.uniform(); });
  return t;
}
inline Tensor normal_(Tensor t, double mean = 0.0, double std = 1.0, Generator& gen = default_generator()) {
  MIXPREC_CHECK(std >= 0, "nn::init::normal_: std must be non-negative, got ", std);
  // Marsaglia's polar method, both values of each pair used: no trigonometry and half the logs
  // of one Generator::normal() per value (initialising a ResNet-50 is dominated by this).
  bool have_spare = false;
  double spare = 0;
  detail::fill_with(t, "normal_", [&] {
    if (have_spare) {
      have_spare = false;
      return mean + std * spare;
    }
    double u, v, s;
    do {
      u = 2.0 * gen.uniform() - 1.0;
      v = 2.0 * gen.uniform() - 1.0;
      s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    const double f = std::sqrt(-2.0 * std::log(s) / s);
    spare = v * f;
    have_spare = true;
    return mean + std * u * f;
  });
  return t;
}
inline Tensor constant_(Tensor t, double value) {
  detail::fill_with(t, "constant_", [&] { return value; });
  return t;
}
inline Tensor zeros_(Tensor t) { return constant_(t, 0.0); }
inline Tensor ones_(Tensor t) { return constant_(t, 1.0); }

// Glorot: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out)).
inline Tensor xavier_uniform_(Tensor t, double gain = 1.0, Generator& gen = default_generator()) {
  const auto [in, out] = fan_in_and_fan_out(t);
  const double bound = gain * std::sqrt(6.0 / static_cast<double>(in + out));
  return uniform_(t, -bound, bound, gen);
}
inline Tensor xavier_normal_(Tensor t, double gain = 1.0, Generator& gen = default_generator()) {
  const auto [in, out] = fan_in_and_fan_out(t);
  return normal_(t, 0.0, gain * std::sqrt(2.0 / static_cast<double>(in + out)), gen);
}

// He: U(-b, b) with b = gain * sqrt(3 / fan). PyTorch's Linear and Conv use a = sqrt(5), which
// gives b = 1 / sqrt(fan_in).
inline Tensor kaiming_uniform_(Tensor t, double a = 0.0, std::string_view mode = "fan_in",
                                std::string_view nonlinearity = "leaky_relu", Generator& gen = default_generator()) {
  const int64_t fan = select_fan(t, mode);
  MIXPREC_CHECK(fan > 0, "nn::init::kaiming_uniform_: zero fan for a tensor of shape ", t.sizes());
  const double bound = calculate_gain(nonlinearity, a) * std::sqrt(3.0 / static_cast<double>(fan));
  return uniform_(t, -bound, bound, gen);
}
inline Tensor kaiming_normal_(Tensor t, double a = 0.0, std::string_view mode = "fan_in",
                               std::string_view nonlinearity = "leaky_relu", Generator& gen = default_generator()) {
  const int64_t fan = select_fan(t, mode);
  MIXPREC_CHECK(fan > 0, "nn::init::kaiming_normal_: zero fan for a tensor of shape ", t.sizes());
  return normal_(t, 0.0, calculate_gain(nonlinearity, a) / std::sqrt(static_cast<double>(fan)), gen);
}

}  // namespace mixprec::nn::init
