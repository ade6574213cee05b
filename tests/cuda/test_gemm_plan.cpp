// The cuBLASLt call plan, executed on the CPU: a column-major reference GEMM runs exactly the
// call the plan describes (ops, m/n/k, leading dimensions, batch strides, epilogue) on the
// tensors' own memory, and must reproduce the row-major CPU matmul/linear.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cuda/gemm_plan.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using namespace mixprec::gpu;

namespace {

float load(uintptr_t base, GemmType t, int64_t i) {
  switch (t) {
    case GemmType::F32: return reinterpret_cast<const float*>(base)[i];
    case GemmType::F16: return float(reinterpret_cast<const half*>(base)[i]);
    case GemmType::BF16: return float(reinterpret_cast<const bfloat16*>(base)[i]);
  }
  return 0.0f;
}
void store(uintptr_t base, GemmType t, int64_t i, float v) {
  switch (t) {
    case GemmType::F32: reinterpret_cast<float*>(base)[i] = v; break;
    case GemmType::F16: reinterpret_cast<half*>(base)[i] = half(v); break;
    case GemmType::BF16: reinterpret_cast<bfloat16*>(base)[i] = bfloat16(v); break;
  }
}

// What cublasLtMatmul computes for the plan: D = epilogue(op(A) op(B) + bias), column-major,
// float32 accumulation (double here, as the more precise reference).
void run_plan(const GemmPlan& p) {
  std::vector<double> bias_grad(p.epilogue == GemmEpilogue::DGeluTanhBgrad ? static_cast<std::size_t>(p.m) : 0, 0.0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t j = 0; j < p.n; ++j)
      for (int64_t i = 0; i < p.m; ++i) {
        double acc = 0;
        for (int64_t l = 0; l < p.k; ++l) {
          const int64_t ia = b * p.stride_a + (p.transa == GemmOp::N ? i + l * p.lda : l + i * p.lda);
          const int64_t ib = b * p.stride_b + (p.transb == GemmOp::N ? l + j * p.ldb : j + l * p.ldb);
          acc += double(load(p.a_address, p.ab_type, ia)) * double(load(p.b_address, p.ab_type, ib));
        }
        if (p.bias_length && p.epilogue != GemmEpilogue::DGeluTanhBgrad) acc += load(p.bias_address, p.c_type, i);
        if (p.epilogue == GemmEpilogue::BiasGeluTanhAux) store(p.aux_address, p.c_type, i + j * p.aux_ld, static_cast<float>(acc));
        if (p.epilogue == GemmEpilogue::GeluTanh || p.epilogue == GemmEpilogue::BiasGeluTanh || p.epilogue == GemmEpilogue::BiasGeluTanhAux)
          acc = 0.5 * acc * (1 + std::tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)));
        if (p.epilogue == GemmEpilogue::DGeluTanhBgrad) {  // times gelu'(aux); the bias gradient sums the result
          const double u = load(p.aux_address, p.c_type, i + j * p.aux_ld), c = 0.7978845608028654;
          const double t = std::tanh(c * (u + 0.044715 * u * u * u));
          acc *= 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * c * (1 + 3 * 0.044715 * u * u);
          bias_grad[static_cast<std::size_t>(i)] += acc;
        }
        store(p.c_address, p.c_type, b * p.stride_c + i + j * p.ldc, static_cast<float>(acc));
      }
  for (std::size_t i = 0; i < bias_grad.size(); ++i) store(p.bias_address, p.c_type, static_cast<int64_t>(i), static_cast<float>(bias_grad[i]));
}

Shape out_shape(const Tensor& a, const Tensor& b) {
  Shape batch = broadcast_shapes(Shape(a.sizes().begin(), a.sizes().end() - 2), Shape(b.sizes().begin(), b.sizes().end() - 2), "test");
  batch.push_back(a.size(-2));
  batch.push_back(b.size(-1));
  return batch;
}
Tensor expand_batch(const Tensor& t, const Shape& out, int64_t r, int64_t c) {
  Shape s(out.begin(), out.end() - 2);
  s.push_back(r);
  s.push_back(c);
  return t.expand(s);
}

