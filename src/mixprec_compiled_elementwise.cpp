// The compiled mode's second translation unit (CMake target mixprec::compiled): the CPU element-wise
// and norm kernels (backends/cpu/elementwise.hpp, norm.hpp; filled into the table by backends/cpu/kernels.hpp), built
// beside src/mixprec_compiled.cpp so that two cores build the library. It sees the rest of the
// library as a program's unit does (declarations only), so nothing is defined twice.
#define MIXPREC_COMPILED_ELEMENTWISE_PART
#include "mixprec/mixprec.hpp"
