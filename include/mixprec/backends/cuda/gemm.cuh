#pragma once
// GEMM through cuBLASLt: executes a GemmPlan (gemm_plan.hpp, tested on the CPU) with float32
// accumulation (CUBLAS_COMPUTE_32F; 16-bit inputs run on tensor cores), bias/GELU epilogues and a
// workspace from the caching allocator. Descriptors, layouts and the heuristic's algorithm are
// cached per plan key (shapes, strides, dtypes, epilogue, alignments) on each host thread. The plan's alignments go to cuBLASLt as the minimum
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
  switch (t) {
    case GemmType::F32: return CUDA_R_32F;
    case GemmType::F16: return CUDA_R_16F;
    case GemmType::BF16: return CUDA_R_16BF;
    case GemmType::F8E4M3: return CUDA_R_8F_E4M3;
    case GemmType::F8E5M2: return CUDA_R_8F_E5M2;
  }
  return CUDA_R_32F;
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
    case GemmEpilogue::BiasGeluTanhAux: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case GemmEpilogue::DGeluTanhBgrad: return CUBLASLT_EPILOGUE_DGELU_BGRAD;
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

namespace detail {
// The float8 GEMM's per-call pointers (scales, amax) and its bias type. The pointers are set
// again by each run_gemm, as the bias pointer: a cached descriptor serves calls with other scales.
inline void set_fp8_attributes(cublasLtMatmulDesc_t desc, const GemmPlan& p) {
  const void* a_scale = reinterpret_cast<const void*>(p.a_scale_address);
  const void* b_scale = reinterpret_cast<const void*>(p.b_scale_address);
  set_attr(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale, "A scale pointer");
  set_attr(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale, "B scale pointer");
  if (p.d_scale_address) {
    const void* d_scale = reinterpret_cast<const void*>(p.d_scale_address);
    set_attr(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_D_SCALE_POINTER, d_scale, "D scale pointer");
  }
  if (p.amax_d_address) {
    void* amax = reinterpret_cast<void*>(p.amax_d_address);
    set_attr(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, amax, "amax D pointer");
  }
  if (p.bias_address) {
    const int32_t type = static_cast<int32_t>(cuda_data_type(p.bias_type));
    set_attr(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type, "bias data type");
  }
}

// A plan's cuBLASLt objects and the heuristic's algorithm: built once per GemmPlanKey, so a
// repeated GEMM creates no descriptor and queries no heuristic.
struct LtPlan {
  LtDesc desc;
  LtLayout a, b, c, d;  // d: only when D's type differs from C's (a float8 output)
  cublasLtMatmulAlgo_t algo{};
  std::size_t workspace = 0;
  bool found = false;  // the heuristic had an algorithm (a miss is cached too: no repeated query)
};

inline LtPlan build_lt_plan(const GemmPlan& p) {
  LtPlan lt;
  cublasLtMatmulDesc_t desc_raw = nullptr;
  check_cublas(cublasLtMatmulDescCreate(&desc_raw, cublas_compute(p.compute), CUDA_R_32F), "cublasLtMatmulDescCreate");
  lt.desc.reset(desc_raw);
  const cublasOperation_t ta = cublas_op(p.transa), tb = cublas_op(p.transb);
  set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_TRANSA, ta, "transa");
  set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_TRANSB, tb, "transb");
  const cublasLtEpilogue_t epi = cublaslt_epilogue(p.epilogue);
  set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_EPILOGUE, epi, "epilogue");
  if (p.bias_address) {  // the heuristic sees a bias pointer of this call's; later calls set their own
    const void* bias = reinterpret_cast<const void*>(p.bias_address);
    set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, "bias pointer");
  }
  if (p.aux_address) {  // the GELU's input, in C's type, laid out as C
    const void* aux = reinterpret_cast<const void*>(p.aux_address);
    const int64_t ld = p.aux_ld;
    const int32_t type = static_cast<int32_t>(cuda_data_type(p.c_type));
    set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux, "aux pointer");
    set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, ld, "aux ld");
    set_attr(cublasLtMatmulDescSetAttribute, desc_raw, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, type, "aux data type");
  }
  if (gemm_type_is_fp8(p.ab_type)) set_fp8_attributes(desc_raw, p);
  lt.a = matrix_layout(p.ab_type, p.transa, p.m, p.k, p.lda, p.batch, p.stride_a);
  lt.b = matrix_layout(p.b_type, p.transb, p.k, p.n, p.ldb, p.batch, p.stride_b);
  lt.c = matrix_layout(p.c_input_type, GemmOp::N, p.m, p.n, p.ldc, p.batch, p.stride_c);
  if (p.c_input_type != p.c_type) lt.d = matrix_layout(p.c_type, GemmOp::N, p.m, p.n, p.ldc, p.batch, p.stride_c);

  cublasLtMatmulPreference_t pref_raw = nullptr;
  check_cublas(cublasLtMatmulPreferenceCreate(&pref_raw), "cublasLtMatmulPreferenceCreate");
  const LtPref pref(pref_raw);
  set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kGemmWorkspaceBytes, "workspace");
  const uint32_t aa = static_cast<uint32_t>(p.align_a), ab = static_cast<uint32_t>(p.align_b), ac = static_cast<uint32_t>(p.align_c);
  set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aa, "align A");
  set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ab, "align B");
  set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ac, "align C");
  set_attr(cublasLtMatmulPreferenceSetAttribute, pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ac, "align D");

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check_cublas(cublasLtMatmulAlgoGetHeuristic(cublaslt_handle(), desc_raw, lt.a.get(), lt.b.get(), lt.c.get(), lt.d ? lt.d.get() : lt.c.get(), pref_raw, 1,
                                              &result, &found),
               "cublasLtMatmulAlgoGetHeuristic");
  lt.found = found > 0;
  lt.algo = result.algo;
  lt.workspace = result.workspaceSize;
  return lt;
}

