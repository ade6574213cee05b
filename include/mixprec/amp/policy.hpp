#pragma once
// The op-eligibility table: built from ops/op_list.def (one line per op), extended at run time by
// register_op() for users' own ops. Lookups on the hot path index a vector by OpId; names are
// only for registration, queries and printing.
//
// Aligned with PyTorch's aten/src/ATen/autocast_mode.cpp (CUDA lists). Deviations, and why:
//  - softmax, log_softmax, sum, mean, cumsum, var, norm, exp, log, pow, rsqrt run in float32 on
//    every device. PyTorch's CPU list leaves exp/log/softmax/sum in the input dtype; we keep one
//    table for all devices because a bfloat16 softmax or sum loses 2-3 digits the user never asked
//    to lose, and the extra float32 pass is cheap next to the matmuls around it.
//  - batch_norm is unlisted, as in PyTorch: it takes the 16-bit activation with float32 weights
//    and running statistics, accumulates its statistics in double and writes its output in the
//    input dtype. Upcasting it would save a float32 copy of every activation for backward.
//    layer_norm and group_norm stay in float32, as PyTorch's lists have them.
//  - layer_norm on CUDA reads its input as it is and writes the autocast dtype, its statistics and
//    arithmetic float32 (ops/normalization.hpp, layer_norm_fuses_cast): the upcast copy before it
//    and the downcast copy its consumer (a linear) would make are gone. PyTorch returns float32.
//  - binary_cross_entropy is banned under float16 autocast on every device (PyTorch bans it on
//    CUDA, where float16 is the default); under bfloat16 it runs in float32, as on PyTorch's CPU.
//  - maximum/minimum and the comparisons promote (PyTorch's TensorIterator promotes them too).
#include <iomanip>
#include <iostream>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "mixprec/ops/dispatch.hpp"

namespace mixprec::amp {

enum class Policy : uint8_t { LowerPrecision, Float32, Promote, BannedFloat16, Unlisted };

constexpr std::string_view name(Policy p) {
  switch (p) {
    case Policy::LowerPrecision: return "lower_precision";
    case Policy::Float32: return "float32";
    case Policy::Promote: return "promote";
    case Policy::BannedFloat16: return "banned_float16";
    case Policy::Unlisted: return "unlisted";
  }
  return "?";
}

struct PolicyEntry {
  std::string op;
  Policy policy;
  std::string note;
};

namespace detail {
struct PolicyTable {
  std::vector<PolicyEntry> entries;  // indexed by OpId
  std::unordered_map<std::string, std::size_t> index;
  mutable std::shared_mutex mu;

  PolicyTable() {
#define MIXPREC_OP(op_, policy_) add(#op_, Policy::policy_, "");
#include "mixprec/ops/op_list.def"
#undef MIXPREC_OP
    entries[static_cast<int>(OpId::binary_cross_entropy)].note =
        "unsafe to autocast in float16: use binary_cross_entropy_with_logits";
    entries[static_cast<int>(OpId::batch_norm)].note = "16-bit input with float32 weights: float32 statistics, output in the input dtype";
  }
  std::size_t add(std::string op, Policy p, std::string note) {
    index.emplace(op, entries.size());
    entries.push_back({std::move(op), p, std::move(note)});
    return entries.size() - 1;
  }
};
// Out of line in compiled mode (core/config.hpp): building the table is the biggest function
// a program would otherwise compile.
MIXPREC_OUTLINE PolicyTable& table();
#if MIXPREC_HEADER_DEFINITIONS
MIXPREC_OUTLINE PolicyTable& table() {
  static PolicyTable t;
  return t;
}
#endif
}  // namespace detail

namespace detail {
// This thread's float32 pins, indexed by OpId (non-zero: pinned), or null: the table's policy is
// overridden here, in the one lookup autocast's dispatch makes, not by a second table.
// amp::PrecisionTrace's auto-pin installs its set while it is attached (amp/trace.hpp).
inline const std::vector<uint8_t>*& float32_pins() {
  thread_local const std::vector<uint8_t>* pins = nullptr;
  return pins;
}
}  // namespace detail

// Hot path: built-in ops are never re-registered, so their entries can be read without a lock.
// An op pinned to float32 on this thread (auto-pin) reads Float32.
inline Policy policy_of(OpId id) {
  if (const auto* pins = detail::float32_pins();
      pins && static_cast<std::size_t>(id) < pins->size() && (*pins)[static_cast<std::size_t>(id)]) [[unlikely]]
    return Policy::Float32;
  auto& t = detail::table();
  if (static_cast<std::size_t>(id) < static_cast<std::size_t>(OpId::kCount)) return t.entries[static_cast<int>(id)].policy;
  std::shared_lock lock(t.mu);
  return t.entries.at(static_cast<std::size_t>(id)).policy;
}

inline Policy policy_of(std::string_view op) {
  auto& t = detail::table();
  std::shared_lock lock(t.mu);
  auto it = t.index.find(std::string(op));
  MIXPREC_CHECK(it != t.index.end(), "amp::policy_of: unknown op '", op, "'");
  return t.entries[it->second].policy;
}

inline std::string op_name_of(OpId id) {
  auto& t = detail::table();
  std::shared_lock lock(t.mu);
  return t.entries.at(static_cast<std::size_t>(id)).op;
}

// Registers a user op's policy and returns the id to pass to mixprec::dispatch. Registering an
// existing user op again updates its policy; built-in policies are fixed.
inline OpId register_op(const std::string& op, Policy p, const std::string& note = "") {
  auto& t = detail::table();
  std::unique_lock lock(t.mu);
  auto it = t.index.find(op);
  if (it != t.index.end()) {
    MIXPREC_CHECK(it->second >= static_cast<std::size_t>(OpId::kCount), "amp::register_op: '", op,
                  "' is a built-in op; its policy cannot be changed");
    t.entries[it->second].policy = p;
    t.entries[it->second].note = note;
    return static_cast<OpId>(it->second);
  }
  return static_cast<OpId>(t.add(op, p, note));
}

inline std::vector<PolicyEntry> policy_table() {
  auto& t = detail::table();
  std::shared_lock lock(t.mu);
  return t.entries;
}

// Grouped by policy, one op per line: the README's table is generated from this output.
inline void print_policy_table(std::ostream& os = std::cout, bool markdown = false) {
  const auto entries = policy_table();
  if (markdown) os << "| op | autocast policy | note |\n|---|---|---|\n";
  // Plain text: each column as wide as its longest entry plus two spaces, so no op name runs into
  // its policy (binary_cross_entropy_with_logits is 32 characters).
  std::size_t op_w = 2, policy_w = 6;
  for (const auto& e : entries) {
    op_w = std::max(op_w, std::string_view(e.op).size());
    policy_w = std::max(policy_w, std::string_view(name(e.policy)).size());
  }
  if (!markdown) os << std::left << std::setw(static_cast<int>(op_w + 2)) << "op" << std::setw(static_cast<int>(policy_w + 2)) << "policy" << "note\n";
  for (Policy p : {Policy::LowerPrecision, Policy::Float32, Policy::Promote, Policy::BannedFloat16, Policy::Unlisted}) {
    for (const auto& e : entries) {
      if (e.policy != p) continue;
      if (markdown) os << "| `" << e.op << "` | " << name(p) << " | " << e.note << " |\n";
      else os << std::left << std::setw(static_cast<int>(op_w + 2)) << e.op << std::setw(static_cast<int>(policy_w + 2)) << name(p) << e.note << '\n';
    }
  }
}

}  // namespace mixprec::amp
