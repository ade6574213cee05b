#pragma once
// The GEMM call plan: how a row-major mixprec product becomes one column-major cuBLASLt call.
// Plain C++ with no CUDA header, so the CPU tests execute every plan with a column-major
// reference GEMM and compare it with the row-major CPU matmul; gemm.cuh only translates the
// plan's own enums into cuBLASLt's.
//
// Row-major C[M,N] = A[M,K] B[K,N] is the column-major product C^T[N,M] = B^T A^T, and a
// row-major buffer read column-major is its transpose: so cuBLAS's A is our B, cuBLAS's B is our
// A, m = N, n = M, and no data moves. A transposed view (strides (1, s)) becomes op T instead of a
// copy. The bias epilogue adds a length-m vector to each column of C^T, i.e. bias[j] to column j
// of the row-major C: exactly linear's bias.
//
// fp8 (amp/fp8.hpp's GEMMs on tensor cores): E4M3 x E4M3 or E4M3 x E5M2 inputs, float32
// accumulation, D = scale_a scale_b (A B) [+ bias] (times scale_d when D is itself fp8, whose
// amax cuBLASLt can write as it stores). cuBLASLt's rules, checked here so a GPU never sees a call
// it would reject: compute capability 8.9+ (Ada, Hopper), the "TN" layout (cuBLAS A transposed,
// B not: our b stored as the transpose of a row-major [N, K], i.e. linear's W^T, and our a
// row-major [M, K]), 16-byte aligned matrices with K and N multiples of 16, a bias in a 16-bit
// type, and no E5M2 x E5M2. Scales are device pointers to float32 (per-tensor dequantization
// factors: the amp's scale_inv) and, like A and B, swap sides in the row-major mapping.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "mixprec/backends/cuda/plan_cache.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::gpu {

enum class GemmType : uint8_t { F32, F16, BF16, F8E4M3, F8E5M2 };
// F32: CUBLAS_COMPUTE_32F (16-bit inputs run on tensor cores, accumulate in float32).
// F32FastTF32: CUBLAS_COMPUTE_32F_FAST_TF32, float32 inputs rounded to tf32 on tensor cores.
enum class GemmCompute : uint8_t { F32, F32FastTF32 };
enum class GemmOp : uint8_t { N, T };
// cuBLASLt's GELU epilogue is the tanh approximation (gelu(x, "tanh")). The two with an aux
// matrix (row-major like C, row stride aux_ld) serve a training MLP:
//   BiasGeluTanhAux: C = gelu(A B + bias), aux = A B + bias (the GELU's input, for the backward);
//   DGeluTanhBgrad:  C = (A B) * gelu'(aux), and bias (an output here) = C summed over its rows,
//                    i.e. the hidden gradient through the GELU and the first linear's bias gradient.
enum class GemmEpilogue : uint8_t { None, Bias, GeluTanh, BiasGeluTanh, BiasGeluTanhAux, DGeluTanhBgrad };

inline bool gemm_epilogue_has_bias(GemmEpilogue e) {
  return e == GemmEpilogue::Bias || e == GemmEpilogue::BiasGeluTanh || e == GemmEpilogue::BiasGeluTanhAux ||
         e == GemmEpilogue::DGeluTanhBgrad;
}
inline bool gemm_epilogue_has_aux(GemmEpilogue e) { return e == GemmEpilogue::BiasGeluTanhAux || e == GemmEpilogue::DGeluTanhBgrad; }

inline bool gemm_type_is_fp8(GemmType t) { return t == GemmType::F8E4M3 || t == GemmType::F8E5M2; }
inline int64_t gemm_type_size(GemmType t) { return t == GemmType::F32 ? 4 : gemm_type_is_fp8(t) ? 1 : 2; }
inline const char* gemm_type_name(GemmType t) {
  switch (t) {
    case GemmType::F32: return "float32";
    case GemmType::F16: return "float16";
    case GemmType::BF16: return "bfloat16";
    case GemmType::F8E4M3: return "float8_e4m3fn";
    case GemmType::F8E5M2: return "float8_e5m2";
  }
  return "?";
}

inline GemmType gemm_type_of(DType d, const char* op) {
  switch (d) {
    case DType::Float32: return GemmType::F32;
    case DType::Float16: return GemmType::F16;
    case DType::BFloat16: return GemmType::BF16;
    case DType::Float8E4M3FN: return GemmType::F8E4M3;
    case DType::Float8E5M2: return GemmType::F8E5M2;
    default: fail(op, ": cuBLASLt GEMM takes float32, float16, bfloat16 or float8, got ", d);
  }
}