// Plans a @ b (numpy broadcasting of batch dims), runs the plan, returns the output.
Tensor planned_matmul(const Tensor& a, const Tensor& b, DType out_dtype, GemmPlan* plan = nullptr) {
  const Shape os = out_shape(a, b);
  Tensor out = zeros(os, out_dtype);
  const GemmPlan p = plan_gemm(gemm_request(expand_batch(a, os, a.size(-2), a.size(-1)), expand_batch(b, os, b.size(-2), b.size(-1)), out));
  run_plan(p);
  if (plan) *plan = p;
  return out;
}

void expect_matches_cpu(const Tensor& a, const Tensor& b, double tol = 1e-6) {
  const Tensor ref = matmul(a.to(DType::Float32), b.to(DType::Float32));
  const Tensor got = planned_matmul(a, b, DType::Float32);
  EXPECT_EQ(got.sizes(), ref.sizes());
  EXPECT_LT(mixprec::testing::rel_error(got, ref), tol) << "a " << ::testing::PrintToString(a.sizes()) << " strides " << ::testing::PrintToString(a.strides()) << ", b "
      << ::testing::PrintToString(b.sizes()) << " strides " << ::testing::PrintToString(b.strides());
}

}  // namespace

TEST(GemmPlan, RowMajorBecomesSwappedColumnMajorCall) {
  const Tensor a = randn({5, 3}), b = randn({3, 7});
  GemmPlan p;
  planned_matmul(a, b, DType::Float32, &p);
  EXPECT_EQ(p.transa, GemmOp::N);
  EXPECT_EQ(p.transb, GemmOp::N);
  EXPECT_EQ(p.m, 7);  // N
  EXPECT_EQ(p.n, 5);  // M
  EXPECT_EQ(p.k, 3);
  EXPECT_EQ(p.lda, 7);
  EXPECT_EQ(p.ldb, 3);
  EXPECT_EQ(p.ldc, 7);
  EXPECT_EQ(p.a_address, reinterpret_cast<uintptr_t>(b.data_ptr()));  // cuBLAS's A is our b
  EXPECT_EQ(p.b_address, reinterpret_cast<uintptr_t>(a.data_ptr()));
  EXPECT_EQ(p.compute, GemmCompute::F32);
}

TEST(GemmPlan, TransposedViewsBecomeOpTWithoutCopies) {
  const Tensor at = randn({3, 5}), bt = randn({7, 3});
  GemmPlan p;
  planned_matmul(at.t(), bt.t(), DType::Float32, &p);
  EXPECT_EQ(p.transa, GemmOp::T);
  EXPECT_EQ(p.transb, GemmOp::T);
  EXPECT_EQ(p.lda, 3);
  EXPECT_EQ(p.ldb, 5);
  EXPECT_EQ(p.a_address, reinterpret_cast<uintptr_t>(bt.data_ptr()));
  for (const auto& [a, b] : std::vector<std::pair<Tensor, Tensor>>{{at.t(), bt.t()}, {at.t(), randn({3, 7})}, {randn({5, 3}), bt.t()}})
    expect_matches_cpu(a, b);
}

TEST(GemmPlan, OddSizesAndDegenerateDimsMatchCpu) {
  for (const auto& [M, N, K] : std::vector<std::array<int64_t, 3>>{{7, 13, 5}, {1, 9, 4}, {6, 1, 3}, {5, 4, 1}, {1, 1, 1}, {33, 17, 65}}) {
    expect_matches_cpu(randn({M, K}), randn({K, N}));
    expect_matches_cpu(randn({K, M}).t(), randn({N, K}).t());
  }
}

TEST(GemmPlan, SlicedOperandsUseTheirRowStride) {
  const Tensor big = randn({6, 20});
  const Tensor a = big.slice(1, 3, 3 + 9);  // [6, 9], row stride 20, offset 3
  GemmPlan p;
  planned_matmul(a, randn({9, 4}), DType::Float32, &p);
  EXPECT_EQ(p.ldb, 20);
  expect_matches_cpu(a, randn({9, 4}));
  expect_matches_cpu(randn({4, 6}), big.slice(1, 1, 12));
}

