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
#include <memory>
#include <string>

#include "mixprec/tensor/tensor.hpp"

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
};

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
