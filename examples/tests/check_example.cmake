# Runs an example program the way a user would and checks what it prints and writes.
#   cmake -DMODE=<mode> -DEXE=<program> -DARGS="<flags, space-separated>" -DWORK=<scratch dir> [...] -P check_example.cmake
# MODE csv_lr          --csv's first rows: step 1's lr is LR1 (and step 2's LR2, if given), to the
#                      last bit but one (the program writes the shortest text that reads back exactly).
# MODE resume          EPOCHS epochs checkpointed every EVERY steps, once straight through and once
#                      stopped after step STOP (mid-epoch) and resumed: the same final state crc32
#                      and the same CSV rows but for elapsed_s. Then: resuming the finished run says
#                      so without training, and resuming with another --epochs is refused. With
#                      CKPT (< STOP), the last checkpoint before the stop is at step CKPT: the steps
#                      after it, logged before the stop, are in the resumed CSV once.
# MODE not_checkpoint  --resume of a text file: exit status 1 and one line on stderr naming the file.
cmake_minimum_required(VERSION 3.25)
separate_arguments(args UNIX_COMMAND "${ARGS}")
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

# Runs EXE with ARGS and the given extra flags; out/err/rc in <prefix>_out, <prefix>_err, <prefix>_rc.
function(run_example prefix)
  execute_process(COMMAND "${EXE}" ${args} ${ARGN} WORKING_DIRECTORY "${WORK}"
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  set(${prefix}_out "${out}" PARENT_SCOPE)
  set(${prefix}_err "${err}" PARENT_SCOPE)
  set(${prefix}_rc "${rc}" PARENT_SCOPE)
  file(WRITE "${WORK}/${prefix}.log" "${EXE} ${ARGS} ${ARGN}\nexit ${rc}\n--- stdout\n${out}--- stderr\n${err}")
endfunction()
function(expect_ok prefix)
  if(NOT "${${prefix}_rc}" STREQUAL "0")
    message(FATAL_ERROR "${prefix}: exit ${${prefix}_rc}\n${${prefix}_out}\n${${prefix}_err}")
  endif()
endfunction()
function(crc_of prefix var)
  if(NOT "${${prefix}_out}" MATCHES "final state crc32: ([0-9a-f]+)")
    message(FATAL_ERROR "${prefix}: no 'final state crc32' line\n${${prefix}_out}")
  endif()
  set(${var} "${CMAKE_MATCH_1}" PARENT_SCOPE)
endfunction()
# The CSV's rows without the elapsed_s column (the one thing that differs between runs).
function(csv_rows file var)
  file(STRINGS "${file}" lines)
  set(rows "")
  foreach(l IN LISTS lines)
    string(REGEX REPLACE ",[^,]*$" "" l "${l}")
    string(APPEND rows "${l}\n")
  endforeach()
  set(${var} "${rows}" PARENT_SCOPE)
endfunction()

# The row of step `step` has lr `want`: the same text, or `want` followed by 14 zeros and more
# digits (equal to 16 significant digits: the schedule's arithmetic may round the last bit, as
# OneCycleLR's max + (initial - max) does).
function(expect_lr row step want)
  if(NOT row MATCHES "^${step},0,[^,]+,([^,]+),")
    message(FATAL_ERROR "csv step ${step}: row '${row}'")
  endif()
  set(lr "${CMAKE_MATCH_1}")
  string(FIND "${lr}" "${want}00000000000000" at)
  if(NOT lr STREQUAL want AND NOT at EQUAL 0)
    message(FATAL_ERROR "csv step ${step}: '${row}': its lr (4th column) is ${lr}, expected ${want}, the LR the schedule "
                        "gives that step")
  endif()
endfunction()

if(MODE STREQUAL "csv_lr")
  run_example(r --csv log.csv)
  expect_ok(r)
  file(STRINGS "${WORK}/log.csv" lines)
  list(GET lines 0 header)
  if(NOT header STREQUAL "step,epoch,loss,lr,scale,skipped,elapsed_s")
    message(FATAL_ERROR "csv header is '${header}'")
  endif()
  list(GET lines 1 row1)
  expect_lr("${row1}" 1 "${LR1}")
  if(DEFINED LR2)
    list(GET lines 2 row2)
    expect_lr("${row2}" 2 "${LR2}")
  endif()
  message(STATUS "csv lr ok: ${row1}")

elseif(MODE STREQUAL "resume")
  if(NOT DEFINED CKPT)
    set(CKPT ${STOP})
  endif()
  set(common --epochs ${EPOCHS} --checkpoint-every ${EVERY})
  run_example(full ${common} --checkpoint full.ckpt --csv full.csv)
  expect_ok(full)
  crc_of(full want)
  run_example(part1 ${common} --checkpoint part.ckpt --csv part.csv --stop-at-step ${STOP})
  expect_ok(part1)
  if(NOT part1_out MATCHES "saved checkpoint part.ckpt \\(step ${CKPT}, epoch [0-9]+ at batch [0-9]+\\)")
    message(FATAL_ERROR "part1: no mid-epoch checkpoint at step ${CKPT}\n${part1_out}")
  endif()
  run_example(part2 ${common} --checkpoint part.ckpt --csv part.csv --resume part.ckpt)
  expect_ok(part2)
  if(NOT part2_out MATCHES "resumed from part.ckpt at step ${CKPT} of")
    message(FATAL_ERROR "part2: did not resume at step ${CKPT}\n${part2_out}")
  endif()
  crc_of(part2 got)
  if(NOT got STREQUAL want)
    message(FATAL_ERROR "stopped at step ${STOP} and resumed from step ${CKPT}: final state crc32 ${got}, uninterrupted run ${want}\n"
                        "--- uninterrupted\n${full_out}\n--- resumed\n${part2_out}")
  endif()
  csv_rows("${WORK}/full.csv" full_rows)
  csv_rows("${WORK}/part.csv" part_rows)
  if(NOT full_rows STREQUAL part_rows)
    message(FATAL_ERROR "per-step CSV differs:\n--- uninterrupted\n${full_rows}--- stopped and resumed\n${part_rows}")
  endif()
  # A finished run: said so, nothing trained (no throughput line), same state.
  run_example(done --epochs ${EPOCHS} --resume full.ckpt)
  expect_ok(done)
  if(NOT done_out MATCHES "a finished run" OR done_out MATCHES "throughput")
    message(FATAL_ERROR "resuming the finished run:\n${done_out}")
  endif()
  crc_of(done done_crc)
  if(NOT done_crc STREQUAL want)
    message(FATAL_ERROR "resuming the finished run changed its state: ${done_crc} vs ${want}")
  endif()
  # Another --epochs would rebuild the schedule: refused, with the value to use.
  math(EXPR more "${EPOCHS} + 1")
  run_example(longer --epochs ${more} --resume part.ckpt)
  if(longer_rc STREQUAL "0" OR NOT longer_err MATCHES "saved with --epochs ${EPOCHS}.*Resume with --epochs ${EPOCHS}")
    message(FATAL_ERROR "resuming with --epochs ${more}: exit ${longer_rc}\n${longer_err}")
  endif()
  message(STATUS "resume ok: crc32 ${want} both ways")

elseif(MODE STREQUAL "not_checkpoint")
  set(notes "${WORK}/notes.txt")
  file(WRITE "${notes}" "step,epoch,loss\n1,0,2.30\n")
  run_example(r --resume "${notes}")
  string(STRIP "${r_err}" err)
  if(NOT r_rc STREQUAL "1" OR err MATCHES "\n" OR NOT err MATCHES "^error: load_checkpoint: ${notes} is not a mixprec checkpoint")
    message(FATAL_ERROR "--resume of a text file: exit ${r_rc}, stderr:\n${r_err}")
  endif()
  message(STATUS "not-a-checkpoint ok: ${err}")

else()
  message(FATAL_ERROR "check_example.cmake: unknown MODE '${MODE}'")
endif()
