#pragma once
// CudaGraph: the CUDA DeviceGraph behind CapturedStep (backends/captured_step.hpp). Capture runs
// on a side stream (it must not be the legacy default stream) that first waits for the caller's
// stream; allocations made while capturing come from a private pool of the caching allocator
// (allocator.hpp) that lives as long as the graph; replays are launched on the caller's stream.
// The first node of the graph adds 1 to a device replay counter, which dropout mixes into its seed.
//   defines: CudaGraph, CapturedStep (= mixprec::CapturedStep)
#include <atomic>

#include "mixprec/backends/captured_step.hpp"
#include "mixprec/backends/cuda/common.cuh"

namespace mixprec::gpu {

namespace detail {
template <int = 0>  // a template, so that several units including this header link
__global__ void bump_replay_kernel(int64_t* counter) { ++*counter; }

inline CachingAllocator& cuda_caching_allocator() {
  auto* a = dynamic_cast<CachingAllocator*>(mixprec::detail::allocator_registry()[static_cast<int>(Device::CUDA)]);
  MIXPREC_CHECK(a != nullptr, "CapturedStep: CUDA graphs need mixprec's caching allocator for CUDA memory");
  return *a;
}
}  // namespace detail

class CudaGraph final : public DeviceGraph {
 public:
  CudaGraph() = default;
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  ~CudaGraph() override {
    // Replays may still run on the streams they were launched on: wait for the device before
    // the pool's memory may serve anyone else.
    if (exec_ || side_) cudaDeviceSynchronize();
    if (exec_) cudaGraphExecDestroy(exec_);
    if (pool_) detail::cuda_caching_allocator().release_pool(pool_, current_stream());
    if (side_) cudaStreamDestroy(side_);
    if (ready_) cudaEventDestroy(ready_);
    cudaGetLastError();
  }

  void begin_capture() override {
    const char* op = "CapturedStep (capture)";
    require_device(op);
    MIXPREC_CHECK(!side_ && !exec_, op, ": a graph is captured once");
    origin_ = current_stream();
    counter_ = zeros({}, DType::Int64, Device::CUDA);  // ordinary memory, owned by the graph
    check(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), op);
    check(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), op);
    check(cudaEventRecord(ready_, origin_), op);  // the side stream starts after the caller's queued work
    check(cudaStreamWaitEvent(side_, ready_, 0), op);
    static std::atomic<uint64_t> next_pool{1};
    pool_ = next_pool++;
    detail::cuda_caching_allocator().begin_pool(pool_, side_);
    set_current_stream(side_);
    const cudaError_t e = cudaStreamBeginCapture(side_, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
      set_current_stream(origin_);
      detail::cuda_caching_allocator().end_pool();
      check(e, op);
    }
    detail::bump_replay_kernel<<<1, 1, 0, side_>>>(counter_.data<int64_t>());
    check_launch(op);
  }

  void end_capture() override {
    const char* op = "CapturedStep (end of capture)";
    cudaGraph_t graph = nullptr;
    const cudaError_t e = cudaStreamEndCapture(side_, &graph);
    set_current_stream(origin_);
    detail::cuda_caching_allocator().end_pool();
    check(e, op);
    const cudaError_t ie = cudaGraphInstantiate(&exec_, graph, 0);
    cudaGraphDestroy(graph);
    check(ie, op);
  }

  void replay() override {
    MIXPREC_CHECK(exec_ != nullptr, "CapturedStep: no captured graph to replay");
    check(cudaGraphLaunch(exec_, current_stream()), "CapturedStep (replay)");
  }

  Tensor replay_counter() const override { return counter_; }

 private:
  cudaStream_t origin_ = nullptr, side_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  uint64_t pool_ = 0;
  Tensor counter_;
};

using CapturedStep = ::mixprec::CapturedStep;

}  // namespace mixprec::gpu
