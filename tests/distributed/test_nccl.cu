// NcclProcessGroup, compiled by nvcc and linked against NCCL. Without a GPU it must refuse with
// mixprec::Error naming the reason; with GPUs (mpirun -np <GPUs>, one per rank) its collectives
// are checked against values computed from the rank numbers on the host.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include <mixprec/distributed/nccl.cuh>

using namespace mixprec;
using distributed::ReduceOp;

namespace mixprec::testing {
distributed::ProcessGroup& nccl_bootstrap();  // nccl_bootstrap.cpp
}

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
  distributed::NcclProcessGroup nccl(bootstrap, rank % cuda_device_count());
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
}
