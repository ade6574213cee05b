#pragma once
// Fused scaled-dot-product attention (FlashAttention-2 style): softmax(q k^T * scale) v and its
// gradients without ever holding the [L, S] scores, which at GPT size cost more memory traffic
// than everything else in the step.
//   forward:  a block takes R query rows, walks the key tiles with an online softmax (running
//             max and sum in float32) and writes O and the row logsumexp (float32).
//   backward: D = rowsum(dO * O); a block takes R key rows, walks the query tiles, recomputes P
//             from the logsumexp, and accumulates dV = P^T dO and dK = dS^T Q * scale in shared
//             memory; dQ = dS K * scale goes out through float32 atomics.
// Each warp owns 16 rows of the block, so the softmax and every product but dQ are warp-local:
// the block synchronises only around tile loads. Products run on tensor cores (wmma 16x16x16,
// float32 accumulation) for float16/bfloat16, and as float32 FMAs for float32. Causal masking
// and dropout (ops/attention.hpp's counter-based rule: the CPU's very draws) happen in the
// kernel; key tiles above the diagonal are never visited.
// defines: gpu::sdpa_forward, gpu::sdpa_backward
#include <mma.h>

#include <cmath>

#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/ops/attention.hpp"

namespace mixprec::gpu {

namespace attn {
namespace wm = nvcuda::wmma;

inline constexpr int kMaxBatchDims = 4;  // more are collapsed by a contiguous copy
inline constexpr int kMaxHeadDim = 128;

// Rows per block (queries in forward, keys in backward; the other tile has as many): 64 on four
// warps where the tiles are small, else 32 on two, so that every variant's shared memory fits
// an A100's 163 KB.
template <class T, int D>
inline constexpr int kWarps = std::is_same_v<T, float> || D > 64 ? 2 : 4;
template <class T, int D>
inline constexpr int kRows = 16 * kWarps<T, D>;
template <class T>
inline constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load

template <class T>
using wmma_type = std::conditional_t<std::is_same_v<T, half>, __half, __nv_bfloat16>;

// Batch dims (shared by q, k, v, outermost first) and each operand's strides.
struct BatchShape {
  int nd = 0;
  int64_t size[kMaxBatchDims] = {};
};
struct Operand {
  int64_t batch_stride[kMaxBatchDims] = {};
  int64_t row_stride = 0;
};
__device__ __forceinline__ int64_t batch_offset(const BatchShape& s, const Operand& o, int64_t b) {
  int64_t off = 0;
  for (int d = s.nd - 1; d >= 0; --d) {
    off += (b % s.size[d]) * o.batch_stride[d];
    b /= s.size[d];
  }
  return off;
}

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint64_t threshold = 0;  // keep where (hash >> 11) >= threshold: detail::sdpa_dropout_keep exactly
  float keep_scale = 1;
  __device__ __forceinline__ bool keep(int64_t b, int64_t L, int64_t S, int64_t i, int64_t j) const {
    return (mixprec::detail::sdpa_hash(seed, static_cast<uint64_t>((b * L + i) * S + j)) >> 11) >= threshold;
  }
};

template <class T>
struct Params {
  const T *q, *k, *v;
  Operand oq, ok, ov;
  BatchShape batch;
  int64_t B, L, S;
  int E;
  float scale;
  bool causal;
  Dropout drop;
  // forward: out [B, L, E], lse [B, L]; backward: also dout [B, L, E] and delta [B, L] in,
  // dq (float32), dk, dv out. All contiguous.
  T* out;
  float* lse;
  const T* dout;
  const float* delta;
  float* dq;
  T *dk, *dv;
};

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// R rows of E values into a shared [R, D + kVec] tile by 16-byte vectors; rows past `valid` and
// columns past E are zeros, so tails and a head dim below D add nothing to any product.
template <class T, int D, int R>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int64_t row_stride, int64_t valid, int E) {
  constexpr int V = kVec<T>, LD = D + V, per_row = D / V;
  for (int t = threadIdx.x; t < R * per_row; t += blockDim.x) {
    const int r = t / per_row, c = (t % per_row) * V;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (r < valid && c < E) x = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
    *reinterpret_cast<uint4*>(dst + r * LD + c) = x;
  }
}

