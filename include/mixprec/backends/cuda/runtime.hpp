#pragma once
// CUDA runtime glue shared by the allocator, the copies and the .cuh kernels: error checks that
// throw mixprec::Error, and the current stream. Host code only (g++ or nvcc), linked to cudart.
#include <cuda_runtime_api.h>

#include "mixprec/core/capabilities.hpp"
#include "mixprec/core/error.hpp"

namespace mixprec::gpu {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // reset the (non-sticky) error so later calls do not report it again
    fail(what, ": CUDA error ", static_cast<int>(e), " (", cudaGetErrorString(e), ")");
  }
}

// Throws with the probe's reason when this process cannot use CUDA.
inline void require_device(const char* op) {
  MIXPREC_CHECK(cuda_is_available(), op, ": CUDA is not available: ", cuda_unavailable_reason());
}

// The stream every mixprec CUDA call is issued on (per host thread; the legacy default stream
// until set). Kernels, copies, cuBLASLt and cuDNN all use it, so work is ordered without syncs.
inline cudaStream_t& current_stream_slot() {
  thread_local cudaStream_t s = nullptr;
  return s;
}
inline cudaStream_t current_stream() { return current_stream_slot(); }
inline void set_current_stream(cudaStream_t s) { current_stream_slot() = s; }

// Makes `s` current for a scope.
class StreamGuard {
 public:
  explicit StreamGuard(cudaStream_t s) : prev_(current_stream()) { set_current_stream(s); }
  ~StreamGuard() { set_current_stream(prev_); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  cudaStream_t prev_;
};

inline void synchronize() { check(cudaStreamSynchronize(current_stream()), "gpu::synchronize"); }

// Milliseconds per call of f over `iters` calls, timed with CUDA events on the current stream
// (host time between launches counts: a step that waits on the host is slower on the device too).
template <class F>
double time_ms(int iters, F&& f) {
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "gpu::time_ms");
  check(cudaEventCreate(&stop), "gpu::time_ms");
  float ms = 0;
  try {
    check(cudaEventRecord(start, current_stream()), "gpu::time_ms");
    for (int i = 0; i < iters; ++i) f();
    check(cudaEventRecord(stop, current_stream()), "gpu::time_ms");
    check(cudaEventSynchronize(stop), "gpu::time_ms");
    check(cudaEventElapsedTime(&ms, start, stop), "gpu::time_ms");
  } catch (...) {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    throw;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return iters > 0 ? double(ms) / iters : 0.0;
}

}  // namespace mixprec::gpu
