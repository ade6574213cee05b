// A consumer of the package: a bfloat16 round trip, a bfloat16-autocast matmul and the memory
// statistics; prints values that tests/package/run_consumer.cmake checks. It includes only the core
// area header (what it uses), so the installed and vendored packages are checked to serve that too.
#include <mixprec/core.hpp>

#include <iostream>

int main() {
  using namespace mixprec;
  const Tensor x = arange(0.0, 8.0, 1.0, DType::Float32);
  const Tensor y = x.to(DType::BFloat16).to(DType::Float32);
  double sum = 0;
  for (int64_t i = 0; i < 8; ++i) sum += y.data<float>()[i];
  Tensor m;
  {
    autocast ac{Device::CPU, DType::BFloat16};
    m = matmul(ones({2, 3}), ones({3, 2}));
  }
  if (m.dtype() != DType::BFloat16) return 1;
  const Tensor mf = m.to(DType::Float32);
  if (memory_stats(Device::CPU).allocated_bytes <= 0) return 2;
#ifdef MIXPREC_WITH_ONEDNN
  const char* onednn = "yes";
#else
  const char* onednn = "no";
#endif
#ifdef MIXPREC_COMPILED_LIB
  const char* compiled = "yes";
#else
  const char* compiled = "no";
#endif
  std::cout << "consumer ok: sum=" << sum << " matmul=" << mf.data<float>()[0] << " onednn=" << onednn << " compiled=" << compiled << '\n';
  return 0;
}
