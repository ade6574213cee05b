# Defines mixprec::cudnn_library (IMPORTED) when cuDNN is found. Run at mixprec's configure time
# and again, installed, by mixprecConfig.cmake at the consumer's: cuDNN has no CMake package, and a
# path found here would be the build machine's, so the exported mixprec::cuda names this target
# and each machine finds its own cuDNN. Expects find_package(CUDAToolkit) to have run; CUDNN_ROOT
# (variable or environment) points at a cuDNN outside the toolkit.
if(NOT TARGET mixprec::cudnn_library)
  find_library(MIXPREC_CUDNN_LIBRARY cudnn
    HINTS ${CUDNN_ROOT} $ENV{CUDNN_ROOT} ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}
    PATH_SUFFIXES lib lib64)
  find_path(MIXPREC_CUDNN_INCLUDE cudnn.h
    HINTS ${CUDNN_ROOT} $ENV{CUDNN_ROOT} ${CUDAToolkit_INCLUDE_DIRS} ${CUDAToolkit_LIBRARY_ROOT}
    PATH_SUFFIXES include)
  if(MIXPREC_CUDNN_LIBRARY AND MIXPREC_CUDNN_INCLUDE)
    add_library(mixprec::cudnn_library UNKNOWN IMPORTED)
    set_target_properties(mixprec::cudnn_library PROPERTIES
      IMPORTED_LOCATION ${MIXPREC_CUDNN_LIBRARY} INTERFACE_INCLUDE_DIRECTORIES ${MIXPREC_CUDNN_INCLUDE})
  endif()
endif()
