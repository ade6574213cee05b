// GEMM through the op layer vs Eigen called directly: the op layer (dispatch, autocast check,
// allocation, dtype conversion for 16-bit inputs) must cost next to nothing at these sizes.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <mixprec/mixprec.hpp>

using namespace mixprec;

namespace {
void set_flops(benchmark::State& st, int64_t n) {
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * n * n * n * static_cast<double>(st.iterations()),
                                              benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

void BM_MatmulOpLayer(benchmark::State& st, DType dtype) {
  const int64_t n = st.range(0);
  const Tensor a = randn({n, n}).to(dtype), b = randn({n, n}).to(dtype);
  for (auto _ : st) {
    Tensor c = matmul(a, b);
    benchmark::DoNotOptimize(c.data_ptr());
  }
  set_flops(st, n);
}

void BM_MatmulEigenDirect(benchmark::State& st) {
  const int64_t n = st.range(0);
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const M a = M::Random(n, n), b = M::Random(n, n);
  M c(n, n);
  for (auto _ : st) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
  set_flops(st, n);
}
}  // namespace

BENCHMARK(BM_MatmulEigenDirect)->Arg(256)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatmulOpLayer, float32, DType::Float32)->Arg(256)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatmulOpLayer, bfloat16, DType::BFloat16)->Arg(256)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_MatmulOpLayer, float16, DType::Float16)->Arg(256)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