TEST(GemmPlan, StridedBatchesAndBroadcastMatchCpu) {
  GemmPlan p;
  const Tensor a = randn({3, 4, 5}), b = randn({3, 5, 6});
  planned_matmul(a, b, DType::Float32, &p);
  EXPECT_EQ(p.batch, 3);
  EXPECT_EQ(p.stride_a, 30);
  EXPECT_EQ(p.stride_b, 20);
  EXPECT_EQ(p.stride_c, 24);
  expect_matches_cpu(a, b);
  // A shared weight: stride 0 over the batch.
  planned_matmul(a, randn({5, 6}), DType::Float32, &p);
  EXPECT_EQ(p.stride_a, 0);
  expect_matches_cpu(a, randn({5, 6}));
  expect_matches_cpu(randn({4, 5}), b);
  // Four-dimensional batches collapse to one stride; transposed batched views (attention's K^T).
  expect_matches_cpu(randn({2, 3, 4, 5}), randn({2, 3, 5, 7}));
  expect_matches_cpu(randn({2, 3, 4, 5}), randn({2, 3, 7, 5}).transpose(-2, -1));
  expect_matches_cpu(randn({4, 5}), randn({2, 3, 5, 2}));
}

TEST(GemmPlan, BiasAndGeluEpiloguesMatchLinear) {
  const Tensor x = randn({6, 10}), w = randn({7, 10}), bias = randn({7});
  for (GemmEpilogue e : {GemmEpilogue::Bias, GemmEpilogue::GeluTanh, GemmEpilogue::BiasGeluTanh}) {
    Tensor out = zeros({6, 7});
    const bool has_bias = e != GemmEpilogue::GeluTanh;
    const GemmPlan p = plan_gemm(gemm_request(x, w.t(), out, has_bias ? bias : Tensor(), e));
    EXPECT_EQ(p.bias_length, has_bias ? 7 : 0);  // bias runs along cuBLAS's m = our N
    run_plan(p);
    Tensor ref = linear(x, w, has_bias ? bias : Tensor());
    if (e != GemmEpilogue::Bias) ref = gelu(ref, "tanh");
    EXPECT_LT(mixprec::testing::rel_error(out, ref), 1e-6);
  }
}

TEST(GemmPlan, SixteenBitInputsAccumulateIntoEachOutputType) {
  for (DType in : {DType::Float16, DType::BFloat16})
    for (DType out : {DType::Float32, in}) {
      const Tensor a = randn({9, 24}).to(in), b = randn({24, 16}).to(in).t().contiguous().t();
      GemmPlan p;
      const Tensor got = planned_matmul(a, b, out, &p);
      EXPECT_EQ(p.ab_type, gemm_type_of(in, "test"));
      EXPECT_EQ(p.c_type, gemm_type_of(out, "test"));
      EXPECT_EQ(p.compute, GemmCompute::F32);
      const Tensor ref = matmul(a.to(DType::Float32), b.to(DType::Float32));
      EXPECT_LT(mixprec::testing::rel_error(got, ref), out == DType::Float32 ? 1e-6 : mixprec::testing::low_tolerance(in)) << in << " -> " << out;
    }
}

TEST(GemmPlan, TensorCoreAlignmentRule) {
  auto plan16 = [](const Tensor& a, const Tensor& b) {
    Tensor out = empty({a.size(0), b.size(1)}, DType::Float16);
    return plan_gemm(gemm_request(a, b, out));
  };
  const Tensor a = randn({64, 72}).to(DType::Float16), b = randn({72, 32}).to(DType::Float16);
  GemmPlan p = plan16(a, b);
  EXPECT_TRUE(p.tensor_core_aligned);
  EXPECT_EQ(p.align_a, 16);
  // K = 70: leading dimension 140 bytes is only 4-byte aligned; still planned, slower kernels.
  p = plan16(randn({64, 70}).to(DType::Float16), randn({70, 32}).to(DType::Float16));
  EXPECT_FALSE(p.tensor_core_aligned);
  EXPECT_EQ(p.align_b, 4);
  // A view starting one element in: 2-byte aligned pointer.
  const Tensor big = randn({64, 73}).to(DType::Float16);
  p = plan16(big.slice(1, 1, 73), b);
  EXPECT_FALSE(p.tensor_core_aligned);
  EXPECT_EQ(p.align_b, 2);
  // float32: tensor cores only with tf32, in multiples of 4.
  Tensor o32 = empty({8, 12});
  p = plan_gemm(gemm_request(randn({8, 4}), randn({4, 12}), o32));
  EXPECT_FALSE(p.tensor_core_aligned);
  p = plan_gemm(gemm_request(randn({8, 4}), randn({4, 12}), o32, Tensor(), GemmEpilogue::None, true));
  EXPECT_EQ(p.compute, GemmCompute::F32FastTF32);
  EXPECT_TRUE(p.tensor_core_aligned);
}