// A row-major operand: logical [rows, cols] at `address` with element strides (s0, s1), the
// same for every batch entry but `batch_stride` elements apart (0: broadcast).
struct GemmOperand {
  uintptr_t address = 0;
  int64_t s0 = 0, s1 = 1;
  int64_t batch_stride = 0;
  GemmType type = GemmType::F32;
};

struct GemmRequest {
  int64_t M = 0, N = 0, K = 0, batch = 1;
  GemmOperand a;  // [M, K]
  GemmOperand b;  // [K, N]
  uintptr_t c_address = 0;  // row-major [batch, M, N], row stride ldc, batch stride c_batch_stride
  int64_t ldc = 0, c_batch_stride = 0;
  GemmType c_type = GemmType::F32;
  GemmEpilogue epilogue = GemmEpilogue::None;
  uintptr_t bias_address = 0;  // [N] in c_type, when the epilogue has a bias (DGeluTanhBgrad: written)
  uintptr_t aux_address = 0;   // [M, N] in c_type, row stride aux_ld, when the epilogue has an aux matrix
  int64_t aux_ld = 0;
  bool allow_tf32 = false;     // float32 inputs only, as torch.backends.cuda.matmul.allow_tf32
  // fp8 only: device float32 pointers. a_scale / b_scale multiply our a / b (dequantization);
  // d_scale (fp8 D only) multiplies the result before it is rounded to fp8; amax_d (fp8 D only,
  // optional) receives max |D| before d_scale.
  uintptr_t a_scale_address = 0, b_scale_address = 0, d_scale_address = 0, amax_d_address = 0;
  int compute_capability = 0;  // the device's, major * 10 + minor: fp8 needs 89 or more
};

struct GemmPlan {
  GemmOp transa = GemmOp::N, transb = GemmOp::N;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 1, ldb = 1, ldc = 1;
  int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
  uintptr_t a_address = 0, b_address = 0, c_address = 0, bias_address = 0;  // cuBLAS's A = our b, B = our a
  GemmType ab_type = GemmType::F32, c_type = GemmType::F32;
  GemmCompute compute = GemmCompute::F32;
  GemmEpilogue epilogue = GemmEpilogue::None;
  int64_t bias_length = 0;  // = m
  uintptr_t aux_address = 0;  // column-major like C: aux_ld >= m, a multiple of 8 (cuBLASLt's rule)
  int64_t aux_ld = 0;
  // fp8: cuBLAS B's type (our a's; ab_type is cuBLAS A's, our b's) -- they differ in E4M3 x E5M2 --,
  // the type of the C matrix cuBLASLt declares (16-bit when D is fp8; C is not read, beta = 0), the
  // bias's type, and the scale pointers in cuBLAS's naming (a_scale scales cuBLAS A = our b).
  GemmType b_type = GemmType::F32, c_input_type = GemmType::F32, bias_type = GemmType::F32;
  uintptr_t a_scale_address = 0, b_scale_address = 0, d_scale_address = 0, amax_d_address = 0;
  // Byte alignment of each matrix (largest power of two <= 16 dividing its address, leading
  // dimension and batch stride in bytes): handed to cuBLASLt as the minimum alignment, so the
  // algorithm it picks is valid for these pointers even when they are not 16-byte aligned.
  int align_a = 16, align_b = 16, align_c = 16;
  // Tensor cores at full speed need m, n, k multiples of 8 (16-bit) or 4 (tf32) and 16-byte
  // aligned matrices; otherwise cuBLASLt still computes the right answer with slower kernels.
  bool tensor_core_aligned = false;
};

