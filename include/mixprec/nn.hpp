#pragma once
// Modules (nn::Module, Linear, Conv2d, norms, attention, containers) and the model factories; see core.hpp.
#include "mixprec/core.hpp"
#include "mixprec/nn/nn.hpp"
