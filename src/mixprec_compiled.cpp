// The compiled mode's first translation unit (CMake target mixprec::compiled): the CPU kernel table
// and the kernels it points to but the element-wise and norm ones (src/mixprec_compiled_elementwise.cpp), and every
// function declared MIXPREC_OUTLINE, built once for all of a program's units, which include
// mixprec.hpp with MIXPREC_COMPILED_LIB defined and only see the declarations
// (backends/cpu/kernels.hpp, core/config.hpp).
#define MIXPREC_BUILDING_COMPILED_LIB
#include "mixprec/mixprec.hpp"
