// DistributedDataParallel on 2 processes: identical weights on every rank that match a single
// process trained on the global batch; one loss scale everywhere when only one rank sees inf;
// gradient accumulation without communication on non-final micro-steps; unused parameters;
// the data sampler's disjoint shards.
#include <gtest/gtest.h>

#include <atomic>
#include <set>

#include "distributed/dist_test_util.hpp"

using namespace mixprec;
using distributed::DDPOptions;
using distributed::DistributedDataParallel;
using distributed::ReduceOp;
using mixprec::testing::flat_params;
using mixprec::testing::gather_all;
using mixprec::testing::same_bits_on_all_ranks;
using mixprec::testing::world;
using mixprec::testing::world_ptr;

namespace {

constexpr int64_t kIn = 12, kClasses = 5, kShard = 8;  // samples per rank per step

std::shared_ptr<nn::Sequential> make_mlp(uint64_t seed) {
  Generator g(seed);
  return std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
      std::make_shared<nn::Linear>(kIn, 32, true, g), std::make_shared<nn::ReLU>(),
      std::make_shared<nn::Linear>(32, 32, true, g), std::make_shared<nn::ReLU>(),
      std::make_shared<nn::Linear>(32, kClasses, true, g)});
}

// The same global batch on every rank; rank r trains on rows [r * n, (r + 1) * n).
data::Batch global_batch(uint64_t step, int64_t rows) {
  Generator g(1000 + step);
  return {randn({rows, kIn}, DType::Float32, g), randint(0, kClasses, {rows}, DType::Int64, g)};
}
data::Batch my_shard(const data::Batch& b, int64_t n) {
  const int64_t r = world().rank();
  return {b.inputs.narrow(0, r * n, n).contiguous(), b.targets.narrow(0, r * n, n).contiguous()};
}

bool bits_equal(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.numel() == b.numel() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), static_cast<std::size_t>(a.nbytes())) == 0;
}

// Forwards to the world group and counts all-reduces: proves when DDP communicates.
class CountingGroup final : public distributed::ProcessGroup {
 public:
  int rank() const override { return world().rank(); }
  int size() const override { return world().size(); }
  std::string backend() const override { return "counting-mpi"; }
  std::shared_ptr<distributed::Work> broadcast(const Tensor& t, int root) override { return world().broadcast(t, root); }
  std::shared_ptr<distributed::Work> all_reduce(const Tensor& t, ReduceOp op) override {
    ++all_reduces;
    return world().all_reduce(t, op);
  }
  std::shared_ptr<distributed::Work> all_gather(const Tensor& o, const Tensor& i) override { return world().all_gather(o, i); }
  std::shared_ptr<distributed::Work> barrier() override { return world().barrier(); }
  std::atomic<int> all_reduces{0};
};

}  // namespace

TEST(DistributedDataParallel, MatchesOneProcessOnTheGlobalBatchWithIdenticalWeightsOnEveryRank) {
  const int p = world().size();
  auto ref = make_mlp(7);
  auto model = make_mlp(7 + 1000 * static_cast<uint64_t>(world().rank()));  // ranks start apart
  DistributedDataParallel ddp(*model, world_ptr(), DDPOptions{.bucket_cap_mb = 0.002});
  EXPECT_GT(ddp.num_buckets(), 1u);
  EXPECT_TRUE(same_bits_on_all_ranks(flat_params(*model))) << "parameters are broadcast from rank 0";
  EXPECT_TRUE(bits_equal(flat_params(*model), flat_params(*ref)));
  const Tensor initial = flat_params(*ref).clone();

  optim::SGD opt(model->parameters(), 0.1, 0.9), opt_ref(ref->parameters(), 0.1, 0.9);
  std::size_t overlapped = 0;
  for (uint64_t step = 0; step < 6; ++step) {
    const data::Batch global = global_batch(step, p * kShard), mine = my_shard(global, kShard);
    opt.zero_grad();
    cross_entropy(ddp.forward(mine.inputs), mine.targets).backward();
    overlapped += ddp.buckets_started_during_backward();
    opt.step();
    opt_ref.zero_grad();
    cross_entropy(ref->forward(global.inputs), global.targets).backward();
    opt_ref.step();
  }
  const Tensor w = flat_params(*model), w_ref = flat_params(*ref);
  EXPECT_TRUE(same_bits_on_all_ranks(w)) << "every rank must hold bit-identical weights";
  EXPECT_LT(mixprec::testing::rel_error(w, w_ref), 1e-5);
  EXPECT_GT(mixprec::testing::rel_error(initial, w_ref), 1e-3) << "training must have moved the weights";
  EXPECT_GT(overlapped, 0u) << "some buckets must start reducing while backward still runs";
}

