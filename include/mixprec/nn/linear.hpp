#pragma once
// Identity, Linear, Flatten, Embedding.
#include <cmath>
#include <optional>

#include "mixprec/amp/fp8.hpp"
#include "mixprec/nn/init.hpp"
#include "mixprec/ops/linalg.hpp"
#include "mixprec/ops/shape.hpp"

namespace mixprec::nn {

class Identity : public Module {
 public:
  Identity() : Module("Identity") {}
  Tensor forward(const Tensor& x) override { return x; }
};

// y = x W^T + b. Default init as PyTorch: W ~ kaiming_uniform(a = sqrt(5)), i.e.
// U(-1/sqrt(in), 1/sqrt(in)), and b ~ U(-1/sqrt(in), 1/sqrt(in)).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = true, Generator& gen = default_generator())
      : Module("Linear"), in_features(in_features), out_features(out_features) {
    MIXPREC_CHECK(in_features > 0 && out_features > 0, "Linear: in_features and out_features must be positive, got ", in_features,
                  " and ", out_features);
    weight = empty({out_features, in_features});
    init::kaiming_uniform_(weight, std::sqrt(5.0), "fan_in", "leaky_relu", gen);
    register_parameter("weight", weight);
    if (bias) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
      this->bias = empty({out_features});
      init::uniform_(this->bias, -bound, bound, gen);
    }
    register_parameter("bias", this->bias);
  }
  // Under amp::fp8_autocast: from fp8 operands, with this layer's delayed-scaling state.
  Tensor forward(const Tensor& x) override {
    if (amp::fp8_autocast::is_enabled()) {
      if (!fp8_meta) fp8_meta = std::make_shared<amp::Fp8LinearMeta>();
      return amp::fp8_linear(x, weight, bias, fp8_meta);
    }
    return mixprec::linear(x, weight, bias);
  }
  std::string extra_repr() const override {
    return "in_features=" + std::to_string(in_features) + ", out_features=" + std::to_string(out_features) +
           ", bias=" + detail::py_bool(bias.defined());
  }

  int64_t in_features, out_features;
  Tensor weight, bias;
  std::shared_ptr<amp::Fp8LinearMeta> fp8_meta;  // amax histories and scales; made by the first fp8 forward
};

class Flatten : public Module {
 public:
  explicit Flatten(int64_t start_dim = 1, int64_t end_dim = -1) : Module("Flatten"), start_dim(start_dim), end_dim(end_dim) {}
  Tensor forward(const Tensor& x) override { return x.flatten(start_dim, end_dim); }
  std::string extra_repr() const override {
    return "start_dim=" + std::to_string(start_dim) + ", end_dim=" + std::to_string(end_dim);
  }
  int64_t start_dim, end_dim;
};

// A lookup table [num_embeddings, embedding_dim], initialised N(0, 1) as PyTorch; the
// padding_idx row (if any) starts at zero and gets no gradient.
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t embedding_dim, std::optional<int64_t> padding_idx = std::nullopt,
            Generator& gen = default_generator())
      : Module("Embedding"), num_embeddings(num_embeddings), embedding_dim(embedding_dim) {
    MIXPREC_CHECK(num_embeddings > 0 && embedding_dim > 0, "Embedding: num_embeddings and embedding_dim must be positive, got ",
                  num_embeddings, " and ", embedding_dim);
    if (padding_idx) {
      MIXPREC_CHECK(*padding_idx >= -num_embeddings && *padding_idx < num_embeddings, "Embedding: padding_idx ", *padding_idx,
                    " must be within the ", num_embeddings, " embeddings");
      this->padding_idx = *padding_idx < 0 ? *padding_idx + num_embeddings : *padding_idx;
    }
    weight = empty({num_embeddings, embedding_dim});
    init::normal_(weight, 0.0, 1.0, gen);
    if (this->padding_idx) init::zeros_(weight.select(0, *this->padding_idx));
    register_parameter("weight", weight);
  }
  // indices: int64 or int32 of any shape -> indices.shape + [embedding_dim].
  Tensor forward(const Tensor& indices) override { return mixprec::embedding(weight, indices, padding_idx); }
  std::string extra_repr() const override {
    std::string s = std::to_string(num_embeddings) + ", " + std::to_string(embedding_dim);
    if (padding_idx) s += ", padding_idx=" + std::to_string(*padding_idx);
    return s;
  }

  int64_t num_embeddings, embedding_dim;
  std::optional<int64_t> padding_idx;
  Tensor weight;
};

}  // namespace mixprec::nn
