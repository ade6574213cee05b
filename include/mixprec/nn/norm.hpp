#pragma once
// BatchNorm2d, LayerNorm, GroupNorm. Affine weights start at 1 and biases at 0, as PyTorch.
#include <optional>

#include "mixprec/nn/init.hpp"
#include "mixprec/ops/normalization.hpp"

namespace mixprec::nn {

// Per-channel normalisation of [N, C, H, W]. Training mode normalises with the batch statistics
// and updates running_mean / running_var (momentum, or a cumulative average when momentum is
// nullopt, PyTorch's momentum=None); eval mode uses the running statistics, unless
// track_running_stats is false, in which case batch statistics are used in both modes.
// The buffers follow Module::to(dtype) like everything else (PyTorch's behaviour); keep a
// model in float32 and use autocast if the statistics should stay float32.
class BatchNorm2d : public Module {
 public:
  explicit BatchNorm2d(int64_t num_features, double eps = 1e-5, std::optional<double> momentum = 0.1, bool affine = true,
                       bool track_running_stats = true)
      : Module("BatchNorm2d"), num_features(num_features), eps(eps), momentum(momentum), affine(affine),
        track_running_stats(track_running_stats) {
    MIXPREC_CHECK(num_features > 0, "BatchNorm2d: num_features must be positive, got ", num_features);
    MIXPREC_CHECK(!momentum || (*momentum >= 0 && *momentum <= 1), "BatchNorm2d: momentum must be in [0, 1], got ", *momentum);
    if (affine) {
      weight = ones({num_features});
      bias = zeros({num_features});
    }
    register_parameter("weight", weight);
    register_parameter("bias", bias);
    if (track_running_stats) {
      running_mean = zeros({num_features});
      running_var = ones({num_features});
      num_batches_tracked = zeros({}, DType::Int64);
    }
    register_buffer("running_mean", running_mean);
    register_buffer("running_var", running_var);
    register_buffer("num_batches_tracked", num_batches_tracked);
  }

  Tensor forward(const Tensor& x) override { return run(x, false); }
  // relu(forward(x)) in one kernel where the device has it (mixprec::batch_norm_relu): a
  // conv-BN-ReLU network calls this instead of forward and a separate ReLU.
  Tensor forward_relu(const Tensor& x) { return run(x, true); }
  std::string extra_repr() const override {
    return std::to_string(num_features) + ", eps=" + detail::py_float(eps) +
           ", momentum=" + (momentum ? detail::py_float(*momentum) : std::string("None")) + ", affine=" + detail::py_bool(affine) +
           ", track_running_stats=" + detail::py_bool(track_running_stats);
  }

  int64_t num_features;
  double eps;
  std::optional<double> momentum;
  bool affine, track_running_stats;
  Tensor weight, bias;
  Tensor running_mean, running_var, num_batches_tracked;

 private:
  Tensor run(const Tensor& x, bool relu) {
    MIXPREC_CHECK(x.defined() && x.dim() == 4, "BatchNorm2d: expected a 4-D input [N, C, H, W], got shape ",
                  x.defined() ? x.sizes() : Shape{});
    MIXPREC_CHECK(x.size(1) == num_features, "BatchNorm2d: expected ", num_features, " channels, got input of shape ", x.sizes());
    double m = momentum.value_or(0.0);
    if (is_training() && track_running_stats) {
      const int64_t n = count_batch();
      if (!momentum) m = 1.0 / static_cast<double>(n);
    }
    const bool use_batch_stats = is_training() || !track_running_stats;
    return relu ? mixprec::batch_norm_relu(x, running_mean, running_var, weight, bias, use_batch_stats, m, eps)
                : mixprec::batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, m, eps);
  }
  // num_batches_tracked + 1, written back. The count is kept on the host too, trusted while the
  // buffer is the tensor last written and nothing else wrote it since (a load or a move to
  // another device makes one read): a device buffer is never read, or waited for, per step.
  int64_t count_batch() {
    Tensor& t = num_batches_tracked;
    const bool known = counted_impl_.lock().get() == t.impl() && t.version() == counted_version_;
    const int64_t n = (known ? counted_ : t.item<int64_t>()) + 1;
    t.fill_(static_cast<double>(n));
    counted_ = n;
    counted_impl_ = t.impl_ptr();
    counted_version_ = t.version();
    return n;
  }
  int64_t counted_ = 0;
  std::weak_ptr<TensorImpl> counted_impl_;
  uint64_t counted_version_ = 0;
};

// Normalises over the trailing normalized_shape dims, with optional elementwise affine.
class LayerNorm : public Module {
 public:
  explicit LayerNorm(Shape normalized_shape, double eps = 1e-5, bool elementwise_affine = true, bool bias = true)
      : Module("LayerNorm"), normalized_shape(std::move(normalized_shape)), eps(eps), elementwise_affine(elementwise_affine) {
    MIXPREC_CHECK(!this->normalized_shape.empty(), "LayerNorm: normalized_shape must have at least one dimension");
    for (int64_t d : this->normalized_shape)
      MIXPREC_CHECK(d > 0, "LayerNorm: normalized_shape must be positive, got ", this->normalized_shape);
    if (elementwise_affine) {
      weight = ones(this->normalized_shape);
      if (bias) this->bias = zeros(this->normalized_shape);
    }
    register_parameter("weight", weight);
    register_parameter("bias", this->bias);
  }
  explicit LayerNorm(int64_t normalized_size, double eps = 1e-5, bool elementwise_affine = true, bool bias = true)
      : LayerNorm(Shape{normalized_size}, eps, elementwise_affine, bias) {}

  Tensor forward(const Tensor& x) override { return mixprec::layer_norm(x, normalized_shape, weight, bias, eps); }
  std::string extra_repr() const override {
    std::string s = "(";
    for (std::size_t i = 0; i < normalized_shape.size(); ++i) s += (i ? ", " : "") + std::to_string(normalized_shape[i]);
    if (normalized_shape.size() == 1) s += ",";
    return s + "), eps=" + detail::py_float(eps) + ", elementwise_affine=" + detail::py_bool(elementwise_affine);
  }

  Shape normalized_shape;
  double eps;
  bool elementwise_affine;
  Tensor weight, bias;
};

// Normalises [N, C, *] over groups of C / num_groups channels; per-channel affine.
class GroupNorm : public Module {
 public:
  GroupNorm(int64_t num_groups, int64_t num_channels, double eps = 1e-5, bool affine = true)
      : Module("GroupNorm"), num_groups(num_groups), num_channels(num_channels), eps(eps), affine(affine) {
    MIXPREC_CHECK(num_groups > 0 && num_channels > 0 && num_channels % num_groups == 0, "GroupNorm: num_channels (", num_channels,
                  ") must be a positive multiple of num_groups (", num_groups, ")");
    if (affine) {
      weight = ones({num_channels});
      bias = zeros({num_channels});
    }
    register_parameter("weight", weight);
    register_parameter("bias", bias);
  }
  Tensor forward(const Tensor& x) override { return mixprec::group_norm(x, num_groups, weight, bias, eps); }
  std::string extra_repr() const override {
    return std::to_string(num_groups) + ", " + std::to_string(num_channels) + ", eps=" + detail::py_float(eps) +
           ", affine=" + detail::py_bool(affine);
  }

  int64_t num_groups, num_channels;
  double eps;
  bool affine;
  Tensor weight, bias;
};

}  // namespace mixprec::nn