// One warp: c[16, N] (float32, row-major, ldc) = (accumulate ? c : 0) + a[16, K] b[K, N], all in
// shared memory. a is row-major (element (r, k) at a[r lda + k]) or, with !ARow, column-major
// (a[k lda + r]); b is row-major (b[k ldb + n]) or, with !BRow, column-major (b[n ldb + k]).
template <class T, bool ARow, bool BRow, int K, int N>
__device__ __forceinline__ void warp_gemm(float* c, int ldc, const T* a, int lda, const T* b, int ldb, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    const int lane = threadIdx.x % 32;
    for (int o = lane; o < 16 * N; o += 32) {
      const int r = o / N, n = o % N;
      float s = accumulate ? c[r * ldc + n] : 0.0f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) s = fmaf(ARow ? a[r * lda + k] : a[k * lda + r], BRow ? b[k * ldb + n] : b[n * ldb + k], s);
      c[r * ldc + n] = s;
    }
  } else {
    using W = wmma_type<T>;
    using LA = std::conditional_t<ARow, wm::row_major, wm::col_major>;
    using LB = std::conditional_t<BRow, wm::row_major, wm::col_major>;
    const W* aw = reinterpret_cast<const W*>(a);
    const W* bw = reinterpret_cast<const W*>(b);
    wm::fragment<wm::matrix_a, 16, 16, 16, W, LA> fa;
    wm::fragment<wm::matrix_b, 16, 16, 16, W, LB> fb;
    wm::fragment<wm::accumulator, 16, 16, 16, float> fc;
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 16) {
      if (accumulate) wm::load_matrix_sync(fc, c + n0, ldc, wm::mem_row_major);
      else wm::fill_fragment(fc, 0.0f);
#pragma unroll
      for (int k0 = 0; k0 < K; k0 += 16) {
        wm::load_matrix_sync(fa, ARow ? aw + k0 : aw + k0 * lda, lda);
        wm::load_matrix_sync(fb, BRow ? bw + k0 * ldb + n0 : bw + n0 * ldb + k0, ldb);
        wm::mma_sync(fc, fa, fb, fc);
      }
      wm::store_matrix_sync(c + n0, fc, ldc, wm::mem_row_major);
    }
  }
}

// Shared memory carve-ups; every piece starts on a 32-byte boundary (wmma's requirement), as
// R is 32 or 64 and each leading dimension keeps rows 16-byte aligned.
template <class T, int D>
struct FwdSmem {
  static constexpr int R = kRows<T, D>, LDT = D + kVec<T>, LDS = R + 4, LDO = D + 4, LDP = R + kVec<T>;
  static constexpr std::size_t q = 0, k = q + sizeof(T) * R * LDT, v = k + sizeof(T) * R * LDT, s = v + sizeof(T) * R * LDT,
                               o = s + sizeof(float) * R * LDS, m = o + sizeof(float) * R * LDO, l = m + sizeof(float) * R,
                               p = l + sizeof(float) * R, bytes = p + sizeof(T) * R * LDP;
};
template <class T, int D>
struct BwdSmem {
  static constexpr int R = kRows<T, D>, LDT = D + kVec<T>, LDF = (2 * R > D ? 2 * R : D) + 4, LDA = D + 4, LDP = R + kVec<T>;
  static constexpr std::size_t k = 0, v = k + sizeof(T) * R * LDT, q = v + sizeof(T) * R * LDT, dout = q + sizeof(T) * R * LDT,
                               f = dout + sizeof(T) * R * LDT, dk = f + sizeof(float) * R * LDF, dv = dk + sizeof(float) * R * LDA,
                               lse = dv + sizeof(float) * R * LDA, delta = lse + sizeof(float) * R, p = delta + sizeof(float) * R,
                               bytes = p + sizeof(T) * R * LDP;
};

