#pragma once
// --distributed: data-parallel training over MPI (`mpirun -np N program --distributed`). Without
// the flag the program is one process, rank 0 of 1. Builds without MPI refuse the flag.
// With --device cuda (the nvcc-built examples, with NCCL): one process per GPU, rank -> GPU by
// the launcher's local rank; gradients, buffers and the found-inf flag go over NCCL on the
// device, and MPI carries only the NCCL id and the host-side numbers (loss, throughput).
#include <cstdio>
#include <memory>

#include <mixprec/mixprec.hpp>

#include <mixprec/distributed/ddp.hpp>
#if defined(MIXPREC_EXAMPLES_MPI)
#include <mixprec/distributed/mpi.hpp>
#endif
#if defined(MIXPREC_EXAMPLES_NCCL) && defined(__CUDACC__)
#include <mixprec/distributed/nccl.cuh>
#endif

namespace examples {

class Distributed {
 public:
  explicit Distributed(bool enabled, mixprec::Device device = mixprec::Device::CPU) {
    if (!enabled) return;
#if defined(MIXPREC_EXAMPLES_MPI)
    group() = std::make_shared<mixprec::distributed::MpiProcessGroup>();
    rank_ = group()->rank();
    world_ = group()->size();
    if (device != mixprec::Device::CPU) {
#if defined(MIXPREC_EXAMPLES_NCCL) && defined(__CUDACC__)
      // The launcher's local rank picks the GPU (the global rank on one node when it says nothing);
      // the group refuses two ranks on one GPU and a rank without one, on every rank.
      const int local = mixprec::distributed::local_rank();
      device_group_ = std::make_shared<mixprec::distributed::NcclProcessGroup>(*group(), local >= 0 ? local : rank_);
#else
      mixprec::fail("--distributed --device ", device, ": this build has no NCCL data-parallel backend (build the CUDA "
                    "examples with MIXPREC_NCCL=ON and MPI)");
#endif
    }
#else
    mixprec::fail("--distributed: this build has no MPI (install libopenmpi-dev openmpi-bin and reconfigure)");
#endif
  }

  int rank() const { return rank_; }
  int world() const { return world_; }
  // Rank 0 alone logs, shows progress and writes checkpoints and CSV files.
  bool is_main() const { return rank_ == 0; }

  // The sum of a per-rank number over all ranks (the number itself in one process).
  double sum(double v) const {
#if defined(MIXPREC_EXAMPLES_MPI)
    if (group()) {
      mixprec::Tensor t = mixprec::full({1}, v, mixprec::DType::Float64);
      group()->all_reduce(t)->wait();
      return t.data<double>()[0];
    }
#endif
    return v;
  }
  double mean(double v) const { return sum(v) / world_; }

  // With several processes: wraps `model` in DistributedDataParallel (weights from rank 0,
  // gradients averaged in backward) and makes `scaler` skip steps on every rank together.
  void wrap(mixprec::nn::Module& model, mixprec::amp::GradScaler& scaler) {
#if defined(MIXPREC_EXAMPLES_MPI)
    if (world_ == 1) return;
    std::shared_ptr<mixprec::distributed::ProcessGroup> pg = device_group_;
    if (!pg) pg = group();
    ddp_ = std::make_unique<mixprec::distributed::DistributedDataParallel>(model, pg);
    mixprec::distributed::all_reduce_found_inf(scaler, pg);
    if (is_main())  // the ring all-reduce's volume: each rank sends and receives ~2 (p - 1) / p of it per step
      std::printf("data parallel over %s: %d processes, %zu gradient buckets, %.2f MB all-reduced per step\n",
                  pg->backend().c_str(), world_, ddp_->num_buckets(), static_cast<double>(ddp_->bytes_per_step()) / 1e6);
#else
    (void)model, (void)scaler;
#endif
  }
  // Before a forward pass: every rank takes rank 0's buffers (BatchNorm statistics).
  void sync_buffers() {
    if (ddp_) ddp_->sync_buffers();
  }

#if defined(MIXPREC_EXAMPLES_MPI)
  // Lives until the program exits (MPI is finalized then), so that abort_job works from main.
  static std::shared_ptr<mixprec::distributed::MpiProcessGroup>& group() {
    static std::shared_ptr<mixprec::distributed::MpiProcessGroup> g;
    return g;
  }
#endif

  // After an error on one rank the others would wait in their next collective forever: end the
  // whole job. Does nothing in one process.
  static void abort_job(int code) {
#if defined(MIXPREC_EXAMPLES_MPI)
    if (group()) group()->abort(code);
#else
    (void)code;
#endif
  }

 private:
  int rank_ = 0, world_ = 1;
  std::shared_ptr<mixprec::distributed::ProcessGroup> device_group_;  // NCCL, with --device cuda
  std::unique_ptr<mixprec::distributed::DistributedDataParallel> ddp_;
};

}  // namespace examples
