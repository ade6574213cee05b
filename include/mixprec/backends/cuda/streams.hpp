#pragma once
// The CUDA DeviceStream and DeviceEvent (backends/device.hpp): a non-blocking stream beside the
// current stream (data-parallel communication overlapping backward), and events that order the
// two on the device. nullptr stands for the compute stream, gpu::current_stream() at the call.
// Host code (cudart).
#include <memory>

#include "mixprec/backends/cuda/runtime.hpp"
#include "mixprec/backends/device.hpp"

namespace mixprec::gpu {

class CudaStream final : public DeviceStream {
 public:
  CudaStream() {
    require_device("gpu::CudaStream");
    // Non-blocking: it does not wait for the legacy default stream's work, nor that for its own.
    check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "gpu::CudaStream");
  }
  ~CudaStream() override { cudaStreamDestroy(s_); }  // queued work still finishes
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  void* native_handle() const override { return s_; }
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// The cudaStream_t of a DeviceStream of this backend (nullptr: the compute stream).
inline cudaStream_t native_stream(DeviceStream* s) { return s ? static_cast<cudaStream_t>(s->native_handle()) : current_stream(); }

class CudaEvent final : public DeviceEvent {
 public:
  CudaEvent() {
    require_device("gpu::CudaEvent");
    check(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming), "gpu::CudaEvent");
  }
  ~CudaEvent() override { cudaEventDestroy(e_); }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  void record(DeviceStream* stream) override { check(cudaEventRecord(e_, native_stream(stream)), "gpu::CudaEvent::record"); }
  void block(DeviceStream* stream) override { check(cudaStreamWaitEvent(native_stream(stream), e_, 0), "gpu::CudaEvent::block"); }
  void synchronize() override { check(cudaEventSynchronize(e_), "gpu::CudaEvent::synchronize"); }

 private:
  cudaEvent_t e_ = nullptr;
};

}  // namespace mixprec::gpu
