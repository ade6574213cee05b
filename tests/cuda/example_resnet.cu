// The ResNet example compiled by nvcc with the CUDA backend's headers: CI checks that the
// examples build (for sm_80 and sm_90, warnings as errors) and link against cuBLAS/cuDNN.
#include <mixprec/cuda.hpp>

#include "resnet/main.cpp"
