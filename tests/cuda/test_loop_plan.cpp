// The element-wise loop plan (backends/cuda/loop_plan.hpp) on the CPU: every vector lane's
// offsets against the tensors' own strides, and the decisions that make the kernel fast
// (dimensions coalesced, 16-byte vectors, 32-bit indices) or keep it correct (scalar fallback).
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include <mixprec/backends/cuda/loop_plan.hpp>

using namespace mixprec;
using mixprec::gpu::LoopOperand;
using mixprec::gpu::LoopPlan;

namespace {
// Operand strides of `t_sizes`/`t_strides` broadcast to `shape` (0 on repeated dims).
Shape broadcast(const Shape& shape, const Shape& t_sizes, const Shape& t_strides) {
  Shape st(shape.size(), 0);
  const std::size_t off = shape.size() - t_sizes.size();
  for (std::size_t i = 0; i < t_sizes.size(); ++i) st[off + i] = t_sizes[i] == 1 ? 0 : t_strides[i];
  return st;
}

// Every element exactly once, and each operand's offset that of one logical index: the plan
// walks the output in its memory order (which need not be row-major), so the element a vector
// lane stands for is found from its output offset (outputs never overlap), and every operand's
// plan offset must equal its strided offset at that index.
void expect_offsets_match(const Shape& shape, const std::vector<LoopOperand>& ops, const LoopPlan& p) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  ASSERT_EQ(p.n * p.vec, numel);
  auto offset_of = [&](int64_t index, std::size_t t) {
    int64_t r = index, off = 0;
    for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
      off += (r % shape[static_cast<std::size_t>(d)]) * ops[t].strides[static_cast<std::size_t>(d)];
      r /= shape[static_cast<std::size_t>(d)];
    }
    return off;
  };
  std::map<int64_t, int64_t> index_at;  // output offset -> logical row-major index
  for (int64_t i = 0; i < numel; ++i) ASSERT_TRUE(index_at.emplace(offset_of(i, 0), i).second) << "the output overlaps itself";
  std::vector<bool> seen(static_cast<std::size_t>(numel), false);
  for (int64_t i = 0; i < p.n; ++i) {
    const auto off = gpu::loop_offsets(p, i);
    for (int j = 0; j < p.vec; ++j) {
      const int64_t out = off[0] + (p.vec > 1 ? j : 0);
      const auto it = index_at.find(out);
      ASSERT_NE(it, index_at.end()) << "vector " << i << " lane " << j << " writes offset " << out << ", outside the output";
      const int64_t index = it->second;
      ASSERT_FALSE(seen[static_cast<std::size_t>(index)]) << "element " << index << " written twice";
      seen[static_cast<std::size_t>(index)] = true;
      for (std::size_t t = 1; t < ops.size(); ++t) {
        const bool bcast = (p.broadcast_inner >> t) & 1u;
        const int64_t got = off[t] + (p.vec > 1 && !bcast ? j : 0);
        ASSERT_EQ(got, offset_of(index, t)) << "element " << index << " operand " << t << " shape " << ::testing::PrintToString(shape);
      }
    }
  }
}

// PyTorch's channels-last strides of [N, C, H, W].
Shape cl_strides(const Shape& s) { return {s[1] * s[2] * s[3], 1, s[3] * s[1], s[1]}; }

LoopOperand operand(const Shape& strides, uintptr_t address = 4096, int esize = 4) { return {strides, address, esize}; }
}  // namespace

TEST(LoopPlan, ContiguousIsOneDimensionOfVectors) {
  const Shape shape{4, 8, 16};
  const std::vector<LoopOperand> ops{operand({128, 16, 1}), operand({128, 16, 1}, 8192, 2)};
  const LoopPlan p = gpu::plan_loop(shape, ops.data(), 2, 4);
  EXPECT_EQ(p.nd, 1);
  EXPECT_EQ(p.vec, 4);
  EXPECT_TRUE(p.index32);
  expect_offsets_match(shape, ops, p);
}

TEST(LoopPlan, BiasRowBroadcastKeepsVectorsAndTwoDims) {
  const Shape shape{300, 256};
  const std::vector<LoopOperand> ops{operand({256, 1}), operand({256, 1}), operand(broadcast(shape, {256}, {1}))};
  const LoopPlan p = gpu::plan_loop(shape, ops.data(), 3, 8);
  EXPECT_EQ(p.nd, 2);
  EXPECT_EQ(p.vec, 8);
  EXPECT_EQ(p.broadcast_inner, 0u);
  expect_offsets_match(shape, ops, p);
}

