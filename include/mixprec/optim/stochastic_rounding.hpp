#pragma once
// Stochastic rounding of float32 to bfloat16 (llm.c's `stochastic_rounding`), for optimizers that
// keep no float32 master of a bfloat16 parameter (`stochastic_rounding = true` in the options).
//
// Why: round-to-nearest drops every update below half a bfloat16 ulp (1.0 + 1e-4 stays 1.0 for
// ever), which is what float32 masters exist for. Rounding up with probability equal to the
// distance to the lower neighbour makes the rounding unbiased, E[round(x)] = x, so small updates
// accumulate in expectation while the parameter costs 2 bytes instead of 2 + 4.
//
// The random bits are a counter-based hash (dropout's rule, ops/activation.hpp) of
// (seed, parameter number, the parameter's step count, element index): no generator state to
// carry, reproducible for any thread count or block split, and checkpointed by the seed and
// the per-parameter step the optimizer's state_dict already holds.
#include <bit>
#include <cstdint>

#include "mixprec/ops/activation.hpp"

namespace mixprec::optim::detail {

// Per parameter: the key of its stream (seed, parameter number in state-dict order).
MIXPREC_HOST_DEVICE uint64_t rounding_key(uint64_t seed, uint64_t param_index) {
  return ::mixprec::detail::dropout_hash(seed, param_index);
}
// Per parameter and step: the key of that update's random bits (step = updates applied before it).
MIXPREC_HOST_DEVICE uint64_t rounding_step_key(uint64_t key, int64_t step) {
  return ::mixprec::detail::dropout_hash(key, static_cast<uint64_t>(step));
}
// 16 uniform random bits for element i of one update.
MIXPREC_HOST_DEVICE uint32_t rounding_bits(uint64_t step_key, uint64_t i) {
  return static_cast<uint32_t>(::mixprec::detail::dropout_hash(step_key, i) >> 48);
}

// x rounded to bfloat16 with 16 random bits r: r is added to the 16 bits bfloat16 drops, then
// they are truncated, so x rounds away from zero with probability (dropped bits) / 2^16 (its
// magnitude is rounded: unbiased for either sign). Exact values (dropped bits 0) never change.
// inf/NaN round as round-to-nearest does (inf stays inf, NaN stays a quiet NaN); a finite value
// within one ulp of bfloat16's max may round up to inf, as its float32 neighbour above would.
MIXPREC_HOST_DEVICE uint16_t bfloat16_bits_stochastic(float x, uint32_t r) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return ::mixprec::detail::float_to_bfloat16_bits(x);
  return static_cast<uint16_t>((u + (r & 0xffffu)) >> 16);
}

}  // namespace mixprec::optim::detail
