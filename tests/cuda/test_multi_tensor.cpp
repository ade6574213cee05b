// The fused multi-tensor passes (backends/cuda/multi_tensor.hpp) on the CPU. amp.cuh's kernels
// call these bodies with (threadIdx.x, blockDim.x); here every thread of every block of every
// launch runs them over host memory, batched exactly as the launcher batches them, and the
// result is compared with the per-element definition (each element once, in order, through the
// same AdamScalars / SgdScalars step): the same bits. So the batching, the chunking, the
// vector/tail split and the dtype dispatch are checked without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <mixprec/backends/cuda/multi_tensor.hpp>

using namespace mixprec;
namespace mt = mixprec::gpu::detail;
using gpu::AdamSlot;
using gpu::NormSlot;
using gpu::ScaleSlot;
using gpu::SgdSlot;
using gpu::UnscaleSlot;

namespace {

// n elements of a floating dtype, 64-byte aligned plus `misalign` elements (1: no vector path).
class HostArray {
 public:
  HostArray(DType dt, int64_t n, int misalign = 0) : dt_(dt), n_(n), mem_(static_cast<std::size_t>((n + 8) * size() + 64)) {
    const auto base = (reinterpret_cast<uintptr_t>(mem_.data()) + 63) & ~uintptr_t{63};
    p_ = reinterpret_cast<uint8_t*>(base) + misalign * size();
  }
  int64_t size() const { return static_cast<int64_t>(itemsize(dt_)); }
  uint8_t code() const { return static_cast<uint8_t>(dt_); }
  void* data() { return p_; }
  float* f32() { return reinterpret_cast<float*>(p_); }
  float get(int64_t i) const {
    switch (dt_) {
      case DType::Float16: return static_cast<float>(reinterpret_cast<const half*>(p_)[i]);
      case DType::BFloat16: return static_cast<float>(reinterpret_cast<const bfloat16*>(p_)[i]);
      default: return reinterpret_cast<const float*>(p_)[i];
    }
  }
  void set(int64_t i, float v) {
    switch (dt_) {
      case DType::Float16: reinterpret_cast<half*>(p_)[i] = half(v); break;
      case DType::BFloat16: reinterpret_cast<bfloat16*>(p_)[i] = bfloat16(v); break;
      default: reinterpret_cast<float*>(p_)[i] = v; break;
    }
  }
  void fill_random(std::mt19937& rng, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    for (int64_t i = 0; i < n_; ++i) set(i, d(rng));
  }
  bool same_bits(const HostArray& o) const { return n_ == o.n_ && std::memcmp(p_, o.p_, static_cast<std::size_t>(n_ * size())) == 0; }
  // The first element whose bits differ, or -1.
  int64_t first_difference(const HostArray& o) const {
    for (int64_t i = 0; i < n_; ++i)
      if (std::memcmp(p_ + i * size(), o.p_ + i * size(), static_cast<std::size_t>(size())) != 0) return i;
    return -1;
  }

 private:
  DType dt_;
  int64_t n_;
  std::vector<uint8_t> mem_;
  uint8_t* p_ = nullptr;
};

// Runs the blocks of every launch the launcher would make, each thread of each, in order;
// body(slot, chunk begin, thread, global block). Returns the number of launches.
template <class Slot, class Body>
int64_t run_launches_on_host(const std::vector<Slot>& slots, int nthreads, Body body) {
  int64_t launches = 0;
  mt::for_batches(slots, [&](const auto& b, unsigned blocks, int64_t first) {
    ++launches;
    for (int64_t blk = 0; blk < static_cast<int64_t>(blocks); ++blk) {
      const mt::ChunkRange c = mt::chunk_of(b, blk);
      for (int t = 0; t < nthreads; ++t) body(b.slot[c.slot], c.begin, t, first + blk);
    }
  });
  return launches;
}

// Sizes that cover a single element, a partial vector, exact vectors, a vector plus a tail,
// and one, two and three chunks with and without a tail.
const std::vector<int64_t> kSlotSizes = {1, 3, 4, 5, 37, mt::kChunk - 1, mt::kChunk, mt::kChunk + 5, 2 * mt::kChunk + 3};

// One parameter's arrays for the Adam/SGD tests, with a copy for the reference.
struct HostParam {
  HostArray master, grad, m, v, vmax, model;
  HostParam(int64_t n, DType g, DType model_dt, int mis) : master(kFloat32, n, mis), grad(g, n, mis), m(kFloat32, n, mis), v(kFloat32, n, mis),
        vmax(kFloat32, n, mis), model(model_dt, n, mis) {}
};
void fill_param(HostParam& p, std::mt19937& rng) {
  p.master.fill_random(rng, -1, 1);
  p.grad.fill_random(rng, -2, 2);
  p.m.fill_random(rng, -0.1f, 0.1f);
  p.v.fill_random(rng, 0, 0.01f);
  p.vmax.fill_random(rng, 0, 0.012f);
}
// The reference's starting values: `from`'s, element by element.
void copy_values(const HostParam& from, HostParam& to, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    to.master.set(i, from.master.get(i));
    to.grad.set(i, from.grad.get(i));
    to.m.set(i, from.m.get(i));
    to.v.set(i, from.v.get(i));
    to.vmax.set(i, from.vmax.get(i));
  }
}
// One parameter per size of kSlotSizes, filled at random (`got`, which the bodies update), and
// its twin with the same values (`want`, which the per-element reference updates).
struct ParamPairs {
  std::vector<HostParam> got, want;
  ParamPairs(DType grad_dt, DType model_dt, int mis, std::mt19937& rng) {
    got.reserve(kSlotSizes.size());
    want.reserve(kSlotSizes.size());
    for (int64_t n : kSlotSizes) {
      got.emplace_back(n, grad_dt, model_dt, mis);
      want.emplace_back(n, grad_dt, model_dt, mis);
      fill_param(got.back(), rng);
      copy_values(got.back(), want.back(), n);
    }
  }
};
}  // namespace

