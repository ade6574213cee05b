// Our side of the peer comparison: times the reference workloads (../workloads.hpp) and prints
// one RESULT line that compare.sh parses; torch_workloads.cpp prints the same line for LibTorch.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <vector>

#include "../workloads.hpp"
#include "common/cli.hpp"

using namespace mixprec;
using namespace mixprec::bench;

namespace {

// --workload gemm: the op-layer GEMM's rate at 1024^3 in this precision (fp32: float32 operands;
// bf16 / fp16: 16-bit operands, as autocast feeds them), the peak the table measures steps against.
int gemm_rate(Precision p, int64_t reps, int64_t threads) {
#if defined(_OPENMP)
  omp_set_num_threads(static_cast<int>(threads));
#endif
  const int64_t n = 1024;
  const DType dt = p == Precision::FP32 ? DType::Float32 : p == Precision::BF16 ? DType::BFloat16 : DType::Float16;
  const Tensor a = randn({n, n}).to(dt), b = randn({n, n}).to(dt);
  std::vector<double> ms;
  for (int64_t i = 0; i < reps + 1; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const Tensor c = matmul(a, b);
    if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  // The fastest repetition: a peak, not disturbed by the first touches of the packing buffers.
  std::printf("RESULT lib=mixprec workload=gemm precision=%s threads=%lld gflops=%.1f\n", precision_name(p),
              static_cast<long long>(cpu::num_threads()), 2.0 * n * n * n / (ms.front() * 1e6));
  return 0;
}

int run(int argc, char** argv) {
  examples::Cli cli(argc, argv, {{"workload", "resnet20"}, {"precision", "fp32"}, {"steps", "10"}, {"warmup", "2"}, {"threads", "2"}, {"seed", "0"}});
  if (cli.help()) {
    cli.usage(std::cout, "mixprec_workloads");
    return 0;
  }
  const Precision p = examples::parse_precision(cli.str("precision"));
  const int64_t steps = cli.i64("steps"), warmup = cli.i64("warmup"), threads = cli.i64("threads");
  if (cli.str("workload") == "gemm") return gemm_rate(p, steps, threads);
  const Workload w = parse_workload(cli.str("workload"));
  // The first step creates AdamW's state, so the last of >= 2 warm-up steps shows the steady peak.
  MIXPREC_CHECK(steps >= 1 && warmup >= 2 && threads >= 1, "--steps and --threads must be >= 1 and --warmup >= 2, got ", steps, ", ",
                threads, ", ", warmup);
#if defined(_OPENMP)
  omp_set_num_threads(static_cast<int>(threads));
#else
  MIXPREC_CHECK(threads == 1, "mixprec_workloads: built without OpenMP, so only --threads 1 is possible");
#endif
  TrainingWorkload work(w, p, static_cast<uint64_t>(cli.i64("seed")));
  // Untimed warm-up steps; the last one is the memory measurement.
  for (int64_t i = 0; i + 1 < warmup; ++i) work.step();
  const PeakMemory mem = measure_peak([&] { work.step(); });
  std::vector<double> ms;
  double loss = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    loss = work.step();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  MIXPREC_CHECK(std::isfinite(loss), "mixprec_workloads: ", workload_name(w), " ", precision_name(p), " diverged (loss ", loss, ")");
  std::sort(ms.begin(), ms.end());
  std::printf("RESULT lib=mixprec workload=%s precision=%s threads=%lld steps=%lld ms_median=%.2f ms_min=%.2f peak_bytes=%lld "
              "baseline_bytes=%lld loss=%.4f gflop_per_step=%.2f\n",
              workload_name(w), precision_name(p), static_cast<long long>(cpu::num_threads()), static_cast<long long>(steps), ms[ms.size() / 2],
              ms.front(), static_cast<long long>(mem.peak), static_cast<long long>(mem.baseline), loss, flops_per_step(w) / 1e9);
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
