# Compiled mode (issue 19): mixprec::compiled is a static library holding the CPU kernel table,
# every kernel it points to and the functions declared MIXPREC_OUTLINE (src/mixprec_compiled*.cpp;
# the mechanism: core/config.hpp). A program that links it includes the same headers, but its units
# see only declarations (MIXPREC_COMPILED_LIB), so they skip parsing, instantiating and optimising
# them -- most of the cost of a unit that includes mixprec.hpp (benchmarks/NOTES.md, "Compile time").
# Header-only use (mixprec::mixprec) stays the default; the library is built with oneDNN's
# convolutions when mixprec::onednn exists, as a program linking both would be.
option(MIXPREC_COMPILED "Build mixprec::compiled, the CPU kernels compiled once into a static library" ${PROJECT_IS_TOP_LEVEL})
set(MIXPREC_COMPILED_WITH_ONEDNN OFF)
if(MIXPREC_COMPILED)
  # Two units, built side by side (backends/cpu/kernels.hpp says which kernels each holds).
  add_library(mixprec_compiled STATIC ${CMAKE_CURRENT_SOURCE_DIR}/src/mixprec_compiled.cpp ${CMAKE_CURRENT_SOURCE_DIR}/src/mixprec_compiled_elementwise.cpp)
  add_library(mixprec::compiled ALIAS mixprec_compiled)
  set_target_properties(mixprec_compiled PROPERTIES EXPORT_NAME compiled POSITION_INDEPENDENT_CODE ON OUTPUT_NAME mixprec)
  target_link_libraries(mixprec_compiled PUBLIC mixprec::mixprec)
  set(MIXPREC_COMPILED_WITH_ONEDNN OFF)
  if(TARGET mixprec::onednn)
    target_link_libraries(mixprec_compiled PUBLIC mixprec::onednn)
    set(MIXPREC_COMPILED_WITH_ONEDNN ON)
  endif()
  target_compile_definitions(mixprec_compiled PUBLIC MIXPREC_COMPILED_LIB)
  message(STATUS "mixprec: compiled mode ON (mixprec::compiled)")
endif()
