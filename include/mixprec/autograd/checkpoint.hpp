#pragma once
// Activation checkpointing: torch.utils.checkpoint.checkpoint, with the semantics of its modern
// default (use_reentrant=False). Named autograd::checkpoint because it is part of the graph;
// io/checkpoint.hpp (save/load of training state) is the other "checkpoint" and shares no name.
//
//   Tensor y = autograd::checkpoint([&](const Tensor& x) { return block->forward(x); }, x);
//
// Forward runs fn under no_grad, so none of its intermediate activations are kept: only the
// inputs are saved (and the tensors that require grad which fn reads -- its module's parameters,
// found as the ops see them). Backward runs fn again with grad enabled, with the autocast state
// (enabled, dtype per device) and the generators' states of the forward replayed, so autocast
// casts and dropout masks are the same, then backpropagates through that recomputation. The
// gradients reach the inputs AND the parameters fn used, through the outer graph, in the order a
// plain run delivers them: the gradients are bit-identical to the plain run's.
//
// As PyTorch's non-reentrant variant: inputs need not require grad (parameters still get theirs);
// under no_grad, or when nothing fn reads requires grad, fn just runs and nothing is recorded;
// checkpoints nest; a saved input or parameter modified in place before backward is an error.
// Non-tensor arguments go in by capture, and what fn captures must outlive the backward. fn
// returns a Tensor or a std::vector<Tensor> (non-floating outputs are returned without a graph).
// The recomputation is not recorded by an active PrecisionTrace (amp/trace.hpp): the trace saw
// those ops in the forward, and their values are the same.
#include <algorithm>
#include <array>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/amp/autocast.hpp"
#include "mixprec/amp/trace.hpp"
#include "mixprec/autograd/engine.hpp"
#include "mixprec/tensor/generator.hpp"

namespace mixprec::autograd {

struct CheckpointOptions {
  // Replay the generators' states in the recomputation, so that dropout draws the same masks
  // (torch's preserve_rng_state). default_generator() is always among them.
  bool preserve_rng_state = true;
  // Other generators fn draws from (a model's own; GPT passes the one it was built with).
  std::vector<Generator*> generators;
};

namespace checkpoint_detail {

// The generators' states at the forward; replay() sets them for the recomputation and gives
// back the states of now, which restore() puts back so backward does not shift later draws.
struct RngSnapshot {
  std::vector<Generator*> gens;
  std::vector<Generator::State> states;

  RngSnapshot(const CheckpointOptions& o) {
    if (!o.preserve_rng_state) return;
    gens.push_back(&default_generator());
    for (Generator* g : o.generators)
      if (g && std::find(gens.begin(), gens.end(), g) == gens.end()) gens.push_back(g);
    for (Generator* g : gens) states.push_back(g->get_state());
  }
};
class RngReplay {
 public:
  explicit RngReplay(const RngSnapshot& s) : s_(s) {
    for (std::size_t i = 0; i < s.gens.size(); ++i) {
      now_.push_back(s.gens[i]->get_state());
      s.gens[i]->set_state(s.states[i]);
    }
  }
  ~RngReplay() {
    for (std::size_t i = 0; i < s_.gens.size(); ++i) s_.gens[i]->set_state(now_[i]);
  }
  RngReplay(const RngReplay&) = delete;
  RngReplay& operator=(const RngReplay&) = delete;

 private:
  const RngSnapshot& s_;
  std::vector<Generator::State> now_;
};

// Autocast as it was at the forward, for the recomputation inside backward (where the engine
// suppresses autocast): enabled and dtype per device, one scope deep (its weight-cast cache is
// the recomputation's own), no trace.
struct AutocastSnapshot {
  std::array<bool, kNumDevices> enabled = amp::detail::state().enabled;
  std::array<DType, kNumDevices> dtype = amp::detail::state().dtype;
};
class AutocastReplay {
 public:
  explicit AutocastReplay(const AutocastSnapshot& a) {
    auto& s = amp::detail::state();
    enabled_ = s.enabled;
    dtype_ = s.dtype;
    suppressed_ = s.suppressed;
    trace_ = amp::detail::active_trace();
    s.enabled = a.enabled;
    s.dtype = a.dtype;
    s.suppressed = 0;
    ++s.nesting;
    amp::detail::active_trace() = nullptr;
  }
  ~AutocastReplay() {
    auto& s = amp::detail::state();
    s.enabled = enabled_;
    s.dtype = dtype_;
    s.suppressed = suppressed_;
    if (--s.nesting == 0) s.cache.clear();
    amp::detail::active_trace() = trace_;
  }
  AutocastReplay(const AutocastReplay&) = delete;
  AutocastReplay& operator=(const AutocastReplay&) = delete;

 private:
  std::array<bool, kNumDevices> enabled_;
  std::array<DType, kNumDevices> dtype_;
  int suppressed_;
  amp::PrecisionTrace* trace_;
};

class CollectGradInputs {
 public:
  explicit CollectGradInputs(GradInputCollector& c) : prev_(grad_input_collector()) { grad_input_collector() = &c; }
  ~CollectGradInputs() { grad_input_collector() = prev_; }
  CollectGradInputs(const CollectGradInputs&) = delete;
  CollectGradInputs& operator=(const CollectGradInputs&) = delete;

