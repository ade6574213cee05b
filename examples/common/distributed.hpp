#pragma once
// --distributed: data-parallel training over MPI (`mpirun -np N program --distributed`). Without
// the flag the program is one process, rank 0 of 1. Builds without MPI refuse the flag.
// With --device cuda (the nvcc-built examples, with NCCL): one process per GPU, rank -> GPU by
// the launcher's local rank; gradients, buffers and the found-inf flag go over NCCL on the
// device, and MPI carries only the NCCL id and the host-side numbers (loss, throughput).
// How the groups start: common/launch.hpp.
#include <cstdio>
#include <memory>

#include <mixprec/mixprec.hpp>

#include <mixprec/distributed/ddp.hpp>

#include "common/launch.hpp"

namespace examples {

class Distributed {
 public:
  explicit Distributed(bool enabled, mixprec::Device device = mixprec::Device::CPU) {
    if (!enabled) return;
    groups_ = launch_process_groups(device);
    rank_ = groups_.host->rank();
    world_ = groups_.host->size();
  }

  int rank() const { return rank_; }
  int world() const { return world_; }
  // Rank 0 alone logs, shows progress and writes checkpoints and CSV files.
  bool is_main() const { return rank_ == 0; }

  // The sum of a per-rank number over all ranks (the number itself in one process).
  double sum(double v) const {
    if (!groups_.host) return v;
    mixprec::Tensor t = mixprec::full({1}, v, mixprec::DType::Float64);
    groups_.host->all_reduce(t)->wait();
    return t.data<double>()[0];
  }
  double mean(double v) const { return sum(v) / world_; }

  // With several processes: wraps `model` in DistributedDataParallel (weights from rank 0,
  // gradients averaged in backward) and makes `scaler` skip steps on every rank together.
  void wrap(mixprec::nn::Module& model, mixprec::amp::GradScaler& scaler) {
    if (world_ == 1) return;
    std::shared_ptr<mixprec::distributed::ProcessGroup> pg = groups_.device ? groups_.device : groups_.host;
    ddp_ = std::make_unique<mixprec::distributed::DistributedDataParallel>(model, pg);
    mixprec::distributed::all_reduce_found_inf(scaler, pg);
    if (is_main())  // the ring all-reduce's volume: each rank sends and receives ~2 (p - 1) / p of it per step
      std::printf("data parallel over %s: %d processes, %zu gradient buckets, %.2f MB all-reduced per step\n",
                  pg->backend().c_str(), world_, ddp_->num_buckets(), static_cast<double>(ddp_->bytes_per_step()) / 1e6);
  }
  // Before a forward pass: every rank takes rank 0's buffers (BatchNorm statistics).
  void sync_buffers() {
    if (ddp_) ddp_->sync_buffers();
  }

  // After an error on one rank the others would wait in their next collective forever: end the
  // whole job. Does nothing in one process.
  static void abort_job(int code) { abort_launched_job(code); }

 private:
  int rank_ = 0, world_ = 1;
  ProcessGroups groups_;
  std::unique_ptr<mixprec::distributed::DistributedDataParallel> ddp_;
};

}  // namespace examples
