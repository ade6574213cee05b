// NCCL for the nvcc-built examples' --distributed --device cuda, bootstrapped over the MPI group
// (launch_mpi.cpp): a small nvcc unit of its own, so that the examples' units need no NCCL.
#include <mixprec/distributed/nccl.cuh>

namespace examples {
std::shared_ptr<mixprec::distributed::ProcessGroup> make_nccl_group(mixprec::distributed::ProcessGroup& bootstrap, int gpu) {
  return std::make_shared<mixprec::distributed::NcclProcessGroup>(bootstrap, gpu);
}
}  // namespace examples
