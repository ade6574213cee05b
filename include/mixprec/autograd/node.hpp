#pragma once
// Graph nodes. Ownership runs one way -- outputs own their grad_fn, nodes own their inputs'
// nodes through edges, leaves own nothing of the graph -- so a graph dies with its last output.
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "mixprec/tensor/tensor.hpp"

namespace mixprec::autograd {

struct Node;

struct Edge {
  std::shared_ptr<Node> fn;
  uint32_t input_nr = 0;
  bool valid() const { return fn != nullptr; }
};

struct OutputMeta {
  Shape sizes;
  DType dtype;
  Device device;
};

struct Node {
  virtual ~Node() = default;
  // One gradient per forward output in, one per next edge out (undefined = no gradient).
  virtual std::vector<Tensor> apply(std::vector<Tensor>&& grad_outputs) = 0;
  virtual std::string name() const = 0;
  // Frees what backward needed (saved tensors); called after use unless retain_graph.
  virtual void release() {}

  std::vector<Edge> next_edges;
  std::vector<OutputMeta> outputs;                   // to zero-fill gradients that never arrived
  std::vector<std::weak_ptr<TensorImpl>> retained;   // non-leaf outputs that asked for .grad()
  uint64_t sequence_nr = next_sequence_nr();

  static uint64_t next_sequence_nr() {
    static std::atomic<uint64_t> n{0};
    return n.fetch_add(1, std::memory_order_relaxed);
  }
};

struct AutogradMeta {
  bool requires_grad = false;
  bool retains_grad = false;
  Tensor grad;
  std::shared_ptr<Node> grad_fn;
  uint32_t output_nr = 0;
  std::weak_ptr<Node> grad_accumulator;  // leaves only; owned by the graph that uses it
  // Leaves only: run after each backward's gradient is accumulated into .grad() (function.hpp).
  std::vector<std::pair<uint64_t, std::function<void(const Tensor&)>>> post_accumulate_grad_hooks;
};

// A tensor kept for backward, with the storage version at save time so that an in-place
// change between forward and backward is detected instead of silently giving wrong gradients.
class SavedTensor {
 public:
  SavedTensor() = default;
  SavedTensor(const Tensor& t);  // NOLINT: implicit for brevity in backward lambdas
  const Tensor& get(std::string_view op) const {
    if (t_.defined() && t_.version() != version_)
      fail(op, ": a tensor saved for backward (shape ", t_.sizes(), ", ", t_.dtype(),
           ") was modified by an in-place operation after it was saved (version ", version_, ", now ", t_.version(),
           "); clone it before modifying it");
    return t_;
  }
  bool defined() const { return t_.defined(); }

 private:
  Tensor t_;
  uint64_t version_ = 0;
};

// Backward as a closure; release() destroys the closure and with it the saved tensors.
struct FunctionNode final : Node {
  using Fn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;
  FunctionNode(std::string n, Fn f) : name_(std::move(n)), fn_(std::move(f)) {}
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    if (!fn_)
      fail(name_, ": trying to backward through the graph a second time (its saved tensors were freed after the "
                  "first backward); pass retain_graph=true to the first backward if you need to");
    return fn_(grads);
  }
  std::string name() const override { return name_; }
  void release() override { fn_ = nullptr; }

 private:
  std::string name_;
  Fn fn_;
};

}  // namespace mixprec::autograd
