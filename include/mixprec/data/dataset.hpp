#pragma once
// In-memory tensor datasets and a batching loader: seeded per-epoch shuffling, disjoint shards
// for data parallelism, and an optional background thread that prepares the next batch.
//
// defines: Batch, TensorDataset (alias Dataset), DataLoader
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>
#include <vector>

#include "mixprec/autograd/engine.hpp"
#include "mixprec/ops/tensor_ops.hpp"
#include "mixprec/tensor/generator.hpp"

namespace mixprec::data {

struct Batch {
  Tensor inputs;
  Tensor targets;
};

// Samples are rows along dim 0 of `inputs` and `targets`. Both are kept contiguous so that a
// batch is one memcpy per row.
class TensorDataset {
 public:
  TensorDataset(Tensor inputs, Tensor targets) {
    check("inputs", inputs);
    check("targets", targets);
    MIXPREC_CHECK(inputs.size(0) == targets.size(0), "TensorDataset: inputs have ", inputs.size(0),
                  " samples (shape ", inputs.sizes(), ") but targets have ", targets.size(0), " (shape ",
                  targets.sizes(), ")");
    inputs_ = inputs.detach().contiguous();
    targets_ = targets.detach().contiguous();
  }

  int64_t size() const { return inputs_.size(0); }
  const Tensor& inputs() const { return inputs_; }
  const Tensor& targets() const { return targets_; }

  // Rows idx[0..n) gathered into new contiguous tensors [n, ...].
  Batch gather(const int64_t* idx, int64_t n) const {
    return {gather_rows(inputs_, idx, n), gather_rows(targets_, idx, n)};
  }
  Batch gather(const std::vector<int64_t>& idx) const { return gather(idx.data(), static_cast<int64_t>(idx.size())); }
  Batch operator[](int64_t i) const { return gather(&i, 1); }

 private:
  static void check(const char* what, const Tensor& t) {
    MIXPREC_CHECK(t.defined(), "TensorDataset: ", what, " is an undefined tensor");
    MIXPREC_CHECK(t.dim() >= 1, "TensorDataset: ", what, " must have a sample dimension first, got a 0-d tensor");
    MIXPREC_CHECK(t.device() == Device::CPU, "TensorDataset: ", what, " of shape ", t.sizes(), " is on ", t.device(),
                  "; the loader gathers on the CPU");
  }
  Tensor gather_rows(const Tensor& src, const int64_t* idx, int64_t n) const {
    Shape shape = src.sizes();
    shape[0] = n;
    Tensor out = empty(shape, src.dtype());
    const auto row = static_cast<std::size_t>(src.numel() / std::max<int64_t>(src.size(0), 1) *
                                              static_cast<int64_t>(src.element_size()));
    const auto* s = static_cast<const char*>(src.data_ptr());
    auto* d = static_cast<char*>(out.data_ptr());
    const int64_t rows = src.size(0);
    for (int64_t i = 0; i < n; ++i) {
      MIXPREC_CHECK(idx[i] >= 0 && idx[i] < rows, "TensorDataset: sample index ", idx[i], " out of range for ", rows,
                    " samples");
      if (row) std::memcpy(d + static_cast<std::size_t>(i) * row, s + static_cast<std::size_t>(idx[i]) * row, row);
    }
    return out;
  }

  Tensor inputs_;
  Tensor targets_;
};
using Dataset = TensorDataset;

// Iterate with `for (auto& batch : loader)`. Each iteration (each begin()) runs epoch `epoch()`
// and then advances it, so consecutive loops see fresh shuffles; set_epoch(e) picks the epoch
// explicitly (as PyTorch's DistributedSampler.set_epoch). The order depends only on
// (seed, epoch, shard), never on prefetching or timing.
// Named arguments: `DataLoader(ds, {.batch_size = 64, .shuffle = true, .seed = 1})`.
struct DataLoaderOptions {
  int64_t batch_size = 1;
  bool shuffle = false;
  uint64_t seed = 0;
  bool drop_last = false, prefetch = false;
};

class DataLoader {
 public:
  // Runs on each gathered batch (on the prefetch thread when prefetching); `gen` is seeded from
  // (seed, epoch, rank, batch index) so random augmentations are reproducible.
  using Transform = std::function<Batch(Batch batch, Generator& gen)>;

  DataLoader(TensorDataset dataset, const DataLoaderOptions& o)
      : DataLoader(std::move(dataset), o.batch_size, o.shuffle, o.seed, o.drop_last, o.prefetch) {}
  DataLoader(TensorDataset dataset, int64_t batch_size, bool shuffle = false, uint64_t seed = 0,
             bool drop_last = false, bool prefetch = false)
      : dataset_(std::move(dataset)), batch_size_(batch_size), shuffle_(shuffle), seed_(seed), drop_last_(drop_last),
        prefetch_(prefetch) {
    MIXPREC_CHECK(batch_size > 0, "DataLoader: batch_size must be positive, got ", batch_size);
  }

  // This process sees only samples at positions rank, rank + world, ... of each epoch's order:
  // shards are disjoint and together cover the epoch. With equal_sizes, the last
  // size % world samples of the order are dropped so every rank gets the same number of
  // samples (and batches), which lock-step data parallelism needs.
  void set_shard(int64_t rank, int64_t world, bool equal_sizes = false) {
    MIXPREC_CHECK(world >= 1 && rank >= 0 && rank < world, "DataLoader::set_shard: need 0 <= rank < world, got rank ",
                  rank, ", world ", world);
    rank_ = rank;
    world_ = world;
    equal_shards_ = equal_sizes;
  }
  void set_epoch(uint64_t epoch) { epoch_ = epoch; }
  uint64_t epoch() const { return epoch_; }
  void set_transform(Transform t) { transform_ = std::move(t); }

