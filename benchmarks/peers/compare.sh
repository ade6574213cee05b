#!/usr/bin/env bash
# Peer comparison: builds mixprec_workloads and (when Debian's libtorch-dev is installed)
# torch_workloads, runs them alternately for several rounds on the reference workloads and prints
# a Markdown table of ours/LibTorch ratios (ms/step and peak tensor bytes), with the machine.
#
#   benchmarks/peers/compare.sh            # 3 rounds, 5 timed steps after 2 warm-up steps
#   ROUNDS=5 STEPS=10 benchmarks/peers/compare.sh | tee results/peers_$(date +%F).txt
#
# Environment: ROUNDS, STEPS, WARMUP, THREADS (2, both sides), BUILD_DIR (build/peers-cmp),
# TORCH_BLAS (openblas when Debian's libopenblas0-openmp is installed, else reference: the BLAS
# libtorch's GEMMs call; chosen per process with LD_LIBRARY_PATH so the system default is not
# involved), OMP_WAIT_POLICY (passive, for both, as on a shared machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROUNDS=${ROUNDS:-3} STEPS=${STEPS:-5} WARMUP=${WARMUP:-2} THREADS=${THREADS:-2}
BUILD_DIR=${BUILD_DIR:-$ROOT/build/peers-cmp}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
# Neither side may use more threads than asked for through a BLAS or OpenMP default.
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS

"$ROOT/scripts/setup.sh" peers >&2  # LibTorch and its BLAS, only what is missing
cmake -S "$ROOT/benchmarks/peers" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >"$BUILD_DIR.configure.log" 2>&1 ||
  { cat "$BUILD_DIR.configure.log" >&2; exit 1; }
cmake --build "$BUILD_DIR" -j"$THREADS" >&2
OURS="$BUILD_DIR/mixprec_workloads" TORCH="$BUILD_DIR/torch_workloads"
[ -x "$TORCH" ] || echo "compare.sh: LibTorch not found (apt-get install libtorch-dev); running ours only" >&2

BLAS_DIR=/usr/lib/x86_64-linux-gnu/openblas-openmp
if [ -z "${TORCH_BLAS:-}" ]; then [ -e "$BLAS_DIR/libblas.so.3" ] && TORCH_BLAS=openblas || TORCH_BLAS=reference; fi
case "$TORCH_BLAS" in
  openblas) TORCH_LD="$BLAS_DIR" ;;
  reference) TORCH_LD=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack ;;
  *) echo "compare.sh: TORCH_BLAS must be openblas or reference, got '$TORCH_BLAS'" >&2; exit 1 ;;
esac

echo "## Peer comparison: mixprec vs LibTorch"
echo
echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores online; flags: $(grep -o -w -E 'avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "- LibTorch: $(dpkg-query -W -f='${Version}' libtorch-dev 2>/dev/null || echo 'not installed'), BLAS: $TORCH_BLAS; mixprec: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) + working tree (sha1 of diff + untracked files: $(cd "$ROOT" && { git diff HEAD; git ls-files -z --others --exclude-standard | xargs -0 -r cat; } 2>/dev/null | sha1sum | cut -c1-10))"
echo "- threads $THREADS each, OMP_WAIT_POLICY=$OMP_WAIT_POLICY; $ROUNDS rounds x ($WARMUP warm-up + $STEPS timed steps), ours and LibTorch alternating"
echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- command: ROUNDS=$ROUNDS STEPS=$STEPS WARMUP=$WARMUP THREADS=$THREADS benchmarks/peers/compare.sh"
echo

RAW=$(mktemp)
trap 'rm -f "$RAW"' EXIT
run_ours() { "$OURS" --workload "$1" --precision "$2" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" | grep '^RESULT' >>"$RAW"; }
run_torch() {
  [ -x "$TORCH" ] && [ "$2" != fp16 ] || return 0  # 1.13's CPU autocast has no float16
  LD_LIBRARY_PATH="$TORCH_LD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$TORCH" --workload "$1" --precision "$2" --steps "$STEPS" \
    --warmup "$WARMUP" --threads "$THREADS" | grep '^RESULT' >>"$RAW"
}
# The op-layer GEMM's rate per precision: the table reports each step's FLOPs against it.
for p in fp32 bf16 fp16; do "$OURS" --workload gemm --precision $p --steps 20 --threads "$THREADS" | grep '^RESULT' >>"$RAW"; done
for ((r = 1; r <= ROUNDS; r++)); do
  echo "round $r/$ROUNDS" >&2
  for w in resnet20 gpt-mini; do
    for p in fp32 bf16 fp16; do
      if ((r % 2)); then run_ours $w $p; run_torch $w $p; else run_torch $w $p; run_ours $w $p; fi
    done
  done
done
echo "- load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

python3 "$ROOT/benchmarks/peers/table.py" "$RAW"
