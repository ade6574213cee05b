#pragma once
// How --distributed starts: one small unit linked into each example program (launch_single.cpp:
// no MPI; launch_mpi.cpp: MPI, and NCCL through launch_nccl.cu), so that an example's own unit --
// the expensive one, above all under nvcc -- is compiled once and linked into the programs with
// and without MPI (examples/CMakeLists.txt).
#include <memory>

#include <mixprec/distributed/process_group.hpp>

namespace examples {

struct ProcessGroups {
  std::shared_ptr<mixprec::distributed::ProcessGroup> host;    // MPI: every rank, host tensors
  std::shared_ptr<mixprec::distributed::ProcessGroup> device;  // NCCL, with --device cuda; else null
};
// Joins the job's groups (a build without MPI, or without NCCL for a device, refuses with the reason).
ProcessGroups launch_process_groups(mixprec::Device device);
// Ends every rank of the job (does nothing in a build without MPI or before launch_process_groups).
void abort_launched_job(int code);

}  // namespace examples
