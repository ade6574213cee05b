#!/bin/bash
# The GPU checks, on a machine with an NVIDIA GPU: the CUDA tests, mixprec_gpu_selftest, one
# epoch of the ResNet example and 300 steps of the transformer example on the GPU in each
# precision, and compute-sanitizer's memcheck over the kernel and public-op tests.
#   scripts/gpu_check.sh [BIN_DIR] [DATA_DIR] [OUT_DIR] [CORPUS_DIR]
# BIN_DIR holds test_cuda_host, test_cuda_types, test_cuda_device, mixprec_gpu_selftest,
# mixprec_resnet_cuda and mixprec_transformer_cuda (build/release/tests by default); DATA_DIR the
# Fashion-MNIST .gz files; OUT_DIR receives the log and the examples' CSVs; CORPUS_DIR the
# fortunes text files (without it, the transformer trains on its synthetic text). The CUDA libraries are looked up on the
# machine (a CUDA toolkit's, or the ones PyTorch's wheels carry) when the loader lacks them.
set -u
bin=$(cd "${1:-build/release/tests}" && pwd) || exit 2
data=$(cd "${2:-/usr/share/datasets/fashion-mnist}" && pwd) || exit 2
out=$(mkdir -p "${3:-results/gpu}" && cd "${3:-results/gpu}" && pwd) || exit 2
corpus=(--synthetic)
[ -d "${4:-/usr/share/games/fortunes}" ] && corpus=(--corpus "$(cd "${4:-/usr/share/games/fortunes}" && pwd)")
export OMP_WAIT_POLICY=passive
exec 3>&1 4>&2 > >(tee "$out/gpu_check.log") 2>&1
tee_pid=$!
failed=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || failed=1
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcudnn.so.9; do
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
run 60 "$bin/test_cuda_types"
run 60 "$bin/test_cuda_host"
run 180 "$bin/test_cuda_device"
run 180 "$bin/mixprec_gpu_selftest"
for p in fp32 bf16 fp16; do
  run 300 "$bin/mixprec_resnet_cuda" --device cuda --precision "$p" --epochs 1 --data-dir "$data" --csv "$out/resnet20_cuda_$p.csv"
done
for p in fp32 bf16 fp16; do
  run 300 "$bin/mixprec_transformer_cuda" --device cuda --precision "$p" "${corpus[@]}" --csv "$out/gpt_mini_cuda_$p.csv"
done
if command -v compute-sanitizer >/dev/null; then
  run 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$bin/test_cuda_device" --gtest_filter='CudaConv.*:CudaNorm.*:CudaElementwise.*:CudaAmp.*:CudaOps.*'
fi
exec 1>&3 2>&4 3>&- 4>&-  # close the pipe to tee and let it finish the log
wait "$tee_pid" 2>/dev/null
exit $failed