TEST(DistributedDataParallel, SixteenBitGradientsAreAveragedInFloat32AndRoundedOnce) {
  const int p = world().size();
  for (DType d : {DType::BFloat16, DType::Float16}) {
    auto model = make_mlp(11);
    model->to(d);
    DistributedDataParallel ddp(*model, world_ptr());
    const data::Batch mine = my_shard(global_batch(0, p * kShard), kShard);
    auto loss = [&] { return cross_entropy(ddp.forward(mine.inputs.to(d)), mine.targets); };
    {
      auto local_only = ddp.no_sync();
      loss().backward();
    }
    std::vector<Tensor> local;  // every rank's local gradients, gathered
    for (const Tensor& q : model->parameters()) {
      local.push_back(gather_all(q.grad()));
      q.set_grad(Tensor());
    }
    loss().backward();  // the same gradients, now averaged
    const auto params = model->parameters();
    for (std::size_t i = 0; i < params.size(); ++i) {
      const Tensor g = params[i].grad();
      ASSERT_EQ(g.dtype(), d);
      Tensor sum = zeros(g.sizes(), DType::Float32);
      for (int r = 0; r < p; ++r) sum = add(sum, local[i].select(0, r).to(DType::Float32));
      const Tensor expect = div(sum, scalar_tensor(p, DType::Float32)).to(d);
      EXPECT_TRUE(bits_equal(g, expect)) << d << " parameter " << i;
    }
  }
}

TEST(DistributedDataParallel, InfOnOneRankMakesEveryRankSkipAndKeepTheSameScale) {
  const int p = world().size();
  auto model = make_mlp(3);
  DistributedDataParallel ddp(*model, world_ptr());
  optim::AdamW opt(model->parameters(), 1e-3);
  amp::GradScaler scaler(1024.0, 2.0, 0.5, /*growth_interval=*/2);
  distributed::all_reduce_found_inf(scaler, world_ptr());

  // mode 0: clean; 1: inf written into one gradient of the last rank after the all-reduce;
  // 2: inf in the last rank's input, which the gradient all-reduce itself spreads.
  for (int mode : {0, 1, 0, 2, 0}) {
    data::Batch mine = my_shard(global_batch(static_cast<uint64_t>(mode), p * kShard), kShard);
    const bool bad_rank = world().rank() == p - 1;
    if (mode == 2 && bad_rank) mine.inputs.data<float>()[0] = INFINITY;
    const Tensor before = flat_params(*model).clone();
    opt.zero_grad();
    {
      autocast ac{Device::CPU, DType::Float16};
      Tensor loss = cross_entropy(ddp.forward(mine.inputs), mine.targets);
      scaler.scale(loss).backward();
    }
    if (mode == 1 && bad_rank) model->parameters()[0].grad().data<float>()[5] = INFINITY;
    const bool stepped = scaler.step(opt);
    scaler.update();
    const Tensor flags = gather_all(full({1}, stepped ? 1.0 : 0.0, DType::Int32));
    for (int r = 0; r < p; ++r) EXPECT_EQ(flags.data<int32_t>()[r], mode == 0 ? 1 : 0) << "mode " << mode << " rank " << r;
    EXPECT_TRUE(same_bits_on_all_ranks(full({1}, scaler.get_scale(), DType::Float64))) << "mode " << mode;
    EXPECT_TRUE(same_bits_on_all_ranks(flat_params(*model))) << "mode " << mode;
    if (mode != 0) EXPECT_TRUE(bits_equal(before, flat_params(*model))) << "a skipped step leaves the weights";
  }
  // Clean, inf (halve), clean, inf (halve), clean: 1024 / 4, growth interval never reached twice in a row.
  EXPECT_EQ(scaler.get_scale(), 256.0);
}

TEST(DistributedDataParallel, GradientAccumulationReducesOnlyOnTheFinalMicroStep) {
  const int p = world().size();
  constexpr int kMicro = 3;
  auto ref = make_mlp(5), model = make_mlp(5);
  auto counting = std::make_shared<CountingGroup>();
  DistributedDataParallel ddp(*model, counting, DDPOptions{.bucket_cap_mb = 0.002});
  optim::SGD opt(model->parameters(), 0.05), opt_ref(ref->parameters(), 0.05);
  for (uint64_t step = 0; step < 2; ++step) {
    opt.zero_grad();
    opt_ref.zero_grad();
    for (int m = 0; m < kMicro; ++m) {
      const data::Batch global = global_batch(10 * step + static_cast<uint64_t>(m), p * kShard), mine = my_shard(global, kShard);
      cross_entropy(ref->forward(global.inputs), global.targets).backward();
      const int before = counting->all_reduces.load();
      if (m + 1 < kMicro) {
        auto local_only = ddp.no_sync();
        cross_entropy(ddp.forward(mine.inputs), mine.targets).backward();
        EXPECT_EQ(counting->all_reduces.load(), before) << "no communication on micro-step " << m;
      } else {
        EXPECT_FALSE(same_bits_on_all_ranks(model->parameters()[0].grad())) << "accumulated locally so far";
        cross_entropy(ddp.forward(mine.inputs), mine.targets).backward();
        EXPECT_EQ(counting->all_reduces.load() - before, static_cast<int>(ddp.num_buckets()));
      }
    }
    const auto params = model->parameters(), ref_params = ref->parameters();
    for (std::size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(same_bits_on_all_ranks(params[i].grad())) << "parameter " << i;
      EXPECT_LT(mixprec::testing::rel_error(params[i].grad(), ref_params[i].grad()), 1e-5) << "parameter " << i;
    }
    opt.step();
    opt_ref.step();
  }
  EXPECT_TRUE(same_bits_on_all_ranks(flat_params(*model)));
  EXPECT_LT(mixprec::testing::rel_error(flat_params(*model), flat_params(*ref)), 1e-5);
}

