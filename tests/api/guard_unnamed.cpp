// Compiled by ctest with -Werror=unused-result and expected to FAIL: an unnamed guard is a
// temporary that guards nothing, and MIXPREC_GUARD makes the compiler say so (see
// tests/CMakeLists.txt, api_unnamed_guard_*).
#include "mixprec/amp/autocast.hpp"
#include "mixprec/autograd/anomaly.hpp"
#include "mixprec/autograd/grad_mode.hpp"

int main() {
#if defined(GUARD_AUTOCAST)
  mixprec::autocast(mixprec::Device::CPU, mixprec::DType::BFloat16);
#elif defined(GUARD_NO_GRAD)
  mixprec::no_grad();
#elif defined(GUARD_ENABLE_GRAD)
  mixprec::enable_grad();
#elif defined(GUARD_DETECT_ANOMALY)
  mixprec::detect_anomaly();
#else
  mixprec::autocast named(mixprec::Device::CPU, mixprec::DType::BFloat16);  // the control: compiles cleanly
  mixprec::no_grad ng;
  (void)named, (void)ng;
#endif
  return 0;
}
