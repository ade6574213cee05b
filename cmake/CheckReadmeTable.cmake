# Fails when the README's policy table (between the policy-table markers) differs from what the
# code prints. Regenerate with scripts/update_readme.sh.
execute_process(COMMAND ${TOOL} OUTPUT_VARIABLE generated RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "policy table tool failed: ${rc}")
endif()
file(READ ${README} readme)
string(REGEX MATCH "<!-- policy-table:begin -->\n(.*)<!-- policy-table:end -->" _ "${readme}")
if(NOT CMAKE_MATCH_1 STREQUAL generated)
  message(FATAL_ERROR "README.md policy table is out of date: run scripts/update_readme.sh")
endif()
message(STATUS "README policy table matches the code")
