#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/data/dataset.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <numeric>
#include <set>
#include <thread>
#include <vector>

using namespace mixprec;

namespace {

// inputs[i] = [i*10, i*10+1, i*10+2] (float32), targets[i] = i (int64).
data::TensorDataset dl_dataset(int64_t n) {
  std::vector<float> x;
  std::vector<int64_t> y;
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < 3; ++j) x.push_back(static_cast<float>(i * 10 + j));
    y.push_back(i);
  }
  return data::TensorDataset(tensor(x, {n, 3}), tensor(y, {n}));
}

std::vector<int64_t> dl_targets(const data::Batch& b) {
  const Tensor t = b.targets.contiguous();
  return std::vector<int64_t>(t.data<int64_t>(), t.data<int64_t>() + t.numel());
}

// Every sample index visited in one pass, checking each batch's rows agree with its targets.
std::vector<int64_t> dl_epoch(data::DataLoader& loader, std::vector<int64_t>* batch_sizes = nullptr) {
  std::vector<int64_t> seen;
  for (auto& batch : loader) {
    EXPECT_TRUE(batch.inputs.is_contiguous());
    EXPECT_EQ(batch.inputs.dim(), 2);
    EXPECT_EQ(batch.inputs.size(1), 3);
    EXPECT_EQ(batch.inputs.size(0), batch.targets.size(0));
    const auto ids = dl_targets(batch);
    for (std::size_t r = 0; r < ids.size(); ++r)
      for (int j = 0; j < 3; ++j)
        EXPECT_EQ(batch.inputs.data<float>()[r * 3 + j], static_cast<float>(ids[r] * 10 + j));
    seen.insert(seen.end(), ids.begin(), ids.end());
    if (batch_sizes) batch_sizes->push_back(batch.inputs.size(0));
  }
  return seen;
}

// Fails the test and exits rather than hanging the whole suite when `f` deadlocks.
void dl_within(std::chrono::seconds limit, std::function<void()> f) {
  auto task = std::make_shared<std::packaged_task<void()>>(std::move(f));
  auto fut = task->get_future();
  std::thread([task] { (*task)(); }).detach();
  if (fut.wait_for(limit) != std::future_status::ready) {
    ADD_FAILURE() << "timed out: the loader deadlocked";
    std::_Exit(1);
  }
  fut.get();
}

}  // namespace

TEST(DataLoader, DatasetValidatesAndGathersContiguousRows) {
  EXPECT_THROW(data::TensorDataset(zeros({4, 2}), zeros({5})), Error);
  EXPECT_THROW(data::TensorDataset(scalar_tensor(1.0), zeros({1})), Error);
  EXPECT_THROW(data::TensorDataset(Tensor(), zeros({1})), Error);
  // A transposed (non-contiguous) input still gathers the right rows.
  const Tensor base = tensor(std::vector<float>{0, 1, 2, 3, 4, 5}, {3, 2});  // rows of the transpose: [0,2,4], [1,3,5]
  data::TensorDataset ds(base.t(), tensor(std::vector<int64_t>{7, 8}, {2}));
  EXPECT_EQ(ds.size(), 2);
  const auto b = ds.gather({1, 0, 1});
  ASSERT_EQ(b.inputs.sizes(), (Shape{3, 3}));
  const std::vector<float> want = {1, 3, 5, 0, 2, 4, 1, 3, 5};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(b.inputs.data<float>()[i], want[i]);
  EXPECT_EQ(dl_targets(b), (std::vector<int64_t>{8, 7, 8}));
  EXPECT_THROW(ds.gather({2}), Error);
  EXPECT_THROW(ds.gather({-1}), Error);
  EXPECT_THROW(data::DataLoader(ds, 0, false, 0), Error);
}

TEST(DataLoader, SequentialBatchingAndDropLast) {
  data::DataLoader loader(dl_dataset(10), 4, false, 0);
  EXPECT_EQ(loader.size(), 3);
  std::vector<int64_t> sizes;
  const auto seen = dl_epoch(loader, &sizes);
  EXPECT_EQ(sizes, (std::vector<int64_t>{4, 4, 2}));
  EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));

  data::DataLoader dropping(dl_dataset(10), 4, false, 0, /*drop_last=*/true);
  EXPECT_EQ(dropping.size(), 2);
  sizes.clear();
  EXPECT_EQ(dl_epoch(dropping, &sizes), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(sizes, (std::vector<int64_t>{4, 4}));

  data::DataLoader exact(dl_dataset(8), 4, false, 0, true);
  EXPECT_EQ(exact.size(), 2);
  data::DataLoader tiny(dl_dataset(3), 4, false, 0, true);
  EXPECT_EQ(tiny.size(), 0);
  EXPECT_TRUE(dl_epoch(tiny).empty());
  data::DataLoader empty_ds(dl_dataset(0), 4, true, 0);
  EXPECT_EQ(empty_ds.size(), 0);
  EXPECT_TRUE(dl_epoch(empty_ds).empty());
}

