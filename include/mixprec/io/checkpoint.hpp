#pragma once
// Training checkpoints in one safetensors file: model weights (always float32, whatever dtype the
// model runs in), optimizer state (float32, including master weights), GradScaler state, LR
// scheduler state, step counters and generator states. Scalars travel in the header metadata as
// %.17g text, which round-trips doubles exactly, so a resumed run continues bit-exactly.
// Saving is atomic (io/safetensors.hpp): a crash mid-save leaves the previous checkpoint intact.
#include <cinttypes>
#include <cstdio>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/io/safetensors.hpp"
#include "mixprec/nn/module.hpp"
#include "mixprec/optim/lr_scheduler.hpp"

namespace mixprec::io {

inline constexpr const char* kCheckpointFormat = "mixprec-checkpoint-1";

struct TrainingState {
  int64_t step = 0;
  int64_t epoch = 0;
  std::map<std::string, double> extra;  // anything else the training loop wants back
};

// What save/load touch; null members are skipped.
struct CheckpointParts {
  nn::Module* model = nullptr;
  optim::Optimizer* optimizer = nullptr;
  amp::GradScaler* scaler = nullptr;
  optim::lr_scheduler::LRScheduler* scheduler = nullptr;
  std::vector<Generator*> generators{&default_generator()};
};

namespace detail {
inline std::string fmt_double(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
inline double parse_double(const std::string& path, const std::string& key, const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  MIXPREC_CHECK(!s.empty() && *end == 0, "load_checkpoint: ", path, ": metadata '", key, "' is not a number: '", s, "'");
  return v;
}
inline void put_scalars(std::map<std::string, std::string>& meta, const std::string& prefix, const std::map<std::string, double>& m) {
  for (const auto& [k, v] : m) meta[prefix + k] = fmt_double(v);
}
inline std::map<std::string, double> get_scalars(const std::string& path, const std::map<std::string, std::string>& meta,
                                                 const std::string& prefix) {
  std::map<std::string, double> out;
  for (const auto& [k, v] : meta)
    if (k.rfind(prefix, 0) == 0) out[k.substr(prefix.size())] = parse_double(path, k, v);
  return out;
}
}  // namespace detail

inline void save_checkpoint(const std::string& path, const CheckpointParts& parts, const TrainingState& state = {}) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::map<std::string, std::string> meta{{"format", kCheckpointFormat}};
  no_grad ng;
  if (parts.model)
    for (const auto& [k, t] : parts.model->state_dict())
      tensors.emplace_back("model." + k, t.is_floating_point() && t.dtype() != DType::Float32 ? t.to(DType::Float32) : t);
  if (parts.optimizer) {
    const optim::StateDict sd = parts.optimizer->state_dict();
    for (const auto& [k, t] : sd.tensors) tensors.emplace_back("optim." + k, t);
    detail::put_scalars(meta, "optim.", sd.scalars);
  }
  if (parts.scaler) detail::put_scalars(meta, "scaler.", parts.scaler->state_dict());
  if (parts.scheduler) {
    const optim::StateDict sd = parts.scheduler->state_dict();
    for (const auto& [k, t] : sd.tensors) tensors.emplace_back("sched." + k, t);
    detail::put_scalars(meta, "sched.", sd.scalars);
  }
  for (std::size_t i = 0; i < parts.generators.size(); ++i) {
    const Generator::State s = parts.generators[i]->get_state();
    char buf[80];
    std::snprintf(buf, sizeof buf, "%016" PRIx64 "%016" PRIx64 "%016" PRIx64 "%016" PRIx64, s[0], s[1], s[2], s[3]);
    meta["rng." + std::to_string(i)] = buf;
  }
  meta["step"] = std::to_string(state.step);
  meta["epoch"] = std::to_string(state.epoch);
  detail::put_scalars(meta, "extra.", state.extra);
  save_safetensors(path, tensors, meta);
}

// Restores every part given; throws mixprec::Error (and leaves the parts untouched where the
// file is malformed) when the file is not a checkpoint or does not fit the parts.
inline TrainingState load_checkpoint(const std::string& path, const CheckpointParts& parts) {
  const SafetensorsFile f = load_safetensors(path);
  auto it = f.metadata.find("format");
  MIXPREC_CHECK(it != f.metadata.end() && it->second == kCheckpointFormat, "load_checkpoint: ", path,
                " is not a mixprec checkpoint (metadata 'format' is ",
                it == f.metadata.end() ? std::string("missing") : "'" + it->second + "'", ")");
  auto section = [&](const std::string& prefix) {
    std::vector<std::pair<std::string, Tensor>> out;
    for (const auto& [k, t] : f.tensors)
      if (k.rfind(prefix, 0) == 0) out.emplace_back(k.substr(prefix.size()), t);
    return out;
  };
  std::vector<Generator::State> rng;
  for (std::size_t i = 0; i < parts.generators.size(); ++i) {
    auto r = f.metadata.find("rng." + std::to_string(i));
    MIXPREC_CHECK(r != f.metadata.end() && r->second.size() == 64, "load_checkpoint: ", path, ": generator state ", i, " missing");
    Generator::State s{};
    for (int w = 0; w < 4; ++w) s[w] = std::stoull(r->second.substr(16 * w, 16), nullptr, 16);
    rng.push_back(s);
  }
  no_grad ng;
  if (parts.model) parts.model->load_state_dict(section("model."), /*strict=*/true);
  if (parts.optimizer) parts.optimizer->load_state_dict({section("optim."), detail::get_scalars(path, f.metadata, "optim.")});
  if (parts.scaler) parts.scaler->load_state_dict(detail::get_scalars(path, f.metadata, "scaler."));
  if (parts.scheduler) parts.scheduler->load_state_dict({section("sched."), detail::get_scalars(path, f.metadata, "sched.")});
  for (std::size_t i = 0; i < rng.size(); ++i) parts.generators[i]->set_state(rng[i]);
  TrainingState st;
  st.step = static_cast<int64_t>(detail::parse_double(path, "step", f.metadata.count("step") ? f.metadata.at("step") : ""));
  st.epoch = static_cast<int64_t>(detail::parse_double(path, "epoch", f.metadata.count("epoch") ? f.metadata.at("epoch") : ""));
  st.extra = detail::get_scalars(path, f.metadata, "extra.");
  return st;
}

}  // namespace mixprec::io
