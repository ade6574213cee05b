// libFuzzer entry point for the text loader; scripts/fuzz.sh builds and runs it.
#include "harness.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  mixprec_fuzz::text_one(data, size);
  return 0;
}
