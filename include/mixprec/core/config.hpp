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

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cstdint>

namespace mixprec {
// Below this many elements a parallel region costs more than it saves on a 2-core machine.
inline constexpr int64_t kParallelGrain = 32768;
}  // namespace mixprec