TEST(LoopPlan, ScalarAndColumnBroadcastsRepeatOneElementPerVector) {
  const Shape shape{30, 64};
  const std::vector<LoopOperand> scalar{operand({64, 1}), operand({0, 0})};
  LoopPlan p = gpu::plan_loop(shape, scalar.data(), 2, 4);
  EXPECT_EQ(p.nd, 1);
  EXPECT_EQ(p.vec, 4);
  EXPECT_EQ(p.broadcast_inner, 2u);
  expect_offsets_match(shape, scalar, p);
  const std::vector<LoopOperand> column{operand({64, 1}), operand(broadcast(shape, {30, 1}, {1, 1}))};
  p = gpu::plan_loop(shape, column.data(), 2, 4);
  EXPECT_EQ(p.vec, 4);
  EXPECT_EQ(p.broadcast_inner, 2u);
  expect_offsets_match(shape, column, p);
}

TEST(LoopPlan, HeadSplitPermuteVectorisesAlongTheContiguousInnerDim) {
  // [B, T, H, E] read as [B, H, T, E] into a contiguous output.
  const Shape shape{4, 6, 33, 64};
  const Shape src_strides{33 * 6 * 64, 64, 6 * 64, 1};
  const std::vector<LoopOperand> ops{operand({6 * 33 * 64, 33 * 64, 64, 1}), operand(src_strides)};
  const LoopPlan p = gpu::plan_loop(shape, ops.data(), 2, 8);
  EXPECT_EQ(p.vec, 8);
  EXPECT_EQ(p.nd, 4);  // nothing merges: every dim is permuted
  expect_offsets_match(shape, ops, p);
}

TEST(LoopPlan, FallsBackToScalarsWhenAVectorWouldBeWrong) {
  const Shape shape{12, 10};
  // Misaligned base pointer (one float in).
  std::vector<LoopOperand> ops{operand({10, 1}), operand({10, 1}, 4096 + 4)};
  EXPECT_EQ(gpu::plan_loop(shape, ops.data(), 2, 4).vec, 1);
  // Inner length not a multiple of the vector, in a 2-D layout.
  ops = {operand({12, 1}), operand({1, 12})};
  LoopPlan p = gpu::plan_loop(shape, ops.data(), 2, 4);
  EXPECT_EQ(p.vec, 1);
  expect_offsets_match(shape, ops, p);
  // Transposed source: inner stride 10 (a [12, 10] buffer read as [10, 12]).
  ops = {operand({12, 1}), operand({1, 10})};
  p = gpu::plan_loop({10, 12}, ops.data(), 2, 4);
  EXPECT_EQ(p.vec, 1);
  expect_offsets_match({10, 12}, ops, p);
  // An outer stride not a multiple of the vector (rows of 10 floats, vectors of 4 not aligned).
  p = gpu::plan_loop({5, 8}, std::vector<LoopOperand>{operand({8, 1}), operand({10, 1})}.data(), 2, 4);
  EXPECT_EQ(p.vec, 1);
}

TEST(LoopPlan, SizeOneDimsDropAndRandomLayoutsMatch) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    const int nd = 1 + static_cast<int>(rng() % 5);
    Shape shape(static_cast<std::size_t>(nd));
    for (auto& s : shape) s = 1 + static_cast<int64_t>(rng() % 6);
    // Output contiguous (even trials) or a random permutation of a dense buffer (odd trials: the
    // plan then walks it in memory order); input a random permutation, maybe broadcast.
    std::vector<int> operm(static_cast<std::size_t>(nd));
    for (int d = 0; d < nd; ++d) operm[static_cast<std::size_t>(d)] = d;
    if (trial % 2 == 1) std::shuffle(operm.begin(), operm.end(), rng);
    Shape out_strides(shape.size());
    int64_t st = 1;
    for (int k = nd - 1; k >= 0; --k) {
      const auto d = static_cast<std::size_t>(operm[static_cast<std::size_t>(k)]);
      out_strides[d] = st;
      st *= shape[d];
    }
    std::vector<int> perm(static_cast<std::size_t>(nd));
    for (int d = 0; d < nd; ++d) perm[static_cast<std::size_t>(d)] = d;
    std::shuffle(perm.begin(), perm.end(), rng);
    Shape in_strides(shape.size());
    st = 1;
    for (int k = nd - 1; k >= 0; --k) {
      const auto d = static_cast<std::size_t>(perm[static_cast<std::size_t>(k)]);
      in_strides[d] = (rng() % 4 == 0) ? 0 : st;
      st *= shape[d];
    }
    const std::vector<LoopOperand> ops{operand(out_strides, 0, 2), operand(in_strides, 0, 2)};
    for (int vec : {1, 8}) expect_offsets_match(shape, ops, gpu::plan_loop(shape, ops.data(), 2, vec));
  }
}