TEST(GemmPlan, RefusesWhatCuBLASCannotTake) {
  Tensor out = empty({4, 4});
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  // No unit stride: the caller must copy.
  EXPECT_NE(message([&] { plan_gemm(gemm_request(randn({4, 8}).slice(1, 0, 8, 2), randn({4, 4}), out)); }).find("no unit stride"),
            std::string::npos);
  EXPECT_NE(message([&] { plan_gemm(gemm_request(randn({4, 4}), randn({4, 4}).to(DType::Float16), out)); }).find("share a dtype"),
            std::string::npos);
  EXPECT_NE(message([&] { plan_gemm(gemm_request(randn({4, 4}), randn({4, 4}), out, Tensor(), GemmEpilogue::Bias)); }).find("bias"),
            std::string::npos);
  // A bias with no bias epilogue is refused, not dropped.
  EXPECT_NE(message([&] { plan_gemm(gemm_request(randn({4, 4}), randn({4, 4}), out, randn({4}), GemmEpilogue::None)); })
                .find("epilogue adds none"),
            std::string::npos);
  EXPECT_NE(message([&] { gemm_request(randn({4, 4}).to(DType::Float64), randn({4, 4}).to(DType::Float64), out); }).find("float64"),
            std::string::npos);
  // Batch dims that cannot be one stride: [2, 3] batch taken with a permuted layout.
  Tensor o3 = empty({2, 3, 4, 4});
  const Tensor a = randn({3, 2, 4, 4}).permute({1, 0, 2, 3});
  EXPECT_NE(message([&] { gemm_request(a, randn({2, 3, 4, 4}), o3); }).find("do not collapse"), std::string::npos);
  // Broadcast over one batch dim only: no single stride either.
  EXPECT_NE(message([&] { gemm_request(randn({2, 1, 4, 4}).expand({2, 3, 4, 4}), randn({2, 3, 4, 4}), o3); }).find("do not collapse"),
            std::string::npos);
}

// The plan cache's key: what cuBLASLt's descriptors, layouts and algorithm depend on, and nothing
// that changes from call to call (addresses), so a training step's repeated GEMMs all hit.
TEST(GemmPlanCache, KeyIgnoresAddressesAndSeesEverythingElse) {
  auto plan = [](const Tensor& a, const Tensor& b, GemmEpilogue e = GemmEpilogue::None, const Tensor& bias = Tensor()) {
    const Tensor out = empty({a.size(0), b.size(1)}, a.dtype());
    return plan_gemm(gemm_request(a, b, out, bias, e));
  };
  const Tensor a1 = randn({64, 32}), b1_ = randn({32, 48}), a2 = randn({64, 32}), b2_ = randn({32, 48});  // alive: distinct addresses
  const GemmPlan p1 = plan(a1, b1_), p2 = plan(a2, b2_);
  ASSERT_NE(p1.a_address, p2.a_address);
  EXPECT_EQ(plan_key(p1), plan_key(p2));
  EXPECT_EQ(GemmPlanKeyHash{}(plan_key(p1)), GemmPlanKeyHash{}(plan_key(p2)));
  // Bias pointers differ per call and are set per call; the epilogue is in the key.
  const GemmPlan b1 = plan(randn({64, 32}), randn({32, 48}), GemmEpilogue::Bias, randn({48}));
  const GemmPlan b2 = plan(randn({64, 32}), randn({32, 48}), GemmEpilogue::Bias, randn({48}));
  EXPECT_EQ(plan_key(b1), plan_key(b2));
  EXPECT_FALSE(plan_key(b1) == plan_key(p1));
  const std::vector<GemmPlan> differ = {
      plan(randn({64, 32}), randn({32, 40})),                                  // n
      plan(randn({64, 32}), randn({48, 32}).t()),                              // op T
      plan(randn({64, 32}).to(DType::BFloat16), randn({32, 48}).to(DType::BFloat16)),  // dtype
      plan(randn({64, 33}).slice(1, 0, 32), randn({32, 48})),                  // leading dimension (and alignment)
      plan(randn({64, 32}), randn({32, 48}), GemmEpilogue::GeluTanh),          // epilogue
  };
  for (const GemmPlan& q : differ) EXPECT_FALSE(plan_key(q) == plan_key(p1));
  // Same shapes, a pointer that loses 16-byte alignment: another algorithm may be needed.
  const Tensor big = randn({64 * 32 + 1});
  GemmPlan shifted = plan(big.slice(0, 1, 64 * 32 + 1).view({64, 32}), randn({32, 48}));
  EXPECT_LT(shifted.align_b, 16);
  EXPECT_FALSE(plan_key(shifted) == plan_key(p1));
}

