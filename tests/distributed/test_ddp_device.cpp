// DistributedDataParallel of device modules on 2 processes, without a GPU: the emulated CUDA
// device (emulated_device.hpp) with real MPI collectives on a real asynchronous communication
// stream. Checked: bucket assignment and hook order as on the CPU, the stream/event order
// (each bucket's all-reduce after a compute-stream event, enqueued while backward still runs;
// the averaging after the compute stream waited for the communication stream), bit-identical
// weights on every rank that match one process on the global batch, 16-bit gradients averaged
// in float32 and rounded once, buffers from rank 0, inf on one rank only -> every rank skips
// with one loss scale, and no host transfer in a step beyond those of the single-device step.
#include <gtest/gtest.h>

#include <algorithm>

#include "distributed/emulated_device.hpp"

using namespace mixprec;
using distributed::DDPOptions;
using distributed::DistributedDataParallel;
using mixprec::testing::same_bits_on_all_ranks;
using mixprec::testing::world;
namespace emu = mixprec::testing::emulated;

namespace ddp_device_test {  // the test executable is a unity build: keep these names apart

constexpr int64_t kIn = 12, kClasses = 5, kShard = 8;

std::shared_ptr<nn::Sequential> make_mlp(uint64_t seed) {
  Generator g(seed);
  return std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
      std::make_shared<nn::Linear>(kIn, 32, true, g), std::make_shared<nn::ReLU>(),
      std::make_shared<nn::Linear>(32, 32, true, g), std::make_shared<nn::ReLU>(),
      std::make_shared<nn::Linear>(32, kClasses, true, g)});
}
data::Batch global_batch(uint64_t step, int64_t rows) {
  Generator g(2000 + step);
  return {randn({rows, kIn}, DType::Float32, g), randint(0, kClasses, {rows}, DType::Int64, g)};
}
data::Batch my_shard(const data::Batch& b) {
  const int64_t r = world().rank();
  return {b.inputs.narrow(0, r * kShard, kShard).contiguous(), b.targets.narrow(0, r * kShard, kShard).contiguous()};
}
// Parameters flattened to one float32 CPU vector (read through a transfer, as from a GPU).
Tensor flat_cpu(nn::Module& m) {
  std::vector<Tensor> flat;
  for (const Tensor& p : m.parameters()) flat.push_back(p.detach().cpu().to(DType::Float32).reshape({-1}));
  return cat(flat, 0);
}
bool bits_equal(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.numel() == b.numel() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), static_cast<std::size_t>(a.nbytes())) == 0;
}
int transfers() { return emu::trace().count("to_host") + emu::trace().count("to_device"); }
std::size_t index_of(const std::vector<std::string>& log, const std::string& what, std::size_t from = 0) {
  for (std::size_t i = from; i < log.size(); ++i)
    if (log[i] == what) return i;
  return log.size();
}

class DdpOnDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    int level = 0;
    MPI_Query_thread(&level);
    ASSERT_GE(level, MPI_THREAD_MULTIPLE) << "the emulated group's two communicators run on threads of their own";
    emu::trace().logging = false;
    emu::trace().log.clear();
  }
  emu::Install device_;
  std::shared_ptr<emu::EmulatedGroup> group_ = std::make_shared<emu::EmulatedGroup>();
};


