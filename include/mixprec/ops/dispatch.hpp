#pragma once
// Op ids and names: the key of the autocast policy table (op_list.def, amp/policy.hpp) and of the
// precision trace. The dispatch itself (op id -> autocast policy -> kernel) is amp/autocast.hpp's
// dispatch(), which every op body calls.
#include <cstdint>
#include <string_view>

#include "mixprec/tensor/tensor.hpp"

namespace mixprec {

enum class OpId : uint16_t {
#define MIXPREC_OP(name, policy) name,
#include "mixprec/ops/op_list.def"
#undef MIXPREC_OP
  kCount
};

inline constexpr std::string_view kOpNames[] = {
#define MIXPREC_OP(name, policy) #name,
#include "mixprec/ops/op_list.def"
#undef MIXPREC_OP
};

constexpr std::string_view op_name(OpId id) { return kOpNames[static_cast<int>(id)]; }

}  // namespace mixprec
