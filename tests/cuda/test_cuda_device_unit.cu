// test_cuda_device as one nvcc unit: every unit that includes mixprec/cuda.hpp pays cicc's two
// front ends and the host compile again (~220 s of CPU on CI's 2 cores), so the device tests are
// separate files for reading and one translation unit for building.
#include "cuda/test_cuda_device.cu"
#include "cuda/test_cuda_attention.cu"
#include "cuda/test_cuda_step.cu"
#include "cuda/test_cuda_plans.cu"
