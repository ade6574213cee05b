# oneDNN's CPU convolutions (mixprec::onednn): on channels-last tensors they run at the bf16
# GEMM's rate where the own im2col + GEMM kernels reach a fraction of it (backends/cpu/onednn.hpp).
# Top level, on by default when oneDNN 2.x is found (Debian 12: libdnnl-dev); vendored, OFF and
# not probed unless the consumer sets MIXPREC_ONEDNN=ON. A program opts in by linking
# mixprec::onednn, which defines MIXPREC_WITH_ONEDNN. Without it the own kernels run.
set(_mixprec_onednn_found OFF)
if(MIXPREC_ONEDNN OR (PROJECT_IS_TOP_LEVEL AND NOT DEFINED MIXPREC_ONEDNN))
  include(mixprecImportOneDNN)
  if(TARGET mixprec::dnnl_library)
    set(_mixprec_onednn_found ON)
  endif()
endif()
option(MIXPREC_ONEDNN "Build the oneDNN convolution component (mixprec::onednn)" ${_mixprec_onednn_found})
if(MIXPREC_ONEDNN)
  if(NOT _mixprec_onednn_found)
    message(FATAL_ERROR "MIXPREC_ONEDNN=ON but oneDNN 2.x was not found (Debian: apt-get install libdnnl-dev; or set DNNL_ROOT)")
  endif()
  add_library(mixprec_onednn INTERFACE)
  add_library(mixprec::onednn ALIAS mixprec_onednn)
  set_target_properties(mixprec_onednn PROPERTIES EXPORT_NAME onednn)
  target_link_libraries(mixprec_onednn INTERFACE mixprec::mixprec mixprec::dnnl_library)
  target_compile_definitions(mixprec_onednn INTERFACE MIXPREC_WITH_ONEDNN)
  message(STATUS "mixprec: oneDNN convolutions ON (${MIXPREC_DNNL_LIBRARY})")
else()
  message(STATUS "mixprec: oneDNN convolutions OFF")
endif()
