#pragma once
// mixprec: header-only mixed-precision training. Include this one header, or only the areas a unit
// uses (each includes core.hpp):
//
// core.hpp   config, errors, CPU features; dtypes and conversions; Tensor, allocator, generator;
//            autograd; autocast's op table; every op; the CPU backend (core/ dtype/ tensor/
//            autograd/ ops/ backends/cpu/)
// amp.hpp    autocast, precision trace, GradScaler, fp8 autocast (amp/)
// optim.hpp  optimizers, schedulers, EMA, clipping (optim/)
// nn.hpp     modules and models (nn/)
// data.hpp   datasets, DataLoader (data/)
// io.hpp     safetensors, checkpoints (io/)
// CUDA: cuda.hpp (backends/cuda/, nvcc only); data-parallel training: distributed/.
#include "mixprec/core.hpp"
#include "mixprec/amp.hpp"
#include "mixprec/optim.hpp"
#include "mixprec/nn.hpp"
#include "mixprec/data.hpp"
#include "mixprec/io.hpp"