// grid (B, query tiles), 32 * kWarps threads.
template <class T, int D>
__global__ void __launch_bounds__(32 * kWarps<T, D>) forward_kernel(Params<T> p) {
  using M = FwdSmem<T, D>;
  constexpr int R = M::R;
  constexpr float kInf = INFINITY;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + M::q);
  T* ks = reinterpret_cast<T*>(smem + M::k);
  T* vs = reinterpret_cast<T*>(smem + M::v);
  float* ss = reinterpret_cast<float*>(smem + M::s);
  float* os = reinterpret_cast<float*>(smem + M::o);
  float* ms = reinterpret_cast<float*>(smem + M::m);
  float* ls = reinterpret_cast<float*>(smem + M::l);
  [[maybe_unused]] T* ps = reinterpret_cast<T*>(smem + M::p);  // 16-bit only: float32 multiplies ss

  const int64_t b = blockIdx.x, i0 = static_cast<int64_t>(blockIdx.y) * R, L = p.L, S = p.S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;
  const int64_t nq = std::min<int64_t>(R, L - i0);
  const T* k = p.k + batch_offset(p.batch, p.ok, b);
  const T* v = p.v + batch_offset(p.batch, p.ov, b);
  load_tile<T, D, R>(qs, p.q + batch_offset(p.batch, p.oq, b) + i0 * p.oq.row_stride, p.oq.row_stride, nq, p.E);
  for (int t = threadIdx.x; t < R * M::LDO; t += blockDim.x) os[t] = 0.0f;
  for (int t = threadIdx.x; t < R; t += blockDim.x) {
    ms[t] = -kInf;
    ls[t] = 0.0f;
  }
  const int64_t kend = p.causal ? std::min<int64_t>(S, i0 + nq) : S;  // keys past the block's last row are all masked
  for (int64_t j0 = 0; j0 < kend; j0 += R) {
    __syncthreads();  // every warp is done with the previous K and V tiles
    load_tile<T, D, R>(ks, k + j0 * p.ok.row_stride, p.ok.row_stride, S - j0, p.E);
    load_tile<T, D, R>(vs, v + j0 * p.ov.row_stride, p.ov.row_stride, S - j0, p.E);
    __syncthreads();
    warp_gemm<T, true, false, D, R>(ss + r0 * M::LDS, M::LDS, qs + r0 * M::LDT, M::LDT, ks, M::LDT, false);  // Q K^T
    __syncwarp();
    for (int r = 0; r < 16; ++r) {
      const int row = r0 + r;
      const int64_t i = i0 + row;
      float* srow = ss + row * M::LDS;
      float mx = -kInf;
      for (int c = lane; c < R; c += 32) {
        const int64_t j = j0 + c;
        const float x = i < L && j < S && (!p.causal || j <= i) ? srow[c] * p.scale : -kInf;
        srow[c] = x;
        mx = fmaxf(mx, x);
      }
      const float m_old = ms[row], m_new = fmaxf(m_old, warp_max(mx));
      float alpha = 1.0f, sum = 0.0f;
      if (m_new == -kInf) {  // nothing live in this row yet: contributes nothing
        for (int c = lane; c < R; c += 32) srow[c] = 0.0f;
      } else {
        alpha = expf(m_old - m_new);
        for (int c = lane; c < R; c += 32) {
          float e = expf(srow[c] - m_new);
          sum += e;  // the normaliser counts dropped keys too, as on the CPU
          if (p.drop.on) e = p.drop.keep(b, L, S, i, j0 + c) ? e * p.drop.keep_scale : 0.0f;
          srow[c] = e;
        }
        sum = warp_sum(sum);
      }
      if constexpr (!std::is_same_v<T, float>)
        for (int c = lane; c < R; c += 32) ps[row * M::LDP + c] = T(srow[c]);  // rounded for the tensor cores
      if (alpha != 1.0f)
        for (int c = lane; c < D; c += 32) os[row * M::LDO + c] *= alpha;
      __syncwarp();  // every lane has read ms[row]
      if (lane == 0) {
        ms[row] = m_new;
        ls[row] = ls[row] * alpha + sum;
      }
    }
    __syncwarp();
    if constexpr (std::is_same_v<T, float>)
      warp_gemm<float, true, true, R, D>(os + r0 * M::LDO, M::LDO, ss + r0 * M::LDS, M::LDS, vs, M::LDT, true);  // O += P V
    else
      warp_gemm<T, true, true, R, D>(os + r0 * M::LDO, M::LDO, ps + r0 * M::LDP, M::LDP, vs, M::LDT, true);
    __syncwarp();
  }
  __syncthreads();  // with no key tile at all, the initialisation above came from other warps
  for (int r = 0; r < 16; ++r) {
    const int row = r0 + r;
    const int64_t i = i0 + row;
    if (i >= L) break;
    const float l = ls[row], inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* out = p.out + (b * L + i) * p.E;
    for (int c = lane; c < p.E; c += 32) out[c] = T(os[row * M::LDO + c] * inv);
    // A row with no key attends to nothing: output 0, and lse = +inf makes backward's P 0.
    if (lane == 0) p.lse[b * L + i] = l > 0.0f ? ms[row] + logf(l) : kInf;
  }
}

