#pragma once
// The element-wise loop plan: how an output and its (broadcast, strided) inputs become the
// fewest dimensions, the widest vector and the narrowest index the CUDA loop (loops.cuh) can use.
// Plain C++ with no CUDA header, so the CPU tests check every decision (coalescing, vector width,
// 32-bit indexing) and run the plan's offsets against the tensors' own.
//
// Why: the element-wise kernels were ~10x below the memory bandwidth on an H200 (per-element
// 64-bit div/mod over up to 8 dims, one element per load). Coalescing turns a contiguous tensor
// into one dimension (no division at all) and a bias broadcast or a head split into two or three;
// a vector of 16 bytes per load needs the innermost dimension contiguous (or broadcast) in every
// operand, its length and every outer stride divisible by the vector, and aligned pointers.
#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>

#include "mixprec/core/error.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::gpu {

inline constexpr int kLoopMaxDims = 8;
inline constexpr int kLoopMaxTensors = 4;  // the output and up to three inputs

struct LoopOperand {
  Shape strides;           // element strides over the output's shape (0 on broadcast dims)
  uintptr_t address = 0;   // of the element at index 0
  int element_size = 4;
};

struct LoopPlan {
  int ntensors = 0;
  int nd = 0;   // dims after coalescing, innermost first (at least 1)
  int vec = 1;  // elements per thread and per load along dim 0
  // sizes[0] counts vectors; strides are in elements, dim 0's already multiplied by vec.
  std::array<int64_t, kLoopMaxDims> sizes{};
  std::array<std::array<int64_t, kLoopMaxTensors>, kLoopMaxDims> strides{};
  int64_t n = 0;  // vectors = product of sizes
  // Operands whose dim-0 stride is 0: one element stands for the whole vector.
  unsigned broadcast_inner = 0;
  bool index32 = false;  // every vector index and element offset fits in 31 bits
};

namespace detail {
inline bool divisible_by(int64_t v, int64_t d) { return v % d == 0; }

// V elements that one thread loads or stores as one access (16 bytes at most). Plain C++, so the
// host tests run the multi-tensor bodies (multi_tensor.hpp) that use it.
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
}  // namespace detail