 private:
  GradInputCollector* prev_;
};

template <class R>
std::vector<Tensor> as_outputs(R&& r) {
  if constexpr (std::is_same_v<std::decay_t<R>, Tensor>) return {std::forward<R>(r)};
  else return std::vector<Tensor>(std::forward<R>(r));
}

}  // namespace checkpoint_detail

template <class F, class... Ts>
auto checkpoint(const CheckpointOptions& options, F&& fn, const Ts&... inputs) {
  static_assert((std::is_same_v<Ts, Tensor> && ...), "checkpoint: inputs are Tensors; pass other arguments to fn by capture");
  using R = std::decay_t<std::invoke_result_t<F&, const Ts&...>>;
  static_assert(std::is_same_v<R, Tensor> || std::is_same_v<R, std::vector<Tensor>>,
                "checkpoint: fn must return a Tensor or a std::vector<Tensor>");
  constexpr std::size_t N = sizeof...(Ts);
  if (!GradMode::is_enabled()) return R(fn(inputs...));  // nothing to record (also: inside an outer checkpoint's forward)

  auto rng = std::make_shared<checkpoint_detail::RngSnapshot>(options);
  const checkpoint_detail::AutocastSnapshot autocast_state;
  const std::array<Tensor, N> originals{inputs...};
  checkpoint_detail::GradInputCollector read;
  R result;
  {
    checkpoint_detail::CollectGradInputs collect(read);
    no_grad ng;
    std::array<Tensor, N> xs;
    for (std::size_t i = 0; i < N; ++i) xs[i] = originals[i].defined() ? detach_raw(originals[i]) : Tensor();
    result = std::apply([&](const auto&... x) { return R(fn(x...)); }, xs);
  }
  std::vector<Tensor> edges_of(originals.begin(), originals.end());  // the node's inputs: fn's inputs, then what it read
  for (const Tensor& t : read.tensors) edges_of.push_back(t);
  if (!should_record(edges_of)) return result;

  // Floating outputs join the graph as new tensors (an output may be an input or a parameter,
  // whose own history must not change).
  std::vector<Tensor> outs = checkpoint_detail::as_outputs(result);
  std::vector<std::size_t> diff;
  std::vector<Tensor> recorded;
  for (std::size_t k = 0; k < outs.size(); ++k)
    if (outs[k].defined() && outs[k].is_floating_point()) {
      outs[k] = detach_raw(outs[k]);
      diff.push_back(k);
      recorded.push_back(outs[k]);
    }
  if (recorded.empty()) return result;

  std::vector<SavedTensor> saved(edges_of.begin(), edges_of.end());  // for the in-place checks
  // Where the gradients of what fn read go (as the node's own edges): the recomputation stops
  // there and hands them to the outer graph, which runs those nodes once, in its own order.
  std::vector<Edge> read_edges;
  for (const Tensor& t : read.tensors) read_edges.push_back(gradient_edge(t));
  std::array<bool, N> needs_grad{};
  for (std::size_t i = 0; i < N; ++i) needs_grad[i] = tensor_requires_grad(originals[i]);
  std::vector<OutputMeta> metas;
  for (const Tensor& o : recorded) metas.push_back({o.sizes(), o.dtype(), o.device()});
  record("checkpoint", edges_of, recorded,
         [f = std::decay_t<F>(fn), saved = std::move(saved), read_edges = std::move(read_edges), needs_grad, diff, metas, rng, autocast_state,
          ninputs = edges_of.size()](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
           std::array<Tensor, N> xs;
           std::vector<Edge> stops;
           stops.reserve(ninputs);
           for (std::size_t i = 0; i < N; ++i) {
             const Tensor& x = saved[i].get("checkpoint");
             if (x.defined()) xs[i] = detach_raw(x);
             if (needs_grad[i]) xs[i].requires_grad_(true);
             stops.push_back(gradient_edge(xs[i]));
           }
           for (std::size_t k = N; k < saved.size(); ++k) {
             (void)saved[k].get("checkpoint");  // modified in place since the forward: an error
             stops.push_back(read_edges[k - N]);
           }
           std::vector<Tensor> again;
           {
             checkpoint_detail::RngReplay replay_rng(*rng);
             checkpoint_detail::AutocastReplay replay_autocast(autocast_state);
             enable_grad eg;
             again = checkpoint_detail::as_outputs(std::apply([&](const auto&... x) { return R(f(x...)); }, xs));
           }
           std::vector<Tensor> roots, root_grads;
           for (std::size_t j = 0; j < diff.size(); ++j) {
             MIXPREC_CHECK(diff[j] < again.size() && again[diff[j]].defined() && again[diff[j]].sizes() == metas[j].sizes &&
                               again[diff[j]].dtype() == metas[j].dtype,
                           "checkpoint: the recomputed output ", diff[j], " differs from the forward's (expected ", metas[j].dtype,
                           " of shape ", metas[j].sizes, "): fn must compute the same outputs when run again");
             if (!grads[j].defined() || !tensor_requires_grad(again[diff[j]])) continue;
             roots.push_back(again[diff[j]]);
             root_grads.push_back(grads[j]);
           }
           if (roots.empty()) return std::vector<Tensor>(ninputs);
           return run_backward(roots, root_grads, false, stops);
         });
  if constexpr (std::is_same_v<R, Tensor>) {
    return outs[0];
  } else {
    return outs;
  }
}

template <class F, class... Ts>
  requires(std::is_same_v<Ts, Tensor> && ...)
auto checkpoint(F&& fn, const Ts&... inputs) {
  return checkpoint(CheckpointOptions{}, std::forward<F>(fn), inputs...);
}

}  // namespace mixprec::autograd
