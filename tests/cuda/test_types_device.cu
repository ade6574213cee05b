// The 16-bit types compile into device code and are layout-compatible with CUDA's own types
// (this file is compiled by nvcc; the kernels are launched only where a GPU exists).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <gtest/gtest.h>

#include "mixprec/dtype/bfloat16.hpp"
#include "mixprec/dtype/half.hpp"

static_assert(sizeof(mixprec::half) == sizeof(__half) && alignof(mixprec::half) == alignof(__half));
static_assert(sizeof(mixprec::bfloat16) == sizeof(__nv_bfloat16) && alignof(mixprec::bfloat16) == alignof(__nv_bfloat16));

__global__ void scale_kernel(mixprec::half* h, mixprec::bfloat16* b, float s, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    h[i] = mixprec::half(float(h[i]) * s);
    b[i] = mixprec::bfloat16(float(b[i]) * s);
  }
}

TEST(CudaTypes, HostSideConversionsMatchCudaHeaders) {
  // cuda_fp16.h's host conversion and ours round the same way.
  for (float f : {0.1f, 1.0f / 3.0f, 65504.0f, 65520.0f, 1e-7f, -2.5f}) {
    const __half ch = __float2half_rn(f);
    EXPECT_EQ(mixprec::half(f).x, __half_as_ushort(ch)) << f;
    const __nv_bfloat16 cb = __float2bfloat16_rn(f);
    EXPECT_EQ(mixprec::bfloat16(f).x, __bfloat16_as_ushort(cb)) << f;
    EXPECT_EQ(float(mixprec::half(ch)), __half2float(ch));
  }
}

TEST(CudaTypes, KernelRunsWhereAGpuExists) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device: the kernel was compiled for the GPU but cannot run here";
  }
  mixprec::half* h = nullptr;
  mixprec::bfloat16* b = nullptr;
  ASSERT_EQ(cudaMallocManaged(&h, 4 * sizeof(*h)), cudaSuccess);
  ASSERT_EQ(cudaMallocManaged(&b, 4 * sizeof(*b)), cudaSuccess);
  for (int i = 0; i < 4; ++i) {
    h[i] = mixprec::half(float(i));
    b[i] = mixprec::bfloat16(float(i));
  }
  scale_kernel<<<1, 32>>>(h, b, 0.5f, 4);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(float(h[i]), 0.5f * i);
    EXPECT_EQ(float(b[i]), 0.5f * i);
  }
  cudaFree(h);
  cudaFree(b);
}
