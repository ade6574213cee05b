// NcclProcessGroup, compiled by nvcc and linked against NCCL. Without a GPU it must refuse with
// mixprec::Error naming the reason; with GPUs (mpirun -np <GPUs>, one per rank) its collectives
// are checked against values computed from the rank numbers on the host, and a
// DistributedDataParallel training step of GPT-mini and ResNet-20 over NCCL (communication
// stream, events, found-inf on the device) against the plain single-GPU step on the same data.
// test_nccl_single is this file without MPI (its bootstrap is nccl_bootstrap_self.cpp): one rank,
// for machines without Open MPI.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include <mixprec/cuda.hpp>
#include <mixprec/distributed/ddp.hpp>
#include <mixprec/distributed/nccl.cuh>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using distributed::ReduceOp;

namespace mixprec::testing {
// The group NCCL bootstraps over: MPI (nccl_bootstrap.cpp) or this process alone
// (nccl_bootstrap_self.cpp), linked in by the executable; this file is compiled once for both.
distributed::ProcessGroup& nccl_bootstrap();
}  // namespace mixprec::testing

namespace {

void check(cudaError_t e) { distributed::detail::cuda_check(e, "test"); }

// A CUDA tensor over cudaMalloc'ed memory holding `bytes`.
Tensor cuda_tensor(const void* bytes, const Shape& shape, DType d) {
  const int64_t n = numel_of(shape) * static_cast<int64_t>(itemsize(d));
  void* p = nullptr;
  check(cudaMalloc(&p, static_cast<std::size_t>(n > 0 ? n : 1)));
  check(cudaMemcpy(p, bytes, static_cast<std::size_t>(n), cudaMemcpyHostToDevice));
  return from_blob(p, shape, d, [](void* q) { cudaFree(q); }, Device::CUDA);
}
template <class T>
std::vector<T> to_host(const Tensor& t) {
  std::vector<T> out(static_cast<std::size_t>(t.numel()));
  check(cudaMemcpy(out.data(), t.data_ptr(), out.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}

// Rank-dependent values, exactly representable in every type used here.
float value(int rank, int64_t i) { return static_cast<float>(rank + 1) * 0.25f + static_cast<float>(i % 5) - 2.0f; }

template <class T>
void check_all_reduce(distributed::NcclProcessGroup& nccl, DType d) {
  const int p = nccl.size(), rank = nccl.rank();
  const int64_t n = 1001;
  std::vector<T> mine(n), expect_sum(n), expect_max(n);
  for (int64_t i = 0; i < n; ++i) {
    mine[i] = T(value(rank, i));
    float s = 0;
    for (int r = 0; r < p; ++r) s += static_cast<float>(T(value(r, i)));
    expect_sum[i] = T(s);  // the float32 sum, rounded once
    expect_max[i] = T(value(p - 1, i));
  }
  Tensor s = cuda_tensor(mine.data(), {n}, d), m = cuda_tensor(mine.data(), {n}, d);
  auto ws = nccl.all_reduce(s, ReduceOp::Sum);
  auto wm = nccl.all_reduce(m, ReduceOp::Max);
  ws->wait();
  wm->wait();
  const auto got_s = to_host<T>(s), got_m = to_host<T>(m);
  EXPECT_EQ(std::memcmp(got_s.data(), expect_sum.data(), n * sizeof(T)), 0) << d;
  EXPECT_EQ(std::memcmp(got_m.data(), expect_max.data(), n * sizeof(T)), 0) << d;
}

void run_collectives(distributed::NcclProcessGroup& nccl);

}  // namespace

TEST(NcclProcessGroup, RefusesWithoutAGpuOrRunsCollectives) {
  auto& bootstrap = mixprec::testing::nccl_bootstrap();
  if (!cuda_is_available()) {
    try {
      distributed::NcclProcessGroup nccl(bootstrap, 0);
      ADD_FAILURE() << "constructed an NCCL group without a GPU";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(cuda_unavailable_reason()), std::string::npos) << e.what();
    }
    GTEST_SKIP() << "no GPU: " << cuda_unavailable_reason();
  }
  const int p = bootstrap.size(), rank = bootstrap.rank();
  if (p > cuda_device_count()) {  // some ranks share a GPU: every rank must refuse, naming it
    try {
      distributed::NcclProcessGroup nccl(bootstrap, rank % cuda_device_count());
      ADD_FAILURE() << "two ranks on one GPU were accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("both use the GPU"), std::string::npos) << e.what();
    }
    GTEST_SKIP() << p << " ranks, " << cuda_device_count() << " GPUs: the collectives need one GPU per rank";
  }
  distributed::NcclProcessGroup nccl(bootstrap, rank);
  run_collectives(nccl);
}

TEST(NcclProcessGroup, OneRankNeedsNoBootstrap) {
  if (!cuda_is_available()) GTEST_SKIP() << "no GPU: " << cuda_unavailable_reason();
  if (mixprec::testing::nccl_bootstrap().size() != 1) GTEST_SKIP() << "a group of one, run with one process";
  distributed::NcclProcessGroup nccl(0);
  EXPECT_EQ(nccl.size(), 1);
  run_collectives(nccl);
  EXPECT_THROW({ distributed::NcclProcessGroup missing(cuda_device_count()); }, Error) << "a device that does not exist";
}

namespace {
void run_collectives(distributed::NcclProcessGroup& nccl) {
  const int p = nccl.size(), rank = nccl.rank();
  EXPECT_EQ(nccl.backend(), "nccl");
  check_all_reduce<float>(nccl, DType::Float32);
  check_all_reduce<mixprec::half>(nccl, DType::Float16);
  check_all_reduce<mixprec::bfloat16>(nccl, DType::BFloat16);

  std::vector<mixprec::bfloat16> b(77), expect_b(77);
  for (int64_t i = 0; i < 77; ++i) b[i] = mixprec::bfloat16(value(rank, i)), expect_b[i] = mixprec::bfloat16(value(p - 1, i));
  Tensor tb = cuda_tensor(b.data(), {77}, DType::BFloat16);
  nccl.broadcast(tb, p - 1)->wait();
  EXPECT_EQ(std::memcmp(to_host<mixprec::bfloat16>(tb).data(), expect_b.data(), 77 * sizeof(mixprec::bfloat16)), 0);

  std::vector<float> in(9), expect_g(9 * static_cast<std::size_t>(p)), zero(expect_g.size(), 0.0f);
  for (int64_t i = 0; i < 9; ++i) in[i] = value(rank, i);
  for (int r = 0; r < p; ++r)
    for (int64_t i = 0; i < 9; ++i) expect_g[9 * r + i] = value(r, i);
  Tensor tin = cuda_tensor(in.data(), {9}, DType::Float32), tout = cuda_tensor(zero.data(), {9 * p}, DType::Float32);
  nccl.all_gather(tout, tin)->wait();
  EXPECT_EQ(to_host<float>(tout), expect_g);
  nccl.barrier()->wait();
  EXPECT_THROW(nccl.all_reduce(empty({3})), Error) << "CPU tensors belong to the MPI group";

  // The stream-ordered forms, on a DeviceStream and on the compute stream, without a host wait
  // in between: the stream orders them after the event the compute stream recorded.
  auto side = device_kernels(Device::CUDA)->make_stream();
  auto ready = device_kernels(Device::CUDA)->make_event(), done = device_kernels(Device::CUDA)->make_event();
  Tensor t = full({513}, static_cast<double>(rank + 1), DType::Float32, Device::CUDA);
  ready->record(nullptr);
  ready->block(side.get());
  nccl.all_reduce_on(t, ReduceOp::Sum, side.get());
  nccl.broadcast_on(t, 0, side.get());
  done->record(side.get());
  done->block(nullptr);
  nccl.all_reduce_on(t, ReduceOp::Max, nullptr);
  const float expect = static_cast<float>(p * (p + 1) / 2);
  EXPECT_EQ(to_host<float>(t), std::vector<float>(513, expect));
}
}  // namespace

// A DDP training step over NCCL against the plain single-GPU step, on the same batch on every
// rank (so the average is the local gradient): gradients and updated weights agree, some
// buckets start during backward, and with fp16 the found-inf flag is reduced on the device.
namespace {

struct Workload {
  std::shared_ptr<nn::Module> model;
  std::function<Tensor(nn::Module&)> loss;
};

Workload make_workload(const std::string& name) {
  Generator gi(7), gd(8);
  if (name == "gptmini") {
    nn::models::GPTConfig cfg;
    cfg.vocab = 256, cfg.dropout = 0.0, cfg.n_layer = 4, cfg.d_model = 256, cfg.n_head = 4, cfg.block_size = 128;
    cfg.mlp_hidden = 4 * cfg.d_model;
    auto m = std::make_shared<nn::models::GPT>(cfg, gi);
    m->to(Device::CUDA);
    const Tensor idx = randint(0, cfg.vocab, {8, cfg.block_size}, DType::Int64, gd).to(Device::CUDA);
    const Tensor tgt = randint(0, cfg.vocab, {8, cfg.block_size}, DType::Int64, gd).to(Device::CUDA);
    return {m, [idx, tgt](nn::Module& mod) { return static_cast<nn::models::GPT&>(mod).loss(idx, tgt); }};
  }
  auto m = nn::models::resnet20(10, 3, false, gi);
  m->to(Device::CUDA);
  const Tensor x = randn({32, 3, 32, 32}, DType::Float32, gd).to(Device::CUDA).contiguous(MemoryFormat::ChannelsLast);
  const Tensor y = randint(0, 10, {32}, DType::Int64, gd).to(Device::CUDA);
  return {m, [x, y](nn::Module& mod) { return cross_entropy(mod.forward(x), y); }};
}

Tensor flat_grads(nn::Module& m) {
  std::vector<Tensor> v;
  for (const Tensor& p : m.parameters()) v.push_back(p.grad().cpu().to(DType::Float32).reshape({-1}));
  return cat(v, 0);
}
Tensor flat_weights(nn::Module& m) {
  std::vector<Tensor> v;
  for (const Tensor& p : m.parameters()) v.push_back(p.detach().cpu().to(DType::Float32).reshape({-1}));
  return cat(v, 0);
}

}  // namespace

TEST(NcclDistributedDataParallel, TrainingStepOfGptMiniAndResnet20MatchesThePlainStep) {
  if (!cuda_is_available()) GTEST_SKIP() << "no GPU: " << cuda_unavailable_reason();
  auto& bootstrap = mixprec::testing::nccl_bootstrap();
  if (bootstrap.size() > cuda_device_count()) GTEST_SKIP() << "one GPU per rank needed";
  auto nccl = std::make_shared<distributed::NcclProcessGroup>(bootstrap, bootstrap.rank());
  for (const char* name : {"gptmini", "resnet20"}) {
    for (bool fp16 : {false, true}) {
      SCOPED_TRACE(std::string(name) + (fp16 ? " fp16 + GradScaler" : " fp32"));
      Workload plain = make_workload(name), dist = make_workload(name);
      distributed::DistributedDataParallel ddp(*dist.model, nccl, distributed::DDPOptions{.bucket_cap_mb = 1.0});
      optim::SGD opt_plain(plain.model->parameters(), 0.05, 0.9), opt(dist.model->parameters(), 0.05, 0.9);
      amp::GradScaler sc_plain(1024.0, 2.0, 0.5, 2000, fp16), sc(1024.0, 2.0, 0.5, 2000, fp16);
      distributed::all_reduce_found_inf(sc, nccl);
      auto step = [&](Workload& w, optim::Optimizer& o, amp::GradScaler& s) {
        o.zero_grad();
        Tensor loss;
        {
          autocast ac{Device::CUDA, DType::Float16, fp16};
          if (&w == &dist) ddp.sync_buffers();  // identical buffers everywhere here; the broadcast still runs
          loss = w.loss(*w.model);
        }
        s.scale(loss).backward();
        const Tensor g = flat_grads(*w.model);
        s.step(o);
        s.update();
        return g;
      };
      const Tensor g_plain = step(plain, opt_plain, sc_plain), g = step(dist, opt, sc);
      if (std::string(name) == "gptmini" && nccl->rank() == 0)
        std::printf("DDP over NCCL, %d rank(s): %s all-reduces %lld bytes per step in %zu buckets\n", nccl->size(), name,
                    static_cast<long long>(ddp.bytes_per_step()), ddp.num_buckets());
      EXPECT_GT(ddp.num_buckets(), 1u);
      EXPECT_GT(ddp.buckets_started_during_backward(), 0u) << "reduction overlaps backward";
      EXPECT_LT(mixprec::testing::rel_error(g, g_plain), 1e-5) << "averaged gradients (scaled, with fp16)";
      EXPECT_LT(mixprec::testing::rel_error(flat_weights(*dist.model), flat_weights(*plain.model)), 1e-5);
      EXPECT_EQ(sc.get_scale(), sc_plain.get_scale());
    }
  }
}
