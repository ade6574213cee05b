#pragma once
// The four seed patterns of mixed-precision training, one function each; main.cpp picks one by name.
#include <mixprec/mixprec.hpp>

#include "common/cli.hpp"

namespace patterns {

int quickstart(int argc, char** argv);    // quickstart.cpp
int memory(int argc, char** argv);        // memory.cpp
int accumulation(int argc, char** argv);  // accumulation.cpp
int fp32_head(int argc, char** argv);     // fp32_head.cpp

inline double mib(int64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

}  // namespace patterns
