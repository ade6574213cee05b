#pragma once
// Optimizers (float32 master weights), LR schedulers, EMA and gradient clipping; see core.hpp.
#include "mixprec/core.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/optim/sgd.hpp"
#include "mixprec/optim/adam.hpp"
#include "mixprec/optim/stochastic_rounding.hpp"
#include "mixprec/optim/lr_scheduler.hpp"
#include "mixprec/optim/ema.hpp"
#include "mixprec/optim/clip_grad.hpp"