  const TensorDataset& dataset() const { return dataset_; }
  int64_t batch_size() const { return batch_size_; }
  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_; }

  // Samples this shard visits per epoch.
  int64_t num_samples() const {
    const int64_t n = dataset_.size();
    if (equal_shards_) return n / world_;
    return n / world_ + (rank_ < n % world_ ? 1 : 0);
  }
  // Batches per epoch.
  int64_t size() const {
    const int64_t n = num_samples();
    return drop_last_ ? n / batch_size_ : (n + batch_size_ - 1) / batch_size_;
  }

  // The dataset indices this shard visits in `epoch`, in order (before batching).
  std::vector<int64_t> indices(uint64_t epoch) const {
    const int64_t n = dataset_.size();
    std::vector<int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    if (shuffle_) {
      Generator g(mix(seed_, epoch));
      for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[g.below(static_cast<uint64_t>(i) + 1)]);
    }
    const int64_t used = equal_shards_ ? n / world_ * world_ : n;
    std::vector<int64_t> mine;
    mine.reserve(static_cast<std::size_t>(num_samples()));
    for (int64_t i = rank_; i < used; i += world_) mine.push_back(order[i]);
    return mine;
  }

 private:
  struct Epoch;

 public:
  class Iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    using pointer = Batch*;
    using reference = Batch&;

    Iterator() = default;
    Batch& operator*() const {
      MIXPREC_CHECK(state_ && !state_->finished(), "DataLoader: dereferencing an iterator past the last batch");
      return state_->current;
    }
    Batch* operator->() const { return &**this; }
    Iterator& operator++() {
      MIXPREC_CHECK(state_ && !state_->finished(), "DataLoader: incrementing an iterator past the last batch");
      state_->advance();
      return *this;
    }
    // Index of the current batch within the epoch.
    int64_t index() const { return state_ ? state_->pos : 0; }
    friend bool operator==(const Iterator& a, const Iterator& b) { return a.done() == b.done() && (a.done() || a.state_ == b.state_); }

   private:
    friend class DataLoader;
    explicit Iterator(std::shared_ptr<Epoch> s) : state_(std::move(s)) {}
    bool done() const { return !state_ || state_->finished(); }
    std::shared_ptr<Epoch> state_;  // shared: the prefetch thread lives until the last copy dies
  };

  Iterator begin() {
    auto s = std::make_shared<Epoch>(*this, epoch_);
    ++epoch_;
    s->start();
    return Iterator(std::move(s));
  }
  Iterator end() { return Iterator(); }

 private:
  static uint64_t mix(uint64_t seed, uint64_t epoch) {
    uint64_t z = seed ^ (epoch * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  // One pass over the data. Owns copies of everything it reads, so it outlives the loader safely.
  struct Epoch {
    Epoch(const DataLoader& l, uint64_t epoch)
        : dataset(l.dataset_), order(l.indices(epoch)), transform(l.transform_), batch_size(l.batch_size_),
          num_batches(l.size()), prefetch(l.prefetch_), seed(mix(mix(l.seed_, epoch), static_cast<uint64_t>(l.rank_) + 1)) {}
    Epoch(const Epoch&) = delete;
    Epoch& operator=(const Epoch&) = delete;
    ~Epoch() {
      if (worker.joinable()) {
        {
          std::lock_guard<std::mutex> lk(mu);
          stop = true;
        }
        cv.notify_all();
        worker.join();
      }
    }

    bool finished() const { return pos >= num_batches; }

    Batch make(int64_t b) const {
      const int64_t begin = b * batch_size;
      const int64_t n = std::min<int64_t>(batch_size, static_cast<int64_t>(order.size()) - begin);
      Batch batch = dataset.gather(order.data() + begin, n);
      if (transform) {
        Generator g(mix(seed, static_cast<uint64_t>(b)));
        batch = transform(std::move(batch), g);
      }
      return batch;
    }

    void start() {
      if (num_batches == 0) return;
      if (prefetch) worker = std::thread([this] { run(); });
      current = fetch(0);
    }
    void advance() {
      ++pos;
      current = finished() ? Batch{} : fetch(pos);
    }

    Batch fetch(int64_t b) {
      if (!prefetch) return make(b);
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return ready || error; });
      if (ready) {
        Batch out = std::move(slot);
        ready = false;
        cv.notify_all();
        return out;
      }
      std::rethrow_exception(error);
    }

    // Producer: keeps at most one finished batch waiting in `slot`.
    void run() {
      try {
        for (int64_t b = 0; b < num_batches; ++b) {
          {
            std::unique_lock<std::mutex> lk(mu);
            cv.wait(lk, [&] { return !ready || stop; });
            if (stop) return;
          }
          Batch next = make(b);
          std::lock_guard<std::mutex> lk(mu);
          if (stop) return;
          slot = std::move(next);
          ready = true;
          cv.notify_all();
        }
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu);
        error = std::current_exception();
        cv.notify_all();
      }
    }

    const TensorDataset dataset;
    const std::vector<int64_t> order;
    const Transform transform;
    const int64_t batch_size;
    const int64_t num_batches;
    const bool prefetch;
    const uint64_t seed;

    int64_t pos = 0;
    Batch current;

    std::mutex mu;
    std::condition_variable cv;
    std::thread worker;
    Batch slot;
    bool ready = false;
    bool stop = false;
    std::exception_ptr error;
  };

  TensorDataset dataset_;
  int64_t batch_size_;
  bool shuffle_;
  uint64_t seed_;
  bool drop_last_;
  bool prefetch_;
  int64_t rank_ = 0;
  int64_t world_ = 1;
  bool equal_shards_ = false;
  uint64_t epoch_ = 0;
  Transform transform_;
};

}  // namespace mixprec::data
