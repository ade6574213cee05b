# Defines mixprec::nccl_library (IMPORTED) when NCCL is found; like mixprecImportCudnn.cmake, run
# by mixprec's build and, installed, by mixprecConfig.cmake on the consumer's machine (NCCL has
# no CMake package). Expects find_package(CUDAToolkit); NCCL_ROOT points at an NCCL elsewhere.
if(NOT TARGET mixprec::nccl_library)
  find_library(MIXPREC_NCCL_LIBRARY nccl
    HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}
    PATH_SUFFIXES lib lib64)
  find_path(MIXPREC_NCCL_INCLUDE nccl.h
    HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${CUDAToolkit_INCLUDE_DIRS} ${CUDAToolkit_LIBRARY_ROOT}
    PATH_SUFFIXES include)
  if(MIXPREC_NCCL_LIBRARY AND MIXPREC_NCCL_INCLUDE)
    add_library(mixprec::nccl_library UNKNOWN IMPORTED)
    set_target_properties(mixprec::nccl_library PROPERTIES
      IMPORTED_LOCATION ${MIXPREC_NCCL_LIBRARY} INTERFACE_INCLUDE_DIRECTORIES ${MIXPREC_NCCL_INCLUDE})
  endif()
endif()