namespace detail {
inline int gemm_alignment(uintptr_t address, int64_t elem, int64_t ld, int64_t batch_stride) {
  int a = 16;
  auto fit = [&](uint64_t v) {
    while (a > 1 && v % static_cast<uint64_t>(a) != 0) a /= 2;
  };
  fit(address);
  fit(static_cast<uint64_t>(ld * elem));
  if (batch_stride != 0) fit(static_cast<uint64_t>(batch_stride * elem));
  return a;
}

// A row-major operand [rows, cols] as a column-major matrix: its op and leading dimension.
// Row-major storage (s1 == 1) is the column-major transpose (op N for the swapped product);
// column-major storage (s0 == 1) is the matrix itself (op T). Anything else needs a copy.
inline bool gemm_row_major(int64_t s0, int64_t s1, int64_t rows, int64_t cols) { return s1 == 1 && (s0 >= cols || rows <= 1); }
inline bool gemm_col_major(int64_t s0, int64_t s1, int64_t rows, int64_t cols) { return s0 == 1 && (s1 >= rows || cols <= 1); }

inline std::pair<GemmOp, int64_t> gemm_layout(const char* what, const GemmOperand& o, int64_t rows, int64_t cols) {
  if (gemm_row_major(o.s0, o.s1, rows, cols)) return {GemmOp::N, std::max<int64_t>({o.s0, cols, 1})};
  if (gemm_col_major(o.s0, o.s1, rows, cols)) return {GemmOp::T, std::max<int64_t>({o.s1, rows, 1})};
  fail("gemm plan: operand ", what, " of shape [", rows, ", ", cols, "] with strides (", o.s0, ", ", o.s1,
       ") has no unit stride; make it contiguous first");
}

// The one element stride between consecutive batch entries of t (whose batch dims are out's,
// broadcast ones with stride 0), or nullopt when its batch dims do not collapse to one stride.
inline std::optional<int64_t> collapsed_batch_stride(const Tensor& t, const Shape& out) {
  const int64_t nd = t.dim();
  int64_t stride = 0, inner = 1;  // inner: batch entries spanned by the dims after d
  bool seen = false;
  for (int64_t d = nd - 3; d >= 0; inner *= out[d], --d) {
    if (t.size(d) == 1) continue;
    if (!seen) {
      if (t.stride(d) % inner != 0) return std::nullopt;
      stride = t.stride(d) / inner;
      seen = true;
    } else if (t.stride(d) != stride * inner) {
      return std::nullopt;
    }
  }
  return stride;
}
}  // namespace detail

// True when gemm_request takes t (an operand expanded to out's batch dims) without a copy.
inline bool gemm_operand_ok(const Tensor& t, const Shape& out) {
  return (detail::gemm_row_major(t.stride(-2), t.stride(-1), t.size(-2), t.size(-1)) ||
          detail::gemm_col_major(t.stride(-2), t.stride(-1), t.size(-2), t.size(-1))) &&
         detail::collapsed_batch_stride(t, out).has_value();
}

namespace detail {
// The fp8 rules of the comment at the top; p is the plan as for any GEMM (ops, alignments).
inline void plan_fp8(const GemmRequest& r, GemmPlan& p) {
  const char* op = "gemm plan (float8)";
  const int cc = r.compute_capability;
  MIXPREC_CHECK(cc >= 89, op, ": float8 tensor-core GEMMs need compute capability 8.9 or newer (Ada, Hopper), ",
                cc > 0 ? "the device has " + std::to_string(cc / 10) + "." + std::to_string(cc % 10) : std::string("none was given"),
                "; run the emulated path (amp::fp8_linear on the CPU) or bfloat16 there");
  MIXPREC_CHECK(!(r.a.type == GemmType::F8E5M2 && r.b.type == GemmType::F8E5M2), op,
                ": float8_e5m2 x float8_e5m2 has no cuBLASLt kernel; quantize one operand to float8_e4m3fn (HYBRID: E4M3 activations "
                "and weights, E5M2 gradients)");
  MIXPREC_CHECK(p.transa == GemmOp::T && p.transb == GemmOp::N, op, ": cuBLASLt's float8 kernels take only the TN layout: b [K, N] "
                "must be the transpose of a row-major [N, K] matrix (strides (1, >= K), as linear's W^T) and a [M, K] row-major; got b "
                "strides (", r.b.s0, ", ", r.b.s1, ") and a strides (", r.a.s0, ", ", r.a.s1, "). Make a transposed float8 copy "
                "(TransformerEngine keeps one per weight for the backward)");
  MIXPREC_CHECK(r.K % 16 == 0 && r.N % 16 == 0, op, ": K = ", r.K, " and N = ", r.N, " must be multiples of 16");
  MIXPREC_CHECK(p.align_a == 16 && p.align_b == 16 && p.align_c == 16, op, ": every matrix must be 16-byte aligned (address, row "
                "stride and batch stride), got alignments ", p.align_b, " (a), ", p.align_a, " (b) and ", p.align_c, " (out) bytes");
  MIXPREC_CHECK(r.a_scale_address != 0 && r.b_scale_address != 0, op,
                ": the operands' scale pointers (float32 dequantization factors, scale_inv) are required");
  const bool fp8_out = gemm_type_is_fp8(r.c_type);
  MIXPREC_CHECK(fp8_out == (r.d_scale_address != 0), op, ": a float8 output needs d_scale (and only it takes one), output ",
                gemm_type_name(r.c_type));
  MIXPREC_CHECK(fp8_out || r.amax_d_address == 0, op, ": amax_d is computed for float8 outputs only, output ", gemm_type_name(r.c_type));
  MIXPREC_CHECK(r.epilogue == GemmEpilogue::None || r.epilogue == GemmEpilogue::Bias, op,
                ": only the bias epilogue is planned for float8 GEMMs, got epilogue ", static_cast<int>(r.epilogue));
  MIXPREC_CHECK(r.epilogue != GemmEpilogue::Bias || r.c_type != GemmType::F32, op,
                ": cuBLASLt's float8 bias is 16-bit: use a bfloat16 or float16 output, got float32");
  p.c_input_type = fp8_out ? GemmType::BF16 : r.c_type;
  p.bias_type = r.c_type == GemmType::F16 ? GemmType::F16 : GemmType::BF16;
  p.a_scale_address = r.b_scale_address;  // cuBLAS A is our b
  p.b_scale_address = r.a_scale_address;
  p.d_scale_address = r.d_scale_address;
  p.amax_d_address = r.amax_d_address;
  p.tensor_core_aligned = p.m % 16 == 0 && p.k % 16 == 0;
}
}  // namespace detail

