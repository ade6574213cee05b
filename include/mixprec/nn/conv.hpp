#pragma once
// Conv2d.
#include <cmath>

#include "mixprec/nn/init.hpp"
#include "mixprec/ops/conv.hpp"

namespace mixprec::nn {

// 2-D convolution over [N, C, H, W] (or unbatched [C, H, W]). Weight [out, in/groups, kh, kw];
// default init as PyTorch: kaiming_uniform(a = sqrt(5)) and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
class Conv2d : public Module {
 public:
  Conv2d(int64_t in_channels, int64_t out_channels, Size2 kernel_size, Size2 stride = 1, Size2 padding = 0, Size2 dilation = 1,
         int64_t groups = 1, bool bias = true, Generator& gen = default_generator())
      : Module("Conv2d"), in_channels(in_channels), out_channels(out_channels), kernel_size(kernel_size), stride(stride),
        padding(padding), dilation(dilation), groups(groups) {
    MIXPREC_CHECK(in_channels > 0 && out_channels > 0, "Conv2d: in_channels and out_channels must be positive, got ", in_channels,
                  " and ", out_channels);
    MIXPREC_CHECK(groups > 0 && in_channels % groups == 0 && out_channels % groups == 0, "Conv2d: in_channels (", in_channels,
                  ") and out_channels (", out_channels, ") must be divisible by groups (", groups, ")");
    MIXPREC_CHECK(kernel_size.h > 0 && kernel_size.w > 0 && stride.h > 0 && stride.w > 0 && padding.h >= 0 && padding.w >= 0 &&
                      dilation.h > 0 && dilation.w > 0,
                  "Conv2d: invalid kernel_size ", kernel_size.tuple(), ", stride ", stride.tuple(), ", padding ", padding.tuple(),
                  " or dilation ", dilation.tuple());
    weight = empty({out_channels, in_channels / groups, kernel_size.h, kernel_size.w});
    init::kaiming_uniform_(weight, std::sqrt(5.0), "fan_in", "leaky_relu", gen);
    register_parameter("weight", weight);
    if (bias) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(init::fan_in_and_fan_out(weight).first));
      this->bias = empty({out_channels});
      init::uniform_(this->bias, -bound, bound, gen);
    }
    register_parameter("bias", this->bias);
  }
  Tensor forward(const Tensor& x) override {
    return mixprec::conv2d(x, weight, bias, stride.arr(), padding.arr(), dilation.arr(), groups);
  }
  std::string extra_repr() const override {
    std::string s = std::to_string(in_channels) + ", " + std::to_string(out_channels) + ", kernel_size=" + kernel_size.tuple() +
                    ", stride=" + stride.tuple();
    if (padding != Size2(0)) s += ", padding=" + padding.tuple();
    if (dilation != Size2(1)) s += ", dilation=" + dilation.tuple();
    if (groups != 1) s += ", groups=" + std::to_string(groups);
    if (!bias.defined()) s += ", bias=False";
    return s;
  }

  int64_t in_channels, out_channels;
  Size2 kernel_size, stride, padding, dilation;
  int64_t groups;
  Tensor weight, bias;
};

}  // namespace mixprec::nn