inline PlanCache<GemmPlanKey, LtPlan, GemmPlanKeyHash>& lt_plans() {
  thread_local PlanCache<GemmPlanKey, LtPlan, GemmPlanKeyHash> cache;
  return cache;
}
inline LtPlan& lt_plan(const GemmPlan& p) { return lt_plans().get(plan_key(p), [&] { return build_lt_plan(p); }); }
}  // namespace detail

// Whether cuBLASLt has an algorithm for the plan (an epilogue may have none for some shapes or
// types); asked once per key.
inline bool gemm_has_algorithm(const GemmPlan& p) { return p.m == 0 || p.n == 0 || (p.k > 0 && detail::lt_plan(p).found); }

// This thread's GEMM plan cache: {hits, misses} (a miss builds descriptors and asks the heuristic).
inline std::pair<int64_t, int64_t> gemm_plan_cache_stats() { return {detail::lt_plans().hits(), detail::lt_plans().misses()}; }

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
  detail::LtPlan& lt = detail::lt_plan(p);
  MIXPREC_CHECK(lt.found, op, ": cuBLASLt has no algorithm for m=", p.m, " n=", p.n, " k=", p.k, " ", gemm_type_name(p.ab_type), " -> ",
                gemm_type_name(p.c_type), " with alignments ", p.align_a, "/", p.align_b, "/", p.align_c, " bytes and epilogue ",
                static_cast<int>(p.epilogue));
  // Bias and aux pointers are the per-call attributes of a cached descriptor (this thread's own).
  const void* bias = reinterpret_cast<const void*>(p.bias_address);
  if (p.bias_address)
    detail::set_attr(cublasLtMatmulDescSetAttribute, lt.desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, "bias pointer");
  const void* aux = reinterpret_cast<const void*>(p.aux_address);
  if (p.aux_address)
    detail::set_attr(cublasLtMatmulDescSetAttribute, lt.desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux, "aux pointer");
  if (gemm_type_is_fp8(p.ab_type)) detail::set_fp8_attributes(lt.desc.get(), p);
  Tensor workspace;
  if (lt.workspace > 0) workspace = empty({static_cast<int64_t>(lt.workspace)}, DType::UInt8, Device::CUDA);
  const float alpha = 1.0f, beta = 0.0f;
  void* c = reinterpret_cast<void*>(p.c_address);
  check_cublas(cublasLtMatmul(cublaslt_handle(), lt.desc.get(), &alpha, reinterpret_cast<const void*>(p.a_address), lt.a.get(),
                              reinterpret_cast<const void*>(p.b_address), lt.b.get(), &beta, c, lt.c.get(), c, lt.d ? lt.d.get() : lt.c.get(), &lt.algo,
                              workspace.defined() ? workspace.data_ptr() : nullptr, lt.workspace, current_stream()),
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

// A training MLP's first linear, y = gelu_tanh(x W^T + b), from one GEMM that also writes the
// GELU's input pre = x W^T + b for the backward (GELU_AUX_BIAS). x [M, K], w [H, K], b [H], one
// dtype; H a multiple of 8 (mlp_gelu_fusable). Both tensors undefined where cuBLASLt has no such
// algorithm: the caller then runs the unfused ops.
struct LinearGeluResult {
  Tensor y, pre;
};
inline LinearGeluResult linear_gelu_aux(const Tensor& x, const Tensor& w, const Tensor& b) {
  const char* op = "gpu::linear_gelu_aux";
  for (const Tensor* t : {&x, &w, &b}) require_cuda_tensor(op, *t);
  MIXPREC_CHECK(x.dim() == 2 && w.dim() == 2 && b.dim() == 1 && x.size(1) == w.size(1) && b.size(0) == w.size(0) &&
                    x.dtype() == w.dtype() && b.dtype() == w.dtype(),
                op, ": expected x [M, K], w [H, K], b [H] of one dtype, got ", x.sizes(), " ", x.dtype(), ", ", w.sizes(), " ", w.dtype(),
                ", ", b.sizes(), " ", b.dtype());
  const Tensor xc = gemm_operand_ok(x, {x.size(0), w.size(0)}) ? x : contiguous(x);
  LinearGeluResult r{empty({x.size(0), w.size(0)}, x.dtype(), Device::CUDA), empty({x.size(0), w.size(0)}, x.dtype(), Device::CUDA)};
  const GemmPlan p = plan_gemm(gemm_request(xc, w.t(), r.y, contiguous(b), GemmEpilogue::BiasGeluTanhAux, false, r.pre));
  if (!gemm_has_algorithm(p)) return {};
  run_gemm(p);
  return r;
}

// Its backward through the second linear: dpre = (g W2) * gelu'(pre), and db = dpre summed over
// rows (the first linear's bias gradient), from one GEMM (DGELU_BGRAD). g [M, D] (the second
// linear's output gradient), w2 [D, H], pre [M, H] from linear_gelu_aux; db [H] in g's dtype.
// Undefined where cuBLASLt has no such algorithm, as linear_gelu_aux.
struct LinearDGeluResult {
  Tensor dpre, dbias;
};
inline LinearDGeluResult linear_dgelu_bgrad(const Tensor& g, const Tensor& w2, const Tensor& pre) {
  const char* op = "gpu::linear_dgelu_bgrad";
  for (const Tensor* t : {&g, &w2, &pre}) require_cuda_tensor(op, *t);
  MIXPREC_CHECK(g.dim() == 2 && w2.dim() == 2 && pre.dim() == 2 && g.size(1) == w2.size(0) && pre.size(0) == g.size(0) &&
                    pre.size(1) == w2.size(1) && g.dtype() == w2.dtype() && pre.dtype() == w2.dtype() && pre.is_contiguous(),
                op, ": expected g [M, D], w2 [D, H], contiguous pre [M, H] of one dtype, got ", g.sizes(), " ", g.dtype(), ", ",
                w2.sizes(), " ", w2.dtype(), ", ", pre.sizes(), " ", pre.dtype());
  const Shape os{g.size(0), w2.size(1)};
  const Tensor gc = gemm_operand_ok(g, os) ? g : contiguous(g), wc = gemm_operand_ok(w2, os) ? w2 : contiguous(w2);
  LinearDGeluResult r{empty(os, g.dtype(), Device::CUDA), empty({w2.size(1)}, g.dtype(), Device::CUDA)};
  const GemmPlan p = plan_gemm(gemm_request(gc, wc, r.dpre, r.dbias, GemmEpilogue::DGeluTanhBgrad, false, pre));
  if (!gemm_has_algorithm(p)) return {};
  run_gemm(p);
  return r;
}

}  // namespace mixprec::gpu