inline GemmPlan plan_gemm(const GemmRequest& r) {
  MIXPREC_CHECK(r.M >= 0 && r.N >= 0 && r.K >= 0 && r.batch >= 1, "gemm plan: bad sizes M=", r.M, " N=", r.N, " K=", r.K,
                " batch=", r.batch);
  const bool fp8 = gemm_type_is_fp8(r.a.type) || gemm_type_is_fp8(r.b.type);
  MIXPREC_CHECK(r.a.type == r.b.type || (gemm_type_is_fp8(r.a.type) && gemm_type_is_fp8(r.b.type)),
                "gemm plan: operands must share a dtype (or both be float8), got ", gemm_type_name(r.a.type), " and ",
                gemm_type_name(r.b.type));
  MIXPREC_CHECK(fp8 || (!r.a_scale_address && !r.b_scale_address && !r.d_scale_address && !r.amax_d_address &&
                        !gemm_type_is_fp8(r.c_type)),
                "gemm plan: scale and amax pointers and float8 outputs belong to float8 GEMMs, the operands are ",
                gemm_type_name(r.a.type));
  MIXPREC_CHECK(r.ldc >= std::max<int64_t>(r.N, 1), "gemm plan: ldc ", r.ldc, " < N ", r.N);
  MIXPREC_CHECK(!r.allow_tf32 || r.a.type == GemmType::F32, "gemm plan: tf32 applies to float32 inputs only, got ",
                gemm_type_name(r.a.type));
  MIXPREC_CHECK(r.a.type != GemmType::F32 || r.c_type == GemmType::F32, "gemm plan: float32 inputs need a float32 output, got ",
                gemm_type_name(r.c_type));
  const bool has_bias = gemm_epilogue_has_bias(r.epilogue), has_aux = gemm_epilogue_has_aux(r.epilogue);
  MIXPREC_CHECK(!has_bias || r.bias_address != 0, "gemm plan: the bias epilogue needs a bias pointer");
  // A bias with an epilogue that adds none would be dropped without a word (the GPU once did).
  MIXPREC_CHECK(has_bias || r.bias_address == 0, "gemm plan: a bias was given, but the epilogue adds none; use Bias or BiasGeluTanh");
  MIXPREC_CHECK(has_aux == (r.aux_address != 0), "gemm plan: the GELU aux epilogues need an aux matrix, and only they take one");
  if (has_aux)
    MIXPREC_CHECK(r.batch == 1 && r.aux_ld >= std::max<int64_t>(r.N, 1) && r.aux_ld % 8 == 0 && r.aux_address % 16 == 0,
                  "gemm plan: a GELU aux matrix must be unbatched, 16-byte aligned, with a row stride >= N = ", r.N,
                  " divisible by 8 (cuBLASLt's rule), got batch ", r.batch, ", row stride ", r.aux_ld);
  GemmPlan p;
  const auto [opb, ldb_] = detail::gemm_layout("b", r.b, r.K, r.N);
  const auto [opa, lda_] = detail::gemm_layout("a", r.a, r.M, r.K);
  p.transa = opb;
  p.lda = ldb_;
  p.a_address = r.b.address;
  p.stride_a = r.b.batch_stride;
  p.transb = opa;
  p.ldb = lda_;
  p.b_address = r.a.address;
  p.stride_b = r.a.batch_stride;
  p.m = r.N;
  p.n = r.M;
  p.k = r.K;
  p.ldc = r.ldc;
  p.c_address = r.c_address;
  p.stride_c = r.c_batch_stride;
  p.batch = r.batch;
  p.ab_type = r.b.type;  // cuBLAS A is our b (the same type unless mixed float8)
  p.c_type = r.c_type;
  p.compute = r.allow_tf32 ? GemmCompute::F32FastTF32 : GemmCompute::F32;
  p.epilogue = r.epilogue;
  p.bias_address = has_bias ? r.bias_address : 0;
  p.bias_length = has_bias ? p.m : 0;
  p.aux_address = r.aux_address;
  p.aux_ld = has_aux ? r.aux_ld : 0;
  const int64_t ea = gemm_type_size(p.ab_type), ec = gemm_type_size(p.c_type);
  p.align_a = detail::gemm_alignment(p.a_address, ea, p.lda, p.stride_a);
  p.align_b = detail::gemm_alignment(p.b_address, ea, p.ldb, p.stride_b);
  p.align_c = detail::gemm_alignment(p.c_address, ec, p.ldc, p.stride_c);
  const bool sixteen = p.ab_type != GemmType::F32;
  const int64_t mult = sixteen ? 8 : 4;
  p.tensor_core_aligned = (sixteen || p.compute == GemmCompute::F32FastTF32) && p.m % mult == 0 && p.n % mult == 0 &&
                          p.k % mult == 0 && p.align_a == 16 && p.align_b == 16 && p.align_c == 16;
  p.b_type = r.a.type;
  p.c_input_type = p.c_type;
  p.bias_type = p.c_type;
  if (fp8) detail::plan_fp8(r, p);
  return p;
}

