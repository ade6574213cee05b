#pragma once
// Automatic mixed precision: the op-eligibility table, autocast, the precision trace and GradScaler;
// see core.hpp.
#include "mixprec/core.hpp"
#include "mixprec/amp/policy.hpp"
#include "mixprec/amp/trace.hpp"
#include "mixprec/amp/autocast.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/amp/fp8.hpp"