TEST(DataLoader, ShuffleIsSeededAndReshuffledPerEpoch) {
  data::DataLoader a(dl_dataset(50), 8, true, 42);
  data::DataLoader b(dl_dataset(50), 8, true, 42);
  data::DataLoader c(dl_dataset(50), 8, true, 43);
  const auto a0 = dl_epoch(a), a1 = dl_epoch(a), a2 = dl_epoch(a);
  EXPECT_EQ(a.epoch(), 3u);
  std::vector<int64_t> all(50);
  std::iota(all.begin(), all.end(), 0);
  for (const auto* e : {&a0, &a1, &a2}) {
    auto s = *e;
    std::sort(s.begin(), s.end());
    EXPECT_EQ(s, all) << "an epoch must visit every sample exactly once";
    EXPECT_NE(*e, all) << "shuffled order should not be the identity";
  }
  EXPECT_NE(a0, a1);
  EXPECT_NE(a1, a2);
  EXPECT_EQ(dl_epoch(b), a0) << "same seed, same epoch, same order";
  EXPECT_EQ(dl_epoch(b), a1);
  EXPECT_NE(dl_epoch(c), a0) << "another seed, another order";
  // set_epoch replays an epoch, and indices() predicts it.
  a.set_epoch(1);
  EXPECT_EQ(a.indices(1), a1);
  EXPECT_EQ(dl_epoch(a), a1);
  EXPECT_EQ(a.indices(0), a0);
}

TEST(DataLoader, ShardsAreDisjointAndCoverEachEpoch) {
  for (bool equal : {false, true}) {
    for (uint64_t epoch : {0u, 5u}) {
      data::DataLoader whole(dl_dataset(10), 2, true, 7);
      const auto order = whole.indices(epoch);
      std::set<int64_t> covered;
      int64_t total = 0;
      for (int64_t rank = 0; rank < 3; ++rank) {
        data::DataLoader l(dl_dataset(10), 2, true, 7);
        l.set_shard(rank, 3, equal);
        l.set_epoch(epoch);
        const auto mine = l.indices(epoch);
        EXPECT_EQ(static_cast<int64_t>(mine.size()), l.num_samples());
        EXPECT_EQ(l.num_samples(), equal ? 3 : (rank == 0 ? 4 : 3));
        EXPECT_EQ(l.size(), 2);
        for (std::size_t i = 0; i < mine.size(); ++i) EXPECT_EQ(mine[i], order[rank + 3 * i]) << "a strided slice of the epoch order";
        EXPECT_EQ(dl_epoch(l), mine);
        for (int64_t v : mine) EXPECT_TRUE(covered.insert(v).second) << "sample " << v << " in two shards";
        total += static_cast<int64_t>(mine.size());
      }
      EXPECT_EQ(total, equal ? 9 : 10);
      EXPECT_EQ(static_cast<int64_t>(covered.size()), total);
    }
  }
  data::DataLoader l(dl_dataset(10), 2);
  EXPECT_THROW(l.set_shard(3, 3), Error);
  EXPECT_THROW(l.set_shard(0, 0), Error);
  EXPECT_THROW(l.set_shard(-1, 2), Error);
}

TEST(DataLoader, PrefetchGivesIdenticalBatches) {
  // A random augmentation: results must not depend on which thread runs it or when.
  auto augment = [](data::Batch b, Generator& g) {
    b.inputs = b.inputs.clone();
    float* p = b.inputs.data<float>();
    for (int64_t i = 0; i < b.inputs.numel(); ++i) p[i] += static_cast<float>(g.uniform());
    return b;
  };
  const auto ds = [] {
    Generator g(3);
    return data::TensorDataset(randn({257, 5, 7}, DType::Float32, g), randint(0, 10, {257}, DType::Int64, g));
  }();
  data::DataLoader plain(ds, 16, true, 9, false, false);
  data::DataLoader fetched(ds, 16, true, 9, false, true);
  plain.set_transform(augment);
  fetched.set_transform(augment);
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::vector<data::Batch> x, y;
    for (auto& b : plain) x.push_back(b);
    for (auto& b : fetched) y.push_back(b);
    ASSERT_EQ(x.size(), 17u);
    ASSERT_EQ(y.size(), x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(x[i].inputs.sizes(), y[i].inputs.sizes());
      EXPECT_EQ(std::memcmp(x[i].inputs.data_ptr(), y[i].inputs.data_ptr(), x[i].inputs.nbytes()), 0);
      EXPECT_EQ(std::memcmp(x[i].targets.data_ptr(), y[i].targets.data_ptr(), x[i].targets.nbytes()), 0);
    }
    EXPECT_EQ(x.back().inputs.size(0), 257 - 16 * 16);
  }
}

