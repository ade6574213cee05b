#!/usr/bin/env bash
# 1 -> 2 process data-parallel scaling of the two examples on this machine, rounds interleaved:
# one process with one thread, two processes (--distributed, one thread each), and one process
# with two threads (the other way to use two cores). Prints the global throughput of each run.
# Usage: scripts/ddp_scaling.sh [build-dir] [rounds]
set -euo pipefail
build=${1:-build/release}
rounds=${2:-2}
mpirun=(mpirun --oversubscribe --allow-run-as-root)
export OMP_WAIT_POLICY=passive
resnet=("$build/examples/mixprec_resnet" --precision bf16 --batch-size 64 --limit-batches 30)
gpt=("$build/examples/mixprec_transformer" --precision bf16 --limit-batches 10 --eval-batches 1 --sample-len 1)
run() {  # label, threads, command...
  local label=$1 threads=$2
  shift 2
  local line
  line=$(OMP_NUM_THREADS=$threads "$@" | grep "global throughput")
  echo "$label | $line"
}
for r in $(seq "$rounds"); do
  echo "# round $r ($(uptime | sed 's/.*load/load/'))"
  run "resnet20 1 process x 1 thread " 1 "${resnet[@]}"
  run "resnet20 2 processes x 1 thread" 1 "${mpirun[@]}" -np 2 "${resnet[@]}" --distributed
  run "resnet20 1 process x 2 threads" 2 "${resnet[@]}"
  run "gpt-mini 1 process x 1 thread " 1 "${gpt[@]}"
  run "gpt-mini 2 processes x 1 thread" 1 "${mpirun[@]}" -np 2 "${gpt[@]}" --distributed
  run "gpt-mini 1 process x 2 threads" 2 "${gpt[@]}"
done
