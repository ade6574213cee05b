// The examples' launch unit for builds without MPI: --distributed is refused with what to install.
#include "common/launch.hpp"

namespace examples {
ProcessGroups launch_process_groups(mixprec::Device) {
  mixprec::fail("--distributed: this build has no MPI (install libopenmpi-dev openmpi-bin and reconfigure)");
}
void abort_launched_job(int) {}
}  // namespace examples
