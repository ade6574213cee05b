#pragma once
// The one dispatch point every op passes through: op id -> autocast policy -> kernel.
// Autocast (amp/autocast.hpp) and the precision trace hook in here, so no op has to know
// about them.
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

namespace detail {
// Set by amp/autocast.hpp; a plain function pointer keeps this header free of amp.
struct DispatchHooks {
  // Returns true when autocast is active on some device for this thread.
  bool (*autocast_active)() = nullptr;
};
inline DispatchHooks& dispatch_hooks() {
  static DispatchHooks h;
  return h;
}
}  // namespace detail

}  // namespace mixprec