class MultiTensorAdam : public ::testing::TestWithParam<std::tuple<DType, int, bool, int>> {};

// grad dtype, model copy (0 none, 1 float32, 2 float16, 3 bfloat16), amsgrad, misalignment.
TEST_P(MultiTensorAdam, EveryThreadOfEveryBlockGivesThePerElementUpdate) {
  const auto [grad_dt, model_kind, amsgrad, mis] = GetParam();
  const DType model_dt = model_kind == 2 ? kFloat16 : model_kind == 3 ? kBFloat16 : kFloat32;
  optim::detail::AdamHyper h{1e-3, 0.9, 0.999, 1e-8, 0.01, true, amsgrad};
  const optim::detail::AdamScalars sc = optim::detail::adam_scalars(h, 3);
  std::mt19937 rng(7);
  ParamPairs pairs(grad_dt, model_dt, mis, rng);
  std::vector<HostParam>& got = pairs.got;
  std::vector<HostParam>& want = pairs.want;
  std::vector<AdamSlot> slots;
  for (std::size_t k = 0; k < kSlotSizes.size(); ++k) {
    const int64_t n = kSlotSizes[k];
    HostParam& g = got[k];
    slots.push_back({g.master.f32(), model_kind ? g.model.data() : nullptr, g.grad.data(), g.m.f32(), g.v.f32(),
                     amsgrad ? g.vmax.f32() : nullptr, nullptr, n, g.model.code(), g.grad.code(), nullptr});
    EXPECT_EQ(mt::vector_ok(slots.back()), mis == 0) << n;
  }
  run_launches_on_host(slots, 256, [&](const AdamSlot& s, int64_t begin, int t, int64_t) { mt::adam_chunk(s, sc, begin, t, 256); });
  for (std::size_t k = 0; k < kSlotSizes.size(); ++k) {
    HostParam& w = want[k];
    for (int64_t i = 0; i < kSlotSizes[k]; ++i) {
      float wt = w.master.get(i), m = w.m.get(i), v = w.v.get(i), vmax = w.vmax.get(i);
      sc.step(wt, w.grad.get(i), m, v, amsgrad ? &vmax : nullptr);
      w.master.set(i, wt);
      w.m.set(i, m);
      w.v.set(i, v);
      w.vmax.set(i, vmax);
      w.model.set(i, wt);
    }
    const HostParam& g = got[k];
    SCOPED_TRACE("n " + std::to_string(kSlotSizes[k]));
    EXPECT_EQ(g.master.first_difference(w.master), -1);
    EXPECT_EQ(g.m.first_difference(w.m), -1);
    EXPECT_EQ(g.v.first_difference(w.v), -1);
    if (amsgrad) EXPECT_EQ(g.vmax.first_difference(w.vmax), -1);
    if (model_kind) EXPECT_EQ(g.model.first_difference(w.model), -1);
    EXPECT_TRUE(g.grad.same_bits(w.grad));  // read only
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MultiTensorAdam,
                         ::testing::Combine(::testing::Values(kFloat32, kFloat16, kBFloat16), ::testing::Values(0, 1, 2, 3),
                                            ::testing::Bool(), ::testing::Values(0, 1)));

TEST(MultiTensor, ManySmallSlotsSpanSeveralLaunchesAndAnyBlockSizeCoversEveryElement) {
  // More slots than one launch's arguments hold, empty ones among them (skipped), and a block
  // size that is not a multiple of the vector groups.
  const int nslots = 2 * mt::kSlotsPerLaunch<AdamSlot> + 5;
  optim::detail::AdamHyper h{1e-2, 0.9, 0.99, 1e-6, 0.0, false, false};
  const optim::detail::AdamScalars sc = optim::detail::adam_scalars(h, 1);
  std::mt19937 rng(11);
  std::vector<HostParam> got, want;
  got.reserve(nslots);
  want.reserve(nslots);
  std::vector<AdamSlot> slots;
  int64_t nonempty = 0;
  for (int k = 0; k < nslots; ++k) {
    const int64_t n = k % 7 == 3 ? 0 : 1 + (k * 37) % 301;
    nonempty += n > 0;
    got.emplace_back(n, kBFloat16, kBFloat16, 0);
    want.emplace_back(n, kBFloat16, kBFloat16, 0);
    fill_param(got.back(), rng);
    copy_values(got.back(), want.back(), n);
    HostParam& g = got.back();
    slots.push_back({g.master.f32(), g.model.data(), g.grad.data(), g.m.f32(), g.v.f32(), nullptr, nullptr, n, g.model.code(), g.grad.code()});
  }
  const int64_t launches = run_launches_on_host(slots, 96, [&](const AdamSlot& s, int64_t begin, int t, int64_t) { mt::adam_chunk(s, sc, begin, t, 96); });
  EXPECT_EQ(launches, (nonempty + mt::kSlotsPerLaunch<AdamSlot> - 1) / mt::kSlotsPerLaunch<AdamSlot>);
  for (int k = 0; k < nslots; ++k) {
    HostParam& w = want[static_cast<std::size_t>(k)];
    for (int64_t i = 0; i < slots[static_cast<std::size_t>(k)].n; ++i) {
      float wt = w.master.get(i), m = w.m.get(i), v = w.v.get(i);
      sc.step(wt, w.grad.get(i), m, v, nullptr);
      w.master.set(i, wt);
      w.m.set(i, m);
      w.v.set(i, v);
      w.model.set(i, wt);
    }
    EXPECT_EQ(got[static_cast<std::size_t>(k)].master.first_difference(w.master), -1) << "slot " << k;
    EXPECT_EQ(got[static_cast<std::size_t>(k)].model.first_difference(w.model), -1) << "slot " << k;
  }
}

TEST(MultiTensor, SgdWithMomentumAndNesterovGivesThePerElementUpdate) {
  for (bool first : {true, false})
    for (bool nesterov : {false, true})
      for (int mis : {0, 1}) {
        SCOPED_TRACE(::testing::Message() << "first " << first << " nesterov " << nesterov << " misaligned " << mis);
        optim::detail::SgdScalars sc;
        sc.wd = 1e-4f, sc.mom = 0.9f, sc.damp1 = 1.0f, sc.neg_lr = -0.1f, sc.use_wd = true, sc.use_mom = true, sc.nesterov = nesterov;
        std::mt19937 rng(3);
        ParamPairs pairs(kFloat16, kFloat16, mis, rng);
        std::vector<HostParam>& got = pairs.got;
        std::vector<HostParam>& want = pairs.want;
        std::vector<SgdSlot> slots;
        for (std::size_t k = 0; k < kSlotSizes.size(); ++k) {
          const int64_t n = kSlotSizes[k];
          HostParam& g = got[k];
          slots.push_back({g.master.f32(), g.model.data(), g.grad.data(), g.m.f32(), nullptr, n, g.model.code(), g.grad.code(), nullptr});
          EXPECT_EQ(mt::vector_ok(slots.back()), mis == 0);
        }
        run_launches_on_host(slots, 256, [&](const SgdSlot& s, int64_t begin, int t, int64_t) { mt::sgd_chunk(s, sc, first, begin, t, 256); });
        for (std::size_t k = 0; k < kSlotSizes.size(); ++k) {
          HostParam& w = want[k];
          for (int64_t i = 0; i < kSlotSizes[k]; ++i) {
            float wt = w.master.get(i), buf = w.m.get(i);
            sc.step(wt, w.grad.get(i), &buf, first);
            w.master.set(i, wt);
            w.m.set(i, buf);
            w.model.set(i, wt);
          }
          EXPECT_EQ(got[k].master.first_difference(w.master), -1) << kSlotSizes[k];
          EXPECT_EQ(got[k].m.first_difference(w.m), -1) << kSlotSizes[k];
          EXPECT_EQ(got[k].model.first_difference(w.model), -1) << kSlotSizes[k];
        }
      }
}

TEST(MultiTensor, UnscaleWritesGradAndMasterAndFlagsAnInfInAVectorOrATail) {
  const float inv = static_cast<float>(1.0 / 65536.0);
  for (DType dt : {kFloat32, kFloat16, kBFloat16})
    for (int mis : {0, 1})
      for (int poison : {-1, 6, 2 * static_cast<int>(mt::kChunk) + 2}) {  // none, inside a vector group, in the last tail
        SCOPED_TRACE(::testing::Message() << dt << " misaligned " << mis << " poison " << poison);
        std::mt19937 rng(5);
        const int64_t n = 2 * mt::kChunk + 3;
        HostArray grad(dt, n, mis), want(dt, n, mis), master(kFloat32, n, mis);
        grad.fill_random(rng, -1000, 1000);
        if (poison >= 0) grad.set(poison, poison == 6 ? std::numeric_limits<float>::infinity() : std::nanf(""));
        std::vector<float> want_master(static_cast<std::size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
          want_master[static_cast<std::size_t>(i)] = grad.get(i) * inv;  // the master keeps float32's bits
          want.set(i, grad.get(i) * inv);
        }
        std::vector<UnscaleSlot> slots = {{grad.data(), master.f32(), n, grad.code()}};
        EXPECT_EQ(mt::vector_ok(slots[0]), mis == 0);
        bool found = false;
        std::vector<bool> block_found(static_cast<std::size_t>(mt::total_chunks(slots)), false);
        run_launches_on_host(slots, 256, [&](const UnscaleSlot& s, int64_t begin, int t, int64_t blk) {
          const bool bad = mt::unscale_chunk(s, inv, begin, t, 256);
          found |= bad;
          if (bad) block_found[static_cast<std::size_t>(blk)] = true;
        });
        EXPECT_EQ(found, poison >= 0);
        if (poison >= 0) EXPECT_TRUE(block_found[static_cast<std::size_t>(poison / mt::kChunk)]);  // the chunk that holds it
        EXPECT_EQ(grad.first_difference(want), -1);
        EXPECT_EQ(std::memcmp(master.f32(), want_master.data(), want_master.size() * sizeof(float)), 0);
      }
}

TEST(MultiTensor, SumOfSquaresPartialsAddUpToTheNormAndClipScalesEveryElement) {
  std::mt19937 rng(9);
  for (DType dt : {kFloat32, kFloat16, kBFloat16})
    for (int mis : {0, 1}) {
      SCOPED_TRACE(::testing::Message() << dt << " misaligned " << mis);
      std::vector<HostArray> arrays;
      arrays.reserve(kSlotSizes.size());
      std::vector<NormSlot> norm_slots;
      std::vector<ScaleSlot> scale_slots;
      double want = 0;
      for (int64_t n : kSlotSizes) {
        arrays.emplace_back(dt, n, mis);
        arrays.back().fill_random(rng, -3, 3);
        for (int64_t i = 0; i < n; ++i) want += static_cast<double>(arrays.back().get(i)) * arrays.back().get(i);
        norm_slots.push_back({arrays.back().data(), n, arrays.back().code()});
        scale_slots.push_back({arrays.back().data(), n, arrays.back().code()});
      }
      std::vector<double> partial(static_cast<std::size_t>(mt::total_chunks(norm_slots)), 0.0);
      run_launches_on_host(norm_slots, 256, [&](const NormSlot& s, int64_t begin, int t, int64_t blk) {
        ASSERT_LT(blk, static_cast<int64_t>(partial.size()));
        partial[static_cast<std::size_t>(blk)] += mt::sum_squares_chunk(s, begin, t, 256);
      });
      double got = 0;
      for (double p : partial) got += p;
      EXPECT_NEAR(got, want, 1e-12 * want);

      const float f = 0.37f;
      std::vector<std::vector<float>> before;
      for (const HostArray& a : arrays) {
        before.emplace_back();
        for (int64_t i = 0; i < static_cast<int64_t>(kSlotSizes[before.size() - 1]); ++i) before.back().push_back(a.get(i));
      }
      run_launches_on_host(scale_slots, 256, [&](const ScaleSlot& s, int64_t begin, int t, int64_t) { mt::scale_chunk(s, f, begin, t, 256); });
      for (std::size_t k = 0; k < arrays.size(); ++k) {
        HostArray want_scaled(dt, kSlotSizes[k], mis);
        for (int64_t i = 0; i < kSlotSizes[k]; ++i) want_scaled.set(i, before[k][static_cast<std::size_t>(i)] * f);
        EXPECT_EQ(arrays[k].first_difference(want_scaled), -1) << kSlotSizes[k];
      }
    }
}
