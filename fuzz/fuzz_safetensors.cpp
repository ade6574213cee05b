// libFuzzer entry point for the safetensors loader; scripts/fuzz.sh builds and runs it.
#include "harness.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  mixprec_fuzz::safetensors_one(data, size);
  return 0;
}