TEST(GemmPlanCache, BuildsOncePerKeyAndStartsOverWhenFull) {
  PlanCache<GemmPlanKey, int, GemmPlanKeyHash> cache(3);
  int built = 0;
  auto make = [&] { return ++built; };
  auto key = [](int64_t m) {
    GemmPlanKey k;
    k.m = m;
    return k;
  };
  EXPECT_EQ(cache.get(key(1), make), 1);
  EXPECT_EQ(cache.get(key(1), make), 1);  // a hit: nothing built
  EXPECT_EQ(cache.get(key(2), make), 2);
  EXPECT_EQ(built, 2);
  EXPECT_EQ(cache.hits(), 1);
  EXPECT_EQ(cache.misses(), 2);
  cache.get(key(3), make);
  EXPECT_EQ(cache.size(), 3u);
  cache.get(key(4), make);  // over capacity: starts over with the new key only
  EXPECT_EQ(cache.size(), 1u);
  EXPECT_EQ(cache.get(key(4), make), 4);
  EXPECT_EQ(cache.get(key(1), make), 5);  // rebuilt
  // A make that throws (no algorithm) leaves no entry behind.
  EXPECT_THROW(cache.get(key(9), [&]() -> int { throw Error("no algorithm"); }), Error);
  EXPECT_EQ(cache.get(key(9), make), 6);
}

// A training MLP's two fused GEMMs, run as planned: forward y = gelu(x w1^T + b1) with the GELU's
// input kept in aux; backward dpre = (g w2) * gelu'(aux) with b1's gradient summed in the epilogue.
// Against the CPU ops and their autograd.
TEST(GemmPlan, GeluAuxEpiloguesMatchTheCpuMlp) {
  const int64_t M = 6, K = 5, H = 16, D = 4;
  const Tensor x = randn({M, K}), w1 = randn({H, K}), b1 = randn({H}), g = randn({M, D}), w2 = randn({D, H});
  const Tensor y = empty({M, H}), pre = empty({M, H});
  run_plan(plan_gemm(gemm_request(x, w1.t(), y, b1, GemmEpilogue::BiasGeluTanhAux, false, pre)));
  const Tensor ref_pre = linear(x, w1, b1);
  EXPECT_LT(mixprec::testing::rel_error(pre, ref_pre), 1e-6);
  EXPECT_LT(mixprec::testing::rel_error(y, gelu(ref_pre, "tanh")), 1e-6);
  Tensor p = ref_pre.detach();
  p.requires_grad_();
  gelu(p, "tanh").backward(matmul(g, w2));
  const Tensor dpre = empty({M, H}), db = empty({H});
  run_plan(plan_gemm(gemm_request(g, w2, dpre, db, GemmEpilogue::DGeluTanhBgrad, false, pre)));
  EXPECT_LT(mixprec::testing::rel_error(dpre, p.grad()), 1e-6);
  EXPECT_LT(mixprec::testing::rel_error(db, sum(p.grad(), {0})), 1e-6);
  // cuBLASLt's rules for the aux matrix are checked here, before any call.
  auto message = [](const std::function<void()>& f) { return mixprec::testing::error_of(f); };
  const Tensor y12 = empty({M, 12}), pre12 = empty({M, 12});
  EXPECT_NE(message([&] { plan_gemm(gemm_request(x, randn({12, K}).t(), y12, randn({12}), GemmEpilogue::BiasGeluTanhAux, false, pre12)); })
                .find("divisible by 8"),
            std::string::npos);
  EXPECT_NE(message([&] { plan_gemm(gemm_request(x, w1.t(), y, b1, GemmEpilogue::BiasGeluTanhAux)); }).find("aux"), std::string::npos);
  EXPECT_NE(message([&] { plan_gemm(gemm_request(x, w1.t(), y, b1, GemmEpilogue::Bias, false, pre)); }).find("aux"), std::string::npos);
}
