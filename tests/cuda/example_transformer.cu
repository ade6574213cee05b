// The transformer example compiled by nvcc with the CUDA backend's headers (see example_resnet.cu).
#include <mixprec/cuda.hpp>

#include "transformer/main.cpp"
