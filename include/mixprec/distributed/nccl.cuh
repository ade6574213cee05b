#pragma once
// NcclProcessGroup: ProcessGroup over NCCL (in the CUDA toolkit) for CUDA tensors. nvcc only;
// link mixprec::nccl. One process per GPU; the NCCL unique id travels over a bootstrap group:
//
//   auto mpi = std::make_shared<distributed::MpiProcessGroup>();
//   auto nccl = std::make_shared<distributed::NcclProcessGroup>(*mpi, distributed::local_rank());
//
// A group of one process needs no bootstrap (nor MPI): NcclProcessGroup(device). Two ranks on one
// GPU would serialise (or deadlock) in NCCL, so the constructor compares the devices' UUIDs over
// the bootstrap and every rank refuses, naming the ranks and the GPU's PCI bus id.
//
// Collectives are enqueued on `stream` (default: the legacy default stream), so they are ordered
// after the kernels that produced their tensors on it; all_reduce_on / broadcast_on enqueue on a
// DeviceStream instead (nullptr: the current stream, where mixprec's kernels run), which is how
// DistributedDataParallel overlaps them with backward. Work::wait() blocks the host until the
// collective is done. float16/bfloat16 all_reduce widens into a float32 scratch buffer, reduces
// in float32 and rounds once (NCCL would otherwise sum in 16 bits at every hop of the ring).
#if !defined(__CUDACC__)
#error "mixprec/distributed/nccl.cuh is compiled by nvcc; link mixprec::nccl"
#endif
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "mixprec/backends/cuda/streams.hpp"
#include "mixprec/core/capabilities.hpp"
#include "mixprec/distributed/process_group.hpp"
#include "mixprec/ops/tensor_ops.hpp"  // zeros (the GPU UUID exchange)
#include "mixprec/dtype/bfloat16.hpp"
#include "mixprec/dtype/half.hpp"

namespace mixprec::distributed {

namespace detail {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("nccl backend: ", what, " failed: ", cudaGetErrorString(e));
}
inline void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) fail("nccl ", what, " failed: ", ncclGetErrorString(r));
}

inline ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::Float32: return ncclFloat32;
    case DType::Float64: return ncclFloat64;
    case DType::Float16: return ncclFloat16;
    case DType::BFloat16: return ncclBfloat16;
    case DType::Int32: return ncclInt32;
    case DType::Int64: return ncclInt64;
    case DType::UInt8:
    case DType::Bool: return ncclUint8;
    case DType::Float8E4M3FN:
    case DType::Float8E5M2: break;  // not sent: a sum of their bytes as uint8 would be silently wrong
  }
  fail("nccl: unsupported dtype ", d);
}

template <class T>
__global__ void widen_kernel(const T* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = static_cast<float>(in[i]);
}
template <class T>
__global__ void narrow_kernel(const float* in, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = T(in[i]);
}
inline unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096)); }

}  // namespace detail

