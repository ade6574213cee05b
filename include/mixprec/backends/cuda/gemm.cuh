#pragma once
// GEMM through cuBLASLt: executes a GemmPlan (gemm_plan.hpp, tested on the CPU) with float32
// accumulation (CUBLAS_COMPUTE_32F; 16-bit inputs run on tensor cores), bias/GELU epilogues and a
// workspace from the caching allocator. The plan's alignments go to cuBLASLt as the minimum
// pointer alignment, so unaligned operands get a slower but valid algorithm.
#include <memory>

#include <cublasLt.h>

#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/backends/cuda/gemm_plan.hpp"

namespace mixprec::gpu {

inline void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(what, ": cuBLAS error ", static_cast<int>(s), " (", cublasGetStatusString(s), ")");
}

// One handle per host thread; cuBLASLt handles are not meant to be shared across threads.
inline cublasLtHandle_t cublaslt_handle() {
  struct Holder {
    cublasLtHandle_t h = nullptr;
    Holder() { check_cublas(cublasLtCreate(&h), "cublasLtCreate"); }
    ~Holder() { cublasLtDestroy(h); }
  };
  thread_local Holder holder;
  return holder.h;
}

// cuBLAS recommends 32 MiB on Hopper; less on older GPUs loses only a few algorithms.
inline constexpr uint64_t kGemmWorkspaceBytes = uint64_t{32} << 20;

inline cudaDataType_t cuda_data_type(GemmType t) {
  return t == GemmType::F32 ? CUDA_R_32F : t == GemmType::F16 ? CUDA_R_16F : CUDA_R_16BF;
}
inline cublasComputeType_t cublas_compute(GemmCompute c) {
  return c == GemmCompute::F32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
}
inline cublasOperation_t cublas_op(GemmOp o) { return o == GemmOp::N ? CUBLAS_OP_N : CUBLAS_OP_T; }
inline cublasLtEpilogue_t cublaslt_epilogue(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::None: return CUBLASLT_EPILOGUE_DEFAULT;
    case GemmEpilogue::Bias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::GeluTanh: return CUBLASLT_EPILOGUE_GELU;
    case GemmEpilogue::BiasGeluTanh: return CUBLASLT_EPILOGUE_GELU_BIAS;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

namespace detail {
template <class Set, class Obj, class Attr, class V>
void set_attr(Set set, Obj obj, Attr attr, const V& value, const char* what) {
  check_cublas(set(obj, attr, &value, sizeof(value)), what);
}
struct LtDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayoutOpaque_t* l) const { cublasLtMatrixLayoutDestroy(l); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using LtDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, LtDeleter>;
using LtLayout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LtDeleter>;
using LtPref = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, LtDeleter>;

// The stored matrix of an operand with op `o` and logical [rows, cols] after op, batched.
inline LtLayout matrix_layout(GemmType t, GemmOp o, int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
  cublasLtMatrixLayout_t l = nullptr;
  const bool n = o == GemmOp::N;
  check_cublas(cublasLtMatrixLayoutCreate(&l, cuda_data_type(t), static_cast<uint64_t>(n ? rows : cols),
                                          static_cast<uint64_t>(n ? cols : rows), ld),
               "cublasLtMatrixLayoutCreate");
  LtLayout owned(l);
  if (batch > 1) {
    const int32_t count = static_cast<int32_t>(batch);
    set_attr(cublasLtMatrixLayoutSetAttribute, l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, count, "batch count");
    set_attr(cublasLtMatrixLayoutSetAttribute, l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, stride, "batch stride");
  }
  return owned;
}
}  // namespace detail

// Runs the plan on the current stream. All addresses must be device memory.
inline void run_gemm(const GemmPlan& p) {
  const char* op = "cuda gemm";
  MIXPREC_CHECK(p.batch <= 0x7fffffff, op, ": batch ", p.batch, " exceeds cuBLASLt's int32 batch count");
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {  // cuBLASLt needs k > 0; an empty sum is zero
    MIXPREC_CHECK(p.epilogue == GemmEpilogue::None, op, ": an epilogue with K = 0 is not supported");
    const size_t row = static_cast<size_t>(p.m * gemm_type_size(p.c_type));
    for (int64_t b = 0; b < p.batch; ++b)
      check(cudaMemset2DAsync(reinterpret_cast<char*>(p.c_address) + b * p.stride_c * gemm_type_size(p.c_type),
                              static_cast<size_t>(p.ldc * gemm_type_size(p.c_type)), 0, row, static_cast<size_t>(p.n),
                              current_stream()),
            op);
    return;
  }
  cublasLtMatmulDesc_t desc_raw = nullptr;
  check_cublas(cublasLtMatmulDescCreate(&desc_raw, cublas_compute(p.compute), CUDA_R_32F), "cublasLtMatmulDescCreate");
  const detail::LtDesc desc(desc_raw);
  const cublasOperation_t ta = cublas_op(p.transa), tb = cublas_op(p.transb);
  detail::set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_TRANSA, ta, "transa");
  detail::set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_TRANSB, tb, "transb");
  const cublasLtEpilogue_t epi = cublaslt_epilogue(p.epilogue);
  detail::set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_EPILOGUE, epi, "epilogue");
  if (p.bias_address) {
    const void* bias = reinterpret_cast<const void*>(p.bias_address);
    detail::set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, "bias pointer");
  }
  const auto la = detail::matrix_layout(p.ab_type, p.transa, p.m, p.k, p.lda, p.batch, p.stride_a);
  const auto lb = detail::matrix_layout(p.ab_type, p.transb, p.k, p.n, p.ldb, p.batch, p.stride_b);
  const auto lc = detail::matrix_layout(p.c_type, GemmOp::N, p.m, p.n, p.ldc, p.batch, p.stride_c);

  cublasLtMatmulPreference_t pref_raw = nullptr;
  check_cublas(cublasLtMatmulPreferenceCreate(&pref_raw), "cublasLtMatmulPreferenceCreate");
  const detail::LtPref pref(pref_raw);
  detail::set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kGemmWorkspaceBytes,
                   "workspace");
  const uint32_t aa = static_cast<uint32_t>(p.align_a), ab = static_cast<uint32_t>(p.align_b), ac = static_cast<uint32_t>(p.align_c);
  detail::set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aa, "align A");
  detail::set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ab, "align B");
  detail::set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ac, "align C");
  detail::set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ac, "align D");

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check_cublas(cublasLtMatmulAlgoGetHeuristic(cublaslt_handle(), desc_raw, la.get(), lb.get(), lc.get(), lc.get(), pref_raw, 1, &result,
                                              &found),
               "cublasLtMatmulAlgoGetHeuristic");
  MIXPREC_CHECK(found > 0, op, ": cuBLASLt has no algorithm for m=", p.m, " n=", p.n, " k=", p.k, " ", gemm_type_name(p.ab_type),
                " -> ", gemm_type_name(p.c_type), " with alignments ", p.align_a, "/", p.align_b, "/", p.align_c, " bytes");
  Tensor workspace;
  if (result.workspaceSize > 0) workspace = empty({static_cast<int64_t>(result.workspaceSize)}, DType::UInt8, Device::CUDA);
  const float alpha = 1.0f, beta = 0.0f;
  void* c = reinterpret_cast<void*>(p.c_address);
  check_cublas(cublasLtMatmul(cublaslt_handle(), desc_raw, &alpha, reinterpret_cast<const void*>(p.a_address), la.get(),
                              reinterpret_cast<const void*>(p.b_address), lb.get(), &beta, c, lc.get(), c, lc.get(), &result.algo,
                              workspace.defined() ? workspace.data_ptr() : nullptr, result.workspaceSize, current_stream()),
               "cublasLtMatmul");
}