TEST_F(DdpOnDevice, MatchesOneProcessOnTheGlobalBatchWithStreamOrderedBucketsAndNoExtraTransfers) {
  const int p = world().size();
  auto ref = make_mlp(7);
  auto plain = make_mlp(7);  // the single-device step, for the transfer count
  auto model = make_mlp(7 + 1000 * static_cast<uint64_t>(world().rank()));  // ranks start apart
  model->to(Device::CUDA);
  plain->to(Device::CUDA);
  DistributedDataParallel ddp(*model, group_, DDPOptions{.bucket_cap_mb = 0.002});
  EXPECT_EQ(ddp.device(), Device::CUDA);
  ASSERT_NE(ddp.comm_stream(), nullptr);
  ASSERT_GT(ddp.num_buckets(), 1u);
  // Buckets hold parameters in reverse order (as backward produces them), each index once.
  std::vector<std::size_t> order;
  for (std::size_t b = 0; b < ddp.num_buckets(); ++b)
    for (std::size_t i : ddp.bucket_params(b)) order.push_back(i);
  std::vector<std::size_t> expect(model->parameters().size());
  for (std::size_t i = 0; i < expect.size(); ++i) expect[i] = expect.size() - 1 - i;
  EXPECT_EQ(order, expect);
  int64_t numel = 0;
  for (const Tensor& q : model->parameters()) numel += q.numel();
  EXPECT_EQ(ddp.bytes_per_step(), numel * 4) << "float32 buckets, every trainable parameter once";
  EXPECT_TRUE(same_bits_on_all_ranks(flat_cpu(*model))) << "parameters are broadcast from rank 0";
  EXPECT_TRUE(bits_equal(flat_cpu(*model), flat_cpu(*ref)));

  optim::SGD opt(model->parameters(), 0.1, 0.9), opt_ref(ref->parameters(), 0.1, 0.9), opt_plain(plain->parameters(), 0.1, 0.9);
  std::size_t overlapped = 0;
  for (uint64_t step = 0; step < 6; ++step) {
    const data::Batch global = global_batch(step, p * kShard), mine = my_shard(global);
    int before = transfers();
    opt_plain.zero_grad();
    cross_entropy(plain->forward(mine.inputs.to(Device::CUDA)), mine.targets.to(Device::CUDA)).backward();
    opt_plain.step();
    const int plain_transfers = transfers() - before;

    emu::trace().logging = step == 0;
    before = transfers();
    opt.zero_grad();
    cross_entropy(ddp.forward(mine.inputs.to(Device::CUDA)), mine.targets.to(Device::CUDA)).backward();
    overlapped += ddp.buckets_started_during_backward();
    opt.step();
    EXPECT_EQ(transfers() - before, plain_transfers) << "step " << step << ": DDP adds no host round trip";
    emu::trace().logging = false;

    opt_ref.zero_grad();
    cross_entropy(ref->forward(global.inputs), global.targets).backward();
    opt_ref.step();
  }
  // Step 0's order of operations: per bucket, an event recorded on the compute stream that the
  // communication stream waits for, then its all-reduce there; the first all-reduce enqueued
  // before backward's last matmul (overlap); at the end the compute stream waits for the
  // communication stream, and only then are the averages written into .grad().
  const std::vector<std::string>& log = emu::trace().log;
  std::size_t at = 0, first_reduce = log.size();
  for (std::size_t b = 0; b < ddp.num_buckets(); ++b) {
    const std::size_t rec = index_of(log, "record compute", at), blk = index_of(log, "block comm", rec),
                      red = index_of(log, "all_reduce comm", blk);
    ASSERT_LT(red, log.size()) << "bucket " << b;
    EXPECT_EQ(blk, rec + 1) << "bucket " << b;
    EXPECT_EQ(red, blk + 1) << "bucket " << b;
    if (b == 0) first_reduce = red;
    at = red + 1;
  }
  std::size_t last_matmul = 0;
  for (std::size_t i = 0; i < log.size(); ++i)
    if (log[i] == "matmul") last_matmul = i;
  EXPECT_LT(first_reduce, last_matmul) << "the first bucket's all-reduce starts while backward still computes";
  const std::size_t comm_done = index_of(log, "record comm", at), compute_waits = index_of(log, "block compute", comm_done);
  ASSERT_LT(compute_waits, log.size());
  EXPECT_EQ(compute_waits, comm_done + 1);
  EXPECT_EQ(index_of(log, "binary_scalar", compute_waits), compute_waits + 1) << "the average follows the wait";
  EXPECT_EQ(index_of(log, "all_reduce compute"), log.size()) << "no collective on the compute stream in an SGD step";

  const Tensor w = flat_cpu(*model), w_ref = flat_cpu(*ref);
  EXPECT_TRUE(same_bits_on_all_ranks(w)) << "every rank must hold bit-identical weights";
  EXPECT_LT(mixprec::testing::rel_error(w, w_ref), 1e-5);
  EXPECT_GT(overlapped, 0u);
}

TEST_F(DdpOnDevice, SixteenBitGradientsAreAveragedInFloat32AndRoundedOnceOnTheDevice) {
  const int p = world().size();
  auto model = make_mlp(11);
  model->to(DType::BFloat16);
  model->to(Device::CUDA);
  DistributedDataParallel ddp(*model, group_);
  const data::Batch mine = my_shard(global_batch(0, p * kShard));
  auto loss = [&] { return cross_entropy(ddp.forward(mine.inputs.to(DType::BFloat16).to(Device::CUDA)), mine.targets.to(Device::CUDA)); };
  {
    auto local_only = ddp.no_sync();
    const int before = emu::trace().count("all_reduce comm");
    loss().backward();
    EXPECT_EQ(emu::trace().count("all_reduce comm"), before) << "no_sync: no communication";
  }
  std::vector<Tensor> local;
  for (const Tensor& q : model->parameters()) {
    local.push_back(mixprec::testing::gather_all(q.grad().cpu()));
    q.set_grad(Tensor());
  }
  loss().backward();
  const auto params = model->parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Tensor g = params[i].grad();
    ASSERT_EQ(g.dtype(), DType::BFloat16);
    ASSERT_EQ(g.device(), Device::CUDA);
    Tensor sum = zeros(g.sizes(), DType::Float32);
    for (int r = 0; r < p; ++r) sum = add(sum, local[i].select(0, r).to(DType::Float32));
    const Tensor expect = div(sum, scalar_tensor(p, DType::Float32)).to(DType::BFloat16);
    EXPECT_TRUE(bits_equal(g.cpu(), expect)) << "parameter " << i;
  }
}

