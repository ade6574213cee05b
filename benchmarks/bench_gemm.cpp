// GEMM rates (GFLOP/s) for the two targets of issue 7 -- float32 at 2048^3 against oneDNN's
// sgemm, and 16-bit inputs against float32 -- at square sizes and at GPT-mini's shapes.
//   BM_Gemm*/op_*      matmul on tensors: dispatch, allocation, kernel, 16-bit rounding of C
//   BM_Gemm*/eigen     Eigen called directly as this build compiles it (no -march: SSE2)
//   BM_Gemm*/onednn    dnnl_sgemm (float32), or oneDNN's bf16 matmul primitive (vdpbf16ps)
//   BM_Gemm*/k_*       the packed AVX-512 kernels alone: float32, bfloat16 converted to float32
//                      while packing, and bfloat16 with vdpbf16ps
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cpu/gemm.hpp>  // the kernels it times directly (also in the compiled mode)
#include <mixprec/backends/cpu/gemm_avx512.hpp>

#if defined(MIXPREC_BENCH_HAVE_DNNL)
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl.hpp>
#endif

using namespace mixprec;

namespace mixprec_bench_gemm {

enum class Impl { OpF32, OpBF16, OpF16, Eigen, OneDnnSgemm, OneDnnBF16, KernelF32, KernelBF16ViaF32, KernelBF16Dot };

// C[M, N] = A[M, K] B[K, N], `batch` times (attention: one product per head and sample).
struct GemmShape {
  int64_t M, N, K, batch = 1;
};

void set_counters(benchmark::State& st, const GemmShape& s, int64_t in_elem_bytes) {
  const double flops = 2.0 * s.M * s.N * s.K * s.batch;
  st.counters["GFLOP/s"] = benchmark::Counter(flops * st.iterations(), benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  st.counters["bytes"] = static_cast<double>(s.batch * ((s.M * s.K + s.K * s.N) * in_elem_bytes + s.M * s.N * 4));
}

bool skip_unavailable(benchmark::State& st, Impl impl) {
  const bool avx512 = cpu::avx512::available();
  const char* why = nullptr;
  if ((impl == Impl::KernelF32 || impl == Impl::KernelBF16ViaF32) && !avx512) why = "no AVX-512 on this CPU";
  if (impl == Impl::KernelBF16Dot && !cpu::avx512::bf16_dot_available()) why = "no avx512_bf16 on this CPU";
#if !defined(MIXPREC_BENCH_HAVE_DNNL)
  if (impl == Impl::OneDnnSgemm || impl == Impl::OneDnnBF16) why = "built without oneDNN (libdnnl-dev)";
#endif
  if (why) st.SkipWithError(why);
  return why != nullptr;
}

void run(benchmark::State& st, Impl impl, GemmShape s) {
  if (skip_unavailable(st, impl)) return;
  const int64_t M = s.M, N = s.N, K = s.K;
  int64_t elem = 4;
  switch (impl) {
    case Impl::OpF32:
    case Impl::OpBF16:
    case Impl::OpF16: {
      const DType dt = impl == Impl::OpF32 ? DType::Float32 : impl == Impl::OpBF16 ? DType::BFloat16 : DType::Float16;
      elem = static_cast<int64_t>(itemsize(dt));
      const Shape sa = s.batch > 1 ? Shape{s.batch, M, K} : Shape{M, K}, sb = s.batch > 1 ? Shape{s.batch, K, N} : Shape{K, N};
      const Tensor a = randn(sa).to(dt), b = randn(sb).to(dt);
      for (auto _ : st) {
        Tensor c = matmul(a, b);
        benchmark::DoNotOptimize(c.data_ptr());
      }
      break;
    }
    case Impl::Eigen: {
      using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      const RM a = RM::Random(M, K), b = RM::Random(K, N);
      RM c(M, N);
      for (auto _ : st) {
        for (int64_t i = 0; i < s.batch; ++i) c.noalias() = a * b;
        benchmark::DoNotOptimize(c.data());
      }
      break;
    }
    case Impl::KernelF32:
    case Impl::KernelBF16ViaF32:
    case Impl::KernelBF16Dot: {
      const Tensor a = randn({M, K}), b = randn({K, N});
      const Tensor a16 = a.to(DType::BFloat16), b16 = b.to(DType::BFloat16);
      std::vector<float> c(static_cast<std::size_t>(M * N));
      if (impl != Impl::KernelF32) elem = 2;
      for (auto _ : st) {
        for (int64_t i = 0; i < s.batch; ++i) {
          if (impl == Impl::KernelF32) cpu::avx512::gemm<float>({a.data<float>(), K, 1}, {b.data<float>(), N, 1}, c.data(), N, M, N, K, false);
          else if (impl == Impl::KernelBF16ViaF32)
            cpu::avx512::gemm<bfloat16>({a16.data<bfloat16>(), K, 1}, {b16.data<bfloat16>(), N, 1}, c.data(), N, M, N, K, false);
          else cpu::avx512::gemm_dpbf16({a16.data<bfloat16>(), K, 1}, {b16.data<bfloat16>(), N, 1}, c.data(), N, M, N, K, false);
        }
        benchmark::DoNotOptimize(c.data());
      }
      break;
    }
    case Impl::OneDnnSgemm: {
#if defined(MIXPREC_BENCH_HAVE_DNNL)
      const Tensor a = randn({M, K}), b = randn({K, N});
      std::vector<float> c(static_cast<std::size_t>(M * N));
      for (auto _ : st) {
        for (int64_t i = 0; i < s.batch; ++i)
          dnnl_sgemm('N', 'N', M, N, K, 1.0f, a.data<float>(), K, b.data<float>(), N, 0.0f, c.data(), N);
        benchmark::DoNotOptimize(c.data());
      }
#endif
      break;
    }
    case Impl::OneDnnBF16: {
#if defined(MIXPREC_BENCH_HAVE_DNNL)
      using dt = dnnl::memory::data_type;
      using tag = dnnl::memory::format_tag;
      dnnl::engine eng(dnnl::engine::kind::cpu, 0);
      dnnl::stream strm(eng);
      const dnnl::memory::desc a_md({M, K}, dt::bf16, tag::ab), b_md({K, N}, dt::bf16, tag::ab), c_md({M, N}, dt::f32, tag::ab);
#if DNNL_VERSION_MAJOR >= 3
      const dnnl::matmul::primitive_desc pd(eng, a_md, b_md, c_md);
#else
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), eng);
#endif
      const dnnl::matmul mm(pd);
      const Tensor a = randn({M, K}).to(DType::BFloat16), b = randn({K, N}).to(DType::BFloat16);
      std::vector<float> c(static_cast<std::size_t>(M * N));
      dnnl::memory am(a_md, eng, a.data_ptr()), bm(b_md, eng, b.data_ptr()),
          cm(c_md, eng, c.data());
      elem = 2;
      for (auto _ : st) {
        for (int64_t i = 0; i < s.batch; ++i) mm.execute(strm, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
        strm.wait();
        benchmark::DoNotOptimize(c.data());
      }
#endif
      break;
    }
  }
  set_counters(st, s, elem);
}

void BM_GemmSquare(benchmark::State& st, Impl impl) {
  const int64_t n = st.range(0);
  run(st, impl, {n, n, n});
}

// GPT-mini (d_model 256, 4 heads of 64, MLP 1024, vocab 256) at batch 16 x sequence 128.
constexpr int64_t kTokens = 16 * 128;
const GemmShape kQkv{kTokens, 768, 256}, kProj{kTokens, 256, 256}, kMlpUp{kTokens, 1024, 256}, kMlpDown{kTokens, 256, 1024},
    kScores{128, 128, 64, 16 * 4}, kContext{128, 64, 128, 16 * 4};

void square_sizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {256, 512, 1024, 2048, 4096}) b->Arg(n);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
// The SSE2 Eigen build needs ~10 s for one 4096^3 product on a loaded VM: stop at 2048.
void eigen_sizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {256, 512, 1024, 2048}) b->Arg(n);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace mixprec_bench_gemm