// delta[row] = sum over E of dout * out, in float32: one warp per row.
template <class T>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta, int64_t rows, int E) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  float s = 0.0f;
  for (int c = lane; c < E; c += 32) s = fmaf(static_cast<float>(dout[row * E + c]), static_cast<float>(out[row * E + c]), s);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// grid (B, key tiles), 32 * kWarps threads. dq must hold zeros.
template <class T, int D>
__global__ void __launch_bounds__(32 * kWarps<T, D>) backward_kernel(Params<T> p) {
  using M = BwdSmem<T, D>;
  constexpr int R = M::R;
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem + M::k);
  T* vs = reinterpret_cast<T*>(smem + M::v);
  T* qs = reinterpret_cast<T*>(smem + M::q);
  T* dos = reinterpret_cast<T*>(smem + M::dout);
  float* fs = reinterpret_cast<float*>(smem + M::f);  // [R, LDF]: S^T | dP^T side by side, then dQ's part
  float* dks = reinterpret_cast<float*>(smem + M::dk);
  float* dvs = reinterpret_cast<float*>(smem + M::dv);
  float* lses = reinterpret_cast<float*>(smem + M::lse);
  float* deltas = reinterpret_cast<float*>(smem + M::delta);
  T* pts = reinterpret_cast<T*>(smem + M::p);  // P^T (dropped) for dV, then dS^T for dK and dQ

  const int64_t b = blockIdx.x, j0 = static_cast<int64_t>(blockIdx.y) * R, L = p.L, S = p.S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;
  const T* q = p.q + batch_offset(p.batch, p.oq, b);
  load_tile<T, D, R>(ks, p.k + batch_offset(p.batch, p.ok, b) + j0 * p.ok.row_stride, p.ok.row_stride, S - j0, p.E);
  load_tile<T, D, R>(vs, p.v + batch_offset(p.batch, p.ov, b) + j0 * p.ov.row_stride, p.ov.row_stride, S - j0, p.E);
  for (int t = threadIdx.x; t < R * M::LDA; t += blockDim.x) dks[t] = dvs[t] = 0.0f;
  // Causal: queries above this key tile see none of it (R is the query tile too).
  for (int64_t i0 = p.causal ? j0 : 0; i0 < L; i0 += R) {
    __syncthreads();  // the previous tiles are no longer read
    load_tile<T, D, R>(qs, q + i0 * p.oq.row_stride, p.oq.row_stride, L - i0, p.E);
    load_tile<T, D, R>(dos, p.dout + (b * L + i0) * p.E, p.E, L - i0, p.E);
    for (int t = threadIdx.x; t < R; t += blockDim.x) {
      const bool in = i0 + t < L;
      lses[t] = in ? p.lse[b * L + i0 + t] : INFINITY;
      deltas[t] = in ? p.delta[b * L + i0 + t] : 0.0f;
    }
    __syncthreads();
    warp_gemm<T, true, false, D, R>(fs + r0 * M::LDF, M::LDF, ks + r0 * M::LDT, M::LDT, qs, M::LDT, false);       // S^T = K Q^T
    warp_gemm<T, true, false, D, R>(fs + r0 * M::LDF + R, M::LDF, vs + r0 * M::LDT, M::LDT, dos, M::LDT, false);  // dP^T = V dO^T
    __syncwarp();
    for (int r = 0; r < 16; ++r) {
      const int row = r0 + r;
      const int64_t j = j0 + row;
      float* f = fs + row * M::LDF;
      for (int c = lane; c < R; c += 32) {
        const int64_t i = i0 + c;
        const bool live = j < S && i < L && (!p.causal || j <= i);
        const float pr = live ? expf(f[c] * p.scale - lses[c]) : 0.0f;
        float pd = pr, dp = f[R + c];
        if (p.drop.on && live) {
          const bool kept = p.drop.keep(b, L, S, i, j);
          pd = kept ? pr * p.drop.keep_scale : 0.0f;
          dp = kept ? dp * p.drop.keep_scale : 0.0f;
        }
        pts[row * M::LDP + c] = T(pd);
        f[c] = pr * (dp - deltas[c]);  // dS^T, float32 until the dV product has read pts
      }
    }
    __syncwarp();
    warp_gemm<T, true, true, R, D>(dvs + r0 * M::LDA, M::LDA, pts + r0 * M::LDP, M::LDP, dos, M::LDT, true);  // dV += P^T dO
    __syncwarp();
    for (int r = 0; r < 16; ++r)
      for (int c = lane; c < R; c += 32) pts[(r0 + r) * M::LDP + c] = T(fs[(r0 + r) * M::LDF + c]);
    __syncwarp();
    warp_gemm<T, true, true, R, D>(dks + r0 * M::LDA, M::LDA, pts + r0 * M::LDP, M::LDP, qs, M::LDT, true);  // dK += dS^T Q
    __syncthreads();  // all of dS^T is written and fs is free
    // dQ rows r0..r0+16 of this query tile: dS K, with dS = (dS^T)^T read column-major.
    warp_gemm<T, false, true, R, D>(fs + r0 * M::LDF, M::LDF, pts + r0, M::LDP, ks, M::LDT, false);
    __syncwarp();
    for (int r = 0; r < 16; ++r) {
      const int64_t i = i0 + r0 + r;
      if (i >= L) break;
      float* dq = p.dq + (b * L + i) * p.E;
      for (int c = lane; c < p.E; c += 32) atomicAdd(dq + c, fs[(r0 + r) * M::LDF + c] * p.scale);
    }
  }
  __syncthreads();  // with no query tile at all, the zeros above came from other warps
  for (int r = 0; r < 16; ++r) {
    const int64_t j = j0 + r0 + r;
    if (j >= S) break;
    T* dk = p.dk + (b * S + j) * p.E;
    T* dv = p.dv + (b * S + j) * p.E;
    for (int c = lane; c < p.E; c += 32) {
      dk[c] = T(dks[(r0 + r) * M::LDA + c] * p.scale);
      dv[c] = T(dvs[(r0 + r) * M::LDA + c]);
    }
  }
}