// What the cuBLASLt objects of a call depend on: the plan without its addresses. Two calls with
// equal keys can share one matmul descriptor, three layouts and the heuristic's algorithm (which
// the alignments make valid for every pointer with at least those alignments); only the bias
// pointer is set per call.
struct GemmPlanKey {
  GemmOp transa = GemmOp::N, transb = GemmOp::N;
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0, batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
  GemmType ab_type = GemmType::F32, c_type = GemmType::F32;
  GemmCompute compute = GemmCompute::F32;
  GemmEpilogue epilogue = GemmEpilogue::None;
  int align_a = 16, align_b = 16, align_c = 16;
  int64_t aux_ld = 0;
  GemmType b_type = GemmType::F32, c_input_type = GemmType::F32, bias_type = GemmType::F32;
  bool amax_d = false;  // the descriptor gets an amax pointer (the scale pointers are per call, as the bias)
  bool operator==(const GemmPlanKey&) const = default;
};

inline GemmPlanKey plan_key(const GemmPlan& p) {
  return {p.transa, p.transb, p.m,       p.n,       p.k,       p.lda,     p.ldb,      p.ldc,     p.batch,   p.stride_a,
          p.stride_b, p.stride_c, p.ab_type, p.c_type, p.compute, p.epilogue, p.align_a, p.align_b, p.align_c, p.aux_ld,
          p.b_type, p.c_input_type, p.bias_type, p.amax_d_address != 0};
}

