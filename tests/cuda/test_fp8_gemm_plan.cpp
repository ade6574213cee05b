// The cuBLASLt float8 GEMM plan (backends/cuda/gemm_plan.hpp), on the host: the plan a linear's
// forward gets (TN, scales swapped with the operands, 16-bit bias, E4M3 x E4M3 and E5M2 x E4M3),
// executed by a column-major reference of what cublasLtMatmul computes and compared with the
// row-major product; and every refusal of a call cuBLASLt would reject (compute capability below
// 8.9, not TN, misaligned, sizes not multiples of 16, E5M2 x E5M2, missing scales, a bias with a
// float32 output, scale pointers on a 16-bit GEMM). Never runs a GPU.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cuda/gemm_plan.hpp>

#include <string>

using namespace mixprec;
using namespace mixprec::gpu;

namespace {

float fp8p_load(uintptr_t base, GemmType t, int64_t i) {
  switch (t) {
    case GemmType::F32: return reinterpret_cast<const float*>(base)[i];
    case GemmType::F16: return float(reinterpret_cast<const half*>(base)[i]);
    case GemmType::BF16: return float(reinterpret_cast<const bfloat16*>(base)[i]);
    case GemmType::F8E4M3: return float(reinterpret_cast<const float8_e4m3fn*>(base)[i]);
    case GemmType::F8E5M2: return float(reinterpret_cast<const float8_e5m2*>(base)[i]);
  }
  return NAN;
}
void fp8p_store(uintptr_t base, GemmType t, int64_t i, float v) {
  switch (t) {
    case GemmType::F32: reinterpret_cast<float*>(base)[i] = v; break;
    case GemmType::F16: reinterpret_cast<half*>(base)[i] = half(v); break;
    case GemmType::BF16: reinterpret_cast<bfloat16*>(base)[i] = bfloat16(v); break;
    case GemmType::F8E4M3: reinterpret_cast<float8_e4m3fn*>(base)[i] = float8_e4m3fn::from_float(v, Fp8Saturate::Yes); break;
    case GemmType::F8E5M2: reinterpret_cast<float8_e5m2*>(base)[i] = float8_e5m2::from_float(v, Fp8Saturate::Yes); break;
  }
}

// What cublasLtMatmul computes for a float8 plan, column-major: D = scale_a scale_b op(A) op(B)
// (+ bias), amax_d = max |D|, then D * scale_d rounded to D's type.
void fp8p_run(const GemmPlan& p) {
  const float sa = *reinterpret_cast<const float*>(p.a_scale_address), sb = *reinterpret_cast<const float*>(p.b_scale_address);
  const float sd = p.d_scale_address ? *reinterpret_cast<const float*>(p.d_scale_address) : 1.0f;
  float amax = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t j = 0; j < p.n; ++j)
      for (int64_t i = 0; i < p.m; ++i) {
        double acc = 0;
        for (int64_t l = 0; l < p.k; ++l) {
          const int64_t ia = b * p.stride_a + (p.transa == GemmOp::N ? i + l * p.lda : l + i * p.lda);
          const int64_t ib = b * p.stride_b + (p.transb == GemmOp::N ? l + j * p.ldb : j + l * p.ldb);
          acc += double(fp8p_load(p.a_address, p.ab_type, ia)) * double(fp8p_load(p.b_address, p.b_type, ib));
        }
        acc *= double(sa) * double(sb);
        if (p.bias_length) acc += fp8p_load(p.bias_address, p.bias_type, i);
        amax = std::max(amax, static_cast<float>(std::fabs(acc)));
        fp8p_store(p.c_address, p.c_type, b * p.stride_c + i + j * p.ldc, static_cast<float>(acc * sd));
      }
  if (p.amax_d_address) *reinterpret_cast<float*>(p.amax_d_address) = amax;
}

struct Fp8Linear {
  Tensor x, w, bias, out;  // x [M, K] fp8, w [N, K] fp8, out [M, N]
  float sx = 0.25f, sw = 0.5f;  // dequantization factors (scale_inv)
};

Fp8Linear make_linear(int64_t M, int64_t N, int64_t K, DType xd, DType wd, DType out, bool with_bias) {
  Generator g(17);
  Fp8Linear l;
  l.x = mul(randn({M, K}, DType::Float32, g), 4.0).to(xd);
  l.w = mul(randn({N, K}, DType::Float32, g), 2.0).to(wd);
  if (with_bias) l.bias = randn({N}, DType::Float32, g).to(out == DType::Float16 ? DType::Float16 : DType::BFloat16);
  l.out = empty({M, N}, out);
  return l;
}

