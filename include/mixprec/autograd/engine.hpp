#pragma once
// Reverse-mode engine: counts dependencies from the roots, then runs nodes when all their
// gradients have arrived, newest first. Backward runs with grad mode off and autocast
// suppressed, so each backward op runs in the dtypes its forward produced.
#include <queue>
#include <unordered_map>

#include "mixprec/ops/reduce.hpp"

namespace mixprec {
namespace autograd {
// With `stops` (checkpoint's recomputation, autograd/checkpoint.hpp), the nodes those edges point
// at are neither run nor looked past: the gradient arriving at each stop edge is returned instead
// (undefined where none arrived), in the order of `stops`, for the caller to pass on.
MIXPREC_OUTLINE std::vector<Tensor> run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads, bool retain_graph,
                                                 const std::vector<Edge>& stops = {});
}  // namespace autograd
// torch.autograd.backward for several roots at once.
MIXPREC_OUTLINE void backward(const std::vector<Tensor>& tensors, const std::vector<Tensor>& grads = {},
                              bool retain_graph = false);

namespace autograd {
#if MIXPREC_HEADER_DEFINITIONS  // compiled mode: in the library (core/config.hpp)
MIXPREC_OUTLINE std::vector<Tensor> AccumulateGrad::apply(std::vector<Tensor>&& grads) {
  Tensor g = std::move(grads[0]);
  if (!g.defined()) return {};
  AutogradMeta& m = meta(leaf_);
  if (g.dtype() != leaf_.dtype()) g = detail::as_dtype_raw(g, leaf_.dtype());
  if (g.sizes() != leaf_.sizes()) g = sum_to(g, leaf_.sizes());
  if (!m.grad.defined()) {
    // Own the buffer unless nobody else can see it: an incoming gradient may alias another
    // tensor (add passes its gradient through), and grad is accumulated into later.
    const bool sole = g.impl_ptr().use_count() == 1 && g.storage().use_count() == 1 && g.is_contiguous();
    if (sole) {
      m.grad = std::move(g);
    } else {
      m.grad = empty(g.sizes(), g.dtype(), g.device());
      detail::copy_kernel(m.grad, g);
    }
  } else {
    m.grad = add(m.grad, g);
  }
  for (auto& [id, hook] : m.post_accumulate_grad_hooks) hook(leaf_);
  return {};
}
#endif

// Callbacks that run once when the current backward has finished (PyTorch's
// Engine::queue_callback): data-parallel training waits for its last reductions there. A
// backward that throws drops them. backward_id() tells one backward from the next (0: none).
namespace detail {
struct BackwardState {
  uint64_t id = 0;
  uint64_t last_id = 0;
  std::vector<std::function<void()>> callbacks;
};
inline BackwardState& backward_state() {
  thread_local BackwardState s;
  return s;
}
}  // namespace detail
inline uint64_t backward_id() { return detail::backward_state().id; }
inline void queue_callback(std::function<void()> fn) {
  MIXPREC_CHECK(backward_id() != 0, "queue_callback: can only be called while a backward runs (from a hook)");
  detail::backward_state().callbacks.push_back(std::move(fn));
}

#if MIXPREC_HEADER_DEFINITIONS
MIXPREC_OUTLINE std::vector<Tensor> run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads, bool retain_graph,
                                                 const std::vector<Edge>& stops) {
  no_grad ng;
  amp::detail::Suppress no_autocast;
  detail::BackwardState& bs = detail::backward_state();
  struct Scope {  // nested backwards (from a hook) keep the outer one's id and callbacks
    detail::BackwardState& s;
    uint64_t outer;
    std::vector<std::function<void()>> outer_cbs;
    ~Scope() {
      s.id = outer;
      s.callbacks = std::move(outer_cbs);
    }
  } scope{bs, bs.id, std::move(bs.callbacks)};
  bs.callbacks.clear();
  bs.id = ++bs.last_id;

  struct Cmp {
    bool operator()(const Node* a, const Node* b) const { return a->sequence_nr < b->sequence_nr; }
  };
  std::unordered_map<Node*, int> deps;
  std::unordered_map<Node*, std::vector<Tensor>> buffers;
  std::vector<std::shared_ptr<Node>> keep_alive;
  std::unordered_map<Node*, std::vector<Tensor>> stopped;  // a stop node's gradients, by its input_nr
  for (const Edge& e : stops)
    if (e.valid()) stopped.emplace(e.fn.get(), std::vector<Tensor>());

  // Dependency count: how many edges point at each node from the reachable graph.
  std::vector<Node*> stack;
  std::unordered_map<Node*, bool> seen;
  auto visit_root = [&](const Edge& e) {
    if (e.valid() && !seen[e.fn.get()]) {
      seen[e.fn.get()] = true;
      stack.push_back(e.fn.get());
      keep_alive.push_back(e.fn);
    }
  };
  std::vector<Edge> root_edges;
  for (std::size_t i = 0; i < roots.size(); ++i) {
    Edge e = gradient_edge(roots[i]);
    MIXPREC_CHECK(e.valid(), "backward: tensor ", i, " of shape ", roots[i].sizes(),
                  " does not require grad and has no grad_fn (did you call it under no_grad, or forget requires_grad_?)");
    root_edges.push_back(e);
    visit_root(e);
  }
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    if (stopped.count(n)) continue;
    for (const Edge& e : n->next_edges) {
      if (!e.valid()) continue;
      ++deps[e.fn.get()];
      if (!seen[e.fn.get()]) {
        seen[e.fn.get()] = true;
        stack.push_back(e.fn.get());
      }
    }
  }

  std::priority_queue<Node*, std::vector<Node*>, Cmp> ready;
  auto deliver = [&](const Edge& e, Tensor g) {
    auto& buf = buffers[e.fn.get()];
    if (buf.empty()) buf.resize(std::max<std::size_t>(e.fn->outputs.size(), 1));
    Tensor& slot = buf[e.input_nr];
    if (!slot.defined()) {
      slot = std::move(g);
      return;
    }
    Tensor sum = add(slot, g);
    if (anomaly_mode_enabled()) anomaly::detail::check_accumulation(e.fn->name(), slot, g, sum);
    slot = std::move(sum);
  };
  for (std::size_t i = 0; i < roots.size(); ++i) {
    deliver(root_edges[i], grads[i]);
  }
  for (const Edge& e : root_edges)
    if (deps[e.fn.get()] == 0) {
      deps[e.fn.get()] = -1;  // queued
      ready.push(e.fn.get());
    }

  while (!ready.empty()) {
    Node* n = ready.top();
    ready.pop();
    std::vector<Tensor> in = std::move(buffers[n]);
    buffers.erase(n);
    if (auto it = stopped.find(n); it != stopped.end()) {
      it->second = std::move(in);
      continue;
    }
    in.resize(std::max<std::size_t>(n->outputs.size(), 1));
    for (std::size_t i = 0; i < n->outputs.size(); ++i) {
      if (!in[i].defined()) in[i] = zeros(n->outputs[i].sizes, n->outputs[i].dtype, n->outputs[i].device);
      if (i < n->retained.size())
        if (auto t = n->retained[i].lock()) {
          AutogradMeta& m = *t->autograd;
          m.grad = m.grad.defined() ? add(m.grad, in[i]) : in[i].clone();
        }
    }
    std::vector<Tensor> received;  // anomaly mode blames a node only if what it received was finite
    if (anomaly_mode_enabled()) received = in;
    std::vector<Tensor> out = n->apply(std::move(in));
    if (anomaly_mode_enabled()) anomaly::detail::check_backward(n->name(), received, out);
    if (!retain_graph) n->release();
    for (std::size_t i = 0; i < n->next_edges.size() && i < out.size(); ++i) {
      const Edge& e = n->next_edges[i];
      if (!e.valid() || !out[i].defined()) {
        if (e.valid() && --deps[e.fn.get()] == 0) ready.push(e.fn.get());
        continue;
      }
      deliver(e, std::move(out[i]));
      if (--deps[e.fn.get()] == 0) ready.push(e.fn.get());
    }
    for (std::size_t i = out.size(); i < n->next_edges.size(); ++i) {
      const Edge& e = n->next_edges[i];
      if (e.valid() && --deps[e.fn.get()] == 0) ready.push(e.fn.get());
    }
  }
  // A callback may queue another one.
  for (std::size_t i = 0; i < bs.callbacks.size(); ++i) {
    auto fn = std::move(bs.callbacks[i]);
    fn();
  }
  std::vector<Tensor> out;
  out.reserve(stops.size());
  for (const Edge& e : stops) {
    const std::vector<Tensor>* got = e.valid() ? &stopped[e.fn.get()] : nullptr;
    out.push_back(got && e.input_nr < got->size() ? (*got)[e.input_nr] : Tensor());
  }
  return out;
}
#endif  // MIXPREC_HEADER_DEFINITIONS

}  // namespace autograd