namespace {
// `a` always takes part; `b` only where use_b; `c` never.
struct ThreeHeads : nn::Module {
  explicit ThreeHeads(uint64_t seed) : nn::Module("ThreeHeads") {
    Generator g(seed);
    a = register_module("a", std::make_shared<nn::Linear>(4, 3, true, g));
    b = register_module("b", std::make_shared<nn::Linear>(4, 3, true, g));
    c = register_module("c", std::make_shared<nn::Linear>(4, 3, true, g));
  }
  Tensor forward(const Tensor& x) override { return use_b ? add(a->forward(x), b->forward(x)) : a->forward(x); }
  std::shared_ptr<nn::Linear> a, b, c;
  bool use_b = false;
};
}  // namespace

TEST(DistributedDataParallel, UnusedParameters) {
  const bool last = world().rank() == world().size() - 1;
  Generator g(1);
  const Tensor x = randn({6, 4}, DType::Float32, g);
  {
    ThreeHeads m(1);
    DistributedDataParallel ddp(m, world_ptr());
    m.use_b = last;
    // c is unused everywhere: every rank reports it, after reducing so that no rank hangs.
    try {
      sum(ddp.forward(x)).backward();
      ADD_FAILURE() << "expected an error about unused parameters";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("c.weight"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("find_unused_parameters"), std::string::npos) << e.what();
    }
  }
  ThreeHeads m(1);
  DistributedDataParallel ddp(m, world_ptr(), DDPOptions{.find_unused_parameters = true});
  m.use_b = last;
  Tensor local_b;
  {
    auto local_only = ddp.no_sync();
    sum(ddp.forward(x)).backward();
    local_b = m.b->weight.grad().defined() ? m.b->weight.grad().clone() : zeros({3, 4});
  }
  m.zero_grad();
  sum(ddp.forward(x)).backward();
  // b took part on one rank: every rank gets the average (that rank's gradient / p).
  ASSERT_TRUE(m.b->weight.grad().defined());
  EXPECT_TRUE(same_bits_on_all_ranks(m.b->weight.grad()));
  const Tensor all_b = gather_all(local_b);
  Tensor expect = zeros({3, 4});
  for (int r = 0; r < world().size(); ++r) expect = add(expect, all_b.select(0, r));
  EXPECT_LT(mixprec::testing::rel_error(m.b->weight.grad(), div(expect, scalar_tensor(world().size()))), 1e-6);
  // c took part nowhere: no gradient, as without DDP.
  EXPECT_FALSE(m.c->weight.grad().defined());
  EXPECT_TRUE(m.a->weight.grad().defined());
}

TEST(DistributedDataParallel, RefusesDifferentModelsOnDifferentRanks) {
  Generator g(0);
  nn::Linear m(4, world().rank() == 0 ? 3 : 2, true, g);
  // Every rank sees every rank's description, so all of them refuse; none waits.
  EXPECT_THROW(DistributedDataParallel(m, world_ptr()), Error);
}

TEST(DistributedSampler, ShardsAreDisjointCoverTheEpochAndReshuffleEachEpoch) {
  const int p = world().size();
  const int64_t n = 103;
  data::TensorDataset ds(arange(n, DType::Float32).reshape({n, 1}), arange(n, DType::Int64));
  data::DataLoader loader(ds, 5, /*shuffle=*/true, /*seed=*/42);
  loader.set_shard(world().rank(), p, /*equal_sizes=*/true);
  std::vector<int64_t> first;
  for (uint64_t epoch = 0; epoch < 2; ++epoch) {
    const std::vector<int64_t> mine = loader.indices(epoch);
    EXPECT_EQ(static_cast<int64_t>(mine.size()), n / p);
    // Iteration visits exactly these samples in this order.
    loader.set_epoch(epoch);
    std::vector<int64_t> seen;
    for (auto& b : loader)
      for (int64_t i = 0; i < b.targets.numel(); ++i) seen.push_back(b.targets.data<int64_t>()[i]);
    EXPECT_EQ(seen, mine);
    Tensor t = empty({static_cast<int64_t>(mine.size())}, DType::Int64);
    std::copy(mine.begin(), mine.end(), t.data<int64_t>());
    const Tensor all = gather_all(t);
    const std::set<int64_t> distinct(all.data<int64_t>(), all.data<int64_t>() + all.numel());
    EXPECT_EQ(static_cast<int64_t>(distinct.size()), n / p * p) << "shards overlap";
    if (epoch == 0) first = mine;
    else EXPECT_NE(first, mine) << "each epoch has its own order";
  }
}