GemmRequest linear_request(Fp8Linear& l, int cc = 90) {
  GemmRequest r = gemm_request(l.x, l.w.t(), l.out, Tensor(), GemmEpilogue::None);
  if (l.bias.defined()) {
    r.epilogue = GemmEpilogue::Bias;
    r.bias_address = reinterpret_cast<uintptr_t>(l.bias.data_ptr());
  }
  r.a_scale_address = reinterpret_cast<uintptr_t>(&l.sx);
  r.b_scale_address = reinterpret_cast<uintptr_t>(&l.sw);
  r.compute_capability = cc;
  return r;
}

// Row-major reference from the logical tensors.
std::vector<double> fp8p_reference(const Fp8Linear& l) {
  const Tensor x = l.x.to(DType::Float64), w = l.w.to(DType::Float64);
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  std::vector<double> out(static_cast<std::size_t>(M * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += x.data<double>()[i * K + k] * w.data<double>()[j * K + k];
      out[static_cast<std::size_t>(i * N + j)] = acc * l.sx * l.sw + (l.bias.defined() ? l.bias.to(DType::Float64).data<double>()[j] : 0.0);
    }
  return out;
}

double fp8p_rel_err(const Tensor& got, const std::vector<double>& want) {
  const Tensor g = got.to(DType::Float64).contiguous();
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num += (g.data<double>()[i] - want[i]) * (g.data<double>()[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

void expect_refused(const GemmRequest& r, const std::string& part) {
  try {
    (void)plan_gemm(r);
    ADD_FAILURE() << "planned, expected an error containing \"" << part << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Fp8GemmPlan, LinearForwardIsTNWithSwappedScales) {
  for (DType out : {DType::BFloat16, DType::Float16, DType::Float32}) {
    const bool bias = out != DType::Float32;
    Fp8Linear l = make_linear(24, 32, 48, DType::Float8E4M3FN, DType::Float8E4M3FN, out, bias);
    const GemmPlan p = plan_gemm(linear_request(l));
    EXPECT_EQ(p.transa, GemmOp::T);  // cuBLAS A = W^T's storage, W [N, K] row-major
    EXPECT_EQ(p.transb, GemmOp::N);
    EXPECT_EQ(p.m, 32);
    EXPECT_EQ(p.n, 24);
    EXPECT_EQ(p.k, 48);
    EXPECT_EQ(p.lda, 48);
    EXPECT_EQ(p.ldb, 48);
    EXPECT_EQ(p.ab_type, GemmType::F8E4M3);
    EXPECT_EQ(p.b_type, GemmType::F8E4M3);
    EXPECT_EQ(p.c_type, gemm_type_of(out, "test"));
    EXPECT_EQ(p.c_input_type, p.c_type);
    EXPECT_EQ(p.compute, GemmCompute::F32);
    EXPECT_EQ(p.a_scale_address, reinterpret_cast<uintptr_t>(&l.sw));  // swapped with the operands
    EXPECT_EQ(p.b_scale_address, reinterpret_cast<uintptr_t>(&l.sx));
    EXPECT_EQ(p.align_a, 16);
    EXPECT_EQ(p.align_b, 16);
    EXPECT_TRUE(p.tensor_core_aligned);
    if (bias) EXPECT_EQ(p.bias_type, out == DType::Float16 ? GemmType::F16 : GemmType::BF16);
    fp8p_run(p);
    const double tol = out == DType::Float32 ? 1e-6 : out == DType::Float16 ? 1e-3 : 1e-2;
    EXPECT_LT(fp8p_rel_err(l.out, fp8p_reference(l)), tol) << out;
  }
}

TEST(Fp8GemmPlan, MixedE5M2GradientTimesE4M3WeightAndFp8Output) {
  // A gradient (E5M2, our a) times a transposed weight copy (E4M3, our b): types on their sides.
  Fp8Linear l = make_linear(16, 16, 32, DType::Float8E5M2, DType::Float8E4M3FN, DType::Float8E4M3FN, false);
  float d_scale = 0.125f, amax = -1.0f;
  GemmRequest r = linear_request(l, 89);
  r.d_scale_address = reinterpret_cast<uintptr_t>(&d_scale);
  r.amax_d_address = reinterpret_cast<uintptr_t>(&amax);
  const GemmPlan p = plan_gemm(r);
  EXPECT_EQ(p.ab_type, GemmType::F8E4M3);
  EXPECT_EQ(p.b_type, GemmType::F8E5M2);
  EXPECT_EQ(p.c_type, GemmType::F8E4M3);
  EXPECT_EQ(p.c_input_type, GemmType::BF16);  // cuBLASLt's C type for a float8 D
  EXPECT_EQ(p.d_scale_address, reinterpret_cast<uintptr_t>(&d_scale));
  EXPECT_EQ(p.amax_d_address, reinterpret_cast<uintptr_t>(&amax));
  fp8p_run(p);
  const std::vector<double> want = fp8p_reference(l);
  double want_amax = 0;
  for (double v : want) want_amax = std::max(want_amax, std::fabs(v));
  EXPECT_NEAR(amax, want_amax, 1e-5 * want_amax);
  std::vector<double> scaled(want);
  for (double& v : scaled) v *= d_scale;
  EXPECT_LT(fp8p_rel_err(l.out, scaled), 0.05);  // one E4M3 rounding of the result
  // Different types or an amax pointer: different cuBLASLt objects.
  Fp8Linear same = make_linear(16, 16, 32, DType::Float8E4M3FN, DType::Float8E4M3FN, DType::Float8E4M3FN, false);
  GemmRequest rs = linear_request(same, 89);
  rs.d_scale_address = r.d_scale_address;
  EXPECT_FALSE(plan_key(plan_gemm(rs)) == plan_key(p));
  rs.amax_d_address = r.amax_d_address;
  const GemmPlan ps = plan_gemm(rs);
  EXPECT_FALSE(plan_key(ps) == plan_key(p));
  rs.amax_d_address = 0;
  EXPECT_FALSE(plan_key(plan_gemm(rs)) == plan_key(ps));
}

TEST(Fp8GemmPlan, RefusesWhatCublasLtWouldReject) {
  Fp8Linear l = make_linear(16, 32, 32, DType::Float8E4M3FN, DType::Float8E4M3FN, DType::BFloat16, true);
  expect_refused(linear_request(l, 86), "compute capability 8.9 or newer (Ada, Hopper), the device has 8.6");
  expect_refused(linear_request(l, 80), "the device has 8.0");
  expect_refused(linear_request(l, 0), "none was given");
  {  // W [K, N] row-major (a plain matmul's b, or the dgrad's W): NN, not TN
    GemmRequest r = linear_request(l);
    const Tensor wkn = l.w.t().contiguous();
    r = gemm_request(l.x, wkn, l.out);
    r.a_scale_address = reinterpret_cast<uintptr_t>(&l.sx);
    r.b_scale_address = reinterpret_cast<uintptr_t>(&l.sw);
    r.compute_capability = 90;
    expect_refused(r, "TN layout");
  }
  {
    GemmRequest r = linear_request(l);
    r.a_scale_address = 0;
    expect_refused(r, "scale pointers");
  }
  {
    Fp8Linear e5 = make_linear(16, 32, 32, DType::Float8E5M2, DType::Float8E5M2, DType::BFloat16, false);
    expect_refused(linear_request(e5), "float8_e5m2 x float8_e5m2");
  }
  {
    Fp8Linear k24 = make_linear(16, 32, 24, DType::Float8E4M3FN, DType::Float8E4M3FN, DType::BFloat16, false);
    expect_refused(linear_request(k24), "K = 24 and N = 32 must be multiples of 16");
  }
  {  // an x that starts 8 bytes into its buffer
    Fp8Linear big = make_linear(17, 32, 32, DType::Float8E4M3FN, DType::Float8E4M3FN, DType::BFloat16, false);
    Fp8Linear view = big;
    view.x = mixprec::detail::make_view(big.x, {16, 32}, {32, 1}, 8);
    view.out = empty({16, 32}, DType::BFloat16);
    expect_refused(linear_request(view), "16-byte aligned");
  }
  {
    Fp8Linear f32 = make_linear(16, 32, 32, DType::Float8E4M3FN, DType::Float8E4M3FN, DType::Float32, true);
    f32.bias = f32.bias.to(DType::Float32);
    expect_refused(linear_request(f32), "16-bit");
  }
  {
    GemmRequest r = linear_request(l);
    r.amax_d_address = r.a_scale_address;
    expect_refused(r, "amax_d is computed for float8 outputs only");
  }
  {
    Fp8Linear o8 = make_linear(16, 32, 32, DType::Float8E4M3FN, DType::Float8E4M3FN, DType::Float8E4M3FN, false);
    expect_refused(linear_request(o8), "needs d_scale");
  }
  {
    GemmRequest r = linear_request(l);
    r.epilogue = GemmEpilogue::BiasGeluTanh;
    expect_refused(r, "only the bias epilogue");
  }
  {  // scale pointers on a 16-bit GEMM would be ignored by cuBLASLt: refused
    const Tensor a = ones({16, 16}, DType::BFloat16), b = ones({16, 16}, DType::BFloat16), out = empty({16, 16}, DType::BFloat16);
    GemmRequest r = gemm_request(a, b, out);
    float s = 1.0f;
    r.a_scale_address = reinterpret_cast<uintptr_t>(&s);
    expect_refused(r, "belong to float8 GEMMs");
  }
  {  // float8 with a 16-bit operand
    const Tensor a = ones({16, 32}, DType::BFloat16), out = empty({16, 32}, DType::BFloat16);
    expect_refused(gemm_request(a, l.w.t(), out), "both be float8");
  }
}
