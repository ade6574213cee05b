# The package tests, one STEP per ctest entry (tests/CMakeLists.txt):
#   install            cmake --install into a fresh PREFIX; the exported files name no path of
#                      this machine (CUDA, cuDNN, oneDNN, this tree).
#   cpu_consumer       tests/package against PREFIX with the CUDA toolkit and MPI hidden from
#                      CMake, as on a CPU-only machine: configures, builds, runs, checks the values.
#   missing_component  requiring components that cannot be had (cuda and mpi hidden, one unknown)
#                      fails the configure with mixprec_FOUND false and a reason for each.
#   fetchcontent       tests/package vendoring this tree with FetchContent: builds and runs, and its
#                      configure probed no optional part (no CUDA, MPI, cuDNN, NCCL or oneDNN lookup)
#                      and added no install rules.
# cmake -DSTEP=... -DSOURCE_DIR=<mixprec> -DBUILD_DIR=<mixprec build> -DWORK_DIR=<scratch>
#       -DPREFIX=<install prefix> -DGENERATOR=... -DCXX_COMPILER=... -P run_consumer.cmake
set(consumer_src ${SOURCE_DIR}/tests/package)
set(expected_output "consumer ok: sum=28 matmul=3 onednn=")
# The consumer compiles with no optimisation flags: the slow part is parsing mixprec.hpp.
set(common_args -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=)
set(hide_cuda_mpi -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)

function(run what)  # run(<description> COMMAND ...): output in `out`, fails on a non-zero exit
  execute_process(${ARGN} OUTPUT_VARIABLE o ERROR_VARIABLE o RESULT_VARIABLE rc)
  message("---- ${what}\n${o}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc})")
  endif()
  set(out "${o}" PARENT_SCOPE)
endfunction()