// Every kernel variant may use more than the default 48 KB of shared memory; prefer the largest
// carve-out, so that two 115 KB backward blocks share an H100/H200 SM.
template <class Kernel>
void allow_shared_memory(Kernel kernel, std::size_t bytes, const char* op) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), op);
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared), op);
}

inline void zero(const Tensor& t, const char* op) {
  if (t.numel() > 0) check(cudaMemsetAsync(t.data_ptr(), 0, static_cast<std::size_t>(t.nbytes()), current_stream()), op);
}

// A contiguous tensor starting on a 16-byte boundary (the kernels load rows as 16-byte vectors).
inline Tensor packed(const Tensor& t, const char* op) {
  Tensor c = contiguous(t);
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0) return c;
  Tensor out = empty(c.sizes(), c.dtype(), Device::CUDA);
  check(cudaMemcpyAsync(out.data_ptr(), c.data_ptr(), static_cast<std::size_t>(c.nbytes()), cudaMemcpyDeviceToDevice, current_stream()), op);
  return out;
}

// Operand layout for the kernels: unit stride along E and 16-byte aligned rows and batches,
// else a contiguous copy (as is a tensor with more batch dims than the kernels take).
inline Tensor usable(const Tensor& t, int64_t batch_dims, const char* op) {
  const int64_t vec = 16 / t.element_size();
  bool ok = batch_dims <= kMaxBatchDims && t.stride(-1) == 1 && t.stride(-2) % vec == 0 &&
            reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d < batch_dims; ++d) ok = t.stride(d) % vec == 0;
  return ok ? t : packed(t, op);
}