TEST_F(DdpOnDevice, BuffersComeFromRankZeroOnTheCommunicationStream) {
  Generator g(world().rank() + 1);
  nn::Sequential m(std::initializer_list<std::shared_ptr<nn::Module>>{std::make_shared<nn::Conv2d>(2, 3, 3, 1, 1, 1, 1, false, g),
                                                                      std::make_shared<nn::BatchNorm2d>(3)});
  m.to(Device::CUDA);
  DistributedDataParallel ddp(m, group_);
  Tensor x = randn({2, 2, 4, 4}, DType::Float32, g).to(Device::CUDA);  // different data on each rank
  sum(ddp.forward(x)).backward();
  // BatchNorm's running statistics diverge in forward; the next forward first takes rank 0's.
  EXPECT_FALSE(same_bits_on_all_ranks(m.buffers()[0].cpu()));
  const int before = emu::trace().count("broadcast comm");
  ddp.sync_buffers();
  EXPECT_EQ(emu::trace().count("broadcast comm") - before, static_cast<int>(m.buffers().size()));
  for (const Tensor& b : m.buffers()) EXPECT_TRUE(same_bits_on_all_ranks(b.cpu()));
}

TEST_F(DdpOnDevice, InfOnOneRankMakesEveryRankSkipWithOneScaleAndTheFlagStaysOnTheDevice) {
  const int p = world().size();
  auto model = make_mlp(3);
  model->to(Device::CUDA);
  DistributedDataParallel ddp(*model, group_);
  optim::AdamW opt(model->parameters(), 1e-3);
  amp::GradScaler scaler(1024.0, 2.0, 0.5, /*growth_interval=*/2);
  distributed::all_reduce_found_inf(scaler, group_);
  // mode 0: clean; 1: inf written into one gradient of the last rank after the all-reduce;
  // 2: inf in the last rank's input, which the gradient all-reduce itself spreads.
  for (int mode : {0, 1, 0, 2, 0}) {
    data::Batch mine = my_shard(global_batch(static_cast<uint64_t>(mode), p * kShard));
    const bool bad_rank = world().rank() == p - 1;
    if (mode == 2 && bad_rank) mine.inputs.data<float>()[0] = INFINITY;
    const Tensor before = flat_cpu(*model);
    opt.zero_grad();
    {
      autocast ac{Device::CUDA, DType::Float16};
      Tensor loss = cross_entropy(ddp.forward(mine.inputs.to(Device::CUDA)), mine.targets.to(Device::CUDA));
      scaler.scale(loss).backward();
    }
    if (mode == 1 && bad_rank) emu::host(model->parameters()[0].grad()).data<float>()[5] = INFINITY;
    const int reads = emu::trace().count("to_host"), flag_reduces = emu::trace().count("all_reduce compute");
    const amp::StepResult stepped = scaler.step(opt);
    scaler.update();
    EXPECT_EQ(emu::trace().count("to_host"), reads) << "mode " << mode << ": step and update read nothing back";
    EXPECT_EQ(emu::trace().count("all_reduce compute") - flag_reduces, 1) << "the device flag, on the compute stream";
    const Tensor flags = mixprec::testing::gather_all(full({1}, stepped ? 1.0 : 0.0, DType::Int32));
    for (int r = 0; r < p; ++r) EXPECT_EQ(flags.data<int32_t>()[r], mode == 0 ? 1 : 0) << "mode " << mode << " rank " << r;
    EXPECT_TRUE(same_bits_on_all_ranks(full({1}, scaler.get_scale(), DType::Float64))) << "mode " << mode;
    EXPECT_TRUE(same_bits_on_all_ranks(flat_cpu(*model))) << "mode " << mode;
    if (mode != 0) EXPECT_TRUE(bits_equal(before, flat_cpu(*model))) << "a skipped step leaves the weights";
  }
  EXPECT_EQ(scaler.get_scale(), 256.0);
}

TEST_F(DdpOnDevice, RefusesParametersOnTwoDevices) {
  nn::Sequential m(std::initializer_list<std::shared_ptr<nn::Module>>{std::make_shared<nn::Linear>(4, 3), std::make_shared<nn::Linear>(3, 2)});
  m.children().front()->to(Device::CUDA);
  try {
    DistributedDataParallel ddp(m, group_);
    ADD_FAILURE() << "expected an error about parameters on two devices";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must be a contiguous tensor on cuda"), std::string::npos) << e.what();
  }
}

}  // namespace ddp_device_test
