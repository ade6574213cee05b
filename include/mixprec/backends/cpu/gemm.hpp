#pragma once
// Dense GEMM on the CPU. float32 takes the packed AVX-512 kernel (gemm_avx512.hpp) when the CPU
// has it: the library is compiled without -march, so Eigen's kernels are SSE2-only, 3-4x
// slower (benchmarks/NOTES.md). double, and CPUs without AVX-512, use Eigen.
// 16-bit inputs go to gemm_16bit, which reads them directly (bfloat16 with vdpbf16ps where the
// CPU has avx512_bf16: as fast per instruction as a float32 FMA there, so twice the flops).
#include <Eigen/Core>

#include "mixprec/backends/cpu/gemm_avx512.hpp"
#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::cpu {

// True when gemm_16bit() can run: otherwise widen 16-bit operands to float32 and call gemm().
inline bool gemm_16bit_available() {
#if defined(MIXPREC_X86_SIMD)
  return avx512::available();
#else
  return false;
#endif
}

namespace detail {
// C[M, N] = the row vector bias in every row: the addend, where a kernel cannot add it itself.
template <class T>
void fill_rows(T* c, const T* bias, int64_t M, int64_t N) {
  for (int64_t i = 0; i < M; ++i) std::copy(bias, bias + N, c + i * N);
}
}  // namespace detail

// C[M,N] (row-major, contiguous) (+)= A[M,K] * B[K,N]; A and B are strided with one unit stride.
// epi (float only, and only where gemm_16bit_available(): the AVX-512 kernel's tile hook) runs on
// each finished tile of C. bias (optional, N values, not with accumulate): C = bias + A B, with the
// bits of filling C with bias and accumulating onto it.
template <class T>
void gemm(const T* a, int64_t as0, int64_t as1, const T* b, int64_t bs0, int64_t bs1, T* c, int64_t M, int64_t N, int64_t K,
          bool accumulate, const avx512::TileEpilogue* epi = nullptr, const T* bias = nullptr) {
  MIXPREC_CHECK(!epi || (std::is_same_v<T, float> && K > 0 && gemm_16bit_available()), "gemm: a tile epilogue needs float32 on the AVX-512 kernel");
  MIXPREC_CHECK(!bias || !accumulate, "gemm: a bias is the addend; it cannot be combined with accumulate");
  using RM = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CM = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  using OS = Eigen::OuterStride<>;
  Eigen::Map<RM> C(c, M, N);
#if defined(MIXPREC_X86_SIMD)
  if constexpr (std::is_same_v<T, float>) {
    if (avx512::available() && K > 0) return avx512::gemm<float>({a, as0, as1}, {b, bs0, bs1}, c, N, M, N, K, accumulate, nullptr, epi, bias);
  }
#endif
  if (bias) {  // elsewhere the addend is written first
    detail::fill_rows(c, bias, M, N);
    accumulate = true;
  }
  if (K == 0) {
    if (!accumulate) C.setZero();
    return;
  }
  auto with = [](const T* p, int64_t s0, int64_t s1, int64_t r, int64_t cdim, auto&& f) {
    if (s1 == 1) f(Eigen::Map<const RM, 0, OS>(p, r, cdim, OS(std::max<int64_t>(s0, cdim))));
    else f(Eigen::Map<const CM, 0, OS>(p, r, cdim, OS(std::max<int64_t>(s1, r))));
  };
  with(a, as0, as1, M, K, [&](const auto& A) {
    with(b, bs0, bs1, K, N, [&](const auto& B) {
      if (accumulate) C.noalias() += A * B;
      else C.noalias() = A * B;
    });
  });
}

// C[M,N] float32 (row-major, contiguous) (+)= A[M,K] * B[K,N] for bfloat16 or half A and B,
// accumulated in float32. With round_to ([M,N], optional) the result goes there rounded to T,
// straight from the microkernels' registers, and C is only the float32 scratch between K blocks
// (its contents afterwards unspecified; with accumulate it is still read as the addend).
// epi (optional, with round_to and K > 0) runs on each finished tile of round_to. bias (optional,
// N floats, not with accumulate): the float32 result is bias + A B, as gemm's.
// Requires gemm_16bit_available().
template <class T>
void gemm_16bit(const T* a, int64_t as0, int64_t as1, const T* b, int64_t bs0, int64_t bs1, float* c, int64_t M, int64_t N,
                int64_t K, bool accumulate, T* round_to = nullptr, const avx512::TileEpilogue* epi = nullptr, const float* bias = nullptr) {
  static_assert(std::is_same_v<T, bfloat16> || std::is_same_v<T, half>);
  MIXPREC_CHECK(gemm_16bit_available(), "gemm_16bit: needs an AVX-512 CPU (widen to float32 and call gemm instead)");
  MIXPREC_CHECK(!epi || (round_to && K > 0), "gemm_16bit: a tile epilogue needs round_to and K > 0");
  MIXPREC_CHECK(!bias || !accumulate, "gemm_16bit: a bias is the addend; it cannot be combined with accumulate");
  if (K == 0) {
    if (bias) detail::fill_rows(c, bias, M, N);
    else if (!accumulate) std::fill(c, c + M * N, 0.0f);
    if (round_to) convert(c, round_to, M * N);
    return;
  }
#if defined(MIXPREC_X86_SIMD)
  if constexpr (std::is_same_v<T, bfloat16>) {
    if (avx512::bf16_dot_available())
      return avx512::gemm_dpbf16({a, as0, as1}, {b, bs0, bs1}, c, N, M, N, K, accumulate, round_to, epi, bias);
  }
  avx512::gemm<T>({a, as0, as1}, {b, bs0, bs1}, c, N, M, N, K, accumulate, round_to, epi, bias);
#endif
}

// True when a 2-D view with these strides can be handed to gemm() without a copy.
inline bool gemm_compatible(int64_t s0, int64_t s1, int64_t rows, int64_t cols) {
  return (s1 == 1 && (s0 >= cols || rows <= 1)) || (s0 == 1 && (s1 >= rows || cols <= 1));
}

}  // namespace mixprec::cpu
