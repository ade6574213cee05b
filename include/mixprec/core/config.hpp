#pragma once
// Host/device annotations: the same scalar math compiles into CPU kernels and CUDA kernels,
// so CPU tests cover what the GPU runs.
#if defined(__CUDACC__)
#define MIXPREC_HOST_DEVICE __host__ __device__ __forceinline__
#define MIXPREC_DEVICE __device__ __forceinline__
#else
#define MIXPREC_HOST_DEVICE inline
#define MIXPREC_DEVICE inline
#endif

// On a scope guard's constructors: `autocast(Device::CPU, DType::BFloat16);` (no name) builds a
// temporary that ends at the semicolon and guards nothing -- the compiler says so.
#define MIXPREC_GUARD [[nodiscard("a guard acts only while it is alive: give it a name")]]

// Compiled mode (issue 19; cmake/MixprecCompiled.cmake, src/mixprec_compiled*.cpp): a definition under
// `#if MIXPREC_HEADER_DEFINITIONS`, declared MIXPREC_OUTLINE, is compiled once into mixprec::compiled,
// and a program's units built with MIXPREC_COMPILED_LIB see only its declaration: they neither
// parse its body, nor instantiate the templates it uses, nor optimise it again -- at -O2 that is
// most of a unit's compile time. Header-only use (the default) sees the same definitions, inline.
#if defined(MIXPREC_COMPILED_LIB) && !defined(MIXPREC_BUILDING_COMPILED_LIB)
#define MIXPREC_HEADER_DEFINITIONS 0
#else
#define MIXPREC_HEADER_DEFINITIONS 1
#endif
#if defined(MIXPREC_COMPILED_LIB) || defined(MIXPREC_BUILDING_COMPILED_LIB)
#define MIXPREC_OUTLINE  // one external definition, in the library
#else
#define MIXPREC_OUTLINE inline
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cstdint>

namespace mixprec {
// Below this many elements a parallel region costs more than it saves on a 2-core machine.
inline constexpr int64_t kParallelGrain = 32768;
}  // namespace mixprec