namespace {
using mixprec_bench_gemm::Impl;
using mixprec_bench_gemm::square_sizes;
using mixprec_bench_gemm::BM_GemmSquare;
using mixprec_bench_gemm::run;

#define MIXPREC_GEMM_SQUARE(tag, impl) BENCHMARK_CAPTURE(BM_GemmSquare, tag, impl)->Apply(square_sizes)
MIXPREC_GEMM_SQUARE(op_f32, Impl::OpF32);
MIXPREC_GEMM_SQUARE(op_bf16, Impl::OpBF16);
MIXPREC_GEMM_SQUARE(op_f16, Impl::OpF16);
BENCHMARK_CAPTURE(BM_GemmSquare, eigen, Impl::Eigen)->Apply(mixprec_bench_gemm::eigen_sizes);
MIXPREC_GEMM_SQUARE(onednn_f32, Impl::OneDnnSgemm);
MIXPREC_GEMM_SQUARE(onednn_bf16, Impl::OneDnnBF16);
MIXPREC_GEMM_SQUARE(k_f32, Impl::KernelF32);
MIXPREC_GEMM_SQUARE(k_bf16_via_f32, Impl::KernelBF16ViaF32);
MIXPREC_GEMM_SQUARE(k_bf16_dot, Impl::KernelBF16Dot);

// Named shapes: BM_GemmGpt/<shape>/<impl>.
#define MIXPREC_GEMM_GPT(shape, sname, tag, impl)                                                              \
  BENCHMARK_CAPTURE(BM_GemmGpt_##sname, tag, impl, mixprec_bench_gemm::shape)->Unit(benchmark::kMillisecond)->UseRealTime()
#define MIXPREC_GEMM_GPT_ALL(shape, sname)                                                                 \
  void BM_GemmGpt_##sname(benchmark::State& st, Impl impl, mixprec_bench_gemm::GemmShape s) { run(st, impl, s); } \
  MIXPREC_GEMM_GPT(shape, sname, op_f32, Impl::OpF32);                                                     \
  MIXPREC_GEMM_GPT(shape, sname, op_bf16, Impl::OpBF16);                                                   \
  MIXPREC_GEMM_GPT(shape, sname, op_f16, Impl::OpF16);                                                     \
  MIXPREC_GEMM_GPT(shape, sname, onednn_f32, Impl::OneDnnSgemm);                                           \
  MIXPREC_GEMM_GPT(shape, sname, onednn_bf16, Impl::OneDnnBF16)
MIXPREC_GEMM_GPT_ALL(kQkv, qkv_2048x768x256);
MIXPREC_GEMM_GPT_ALL(kProj, proj_2048x256x256);
MIXPREC_GEMM_GPT_ALL(kMlpUp, mlp_up_2048x1024x256);
MIXPREC_GEMM_GPT_ALL(kMlpDown, mlp_down_2048x256x1024);
MIXPREC_GEMM_GPT_ALL(kScores, scores_64x128x128x64);
MIXPREC_GEMM_GPT_ALL(kContext, context_64x128x64x128);
}  // namespace
