#pragma once
// How an op joins the graph: `if (autograd::should_record({a, b})) autograd::record(...)`.
#include <initializer_list>
#include <unordered_set>

#include "mixprec/autograd/grad_mode.hpp"
#include "mixprec/autograd/node.hpp"

namespace mixprec::autograd {

inline AutogradMeta* meta_or_null(const Tensor& t) { return t.defined() ? t.impl()->autograd.get() : nullptr; }

inline AutogradMeta& meta(const Tensor& t) {
  auto& m = t.impl()->autograd;
  if (!m) m = std::make_shared<AutogradMeta>();
  return *m;
}

inline bool tensor_requires_grad(const Tensor& t) {
  const AutogradMeta* m = meta_or_null(t);
  return m && m->requires_grad;
}

namespace checkpoint_detail {  // not `detail`: that would hide mixprec::detail in this namespace
// While checkpoint() runs its function under no_grad (autograd/checkpoint.hpp), the tensors that
// require grad and reach an op are collected here, once each: the parameters (and any other
// captured tensors) the function reads, to which the recomputation will send gradients. Off that
// path it costs nothing: it is looked at only when grad mode is off.
struct GradInputCollector {
  std::vector<Tensor> tensors;
  std::unordered_set<const TensorImpl*> seen;
  void add(const Tensor& t) {
    if (tensor_requires_grad(t) && seen.insert(t.impl()).second) tensors.push_back(t);
  }
};
inline GradInputCollector*& grad_input_collector() {
  thread_local GradInputCollector* c = nullptr;
  return c;
}
}  // namespace checkpoint_detail

inline bool should_record(std::initializer_list<Tensor> inputs) {
  if (!GradMode::is_enabled()) {
    if (auto* c = checkpoint_detail::grad_input_collector()) [[unlikely]]
      for (const Tensor& t : inputs) c->add(t);
    return false;
  }
  for (const Tensor& t : inputs)
    if (tensor_requires_grad(t)) return true;
  return false;
}
inline bool should_record(const std::vector<Tensor>& inputs) {
  if (!GradMode::is_enabled()) {
    if (auto* c = checkpoint_detail::grad_input_collector()) [[unlikely]]
      for (const Tensor& t : inputs) c->add(t);
    return false;
  }
  for (const Tensor& t : inputs)
    if (tensor_requires_grad(t)) return true;
  return false;
}

// Leaves get their gradient through an AccumulateGrad node. The leaf holds it weakly and the
// graph strongly, so it lives exactly as long as some graph can reach it.
struct AccumulateGrad final : Node {
  explicit AccumulateGrad(Tensor leaf) : leaf_(std::move(leaf)) {}
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override;  // engine.hpp
  std::string name() const override { return "AccumulateGrad"; }
  Tensor leaf_;
};

inline Edge gradient_edge(const Tensor& t) {
  AutogradMeta* m = meta_or_null(t);
  if (!m || !m->requires_grad) return {};
  if (m->grad_fn) return {m->grad_fn, m->output_nr};
  auto acc = m->grad_accumulator.lock();
  if (!acc) {
    // The node must not own the leaf's autograd meta (that would be a cycle): it holds a
    // second handle to the same TensorImpl, whose meta holds the node only weakly.
    acc = std::make_shared<AccumulateGrad>(t);
    m->grad_accumulator = acc;
  }
  return {acc, 0};
}

// torch.Tensor.register_post_accumulate_grad_hook: `hook(leaf)` runs each time a backward has
// finished accumulating into leaf.grad(), so data-parallel training can start reducing a
// gradient while the rest of backward still runs. Returns a handle for removal.
inline uint64_t register_post_accumulate_grad_hook(const Tensor& leaf, std::function<void(const Tensor&)> hook) {
  MIXPREC_CHECK(leaf.defined() && leaf.is_leaf() && tensor_requires_grad(leaf),
                "register_post_accumulate_grad_hook: only leaf tensors that require grad accumulate gradients");
  static std::atomic<uint64_t> next{1};
  const uint64_t id = next.fetch_add(1, std::memory_order_relaxed);
  meta(leaf).post_accumulate_grad_hooks.emplace_back(id, std::move(hook));
  return id;
}
inline void remove_post_accumulate_grad_hook(const Tensor& leaf, uint64_t handle) {
  if (AutogradMeta* m = meta_or_null(leaf))
    std::erase_if(m->post_accumulate_grad_hooks, [&](const auto& h) { return h.first == handle; });
}

inline Tensor detach_raw(const Tensor& t) {
  return detail::make_view(t, t.sizes(), t.strides(), t.storage_offset());
}

inline SavedTensor::SavedTensor(const Tensor& t) : t_(t.defined() ? detach_raw(t) : Tensor()), version_(t.defined() ? t.version() : 0) {}

// Connects `outputs` to a new node whose backward is `fn(grad_outputs) -> grad_inputs`.
inline void record(std::string name, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                   FunctionNode::Fn fn) {
  auto node = std::make_shared<FunctionNode>(std::move(name), std::move(fn));
  node->next_edges.reserve(inputs.size());
  for (const Tensor& in : inputs) node->next_edges.push_back(gradient_edge(in));
  node->outputs.reserve(outputs.size());
  node->retained.resize(outputs.size());
  for (uint32_t i = 0; i < outputs.size(); ++i) {
    const Tensor& out = outputs[i];
    node->outputs.push_back({out.sizes(), out.dtype(), out.device()});
    AutogradMeta& m = meta(out);
    m.requires_grad = true;
    m.grad_fn = node;
    m.output_nr = i;
  }
}

}  // namespace mixprec::autograd
