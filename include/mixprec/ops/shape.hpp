#pragma once
#include "mixprec/ops/linalg.hpp"
