#pragma once
// The CPU backend's kernel table: the same DeviceKernels that the CUDA backend fills
// (backends/device.hpp), filled here from the kernels in backends/cpu/. An op body holds its
// argument checks, its autocast policy and its autograd, and reaches its kernel through
// detail::device_kernel(op, tensor, &DeviceKernels::entry) whatever the device: the CPU is one
// backend among others, and a test can swap its table like any other.
//
// Why it is included last (by mixprec/mixprec.hpp): the CPU kernels, like CUDA's, build on the op
// layer's helpers (contiguous_raw, ConvGeom, the optimizer hyper-parameters), so the table is
// assembled after the op layer, and registered at static initialisation of every program that
// includes mixprec.hpp -- before any global of the program's own translation unit that uses ops.
//
// Compiled mode (MIXPREC_COMPILED_LIB, the mixprec::compiled target): the table and every kernel it
// points to are built once, into the library (src/mixprec_compiled*.cpp), and a program's units only
// see the declaration below -- instantiating and optimising the whole table is most of the cost of
// compiling a unit that includes mixprec.hpp. Header-only use (the default) defines it inline here.
#include "mixprec/backends/device.hpp"

// The element-wise maps (three ISA copies of every functor, for every dtype) and the norms are a
// unit of their own in the compiled library, about half of the table's compile time, so that two
// cores build it side by side: src/mixprec_compiled.cpp (the table, the other areas) and
// src/mixprec_compiled_elementwise.cpp (a program-like unit with MIXPREC_COMPILED_ELEMENTWISE_PART).
// Header-only, one unit has both.
#if (MIXPREC_HEADER_DEFINITIONS && !defined(MIXPREC_BUILDING_COMPILED_LIB)) || defined(MIXPREC_COMPILED_ELEMENTWISE_PART)
#include "mixprec/backends/cpu/elementwise.hpp"
#include "mixprec/backends/cpu/norm.hpp"

namespace mixprec::cpu::detail {
MIXPREC_OUTLINE void fill_elementwise_and_norm_kernels(DeviceKernels& t) {
  fill_elementwise_kernels(t);
  fill_norm_kernels(t);
}
}  // namespace mixprec::cpu::detail
#endif

#if !MIXPREC_HEADER_DEFINITIONS  // compiled mode, in a program's unit (core/config.hpp)
namespace mixprec::cpu::detail {
const DeviceKernels& cpu_kernel_table();
inline const bool kCpuKernelsRegistered = (set_device_kernels(Device::CPU, &cpu_kernel_table()), true);
}  // namespace mixprec::cpu::detail
#else

// Each area fills its entries from its own header (one place per kernel family):
#include "mixprec/backends/cpu/attention.hpp"
#include "mixprec/backends/cpu/conv.hpp"
#include "mixprec/backends/cpu/linalg.hpp"
#include "mixprec/backends/cpu/loss.hpp"
#include "mixprec/backends/cpu/optim.hpp"
#include "mixprec/backends/cpu/pointwise.hpp"
#include "mixprec/backends/cpu/reduce.hpp"
#include "mixprec/backends/cpu/shape.hpp"
#include "mixprec/backends/cpu/pool.hpp"
#include "mixprec/backends/cpu/training.hpp"

namespace mixprec::cpu {
namespace detail {

MIXPREC_OUTLINE void fill_elementwise_and_norm_kernels(DeviceKernels& t);  // above, or the library's second unit

MIXPREC_OUTLINE const DeviceKernels& cpu_kernel_table() {
  static const DeviceKernels k = [] {
    DeviceKernels t;
    // Host <-> device transfers (to_device, to_host) and graphs (make_graph) have no CPU meaning.
    // The areas fill disjoint entries, so the order does not matter.
    fill_elementwise_and_norm_kernels(t);
    fill_linalg_kernels(t);
    fill_attention_kernels(t);
    fill_loss_kernels(t);
    fill_conv_kernels(t);
    fill_training_kernels(t);
    fill_reduce_kernels(t);  // reduceshape: reduce, compare, pointwise, cat, index, cumsum, param_op
    fill_pointwise_kernels(t);
    fill_shape_kernels(t);
    fill_optim_kernels(t);
    fill_pool_kernels(t);

    return t;
  }();
  return k;
}

inline const bool kCpuKernelsRegistered = (set_device_kernels(Device::CPU, &cpu_kernel_table()), true);

}  // namespace detail
}  // namespace mixprec::cpu

#endif  // compiled mode
