// Host-side CUDA checks that run without a GPU: a build linked against the CUDA runtime probes
// for a device and, where there is none, says why and refuses CUDA tensors with mixprec::Error.
#include <gtest/gtest.h>

#include <cstring>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cuda/copy.hpp>

using namespace mixprec;

TEST(CudaHost, ProbeAnswersCleanly) {
#if !defined(MIXPREC_CUDA)
  GTEST_FAIL() << "this test must be built with mixprec::cuda";
#endif
  if (cuda_is_available()) {
    EXPECT_GT(cuda_device_count(), 0);
    EXPECT_TRUE(cuda_unavailable_reason().empty());
    return;
  }
  // Here: no driver, so cudaGetDeviceCount fails (error 35, insufficient driver) and we report it.
  EXPECT_EQ(cuda_device_count(), 0);
  EXPECT_NE(cuda_unavailable_reason().find("cudaGetDeviceCount"), std::string::npos) << cuda_unavailable_reason();
  EXPECT_FALSE(is_bf16_supported(Device::CUDA));
  try {
    ones({2}).to(Device::CUDA);
    FAIL() << "moving to CUDA without a device must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaGetDeviceCount"), std::string::npos) << e.what();
  }
  EXPECT_THROW(empty({2}, kFloat32, Device::CUDA), Error);
}

TEST(CudaAllocator, StatsWorkAndRefusalsNameTheReason) {
  const MemoryStats before = memory_stats(Device::CUDA);  // registered with the CUDA build
  EXPECT_EQ(allocator(Device::CUDA).device(), Device::CUDA);
  if (cuda_is_available()) GTEST_SKIP() << "a device is present: CudaAllocatorGpu covers allocation";
  try {
    allocator(Device::CUDA).allocate(1024);
    FAIL() << "allocating without a device must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1024 bytes"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(cuda_unavailable_reason()), std::string::npos) << e.what();
  }
  const MemoryStats after = memory_stats(Device::CUDA);
  EXPECT_EQ(after.allocated_bytes, before.allocated_bytes);
  EXPECT_EQ(after.reserved_bytes, before.reserved_bytes);
  EXPECT_EQ(after.num_allocs, before.num_allocs);
  EXPECT_NO_THROW(empty_cache(Device::CUDA));
  EXPECT_NO_THROW(reset_peak_memory_stats(Device::CUDA));
}

TEST(CudaAllocator, SizeClassesBoundTheSlack) {
  EXPECT_EQ(gpu::size_class(0), 512);
  EXPECT_EQ(gpu::size_class(1), 512);
  EXPECT_EQ(gpu::size_class(513), 1024);
  EXPECT_EQ(gpu::size_class((1 << 20) - 1), 1 << 20);
  EXPECT_EQ(gpu::size_class(1 << 20), 1 << 20);
  EXPECT_EQ(gpu::size_class((1 << 20) + 1), (1 << 20) + (1 << 18));
  int64_t prev = 0;
  for (int64_t n = 1; n < (int64_t{1} << 32); n = n * 3 / 2 + 7) {
    const int64_t c = gpu::size_class(n);
    EXPECT_GE(c, n);
    EXPECT_EQ(c % 512, 0) << n;                      // every block keeps 512-byte (and so 16-byte) alignment
    EXPECT_LE(c - n, std::max<int64_t>(511, n / 4)) << n;  // at most 25% slack above 1 MiB
    EXPECT_GE(c, prev);                              // monotone: a larger request never gets a smaller class
    prev = c;
  }
}

// Allocation, reuse, statistics and copies on a real device.
TEST(CudaAllocatorGpu, CachesBlocksAndCountsExactly) {
  if (!cuda_is_available()) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
  empty_cache(Device::CUDA);
  const MemoryStats s0 = memory_stats(Device::CUDA);
  void* p = nullptr;
  {
    Tensor t = empty({1000}, DType::Float32, Device::CUDA);
    p = t.data_ptr();
    const MemoryStats s1 = memory_stats(Device::CUDA);
    EXPECT_EQ(s1.allocated_bytes - s0.allocated_bytes, 4000);
    EXPECT_EQ(s1.reserved_bytes - s0.reserved_bytes, gpu::size_class(4000));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
  }
  const MemoryStats s2 = memory_stats(Device::CUDA);
  EXPECT_EQ(s2.allocated_bytes, s0.allocated_bytes);
  EXPECT_EQ(s2.reserved_bytes - s0.reserved_bytes, gpu::size_class(4000));  // cached, not returned
  {
    Tensor t = empty({990}, DType::Float32, Device::CUDA);  // same size class, same stream: reused
    EXPECT_EQ(t.data_ptr(), p);
  }
  empty_cache(Device::CUDA);
  EXPECT_EQ(memory_stats(Device::CUDA).reserved_bytes, s0.reserved_bytes);
}

TEST(CudaAllocatorGpu, HostDeviceRoundTripIsExact) {
  if (!cuda_is_available()) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16, DType::Int64}) {
    const Tensor x = randn({3, 5}).to(d).t();  // non-contiguous: uploaded as contiguous
    const Tensor back = gpu::to_host(gpu::to_device(x));
    EXPECT_EQ(back.sizes(), x.sizes());
    const Tensor xc = x.contiguous();
    EXPECT_EQ(std::memcmp(back.data_ptr(), xc.data_ptr(), static_cast<std::size_t>(xc.nbytes())), 0) << d;
  }
}
