#pragma once
// mixprec with its CUDA backend. Include this instead of mixprec.hpp in translation units that
// nvcc compiles with MIXPREC_CUDA (link mixprec::cuda); anywhere else it is just mixprec.hpp.
//
// backends/cuda/ (namespace mixprec::gpu: not `cuda`, which CUB/libcu++ own at global scope and
// which `using namespace mixprec;` would otherwise make ambiguous):
//   runtime.hpp      error checks, current stream                       (host code)
//   allocator.hpp    caching allocator behind memory_stats(Device::CUDA) (host code)
//   copy.hpp         to_device / to_host                                 (host code)
//   streams.hpp      DeviceStream / DeviceEvent: overlap of communication (host code)
//   gemm_plan.hpp    row-major request -> column-major cuBLASLt call     (plain C++, CPU-tested)
//   cudnn_desc.hpp   cuDNN descriptors, conv output shape                (host code, CPU-tested)
//   common.cuh       dtype dispatch, launch shapes, strided gather/cast
//   gemm.cuh         run_gemm, matmul, linear (cuBLASLt, bias/GELU epilogues)
//   conv.cuh         conv2d forward / backward-data / backward-filter (cuDNN, cached algorithms)
//   norm.cuh         softmax, log_softmax, batch norm (cuDNN)
//   elementwise.cuh  activations (mixprec::fn formulas), sum / max_abs (CUB)
//   amp.cuh          multi-tensor unscale + inf check, on-device scale update, fused Adam(W)/SGD
//   attention.cuh    fused scaled-dot-product attention forward/backward (flash style, wmma)
//   kernels.cuh      the ops' CUDA entries (backends/device.hpp): copies, casts, add/mul/div, sum,
//                    activations, matmul, conv, softmax, batch norm; registered on inclusion
#include "mixprec/mixprec.hpp"

#if defined(__CUDACC__) && defined(MIXPREC_CUDA)
#include "mixprec/backends/cuda/amp.cuh"
#include "mixprec/backends/cuda/attention.cuh"
#include "mixprec/backends/cuda/conv.cuh"
#include "mixprec/backends/cuda/elementwise.cuh"
#include "mixprec/backends/cuda/gemm.cuh"
#include "mixprec/backends/cuda/kernels.cuh"
#include "mixprec/backends/cuda/norm.cuh"
#endif
