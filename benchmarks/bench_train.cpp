// Whole training steps of the reference workloads (workloads.hpp) in fp32, bf16 autocast and
// fp16 autocast + GradScaler, and the ResNet-50 forward+backward peak-memory table.
#include <benchmark/benchmark.h>

#include <chrono>

#include "workloads.hpp"

namespace mixprec::bench {
namespace {

void set_memory_counters(benchmark::State& st, const PeakMemory& m) {
  st.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(m.peak), benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  st.counters["step_bytes"] =
      benchmark::Counter(static_cast<double>(m.peak - m.baseline), benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

// peak_bytes: live tensor bytes at the step's high-water mark (weights, AdamW state, activations,
// gradients); step_bytes: the part the step itself allocates. Measured on the second step, once
// AdamW's lazily created state exists.
void BM_TrainStep(benchmark::State& st, Workload w, Precision p) {
  TrainingWorkload work(w, p);
  work.step();
  const PeakMemory mem = measure_peak([&] { work.step(); });
  double seconds = 0, loss = 0;
  for (auto _ : st) {
    const auto t0 = std::chrono::steady_clock::now();
    loss = work.step();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  st.counters["ms/step"] = benchmark::Counter(1e3 * seconds, benchmark::Counter::kAvgIterations);
  st.counters["loss"] = loss;  // a NaN here means the step is broken, not fast
  set_memory_counters(st, mem);
}

// The seeds' memory table: ResNet-50 (ImageNet layout, 1000 classes) forward + backward, no
// optimizer, on 3 x 64 x 64 images (224 x 224 is too slow for a 2-core CPU; activations scale
// with the pixel count, so the AMP/fp32 ratios carry over). Args: precision (0 fp32, 1 bf16,
// 2 fp16), batch.
constexpr int64_t kResNet50Image = 64;
void BM_ResNet50PeakMemory(benchmark::State& st) {
  const auto p = static_cast<Precision>(st.range(0));
  const int64_t batch = st.range(1);
  Generator gen(0);
  auto model = nn::models::make_resnet("resnet50", 1000, 3, false, gen);
  const Tensor x = randn({batch, 3, kResNet50Image, kResNet50Image}, DType::Float32, gen);
  const Tensor y = randint(0, 1000, {batch}, DType::Int64, gen);
  PeakMemory mem;
  for (auto _ : st) {
    model->zero_grad();
    mem = measure_peak([&] {
      Tensor loss;
      {
        examples::ForwardScope scope(p);
        loss = cross_entropy(model->forward(x), y);
      }
      loss.backward();
    });
  }
  st.SetLabel(std::string(precision_name(p)) + " batch " + std::to_string(batch) + " " + std::to_string(kResNet50Image) + "px");
  set_memory_counters(st, mem);
}

}  // namespace

BENCHMARK_CAPTURE(BM_TrainStep, resnet20/fp32, Workload::ResNet20, Precision::FP32)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2);
BENCHMARK_CAPTURE(BM_TrainStep, resnet20/bf16, Workload::ResNet20, Precision::BF16)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2);
BENCHMARK_CAPTURE(BM_TrainStep, resnet20/fp16, Workload::ResNet20, Precision::FP16)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2);
BENCHMARK_CAPTURE(BM_TrainStep, gpt-mini/fp32, Workload::GptMini, Precision::FP32)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2);
BENCHMARK_CAPTURE(BM_TrainStep, gpt-mini/bf16, Workload::GptMini, Precision::BF16)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2);
BENCHMARK_CAPTURE(BM_TrainStep, gpt-mini/fp16, Workload::GptMini, Precision::FP16)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2);
BENCHMARK(BM_ResNet50PeakMemory)
    ->ArgNames({"precision", "batch"})
    ->Args({0, 64})->Args({1, 64})->Args({1, 128})->Args({2, 64})->Args({2, 128})
    ->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace mixprec::bench
