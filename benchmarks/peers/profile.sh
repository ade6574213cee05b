#!/usr/bin/env bash
# Where the step time goes: perf profiles of mixprec_workloads and torch_workloads on one workload
# and precision, as the top self-time symbols of each (built by compare.sh first).
#
#   benchmarks/peers/profile.sh resnet20 fp32 [build-dir]     (needs Debian's linux-perf)
#
# STEPS (default 3) timed steps after 2 warm-up steps; THREADS (2); TORCH_BLAS as compare.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 resnet20|gpt-mini fp32|bf16|fp16 [build-dir]" >&2; exit 1; }
W=$1 P=$2 BUILD_DIR=${3:-$ROOT/build/peers-cmp}
STEPS=${STEPS:-3} THREADS=${THREADS:-2}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
BLAS_DIR=/usr/lib/x86_64-linux-gnu/openblas-openmp
[ "${TORCH_BLAS:-openblas}" = openblas ] && [ -e "$BLAS_DIR/libblas.so.3" ] && TORCH_LD=$BLAS_DIR ||
  TORCH_LD=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

profile() {  # name, command...
  local name=$1
  shift
  perf record -q -F 499 -o "$TMP/$name.data" -- "$@" --workload "$W" --precision "$P" --steps "$STEPS" --warmup 2 --threads "$THREADS" |
    grep '^RESULT'
  echo "### $name: top self-time symbols ($W $P)"
  perf report -i "$TMP/$name.data" --no-children --sort dso,symbol --stdio --percent-limit 0.8 2>/dev/null |
    grep -E '^ +[0-9]' | cut -c1-200 | head -30
  # Stripped libraries and JIT code (libtorch_cpu, oneDNN) spread over many addresses: sum by object.
  echo "by shared object:"
  perf report -i "$TMP/$name.data" --no-children --sort dso --stdio --percent-limit 1 2>/dev/null | grep -E '^ +[0-9]' | head -12
  echo
}
profile mixprec "$BUILD_DIR/mixprec_workloads"
if [ -x "$BUILD_DIR/torch_workloads" ] && [ "$P" != fp16 ]; then
  LD_LIBRARY_PATH="$TORCH_LD" profile libtorch "$BUILD_DIR/torch_workloads"
fi
