// Memory-bound passes in GB/s (bytes read + bytes written, per second, 10^9), next to a plain
// memcpy moving the same float32 tensor: dtype casts, element-wise ops in float32 and bfloat16,
// GradScaler's fused unscale + inf/NaN check, bfloat16 softmax and layer_norm over rows of 256,
// and the GELU formulas alone over float arrays (libm's erf against cpu::vec's, portable and
// in the AVX-512 loop), which shows what cpu::map gains once it runs them vectorised. The argument is the element count in Ki
// (1024) elements: 256 Ki (1 MiB of float32, cache-resident) and 16 Mi (64 MiB, DRAM).
// Ops allocate their output each iteration, as in training (the caching allocator reuses it).
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <mixprec/mixprec.hpp>

using namespace mixprec;

namespace mixprec_bench_elementwise {

void set_traffic(benchmark::State& st, double bytes_per_iter) {
  st.counters["GB/s"] = benchmark::Counter(bytes_per_iter * st.iterations(), benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  st.counters["bytes"] = bytes_per_iter;
}

int64_t elements(const benchmark::State& st) { return st.range(0) * 1024; }

// memcpy of n float32 values: the bound every pass below is compared with.
void BM_Memcpy(benchmark::State& st) {
  const int64_t n = elements(st);
  std::vector<float> src(n, 1.0f), dst(n);
  for (auto _ : st) {
    std::memcpy(dst.data(), src.data(), n * sizeof(float));
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_traffic(st, 2.0 * n * sizeof(float));
}

void BM_Cast(benchmark::State& st, DType from, DType to) {
  const int64_t n = elements(st);
  const Tensor x = randn({n}).to(from);
  for (auto _ : st) {
    Tensor y = x.to(to);
    benchmark::DoNotOptimize(y.data_ptr());
  }
  set_traffic(st, static_cast<double>(n) * (itemsize(from) + itemsize(to)));
}

enum class Op { Add, Mul, Relu, Gelu, Softmax, LayerNorm };

void BM_Elementwise(benchmark::State& st, Op op, DType dt) {
  const int64_t n = elements(st);
  const Tensor a = randn({n}).to(dt), b = randn({n}).to(dt);
  for (auto _ : st) {
    Tensor y;
    switch (op) {
      case Op::Add: y = add(a, b); break;
      case Op::Mul: y = mul(a, b); break;
      case Op::Relu: y = relu(a); break;
      case Op::Gelu: y = gelu(a); break;
      case Op::Softmax: y = softmax(a.view({-1, 256}), 1); break;
      case Op::LayerNorm: y = layer_norm(a.view({-1, 256}), {256}); break;
    }
    benchmark::DoNotOptimize(y.data_ptr());
  }
  const int inputs = op == Op::Add || op == Op::Mul ? 2 : 1;
  set_traffic(st, static_cast<double>(n) * itemsize(dt) * (inputs + 1));
}

// GELU forward or backward (the derivative) over n floats, 8 B per element: the float64-exact
// libm formula (std::erf / std::exp per element, as before cpu::vec), fn:: with cpu::vec as
// portable code, and fn:: inside cpu::simd (AVX-512 where the CPU has it).
enum class GeluImpl { Libm, Portable, Vectorized };
void BM_GeluFormula(benchmark::State& st, GeluImpl impl, bool backward) {
  const int64_t n = elements(st);
  const Tensor xt = randn({n});
  const float* x = xt.data<float>();
  std::vector<float> out(static_cast<std::size_t>(n));
  float* y = out.data();
  auto libm = [](float v) { return 0.5f * v * (1 + std::erf(v * 0.70710678f)); };
  auto libm_grad = [](float v) {
    return 0.5f * (1 + std::erf(v * 0.70710678f)) + v * 0.39894228f * std::exp(-0.5f * v * v);
  };
  for (auto _ : st) {
    switch (impl) {
      case GeluImpl::Libm:
        for (int64_t i = 0; i < n; ++i) y[i] = backward ? libm_grad(x[i]) : libm(x[i]);
        break;
      case GeluImpl::Portable:
        if (backward) for (int64_t i = 0; i < n; ++i) y[i] = fn::gelu_grad(x[i]);
        else for (int64_t i = 0; i < n; ++i) y[i] = fn::gelu(x[i]);
        break;
      case GeluImpl::Vectorized:
        if (backward) cpu::simd([&]() MIXPREC_SIMD_BODY { for (int64_t i = 0; i < n; ++i) y[i] = fn::gelu_grad(x[i]); });
        else cpu::simd([&]() MIXPREC_SIMD_BODY { for (int64_t i = 0; i < n; ++i) y[i] = fn::gelu(x[i]); });
        break;
    }
    benchmark::DoNotOptimize(y);
    benchmark::ClobberMemory();
  }
  set_traffic(st, 8.0 * static_cast<double>(n));
}

// GradScaler::unscale_ over 64 gradients of n/64 elements. Two scalers (scale 0.5 and 2) take
// turns so the gradients stay exactly bounded. Float32 gradients: read + write in place, 8 B
// per element; 16-bit: read 2, write the float32 master gradient 4 and the rounded value 2.
void BM_GradScalerUnscale(benchmark::State& st, DType dt) {
  const int64_t n = elements(st), tensors = 64, per = n / tensors;
  std::vector<Tensor> params;
  for (int64_t i = 0; i < tensors; ++i) {
    Tensor p = randn({per}).to(dt);
    p.requires_grad_();
    p.set_grad(randn({per}).to(dt));
    params.push_back(p);
  }
  optim::SGD opt(params, 0.1);
  const int64_t never = std::numeric_limits<int32_t>::max();  // no growth during the run
  amp::GradScaler up(0.5, 2.0, 0.5, never), down(2.0, 2.0, 0.5, never);
  up.scale(ones({1}));  // a scaler unscales only after it has scaled something, as in training
  down.scale(ones({1}));
  bool found_inf = false;
  for (auto _ : st) {
    up.unscale_(opt);
    found_inf |= up.found_inf(opt);
    up.update();
    down.unscale_(opt);
    found_inf |= down.found_inf(opt);
    down.update();
  }
  if (found_inf) st.SkipWithError("a gradient became inf/NaN: the numbers would not be the unscale pass's");
  set_traffic(st, 2.0 * 8.0 * static_cast<double>(per * tensors));
}

void sizes(benchmark::internal::Benchmark* b) { b->Arg(256)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime(); }

}  // namespace mixprec_bench_elementwise

namespace {
namespace be = mixprec_bench_elementwise;
// BENCHMARK_CAPTURE pastes the function name into an identifier: it must be unqualified.
using be::BM_Cast;
using be::BM_Elementwise;
using be::BM_GeluFormula;
using be::BM_GradScalerUnscale;
using be::BM_Memcpy;
BENCHMARK(BM_Memcpy)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_Cast, f32_to_bf16, DType::Float32, DType::BFloat16)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_Cast, bf16_to_f32, DType::BFloat16, DType::Float32)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_Cast, f32_to_f16, DType::Float32, DType::Float16)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_Cast, f16_to_f32, DType::Float16, DType::Float32)->Apply(be::sizes);
#define MIXPREC_ELEMENTWISE(op, otag)                                                                  \
  BENCHMARK_CAPTURE(BM_Elementwise, otag##_f32, be::Op::op, DType::Float32)->Apply(be::sizes); \
  BENCHMARK_CAPTURE(BM_Elementwise, otag##_bf16, be::Op::op, DType::BFloat16)->Apply(be::sizes)
MIXPREC_ELEMENTWISE(Add, add);
MIXPREC_ELEMENTWISE(Mul, mul);
MIXPREC_ELEMENTWISE(Relu, relu);
MIXPREC_ELEMENTWISE(Gelu, gelu);
MIXPREC_ELEMENTWISE(Softmax, softmax);
MIXPREC_ELEMENTWISE(LayerNorm, layer_norm);
BENCHMARK_CAPTURE(BM_GeluFormula, fwd_libm, be::GeluImpl::Libm, false)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_GeluFormula, fwd_portable, be::GeluImpl::Portable, false)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_GeluFormula, fwd_vectorized, be::GeluImpl::Vectorized, false)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_GeluFormula, bwd_libm, be::GeluImpl::Libm, true)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_GeluFormula, bwd_portable, be::GeluImpl::Portable, true)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_GeluFormula, bwd_vectorized, be::GeluImpl::Vectorized, true)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_GradScalerUnscale, f32_grads, DType::Float32)->Apply(be::sizes);
BENCHMARK_CAPTURE(BM_GradScalerUnscale, f16_grads, DType::Float16)->Apply(be::sizes);
}  // namespace
