# Compiled mode (issue 19): mixprec::compiled is a static library holding the CPU kernel table
# and every kernel it points to (src/mixprec_compiled.cpp). A program that links it includes the
# same headers, but its units see only the table's declaration (MIXPREC_COMPILED_LIB), so they
# skip instantiating and optimising the whole table -- most of the cost of a unit that includes
# mixprec.hpp (a 30-line training program: 126 s of CPU header-only, 20.7 s compiled, g++ 12 -O2, idle).
# Header-only use (mixprec::mixprec) stays the default; the library is built with oneDNN's
# convolutions when mixprec::onednn exists, as a program linking both would be.
option(MIXPREC_COMPILED "Build mixprec::compiled, the CPU kernels compiled once into a static library" ${PROJECT_IS_TOP_LEVEL})
set(MIXPREC_COMPILED_WITH_ONEDNN OFF)
if(MIXPREC_COMPILED)
  add_library(mixprec_compiled STATIC ${CMAKE_CURRENT_SOURCE_DIR}/src/mixprec_compiled.cpp)
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
