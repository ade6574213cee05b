#pragma once
// mixprec: header-only mixed-precision training. Include this one header.
//
// core/      config, errors, CPU feature detection
// dtype/     half, bfloat16, DType, conversions, the dtype dispatch helper
// tensor/    device, allocator + memory statistics, storage, generator, Tensor
// autograd/  grad mode, graph nodes, engine
// amp/       op-eligibility table, autocast, precision trace
// ops/       the op list and every op (one dispatch point: ops/dispatch.hpp + amp/autocast.hpp)
// backends/  cpu/ (Eigen, OpenMP loops); cuda/ (nvcc only)
#include "mixprec/core/config.hpp"
#include "mixprec/core/capabilities.hpp"
#include "mixprec/core/cpu_features.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/dtype/bfloat16.hpp"
#include "mixprec/dtype/convert.hpp"
#include "mixprec/dtype/dispatch.hpp"
#include "mixprec/dtype/dtype.hpp"
#include "mixprec/dtype/half.hpp"
#include "mixprec/tensor/allocator.hpp"
#include "mixprec/tensor/device.hpp"
#include "mixprec/tensor/generator.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/autograd/grad_mode.hpp"
#include "mixprec/autograd/anomaly.hpp"
#include "mixprec/autograd/function.hpp"
#include "mixprec/amp/policy.hpp"
#include "mixprec/amp/trace.hpp"
#include "mixprec/amp/autocast.hpp"
#include "mixprec/ops/tensor_ops.hpp"
#include "mixprec/ops/elementwise.hpp"
#include "mixprec/ops/reduce.hpp"
#include "mixprec/ops/linalg.hpp"
#include "mixprec/ops/shape.hpp"
#include "mixprec/ops/conv.hpp"
#include "mixprec/ops/pool.hpp"
#include "mixprec/ops/activation.hpp"
#include "mixprec/ops/normalization.hpp"
#include "mixprec/ops/loss.hpp"
#include "mixprec/ops/attention.hpp"
#include "mixprec/autograd/engine.hpp"
#include "mixprec/autograd/gradcheck.hpp"
#include "mixprec/autograd/checkpoint.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/optim/sgd.hpp"
#include "mixprec/optim/adam.hpp"
#include "mixprec/optim/stochastic_rounding.hpp"
#include "mixprec/optim/lr_scheduler.hpp"
#include "mixprec/optim/ema.hpp"
#include "mixprec/optim/clip_grad.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/nn/nn.hpp"
#include "mixprec/data/idx.hpp"
#include "mixprec/data/dataset.hpp"
#include "mixprec/data/text.hpp"
#include "mixprec/io/safetensors.hpp"
#include "mixprec/io/checkpoint.hpp"
// Last: the CPU backend's kernel table, built on the op layer above (backends/cpu/kernels.hpp).
#include "mixprec/backends/cpu/kernels.hpp"