// Checks shared by both directions; returns the batch shape (q's leading dims).
inline Shape check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const Tensor* t : {&q, &k, &v}) require_cuda_tensor(op, *t);
  MIXPREC_CHECK(q.dim() >= 2 && q.dim() == k.dim() && q.dim() == v.dim(), op, ": query ", q.sizes(), ", key ", k.sizes(),
                " and value ", v.sizes(), " need one rank of at least 2");
  MIXPREC_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype() &&
                    (q.dtype() == DType::Float32 || q.dtype() == DType::Float16 || q.dtype() == DType::BFloat16),
                op, ": query, key and value must share float32, float16 or bfloat16, got ", q.dtype(), ", ", k.dtype(), " and ",
                v.dtype());
  const Shape batch(q.sizes().begin(), q.sizes().end() - 2);
  const int64_t E = q.size(-1);
  MIXPREC_CHECK(Shape(k.sizes().begin(), k.sizes().end() - 2) == batch && Shape(v.sizes().begin(), v.sizes().end() - 2) == batch &&
                    k.size(-1) == E && v.size(-1) == E && v.size(-2) == k.size(-2),
                op, ": expected query [..., L, E], key and value [..., S, E] with one batch shape, got ", q.sizes(), ", ",
                k.sizes(), " and ", v.sizes());
  MIXPREC_CHECK(E > 0 && E % 8 == 0 && E <= kMaxHeadDim, op, ": the fused kernels take a head dim that is a multiple of 8 up to ",
                kMaxHeadDim, ", got ", E, " (query ", q.sizes(), ")");
  return batch;
}

template <class T>
Params<T> make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Shape& batch, bool causal, double scale,
                      double dropout_p, uint64_t seed) {
  Params<T> p{};
  p.q = q.data<T>();
  p.k = k.data<T>();
  p.v = v.data<T>();
  p.batch.nd = static_cast<int>(batch.size());
  for (int d = 0; d < p.batch.nd; ++d) p.batch.size[d] = batch[static_cast<std::size_t>(d)];
  for (auto [t, o] : {std::pair{&q, &p.oq}, std::pair{&k, &p.ok}, std::pair{&v, &p.ov}}) {
    for (int d = 0; d < p.batch.nd; ++d) o->batch_stride[d] = t->stride(d);
    o->row_stride = t->stride(-2);
  }
  p.B = numel_of(batch);
  p.L = q.size(-2);
  p.S = k.size(-2);
  p.E = static_cast<int>(q.size(-1));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.drop.on = dropout_p > 0;
  p.drop.seed = seed;
  p.drop.threshold = mixprec::detail::sdpa_dropout_threshold(dropout_p);
  p.drop.keep_scale = dropout_p < 1 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.0f;
  return p;
}

