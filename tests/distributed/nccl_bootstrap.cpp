// The MPI group test_nccl bootstraps NCCL over, compiled by g++ so nvcc never sees MPI.
#include <mixprec/distributed/mpi.hpp>

namespace mixprec::testing {
distributed::ProcessGroup& nccl_bootstrap() {
  static distributed::MpiProcessGroup pg;  // finalizes MPI at exit
  return pg;
}
}  // namespace mixprec::testing
