#pragma once
// What this process can run on. CUDA is probed once through the runtime when the build links
// it (mixprec::cuda defines MIXPREC_CUDA); a machine without a driver or device answers false
// with the runtime's reason instead of failing later.
#include <string>

#include "mixprec/core/cpu_features.hpp"
#include "mixprec/tensor/device.hpp"

#if defined(MIXPREC_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mixprec {

namespace detail {
struct CudaProbe {
  bool available = false;
  int devices = 0;
  int major = 0, minor = 0;  // compute capability of device 0
  std::string reason;
};
// Probed once; tests substitute a probe to exercise the decisions that depend on it.
inline CudaProbe& cuda_probe() {
  static CudaProbe p = [] {
    CudaProbe r;
#if defined(MIXPREC_CUDA)
    const cudaError_t e = cudaGetDeviceCount(&r.devices);
    if (e != cudaSuccess) {
      r.reason = std::string("cudaGetDeviceCount failed with error ") + std::to_string(static_cast<int>(e)) + " (" +
                 cudaGetErrorString(e) + ")";
      r.devices = 0;
      return r;
    }
    if (r.devices == 0) {
      r.reason = "no CUDA device found";
      return r;
    }
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
      r.major = prop.major;
      r.minor = prop.minor;
    }
    r.available = true;
#else
    r.reason = "this program was built without CUDA (include <mixprec/cuda.hpp> in a file nvcc compiles and link mixprec::cuda)";
#endif
    return r;
  }();
  return p;
}
}  // namespace detail

inline bool cuda_is_available() { return detail::cuda_probe().available; }
inline int cuda_device_count() { return detail::cuda_probe().devices; }
// Why cuda_is_available() is false (empty when it is true).
inline const std::string& cuda_unavailable_reason() { return detail::cuda_probe().reason; }

// bfloat16 tensors work on every CPU (converted through float32; fast where avx512_bf16 exists);
// on CUDA they need compute capability 8.0 (Ampere) or newer.
inline bool is_bf16_supported(Device d) {
  if (d == Device::CPU) return true;
  return cuda_is_available() && detail::cuda_probe().major >= 8;
}

}  // namespace mixprec