// f.template operator()<D>() for the smallest compiled head-dim tile that holds E.
template <class F>
void dispatch_head_dim(int64_t E, F&& f) {
  if (E <= 64) f.template operator()<64>();
  else f.template operator()<128>();
}
}  // namespace attn

// softmax(q k^T * scale) v with q [batch..., L, E], k and v [batch..., S, E] on one batch shape
// (broadcast dims may have stride 0), float32/float16/bfloat16, E a multiple of 8 up to 128.
// causal keeps key j for query i when j <= i; dropout_p > 0 drops as the CPU's
// detail::sdpa_dropout_keep(seed, (b L + i) S + j, p). Returns {out [batch..., L, E] in q's
// dtype, logsumexp float32 [batch..., L]} (+inf for a row with no key).
inline std::array<Tensor, 2> sdpa_forward(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal, double scale,
                                          double dropout_p, uint64_t seed) {
  const char* op = "gpu::sdpa_forward";
  Shape batch = attn::check_inputs(op, q_in, k_in, v_in);
  const int64_t L = q_in.size(-2), S = k_in.size(-2), E = q_in.size(-1), B = numel_of(batch);
  Shape out_shape = batch, lse_shape = batch;
  out_shape.insert(out_shape.end(), {L, E});
  lse_shape.push_back(L);
  Tensor out = empty(out_shape, q_in.dtype(), Device::CUDA);
  Tensor lse = empty(lse_shape, DType::Float32, Device::CUDA);
  if (B * L == 0) return {out, lse};  // (no keys, S = 0, runs: every row gets 0 and lse +inf)
  const int64_t nb = static_cast<int64_t>(batch.size());
  Tensor q = attn::usable(q_in, nb, op), k = attn::usable(k_in, nb, op), v = attn::usable(v_in, nb, op);
  if (nb > attn::kMaxBatchDims) {  // contiguous now: one batch dim
    batch = {B};
    q = q.view({B, L, E});
    k = k.view({B, S, E});
    v = v.view({B, S, E});
  }
  dispatch_storage(q.dtype(), op, [&]<class T>() {
    attn::Params<T> p = attn::make_params<T>(q, k, v, batch, causal, scale, dropout_p, seed);
    p.out = out.data<T>();
    p.lse = lse.data<float>();
    attn::dispatch_head_dim(E, [&]<int D>() {
      constexpr int R = attn::kRows<T, D>;
      const int64_t tiles = (L + R - 1) / R;
      MIXPREC_CHECK(B <= INT32_MAX && tiles <= 65535, op, ": query ", q_in.sizes(), " exceeds the launch grid (at most 65535 tiles of rows, 2^31 batch entries)");
      const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(tiles));
      const std::size_t smem = attn::FwdSmem<T, D>::bytes;
      attn::allow_shared_memory(attn::forward_kernel<T, D>, smem, op);
      attn::forward_kernel<T, D><<<grid, 32 * attn::kWarps<T, D>, smem, current_stream()>>>(p);
    });
  });
  check_launch(op);
  return {out, lse};
}

