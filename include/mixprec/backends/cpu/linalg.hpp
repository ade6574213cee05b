#pragma once
// The CPU's matmul entry (DeviceKernels::matmul): the batched product behind matmul, mm, bmm,
// linear, every backward and the composed attention, on the raw GEMMs of gemm.hpp. Here, not in
// ops/linalg.hpp, so the op body holds its checks and autograd and reaches this through the CPU's
// kernel table like any other device's kernel. 16-bit inputs accumulate in float32 and round
// once on store; float64 stays float64.
#include <algorithm>

#include "mixprec/backends/cpu/gemm.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/ops/linalg.hpp"

namespace mixprec::cpu {

// a[..., M, K] @ b[..., K, N] with broadcast batch dims, any strides; a and b of one floating
// dtype (the op checked it). If `bias` is given it is broadcast into the output first and the
// product accumulated onto it (linear's fused bias).
inline Tensor matmul_kernel(Tensor a, Tensor b, const Tensor& bias) {
  namespace md = mixprec::detail;
  constexpr const char* op = "matmul";
  const DType out_dtype = a.dtype();
  const bool low = is_low_precision(out_dtype);
  // The AVX-512 kernel reads 16-bit operands itself; elsewhere they are widened to float32 here.
  const bool direct16 = low && gemm_16bit_available();
  if (low && !direct16) {
    a = md::as_dtype_raw(a, DType::Float32);
    b = md::as_dtype_raw(b, DType::Float32);
  }
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  const Shape ba(a.sizes().begin(), a.sizes().end() - 2), bb(b.sizes().begin(), b.sizes().end() - 2);
  const Shape batch = broadcast_shapes(ba, bb, op);
  Shape out_shape = batch;
  out_shape.push_back(M);
  out_shape.push_back(N);
  auto prep = [&](Tensor t, int64_t r, int64_t c) {
    if (!gemm_compatible(t.stride(-2), t.stride(-1), r, c)) t = t.contiguous();
    Shape s = batch;
    s.push_back(r);
    s.push_back(c);
    return md::expand_raw(t, s);
  };
  const int64_t nb = numel_of(batch);
  const bool acc = bias.defined();
  // One 16-bit product (linear): float32 accumulators for a block of rows at a time, in a scratch
  // that stays in cache, each tile rounded into the result as it finishes -- no float32 copy of
  // the whole result (its memory, and one more pass over it).
  if (direct16 && nb == 1 && M * N > 0 && (!acc || bias.dim() <= 1)) {
    Tensor out = empty(out_shape, out_dtype);
    const Tensor A = prep(a, M, K), B = prep(b, K, N);
    // <= 2 MiB of float32 (in L3, each thread's half near L2); B is packed again per block, so not smaller.
    const int64_t rows = std::min(M, std::max<int64_t>(48, (int64_t{1} << 19) / N));
    const Tensor scratch = empty({rows, N}, DType::Float32);
    const Tensor bias32 = acc ? md::as_dtype_raw(bias, DType::Float32) : Tensor();
    dispatch_floating(a.dtype(), op, [&]<class T>() {
      if constexpr (!std::is_same_v<T, acc_t<T>>) {
        for (int64_t r0 = 0; r0 < M; r0 += rows) {
          const Tensor c = scratch.narrow(0, 0, std::min(rows, M - r0));
          if (acc) md::copy_kernel(c, bias32);
          gemm_16bit<T>(A.data<T>() + r0 * A.stride(-2), A.stride(-2), A.stride(-1), B.data<T>(), B.stride(-2), B.stride(-1),
                        c.data<float>(), c.size(0), N, K, acc, out.data<T>() + r0 * N);
        }
      }
    });
    return out;
  }
  Tensor out = empty(out_shape, low ? DType::Float32 : a.dtype());
  if (acc) md::copy_kernel(out, md::as_dtype_raw(bias, out.dtype()));
  if (out.numel() == 0) return low ? md::as_dtype_raw(out, out_dtype) : out;
  const Tensor A = prep(a, M, K), B = prep(b, K, N);
  dispatch_floating(a.dtype(), op, [&]<class T>() {
    const T* pa = A.data<T>();
    const T* pb = B.data<T>();
    acc_t<T>* pc = out.data<acc_t<T>>();
    const int64_t nd = static_cast<int64_t>(batch.size());
    auto batch_offsets = [&](int64_t i, int64_t& oa, int64_t& ob) {
      oa = ob = 0;
      for (int64_t d = nd - 1; d >= 0; --d) {
        const int64_t ix = i % batch[d];
        i /= batch[d];
        oa += ix * A.stride(d);
        ob += ix * B.stride(d);
      }
    };
    auto one = [&](int64_t i) {
      int64_t oa, ob;
      batch_offsets(i, oa, ob);
      if constexpr (std::is_same_v<T, acc_t<T>>)
        gemm<T>(pa + oa, A.stride(-2), A.stride(-1), pb + ob, B.stride(-2), B.stride(-1), pc + i * M * N, M, N, K, acc);
      else
        gemm_16bit<T>(pa + oa, A.stride(-2), A.stride(-1), pb + ob, B.stride(-2), B.stride(-1), pc + i * M * N, M, N, K, acc);
    };
    // Small matrices (attention heads): one matrix per thread. Large: the GEMM threads inside.
    if (nb > 1 && M * N * K < (int64_t{1} << 21)) {
      parallel_for(0, nb, 1, [&](int64_t b0, int64_t e0) {
        for (int64_t i = b0; i < e0; ++i) one(i);
      });
    } else {
      for (int64_t i = 0; i < nb; ++i) one(i);
    }
  });
  return low ? md::as_dtype_raw(out, out_dtype) : out;
}

// linear_gelu / linear_dgelu stay null on the CPU: its GEMMs have no epilogue to fuse the GELU
// into, so mlp_gelu_tanh composes linear, gelu and linear there (each op's own autocast policy).
inline void fill_linalg_kernels(DeviceKernels& t) {
  t.matmul = [](const Tensor& a, const Tensor& b, const Tensor& bias) { return matmul_kernel(a, b, bias); };
}

}  // namespace mixprec::cpu
