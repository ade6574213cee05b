// MpiProcessGroup collectives on every rank: results against values computed locally from the
// rank numbers, 16-bit all-reduce against the float32 sum rounded once, and argument errors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>

#include "distributed/dist_test_util.hpp"

using namespace mixprec;
using distributed::ReduceOp;
using mixprec::testing::world;

namespace {

// A tensor whose values depend on the rank, so a collective that did nothing is caught.
Tensor rank_tensor(int rank, int64_t n, DType d) {
  Tensor t = empty({n}, DType::Float64);
  for (int64_t i = 0; i < n; ++i) t.data<double>()[i] = (rank + 1) * 0.5 + static_cast<double>(i % 7) - 3.0;
  return t.to(d);
}

}  // namespace

TEST(ProcessGroup, RankAndSize) {
  EXPECT_EQ(world().size(), 2) << "these tests are meant for mpirun -np 2";
  EXPECT_GE(world().rank(), 0);
  EXPECT_LT(world().rank(), world().size());
  EXPECT_EQ(world().backend(), "mpi");
}

TEST(ProcessGroup, BroadcastCopiesTheRootsBits) {
  const int root = world().size() - 1;
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16, DType::Int64}) {
    Tensor t = rank_tensor(world().rank(), 1000, d);
    const Tensor expect = rank_tensor(root, 1000, d);
    world().broadcast(t, root)->wait();
    EXPECT_EQ(std::memcmp(t.data_ptr(), expect.data_ptr(), static_cast<std::size_t>(t.nbytes())), 0) << d;
  }
}

TEST(ProcessGroup, AllReduceSumAndMax) {
  const int p = world().size();
  for (DType d : {DType::Float32, DType::Float64, DType::Int32, DType::Int64}) {
    Tensor s = rank_tensor(world().rank(), 4099, d);
    Tensor m = rank_tensor(world().rank(), 4099, d);
    auto ws = world().all_reduce(s, ReduceOp::Sum);  // two in flight at once
    auto wm = world().all_reduce(m, ReduceOp::Max);
    wm->wait();
    ws->wait();
    Tensor sum_ref = zeros({4099}, DType::Float64), max_ref = rank_tensor(p - 1, 4099, DType::Float64);
    for (int r = 0; r < p; ++r) sum_ref = add(sum_ref, rank_tensor(r, 4099, d).to(DType::Float64));
    EXPECT_EQ(mixprec::testing::to_doubles(s), mixprec::testing::to_doubles(sum_ref)) << d;
    EXPECT_EQ(mixprec::testing::to_doubles(m), mixprec::testing::to_doubles(max_ref.to(d))) << d;
  }
}

TEST(ProcessGroup, AllReduceOf16BitTensorsSumsInFloat32AndRoundsOnce) {
  const int p = world().size();
  for (DType d : {DType::Float16, DType::BFloat16}) {
    // Values a 16-bit type cannot hold exactly, with rank-dependent magnitudes.
    Generator g(100 + static_cast<uint64_t>(world().rank()));
    Tensor local = mul(randn({5000}, DType::Float32, g), scalar_tensor(1.0 + world().rank() * 1e-3, DType::Float32)).to(d);
    const Tensor all = mixprec::testing::gather_all(local);  // every rank's contribution
    Tensor ref = zeros({5000}, DType::Float32);
    for (int r = 0; r < p; ++r) ref = add(ref, all.select(0, r).to(DType::Float32));
    world().all_reduce(local, ReduceOp::Sum)->wait();
    const Tensor expect = ref.to(d);  // the float32 sum, rounded once
    EXPECT_EQ(std::memcmp(local.data_ptr(), expect.data_ptr(), static_cast<std::size_t>(local.nbytes())), 0) << d;
  }
}

TEST(ProcessGroup, AllGatherOrdersByRank) {
  const int p = world().size();
  Tensor in = rank_tensor(world().rank(), 33, DType::BFloat16);
  Tensor out = empty({p * 33}, DType::BFloat16);
  world().all_gather(out, in)->wait();
  for (int r = 0; r < p; ++r) {
    const Tensor expect = rank_tensor(r, 33, DType::BFloat16);
    EXPECT_EQ(std::memcmp(static_cast<char*>(out.data_ptr()) + r * in.nbytes(), expect.data_ptr(),
                          static_cast<std::size_t>(in.nbytes())),
              0)
        << "rank " << r;
  }
}

TEST(ProcessGroup, BarrierOrdersWritesBeforeReads) {
  // Rank 0 writes a file before the barrier; every rank reads it after.
  Tensor pid = full({1}, static_cast<double>(::getpid()), DType::Int64);
  world().broadcast(pid, 0)->wait();
  const std::string path = ::testing::TempDir() + "mixprec_barrier_" + std::to_string(pid.data<int64_t>()[0]);
  if (world().rank() == 0) {
    std::FILE* f = std::fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("written before the barrier", f);
    std::fclose(f);
  }
  world().barrier()->wait();
  std::FILE* f = std::fopen(path.c_str(), "r");
  EXPECT_NE(f, nullptr);
  if (f) {
    char buf[64] = {};
    EXPECT_NE(std::fgets(buf, sizeof buf, f), nullptr);
    EXPECT_STREQ(buf, "written before the barrier");
    std::fclose(f);
  }
  world().barrier()->wait();
  if (world().rank() == 0) std::remove(path.c_str());
}

TEST(ProcessGroup, RefusesBadArgumentsBeforeCommunicating) {
  // Checked on the calling thread, identically on every rank, so no rank is left waiting.
  Tensor m = zeros({4, 4});
  EXPECT_THROW(world().all_reduce(m.t()), Error);
  EXPECT_THROW(world().all_reduce(Tensor()), Error);
  EXPECT_THROW(world().all_reduce(zeros({3}, DType::Bool)), Error);
  EXPECT_THROW(world().broadcast(m, world().size()), Error);
  EXPECT_THROW(world().broadcast(m, -1), Error);
  EXPECT_THROW(world().all_gather(zeros({3}), zeros({3})), Error);                      // too small
  EXPECT_THROW(world().all_gather(zeros({2 * static_cast<int64_t>(world().size())}, DType::Float16), zeros({2})), Error);  // dtype
  try {
    world().all_reduce(m.t());
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not contiguous"), std::string::npos) << e.what();
  }
  // The group still works afterwards.
  Tensor one = ones({1});
  world().all_reduce(one)->wait();
  EXPECT_EQ(one.item<float>(), static_cast<float>(world().size()));
}
