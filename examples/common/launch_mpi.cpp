// The examples' launch unit over MPI (g++: nvcc never sees MPI). With MIXPREC_EXAMPLES_NCCL, the
// nvcc-built examples' --device cuda takes an NCCL group bootstrapped over MPI (launch_nccl.cu).
#include <mixprec/distributed/mpi.hpp>

#include "common/launch.hpp"

namespace examples {
#if defined(MIXPREC_EXAMPLES_NCCL)
std::shared_ptr<mixprec::distributed::ProcessGroup> make_nccl_group(mixprec::distributed::ProcessGroup& bootstrap, int gpu);
#endif

namespace {
// Lives until the program exits (MPI is finalized then), so that abort_launched_job works from main.
std::shared_ptr<mixprec::distributed::MpiProcessGroup>& mpi_group() {
  static std::shared_ptr<mixprec::distributed::MpiProcessGroup> g;
  return g;
}
}  // namespace

ProcessGroups launch_process_groups(mixprec::Device device) {
  if (!mpi_group()) mpi_group() = std::make_shared<mixprec::distributed::MpiProcessGroup>();
  ProcessGroups groups{mpi_group(), nullptr};
  if (device != mixprec::Device::CPU) {
#if defined(MIXPREC_EXAMPLES_NCCL)
    // The launcher's local rank picks the GPU (the global rank on one node when it says nothing);
    // the group refuses two ranks on one GPU and a rank without one, on every rank.
    const int local = mixprec::distributed::local_rank();
    groups.device = make_nccl_group(*groups.host, local >= 0 ? local : groups.host->rank());
#else
    mixprec::fail("--distributed --device ", device, ": this build has no NCCL data-parallel backend (build the CUDA "
                  "examples with MIXPREC_NCCL=ON and MPI)");
#endif
  }
  return groups;
}

void abort_launched_job(int code) {
  if (mpi_group()) mpi_group()->abort(code);
}
}  // namespace examples
