# Install rules and the package files (MIXPREC_INSTALL). Each optional component gets its own
# export set and targets file (mixprec-<comp>-targets.cmake) that mixprecConfig.cmake includes
# only when the component is asked for; the exported targets name imported targets only
# (CUDA::*, MPI::MPI_CXX, mixprec::*_library), never a path of this machine.
set(MIXPREC_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/mixprec)
install(TARGETS mixprec EXPORT mixprecTargets)
install(EXPORT mixprecTargets NAMESPACE mixprec:: DESTINATION ${MIXPREC_CMAKE_DIR})
set(MIXPREC_BUILT_COMPONENTS "")
foreach(comp cuda mpi nccl onednn compiled)
  if(TARGET mixprec_${comp})
    install(TARGETS mixprec_${comp} EXPORT mixprec-${comp}-targets)
    install(EXPORT mixprec-${comp}-targets NAMESPACE mixprec:: DESTINATION ${MIXPREC_CMAKE_DIR})
    list(APPEND MIXPREC_BUILT_COMPONENTS ${comp})
  endif()
endforeach()
install(DIRECTORY include/mixprec DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES LICENSE DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/mixprec)
configure_package_config_file(cmake/mixprecConfig.cmake.in ${CMAKE_CURRENT_BINARY_DIR}/mixprecConfig.cmake
  INSTALL_DESTINATION ${MIXPREC_CMAKE_DIR})
# ARCH_INDEPENDENT while header-only: a package built on one machine serves any architecture. The
# compiled component is a static library of this machine's architecture.
if(TARGET mixprec_compiled)
  set(_mixprec_arch "")
else()
  set(_mixprec_arch ARCH_INDEPENDENT)
endif()
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/mixprecConfigVersion.cmake
  COMPATIBILITY SameMajorVersion ${_mixprec_arch})
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/mixprecConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/mixprecConfigVersion.cmake
  cmake/mixprecImportCudnn.cmake cmake/mixprecImportNccl.cmake cmake/mixprecImportOneDNN.cmake
  DESTINATION ${MIXPREC_CMAKE_DIR})
