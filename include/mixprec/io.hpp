#pragma once
// safetensors files and training checkpoints (model, optimizer, scheduler, GradScaler, RNG); see core.hpp.
#include "mixprec/core.hpp"
#include "mixprec/io/safetensors.hpp"
#include "mixprec/io/checkpoint.hpp"