#if MIXPREC_HEADER_DEFINITIONS
MIXPREC_OUTLINE void backward(const std::vector<Tensor>& tensors, const std::vector<Tensor>& grads, bool retain_graph) {
  std::vector<Tensor> gs;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    if (i < grads.size() && grads[i].defined()) {
      MIXPREC_CHECK(grads[i].sizes() == t.sizes(), "backward: gradient of shape ", grads[i].sizes(),
                    " does not match the tensor's shape ", t.sizes());
      gs.push_back(grads[i]);
    } else {
      MIXPREC_CHECK(t.numel() == 1, "backward: grad can be implicitly created only for scalar outputs; got shape ", t.sizes(),
                    " (pass an explicit gradient)");
      gs.push_back(ones(t.sizes(), t.dtype(), t.device()));
    }
  }
  autograd::run_backward(tensors, gs, retain_graph);
}
#endif  // MIXPREC_HEADER_DEFINITIONS

inline void Tensor::backward(const Tensor& gradient, bool retain_graph) const {
  mixprec::backward({*this}, {gradient}, retain_graph);
}

inline bool Tensor::requires_grad() const { return autograd::tensor_requires_grad(*this); }

inline Tensor& Tensor::requires_grad_(bool on) {
  auto* m = autograd::meta_or_null(*this);
  MIXPREC_CHECK(!(m && m->grad_fn) || on, "requires_grad_: can only change requires_grad of leaf tensors; use detach()");
  MIXPREC_CHECK(!on || is_floating_point(), "requires_grad_: only floating-point tensors can require gradients, got ", dtype());
  autograd::meta(*this).requires_grad = on;
  return *this;
}

