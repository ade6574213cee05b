// The compiled mode's one translation unit (CMake target mixprec::compiled): the CPU kernel table
// and every kernel it points to, built once for all of a program's units, which include
// mixprec.hpp with MIXPREC_COMPILED_LIB defined and only see the table's declaration
// (backends/cpu/kernels.hpp).
#define MIXPREC_BUILDING_COMPILED_LIB
#include "mixprec/mixprec.hpp"