function(build_and_run dir)
  run("build ${dir}" COMMAND ${CMAKE_COMMAND} --build ${dir})
  run("run consumer" COMMAND ${dir}/consumer)
  string(FIND "${out}" "${expected_output}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "consumer printed '${out}', expected '${expected_output}...'")
  endif()
endfunction()

if(STEP STREQUAL "install")
  file(REMOVE_RECURSE ${PREFIX})
  run("install" COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${PREFIX})
  file(GLOB_RECURSE package_files ${PREFIX}/*.cmake)
  if(NOT package_files)
    message(FATAL_ERROR "no CMake package files under ${PREFIX}")
  endif()
  set(bad "")
  foreach(f IN LISTS package_files)
    file(STRINGS ${f} lines)
    foreach(line IN LISTS lines)
      string(FIND "${line}" "${SOURCE_DIR}" in_source)
      string(FIND "${line}" "${BUILD_DIR}" in_build)
      # A library under the installed prefix (${_IMPORT_PREFIX}/lib/libmixprec.a, the compiled
      # component) is the package's own file, not a path of this machine.
      string(FIND "${line}" "\${_IMPORT_PREFIX}" in_prefix)
      if((line MATCHES "/usr/local/cuda|/usr/lib|/usr/include|\\.so[\";. ]|\\.so$|\\.a[\"; ]" AND in_prefix EQUAL -1)
         OR NOT in_source EQUAL -1 OR NOT in_build EQUAL -1)
        string(APPEND bad "\n  ${f}: ${line}")
      endif()
    endforeach()
  endforeach()
  if(bad)
    message(FATAL_ERROR "the installed package names paths of this machine:${bad}")
  endif()
  list(LENGTH package_files n)
  message("package: ${n} CMake files installed, none names a path of this machine")

elseif(STEP STREQUAL "cpu_consumer")
  set(dir ${WORK_DIR}/cpu_consumer)
  file(REMOVE_RECURSE ${dir})
  run("configure (CUDA toolkit and MPI hidden)" COMMAND ${CMAKE_COMMAND} -S ${consumer_src} -B ${dir} ${common_args}
      ${hide_cuda_mpi} -DCMAKE_PREFIX_PATH=${PREFIX} -DMIXPREC_CONSUMER_MODE=find_package)
  if(NOT out MATCHES "consumer: mixprec optional components found: \\[[a-z;]*\\]")
    message(FATAL_ERROR "the consumer's configure did not report mixprec's components")
  endif()
  if(out MATCHES "found: \\[([a-z]+;)*(cuda|mpi|nccl)[];]")  # whole names: "compiled" contains "mpi"
    message(FATAL_ERROR "a component needing the hidden CUDA toolkit or MPI was reported found")
  endif()
  if(NOT out MATCHES "found: \\[([a-z]+;)*compiled[];]")  # the consumer then builds in the compiled mode
    message(FATAL_ERROR "the compiled component (mixprec::compiled) was not found in the installed package")
  endif()
  build_and_run(${dir})

elseif(STEP STREQUAL "missing_component")
  set(dir ${WORK_DIR}/missing_component)
  file(REMOVE_RECURSE ${dir})
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${consumer_src} -B ${dir} ${common_args} ${hide_cuda_mpi}
      -DCMAKE_PREFIX_PATH=${PREFIX} -DMIXPREC_CONSUMER_MODE=find_package "-DMIXPREC_CONSUMER_COMPONENTS=cuda mpi bogus"
    OUTPUT_VARIABLE out ERROR_VARIABLE out RESULT_VARIABLE rc)
  message("---- configure requiring cuda, mpi (hidden) and bogus\n${out}")
  string(REGEX REPLACE "[ \n]+" " " flat "${out}")  # CMake wraps the reason over lines
  if(rc EQUAL 0)
    message(FATAL_ERROR "find_package(mixprec REQUIRED COMPONENTS cuda mpi bogus) succeeded")
  endif()
  foreach(want "set mixprec_FOUND to FALSE"
               "mixprec component 'cuda' (needs the CUDA toolkit|was not built)"
               "mixprec component 'mpi' (needs MPI|was not built)"
               "mixprec component 'bogus' is unknown")
    if(NOT flat MATCHES "${want}")
      message(FATAL_ERROR "the failed configure does not say: ${want}")
    endif()
  endforeach()
  message("missing components: configure failed with a reason for each, as it should")

elseif(STEP STREQUAL "fetchcontent")
  set(dir ${WORK_DIR}/fetchcontent)
  file(REMOVE_RECURSE ${dir})
  run("configure (FetchContent)" COMMAND ${CMAKE_COMMAND} -S ${consumer_src} -B ${dir} ${common_args}
      -DMIXPREC_CONSUMER_MODE=fetchcontent -DMIXPREC_SOURCE_DIR=${SOURCE_DIR})
  # Probes leave traces: their messages in the log and their results in the cache.
  if(out MATCHES "(Looking for a CUDA compiler|CUDAToolkit|Found MPI|mpiexec|cuDNN|NCCL backend ON|oneDNN convolutions ON)")
    message(FATAL_ERROR "the vendored configure probed an optional part: '${CMAKE_MATCH_1}'")
  endif()
  file(STRINGS ${dir}/CMakeCache.txt cache REGEX "^(CMAKE_CUDA_COMPILER|MPIEXEC_EXECUTABLE|MPI_CXX_COMPILER|MIXPREC_CUDNN_LIBRARY|MIXPREC_NCCL_LIBRARY|MIXPREC_DNNL_LIBRARY)[:=]")
  if(cache)
    message(FATAL_ERROR "the vendored configure probed optional parts; cache holds: ${cache}")
  endif()
  file(GLOB_RECURSE install_scripts ${dir}/_deps/*cmake_install.cmake)
  foreach(f IN LISTS install_scripts)
    file(STRINGS ${f} rules REGEX "include/mixprec|mixprecConfig")
    if(rules)
      message(FATAL_ERROR "the vendored build installs mixprec (MIXPREC_INSTALL should be OFF): ${f}")
    endif()
  endforeach()
  build_and_run(${dir})

else()
  message(FATAL_ERROR "unknown STEP '${STEP}'")
endif()
