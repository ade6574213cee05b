// conv2d forward, input-gradient and weight-gradient rates (GFLOP/s, 2*N*O*OH*OW*C*KH*KW each)
// at the reference workloads' layer shapes: ResNet-20 (batch 128, 1x28x28 input, 16/32/64
// channels) and ResNet-50 (torchvision, 224x224 input, batch 8 to keep CPU runs short).
// Name: BM_Conv2d/<pass>/<dtype>/<N>/<C>/<H>/<O>/<k>/<stride>.
#include <benchmark/benchmark.h>

#include <mixprec/mixprec.hpp>

using namespace mixprec;

namespace mixprec_bench_conv {

enum class Pass { Forward, BackwardInput, BackwardWeight };

detail::ConvGeom geometry(benchmark::State& st) {
  detail::ConvGeom g;
  g.N = st.range(0), g.C = st.range(1), g.H = g.W = st.range(2), g.O = st.range(3);
  g.KH = g.KW = st.range(4);
  g.SH = g.SW = st.range(5);
  g.PH = g.PW = g.KH / 2;
  g.OH = (g.H + 2 * g.PH - g.KH) / g.SH + 1;
  g.OW = (g.W + 2 * g.PW - g.KW) / g.SW + 1;
  return g;
}

void BM_Conv2d(benchmark::State& st, Pass pass, DType dt) {
  const detail::ConvGeom g = geometry(st);
  const Tensor x = randn({g.N, g.C, g.H, g.W}).to(dt), w = mul(randn({g.O, g.C, g.KH, g.KW}), 0.1).to(dt);
  const Tensor gy = randn({g.N, g.O, g.OH, g.OW}).to(dt);
  for (auto _ : st) {
    Tensor r;
    switch (pass) {
      case Pass::Forward: r = conv2d(x, w, Tensor(), {g.SH, g.SW}, {g.PH, g.PW}); break;
      case Pass::BackwardInput: r = detail::conv_backward_input(g, gy, w); break;
      case Pass::BackwardWeight: r = detail::conv_backward_weight(g, x, gy, dt); break;
    }
    benchmark::DoNotOptimize(r.data_ptr());
  }
  const double flops = 2.0 * g.N * g.O * g.OH * g.OW * g.C * g.KH * g.KW;
  st.counters["GFLOP/s"] = benchmark::Counter(flops * st.iterations(), benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  st.counters["bytes"] = static_cast<double>((x.numel() + w.numel() + gy.numel()) * itemsize(dt));
}

// {N, C, H(=W), O, kernel, stride}
void resnet20_layers(benchmark::internal::Benchmark* b) {
  for (auto a : std::vector<std::vector<int64_t>>{{128, 1, 28, 16, 3, 1},    // stem
                                                  {128, 16, 28, 16, 3, 1},   // stage 1
                                                  {128, 16, 28, 32, 3, 2},   // stage 2 entry
                                                  {128, 32, 14, 32, 3, 1},   // stage 2
                                                  {128, 32, 14, 64, 3, 2},   // stage 3 entry
                                                  {128, 64, 7, 64, 3, 1}})   // stage 3
    b->Args(a);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

void resnet50_layers(benchmark::internal::Benchmark* b) {
  for (auto a : std::vector<std::vector<int64_t>>{{8, 3, 224, 64, 7, 2},      // stem
                                                  {8, 64, 56, 64, 3, 1},      // layer1 3x3
                                                  {8, 64, 56, 256, 1, 1},     // layer1 1x1 expand
                                                  {8, 128, 28, 128, 3, 1},    // layer2 3x3
                                                  {8, 256, 14, 256, 3, 1},    // layer3 3x3
                                                  {8, 1024, 14, 256, 1, 1},   // layer3 1x1 reduce
                                                  {8, 512, 7, 512, 3, 1}})    // layer4 3x3
    b->Args(a);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace mixprec_bench_conv

namespace {
// BENCHMARK_CAPTURE pastes the function name into an identifier: it must be unqualified.
using mixprec_bench_conv::BM_Conv2d;
using mixprec_bench_conv::Pass;
#define MIXPREC_CONV(net, pass, ptag, dt, dtag) \
  BENCHMARK_CAPTURE(BM_Conv2d, net##_##ptag##_##dtag, Pass::pass, DType::dt)->Apply(mixprec_bench_conv::net##_layers)
#define MIXPREC_CONV_NET(net)                                     \
  MIXPREC_CONV(net, Forward, fwd, Float32, f32);                  \
  MIXPREC_CONV(net, Forward, fwd, BFloat16, bf16);                \
  MIXPREC_CONV(net, BackwardInput, bwd_input, Float32, f32);      \
  MIXPREC_CONV(net, BackwardInput, bwd_input, BFloat16, bf16);    \
  MIXPREC_CONV(net, BackwardWeight, bwd_weight, Float32, f32);    \
  MIXPREC_CONV(net, BackwardWeight, bwd_weight, BFloat16, bf16)
MIXPREC_CONV_NET(resnet20);
MIXPREC_CONV_NET(resnet50);
}  // namespace