TEST(DataLoader, BatchesCoverALargerDatasetExactly) {
  Generator g(1);
  const Tensor x = randn({1000, 784}, DType::Float32, g);
  data::DataLoader loader(data::TensorDataset(x, arange(1000)), 64, true, 5, false, true);
  double want = 0, got = 0;
  for (int64_t i = 0; i < x.numel(); ++i) want += x.data<float>()[i];
  int64_t rows = 0;
  for (auto& b : loader) {
    for (int64_t r = 0; r < b.inputs.size(0); ++r) {
      const int64_t id = b.targets.data<int64_t>()[r];
      ASSERT_EQ(std::memcmp(b.inputs.data<float>() + r * 784, x.data<float>() + id * 784, 784 * sizeof(float)), 0);
      for (int j = 0; j < 784; ++j) got += b.inputs.data<float>()[r * 784 + j];
    }
    rows += b.inputs.size(0);
  }
  EXPECT_EQ(rows, 1000);
  EXPECT_NEAR(got, want, 1e-6 * std::abs(want) + 1e-3);
}

TEST(DataLoader, StoppingMidEpochDoesNotHang) {
  std::atomic<int> made{0};
  auto slow = [&made](data::Batch b, Generator&) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ++made;
    return b;
  };
  dl_within(std::chrono::seconds(30), [&] {
    data::DataLoader loader(dl_dataset(100), 4, true, 1, false, true);
    loader.set_transform(slow);
    int n = 0;
    for (auto& b : loader) {
      (void)b;
      if (++n == 2) break;  // iterator destroyed with the worker one batch ahead
    }
    EXPECT_EQ(n, 2);
    EXPECT_LE(made.load(), 4) << "the worker must run at most one batch ahead";
  });
  // The loader destroyed while an iteration is still in progress: the iteration owns its data.
  dl_within(std::chrono::seconds(30), [&] {
    auto loader = std::make_unique<data::DataLoader>(dl_dataset(12), 4, false, 0, false, true);
    auto it = loader->begin();
    loader.reset();
    std::vector<int64_t> seen;
    for (; it != data::DataLoader::Iterator(); ++it) {
      const auto ids = dl_targets(*it);
      seen.insert(seen.end(), ids.begin(), ids.end());
    }
    EXPECT_EQ(seen.size(), 12u);
    EXPECT_EQ(seen.front(), 0);
    EXPECT_EQ(seen.back(), 11);
  });
  // Both destroyed together while the worker is blocked waiting for the consumer.
  dl_within(std::chrono::seconds(30), [&] {
    for (int i = 0; i < 50; ++i) {
      data::DataLoader loader(dl_dataset(40), 4, true, static_cast<uint64_t>(i), false, true);
      auto it = loader.begin();
      if (i % 2) ++it;
    }
  });
}

TEST(DataLoader, WorkerExceptionsReachTheConsumer) {
  for (bool prefetch : {false, true}) {
    data::DataLoader loader(dl_dataset(20), 4, false, 0, false, prefetch);
    loader.set_transform([](data::Batch b, Generator&) {
      if (b.targets.data<int64_t>()[0] == 8) throw Error("augment: bad batch starting at sample 8");
      return b;
    });
    int delivered = 0;
    dl_within(std::chrono::seconds(30), [&] {
      try {
        for (auto& b : loader) {
          (void)b;
          ++delivered;
        }
        ADD_FAILURE() << "the transform's error was swallowed";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("starting at sample 8"), std::string::npos);
      }
    });
    EXPECT_EQ(delivered, 2) << "prefetch=" << prefetch;
  }
  // An error on the very first batch surfaces from begin().
  data::DataLoader first(dl_dataset(8), 4, false, 0, false, true);
  first.set_transform([](data::Batch, Generator&) -> data::Batch { throw std::runtime_error("first"); });
  EXPECT_THROW(first.begin(), std::runtime_error);
}