struct GemmPlanKeyHash {
  std::size_t operator()(const GemmPlanKey& k) const {
    std::size_t h = 0;
    auto mix = [&h](uint64_t v) { h ^= std::hash<uint64_t>{}(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    for (int64_t v : {k.m, k.n, k.k, k.lda, k.ldb, k.ldc, k.batch, k.stride_a, k.stride_b, k.stride_c, k.aux_ld})
      mix(static_cast<uint64_t>(v));
    mix(static_cast<uint64_t>(k.transa) | static_cast<uint64_t>(k.transb) << 2 | static_cast<uint64_t>(k.ab_type) << 4 |
        static_cast<uint64_t>(k.c_type) << 6 | static_cast<uint64_t>(k.compute) << 8 | static_cast<uint64_t>(k.epilogue) << 10 |
        static_cast<uint64_t>(k.align_a) << 16 | static_cast<uint64_t>(k.align_b) << 24 | static_cast<uint64_t>(k.align_c) << 32);
    mix(static_cast<uint64_t>(k.b_type) | static_cast<uint64_t>(k.c_input_type) << 4 | static_cast<uint64_t>(k.bias_type) << 8 |
        static_cast<uint64_t>(k.amax_d) << 12);
    return h;
  }
};

// The request for out[batch..., M, N] = a[batch..., M, K] @ b[batch..., K, N] (+ bias [N]),
// where a and b already have out's batch dims (broadcast ones with stride 0) and out is
// contiguous. The batch dims of each operand must collapse to one stride; callers copy otherwise.
// aux (the GELU aux epilogues): a contiguous [M, N] matrix of out's dtype.
inline GemmRequest gemm_request(const Tensor& a, const Tensor& b, const Tensor& out, const Tensor& bias = Tensor(),
                                GemmEpilogue epilogue = GemmEpilogue::None, bool allow_tf32 = false, const Tensor& aux = Tensor()) {
  const char* op = "cuda gemm";
  MIXPREC_CHECK(a.dim() >= 2 && a.dim() == b.dim() && a.dim() == out.dim(), op, ": expected operands of equal rank >= 2, got ",
                a.sizes(), ", ", b.sizes(), " and ", out.sizes());
  MIXPREC_CHECK(out.is_contiguous(), op, ": the output must be contiguous, got strides ", out.strides());
  const int64_t nd = a.dim();
  GemmRequest r;
  r.M = a.size(-2);
  r.K = a.size(-1);
  r.N = b.size(-1);
  MIXPREC_CHECK(b.size(-2) == r.K && out.size(-2) == r.M && out.size(-1) == r.N, op, ": shapes ", a.sizes(), " @ ", b.sizes(),
                " -> ", out.sizes(), " do not match");
  auto batch_stride = [&](const Tensor& t, const char* name) -> int64_t {
    for (int64_t d = 0; d < nd - 2; ++d)
      MIXPREC_CHECK(t.size(d) == out.size(d), op, ": ", name, " batch dims ", t.sizes(), " differ from the output's ", out.sizes());
    const std::optional<int64_t> s = detail::collapsed_batch_stride(t, out.sizes());
    MIXPREC_CHECK(s.has_value(), op, ": ", name, " batch strides ", t.strides(), " for shape ", t.sizes(),
                  " do not collapse to one stride; copy it");
    return *s;
  };
  r.batch = 1;
  for (int64_t d = 0; d < nd - 2; ++d) r.batch *= out.size(d);
  auto operand = [&](const Tensor& t, const char* name) {
    GemmOperand o;
    o.address = reinterpret_cast<uintptr_t>(t.data_ptr());
    o.s0 = t.stride(-2);
    o.s1 = t.stride(-1);
    o.batch_stride = batch_stride(t, name);
    o.type = gemm_type_of(t.dtype(), op);
    return o;
  };
  r.a = operand(a, "a");
  r.b = operand(b, "b");
  r.c_address = reinterpret_cast<uintptr_t>(out.data_ptr());
  r.ldc = std::max<int64_t>(r.N, 1);
  r.c_batch_stride = r.M * r.N;
  r.c_type = gemm_type_of(out.dtype(), op);
  r.epilogue = epilogue;
  if (bias.defined()) {
    MIXPREC_CHECK(bias.dim() == 1 && bias.size(0) == r.N && bias.dtype() == out.dtype() && bias.is_contiguous(), op,
                  ": bias must be a contiguous [", r.N, "] tensor of the output dtype ", out.dtype(), ", got ", bias.sizes(), " ",
                  bias.dtype());
    r.bias_address = reinterpret_cast<uintptr_t>(bias.data_ptr());
  }
  if (aux.defined()) {
    MIXPREC_CHECK(aux.dim() == 2 && aux.size(0) == r.M && aux.size(1) == r.N && aux.dtype() == out.dtype() && aux.is_contiguous(), op,
                  ": aux must be a contiguous [", r.M, ", ", r.N, "] tensor of the output dtype ", out.dtype(), ", got ", aux.sizes(),
                  " ", aux.dtype());
    r.aux_address = reinterpret_cast<uintptr_t>(aux.data_ptr());
    r.aux_ld = std::max<int64_t>(r.N, 1);
  }
  r.allow_tf32 = allow_tf32;
  return r;
}

}  // namespace mixprec::gpu
