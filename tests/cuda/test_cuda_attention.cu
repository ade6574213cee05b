// The fused CUDA attention (backends/cuda/attention.cuh) against the CPU op: outputs and q/k/v
// gradients of float32 CPU tensors with autograd on the same (rounded) inputs and the same
// dropout seed, over dtypes, causal or not, dropout, odd L != S, head dims 32/64/128, strided and
// broadcast inputs and the GPT shapes; plus the fused-vs-composed time at GPT-12 size (printed).
// Every test needs a GPU and skips with the reason where there is none.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include <mixprec/cuda.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
namespace mc = mixprec::gpu;
using mixprec::testing::rel_error;

namespace cuda_attention_test {

#define MIXPREC_REQUIRE_GPU_FOR_ATTENTION() \
  if (!cuda_is_available()) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason()

double tol(DType d) { return d == DType::Float32 ? 1e-5 : mixprec::testing::low_tolerance(d); }

struct Result {
  Tensor out, dq, dk, dv;  // float32, on the CPU
};

// The CPU op in float32 with autograd on q, k, v (already rounded to the dtype under test).
Result on_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, double p, bool causal, uint64_t seed) {
  const Tensor qf = q.to(DType::Float32).detach().requires_grad_(), kf = k.to(DType::Float32).detach().requires_grad_(),
               vf = v.to(DType::Float32).detach().requires_grad_();
  manual_seed(seed);
  const Tensor o = scaled_dot_product_attention(qf, kf, vf, Tensor(), p, causal);
  o.backward(dout.to(DType::Float32));
  return {o.detach(), qf.grad(), kf.grad(), vf.grad()};
}

// The same call on the GPU; `place` puts each input on the device (any layout).
template <class Place>
Result on_gpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, double p, bool causal, uint64_t seed, Place place) {
  const Tensor qd = place(q).requires_grad_(), kd = place(k).requires_grad_(), vd = place(v).requires_grad_();
  EXPECT_TRUE(mixprec::detail::sdpa_fused_supported(qd, kd, vd, Tensor())) << ::testing::PrintToString(q.sizes());
  manual_seed(seed);
  const Tensor o = scaled_dot_product_attention(qd, kd, vd, Tensor(), p, causal);
  EXPECT_EQ(o.dtype(), q.dtype());
  o.backward(dout.to(Device::CUDA));
  auto down = [](const Tensor& t) { return t.cpu().to(DType::Float32); };
  return {down(o), down(qd.grad()), down(kd.grad()), down(vd.grad())};
}

// ||a - ref|| / max(||ref||, floor).
double error_against(const Tensor& a, const Tensor& ref, double floor) {
  const Tensor da = a.to(DType::Float64).contiguous(), dr = ref.to(DType::Float64).contiguous();
  double num = 0, den = 0;
  for (int64_t i = 0; i < dr.numel(); ++i) {
    const double x = da.data<double>()[i], r = dr.data<double>()[i];
    if (std::isnan(x) || std::isnan(r)) return INFINITY;
    num += (x - r) * (x - r);
    den += r * r;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), floor);
}

// dq and dk are judged against at least dv's size: where a row sees one key (L = 1, causal) the
// softmax is constant, dq and dk are zero in exact arithmetic and both sides hold rounding noise
// (the GPU's D = rowsum(dO o O) reads O rounded to the output dtype, as FlashAttention's does).
void expect_close(const Result& g, const Result& c, DType d, const std::string& what) {
  const double scale = std::sqrt(mixprec::sum(mul(c.dv, c.dv)).item<double>());
  EXPECT_LT(rel_error(g.out, c.out), tol(d)) << what << " out";
  EXPECT_LT(error_against(g.dq, c.dq, scale), tol(d)) << what << " dq";
  EXPECT_LT(error_against(g.dk, c.dk, scale), tol(d)) << what << " dk";
  EXPECT_LT(rel_error(g.dv, c.dv), tol(d)) << what << " dv";
}

Tensor plain_upload(const Tensor& t) { return t.to(Device::CUDA); }

}  // namespace cuda_attention_test

using namespace cuda_attention_test;

