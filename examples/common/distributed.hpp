#pragma once
// --distributed: data-parallel training over MPI (`mpirun -np N program --distributed`). Without
// the flag the program is one process, rank 0 of 1. Builds without MPI refuse the flag.
#include <memory>

#include <mixprec/mixprec.hpp>

#include <mixprec/distributed/ddp.hpp>
#if defined(MIXPREC_EXAMPLES_MPI)
#include <mixprec/distributed/mpi.hpp>
#endif

namespace examples {

class Distributed {
 public:
  explicit Distributed(bool enabled) {
    if (!enabled) return;
#if defined(MIXPREC_EXAMPLES_MPI)
    group() = std::make_shared<mixprec::distributed::MpiProcessGroup>();
    rank_ = group()->rank();
    world_ = group()->size();
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
    ddp_ = std::make_unique<mixprec::distributed::DistributedDataParallel>(model, group());
    mixprec::distributed::all_reduce_found_inf(scaler, group());
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
  std::unique_ptr<mixprec::distributed::DistributedDataParallel> ddp_;
};

}  // namespace examples
