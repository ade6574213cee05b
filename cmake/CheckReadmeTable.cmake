# Fails when the autocast policy table of DOC (docs/numerics.md, between the policy-table markers;
# it moved there from the README) differs from what the code prints. Regenerate with
# scripts/update_readme.sh.
execute_process(COMMAND ${TOOL} OUTPUT_VARIABLE generated RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "policy table tool failed: ${rc}")
endif()
file(READ ${DOC} doc)
if(NOT doc MATCHES "<!-- policy-table:begin -->\n(.*)<!-- policy-table:end -->")
  message(FATAL_ERROR "${DOC} has no policy-table markers")
endif()
if(NOT CMAKE_MATCH_1 STREQUAL generated)
  message(FATAL_ERROR "${DOC}: the policy table is out of date: run scripts/update_readme.sh")
endif()
message(STATUS "${DOC}: policy table matches the code")