TEST(CudaAttention, FusedMatchesCpuOverDtypesCausalDropoutAndTails) {
  MIXPREC_REQUIRE_GPU_FOR_ATTENTION();
  struct Shape4 {
    int64_t B, H, L, S, E;
  };
  Generator g(170);
  for (const Shape4& s : {Shape4{2, 3, 37, 61, 64}, Shape4{2, 2, 61, 37, 32}, Shape4{1, 2, 45, 45, 128}, Shape4{1, 1, 1, 70, 64}})
    for (DType d : {DType::Float32, DType::Float16, DType::BFloat16})
      for (bool causal : {false, true})
        for (double p : {0.0, 0.1}) {
          const std::string what = ::testing::PrintToString(std::vector<int64_t>{s.B, s.H, s.L, s.S, s.E}) + " " + std::string(name(d)) +
                                   (causal ? " causal" : "") + " p " + std::to_string(p);
          SCOPED_TRACE(what);
          const Tensor q = randn({s.B, s.H, s.L, s.E}, DType::Float32, g).to(d), k = randn({s.B, s.H, s.S, s.E}, DType::Float32, g).to(d),
                       v = randn({s.B, s.H, s.S, s.E}, DType::Float32, g).to(d), dout = randn({s.B, s.H, s.L, s.E}, DType::Float32, g).to(d);
          expect_close(on_gpu(q, k, v, dout, p, causal, 9, plain_upload), on_cpu(q, k, v, dout, p, causal, 9), d, what);
        }
}

// GPT's q/k/v are head views of one [B, L, 3 d] projection (strides [L 3d, E, 3d, 1]): read in
// place. Broadcast batch dims (k/v shared across a dim) get their gradients summed back.
TEST(CudaAttention, StridedAndBroadcastInputsMatchCpu) {
  MIXPREC_REQUIRE_GPU_FOR_ATTENTION();
  Generator g(171);
  const int64_t B = 2, L = 40, H = 3, E = 64;
  for (DType d : {DType::Float32, DType::BFloat16}) {
    SCOPED_TRACE(name(d));
    const Tensor qkv = randn({B, L, 3 * H * E}, DType::Float32, g).to(d);
    const Tensor dout = randn({B, H, L, E}, DType::Float32, g).to(d);
    // The same views on either side: a device copy of the projection, split as nn::MultiheadAttention does.
    auto heads = [&](const Tensor& x, int64_t part) { return x.narrow(2, part * H * E, H * E).reshape({B, L, H, E}).transpose(1, 2); };
    const Tensor qkv_d = qkv.to(Device::CUDA);
    int64_t part = 0;
    auto from_projection = [&](const Tensor&) { return heads(qkv_d, part++).detach(); };
    const Result gr = on_gpu(heads(qkv, 0), heads(qkv, 1), heads(qkv, 2), dout, 0.1, true, 5, from_projection);
    expect_close(gr, on_cpu(heads(qkv, 0), heads(qkv, 1), heads(qkv, 2), dout, 0.1, true, 5), d, "GPT head views");

    const Tensor q = randn({B, H, L, E}, DType::Float32, g).to(d), k = randn({1, H, 33, E}, DType::Float32, g).to(d),
                 v = randn({1, H, 33, E}, DType::Float32, g).to(d);
    const Result gb = on_gpu(q, k, v, dout, 0.0, false, 6, plain_upload);
    EXPECT_EQ(gb.dk.sizes(), k.sizes());
    expect_close(gb, on_cpu(q, k, v, dout, 0.0, false, 6), d, "k/v broadcast over the batch");
  }
}

