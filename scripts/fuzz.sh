#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang (ASan + UBSan), replays the committed
# regression inputs, then fuzzes each target for FUZZ_SECONDS (default 60) from its seed corpus.
# Usage: scripts/fuzz.sh [target...]   (targets: safetensors idx text; default all)
# Crashes land in build/fuzz/artifacts/<target>/: minimise one with
#   build/fuzz/fuzz_<target> -minimize_crash=1 <file>, fix the loader, and commit the input to
#   fuzz/regressions/<target>/ so every later run (and tests/reliability) replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${FUZZ_CXX:-clang++-14}
SECONDS_EACH=${FUZZ_SECONDS:-60}
targets=("$@")
((${#targets[@]})) || targets=(safetensors idx text)
out=build/fuzz
mkdir -p "$out"
command -v "$CXX" >/dev/null || { echo "fuzz: $CXX not found (scripts/setup.sh installs clang)"; exit 1; }

for t in "${targets[@]}"; do
  bin=$out/fuzz_$t
  if [[ ! -x $bin || fuzz/fuzz_$t.cpp -nt $bin || fuzz/harness.hpp -nt $bin || -n $(find include -newer "$bin" -name '*.hpp' -print -quit) ]]; then
    echo "fuzz: building $bin"
    # No -fopenmp: the omp pragmas are ignored and loops run serially (the loaders are serial
    # anyway), and clang's OpenMP runtime (libomp) need not be installed.
    "$CXX" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
      -Wno-unknown-pragmas -Iinclude -I/usr/include/eigen3 \
      "fuzz/fuzz_$t.cpp" -lz -o "$bin"
  fi
done

export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for t in "${targets[@]}"; do
  bin=$out/fuzz_$t
  regress=fuzz/regressions/$t
  if [[ -d $regress ]] && compgen -G "$regress/*" >/dev/null; then
    echo "fuzz: $t: replaying $(ls "$regress" | wc -l) regression inputs"
    "$bin" -runs=0 "$regress"/* > "$out/$t.regressions.log" 2>&1 || { echo "fuzz: $t: a regression input fails again (log: $out/$t.regressions.log)"; exit 1; }
  fi
  work=$out/corpus/$t
  mkdir -p "$work" "$out/artifacts/$t"
  dict=()
  [[ -f fuzz/$t.dict ]] && dict=(-dict="fuzz/$t.dict")
  echo "fuzz: $t: fuzzing for ${SECONDS_EACH}s"
  # New inputs go to build/fuzz/corpus/<t> (first directory); the committed seeds stay as they are.
  "$bin" "$work" "fuzz/corpus/$t" "${dict[@]}" -max_total_time="$SECONDS_EACH" \
    -max_len=4096 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
    2>&1 | tee "$out/$t.log" | grep -E "^#[0-9]+.*(DONE|pulse)|stat::number_of_executed_units|ERROR|FINDING|SUMMARY" || true
  if compgen -G "$out/artifacts/$t/*" >/dev/null; then
    echo "fuzz: $t: FAILED, inputs in $out/artifacts/$t/ (log: $out/$t.log)"
    exit 1
  fi
  echo "fuzz: $t: clean for ${SECONDS_EACH}s ($(grep -o 'stat::number_of_executed_units: [0-9]*' "$out/$t.log" | awk '{print $2}') runs)"
done
