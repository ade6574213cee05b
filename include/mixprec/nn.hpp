#pragma once
// Modules (nn::Module, Linear, Conv2d, norms, attention, containers) and the model factories; see core.hpp.
#include "mixprec/core.hpp"
#include "mixprec/nn/nn.hpp"
#include "mixprec/amp/fp8_state.hpp"  // the modules' fp8 scaling state (amp/fp8.hpp)
