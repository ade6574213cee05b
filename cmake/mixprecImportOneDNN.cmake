# Defines mixprec::dnnl_library (IMPORTED) when oneDNN 2.x is found (Debian 12: libdnnl-dev).
# Run by mixprec's build and, installed, by mixprecConfig.cmake on the consumer's machine, so the
# exported mixprec::onednn carries no build-machine path. Found by path, not find_package(dnnl):
# Debian's dnnl-config.cmake requires the OpenCL headers. 3.x changed the API backends/cpu/onednn.hpp uses.
if(NOT TARGET mixprec::dnnl_library)
  find_path(MIXPREC_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp HINTS ${DNNL_ROOT} $ENV{DNNL_ROOT} PATH_SUFFIXES include)
  find_library(MIXPREC_DNNL_LIBRARY dnnl HINTS ${DNNL_ROOT} $ENV{DNNL_ROOT} PATH_SUFFIXES lib lib64)
  if(MIXPREC_DNNL_INCLUDE_DIR AND MIXPREC_DNNL_LIBRARY AND EXISTS ${MIXPREC_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_version.h)
    file(STRINGS ${MIXPREC_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_version.h _mixprec_dnnl_major REGEX "#define DNNL_VERSION_MAJOR ")
    if(_mixprec_dnnl_major MATCHES "DNNL_VERSION_MAJOR 2$")
      add_library(mixprec::dnnl_library UNKNOWN IMPORTED)
      set_target_properties(mixprec::dnnl_library PROPERTIES
        IMPORTED_LOCATION ${MIXPREC_DNNL_LIBRARY} INTERFACE_INCLUDE_DIRECTORIES ${MIXPREC_DNNL_INCLUDE_DIR})
    endif()
  endif()
endif()
