#pragma once
// Host <-> device copies of whole tensors, on the current stream. Host code (cudart).
// Uploads make the CPU tensor contiguous first; CUDA tensors made here are always contiguous.
#include "mixprec/backends/cuda/runtime.hpp"
#include "mixprec/ops/tensor_ops.hpp"

namespace mixprec::gpu {

// A contiguous CUDA copy of a CPU tensor (same dtype). Returns once the copy is queued: a
// pageable source is staged by the driver before cudaMemcpyAsync returns, so `t` may change after.
inline Tensor to_device(const Tensor& t) {
  MIXPREC_CHECK(t.device() == Device::CPU, "gpu::to_device: tensor of shape ", t.sizes(), " is already on ", t.device());
  require_device("gpu::to_device");
  const Tensor src = t.contiguous();
  Tensor out = empty(src.sizes(), src.dtype(), Device::CUDA);
  if (src.nbytes() > 0)
    check(cudaMemcpyAsync(out.data_ptr(), src.data_ptr(), static_cast<std::size_t>(src.nbytes()), cudaMemcpyHostToDevice,
                          current_stream()),
          "gpu::to_device");
  return out;
}

// A CPU copy of a contiguous CUDA tensor; waits for the current stream (the host reads it next).
inline Tensor to_host(const Tensor& t) {
  MIXPREC_CHECK(t.device() == Device::CUDA, "gpu::to_host: tensor of shape ", t.sizes(), " is on ", t.device());
  MIXPREC_CHECK(t.is_contiguous(), "gpu::to_host: CUDA tensor of shape ", t.sizes(), " with strides ", t.strides(),
                " is not contiguous");
  Tensor out = empty(t.sizes(), t.dtype());
  if (t.nbytes() > 0) {
    check(cudaMemcpyAsync(out.data_ptr(), t.data_ptr(), static_cast<std::size_t>(t.nbytes()), cudaMemcpyDeviceToHost,
                          current_stream()),
          "gpu::to_host");
    synchronize();
  }
  return out;
}

}  // namespace mixprec::gpu
