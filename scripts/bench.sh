#!/usr/bin/env bash
# Runs the micro-benchmark suite (GEMM, conv2d, casts/element-wise/GradScaler, autocast) with
# interleaved repetitions, writes Google Benchmark JSON under results/, and prints the ratios
# issue 7's targets are read from (medians of the repetitions).
#
#   scripts/bench.sh [build-dir] [filter-regex]
#   BENCH_REPETITIONS=5 (default) BENCH_MIN_TIME=0.2 (seconds per repetition, default)
#   BENCH_BIN=path/to/bench (use that binary instead of building build-dir's)
#
# On a shared machine absolute numbers move with the load; every variant of one comparison runs
# interleaved with the others in the same process, so the ratios are what to read.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/release}
filter=${2:-'^BM_(Gemm|Conv2d|Memcpy|Cast|Elementwise|GradScaler|Autocast)'}
reps=${BENCH_REPETITIONS:-5}
min_time=${BENCH_MIN_TIME:-0.2}

bench=${BENCH_BIN:-}  # a bench binary built elsewhere: skip the build
if [ -z "$bench" ]; then
  if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release
  fi
  cmake --build "$build" --target bench -j2
  bench=$build/benchmarks/bench
fi

mkdir -p "$root/results"
stamp=$(date +%Y%m%d_%H%M%S)
json=$root/results/bench_$stamp.json
{
  echo "command: $0 $*  (repetitions $reps, min_time $min_time, filter $filter)"
  echo "commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset} OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
} | tee "$root/results/bench_$stamp.txt"

"$bench" --benchmark_filter="$filter" --benchmark_repetitions="$reps" --benchmark_enable_random_interleaving=true \
  --benchmark_min_time="$min_time" --benchmark_report_aggregates_only=true \
  --benchmark_out="$json" --benchmark_out_format=json

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$root/results/bench_$stamp.txt"
python3 - "$json" <<'EOF' | tee -a "$root/results/bench_$stamp.txt"
import json, re, sys
rows = {b["run_name"].replace("/real_time", ""): b for b in json.load(open(sys.argv[1]))["benchmarks"] if b.get("aggregate_name") == "median"}
def val(name, key):  # rates in units of 10^9 (GFLOP/s, GB/s); times as reported
    b = rows.get(name)
    v = None if b is None or "error_message" in b else b.get(key)
    return v / 1e9 if v is not None and key.endswith("/s") else v
def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"
def fmt(v):
    return "-" if v is None else f"{v:.1f}"

print("\n== GEMM, GFLOP/s (medians) ==")
gemm = sorted({m.group(1) for n in rows if (m := re.match(r"(BM_Gemm(?:Square|Gpt_\w+))/", n))})
shapes = []
for fam in gemm:
    if fam == "BM_GemmSquare":
        shapes += sorted({(fam, n.rsplit("/", 1)[1]) for n in rows if n.startswith(fam + "/")}, key=lambda s: int(s[1]))
    else:
        shapes.append((fam, None))
def g(fam, size, impl):
    return val(f"{fam}/{impl}" + (f"/{size}" if size else ""), "GFLOP/s")
print(f"{'shape':34} {'op f32':>7} {'oneDNN':>7} {'f32/oneDNN':>10} {'op bf16':>7} {'bf16/f32':>8} {'op f16':>7} {'f16/f32':>7} "
      f"{'eigen':>6} {'k bf16dot/k f32':>15} {'oneDNN bf16':>11}")
for fam, size in shapes:
    name = (fam.replace("BM_GemmSquare", "square") + (f" {size}" if size else "")).replace("BM_GemmGpt_", "gpt ")
    f32, dn, b16, f16 = g(fam, size, "op_f32"), g(fam, size, "onednn_f32"), g(fam, size, "op_bf16"), g(fam, size, "op_f16")
    print(f"{name:34} {fmt(f32):>7} {fmt(dn):>7} {ratio(f32, dn):>10} {fmt(b16):>7} {ratio(b16, f32):>8} {fmt(f16):>7} "
          f"{ratio(f16, f32):>7} {fmt(g(fam, size, 'eigen')):>6} {ratio(g(fam, size, 'k_bf16_dot'), g(fam, size, 'k_f32')):>15} "
          f"{fmt(g(fam, size, 'onednn_bf16')):>11}")

print("\n== conv2d, GFLOP/s (medians): f32, bf16 ==")
for n in sorted(rows):
    if n.startswith("BM_Conv2d/") and "_f32/" in n:
        b = n.replace("_f32/", "_bf16/")
        f, h = val(n, "GFLOP/s"), val(b, "GFLOP/s")
        print(f"{n.replace('BM_Conv2d/', '').replace('_f32', ''):40} {fmt(f):>7} {fmt(h):>7}  bf16/f32 {ratio(h, f)}")

print("\n== memory-bound passes, GB/s (read + written; medians) and fraction of memcpy ==")
for n in sorted(rows):
    if re.match(r"BM_(Memcpy|Cast|Elementwise|GradScalerUnscale)", n):
        size = n.rsplit("/", 1)[1]
        gb = val(n, "GB/s")
        print(f"{n:48} {fmt(gb):>7}  of memcpy {ratio(gb, val('BM_Memcpy/' + size, 'GB/s'))}")

print("\n== autocast bookkeeping, ns per tiny op (medians) ==")
for op in ("relu", "add", "linear"):
    off, on = val(f"BM_AutocastTinyOp/{op}_off", "real_time"), val(f"BM_AutocastTinyOp/{op}_on", "real_time")
    if off is not None and on is not None:
        print(f"{op:8} off {off:8.0f}  on {on:8.0f}  on - off {on - off:8.0f}")
EOF
echo "JSON: $json"
