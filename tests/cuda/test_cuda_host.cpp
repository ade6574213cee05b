// Host-side CUDA checks that run without a GPU: a build linked against the CUDA runtime probes
// for a device and, where there is none, says why and refuses CUDA tensors with mixprec::Error.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

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