class NcclProcessGroup final : public ProcessGroup {
 public:
  // Collective over `bootstrap`: every rank of it joins, with its own `device`.
  NcclProcessGroup(ProcessGroup& bootstrap, int device, cudaStream_t stream = nullptr)
      : rank_(bootstrap.rank()), size_(bootstrap.size()), device_(device), stream_(stream) {
    // Every rank decides the same on a machine without CUDA, so none waits on the bootstrap.
    MIXPREC_CHECK(cuda_is_available(), "NcclProcessGroup: CUDA is not available: ", cuda_unavailable_reason());
    // A rank whose device does not exist still joins the gather, with an empty id, so none waits.
    const bool exists = device >= 0 && device < cuda_device_count();
    check_one_rank_per_gpu(bootstrap, exists);
    ncclUniqueId id{};
    if (rank_ == 0) detail::nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    Tensor blob = empty({static_cast<int64_t>(sizeof id)}, DType::UInt8);
    std::memcpy(blob.data_ptr(), &id, sizeof id);
    bootstrap.broadcast(blob, 0)->wait();
    std::memcpy(&id, blob.data_ptr(), sizeof id);
    init(id);
  }
  // A group of this process alone (world size 1): no bootstrap, no MPI.
  explicit NcclProcessGroup(int device, cudaStream_t stream = nullptr) : rank_(0), size_(1), device_(device), stream_(stream) {
    MIXPREC_CHECK(cuda_is_available(), "NcclProcessGroup: CUDA is not available: ", cuda_unavailable_reason());
    MIXPREC_CHECK(device >= 0 && device < cuda_device_count(), "NcclProcessGroup: device ", device, " does not exist (",
                  cuda_device_count(), " CUDA devices)");
    ncclUniqueId id{};
    detail::nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    init(id);
  }
  ~NcclProcessGroup() override {
    if (comm_) ncclCommDestroy(comm_);
  }
  NcclProcessGroup(const NcclProcessGroup&) = delete;
  NcclProcessGroup& operator=(const NcclProcessGroup&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  std::shared_ptr<Work> broadcast(const Tensor& tensor, int root) override { return broadcast_impl(tensor, root, stream_); }

  std::shared_ptr<Work> all_reduce(const Tensor& tensor, ReduceOp op = ReduceOp::Sum) override {
    return all_reduce_impl(tensor, op, stream_);
  }
  std::shared_ptr<Work> all_reduce_on(const Tensor& tensor, ReduceOp op, DeviceStream* stream) override {
    return all_reduce_impl(tensor, op, gpu::native_stream(stream));
  }
  std::shared_ptr<Work> broadcast_on(const Tensor& tensor, int root, DeviceStream* stream) override {
    return broadcast_impl(tensor, root, gpu::native_stream(stream));
  }
  int device() const { return device_; }

 private:
  std::shared_ptr<Work> all_reduce_impl(const Tensor& tensor, ReduceOp op, cudaStream_t stream) {
    detail::check_collective_tensor(*this, "all_reduce", tensor, Device::CUDA);
    MIXPREC_CHECK(tensor.dtype() != DType::Bool, "nccl all_reduce: bool tensors are not reduced; use uint8 (shape ",
                  tensor.sizes(), ")");
    const ncclRedOp_t rop = op == ReduceOp::Sum ? ncclSum : ncclMax;
    const auto n = static_cast<std::size_t>(tensor.numel());
    if (tensor.dtype() != DType::Float16 && tensor.dtype() != DType::BFloat16) {
      detail::nccl_check(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), n, detail::nccl_type(tensor.dtype()), rop, comm_, stream),
                         "all_reduce");
    } else if (n > 0) {
      float* buf = nullptr;
      detail::cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&buf), n * sizeof(float), stream), "cudaMallocAsync");
      const auto count = static_cast<int64_t>(n);
      const unsigned grid = detail::grid_for(count);
      auto run = [&]<class T>(T* p) {
        detail::widen_kernel<T><<<grid, 256, 0, stream>>>(p, buf, count);
        detail::cuda_check(cudaGetLastError(), "widen kernel");
        detail::nccl_check(ncclAllReduce(buf, buf, n, ncclFloat32, rop, comm_, stream), "all_reduce");
        detail::narrow_kernel<T><<<grid, 256, 0, stream>>>(buf, p, count);
        detail::cuda_check(cudaGetLastError(), "narrow kernel");
      };
      if (tensor.dtype() == DType::Float16) run(static_cast<mixprec::half*>(tensor.data_ptr()));
      else run(static_cast<mixprec::bfloat16*>(tensor.data_ptr()));
      detail::cuda_check(cudaFreeAsync(buf, stream), "cudaFreeAsync");
    }
    tensor.bump_version();
    return record({tensor}, stream);
  }

  std::shared_ptr<Work> broadcast_impl(const Tensor& tensor, int root, cudaStream_t stream) {
    detail::check_collective_tensor(*this, "broadcast", tensor, Device::CUDA);
    detail::check_root(*this, root);
    detail::nccl_check(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), static_cast<std::size_t>(tensor.numel()),
                                     detail::nccl_type(tensor.dtype()), root, comm_, stream),
                       "broadcast");
    tensor.bump_version();
    return record({tensor}, stream);
  }

 public:
  std::shared_ptr<Work> all_gather(const Tensor& output, const Tensor& input) override {
    detail::check_all_gather(*this, output, input, Device::CUDA);
    detail::nccl_check(ncclAllGather(input.data_ptr(), output.data_ptr(), static_cast<std::size_t>(input.numel()),
                                     detail::nccl_type(input.dtype()), comm_, stream_),
                       "all_gather");
    output.bump_version();
    return record({output, input}, stream_);
  }

  // NCCL has no barrier: an all-reduce of one float stands in for it.
  std::shared_ptr<Work> barrier() override {
    float* one = nullptr;
    detail::cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&one), sizeof(float), stream_), "cudaMallocAsync");
    detail::cuda_check(cudaMemsetAsync(one, 0, sizeof(float), stream_), "cudaMemsetAsync");
    detail::nccl_check(ncclAllReduce(one, one, 1, ncclFloat32, ncclSum, comm_, stream_), "barrier");
    detail::cuda_check(cudaFreeAsync(one, stream_), "cudaFreeAsync");
    return record({}, stream_);
  }

 private:
  class NcclWork final : public Work {
   public:
    NcclWork(cudaEvent_t e, ncclComm_t c, std::vector<Tensor> keep) : event_(e), comm_(c), keep_(std::move(keep)) {}
    ~NcclWork() override { cudaEventDestroy(event_); }
    void wait() override {
      detail::cuda_check(cudaEventSynchronize(event_), "cudaEventSynchronize");
      ncclResult_t async_error = ncclSuccess;
      detail::nccl_check(ncclCommGetAsyncError(comm_, &async_error), "ncclCommGetAsyncError");
      detail::nccl_check(async_error, "collective");
    }

   private:
    cudaEvent_t event_;
    ncclComm_t comm_;
    std::vector<Tensor> keep_;  // the tensors stay allocated until the collective is done
  };

  std::shared_ptr<Work> record(std::vector<Tensor> keep, cudaStream_t stream) {
    cudaEvent_t e = nullptr;
    detail::cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    detail::cuda_check(cudaEventRecord(e, stream), "cudaEventRecord");
    return std::make_shared<NcclWork>(e, comm_, std::move(keep));
  }

  void init(const ncclUniqueId& id) {
    detail::cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    detail::nccl_check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }

  // Every rank's GPU UUID (16 bytes; zeros for a device that does not exist), gathered over the
  // bootstrap; all ranks see the same table, so all refuse together.
  void check_one_rank_per_gpu(ProcessGroup& bootstrap, bool exists) {
    Tensor mine = zeros({16}, DType::UInt8), all = zeros({16 * static_cast<int64_t>(size_)}, DType::UInt8);
    std::string bus = "?";
    if (exists) {
      cudaDeviceProp prop{};
      detail::cuda_check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
      std::memcpy(mine.data_ptr(), prop.uuid.bytes, 16);
      char id[32] = {};
      if (cudaDeviceGetPCIBusId(id, sizeof id, device_) == cudaSuccess) bus = id;
    }
    bootstrap.all_gather(all, mine)->wait();
    const auto* u = all.data<uint8_t>();
    static const uint8_t none[16] = {};
    for (int r = 0; r < size_; ++r) MIXPREC_CHECK(std::memcmp(u + 16 * r, none, 16) != 0, "NcclProcessGroup: rank ", r,
                                                  " asked for a CUDA device that does not exist", r == rank_ ? " (this rank: device " : "",
                                                  r == rank_ ? std::to_string(device_) + ")" : std::string());
    for (int r = 0; r < size_; ++r)
      if (r != rank_ && std::memcmp(u + 16 * r, u + 16 * rank_, 16) == 0)
        fail("NcclProcessGroup: ranks ", std::min(r, rank_), " and ", std::max(r, rank_), " both use the GPU at PCI bus ", bus,
             " (device ", device_, " of rank ", rank_, "): run one process per GPU, with device = the local rank "
             "(distributed::local_rank()) and no more processes per node than GPUs");
  }

  int rank_, size_, device_;
  cudaStream_t stream_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace mixprec::distributed