// Gradients of sdpa_forward from its out and logsumexp, with the forward's own arguments:
// {dq, dk, dv} in q's dtype and shapes (batch dims full, not reduced over broadcasts).
inline std::array<Tensor, 3> sdpa_backward(const Tensor& grad, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                           const Tensor& out_in, const Tensor& lse_in, bool causal, double scale, double dropout_p,
                                           uint64_t seed) {
  const char* op = "gpu::sdpa_backward";
  Shape batch = attn::check_inputs(op, q_in, k_in, v_in);
  const int64_t L = q_in.size(-2), S = k_in.size(-2), E = q_in.size(-1), B = numel_of(batch);
  Shape out_shape = batch;
  out_shape.insert(out_shape.end(), {L, E});
  for (const Tensor* t : {&grad, &out_in}) {
    require_cuda_tensor(op, *t);
    MIXPREC_CHECK(t->sizes() == out_shape && t->dtype() == q_in.dtype(), op, ": expected grad and out of ", q_in.dtype(), " ",
                  out_shape, ", got ", t->dtype(), " ", t->sizes());
  }
  require_cuda_tensor(op, lse_in);
  MIXPREC_CHECK(lse_in.dtype() == DType::Float32 && lse_in.numel() == B * L, op, ": expected a float32 logsumexp of ", B * L,
                " rows, got ", lse_in.dtype(), " ", lse_in.sizes());
  const DType dt = q_in.dtype();
  Tensor dq32 = empty(out_shape, DType::Float32, Device::CUDA);
  attn::zero(dq32, op);
  Shape kv_shape = batch;
  kv_shape.insert(kv_shape.end(), {S, E});
  Tensor dk = empty(kv_shape, dt, Device::CUDA), dv = empty(kv_shape, dt, Device::CUDA);
  auto result = [&]() -> std::array<Tensor, 3> { return {dt == DType::Float32 ? dq32 : contiguous(dq32, dt), dk, dv}; };
  if (B * S == 0 || L == 0) {  // nothing attended, or nobody attending: zero gradients
    attn::zero(dk, op);
    attn::zero(dv, op);
    return result();
  }
  const int64_t nb = static_cast<int64_t>(batch.size());
  Tensor q = attn::usable(q_in, nb, op), k = attn::usable(k_in, nb, op), v = attn::usable(v_in, nb, op);
  if (nb > attn::kMaxBatchDims) {
    batch = {B};
    q = q.view({B, L, E});
    k = k.view({B, S, E});
    v = v.view({B, S, E});
  }
  const Tensor go = attn::packed(grad, op), o = contiguous(out_in), lse = contiguous(lse_in);
  Tensor delta = empty({B, L}, DType::Float32, Device::CUDA);
  dispatch_storage(dt, op, [&]<class T>() {
    const int64_t rows = B * L;
    constexpr int threads = 256;
    const auto blocks = static_cast<unsigned>((rows * 32 + threads - 1) / threads);
    attn::delta_kernel<T><<<blocks, threads, 0, current_stream()>>>(go.data<T>(), o.data<T>(), delta.data<float>(), rows,
                                                                   static_cast<int>(E));
    attn::Params<T> p = attn::make_params<T>(q, k, v, batch, causal, scale, dropout_p, seed);
    p.dout = go.data<T>();
    p.lse = lse.data<float>();
    p.delta = delta.data<float>();
    p.dq = dq32.data<float>();
    p.dk = dk.data<T>();
    p.dv = dv.data<T>();
    attn::dispatch_head_dim(E, [&]<int D>() {
      constexpr int R = attn::kRows<T, D>;
      const int64_t tiles = (S + R - 1) / R;
      MIXPREC_CHECK(B <= INT32_MAX && tiles <= 65535, op, ": key ", k_in.sizes(), " exceeds the launch grid (at most 65535 tiles of rows, 2^31 batch entries)");
      const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(tiles));
      const std::size_t smem = attn::BwdSmem<T, D>::bytes;
      attn::allow_shared_memory(attn::backward_kernel<T, D>, smem, op);
      attn::backward_kernel<T, D><<<grid, 32 * attn::kWarps<T, D>, smem, current_stream()>>>(p);
    });
  });
  check_launch(op);
  return result();
}

}  // namespace mixprec::gpu
