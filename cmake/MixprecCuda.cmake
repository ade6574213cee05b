# Decides MIXPREC_CUDA and defines mixprec::cuda (CUDA runtime, cuBLAS, cuBLASLt, cuDNN).
# Top level, the default is what the machine has. Vendored (add_subdirectory/FetchContent), the
# default is OFF and nothing is probed: enabling CUDA, or even check_language(CUDA), would change
# the consumer's build. A consumer that wants it sets MIXPREC_CUDA=ON before adding mixprec.
include(CheckLanguage)
set(_mixprec_cuda_found OFF)
if(MIXPREC_CUDA OR (PROJECT_IS_TOP_LEVEL AND NOT DEFINED MIXPREC_CUDA))
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    find_package(CUDAToolkit QUIET)
    if(CUDAToolkit_FOUND AND TARGET CUDA::cublas AND TARGET CUDA::cublasLt)
      include(mixprecImportCudnn)
      if(TARGET mixprec::cudnn_library)
        set(_mixprec_cuda_found ON)
      endif()
    endif()
  endif()
endif()
option(MIXPREC_CUDA "Build the CUDA backend (mixprec::cuda)" ${_mixprec_cuda_found})
if(MIXPREC_CUDA)
  if(NOT _mixprec_cuda_found)
    message(FATAL_ERROR "MIXPREC_CUDA=ON but nvcc, cuBLAS/cuBLASLt or cuDNN was not found")
  endif()
  enable_language(CUDA)
  add_library(mixprec_cuda INTERFACE)
  add_library(mixprec::cuda ALIAS mixprec_cuda)
  set_target_properties(mixprec_cuda PROPERTIES EXPORT_NAME cuda)
  # Imported targets only: the exported file names them and the consumer's config finds them.
  target_link_libraries(mixprec_cuda INTERFACE mixprec::mixprec CUDA::cudart CUDA::cublas CUDA::cublasLt mixprec::cudnn_library)
  target_compile_definitions(mixprec_cuda INTERFACE MIXPREC_CUDA=1)
  # The host/device scalar code (half, bfloat16 conversions) calls constexpr std::bit_cast.
  # CMake 3.25 does not know nvcc 13 speaks C++20, so cxx_std_20 adds no flag for CUDA sources.
  # nvcc warnings that are not ours, so -Werror=all-warnings builds stay usable: 20012 is Eigen
  # 3.4 marking defaulted members __host__ __device__; 1675 is `#pragma GCC unroll`, which nvcc's
  # front end does not know but passes on to g++, which applies it.
  target_compile_options(mixprec_cuda INTERFACE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -std=c++20 -diag-suppress=20012,1675>)
  message(STATUS "mixprec: CUDA backend ON (CUDA ${CUDAToolkit_VERSION}, cuDNN ${MIXPREC_CUDNN_LIBRARY})")
elseif(PROJECT_IS_TOP_LEVEL)
  message(STATUS "mixprec: CUDA backend OFF")
else()
  message(STATUS "mixprec: CUDA backend OFF (vendored: set MIXPREC_CUDA=ON to probe for it)")
endif()
