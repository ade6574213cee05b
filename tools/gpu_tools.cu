// mixprec_gpu_selftest and mixprec_gpu_bench as one nvcc unit: each unit that includes
// mixprec/cuda.hpp costs ~130 s of CPU on CI's 2 cores, so the two tools are compiled once and
// linked into two programs (tools/gpu_tool_main.cpp picks the entry).
#include "gpu_selftest.cu"
#include "gpu_bench.cu"