inline Tensor Tensor::grad() const {
  auto* m = autograd::meta_or_null(*this);
  return m ? m->grad : Tensor();
}
inline void Tensor::set_grad(const Tensor& g) const {
  MIXPREC_CHECK(!g.defined() || g.sizes() == sizes(), "set_grad: gradient of shape ", g.sizes(), " for a tensor of shape ", sizes());
  autograd::meta(*this).grad = g;
}
inline bool Tensor::is_leaf() const {
  auto* m = autograd::meta_or_null(*this);
  return !m || !m->grad_fn;
}
inline std::shared_ptr<autograd::Node> Tensor::grad_fn() const {
  auto* m = autograd::meta_or_null(*this);
  return m ? m->grad_fn : nullptr;
}
inline Tensor Tensor::detach() const { return autograd::detach_raw(*this); }
inline void Tensor::retain_grad() const {
  auto* m = autograd::meta_or_null(*this);
  MIXPREC_CHECK(m && m->requires_grad, "retain_grad: tensor of shape ", sizes(), " does not require grad");
  if (!m->grad_fn) return;  // leaves keep their grad anyway
  m->retains_grad = true;
  auto& r = m->grad_fn->retained;
  if (r.size() <= m->output_nr) r.resize(m->output_nr + 1);
  r[m->output_nr] = impl_ptr();
}

}  // namespace mixprec
