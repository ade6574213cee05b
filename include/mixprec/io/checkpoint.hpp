#pragma once
// Training checkpoints in one safetensors file: model weights (always float32, whatever dtype the
// model runs in), optimizer state (float32, including master weights), GradScaler state, LR
// scheduler state, step counters and generator states. Scalars travel in the header metadata as
// %.17g text, which round-trips doubles exactly, so a resumed run continues bit-exactly.
// Saving is atomic (io/safetensors.hpp): a crash mid-save leaves the previous checkpoint intact.
// A CRC-32 over the metadata and every tensor is stored too: safetensors has no checksum, and a
// flipped bit in the weights would otherwise resume silently from corrupt state.
#include <zlib.h>

#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "mixprec/amp/fp8_state.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/io/safetensors.hpp"
#include "mixprec/nn/module.hpp"
#include "mixprec/optim/lr_scheduler.hpp"

namespace mixprec::io {

inline constexpr const char* kCheckpointFormat = "mixprec-checkpoint-2";
// Written before checksums were added; still read, without the corruption check.
inline constexpr const char* kCheckpointFormatV1 = "mixprec-checkpoint-1";

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
  nn::Module* fp8 = nullptr;  // this model's fp8 delayed-scaling state (amp/fp8_state.hpp), keys fp8.*
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
// Metadata comes from a file: anything but the exact text save_checkpoint writes is refused
// (std::stoull would throw std::invalid_argument, and a double cast to int64 can be undefined).
inline int64_t parse_int(const std::string& path, const std::string& key, const std::string& s) {
  int64_t v = 0;
  const bool neg = !s.empty() && s[0] == '-';
  bool ok = s.size() > (neg ? 1u : 0u) && s.size() <= (neg ? 19u : 18u);
  for (std::size_t i = neg ? 1 : 0; ok && i < s.size(); ++i) {
    ok = s[i] >= '0' && s[i] <= '9';
    v = v * 10 + (s[i] - '0');
  }
  MIXPREC_CHECK(ok, "load_checkpoint: ", path, ": metadata '", key, "' is not an integer: '", s, "'");
  return neg ? -v : v;
}
inline uint64_t parse_hex64(const std::string& path, const std::string& key, std::string_view s) {
  uint64_t v = 0;
  for (const char c : s) {
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    MIXPREC_CHECK(d >= 0, "load_checkpoint: ", path, ": metadata '", key, "' is not 64 lowercase hex digits: '", s, "'");
    v = v << 4 | static_cast<uint64_t>(d);
  }
  return v;
}
// CRC-32 of the metadata (all but the checksum itself) and of each tensor's name, dtype, shape
// and bytes, in file order. CRC-32 catches every single-bit flip and every burst up to 32 bits.
inline std::string checkpoint_checksum(const std::map<std::string, std::string>& meta,
                                       const std::vector<std::pair<std::string, Tensor>>& tensors) {
  uLong crc = crc32(0L, Z_NULL, 0);
  auto feed = [&](const void* p, std::size_t n) {
    for (const auto* b = static_cast<const Bytef*>(p); n > 0;) {
      const auto chunk = static_cast<uInt>(std::min<std::size_t>(n, std::size_t{1} << 30));
      crc = crc32(crc, b, chunk);
      b += chunk;
      n -= chunk;
    }
  };
  auto feed_text = [&](std::string_view s) { feed(s.data(), s.size()), feed("", 1); };
  for (const auto& [k, v] : meta)
    if (k != "checksum") feed_text(k), feed_text(v);
  for (const auto& [name, t] : tensors) {
    feed_text(name);
    feed_text(mixprec::name(t.dtype()));
    for (const int64_t d : t.sizes()) feed(&d, sizeof d);
    const Tensor c = t.cpu().contiguous();  // device state (a model trained on CUDA) is read on the host
    feed(c.data_ptr(), static_cast<std::size_t>(c.nbytes()));
  }
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08lx", static_cast<unsigned long>(crc & 0xffffffffu));
  return buf;
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
// A safetensors file is its header's length (8 bytes) and then the header's JSON object. A file
// whose ninth byte is not that '{' (a text file, a log, another format) is no checkpoint, and is
// called that by name, not by the header length its first bytes happen to spell. Anything this
// does not settle (missing, too short, a damaged checkpoint) load_safetensors reports in detail.
inline void check_checkpoint_start(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return;
  std::ifstream in(path, std::ios::binary);
  char head[9];
  if (!in.read(head, sizeof head)) return;
  MIXPREC_CHECK(head[8] == '{', "load_checkpoint: ", path,
                " is not a mixprec checkpoint (nor any safetensors file: its header does not start with '{' at byte 8)");
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
  if (parts.scaler) detail::put_scalars(meta, "scaler_counters.", parts.scaler->counters_state_dict());  // steps taken/skipped
  if (parts.fp8)
    for (const auto& [k, t] : amp::fp8_state_dict(*parts.fp8)) tensors.emplace_back("fp8." + k, t);
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
  meta["checksum"] = detail::checkpoint_checksum(meta, tensors);
  save_safetensors(path, tensors, meta);
}

// Restores every part given; throws mixprec::Error (and leaves the parts untouched where the
// file is malformed) when the file is not a checkpoint or does not fit the parts.
inline TrainingState load_checkpoint(const std::string& path, const CheckpointParts& parts) {
  detail::check_checkpoint_start(path);
  const SafetensorsFile f = load_safetensors(path);
  auto it = f.metadata.find("format");
  MIXPREC_CHECK(it != f.metadata.end() && (it->second == kCheckpointFormat || it->second == kCheckpointFormatV1),
                "load_checkpoint: ", path, " is not a mixprec checkpoint (metadata 'format' is ",
                it == f.metadata.end() ? std::string("missing") : "'" + it->second + "'", ")");
  if (it->second == kCheckpointFormat) {
    auto c = f.metadata.find("checksum");
    MIXPREC_CHECK(c != f.metadata.end(), "load_checkpoint: ", path, ": metadata 'checksum' is missing: the file is corrupt");
    const std::string actual = detail::checkpoint_checksum(f.metadata, f.tensors);
    MIXPREC_CHECK(c->second == actual, "load_checkpoint: ", path, ": checksum mismatch (the file records ", c->second,
                  ", its contents give ", actual, "): the file is corrupt (flipped bits, or a partial copy); "
                  "resume from an earlier checkpoint");
  }
  auto section = [&](const std::string& prefix) {
    std::vector<std::pair<std::string, Tensor>> out;
    for (const auto& [k, t] : f.tensors)
      if (k.rfind(prefix, 0) == 0) out.emplace_back(k.substr(prefix.size()), t);
    return out;
  };
  std::vector<Generator::State> rng;
  for (std::size_t i = 0; i < parts.generators.size(); ++i) {
    auto r = f.metadata.find("rng." + std::to_string(i));
    MIXPREC_CHECK(r != f.metadata.end(), "load_checkpoint: ", path, ": generator state ", i, " missing");
    MIXPREC_CHECK(r->second.size() == 64, "load_checkpoint: ", path, ": generator state ", i, " has ", r->second.size(),
                  " characters, expected 64 hex digits");
    Generator::State s{};
    for (int w = 0; w < 4; ++w) s[w] = detail::parse_hex64(path, r->first, std::string_view(r->second).substr(16 * w, 16));
    rng.push_back(s);
  }
  // All metadata is parsed before any part changes.
  TrainingState st;
  st.step = detail::parse_int(path, "step", f.metadata.count("step") ? f.metadata.at("step") : "");
  st.epoch = detail::parse_int(path, "epoch", f.metadata.count("epoch") ? f.metadata.at("epoch") : "");
  st.extra = detail::get_scalars(path, f.metadata, "extra.");
  const auto optim_scalars = detail::get_scalars(path, f.metadata, "optim.");
  const auto scaler_scalars = detail::get_scalars(path, f.metadata, "scaler.");
  const auto scaler_counters = detail::get_scalars(path, f.metadata, "scaler_counters.");  // absent before they were saved
  const auto sched_scalars = detail::get_scalars(path, f.metadata, "sched.");
  no_grad ng;
  try {
    if (parts.scaler) {
      amp::GradScaler probe = *parts.scaler;  // refuse bad scaler values before anything changes
      probe.load_state_dict(scaler_scalars);
      probe.load_counters_state_dict(scaler_counters);
    }
    if (parts.model) parts.model->load_state_dict(section("model."), /*strict=*/true);
    if (parts.optimizer) parts.optimizer->load_state_dict({section("optim."), optim_scalars});
    if (parts.scaler) parts.scaler->load_state_dict(scaler_scalars);
    if (parts.scaler) parts.scaler->load_counters_state_dict(scaler_counters);
    if (parts.scheduler) parts.scheduler->load_state_dict({section("sched."), sched_scalars});
    if (parts.fp8) amp::load_fp8_state_dict(*parts.fp8, section("fp8."));
  } catch (const Error& e) {
    fail("load_checkpoint: ", path, ": ", e.what());  // which file did not fit
  }
  for (std::size_t i = 0; i < rng.size(); ++i) parts.generators[i]->set_state(rng[i]);
  return st;
}

}  // namespace mixprec::io
