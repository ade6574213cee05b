#pragma once
// The fp8 delayed-scaling state of a model (each nn::Linear's Fp8LinearMeta) as named tensors,
// for checkpoints (io::CheckpointParts::fp8) or any safetensors file. Kept apart from the
// model's state_dict(): a model that never ran in fp8 has none, and its state_dict (and every
// checkpoint written before fp8 existed) must not change. Resuming without this state would start
// every scale at 1 again, and the first steps after a resume would quantize with wrong scales.
//
// Per Linear that has run under amp::fp8_autocast, with slots (input, weight, grad_output):
//   "<module>.fp8_meta.amax_history"  float32 [3, amax_history_len]
//   "<module>.fp8_meta.scale"         float32 [3]
//   "<module>.fp8_meta.pending"       float32 [3]  1 where amax_history[0] is a finished step not yet folded in
#include <map>
#include <set>

#include "mixprec/amp/fp8.hpp"
#include "mixprec/nn/linear.hpp"

namespace mixprec::amp {

namespace detail {
inline std::string fp8_prefix(const std::string& module) { return (module.empty() ? "" : module + ".") + "fp8_meta."; }
}  // namespace detail

inline nn::NamedTensors fp8_state_dict(nn::Module& model) {
  nn::NamedTensors out;
  for (auto& [name, m] : model.named_modules()) {
    auto* lin = dynamic_cast<nn::Linear*>(m);
    if (!lin || !lin->fp8_meta) continue;
    const auto& ts = lin->fp8_meta->tensors;
    const int64_t L = static_cast<int64_t>(ts[0].amax_history.size());
    Tensor hist = zeros({Fp8LinearMeta::kSlots, L});
    Tensor scale = empty({Fp8LinearMeta::kSlots});
    Tensor pending = empty({Fp8LinearMeta::kSlots});
    for (int s = 0; s < Fp8LinearMeta::kSlots; ++s) {
      MIXPREC_CHECK(static_cast<int64_t>(ts[s].amax_history.size()) == L || ts[s].amax_history.empty(), "fp8_state_dict: ", name,
                    ": slots hold amax histories of different lengths");
      std::copy(ts[s].amax_history.begin(), ts[s].amax_history.end(), hist.data<float>() + s * L);
      scale.data<float>()[s] = ts[s].scale;
      pending.data<float>()[s] = ts[s].pending ? 1.0f : 0.0f;
    }
    const std::string p = detail::fp8_prefix(name);
    out.emplace_back(p + "amax_history", hist);
    out.emplace_back(p + "scale", scale);
    out.emplace_back(p + "pending", pending);
  }
  return out;
}

// Replaces the fp8 state of every nn::Linear in `model` with the one in `state` (a Linear absent
// from it has none afterwards, as a model fresh from its constructor). Everything is checked
// before anything changes: unknown modules, missing or extra entries, shapes, non-positive or
// non-finite scales.
inline void load_fp8_state_dict(nn::Module& model, const nn::NamedTensors& state) {
  const char* op = "load_fp8_state_dict";
  std::map<std::string, Tensor> byname;
  for (const auto& [k, t] : state) {
    MIXPREC_CHECK(byname.emplace(k, t).second, op, ": duplicate key \"", k, "\"");
  }
  std::map<nn::Linear*, std::shared_ptr<Fp8LinearMeta>> next;
  std::set<std::string> used;
  for (auto& [name, m] : model.named_modules()) {
    auto* lin = dynamic_cast<nn::Linear*>(m);
    if (!lin || next.count(lin)) continue;
    const std::string p = detail::fp8_prefix(name);
    auto h = byname.find(p + "amax_history"), s = byname.find(p + "scale"), pe = byname.find(p + "pending");
    const int found = (h != byname.end()) + (s != byname.end()) + (pe != byname.end());
    next[lin] = nullptr;
    if (found == 0) continue;
    MIXPREC_CHECK(found == 3, op, ": ", p, "{amax_history, scale, pending} must all be present, found ", found, " of them");
    const Tensor hist = mixprec::detail::contiguous_raw(h->second.cpu(), DType::Float32);
    const Tensor scale = mixprec::detail::contiguous_raw(s->second.cpu(), DType::Float32);
    const Tensor pend = mixprec::detail::contiguous_raw(pe->second.cpu(), DType::Float32);
    MIXPREC_CHECK(hist.dim() == 2 && hist.size(0) == Fp8LinearMeta::kSlots && hist.size(1) >= 1, op, ": ", p,
                  "amax_history has shape ", hist.sizes(), ", expected [3, amax_history_len]");
    MIXPREC_CHECK(scale.sizes() == Shape{Fp8LinearMeta::kSlots} && pend.sizes() == Shape{Fp8LinearMeta::kSlots}, op, ": ", p,
                  "scale and pending have shapes ", scale.sizes(), " and ", pend.sizes(), ", expected [3]");
    auto meta = std::make_shared<Fp8LinearMeta>();
    const int64_t L = hist.size(1);
    for (int i = 0; i < Fp8LinearMeta::kSlots; ++i) {
      auto& t = meta->tensors[static_cast<std::size_t>(i)];
      t.amax_history.assign(hist.data<float>() + i * L, hist.data<float>() + (i + 1) * L);
      t.scale = scale.data<float>()[i];
      MIXPREC_CHECK(std::isfinite(t.scale) && t.scale > 0.0f, op, ": ", p, "scale[", i, "] = ", t.scale, " is not a positive finite scale");
      const float pf = pend.data<float>()[i];
      MIXPREC_CHECK(pf == 0.0f || pf == 1.0f, op, ": ", p, "pending[", i, "] = ", pf, ", expected 0 or 1");
      t.pending = pf == 1.0f;
      t.pending_step = -1;  // a step of the run that saved it: the next use folds it in
    }
    next[lin] = meta;
    used.insert({p + "amax_history", p + "scale", p + "pending"});
  }
  for (const auto& [k, t] : byname) MIXPREC_CHECK(used.count(k), op, ": unexpected key \"", k, "\" (no nn::Linear of that name)");
  for (auto& [lin, meta] : next) lin->fp8_meta = meta;
}

}  // namespace mixprec::amp
