#pragma once
// MaxPool2d, AvgPool2d, AdaptiveAvgPool2d over [N, C, H, W] (or [C, H, W]).
#include <optional>

#include "mixprec/nn/module.hpp"
#include "mixprec/ops/pool.hpp"

namespace mixprec::nn {

// stride defaults to kernel_size, as PyTorch.
class MaxPool2d : public Module {
 public:
  MaxPool2d(Size2 kernel_size, std::optional<Size2> stride = std::nullopt, Size2 padding = 0, Size2 dilation = 1, bool ceil_mode = false)
      : Module("MaxPool2d"), kernel_size(kernel_size), stride(stride.value_or(kernel_size)), padding(padding), dilation(dilation),
        ceil_mode(ceil_mode) {}
  Tensor forward(const Tensor& x) override {
    return mixprec::max_pool2d(x, kernel_size.arr(), stride.arr(), padding.arr(), dilation.arr(), ceil_mode);
  }
  std::string extra_repr() const override {
    return "kernel_size=" + kernel_size.repr() + ", stride=" + stride.repr() + ", padding=" + padding.repr() +
           ", dilation=" + dilation.repr() + ", ceil_mode=" + detail::py_bool(ceil_mode);
  }
  Size2 kernel_size, stride, padding, dilation;
  bool ceil_mode;
};

class AvgPool2d : public Module {
 public:
  AvgPool2d(Size2 kernel_size, std::optional<Size2> stride = std::nullopt, Size2 padding = 0, bool ceil_mode = false,
            bool count_include_pad = true)
      : Module("AvgPool2d"), kernel_size(kernel_size), stride(stride.value_or(kernel_size)), padding(padding), ceil_mode(ceil_mode),
        count_include_pad(count_include_pad) {}
  Tensor forward(const Tensor& x) override {
    return mixprec::avg_pool2d(x, kernel_size.arr(), stride.arr(), padding.arr(), ceil_mode, count_include_pad);
  }
  std::string extra_repr() const override {
    return "kernel_size=" + kernel_size.repr() + ", stride=" + stride.repr() + ", padding=" + padding.repr();
  }
  Size2 kernel_size, stride, padding;
  bool ceil_mode, count_include_pad;
};

class AdaptiveAvgPool2d : public Module {
 public:
  explicit AdaptiveAvgPool2d(Size2 output_size) : Module("AdaptiveAvgPool2d"), output_size(output_size) {}
  Tensor forward(const Tensor& x) override { return mixprec::adaptive_avg_pool2d(x, output_size.arr()); }
  std::string extra_repr() const override { return "output_size=" + output_size.tuple(); }
  Size2 output_size;
};

}  // namespace mixprec::nn
