#pragma once
// ProcessGroup: the collectives data-parallel training needs, over an existing communication
// engine (backends: mpi.hpp for CPU tensors, nccl.cuh for CUDA tensors). Every rank must issue
// the same collectives in the same order.
//
// Collectives are asynchronous: they return a Work to wait() on, so DistributedDataParallel can
// reduce one bucket of gradients while backward computes the next. The tensors are in use until
// wait() returns: do not read or write them before.
//
// all_reduce of float16/bfloat16 tensors widens them to float32, reduces in float32 and rounds
// once into the tensor: summing many 16-bit contributions in 16 bits would round at every hop.
#include <cstdlib>
#include <memory>
#include <string>

#include "mixprec/tensor/tensor.hpp"

namespace mixprec {
class DeviceStream;  // backends/device.hpp
}  // namespace mixprec

namespace mixprec::distributed {

enum class ReduceOp { Sum, Max };

inline const char* name(ReduceOp op) { return op == ReduceOp::Sum ? "sum" : "max"; }

class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the collective has finished; throws mixprec::Error if it failed.
  virtual void wait() = 0;
};

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // `tensor` on every rank becomes root's.
  virtual std::shared_ptr<Work> broadcast(const Tensor& tensor, int root) = 0;
  // `tensor` on every rank becomes the element-wise sum (or max) over the ranks.
  virtual std::shared_ptr<Work> all_reduce(const Tensor& tensor, ReduceOp op = ReduceOp::Sum) = 0;
  // output (numel = size() * input.numel(), input's dtype) = the inputs of ranks 0, 1, ... in order.
  virtual std::shared_ptr<Work> all_gather(const Tensor& output, const Tensor& input) = 0;
  virtual std::shared_ptr<Work> barrier() = 0;

  // all_reduce and broadcast of device tensors enqueued on a device stream (backends/device.hpp;
  // nullptr: the compute stream, where the kernels run): they start after the work enqueued there
  // before them and the stream's later work sees their result, so the host need not wait().
  // The CPU has no streams: its host thread is the compute stream, so this default waits for the
  // collective and refuses any other stream; device backends (NCCL) override both.
  virtual std::shared_ptr<Work> all_reduce_on(const Tensor& tensor, ReduceOp op, DeviceStream* stream) {
    refuse_stream("all_reduce_on", tensor, stream);
    auto w = all_reduce(tensor, op);
    w->wait();
    return w;
  }
  virtual std::shared_ptr<Work> broadcast_on(const Tensor& tensor, int root, DeviceStream* stream) {
    refuse_stream("broadcast_on", tensor, stream);
    auto w = broadcast(tensor, root);
    w->wait();
    return w;
  }

 private:
  void refuse_stream(const char* op, const Tensor& t, DeviceStream* stream) const {
    MIXPREC_CHECK(stream == nullptr, backend(), " ", op, ": tensor of shape ", t.sizes(), " on ", t.device(),
                  ": this backend has no device streams (pass nullptr, the compute stream)");
  }
};

// The process's rank among those on its node, from the launcher's environment (Open MPI, MPICH,
// Slurm, torchrun), or -1 when none says: data parallelism on GPUs takes device local_rank().
inline int local_rank() {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"})
    if (const char* s = std::getenv(v); s != nullptr && *s != '\0') return std::atoi(s);
  return -1;
}

namespace detail {
// What every backend requires of a collective's tensor.
inline void check_collective_tensor(const ProcessGroup& pg, const char* op, const Tensor& t, Device device) {
  MIXPREC_CHECK(t.defined(), pg.backend(), " ", op, ": undefined tensor");
  MIXPREC_CHECK(t.device() == device, pg.backend(), " ", op, ": tensor of shape ", t.sizes(), " is on ", t.device(),
                "; this backend reduces ", device, " tensors");
  MIXPREC_CHECK(t.is_contiguous(), pg.backend(), " ", op, ": tensor of shape ", t.sizes(), " with strides ", t.strides(),
                " is not contiguous");
}
inline void check_all_gather(const ProcessGroup& pg, const Tensor& output, const Tensor& input, Device device) {
  check_collective_tensor(pg, "all_gather", input, device);
  check_collective_tensor(pg, "all_gather", output, device);
  MIXPREC_CHECK(output.dtype() == input.dtype() && output.numel() == input.numel() * pg.size(), pg.backend(),
                " all_gather: output of shape ", output.sizes(), " and dtype ", output.dtype(), " cannot hold ", pg.size(),
                " inputs of shape ", input.sizes(), " and dtype ", input.dtype());
}
inline void check_root(const ProcessGroup& pg, int root) {
  MIXPREC_CHECK(root >= 0 && root < pg.size(), pg.backend(), " broadcast: root ", root, " is not a rank of a group of ",
                pg.size());
}
}  // namespace detail

}  // namespace mixprec::distributed