// a[..., M, K] @ b[..., K, N] for CUDA tensors with numpy batch broadcasting, accumulated in
// float32, written in `out_dtype` (a's dtype by default); optional bias [N] (out_dtype) and
// tanh-GELU fused into the epilogue (a bias selects the Bias epilogue by itself). Operands
// cuBLASLt cannot address are copied first.
inline Tensor matmul(const Tensor& a, const Tensor& b, std::optional<DType> out_dtype = std::nullopt, const Tensor& bias = Tensor(),
                     GemmEpilogue epilogue = GemmEpilogue::None, bool allow_tf32 = false) {
  const char* op = "gpu::matmul";
  require_cuda_tensor(op, a);
  require_cuda_tensor(op, b);
  MIXPREC_CHECK(a.dim() >= 2 && b.dim() >= 2 && a.size(-1) == b.size(-2), op, ": shapes ", a.sizes(), " and ", b.sizes(),
                " cannot be multiplied");
  MIXPREC_CHECK(a.dtype() == b.dtype(), op, ": operands must share a dtype, got ", a.dtype(), " and ", b.dtype());
  const DType od = out_dtype.value_or(a.dtype());
  Shape os = broadcast_shapes(Shape(a.sizes().begin(), a.sizes().end() - 2), Shape(b.sizes().begin(), b.sizes().end() - 2), op);
  os.push_back(a.size(-2));
  os.push_back(b.size(-1));
  auto prepare = [&](const Tensor& t) {
    Shape s(os.begin(), os.end() - 2);
    s.push_back(t.size(-2));
    s.push_back(t.size(-1));
    Tensor e = t.expand(s);
    return gemm_operand_ok(e, os) ? e : contiguous(e);
  };
  const Tensor ae = prepare(a), be = prepare(b);
  Tensor out = empty(os, od, Device::CUDA);
  Tensor bias_c;
  if (bias.defined()) {
    require_cuda_tensor(op, bias);
    bias_c = contiguous(bias, od);
    if (epilogue == GemmEpilogue::None) epilogue = GemmEpilogue::Bias;
    if (epilogue == GemmEpilogue::GeluTanh) epilogue = GemmEpilogue::BiasGeluTanh;
  }
  run_gemm(plan_gemm(gemm_request(ae, be, out, bias_c, epilogue, allow_tf32)));
  return out;
}

// y = x W^T (+ b), x [..., in], W [out, in]: the weight's transpose is op T, not a copy.
inline Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b = Tensor(), GemmEpilogue act = GemmEpilogue::None) {
  MIXPREC_CHECK(act == GemmEpilogue::None || act == GemmEpilogue::GeluTanh, "gpu::linear: act must be None or GeluTanh");
  const GemmEpilogue e = b.defined() ? (act == GemmEpilogue::GeluTanh ? GemmEpilogue::BiasGeluTanh : GemmEpilogue::Bias) : act;
  const Tensor x2 = x.dim() == 2 ? x : contiguous(x).view({-1, x.size(-1)});
  Tensor y = matmul(x2, w.t(), std::nullopt, b, e);
  Shape os(x.sizes().begin(), x.sizes().end() - 1);
  os.push_back(w.size(0));
  return y.view(os);
}

}  // namespace mixprec::gpu