// `shape` is the output's; operands[0] is the output (never broadcast). `max_vec` is the vector
// the caller instantiated (16 bytes over the widest element); the plan takes it or scalars.
inline LoopPlan plan_loop(const Shape& shape, const LoopOperand* operands, int ntensors, int max_vec) {
  MIXPREC_CHECK(ntensors >= 1 && ntensors <= kLoopMaxTensors, "gpu loop: 1 to ", kLoopMaxTensors, " tensors, got ", ntensors);
  for (int t = 0; t < ntensors; ++t)
    MIXPREC_CHECK(operands[t].strides.size() == shape.size(), "gpu loop: operand ", t, " has ", operands[t].strides.size(),
                  " strides for shape ", shape);
  LoopPlan p;
  p.ntensors = ntensors;
  // The dims in the output's memory order (its strides, largest first; stable, so a row-major
  // output keeps the logical order), as the CPU's cpu::map: a channels-last output [N, C, H, W] is
  // walked as [N, H, W, C], so its writes are unit-stride and, with inputs of the same layout, the
  // dims merge into one run (vector loads, no division). Element-wise results do not depend on
  // the order in which elements are visited.
  const std::size_t rank = shape.size();
  MIXPREC_CHECK(rank <= 64, "gpu loop: at most 64 dimensions, got shape ", shape);
  std::array<int64_t, 64> order{};
  for (std::size_t i = 0; i < rank; ++i) order[i] = static_cast<int64_t>(i);
  const Shape& s0 = operands[0].strides;
  std::stable_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(rank),
                   [&](int64_t a, int64_t b) { return s0[static_cast<std::size_t>(a)] > s0[static_cast<std::size_t>(b)]; });
  // Innermost first, size-1 dims dropped, then neighbours merged where every operand steps
  // through them as through one dimension.
  for (int64_t oi = static_cast<int64_t>(rank) - 1; oi >= 0; --oi) {
    const int64_t d = order[static_cast<std::size_t>(oi)];
    const int64_t size = shape[static_cast<std::size_t>(d)];
    if (size == 1) continue;
    if (p.nd > 0) {
      bool merge = true;
      for (int t = 0; t < ntensors && merge; ++t)
        merge = operands[t].strides[static_cast<std::size_t>(d)] == p.strides[p.nd - 1][t] * p.sizes[p.nd - 1];
      if (merge) {
        p.sizes[p.nd - 1] *= size;
        continue;
      }
    }
    MIXPREC_CHECK(p.nd < kLoopMaxDims, "gpu loop: at most ", kLoopMaxDims, " dimensions after coalescing, got shape ", shape);
    p.sizes[p.nd] = size;
    for (int t = 0; t < ntensors; ++t) p.strides[p.nd][t] = operands[t].strides[static_cast<std::size_t>(d)];
    ++p.nd;
  }
  if (p.nd == 0) {  // one element (or every dim of size 1)
    p.nd = 1;
    p.sizes[0] = 1;
    for (int t = 0; t < ntensors; ++t) p.strides[0][t] = 0;
    p.strides[0][0] = 1;
  }
  for (int64_t s : shape)
    if (s == 0) p.sizes[0] = 0;

  // The widest vector every operand allows.
  auto vector_ok = [&](int v) {
    if (v == 1) return true;
    if (!detail::divisible_by(p.sizes[0], v) || p.strides[0][0] != 1) return false;
    for (int t = 0; t < ntensors; ++t) {
      const int64_t inner = p.strides[0][t];
      if (inner == 0) continue;  // one element per vector: loaded alone, any offset will do
      if (inner != 1) return false;
      for (int d = 1; d < p.nd; ++d)
        if (!detail::divisible_by(p.strides[d][t], v)) return false;
      if (!detail::divisible_by(static_cast<int64_t>(operands[t].address), int64_t{v} * operands[t].element_size)) return false;
    }
    return true;
  };
  p.vec = max_vec > 1 && vector_ok(max_vec) ? max_vec : 1;  // the kernel is built for these two
  p.sizes[0] /= p.vec;
  for (int t = 0; t < ntensors; ++t) {
    p.strides[0][t] *= p.vec;
    if (p.vec > 1 && p.strides[0][t] == 0) p.broadcast_inner |= 1u << t;
  }

  p.n = 1;
  for (int d = 0; d < p.nd; ++d) p.n *= p.sizes[d];
  constexpr int64_t kLimit = std::numeric_limits<int32_t>::max();
  bool fits = p.n * p.vec <= kLimit;
  for (int t = 0; t < ntensors && fits; ++t) {
    int64_t last = 0;  // the largest element offset of operand t
    for (int d = 0; d < p.nd; ++d) {
      const int64_t s = p.strides[d][t];
      if (s < 0) fits = false;
      last += (p.sizes[d] > 0 ? p.sizes[d] - 1 : 0) * s;
    }
    fits = fits && last + p.vec <= kLimit;
  }
  p.index32 = fits;
  return p;
}

// Element offsets of vector `i` in each operand: what the kernel computes, for the CPU tests.
inline std::array<int64_t, kLoopMaxTensors> loop_offsets(const LoopPlan& p, int64_t i) {
  std::array<int64_t, kLoopMaxTensors> off{};
  for (int d = 0; d < p.nd; ++d) {
    const int64_t q = i / p.sizes[d], r = i - q * p.sizes[d];
    for (int t = 0; t < p.ntensors; ++t) off[static_cast<std::size_t>(t)] += r * p.strides[d][t];
    i = q;
  }
  return off;
}

// Division by a divisor fixed at plan time, for 32-bit indices below 2^31: one multiply-high and
// a shift on the GPU instead of a division (Granlund and Montgomery; as PyTorch's IntDivider).
struct FastDivisor {
  uint32_t divisor = 1, magic = 1, shift = 0;
  FastDivisor() = default;
  explicit FastDivisor(uint32_t d) : divisor(d) {
    MIXPREC_CHECK(d >= 1, "gpu loop: divisor must be positive");
    while (shift < 32 && (uint64_t{1} << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  // n / divisor for n < 2^31, computed as the kernel does.
  uint32_t divide_host(uint32_t n) const {
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
    return (hi + n) >> shift;
  }
};

}  // namespace mixprec::gpu
