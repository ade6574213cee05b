#pragma once
// ReLU, GELU, SiLU, Tanh, Sigmoid, Dropout.
#include "mixprec/nn/module.hpp"
#include "mixprec/ops/activation.hpp"
#include "mixprec/ops/elementwise.hpp"

namespace mixprec::nn {

class ReLU : public Module {
 public:
  ReLU() : Module("ReLU") {}
  Tensor forward(const Tensor& x) override { return mixprec::relu(x); }
};

// approximate: "none" (erf) or "tanh".
class GELU : public Module {
 public:
  explicit GELU(std::string approximate = "none") : Module("GELU"), approximate(std::move(approximate)) {
    MIXPREC_CHECK(this->approximate == "none" || this->approximate == "tanh", "GELU: approximate must be 'none' or 'tanh', got '",
                  this->approximate, "'");
  }
  Tensor forward(const Tensor& x) override { return mixprec::gelu(x, approximate); }
  std::string extra_repr() const override { return "approximate='" + approximate + "'"; }
  std::string approximate;
};

class SiLU : public Module {
 public:
  SiLU() : Module("SiLU") {}
  Tensor forward(const Tensor& x) override { return mixprec::silu(x); }
};

class Tanh : public Module {
 public:
  Tanh() : Module("Tanh") {}
  Tensor forward(const Tensor& x) override { return mixprec::tanh(x); }
};

class Sigmoid : public Module {
 public:
  Sigmoid() : Module("Sigmoid") {}
  Tensor forward(const Tensor& x) override { return mixprec::sigmoid(x); }
};

// Zeroes elements with probability p in training mode (scaling the rest by 1/(1-p)); the
// identity in eval mode. Masks come from `gen`, which must outlive the module.
class Dropout : public Module {
 public:
  explicit Dropout(double p = 0.5, Generator& gen = default_generator()) : Module("Dropout"), p(p), gen_(&gen) {
    MIXPREC_CHECK(p >= 0.0 && p <= 1.0, "Dropout: probability has to be between 0 and 1, got ", p);
  }
  Tensor forward(const Tensor& x) override { return mixprec::dropout(x, p, is_training(), *gen_); }
  std::string extra_repr() const override { return "p=" + detail::py_float(p); }
  double p;

 private:
  Generator* gen_;
};

}  // namespace mixprec::nn
