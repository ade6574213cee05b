# oneDNN's CPU convolutions (mixprec::onednn): on channels-last tensors they run at the bf16
# GEMM's rate where the own im2col + GEMM kernels reach a fraction of it (backends/cpu/onednn.hpp).
# On by default when oneDNN 2.x is found (Debian 12: libdnnl-dev); a program opts in by linking
# mixprec::onednn, which defines MIXPREC_WITH_ONEDNN. Without it the own kernels run.
# Found by path, not by find_package(dnnl): Debian's dnnl-config.cmake requires the OpenCL headers.
find_path(MIXPREC_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp)
find_library(MIXPREC_DNNL_LIBRARY dnnl)
set(_mixprec_onednn_ok OFF)
if(MIXPREC_DNNL_INCLUDE_DIR AND MIXPREC_DNNL_LIBRARY AND EXISTS ${MIXPREC_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_version.h)
  file(STRINGS ${MIXPREC_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_version.h _mixprec_dnnl_major REGEX "#define DNNL_VERSION_MAJOR ")
  if(_mixprec_dnnl_major MATCHES "DNNL_VERSION_MAJOR 2$")
    set(_mixprec_onednn_ok ON)
  endif()
endif()
option(MIXPREC_ONEDNN "Build the oneDNN convolution component (mixprec::onednn)" ${_mixprec_onednn_ok})
if(MIXPREC_ONEDNN)
  if(NOT _mixprec_onednn_ok)
    message(FATAL_ERROR "MIXPREC_ONEDNN=ON but oneDNN 2.x was not found (Debian: apt-get install libdnnl-dev)")
  endif()
  add_library(mixprec_onednn INTERFACE)
  add_library(mixprec::onednn ALIAS mixprec_onednn)
  set_target_properties(mixprec_onednn PROPERTIES EXPORT_NAME onednn)
  # Installed, the library is named, not pathed: a consumer's linker finds its own libdnnl.
  target_link_libraries(mixprec_onednn INTERFACE mixprec::mixprec $<BUILD_INTERFACE:${MIXPREC_DNNL_LIBRARY}> $<INSTALL_INTERFACE:dnnl>)
  target_include_directories(mixprec_onednn INTERFACE $<BUILD_INTERFACE:${MIXPREC_DNNL_INCLUDE_DIR}>)
  target_compile_definitions(mixprec_onednn INTERFACE MIXPREC_WITH_ONEDNN)
  install(TARGETS mixprec_onednn EXPORT mixprecTargets)
  message(STATUS "mixprec: oneDNN convolutions ON (${MIXPREC_DNNL_LIBRARY})")
else()
  message(STATUS "mixprec: oneDNN convolutions OFF")
endif()
