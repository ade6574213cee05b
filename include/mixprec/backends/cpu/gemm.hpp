#pragma once
// Dense GEMM on the CPU through Eigen (its blocked kernels use AVX-512 and OpenMP). 16-bit
// inputs are widened to float32 panels first: on CPUs without native 16-bit FMA throughput
// the float32 kernel is the fastest path, and the O(n^2) conversion is noise next to O(n^3).
#include <Eigen/Core>

#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::cpu {

// C[M,N] (row-major, contiguous) (+)= A[M,K] * B[K,N]; A and B are strided with one unit stride.
template <class T>
void gemm(const T* a, int64_t as0, int64_t as1, const T* b, int64_t bs0, int64_t bs1, T* c, int64_t M, int64_t N, int64_t K,
          bool accumulate) {
  using RM = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CM = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  using OS = Eigen::OuterStride<>;
  Eigen::Map<RM> C(c, M, N);
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

// True when a 2-D view with these strides can be handed to gemm() without a copy.
inline bool gemm_compatible(int64_t s0, int64_t s1, int64_t rows, int64_t cols) {
  return (s1 == 1 && (s0 >= cols || rows <= 1)) || (s0 == 1 && (s1 >= rows || cols <= 1));
}

}  // namespace mixprec::cpu