TEST(LoopPlan, ChannelsLastOperandsCoalesceToOneVectorisedRun) {
  // [N, C, H, W] with every operand channels-last (a residual add, ReLU, a cast of a channels-last
  // activation): one dimension of N*H*W*C elements, full vectors, no division.
  const Shape shape{4, 16, 5, 7};
  const Shape cl = cl_strides(shape);
  const std::vector<LoopOperand> ops{operand(cl, 4096, 2), operand(cl, 8192, 2), operand(cl, 16384, 4)};
  const LoopPlan p = gpu::plan_loop(shape, ops.data(), 3, 4);
  EXPECT_EQ(p.nd, 1);
  EXPECT_EQ(p.vec, 4);
  EXPECT_EQ(p.sizes[0] * p.vec, 4 * 16 * 5 * 7);
  EXPECT_EQ(p.strides[0][0], 4);
  expect_offsets_match(shape, ops, p);
  // C = 3 (an RGB input): still one run; vectors of 8 do not divide N*H*W*C = 420, so scalars.
  const Shape rgb{4, 3, 5, 7};
  const std::vector<LoopOperand> rgb_ops{operand(cl_strides(rgb)), operand(cl_strides(rgb))};
  const LoopPlan q = gpu::plan_loop(rgb, rgb_ops.data(), 2, 8);
  EXPECT_EQ(q.nd, 1);
  expect_offsets_match(rgb, rgb_ops, q);
}

TEST(LoopPlan, ChannelsLastOutputIsWrittenInItsMemoryOrder) {
  const Shape shape{2, 8, 3, 5};
  const Shape cl = cl_strides(shape), nchw{8 * 3 * 5, 3 * 5, 5, 1};
  // A per-channel bias [1, C, 1, 1] broadcast over a channels-last activation: the output's
  // unit-stride dim (C) is innermost, N*H*W merge into one outer dim.
  const std::vector<LoopOperand> bias{operand(cl), operand(cl), operand({0, 1, 0, 0})};
  LoopPlan p = gpu::plan_loop(shape, bias.data(), 3, 4);
  EXPECT_EQ(p.nd, 2);
  EXPECT_EQ(p.vec, 4);
  EXPECT_EQ(p.strides[0][0], 4);  // unit-stride writes, in vectors
  expect_offsets_match(shape, bias, p);
  // A layout conversion (NCHW into channels-last): the writes stay unit-stride, the reads stride.
  const std::vector<LoopOperand> convert{operand(cl), operand(nchw)};
  p = gpu::plan_loop(shape, convert.data(), 2, 4);
  EXPECT_EQ(p.strides[0][0], 1);
  EXPECT_EQ(p.vec, 1);
  expect_offsets_match(shape, convert, p);
  // An NCHW output keeps the logical order (the plan NCHW tensors always had).
  const std::vector<LoopOperand> back{operand(nchw), operand(cl)};
  p = gpu::plan_loop(shape, back.data(), 2, 4);
  EXPECT_EQ(p.strides[0][0], 1);
  EXPECT_EQ(p.sizes[0], 15);  // H and W merge in both operands
  expect_offsets_match(shape, back, p);
}

TEST(LoopPlan, HugeTensorsTakeTheWideIndex) {
  const int64_t n = (int64_t{1} << 31) + 8;
  const std::vector<LoopOperand> ops{operand({1}), operand({1})};
  EXPECT_FALSE(gpu::plan_loop({n}, ops.data(), 2, 4).index32);
  EXPECT_TRUE(gpu::plan_loop({n / 4}, ops.data(), 2, 4).index32);
  // Few elements, far-apart offsets.
  const std::vector<LoopOperand> far{operand({1}), operand({int64_t{1} << 30})};
  EXPECT_FALSE(gpu::plan_loop({3}, far.data(), 2, 4).index32);
}

TEST(LoopPlan, FastDivisorDividesExactlyBelow2To31) {
  std::mt19937 rng(5);
  std::vector<uint32_t> divisors{1, 2, 3, 5, 6, 7, 12, 64, 100, 255, 256, 1000, 4095, 65535, 65536, 1000003, (1u << 31) - 1};
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + rng() % (1u << 30));
  for (uint32_t d : divisors) {
    const gpu::FastDivisor f(d);
    for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 2 * d - 1, (1u << 31) - 1, (1u << 31) - 2})
      if (n < (1u << 31)) ASSERT_EQ(f.divide_host(n), n / d) << n << " / " << d;
    for (int k = 0; k < 200; ++k) {
      const uint32_t n = rng() % (1u << 31);
      ASSERT_EQ(f.divide_host(n), n / d) << n << " / " << d;
    }
  }
}