// Edge sizes through the op: no keys (every row attends to nothing: 0 and no gradient), no
// queries; and the kernel's logsumexp against the CPU's.
TEST(CudaAttention, EmptyKeysQueriesAndLogsumexp) {
  MIXPREC_REQUIRE_GPU_FOR_ATTENTION();
  Generator g(172);
  const Tensor q = randn({2, 3, 5, 16}, DType::Float32, g), none = randn({2, 3, 0, 16}, DType::Float32, g);
  const Result r = on_gpu(q, none, none, randn({2, 3, 5, 16}, DType::Float32, g), 0.0, false, 1, plain_upload);
  EXPECT_EQ(rel_error(r.out, zeros({2, 3, 5, 16})), 0.0);
  EXPECT_EQ(rel_error(r.dq, zeros({2, 3, 5, 16})), 0.0);
  const Result e = on_gpu(none, q, q, zeros({2, 3, 0, 16}), 0.0, true, 1, plain_upload);
  EXPECT_EQ(e.out.numel(), 0);
  EXPECT_EQ(rel_error(e.dk, zeros({2, 3, 5, 16})), 0.0);

  const Tensor k = randn({2, 3, 9, 16}, DType::Float32, g), v = randn({2, 3, 9, 16}, DType::Float32, g);
  const auto [out, lse] = mc::sdpa_forward(q.to(Device::CUDA), k.to(Device::CUDA), v.to(Device::CUDA), true, 0.25, 0.0, 0);
  const auto [cout, clse] = device_kernels(Device::CPU)->sdpa_forward(q, k, v, true, 0.25, 0.0, 0);
  EXPECT_LT(rel_error(out.cpu(), cout), 1e-5);
  EXPECT_EQ(lse.sizes(), (Shape{2, 3, 5}));
  EXPECT_LT(rel_error(lse.cpu(), clse), 1e-5);
}

// The model shapes: GPT-mini [32, 4, 128, 64] and GPT-12 [32, 12, 256, 64], bfloat16, causal;
// then forward + backward at GPT-12 size timed fused and composed (printed, not asserted).
TEST(CudaAttention, GptShapesMatchCpuAndTimeFusedAgainstComposed) {
  MIXPREC_REQUIRE_GPU_FOR_ATTENTION();
  Generator g(173);
  const DType d = DType::BFloat16;
  using Case = std::tuple<int64_t, int64_t, int64_t, double>;  // B, H, T, dropout
  for (const auto& [B, H, T, p] : {Case{32, 4, 128, 0.1}, Case{32, 12, 256, 0.0}}) {
    SCOPED_TRACE(::testing::Message() << "[" << B << ", " << H << ", " << T << ", 64] p " << p);
    const Tensor q = randn({B, H, T, 64}, DType::Float32, g).to(d), k = randn({B, H, T, 64}, DType::Float32, g).to(d),
                 v = randn({B, H, T, 64}, DType::Float32, g).to(d), dout = randn({B, H, T, 64}, DType::Float32, g).to(d);
    expect_close(on_gpu(q, k, v, dout, p, true, 3, plain_upload), on_cpu(q, k, v, dout, p, true, 3), d, "GPT shape");
  }

  const Tensor qd = randn({32, 12, 256, 64}, DType::Float32, g).to(d).to(Device::CUDA),
               kd = randn({32, 12, 256, 64}, DType::Float32, g).to(d).to(Device::CUDA),
               vd = randn({32, 12, 256, 64}, DType::Float32, g).to(d).to(Device::CUDA),
               gd = randn({32, 12, 256, 64}, DType::Float32, g).to(d).to(Device::CUDA);
  auto time_ms = [&](bool backward) {
    auto step = [&] {
      const Tensor q = qd.detach().requires_grad_(), k = kd.detach().requires_grad_(), v = vd.detach().requires_grad_();
      const Tensor o = scaled_dot_product_attention(q, k, v, Tensor(), 0.0, true);
      if (backward) o.backward(gd);
    };
    for (int i = 0; i < 3; ++i) step();
    return mc::time_ms(20, step);
  };
  const double fused_fwd = time_ms(false), fused = time_ms(true);
  // The composed path: the same table without the fused entries.
  DeviceKernels composed = *device_kernels(Device::CUDA);
  composed.sdpa_forward = nullptr;
  composed.sdpa_backward = nullptr;
  const DeviceKernels* prev = set_device_kernels(Device::CUDA, &composed);
  const double comp_fwd = time_ms(false), comp = time_ms(true);
  set_device_kernels(Device::CUDA, prev);
  std::printf("[ timing ] attention [32, 12, 256, 64] bf16 causal: fused forward %.3f ms, forward+backward %.3f ms; "
              "composed forward %.3f ms, forward+backward %.3f ms\n",
              fused_fwd, fused, comp_fwd, comp);
  RecordProperty("fused_fwd_bwd_ms", std::to_string(fused));
  RecordProperty("composed_fwd_bwd_ms", std::to_string(comp));
}
