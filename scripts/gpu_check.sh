#!/bin/bash
# The GPU checks, on a machine with an NVIDIA GPU: the CUDA tests, mixprec_gpu_selftest, one
# epoch of the ResNet example and 300 steps of the transformer example on the GPU in each
# precision, compute-sanitizer's memcheck over the kernel and public-op tests, then the timing
# table: mixprec_gpu_bench and PyTorch's peer (benchmarks/peers/torch_gpu.py) alternately.
#   scripts/gpu_check.sh [BIN_DIR] [DATA_DIR] [OUT_DIR] [CORPUS_DIR]
# BIN_DIR holds test_cuda_host, test_cuda_types, test_cuda_device (with the plan tests), test_nccl_single,
# mixprec_gpu_selftest, mixprec_gpu_bench, mixprec_resnet_cuda and mixprec_transformer_cuda, and
# optionally test_nccl (MPI: run on every GPU when mpirun and 2+ GPUs exist) (build/release/tests by
# default); DATA_DIR the Fashion-MNIST .gz files; OUT_DIR receives the log (gpu_check.log, or
# gpu_check_bench.log with GPU_CHECK_ONLY=bench), the examples' CSVs,
# bench.log (the BENCH lines) and table.md (the side-by-side table); CORPUS_DIR the
# fortunes text files (without it, the transformer trains on its synthetic text). The CUDA libraries are looked up on the
# machine (a CUDA toolkit's, or the ones PyTorch's wheels carry) when the loader lacks them.
# Environment: GPU_CHECK_ONLY=checks (no timing) or bench (the timing table alone, about 2.5 min);
# GPU_BENCH_ROUNDS (2) alternated rounds of the two sides; GPU_BENCH_ARGS, arguments for both
# (e.g. "--workloads gpt12,resnet20 --precisions bf16"); GPU_CHECK_EXAMPLES=0 and
# GPU_CHECK_MEMCHECK=0 leave out the examples and compute-sanitizer (a short lease).
set -u
only=${GPU_CHECK_ONLY:-all}
case $only in all | checks | bench) ;; *) echo "GPU_CHECK_ONLY must be all, checks or bench, not '$only'" >&2; exit 2 ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd) || exit 2
bin=$(cd "${1:-build/release/tests}" && pwd) || exit 2
if [ "$only" != bench ]; then
  data=$(cd "${2:-/usr/share/datasets/fashion-mnist}" && pwd) || exit 2
fi
out=$(mkdir -p "${3:-results/gpu}" && cd "${3:-results/gpu}" && pwd) || exit 2
corpus=(--synthetic)
[ -d "${4:-/usr/share/games/fortunes}" ] && corpus=(--corpus "$(cd "${4:-/usr/share/games/fortunes}" && pwd)")
export OMP_WAIT_POLICY=passive
log=gpu_check.log
[ "$only" = all ] || log=gpu_check_$only.log  # a partial run keeps the full run's log
exec 3>&1 4>&2 > >(tee "$out/$log") 2>&1
tee_pid=$!
failed=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || failed=1
torch_env=(env "LD_LIBRARY_PATH=${LD_LIBRARY_PATH-}")  # PyTorch loads the libraries its wheels carry, as it always does
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcudnn.so.9 libnccl.so.2; do
  ldconfig -p | grep -q "$lib" && continue
  p=$(find /usr/local /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
  [ -n "$p" ] && export LD_LIBRARY_PATH="$(dirname "$p")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
run() {
  local limit=$1
  shift
  echo
  echo "=== $*"
  local start=$(date +%s%N)
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "=== rc=$rc after $((($(date +%s%N) - start) / 1000000)) ms"
  [ $rc -eq 0 ] || failed=1
}
# run, with the output kept until the command ends so that its BENCH lines go to bench.log too.
bench() {
  local part="$out/.bench_part"
  run "$@" >"$part" 2>&1
  cat "$part"
  grep '^BENCH ' "$part" >>"$out/bench.log"
  rm -f "$part"
}
if [ "$only" != bench ]; then
  run 60 "$bin/test_cuda_types"
  run 60 "$bin/test_cuda_host"
  run 300 "$bin/test_cuda_device"
  # Data parallelism over NCCL: one rank without MPI (every collective, DDP steps of GPT-mini and
  # ResNet-20 against the plain step); with mpirun and several GPUs, one rank per GPU.
  run 300 "$bin/test_nccl_single"
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  if [ "$ngpu" -ge 2 ] && [ -x "$bin/test_nccl" ] && command -v mpirun >/dev/null; then
    run 300 mpirun --oversubscribe --allow-run-as-root -np "$ngpu" "$bin/test_nccl"
  else
    echo "=== test_nccl on several ranks not run: $ngpu GPU(s), mpirun $(command -v mpirun >/dev/null && echo found || echo missing)"
  fi
  run 180 "$bin/mixprec_gpu_selftest"
  [ "${GPU_CHECK_EXAMPLES:-1}" = 0 ] || for p in fp32 bf16 fp16; do
    run 300 "$bin/mixprec_resnet_cuda" --device cuda --precision "$p" --epochs 1 --data-dir "$data" --csv "$out/resnet20_cuda_$p.csv"
  done
  [ "${GPU_CHECK_EXAMPLES:-1}" = 0 ] || for p in fp32 bf16 fp16; do
    run 300 "$bin/mixprec_transformer_cuda" --device cuda --precision "$p" "${corpus[@]}" --csv "$out/gpt_mini_cuda_$p.csv"
  done
  if [ "${GPU_CHECK_MEMCHECK:-1}" != 0 ] && command -v compute-sanitizer >/dev/null; then
    run 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$bin/test_cuda_device" --gtest_filter='CudaConv.*:CudaNorm.*:CudaElementwise.*:CudaAmp.*:CudaOps.*:CudaPlans.*'
  fi
fi
if [ "$only" != checks ]; then
  # The timing table (issue 17): the same workloads on both sides, alternated round by round;
  # each side takes about 20-40 s a round on an H200 (the timeouts are caps, not estimates).
  : >"$out/bench.log"
  read -r -a bench_args <<<"${GPU_BENCH_ARGS:-}"
  torch_ok=0
  "${torch_env[@]}" python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && torch_ok=1
  [ $torch_ok -eq 1 ] || echo "=== python3 has no PyTorch with CUDA: the table has mixprec's column only"
  for round in $(seq "${GPU_BENCH_ROUNDS:-2}"); do
    echo
    echo "=== timing round $round"
    bench 75 "$bin/mixprec_gpu_bench" ${bench_args[@]+"${bench_args[@]}"}
    [ $torch_ok -eq 1 ] && bench 100 "${torch_env[@]}" python3 "$repo/benchmarks/peers/torch_gpu.py" ${bench_args[@]+"${bench_args[@]}"}
  done
  echo
  python3 "$repo/benchmarks/peers/gpu_table.py" "$out/bench.log" >"$out/table.md" || failed=1
  cat "$out/table.md"
fi
exec 1>&3 2>&4 3>&- 4>&-  # close the pipe to tee and let it finish the log
wait "$tee_pid" 2>/dev/null
exit $failed
