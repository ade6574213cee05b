// Autocast bookkeeping per op (ns): a tiny op (16 float32 elements) with autocast off and on.
// For relu (Unlisted) and add (Promote) nothing is cast, so on - off is the policy lookup alone;
// linear (LowerPrecision) also casts its input to bfloat16 each call and its weight once per
// scope (the cast cache), which is the price of running a tiny matmul-like op in 16 bits.
#include <benchmark/benchmark.h>

#include <mixprec/mixprec.hpp>

using namespace mixprec;

namespace mixprec_bench_amp {

enum class TinyOp { Relu, Add, Linear };

void BM_AutocastTinyOp(benchmark::State& st, TinyOp op, bool on) {
  const Tensor x = randn({4, 4}), y = randn({4, 4});
  Tensor w = randn({4, 4});
  w.requires_grad_();  // a leaf parameter: what the cast cache keeps a bfloat16 copy of
  no_grad ng;          // bookkeeping only: no graph recording in either variant
  autocast ac(Device::CPU, DType::BFloat16, on);
  for (auto _ : st) {
    Tensor r;
    switch (op) {
      case TinyOp::Relu: r = relu(x); break;
      case TinyOp::Add: r = add(x, y); break;
      case TinyOp::Linear: r = linear(x, w); break;
    }
    benchmark::DoNotOptimize(r.data_ptr());
  }
  st.counters["ops/s"] = benchmark::Counter(static_cast<double>(st.iterations()), benchmark::Counter::kIsRate);
}

}  // namespace mixprec_bench_amp

namespace {
using mixprec_bench_amp::BM_AutocastTinyOp;
using mixprec_bench_amp::TinyOp;
BENCHMARK_CAPTURE(BM_AutocastTinyOp, relu_off, TinyOp::Relu, false);
BENCHMARK_CAPTURE(BM_AutocastTinyOp, relu_on, TinyOp::Relu, true);
BENCHMARK_CAPTURE(BM_AutocastTinyOp, add_off, TinyOp::Add, false);
BENCHMARK_CAPTURE(BM_AutocastTinyOp, add_on, TinyOp::Add, true);
BENCHMARK_CAPTURE(BM_AutocastTinyOp, linear_off, TinyOp::Linear, false);
BENCHMARK_CAPTURE(BM_AutocastTinyOp, linear_on, TinyOp::Linear, true);
}  // namespace
